"""Backend-neutral pieces of the unCLIP modules (prior, text_proj, later the UNets), in NumPy.

What both backends would otherwise compute the same way lives here, computed once and handed to the modules:
the prior's additive attention mask, and the exponents of the sinusoidal timestep embedding.
"""

from __future__ import annotations

import math

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
