"""Gradient checkpointing (`modules.gradient_checkpointing`, the facade's `checkpoint`): with it on, the decoder
UNet, the prior and the CLIP text tower give the same outputs and gradients as with it off, on each backend;
each big block really goes through `F.checkpoint`; and it holds less for the backward pass (torch: the bytes
autograd saves; MLX: the peak memory of a gradient).

The first torch checkpoint of a process imports torch._dynamo (~3 s; importing diffusers or transformers does it
already in a full run)."""

from __future__ import annotations

import numpy as np
import pytest
from builders import TINY_LEARNED_VARIANCE_DECODER as DECODER
from conftest import BACKENDS, assert_close_to_scale, backend_params

from dalle2_portable.backends import get_backend
from dalle2_portable.modules import Module, building, gradient_checkpointing
from dalle2_portable.modules.init import initial_weights
from dalle2_portable.modules.prior import prior_attention_mask
from dalle2_portable.modules.unet import decoder_attention_mask
from dalle2_portable.spec import CLIPTextConfig, PriorConfig
from dalle2_portable.train import losses
from dalle2_portable.train.optim import AdamW

PRIOR = PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16, num_embeddings=7,
                    time_embed_dim=16, embedding_proj_dim=16, clip_embed_dim=16)
TEXT = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, max_position_embeddings=12, projection_dim=8)


def unet_loss(F, unet, x_t, t, context, time_embedding, mask, noise):
    return losses.mse(F, unet(x_t, t, context, time_embedding, mask), noise)


def prior_loss(F, prior, x_t, t, proj, states, mask, target):
    return losses.mse(F, prior(x_t, t, proj, states, mask), target)


def text_loss(F, tower, ids, pool, embeds_target, states_target):
    embeds, states = tower(ids, pool)
    return losses.mse(F, embeds, embeds_target) + losses.mse(F, states, states_target)


def _unet_inputs(rng, size=8):
    return (rng.standard_normal((2, 3, size, size), dtype=np.float32), np.array([3, 700]),
            rng.standard_normal((2, 4, 12), dtype=np.float32), rng.standard_normal((2, 32), dtype=np.float32),
            decoder_attention_mask(np.array([[1, 1, 1, 0], [1, 1, 1, 1]])),
            rng.standard_normal((2, 6, size, size), dtype=np.float32))


def _prior_inputs(rng):
    mask = np.ones((2, PRIOR.num_embeddings), bool)
    mask[1, 4:] = False
    return (rng.standard_normal((2, 16), dtype=np.float32), np.array([17, 900]),
            rng.standard_normal((2, 16), dtype=np.float32),
            rng.standard_normal((2, PRIOR.num_embeddings, 16), dtype=np.float32), prior_attention_mask(mask),
            rng.standard_normal((2, 16), dtype=np.float32))


def _text_inputs(rng):
    ids = rng.integers(0, TEXT.vocab_size, (2, 9))
    return (ids, np.array([8, 5]), rng.standard_normal((2, 8), dtype=np.float32),
            rng.standard_normal((2, 9, 16), dtype=np.float32))


# name: (component type, config, loss, inputs (the forward's first, the loss target last), blocks checkpointed)
CASES = {
    "decoder": ("unet2d_condition", DECODER, unet_loss, _unet_inputs, 5),  # 2 down, the mid, 2 up blocks
    "prior": ("prior", PRIOR, prior_loss, _prior_inputs, PRIOR.num_layers),
    "clip_text": ("clip_text", TEXT, text_loss, _text_inputs, TEXT.num_hidden_layers),
}
FORWARD_ARGS = {"decoder": 5, "prior": 5, "clip_text": 2}


