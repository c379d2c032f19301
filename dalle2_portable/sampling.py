"""The sampling loops of the unCLIP cascade, written once over the Backend interface.

    prior      CLIP text condition -> image embedding            (classifier-free guidance, uncond first)
    decoder    image embedding + text condition -> 64 px image   (guidance on the first 3 channels, learned variance)
    super-res  64 px image -> 256 px image                       (super_res_first, then super_res_last at the end)

Each loop calls its modules through `backend.run` (NumPy in, NumPy out) and does the step math in NumPy
(`schedule.py`), so both backends run the very same loop. No loop draws noise itself: every draw comes from the
call's one `NoiseStream`, in the order diffusers' UnCLIPPipeline consumes its generator (ARCHITECTURE.md,
"Randomness"): each stage's initial latents, then one draw per step that adds noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
import numbers

import numpy as np

from .clip import TextCondition
from .errors import Dalle2Error
from .schedule import UnCLIPSchedule, check_sampler
from .modules.prior import prior_text_inputs
from .modules.unet import decoder_attention_mask

F32 = np.float32

# progress(iterable, stage name, total) -> the same iterable, perhaps wrapped in a progress bar
Progress = Callable[[Iterable, str, int], Iterable]


def no_progress(iterable: Iterable, stage: str, total: int) -> Iterable:
    return iterable


class NoiseStream:
    """All the noise of one call, drawn in order from one NumPy Generator: `standard_normal(shape, float32)` in
    canonical layout (NCHW images, (B, D) embeddings). The same seed gives the same draws on every backend.

    shared=True draws one batch element and repeats it over the batch: interpolation frames share their noise,
    so they differ only by their embeddings and change smoothly."""

    def __init__(self, seed: int | None = 0, generator: np.random.Generator | None = None):
        if generator is not None and not isinstance(generator, np.random.Generator):
            raise Dalle2Error(f"generator must be a numpy.random.Generator (np.random.default_rng(seed)), "
                              f"got {type(generator).__name__}")
        if generator is None and seed is not None and (isinstance(seed, bool) or not isinstance(
                seed, numbers.Integral) or seed < 0):
            raise Dalle2Error(f"seed must be a non-negative integer (or None for fresh noise), got {seed!r}")
        self.rng = generator if generator is not None else np.random.default_rng(seed)
        self.draws = 0

    def draw(self, shape: tuple[int, ...], shared: bool = False) -> np.ndarray:
        self.draws += 1
        if not shared:
            return self.rng.standard_normal(shape, dtype=F32)
        one = self.rng.standard_normal((1, *shape[1:]), dtype=F32)
        return np.ascontiguousarray(np.broadcast_to(one, shape))


@dataclass(frozen=True)
class Stage:
    """One stage's sampling settings: its schedule, step count, guidance scale and sampler."""

    schedule: UnCLIPSchedule
    steps: int
    guidance: float = 1.0
    sampler: str = "ancestral"

    def __post_init__(self):
        check_sampler(self.sampler)  # before any work, not at the first step
        self.schedule.timesteps(self.steps, self.sampler)  # the step count (the sampler's range), likewise

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs unless the scale is exactly 1 (which would equal the conditional
        prediction anyway): scales below 1 move toward the unconditional one."""
        return float(self.guidance) != 1.0


def guide(uncond: np.ndarray, cond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: uncond + scale * (cond - uncond), float32."""
    return (uncond + F32(scale) * (cond - uncond)).astype(F32)


def _loop(stage: Stage, x: np.ndarray, predict, noise: NoiseStream, shared: bool, progress: Progress, name: str):
    """The denoising loop every stage shares: predict(i, t, x) -> model output; then the sampler's step with
    this step's draw (taken only when the step adds noise, so the stream stays in the reference's order). The
    timesteps are the sampler's, and so is any state between steps (one run per call)."""
    run = stage.schedule.start(stage.sampler, stage.steps)
    timesteps = run.timesteps
    for i in progress(range(len(timesteps)), name, len(timesteps)):
        t = int(timesteps[i])
        out = predict(i, t, x)
        draw = noise.draw(x.shape, shared) if stage.schedule.adds_noise(stage.sampler, t) else None
        x, _ = run.step(i, out, x, draw)
    if not np.isfinite(x).all():  # before anything is decoded further or saved
        raise Dalle2Error(f"the {name} stage went non-finite (NaN or inf) at {stage.steps} steps, guidance "
                          f"{stage.guidance:g}; nothing was saved. Lower that stage's guidance, or compute in float32")
    return x


