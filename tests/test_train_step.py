"""The training step on each backend: torch's and MLX's AdamW make AdamW's update (against a float64 NumPy
reference), the two backends agree over several steps (weights and moments), and the optimiser state moves
between them in canonical names and layout; the learning-rate and EMA schedules."""

from __future__ import annotations

import numpy as np
import pytest
from builders import TINY_LEARNED_VARIANCE_DECODER as DECODER
from conftest import BACKENDS, backend_params

from dalle2_portable.backends import get_backend
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.modules.unet import decoder_attention_mask
from dalle2_portable.train import losses
from dalle2_portable.train.optim import EMA, AdamW, ema_decay, learning_rate

SETTINGS = AdamW(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5)  # clipping active: the gradient norm is ~2-4
# Comparing two runs of AdamW element by element needs eps well above the gradients' float32 noise: an element
# whose gradient is ~eps moves by lr * g / (|g| + eps), so noise in g of the order of eps turns into a step of
# the order of lr in a direction set by rounding. Measured after these 5 steps (max difference / tensor scale):
# at eps 1e-8, torch against itself at 1 and 2 threads 2.1e-5, MLX against torch 6e-5 (up to 8e-4 from run to
# run); at eps 1e-4 (the update then Lipschitz in g with constant lr / eps) 3.1e-7 and 6.3e-7.
PARITY = AdamW(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5, eps=1e-4)


def eps_loss(F, unet, x_t, t, context, time_embedding, mask, noise):
    return losses.mse(F, unet(x_t, t, context, time_embedding, mask)[:, :3], noise)


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 3, 8, 8), dtype=np.float32), np.array([3, 700]),
            rng.standard_normal((2, 4, 12), dtype=np.float32), rng.standard_normal((2, 32), dtype=np.float32),
            decoder_attention_mask(np.array([[1, 1, 1, 0], [1, 1, 1, 1]])),
            rng.standard_normal((2, 3, 8, 8), dtype=np.float32))


def _weights():
    b = get_backend(BACKENDS[0])
    rng = np.random.default_rng(0)
    return {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in b.state_dict(b.build("unet2d_condition", DECODER)).items()}


def _module(backend, weights):
    b = get_backend(backend)
    module = b.build("unet2d_condition", DECODER)
    b.load_weights(module, weights)
    return b, module


def _adamw_reference(params, grads, m, v, t, lr, s: AdamW):
    """torch.optim.AdamW's documented algorithm in float64, after clip_grad_norm_."""
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values()))
    scale = min(1.0, s.max_grad_norm / (norm + 1e-6))
    b1, b2 = s.betas
    out = {}
    for k, p in params.items():
        g = grads[k].astype(np.float64) * scale
        m[k] = b1 * m[k] + (1 - b1) * g
        v[k] = b2 * v[k] + (1 - b2) * g * g
        p = p.astype(np.float64) * (1 - lr * s.weight_decay)
        out[k] = p - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + s.eps)
    return out, norm


def _worst(a: dict, b: dict) -> float:
    """The largest difference over the tensors, each relative to its own largest value."""
    return max(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30) for k in b)


