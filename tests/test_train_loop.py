"""The training loop on the prior: the loss falls on the shapes data and the result generates; a run killed
with SIGKILL after a checkpoint resumes to the uninterrupted run's weights bit for bit; a checkpoint resumes on
the other backend; an interrupted checkpoint write keeps the previous one; bad runs are one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import BACKENDS, backend_params
from safetensors.numpy import load_file

import dalle2_portable as d2
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.train import checkpoint as ckpt_io
from dalle2_portable.train.loop import TrainSettings, train
from dalle2_portable.train.stages import COMPONENTS

FAST = dict(data_size=48, batch_size=16, lr=1e-3, warmup=10)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", backend_params())
def test_prior_loss_falls_and_the_result_generates(models, tmp_path, backend):
    run = tmp_path / "run"
    out = train("prior", "shapes", run, models["iv"], config="tiny", backend=backend,
                settings=TrainSettings(steps=80, checkpoint_every=40, **FAST))
    losses = _losses(run)
    assert len(losses) == 80
    curve = np.asarray(Image.open(run / "loss.png").convert("RGB"))  # drawn: the running mean in blue
    assert curve.shape == (360, 640, 3) and ((curve[..., 2] > 200) & (curve[..., 0] < 60)).sum() > 200
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), (losses[:10], losses[-10:])  # measured ~0.35
    pipe = d2.load_pipeline(out, backend=backend)
    assert pipe.spec.schedulers["prior"].prediction_type == "sample"
    result = pipe.generate("a red circle", prior_steps=4, decoder_steps=2, super_res_steps=2)
    assert result.images[0].size == (16, 16) and np.isfinite(result.image_embeddings).all()
    # the model holds the EMA weights, the checkpoint the raw ones
    ema = load_file(str(out / "prior.safetensors"))
    raw = {k.removeprefix("prior."): v for k, v in load_file(str(run / "checkpoint" / "weights.safetensors")).items()}
    assert ema.keys() == raw.keys() and any(not np.array_equal(ema[k], raw[k]) for k in ema)


def _cli(run: Path, base: Path, backend: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dalle2_portable.cli", "train", "prior", "--data", "shapes", "--out", str(run),
            "-m", str(base), "--config", "tiny", "--steps", "300", "--checkpoint-every", "50", "--data-size", "48",
            "--batch-size", "16", "--lr", "1e-3", "--warmup", "10", "--backend", backend, "--quiet", *extra]


def test_sigkill_then_resume_is_bit_identical(models, tmp_path):
    backend = BACKENDS[0]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli(whole, models["iv"], backend), check=True, timeout=300, env=os.environ)
    proc = subprocess.Popen(_cli(killed, models["iv"], backend), env=os.environ)
    state = killed / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = json.loads(state.read_text())["step"]
    assert 50 <= step < 300
    subprocess.run(_cli(killed, models["iv"], backend, "--resume"), check=True, timeout=300, env=os.environ)
    for name in ("weights", "ema", "optimizer"):
        a = load_file(str(whole / "checkpoint" / f"{name}.safetensors"))
        b = load_file(str(killed / "checkpoint" / f"{name}.safetensors"))
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    assert _losses(killed) == _losses(whole)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_checkpoint_resumes_on_the_other_backend(models, tmp_path):
    """40 steps on torch against 20 on torch + 20 on MLX from its checkpoint: the same losses and the same
    weights to 1e-4 of each tensor's scale."""
    settings = TrainSettings(steps=40, checkpoint_every=20, **FAST)
    train("prior", "shapes", tmp_path / "torch", models["iv"], config="tiny", backend="torch", settings=settings)
    train("prior", "shapes", tmp_path / "both", models["iv"], config="tiny", backend="torch", settings=settings,
          stop_at=20)
    assert json.loads((tmp_path / "both" / "checkpoint" / "state.json").read_text())["step"] == 20
    train("prior", "shapes", tmp_path / "both", models["iv"], config="tiny", backend="mlx", settings=settings,
          resume=True)
    a = load_file(str(tmp_path / "torch" / "checkpoint" / "weights.safetensors"))
    b = load_file(str(tmp_path / "both" / "checkpoint" / "weights.safetensors"))
    # Self-attention's key bias adds q.b to every score of a query, which the softmax cancels: its gradient is 0
    # but for rounding, and AdamW turns that noise into lr-sized steps of any sign, on any two runs alike.
    seen = [k for k in a if not k.endswith("attn1.to_k.bias")]
    assert len(seen) == len(a) - 2
    worst = max(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max() for k in seen)
    assert worst <= 1e-4, worst  # measured 3.8e-6
    both, alone = _losses(tmp_path / "both"), _losses(tmp_path / "torch")
    assert both[:20] == alone[:20] and np.allclose(both[20:], alone[20:], rtol=1e-5, atol=0)


