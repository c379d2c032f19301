"""Data-parallel training (distributed.py) on the launchers users run: two CPU processes under torchrun (gloo)
and under mlx.launch (the ring backend over 127.0.0.1). After K steps both ranks hold the same weights, equal to
one process trained on the same global batches; the run resumes in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKENDS
from safetensors.numpy import load_file

import dalle2_portable as d2
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.train.settings import TrainSettings

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
SETTINGS = dict(steps=3, batch_size=4, data_size=8, checkpoint_every=3, lr=1e-3, warmup=1, adam_eps=1e-4,
                ema_max_decay=0.0)


def _launch(backend: str, out: Path, models, settings: dict, stop_at: int | None = None, timeout: float = 240):
    """dist_train.py in two processes under the backend's own launcher; its output if it fails."""
    script = [str(HERE / "dist_train.py"), backend, "decoder", str(models["karlo"]), str(models["iv"]), str(out),
              json.dumps(settings)] + ([str(stop_at)] if stop_at else [])
    bin_dir = Path(sys.executable).parent
    if backend == "torch":
        command = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2", *script]
    else:
        command = [str(bin_dir / "mlx.launch"), "-n", "2", "--backend", "ring", "--python", sys.executable, "--",
                   *script]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    r = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _single(out: Path, models, backend: str, settings: dict, resume=False) -> dict:
    d2.train("decoder", "shapes", out, models["karlo"], clip=models["iv"], backend=backend,
             settings=TrainSettings(**settings), resume=resume)
    return load_file(out / "model" / "decoder.safetensors")


@pytest.mark.parametrize("backend", [b for b in ("torch", "mlx") if b in BACKENDS])
def test_two_processes_train_as_one_on_the_whole_batch(models, tmp_path, backend):
    _launch(backend, tmp_path / "two", models, SETTINGS)
    ranks = [load_file(tmp_path / "two" / f"rank-{r}.safetensors") for r in (0, 1)]
    assert all(np.array_equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # the same weights on both ranks
    one = _single(tmp_path / "one", models, backend, SETTINGS)
    two = load_file(tmp_path / "two" / "model" / "decoder.safetensors")
    # of each tensor's scale: measured torch 4.3e-7, MLX 8.7e-7 (a mean of two half-batch means in float32)
    worst = max(np.abs(two[k] - one[k]).max() / max(np.abs(one[k]).max(), 1e-3) for k in one)
    assert worst <= 1e-5, worst
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]  # rank 0 alone writes the log
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"] for a, b in zip(lines, single))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2


@pytest.mark.skipif("torch" not in BACKENDS, reason="needs torch")
def test_a_two_process_checkpoint_resumes_in_one_process(models, tmp_path):
    settings = dict(SETTINGS, steps=4, checkpoint_every=2)
    _launch("torch", tmp_path / "run", models, settings, stop_at=2)
    resumed = _single(tmp_path / "run", models, "torch", settings, resume=True)
    straight = _single(tmp_path / "straight", models, "torch", settings)
    worst = max(np.abs(resumed[k] - straight[k]).max() / max(np.abs(straight[k]).max(), 1e-3) for k in straight)
    assert worst <= 1e-5, worst


def _rank_pids(rank: int) -> list[int]:
    """The pids of `dalle2 train` processes whose launcher made them rank `rank`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if any(x.endswith(b"dalle2") for x in cmdline) and b"train" in cmdline and (
                f"RANK={rank}".encode() in env or f"MLX_RANK={rank}".encode() in env):
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
@pytest.mark.parametrize("backend,how", [(b, h) for b, h in (("torch", "kill"), ("mlx", "freeze")) if b in BACKENDS])
def test_a_lost_rank_stops_the_run_in_one_line_and_the_checkpoint_resumes(tmp_path, backend, how):
    """Rank 1 killed (its launcher then stops the run; gloo's read error on the survivor is one line) or frozen
    (SIGSTOP: nothing fails, the survivor's all-reduce waits, and DALLE2_DIST_TIMEOUT ends it with one line).
    Either way the last checkpoint is whole and resumes in one process."""
    import signal
    import time

    out = tmp_path / "run"
    bin_dir = Path(sys.executable).parent
    train = [str(bin_dir / "dalle2"), "train", "prior", "--data", "shapes", "--out", str(out), "-m", "default",
             "--steps", "100000", "--batch-size", "4", "--data-size", "8", "--checkpoint-every", "5", "--quiet",
             "--backend", backend]
    launch = ([str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", "2"] if backend == "torch" else
              [str(bin_dir / "mlx.launch"), "-n", "2", "--backend", "ring", "--"])
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "DALLE2_DIST_TIMEOUT": "10"}
    proc = subprocess.Popen(launch + train, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        t0 = time.monotonic()
        while not (out / "checkpoint" / "state.json").is_file():
            assert time.monotonic() - t0 < 120 and proc.poll() is None, "the run did not reach a checkpoint"
            time.sleep(0.2)
        victims = _rank_pids(1)
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t1 = time.monotonic()
        if how == "freeze":  # the launcher waits for the frozen rank: end it once the survivor has ended
            while _rank_pids(0) and time.monotonic() - t1 < 60:
                time.sleep(0.2)
            stopped_after = time.monotonic() - t1
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=60)
        stopped_after = stopped_after if how == "freeze" else time.monotonic() - t1
    finally:
        for pid in _rank_pids(1) + _rank_pids(0):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    ours = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, output[-3000:]
    if how == "freeze":  # the bound, not a launcher, ended it
        assert "got no answer from the other processes within 10 s" in ours[0] and stopped_after < 30
    else:
        assert "another process stopped" in ours[0] or "interrupted (SIGTERM)" in ours[0], ours
    step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    d2.train("prior", "shapes", out, "default", backend=backend, resume=True, stop_at=step + 1,
             settings=TrainSettings(steps=100000, batch_size=4, data_size=8, checkpoint_every=5))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == step + 1


def test_a_batch_that_does_not_split_and_clip_are_one_line():
    from dalle2_portable.distributed import World

    with pytest.raises(Dalle2Error, match="does not split evenly over 2 processes"):
        World(0, 2).part(5)
    assert World(1, 2).part(4) == slice(2, 4) and not World(1, 2).writer
