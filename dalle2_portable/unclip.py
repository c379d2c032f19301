"""Embedding arithmetic (slerp, text diffs) until it moves next to its caller, pipeline.py."""

from __future__ import annotations

import numpy as np

from .errors import Dalle2Error


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
