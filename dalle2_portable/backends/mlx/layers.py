"""MLX building blocks shared by the component modules (names mirror backends/torch/layers.py)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def quick_gelu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(1.702 * x)  # OpenAI CLIP's approximation, transformers' "quick_gelu"


def gelu(x: mx.array) -> mx.array:
    return nn.gelu(x)  # exact (erf) GELU, transformers' "gelu"


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, causal: bool = False) -> mx.array:
    """Multi-head scaled dot-product attention on (B, L, D) projections; returns (B, L, D)."""
    b, lq, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, hd).transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, hd)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=hd**-0.5, mask="causal" if causal else None)
    return out.transpose(0, 2, 1, 3).reshape(b, lq, d)


__all__ = ["mx", "nn", "ACTIVATIONS", "attention", "quick_gelu", "gelu"]
