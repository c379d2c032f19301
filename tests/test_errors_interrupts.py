"""Interruptions by real signals, sent to a real `dalle2 convert` in a subprocess the moment its temporary folder
appears: SIGTERM, SIGHUP and SIGINT leave neither a partial output under the final name nor the temporary folder,
and exit with one line; SIGKILL cannot be caught, so its leftover is swept, with a message, by the next run (and
`dalle2 cache list` shows such leftovers in the cache)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "dalle2_portable.cli"]


def _sigint_default():
    """In the child: SIGINT as a terminal sends it. A shell's background job (`pytest ... &`) starts with SIGINT
    ignored, which Python, and so the CLI, rightly keeps; the test is about the CLI's handling, not the shell's."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(source, out, sig, tries=5):
    """Run `dalle2 convert SOURCE OUT` and send `sig` once OUT's temporary sibling exists; (returncode, stderr).
    A conversion that finished before the signal landed is run again (it is a fraction of a second)."""
    for _ in range(tries):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([*CLI, "convert", str(source), str(out), "--force"], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True, env=env, preexec_fn=_sigint_default)
        while proc.poll() is None and not list(out.parent.glob(f".{out.name}.partial-*")):
            time.sleep(0.001)
        if proc.poll() is None:
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                return proc.returncode, err
            # 0: the conversion ended (whole, under its final name) before the signal could stop it
            assert out.is_dir() and not list(out.parent.glob(f".{out.name}.partial-*")), err
        else:
            proc.communicate()
        if out.exists():  # finished first: start again from nothing
            import shutil
            shutil.rmtree(out)
    pytest.fail(f"the conversion never ran long enough to be interrupted ({tries} tries)")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
def test_a_caught_signal_leaves_nothing(models, tmp_path, sig):
    out = tmp_path / "model"
    code, err = _interrupt(models["karlo_src"], out, sig)
    assert code == 128 + sig, err
    lines = err.strip().splitlines()
    assert lines[-1] == f"error: interrupted ({signal.Signals(sig).name}); nothing half-written was left", err
    assert "Traceback" not in err and not out.exists() and list(tmp_path.iterdir()) == []


def test_sigkill_leaves_a_folder_the_next_run_sweeps(models, tmp_path):
    out = tmp_path / "model"
    code, _ = _interrupt(models["karlo_src"], out, signal.SIGKILL)
    assert code == -signal.SIGKILL and not out.exists()
    left = list(tmp_path.glob(".model.partial-*"))
    assert len(left) == 1  # nothing could clean up after SIGKILL
    r = subprocess.run([*CLI, "convert", str(models["karlo_src"]), str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "warning: removed 1 folder(s) an interrupted write of" in r.stderr and "left behind" in r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_cache_list_shows_and_clear_removes_leftovers(models, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DALLE2_CACHE", str(cache))
    r = subprocess.run([*CLI, "info", str(models["karlo_src"])], capture_output=True, text=True)
    assert r.returncode == 0 and "converting" in r.stderr and "into the cache, once" in r.stderr, r.stderr
    entry = next((cache / "local").iterdir())
    ghost = entry.parent / f".{entry.name}.partial-999999999-deadbeef"  # a pid no process has
    (ghost / "sub").mkdir(parents=True)
    (ghost / "sub" / "half.safetensors").write_bytes(b"x" * 1000)
    listed = subprocess.run([*CLI, "cache", "list"], capture_output=True, text=True).stdout
    assert "(leftover of an interrupted conversion)" in listed and str(entry) in listed and "2 entries" in listed
    r = subprocess.run([*CLI, "cache", "clear", str(ghost)], capture_output=True, text=True)
    assert r.returncode == 0 and "removed 1 entries" in r.stdout and not ghost.exists() and entry.exists()
    r = subprocess.run([*CLI, "cache", "clear"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: say what to remove")
    r = subprocess.run([*CLI, "cache", "clear", "--all"], capture_output=True, text=True)
    assert r.returncode == 0 and not entry.exists()
    r = subprocess.run([*CLI, "cache", "clear", "nothing-here"], capture_output=True, text=True)
    assert r.returncode == 2 and "nothing in the cache" in r.stderr and len(r.stderr.strip().splitlines()) == 1
