"""Gradient accumulation: `step.accumulate([half1, half2])` is one optimiser step on the mean of the halves'
gradients, which for a mean-over-batch loss (the prior stage's) is the step on the whole batch; on each backend,
and MLX against torch as the other cross-backend steps agree; bad micro-batches are one line.

The prior and decoder stages as train/stages.py builds them, small: `stage_bundle` and `stage_inputs` (the
bfloat16 tests use them too)."""

from __future__ import annotations

import numpy as np
import pytest
from builders import TINY_LEARNED_VARIANCE_DECODER as DECODER
from conftest import BACKENDS, assert_one_step_agrees, backend_params

from dalle2_portable.backends import get_backend
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.modules.init import initial_weights
from dalle2_portable.modules.prior import prior_attention_mask
from dalle2_portable.modules.unet import decoder_attention_mask
from dalle2_portable.schedule import UnCLIPSchedule
from dalle2_portable.spec import PriorConfig, TextProjConfig
from dalle2_portable.train.optim import AdamW
from dalle2_portable.train.stages import FROZEN, LOSSES, SCHEDULERS

PRIOR = PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16, num_embeddings=7,
                    time_embed_dim=16, embedding_proj_dim=16, clip_embed_dim=16)
TEXT_PROJ = TextProjConfig(clip_embeddings_dim=16, time_embed_dim=DECODER.time_embed_dim,
                           cross_attention_dim=DECODER.cross_attention_dim)
PARTS = {"prior": {"prior": ("prior", PRIOR)},
         "decoder": {"text_proj": ("text_proj", TEXT_PROJ), "decoder": ("unet2d_condition", DECODER)}}
# eps 1e-4 for element-wise comparisons of AdamW steps (tests/test_train_step.py says why); clipping active (the
# gradient norms here: prior 6 to 18, decoder 1.3 to 1.8)
SETTINGS = AdamW(lr=1e-3, weight_decay=0.1, max_grad_norm=0.5, eps=1e-4)


def _start_weights(stage: str) -> dict[str, np.ndarray]:
    """The stage's weights: the from-scratch initial ones (modules/init.py, seeded) plus N(0, 0.05) (no zero
    weight), and CLIP statistics away from (0, 1), in the canonical names of the stage's bundle."""
    b = get_backend(BACKENDS[0])
    rng = np.random.default_rng(0)
    out = {}
    for name, (kind, config) in PARTS[stage].items():
        for k, v in initial_weights(b.parameter_shapes(kind, config), seed=0).items():
            out[f"{name}.{k}"] = (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
    if stage == "prior":
        out["prior.clip_std"] += 1.0
    return out


WEIGHTS = {}


def stage_bundle(backend, stage: str):
    """(Backend, the stage's bundle) holding `_start_weights(stage)`, the same on every backend."""
    if stage not in WEIGHTS:
        WEIGHTS[stage] = _start_weights(stage)
    b = get_backend(backend)
    bundle = b.bundle({name: b.build(kind, config) for name, (kind, config) in PARTS[stage].items()})
    b.load_weights(bundle, WEIGHTS[stage])
    return b, bundle


def stage_inputs(stage: str, batch: int, seed: int) -> tuple:
    """A batch laid out as stages.prior_batch / decoder_batch lay theirs out, with padded captions, the stage's
    prediction target and min-SNR-5 weights (the loss is then a batch mean of weighted per-sample means)."""
    rng = np.random.default_rng(seed)
    schedule = UnCLIPSchedule(SCHEDULERS[stage])
    tokens, width = PRIOR.num_embeddings, PRIOR.embedding_dim
    text_mask = np.arange(tokens)[None] < rng.integers(2, tokens + 1, batch)[:, None]
    t = rng.integers(0, 1000, batch)
    t[0] = 0  # the decoder's likelihood term at t = 0, its KL elsewhere
    embeds = rng.standard_normal((batch, width), dtype=np.float32)
    states = rng.standard_normal((batch, tokens, width), dtype=np.float32)
    terms = schedule.training_terms(t)
    if stage == "prior":
        z0 = rng.standard_normal((batch, width), dtype=np.float32)
        noise = rng.standard_normal(z0.shape, dtype=np.float32)
        x_t = (terms["sqrt_alphas_cumprod"][:, None] * z0
               + terms["sqrt_one_minus_alphas_cumprod"][:, None] * noise).astype(np.float32)
        return (x_t, t, embeds, states, prior_attention_mask(text_mask), schedule.training_target(z0, noise, t),
                schedule.min_snr_weights(t, 5.0))
    size = DECODER.sample_size
    x0 = np.clip(rng.standard_normal((batch, 3, size, size)) * 0.5, -1, 1).astype(np.float32)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    x_t = (terms["sqrt_alphas_cumprod"][:, None, None, None] * x0
           + terms["sqrt_one_minus_alphas_cumprod"][:, None, None, None] * noise).astype(np.float32)
    mask = decoder_attention_mask(np.pad(text_mask, ((0, 0), (TEXT_PROJ.clip_extra_context_tokens, 0)),
                                         constant_values=True))
    image = rng.standard_normal((batch, TEXT_PROJ.clip_embeddings_dim), dtype=np.float32)
    return (x_t, t, image, (rng.random(batch) < 0.3)[:, None], embeds, states, mask, x0,
            schedule.training_target(x0, noise, t), schedule.min_snr_weights(t, 5.0), terms)


def split(inputs: tuple, parts: int) -> list[tuple]:
    """The batch as `parts` equal micro-batches along the batch axis (dicts of (B,) arrays split alike)."""
    def piece(x, i):
        if isinstance(x, dict):
            return {k: piece(v, i) for k, v in x.items()}
        return np.split(np.asarray(x), parts)[i]

    return [tuple(piece(x, i) for x in inputs) for i in range(parts)]


def _worst(a: dict, b: dict) -> float:
    """The largest difference over the tensors, each relative to its own largest value."""
    return max(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30) for k in b)