def sample_prior(backend, prior, stage: Stage, text: TextCondition, uncond: TextCondition | None, dim: int,
                 noise: NoiseStream, shared: bool = False, progress: Progress = no_progress) -> np.ndarray:
    """CLIP text condition (B rows) -> sampled CLIP image embeddings (B, dim), denormalised by the prior's CLIP
    statistics (`post_process_latents`). With guidance, `uncond` (B rows, the empty caption) runs first in the
    batch, as in UnCLIPPipeline."""
    guided = stage.guided
    if guided and uncond is None:
        raise Dalle2Error("prior guidance needs the unconditional (empty-caption) text condition")
    cond = TextCondition.cat(uncond, text) if guided else text
    states, mask = prior_text_inputs(cond.states, cond.mask)  # the padding no row attends to cut off
    x = noise.draw((len(text), dim), shared)

    def predict(i, t, x):
        (pred,) = backend.run(prior, np.concatenate([x, x]) if guided else x, np.int64(t), cond.embeds, states,
                              mask)
        return guide(*np.split(pred, 2), stage.guidance) if guided else pred

    x = _loop(stage, x, predict, noise, shared, progress, "prior")
    (embeddings,) = backend.run(prior.post_process_latents, x)
    return embeddings


def sample_decoder(backend, text_proj, decoder, stage: Stage, image_embeddings: np.ndarray, text: TextCondition,
                   uncond: TextCondition | None, channels: int, size: int, noise: NoiseStream, shared: bool = False,
                   progress: Progress = no_progress) -> np.ndarray:
    """Image embeddings (B, D) + text condition (B rows) -> images (B, channels, size, size) in [-1, 1].

    text_proj turns the embeddings into 4 extra context tokens and an additive time embedding (with guidance
    the unconditional rows get its learned embedding). Guidance applies to the predicted noise only; the learned
    variance channels come from the conditional half, as in UnCLIPPipeline."""
    guided = stage.guided
    if guided and uncond is None:
        raise Dalle2Error("decoder guidance needs the unconditional (empty-caption) text condition")
    cond = TextCondition.cat(uncond, text) if guided else text
    context, time = backend.run(text_proj, image_embeddings, cond.embeds, cond.states, guided)
    extra = context.shape[1] - cond.mask.shape[1]  # the image-embedding tokens, always attended
    mask = decoder_attention_mask(np.pad(cond.mask, ((0, 0), (extra, 0)), constant_values=True))
    x = noise.draw((len(image_embeddings), channels, size, size), shared)

    def predict(i, t, x):
        (out,) = backend.run(decoder, np.concatenate([x, x]) if guided else x, np.int64(t), context, time, mask)
        if not guided:
            return out
        uncond_out, cond_out = np.split(out, 2)
        eps = guide(uncond_out[:, :channels], cond_out[:, :channels], stage.guidance)
        return np.concatenate([eps, cond_out[:, channels:]], axis=1)

    x = _loop(stage, x, predict, noise, shared, progress, "decoder")
    return np.clip(x, -1.0, 1.0)


# -- the super-res stage's input ------------------------------------------------------------------------------

def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel; a = -0.5 is the one antialiased resampling uses (Pillow's, and torch's
    `antialias=True` path), not the -0.75 of torch's plain bicubic."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _resample_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of antialiased bicubic resampling along one axis, as torch's
    `interpolate(mode="bicubic", align_corners=False, antialias=True)` (and Pillow) build them: the kernel is
    stretched by the downscale factor (never shrunk), cut at the image border and renormalised there."""
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    weights = np.zeros((size_out, size_in), dtype=np.float64)
    for i in range(size_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size_in)
        taps = _keys_cubic((np.arange(lo, hi) - center + 0.5) / stretch)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def upscale_bicubic(images: np.ndarray, size: int) -> np.ndarray:
    """(B, C, h, w) float -> (B, C, size, size) float32: the super-res stage's conditioning image, as diffusers'
    UnCLIPPipeline makes it (`F.interpolate(..., mode="bicubic", align_corners=False, antialias=True)`).
    Separable: rows then columns, each a matrix product."""
    images = np.asarray(images, dtype=np.float32)
    rows = _resample_matrix(images.shape[2], size).astype(np.float32)
    cols = _resample_matrix(images.shape[3], size).astype(np.float32)
    return np.ascontiguousarray(rows @ images @ cols.T, dtype=np.float32)


def sample_super_res(backend, first, last, stage: Stage, images: np.ndarray, size: int, noise: NoiseStream,
                     shared: bool = False, progress: Progress = no_progress) -> np.ndarray:
    """Images (B, 3, h, w) in [-1, 1] -> (B, 3, size, size): each step sees the noisy sample concatenated with
    the antialiased bicubic upscale of the small image; `first` runs every step but the last, `last` the last.
    No guidance (Karlo's upsamplers are unconditional on text)."""
    up = upscale_bicubic(images, size)
    x = noise.draw((len(images), images.shape[1], size, size), shared)
    n = stage.steps

    def predict(i, t, x):
        (out,) = backend.run(last if i == n - 1 else first, np.concatenate([x, up], axis=1), np.int64(t))
        return out

    return _loop(stage, x, predict, noise, shared, progress, "super-res")