@pytest.mark.parametrize("backend", backend_params())
def test_two_steps_are_adamw(backend):
    weights = _weights()
    b, module = _module(backend, weights)
    step = b.train_step(module, eps_loss, SETTINGS)
    params = dict(weights)
    m = {k: np.zeros(w.shape) for k, w in weights.items()}
    v = {k: np.zeros(w.shape) for k, w in weights.items()}
    for t, lr in ((1, 1e-3), (2, 4e-4)):
        batch = _batch(t)
        _, grads = b.value_and_grad(module, eps_loss)(*batch)  # at the weights the step starts from
        params, norm = _adamw_reference(params, grads, m, v, t, lr, SETTINGS)
        step(*batch, lr=lr)
        assert abs(step.grad_norm - norm) <= 1e-5 * norm and norm > SETTINGS.max_grad_norm
        assert _worst(b.state_dict(module), params) <= 2e-6
    state = step.state()
    assert int(state["step"]) == 2 and _worst({k[2:]: s for k, s in state.items() if k[:2] == "m."}, m) <= 1e-5
    assert _worst({k[2:]: s for k, s in state.items() if k[:2] == "v."}, v) <= 1e-5


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_backends_agree_and_resume_on_each_other():
    """Five steps from the same weights and batches: the same losses, weights and moments on both backends
    (PARITY's eps, see above); then the torch run's state continues on MLX as it continues on torch."""
    weights = _weights()
    runs = {name: _module(name, weights) for name in ("torch", "mlx")}
    steps = {name: b.train_step(module, eps_loss, PARITY) for name, (b, module) in runs.items()}
    lrs = [learning_rate(i, 1e-3, warmup=2, total=5) for i in range(5)]
    for i, lr in enumerate(lrs):
        loss = {name: step(*_batch(i), lr=lr) for name, step in steps.items()}
        assert abs(loss["mlx"] - loss["torch"]) <= 1e-5 * loss["torch"], i
    w = {name: b.state_dict(module) for name, (b, module) in runs.items()}
    assert _worst(w["mlx"], w["torch"]) <= 1e-5
    states = {name: step.state() for name, step in steps.items()}
    # moments average the gradients (which agree to ~5e-6, tests/test_losses.py); measured 1.3e-5 to 2.5e-5
    assert _worst(states["mlx"], states["torch"]) <= 1e-4
    # torch's state and weights, continued on MLX
    b, module = _module("mlx", w["torch"])
    resumed = b.train_step(module, eps_loss, PARITY)
    resumed.load_state(states["torch"])
    assert resumed.steps == 5
    resumed(*_batch(5), lr=1e-4)
    steps["torch"](*_batch(5), lr=1e-4)
    assert _worst(b.state_dict(module), runs["torch"][0].state_dict(runs["torch"][1])) <= 1e-5


@pytest.mark.parametrize("backend", backend_params())
def test_state_from_another_model_is_one_line(backend):
    weights = _weights()
    b, module = _module(backend, weights)
    step = b.train_step(module, eps_loss, SETTINGS)
    step(*_batch(0), lr=1e-3)
    state = {k: v for k, v in step.state().items() if "conv_in" not in k}
    with pytest.raises(Dalle2Error, match="no moments for 'conv_in"):
        b.train_step(module, eps_loss, SETTINGS).load_state(state)


@pytest.mark.parametrize("backend", backend_params())
def test_ema_follows_the_weights(backend):
    weights = _weights()
    b, module = _module(backend, weights)
    ema = EMA(b.weights(module))
    step = b.train_step(module, eps_loss, SETTINGS)
    expected = {k: w.astype(np.float64) for k, w in weights.items()}
    for i in range(3):
        step(*_batch(i), lr=1e-3)
        decay = ema_decay(i + 1)
        ema.update(b.weights(module), decay)
        b.sync(ema.shadow)
        now = b.state_dict(module)
        expected = {k: decay * expected[k] + (1 - decay) * now[k] for k in expected}
    assert _worst(b.to_numpy(module, ema.shadow), expected) <= 1e-6
    assert _worst(b.state_dict(module), weights) > 1e-3  # the weights did move, the average lags them


def test_schedules():
    lrs = [learning_rate(i, 1.0, warmup=4, total=12) for i in range(13)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # then monotone cosine decay
    assert lrs[8] == pytest.approx(0.5)  # half way through the decay
    assert ema_decay(0) == 0.0 and ema_decay(1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay(10**9) == 0.9999
    with pytest.raises(Dalle2Error, match="invalid optimiser settings"):
        AdamW(lr=0)


@pytest.mark.parametrize("backend", backend_params())
def test_numpy_weights_survive_safetensors(backend, tmp_path):
    """Checkpoints write `to_numpy`'s arrays with safetensors, which writes a buffer as it lies in memory: MLX's
    transposed conv weights must come out in C order (they once came out scrambled)."""
    from safetensors.numpy import load_file, save_file

    b, module = _module(backend, _weights())
    b.train_step(module, eps_loss, SETTINGS)(*_batch(0), lr=1e-3)  # weights the optimiser wrote, in its layout
    arrays = b.to_numpy(module, b.weights(module))
    assert all(a.flags.c_contiguous for a in arrays.values())
    save_file(arrays, str(tmp_path / "w.safetensors"))
    back = load_file(str(tmp_path / "w.safetensors"))
    assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
