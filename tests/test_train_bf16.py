"""bfloat16 mixed precision (`train_step(..., dtype="bfloat16")`): the forward and backward in bfloat16, the master
weights, gradients, moments and update in float32. One step on the prior and on the tiny learned-variance decoder
stage follows the float32 step from the same weights and batch, on each backend; MLX and torch agree in
bfloat16; a dtype the step does not know, or a device that cannot compute in bfloat16, is one line."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import BACKENDS, backend_params
from test_train_accumulate import PRIOR, SETTINGS, WEIGHTS, stage_bundle, stage_inputs

from dalle2_portable.backends import get_backend
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.train.stages import FROZEN, LOSSES

STAGES = ("prior", "decoder")


def _one_step(backend: str, stage: str, dtype: str, inputs):
    """(loss, weights after, the weights' dtypes) of one step from the stage's start weights."""
    b, bundle = stage_bundle(backend, stage)
    loss = b.train_step(bundle, LOSSES[stage], SETTINGS, FROZEN[stage], dtype=dtype)(*inputs, lr=1e-3)
    return loss, b.state_dict(bundle), {str(w.dtype).rpartition(".")[2] for w in b.weights(bundle).values()}


def _delta(weights: dict, stage: str) -> np.ndarray:
    start = WEIGHTS[stage]
    return np.concatenate([(weights[k] - start[k]).ravel() for k in start if k not in FROZEN[stage]]).astype(
        np.float64)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("backend", backend_params())
def test_bf16_step_follows_the_fp32_step(backend, stage):
    """Measured over 30 batches (eps 1e-4, as the element-wise comparisons elsewhere): the loss within 6.3e-3
    relative of float32's (this batch 1.4e-3), the cosine of the weights' deltas >= 0.9950 (this batch 0.9978)
    and their relative difference 2e-2 to 7e-2 (bfloat16's 8-bit mantissa: the 1e-4 floor shows that the step
    did compute in bfloat16)."""
    inputs = stage_inputs(stage, 4, seed=7)
    loss32, w32, _ = _one_step(backend, stage, "float32", inputs)
    loss16, w16, dtypes = _one_step(backend, stage, "bfloat16", inputs)
    assert abs(loss16 - loss32) <= 2e-2 * loss32, (loss16, loss32)
    d32, d16 = _delta(w32, stage), _delta(w16, stage)
    cosine = d32 @ d16 / (np.linalg.norm(d32) * np.linalg.norm(d16))
    difference = np.linalg.norm(d16 - d32) / np.linalg.norm(d32)
    assert cosine > 0.99 and difference > 1e-4, (cosine, difference)
    assert dtypes == {"float32"}  # the master weights, which the EMA and the checkpoints read
    assert all(np.array_equal(w16[k], WEIGHTS[stage][k]) for k in FROZEN[stage])


@pytest.mark.parametrize("backend", backend_params())
def test_bf16_master_weights_stay_float32_over_steps(backend):
    """Three steps: the weights and moments stay float32 and the weights move, the frozen CLIP statistics stay
    bit for bit, and a float32 step continues from the optimiser state the bfloat16 steps left."""
    b, bundle = stage_bundle(backend, "prior")
    step = b.train_step(bundle, LOSSES["prior"], SETTINGS, FROZEN["prior"], dtype="bfloat16")
    losses = [step(*stage_inputs("prior", 4, seed=i), lr=1e-3) for i in range(3)]
    assert all(np.isfinite(losses)) and step.steps == 3
    assert all(str(w.dtype).endswith("float32") for w in b.weights(bundle).values())
    state, weights = step.state(), b.state_dict(bundle)
    assert all(v.dtype == np.float32 for k, v in state.items() if k != "step")
    assert all(np.array_equal(weights[k], WEIGHTS["prior"][k]) for k in FROZEN["prior"])
    assert np.abs(weights["prior.proj_in.weight"] - WEIGHTS["prior"]["prior.proj_in.weight"]).max() > 1e-3
    resumed = b.train_step(bundle, LOSSES["prior"], SETTINGS, FROZEN["prior"])
    resumed.load_state(state)
    assert np.isfinite(resumed(*stage_inputs("prior", 4, seed=3), lr=1e-3)) and resumed.steps == 4


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
@pytest.mark.parametrize("stage", STAGES)
def test_bf16_losses_agree_across_backends(stage):
    """torch.autocast and MLX's bfloat16 weight copies round differently: measured within 4.5e-3 relative over
    30 batches (this one 1.2e-3)."""
    inputs = stage_inputs(stage, 4, seed=11)
    losses = {name: _one_step(name, stage, "bfloat16", inputs)[0] for name in ("torch", "mlx")}
    assert abs(losses["mlx"] - losses["torch"]) <= 2e-2 * losses["torch"], losses


@pytest.mark.parametrize("backend", backend_params())
def test_unknown_training_dtype_is_one_line(backend):
    b, bundle = stage_bundle(backend, "prior")
    with pytest.raises(Dalle2Error, match="unknown training dtype 'float16'; choose one of float32, bfloat16") as e:
        b.train_step(bundle, LOSSES["prior"], SETTINGS, dtype="float16")
    reduced = get_backend(backend, dtype="bfloat16")
    module = reduced.build("prior", PRIOR)
    with pytest.raises(Dalle2Error, match="float32 master weights") as e2:
        reduced.train_step(module, LOSSES["prior"], SETTINGS, dtype="bfloat16")
    assert "\n" not in str(e.value) + str(e2.value)


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch not installed")
def test_torch_device_without_bf16_is_one_line(monkeypatch):
    """Where autocast cannot compute in bfloat16, torch warns and disables itself (MPS before macOS 14) or raises
    (CUDA before Ampere): either way the step refuses in one line instead of training in float32 unawares."""
    import torch

    @contextmanager
    def disabled_autocast(device_type, dtype):
        warnings.warn("In MPS autocast, but the target dtype is not supported. Disabling autocast.")
        yield

    b, bundle = stage_bundle("torch", "prior")
    monkeypatch.setattr(torch, "autocast", disabled_autocast)
    with pytest.raises(Dalle2Error, match="cannot compute in bfloat16 on 'cpu' .*target dtype is not supported") as e:
        b.train_step(bundle, LOSSES["prior"], SETTINGS, dtype="bfloat16")
    assert "\n" not in str(e.value)
