"""Output locations that fail mid-set, for real: a file-size limit (RLIMIT_FSIZE, what a full disk looks like to a
writer: EFBIG/ENOSPC) that the first PNG of a set fits and a later one does not leaves none of the set and no
temporary file, so the next run is not refused; one line, exit 2."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "dalle2_portable.cli"]
ARGS = ["generate", "a red circle", "--backend", "torch", "--quiet", "-n", "4", "--steps", "3",
        "--super-res-steps", "2"]


def _limited(limit):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_a_set_that_cannot_be_written_whole_is_not_written_at_all(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = tmp_path / "first"
    first.mkdir()
    r = subprocess.run([*CLI, *ARGS, "-o", str(first / "s.png")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    sizes = [(first / f"s-{i}.png").stat().st_size for i in range(4)]
    assert max(sizes[1:]) > sizes[0], sizes  # so image 0 fits the limit below and a later one does not
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([*CLI, *ARGS, "-o", str(out / "s.png")], capture_output=True, text=True, env=env,
                       preexec_fn=_limited(sizes[0]))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write" in r.stderr and "(none of the files was written)" in r.stderr
    assert list(out.iterdir()) == []  # neither a PNG of the set nor a temporary file
    r = subprocess.run([*CLI, *ARGS, "-o", str(out / "s.png")], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and sorted(p.name for p in out.iterdir()) == [f"s-{i}.png" for i in range(4)]
    assert all((out / f"s-{i}.png").read_bytes() == (first / f"s-{i}.png").read_bytes() for i in range(4))


def test_convert_and_the_cache_on_a_full_disk_leave_nothing(models, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DALLE2_CACHE": str(tmp_path / "cache")}
    limit = _limited(20_000)  # the tiny Karlo's decoder weights are larger
    r = subprocess.run([*CLI, "convert", str(models["karlo_src"]), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, preexec_fn=limit)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "cannot write" in r.stderr and "free space" in r.stderr and "(nothing was left behind)" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    r = subprocess.run([*CLI, "info", str(models["karlo_src"])], capture_output=True, text=True, env=env,
                       preexec_fn=limit)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[-1].startswith("error: cannot write") and "Traceback" not in r.stderr, r.stderr
    assert list((tmp_path / "cache" / "local").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; run as a user to check")
def test_a_read_only_location_is_refused_before_any_work(models, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for args in (["generate", "a cat", "-m", str(models["karlo"]), "-o", str(locked / "x.png")],
                     ["convert", str(models["karlo_src"]), str(locked / "m")]):
            r = subprocess.run([*CLI, *args], capture_output=True, text=True)
            assert r.returncode == 2 and "read-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        locked.chmod(0o755)


def test_a_killed_writers_temporary_png_is_swept_with_a_message(tmp_path):
    import warnings

    from PIL import Image

    import dalle2_portable as d2
    from dalle2_portable.images import save_png

    stale = tmp_path / ".x.png.999999999-abcd1234.tmp"  # a pid no process has: what SIGKILL mid-write leaves
    stale.write_bytes(b"half a png")
    live = tmp_path / f".x.png.{os.getpid()}-abcd1234.tmp"  # this process's: work in progress, kept
    live.write_bytes(b"mine")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png")
    assert [str(w.message) for w in caught if issubclass(w.category, d2.Dalle2Warning)] == [
        f"removed 1 temporary file(s) an interrupted write of {str(tmp_path / 'x.png')!r} left behind"]
    assert not stale.exists() and live.exists() and (tmp_path / "x.png").exists()