@pytest.mark.parametrize("backend", backend_params())
def test_accumulated_halves_are_the_whole_batch_step(backend):
    """Two steps, each accumulated over two halves, against the same two steps on the whole batches: the same
    losses, gradient norms (clipping active), weights and moments; the CLIP statistics stay frozen."""
    whole, halves, single = (stage_bundle(backend, "prior") for _ in range(3))
    steps = [b.train_step(bundle, LOSSES["prior"], SETTINGS, FROZEN["prior"]) for b, bundle in (whole, halves, single)]
    for i in range(2):
        inputs = stage_inputs("prior", 8, seed=i)
        loss = steps[0](*inputs, lr=1e-3)
        accumulated = steps[1].accumulate(split(inputs, 2), lr=1e-3)
        steps[2].accumulate(split(inputs, 2)[:1], lr=1e-3)  # the first half alone: a different step
        assert abs(accumulated - loss) <= 1e-6 * loss, (accumulated, loss)
        assert steps[0].grad_norm > SETTINGS.max_grad_norm  # the clipping acts on the mean gradient
        assert abs(steps[1].grad_norm - steps[0].grad_norm) <= 1e-5 * steps[0].grad_norm
    (b, w), (_, h), (_, s) = ((b, b.state_dict(m)) for b, m in (whole, halves, single))
    start = WEIGHTS["prior"]
    moved = _worst(w, start)
    assert moved > 1e-3, moved  # the steps did move the weights (by ~lr / scale)
    # measured over 10 pairs of batches <= 2.5e-7 (torch), 3.1e-7 (MLX): float32 rounding of the two means,
    # through AdamW's lr / eps slope
    assert _worst(h, w) <= 1e-6
    # the moments, but of the key biases: attention's softmax ignores them, so their gradient is zero but for
    # rounding (~1e-10), and so are their moments, which then differ at random; measured 1.8e-6 elsewhere
    moments = [{k: v for k, v in step.state().items() if not k.endswith("to_k.bias")} for step in steps[:2]]
    assert _worst(moments[1], moments[0]) <= 1e-5
    assert _worst(s, w) > 1e-4  # a step on half the batch is not the whole batch's
    assert all(np.array_equal(h[k], start[k]) for k in FROZEN["prior"])


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_accumulated_step_agrees_across_backends(stage):
    """MLX and torch from the same weights and micro-batches (three), as one-step parity holds elsewhere."""
    inputs = stage_inputs(stage, 6, seed=3)
    assert_one_step_agrees(lambda b: stage_bundle(b.name, stage)[1], LOSSES[stage], inputs,
                           micro_batches=split(inputs, 3), frozen=FROZEN[stage])


@pytest.mark.parametrize("backend", backend_params())
def test_bad_micro_batches_are_one_line(backend):
    b, bundle = stage_bundle(backend, "prior")
    step = b.train_step(bundle, LOSSES["prior"], SETTINGS, FROZEN["prior"])
    with pytest.raises(Dalle2Error, match="at least one micro-batch") as e:
        step.accumulate([], lr=1e-3)
    uneven = [stage_inputs("prior", 4, seed=0), stage_inputs("prior", 2, seed=1)]
    with pytest.raises(Dalle2Error, match="micro-batch 1 is laid out as .* equal size") as e2:
        step.accumulate(uneven, lr=1e-3)
    assert "\n" not in str(e.value) + str(e2.value)
    assert step.steps == 0 and _worst(b.state_dict(bundle), WEIGHTS["prior"]) == 0  # refused before any change