def _build(b, component_type, config, seed: int = 0):
    """The component with weights from a seed (the frameworks' initialisers are not seeded here), every weight
    off its usual value, so that every gradient is a generic one."""
    rng = np.random.default_rng(seed)
    module = b.build(component_type, config)
    b.load_weights(module, {k: (w + 0.05 * rng.standard_normal(w.shape)).astype(np.float32) for k, w in
                            initial_weights(b.parameter_shapes(component_type, config), seed).items()})
    return module


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """Count the calls of the facade's `checkpoint` on each backend (it still runs)."""
    calls = []

    def count(backend):
        facade = get_backend(backend).facade
        real = facade.checkpoint

        def counted(block, *args, **kwargs):
            calls.append(type(block).__name__)
            return real(block, *args, **kwargs)

        monkeypatch.setattr(facade, "checkpoint", counted)
        return calls

    return count


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", backend_params())
def test_same_outputs_and_gradients(backend, case, checkpoint_calls):
    component_type, config, loss_fn, make_inputs, blocks = CASES[case]
    b = get_backend(backend)
    module = _build(b, component_type, config)
    inputs = make_inputs(np.random.default_rng(0))
    calls = checkpoint_calls(backend)
    loss_off, grads_off = b.value_and_grad(module, loss_fn)(*inputs)
    out_off = b.run(module, *inputs[:FORWARD_ARGS[case]])
    assert not calls  # off by default
    assert gradient_checkpointing(module) is module
    loss_on, grads_on = b.value_and_grad(module, loss_fn)(*inputs)
    assert len(calls) == blocks, calls  # each big block went through F.checkpoint
    out_on = b.run(module, *inputs[:FORWARD_ARGS[case]])
    assert abs(loss_on - loss_off) <= 1e-6 * abs(loss_off)
    assert all(np.array_equal(a, e) for a, e in zip(out_on, out_off, strict=True))
    # torch: the same bits. MLX: the UNet's down-block gradients, whose output feeds the next block and a skip,
    # sum the two in another order: measured 4.6e-7 of a tensor's scale (<= 8.7e-7 over 8 seeds), the prior's and
    # CLIP's the same bits
    assert grads_on.keys() == grads_off.keys()
    assert max(np.abs(g).max() for g in grads_off.values()) > 0
    for name, g in grads_off.items():
        if g.any():  # the prior's clip_mean / clip_std take no part in the forward
            assert_close_to_scale(grads_on[name], g, 1e-6, f"{case} {name}")
        else:
            assert not grads_on[name].any(), name
    gradient_checkpointing(module, on=False)
    calls.clear()
    b.value_and_grad(module, loss_fn)(*inputs)
    assert not calls


@pytest.mark.parametrize("backend", backend_params())
def test_a_train_step_with_frozen_weights_is_the_same(backend):
    """The training step's path (MLX: frozen weights are left out of a checkpointed block's inputs) with one
    weight frozen inside a checkpointed block and one outside: the same loss and weights after a step."""
    b = get_backend(backend)
    inputs = _unet_inputs(np.random.default_rng(0))
    frozen = ("conv_in.weight", "down_blocks.1.attentions.0.to_q.weight")
    after = []
    for on in (False, True):
        module = _build(b, "unet2d_condition", DECODER)
        start = {k: w.copy() for k, w in b.state_dict(module).items()}  # torch's may share the weights' memory
        step = b.train_step(gradient_checkpointing(module, on), unet_loss, AdamW(lr=1e-3, eps=1e-4), frozen)
        after.append((step(*inputs, lr=1e-3), b.state_dict(module)))
    (loss_off, off), (loss_on, on) = after
    assert abs(loss_on - loss_off) <= 1e-6 * loss_off
    assert all(np.array_equal(on[k], start[k]) for k in frozen)
    # of each tensor's scale, or of the step (lr) for one still near zero: AdamW turns MLX's gradient rounding
    # (<= 1e-6) into up to lr / eps times as much where a gradient is ~eps (conftest.assert_one_step_agrees);
    # measured 1.7e-7 (MLX; <= 2e-7 over 6 seeds), 0 (torch)
    assert max(np.abs(on[k] - w).max() / max(np.abs(w).max(), 1e-3) for k, w in off.items()) <= 1e-5
    assert max(np.abs(on[k] - start[k]).max() for k in on) > 1e-4  # the step did move the rest


class Twice(Module):
    """A block returning one array twice, as the UNet's down blocks do (their output is also their last skip)."""

    def __init__(self):
        super().__init__()
        self.proj = self.F.Linear(3, 3)

    def forward(self, x):
        y = self.F.tanh(self.proj(x))
        return y, [y]


