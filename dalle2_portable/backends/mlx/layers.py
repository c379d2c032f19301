"""MLX building blocks shared by the component modules (names mirror backends/torch/layers.py)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ...unclip import sinusoid_exponents


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)  # OpenAI CLIP's approximation, transformers' "quick_gelu"


def gelu(x: mx.array) -> mx.array:
    return nn.gelu(x)  # exact (erf) GELU, transformers' "gelu"


def silu(x: mx.array) -> mx.array:
    return nn.silu(x)  # x * sigmoid(x), diffusers' "silu"


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "silu": silu}


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, causal: bool = False,
              mask: mx.array | None = None) -> mx.array:
    """Multi-head scaled dot-product attention on (B, L, D) projections; returns (B, L, D).
    `mask`: additive, broadcastable to (B, heads, Lq, Lk)."""
    b, lq, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, hd).transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, hd)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask="causal" if causal else mask)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, d)


class Timesteps(nn.Module):
    """diffusers `Timesteps`: sinusoidal embedding of (B,) timesteps -> (B, num_channels) float32, no weights.
    The exponents come from `unclip.sinusoid_exponents` (NumPy, shared); `exp` is MLX's float32 one."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.exponents = sinusoid_exponents(num_channels, downscale_freq_shift)  # NumPy: not a parameter

    def __call__(self, timesteps: mx.array) -> mx.array:
        freqs = mx.exp(mx.array(self.exponents))  # (C/2,)
        emb = timesteps[:, None].astype(mx.float32) * freqs[None, :]  # (B, C/2); int timesteps become float32
        sin, cos = mx.sin(emb), mx.cos(emb)
        emb = mx.concatenate([cos, sin] if self.flip_sin_to_cos else [sin, cos], axis=-1)  # (B, C or C-1)
        return mx.pad(emb, [(0, 0), (0, self.num_channels % 2)])  # odd widths: one zero channel, as diffusers


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding` (no cond_proj, no post_act): linear_1 -> act -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int, act_fn: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = ACTIVATIONS[act_fn]
        self.linear_2 = nn.Linear(time_embed_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(self.act(self.linear_1(x)))


__all__ = ["mx", "nn", "ACTIVATIONS", "attention", "quick_gelu", "gelu", "silu", "Timesteps",
           "TimestepEmbedding"]
