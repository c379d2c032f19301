"""PyTorch building blocks shared by the component modules (names mirror backends/mlx/layers.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's approximation, transformers' "quick_gelu"


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x)  # exact (erf) GELU, transformers' "gelu"


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False
              ) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (B, L, D) projections; returns (B, L, D)."""
    b, lq, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, L, hd)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=hd**-0.5)
    return out.transpose(1, 2).reshape(b, lq, d)


__all__ = ["nn", "torch", "ACTIVATIONS", "attention", "quick_gelu", "gelu"]