class Outer(Module):
    def __init__(self):
        super().__init__()
        self.pre = self.F.Linear(3, 3)  # its gradient flows through the checkpointed block's input
        self.block = Twice()

    def forward(self, x):
        y, (z,) = self.call_block(self.block, self.pre(x))
        return 2 * y + 3 * z


def _outer_loss(F, module, x):
    return F.sum(module(x) ** 2)


@pytest.mark.parametrize("backend", backend_params())
def test_checkpoint_sums_the_gradients_of_a_repeated_output(backend):
    """MLX's mx.checkpoint keeps one cotangent of an array returned twice; the facade returns each array once."""
    b = get_backend(backend)
    with building(b.facade):
        module = Outer()
    x = np.random.default_rng(1).standard_normal((4, 3), dtype=np.float32)
    _, off = b.value_and_grad(module, _outer_loss)(x)
    _, on = b.value_and_grad(gradient_checkpointing(module), _outer_loss)(x)
    for name, g in off.items():
        assert_close_to_scale(on[name], g, 1e-6, name)


@pytest.mark.parametrize("backend", backend_params())
def test_the_switch_covers_a_bundle(backend, checkpoint_calls):
    b = get_backend(backend)
    bundle = b.bundle({"prior": b.build("prior", PRIOR), "text_encoder": b.build("clip_text", TEXT)})
    calls = checkpoint_calls(backend)
    gradient_checkpointing(bundle)
    b.run(bundle.prior, *_prior_inputs(np.random.default_rng(0))[:5])
    b.run(bundle.text_encoder, *_text_inputs(np.random.default_rng(0))[:2])
    assert len(calls) == PRIOR.num_layers + TEXT.num_hidden_layers
    calls.clear()
    gradient_checkpointing(bundle, on=False)
    b.run(bundle.prior, *_prior_inputs(np.random.default_rng(0))[:5])
    assert not calls


def _torch_held_bytes(b, module, inputs) -> int:
    """The bytes held for the backward of one loss: the tensors autograd saves, and the inputs a checkpointed
    block keeps to run again (both as distinct storages; the weights, held anyway, not counted)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    held: dict[int, int] = {}

    def hold(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    real = b.facade.checkpoint

    def keeping_inputs(block, *args):
        for a in args:
            for t in a if isinstance(a, list) else [a]:
                hold(t)
        return real(block, *args)

    with pytest.MonkeyPatch.context() as mp, torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(hold, lambda t: t):
        mp.setattr(b.facade, "checkpoint", keeping_inputs)
        loss = unet_loss(b.facade, module, *b.arrays(inputs))
    loss.backward()
    return sum(held.values())


@pytest.mark.skipif("torch" not in BACKENDS, reason="torch not installed")
def test_torch_holds_less_for_the_backward():
    """Measured on the tiny decoder at 8x8, batch 2: 688,576 bytes without, 73,568 with (0.11: the activations
    outside the blocks and the blocks' inputs); torch's checkpoint hooks hold nothing of a block's inside."""
    b = get_backend("torch")
    module = _build(b, "unet2d_condition", DECODER)
    inputs = _unet_inputs(np.random.default_rng(0))
    without = _torch_held_bytes(b, module, inputs)
    with_ = _torch_held_bytes(b, gradient_checkpointing(module), inputs)
    assert without > 300_000 and with_ < 0.3 * without, (without, with_)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx not installed")
def test_mlx_peak_memory_is_lower():
    """A smaller gain than torch's, as MLX frees each activation once its backward has used it: measured on the
    tiny decoder at 8x8 a peak of 2.03 MB above the weights without, 1.68-1.72 MB with (0.83-0.85; 0.78 at
    32x32)."""
    import mlx.core as mx

    b = get_backend("mlx")
    module = _build(b, "unet2d_condition", DECODER)
    inputs = _unet_inputs(np.random.default_rng(0))
    peaks = []
    for on in (False, True):
        fn = b.value_and_grad(gradient_checkpointing(module, on), unet_loss)
        fn(*inputs)  # once before measuring
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        fn(*inputs)
        peaks.append(mx.get_peak_memory() - base)
    assert peaks[1] < 0.93 * peaks[0], peaks