def test_interrupted_checkpoint_write_keeps_the_previous(models, tmp_path, monkeypatch):
    run = tmp_path / "run"
    settings = TrainSettings(steps=20, checkpoint_every=10, **FAST)
    real, calls = ckpt_io.save_file, []

    def failing_second_checkpoint(tensors, path):
        calls.append(path)
        if len(calls) == 5:  # the second checkpoint's second file
            raise OSError("disk full")
        real(tensors, path)

    monkeypatch.setattr(ckpt_io, "save_file", failing_second_checkpoint)
    with pytest.raises(OSError, match="disk full"):
        train("prior", "shapes", run, models["iv"], config="tiny", backend=BACKENDS[0], settings=settings)
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 10
    assert ckpt_io.load(run).step == 10
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no partial directory left


def test_bad_runs_are_one_line(models, tmp_path):
    settings = TrainSettings(steps=2, **FAST)
    run = tmp_path / "run"
    train("prior", "shapes", run, models["iv"], config="tiny", backend=BACKENDS[0], settings=settings)
    cases = [
        (dict(out=run), "already holds a run; pass --resume"),
        (dict(out=tmp_path / "none", resume=True), "holds no run to resume"),
        (dict(out=run, config="small", resume=True), "started with a different config"),
        (dict(out=tmp_path / "x", config="huge"), "unknown --config 'huge'"),
        (dict(out=tmp_path / "y", model=models["karlo"]), "no CLIP image encoder"),
        (dict(out=tmp_path / "z", config=None), "no prior to fine-tune; pass --config"),
        (dict(out=tmp_path / "w", data=str(tmp_path / "missing")), "give `shapes` or a folder"),
    ]
    for change, message in cases:
        kw = dict(stage="prior", data="shapes", out=run, model=models["iv"], config="tiny", settings=settings,
                  backend=BACKENDS[0])
        kw.update(change)
        with pytest.raises(Dalle2Error, match=message):
            train(**kw)
    with pytest.raises(Dalle2Error, match="batch_size must be a positive integer"):
        TrainSettings(steps=2, batch_size=0)
    shutil.rmtree(run)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
@pytest.mark.parametrize("stage,config", [("clip", "tiny"), ("prior", "tiny"), ("decoder", None),
                                          ("super_res", None)])
def test_five_steps_with_ema_agree_across_backends(models, tmp_path, stage, config):
    """Each stage, 5 steps from the same weights and draws on torch and on MLX: the same losses, and the same
    EMA weights (the model each run writes) to 1e-4 of each tensor's scale, or of the learning rate for a
    tensor near zero. AdamW eps 1e-4 and no key biases: tests/test_train_step.py and
    test_checkpoint_resumes_on_the_other_backend say why."""
    settings = TrainSettings(steps=5, data_size=16, batch_size=4, lr=1e-3, warmup=2, adam_eps=1e-4, image_size=16)
    files = {}
    for backend in ("torch", "mlx"):
        out = train(stage, "shapes", tmp_path / backend, models["iv"], config=config, backend=backend,
                    settings=settings)
        files[backend] = {n: load_file(str(p)) for n in COMPONENTS[stage] if (p := out / f"{n}.safetensors").exists()}
        assert files[backend], stage
    losses = {backend: _losses(tmp_path / backend) for backend in files}
    assert np.allclose(losses["mlx"], losses["torch"], rtol=1e-5, atol=0), losses
    for name, ema in files["torch"].items():
        for k, v in ema.items():
            if k.endswith(("attn1.to_k.bias", "self_attn.k_proj.bias")):
                continue
            err = np.abs(files["mlx"][name][k] - v).max() / max(np.abs(v).max(), 1e-3)
            assert err <= 1e-4, (stage, name, k, err)
