"""Output locations that fail mid-set, for real: a file-size limit (RLIMIT_FSIZE, what a full disk looks like to a
writer: EFBIG/ENOSPC) that the first PNG of a set fits and a later one does not leaves none of the set and no
temporary file, so the next run is not refused; one line, exit 2."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys

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
