"""PyTorch building blocks shared by the component modules (names mirror backends/mlx/layers.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...unclip import sinusoid_exponents


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's approximation, transformers' "quick_gelu"


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact (erf) GELU, transformers' "gelu"


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)  # x * sigmoid(x), diffusers' "silu"


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu, "silu": silu}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, L, D) projections; returns (B, L, D).
    `mask`: additive, broadcastable to (B, heads, Lq, Lk)."""
    b, lq, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=hd**-0.5)
    return out.transpose(1, 2).reshape(b, lq, d)


class Timesteps(nn.Module):
    """diffusers `Timesteps`: sinusoidal embedding of (B,) timesteps -> (B, num_channels) float32, no weights.
    The exponents come from `unclip.sinusoid_exponents` (NumPy, shared); `exp` is torch's float32 one."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.exponents = sinusoid_exponents(num_channels, downscale_freq_shift)  # NumPy: no buffer, no meta tensor

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(torch.from_numpy(self.exponents).to(timesteps.device))  # (C/2,)
        emb = timesteps[:, None].float() * freqs[None, :]  # (B, C/2); int timesteps become float32 here
        sin, cos = torch.sin(emb), torch.cos(emb)
        emb = torch.cat([cos, sin] if self.flip_sin_to_cos else [sin, cos], dim=-1)  # (B, C or C-1)
        return F.pad(emb, (0, self.num_channels % 2))  # odd widths get one zero channel, as in diffusers


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding` (no cond_proj, no post_act): linear_1 -> act -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, out_dim: int, act_fn: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = ACTIVATIONS[act_fn]
        self.linear_2 = nn.Linear(time_embed_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


__all__ = ["nn", "torch", "ACTIVATIONS", "attention", "quick_gelu", "gelu", "silu", "Timesteps",
           "TimestepEmbedding"]
