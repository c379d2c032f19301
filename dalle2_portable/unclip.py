"""Backend-neutral pieces of the unCLIP modules (prior, text_proj, the UNets), in NumPy.

What both backends would otherwise compute the same way lives here, computed once and handed to the modules:
the attention masks, the exponents of the sinusoidal timestep embedding, and the UNets' block plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import Dalle2Error

MASK_FILL = -10000.0  # diffusers' fill for masked positions (Karlo's original code used -inf)


def prior_attention_mask(text_mask: np.ndarray, additional_embeddings: int = 4) -> np.ndarray:
    """The additive self-attention mask of diffusers' `PriorTransformer.forward`, from the tokenizer's mask.

    text_mask (B, N) bool/int, 1 = real token -> (B, N + A, N + A) float32, as diffusers builds it:
      (1 - text_mask) * -10000, padded with A zeros on the right (the text embedding, time, x_t and prd tokens
      are always visible), plus the causal mask (-10000 above the diagonal). Padded text keys behind a causal
      position thus get -20000, as in diffusers. diffusers repeats it per head; the backends broadcast it.
    """
    text_mask = np.asarray(text_mask)
    if text_mask.ndim != 2:
        raise Dalle2Error(f"prior attention mask: expected (batch, tokens), got shape {text_mask.shape}")
    b, n = text_mask.shape
    length = n + additional_embeddings
    padding = (1.0 - text_mask.astype(np.float32)) * np.float32(MASK_FILL)  # (B, N)
    padding = np.pad(padding, ((0, 0), (0, additional_embeddings)))  # (B, L)
    causal = np.triu(np.full((length, length), MASK_FILL, dtype=np.float32), k=1)  # (L, L)
    return (padding[:, None, :] + causal[None]).astype(np.float32)  # (B, L, L): [batch, query, key]


def sinusoid_exponents(dim: int, downscale_freq_shift: float = 0.0, max_period: int = 10000) -> np.ndarray:
    """-log(max_period) * i / (dim/2 - shift) for i < dim/2, float32, bit-identical to diffusers'
    `get_timestep_embedding` (float32 arange, times the float32-rounded scalar, divided in float32).

    The backends apply `exp` in their own float32 (torch's then matches diffusers bit for bit; NumPy's
    float32 exp differs from torch's in ~40% of entries by 1 ulp, enough to move sin(t * f) by ~3e-5 at t=999).
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    return (exponent / np.float32(half - downscale_freq_shift)).astype(np.float32)  # (dim/2,)


# -- the UNets ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockPlan:
    """One UNet block as diffusers builds it: its ResNet blocks' (in, out) channels (an up block's inputs include
    the skip connection concatenated before each), how many SimpleCrossAttn attentions with `heads` heads it has
    (one after each resnet; in the mid block one between each pair), and whether it ends in a resampling ResNet
    (down- or upsampler, channels -> channels)."""

    channels: int
    resnets: tuple[tuple[int, int], ...]
    attentions: int
    heads: int
    resample: bool


def unet_blocks(cfg) -> tuple[list[BlockPlan], BlockPlan, list[BlockPlan]]:
    """(down blocks, mid block, up blocks) of a UNet config, with diffusers' channel arithmetic
    (`UNet2DConditionModel.__init__` / `UNet2DModel.__init__` and the block classes' loops). The mid block's
    resnets are [first, then one after each attention]; `resample` is unused there."""
    boc, n, per = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    head_dim = getattr(cfg, "attention_head_dim", None)

    def plan(channels: int, resnets: list[tuple[int, int]], block_type: str, resample: bool, mid=False) -> BlockPlan:
        if "SimpleCrossAttn" not in block_type:
            return BlockPlan(channels, tuple(resnets), 0, 0, resample)
        return BlockPlan(channels, tuple(resnets), len(resnets) - mid, channels // head_dim, resample)

    downs, out = [], boc[0]
    for i, block_type in enumerate(cfg.down_block_types):
        inp, out = out, boc[i]
        downs.append(plan(out, [(inp if j == 0 else out, out) for j in range(per)], block_type, i < n - 1))
    mid = plan(boc[-1], [(boc[-1], boc[-1])] * 2, cfg.mid_block_type, False, mid=True)
    ups, rev = [], boc[::-1]
    out = rev[0]
    for i, block_type in enumerate(cfg.up_block_types):
        prev, out, skip_last = out, rev[i], rev[min(i + 1, n - 1)]
        resnets = [((prev if j == 0 else out) + (skip_last if j == per else out), out) for j in range(per + 1)]
        ups.append(plan(out, resnets, block_type, i < n - 1))
    return downs, mid, ups


def check_unet_sample(shape: tuple[int, ...], cfg) -> None:
    """A sample the UNet can take: (B, in_channels, H, W) with H and W multiples of its total downscale."""
    if len(shape) != 4 or shape[1] != cfg.in_channels:
        raise Dalle2Error(f"UNet input: expected (batch, {cfg.in_channels}, height, width), got {tuple(shape)}")
    if shape[2] % cfg.downscale or shape[3] % cfg.downscale:
        raise Dalle2Error(f"UNet input: height and width must be multiples of {cfg.downscale}, got "
                          f"{shape[2]}x{shape[3]}; resize the image")


def decoder_attention_mask(context_mask: np.ndarray) -> np.ndarray:
    """The decoder's additive context mask, from a (B, L) bool/int mask over the context tokens (1 = attend):
    (1 - mask) * -10000 as (B, 1, 1, L) float32, as `UNet2DConditionModel.forward` builds it. The attention
    layers append zeros for the feature-map keys (diffusers `prepare_attention_mask`)."""
    context_mask = np.asarray(context_mask)
    if context_mask.ndim != 2:
        raise Dalle2Error(f"decoder attention mask: expected (batch, tokens), got shape {context_mask.shape}")
    return ((1.0 - context_mask.astype(np.float32)) * np.float32(MASK_FILL))[:, None, None, :]


# -- super-res input ------------------------------------------------------------------------------------------

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


# -- moving in CLIP embedding space ---------------------------------------------------------------------------

def slerp(a: np.ndarray, b: np.ndarray, t) -> np.ndarray:
    """Spherical interpolation between embeddings a and b (rows, (..., D)) by t (broadcast over the rows):
    the direction moves along the great circle, the norm linearly (CLIP image embeddings are not unit vectors
    and the decoder was trained on their own scale). t = 0 returns a and t = 1 returns b exactly; nearly
    parallel directions fall back to linear interpolation. Computed in float64, returned as float32."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    t = np.asarray(t, np.float64)[..., None]
    na, nb = np.linalg.norm(a, axis=-1, keepdims=True), np.linalg.norm(b, axis=-1, keepdims=True)
    if (na == 0).any() or (nb == 0).any():
        raise Dalle2Error("slerp: an embedding is all zeros, so it has no direction to interpolate")
    ua, ub = a / na, b / nb
    theta = np.arccos(np.clip((ua * ub).sum(-1, keepdims=True), -1.0, 1.0))
    sin = np.sin(theta)
    near = sin < 1e-6
    safe = np.where(near, 1.0, sin)
    wa = np.where(near, 1.0 - t, np.sin((1.0 - t) * theta) / safe)
    wb = np.where(near, t, np.sin(t * theta) / safe)
    out = (wa * ua + wb * ub) * ((1.0 - t) * na + t * nb)
    out = np.where(t == 0, a, np.where(t == 1, b, out))
    return out.astype(np.float32)


def text_diff(image_embedding: np.ndarray, source: np.ndarray, target: np.ndarray, amount: float) -> np.ndarray:
    """DALL-E 2's text diffs (section 3.3): the normalised difference of the target and source caption
    embeddings, z_d = (z_target - z_source) / |z_target - z_source|, slerped into the image embedding by
    `amount` (0 = the image, 1 = pure z_d), keeping the image embedding's norm. (B, D) rows, float32."""
    d = np.asarray(target, np.float64) - np.asarray(source, np.float64)
    n = np.linalg.norm(d, axis=-1, keepdims=True)
    if (n < 1e-12).any():
        raise Dalle2Error("edit: the source and target captions have the same CLIP embedding; give two "
                          "different captions")
    z = np.asarray(image_embedding, np.float64)
    return slerp(z, d / n * np.linalg.norm(z, axis=-1, keepdims=True), amount)
