"""Building blocks the components share, written once over the facade: activations, multi-head attention, the
sinusoidal timestep embedding (its exponents in NumPy) and diffusers' `TimestepEmbedding`."""

from __future__ import annotations

import math

import numpy as np

from . import Module

MASK_FILL = -10000.0  # diffusers' fill for masked attention positions (Karlo's original code used -inf)


def quick_gelu(F, x):
    return x * F.sigmoid(1.702 * x)  # OpenAI CLIP's approximation, transformers' "quick_gelu"


def gelu(F, x):
    return F.gelu(x)  # exact (erf) GELU, transformers' "gelu"


def silu(F, x):
    return F.silu(x)  # x * sigmoid(x), diffusers' "silu"


# config name -> fn(F, x); modules keep the name and look the function up, so no callable is stored on them
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "silu": silu}


def attention(F, q, k, v, heads: int, causal: bool = False, mask=None):
    """Multi-head scaled dot-product attention on (B, L, D) projections; returns (B, Lq, D).
    `mask`: additive, broadcastable to (B, heads, Lq, Lk)."""
    b, lq, d = q.shape
    hd = d // heads
    q, k, v = (F.permute(t.reshape(b, t.shape[1], heads, hd), (0, 2, 1, 3)) for t in (q, k, v))  # (B, H, L, hd)
    out = F.sdpa(q, k, v, hd**-0.5, causal, mask)
    return F.permute(out, (0, 2, 1, 3)).reshape(b, lq, d)


def sinusoid_exponents(dim: int, downscale_freq_shift: float = 0.0, max_period: int = 10000) -> np.ndarray:
    """-log(max_period) * i / (dim/2 - shift) for i < dim/2, float32, bit-identical to diffusers'
    `get_timestep_embedding` (float32 arange, times the float32-rounded scalar, divided in float32).

    The framework applies `exp` in its own float32 (torch's then matches diffusers bit for bit; NumPy's
    float32 exp differs from torch's in ~40% of entries by 1 ulp, enough to move sin(t * f) by ~3e-5 at t=999).
    """
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    return (exponent / np.float32(half - downscale_freq_shift)).astype(np.float32)  # (dim/2,)


class Timesteps(Module):
    """diffusers `Timesteps`: sinusoidal embedding of (B,) timesteps -> (B, num_channels) float32, no weights."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.exponents = sinusoid_exponents(num_channels, downscale_freq_shift)  # NumPy: neither weight nor buffer

    def forward(self, timesteps):
        F = self.F
        freqs = F.exp(F.constant(self.exponents, like=timesteps))  # (C/2,)
        emb = F.cast(timesteps[:, None], F.float32) * freqs[None, :]  # (B, C/2); int timesteps become float32
        sin, cos = F.sin(emb), F.cos(emb)
        emb = F.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], axis=-1)  # (B, C or C-1)
        return F.pad(emb, [(0, 0), (0, self.num_channels % 2)])  # odd widths get one zero channel, as diffusers


class TimestepEmbedding(Module):
    """diffusers `TimestepEmbedding` (no cond_proj, no post_act): linear_1 -> act -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int, act_fn: str = "silu"):
        super().__init__()
        self.linear_1 = self.F.Linear(in_channels, time_embed_dim)
        self.act = act_fn
        self.linear_2 = self.F.Linear(time_embed_dim, out_dim)

    def forward(self, x):
        return self.linear_2(ACTIVATIONS[self.act](self.F, self.linear_1(x)))
