"""Initial weights for training from scratch, drawn in NumPy from a seed, so a run starts from the same weights
on every backend (the frameworks' own initialisers draw from generators that differ).

From the canonical names and shapes alone (`Backend.parameter_shapes`), each weight from its own generator
`default_rng([seed, crc32(name)])`, so adding a weight leaves the others as they were:
    *.bias                           zeros
    1-d *.weight                     ones (the LayerNorm / GroupNorm scales)
    token / position embeddings      N(0, 0.02)
    other *.weight (Linear, Conv)    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), torch's default distribution
    other parameters                 N(0, 0.02) (class / positional / prd embeddings, CLIP statistics)
"""

from __future__ import annotations

import math
import zlib

import numpy as np

EMBEDDINGS = ("token_embedding", "position_embedding")


def initial_weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    module, _, leaf = name.rpartition(".")
    if leaf == "bias":
        return np.zeros(shape, np.float32)
    if leaf == "weight" and len(shape) == 1:
        return np.ones(shape, np.float32)
    if leaf == "weight" and module.rpartition(".")[2] not in EMBEDDINGS:
        bound = 1.0 / math.sqrt(math.prod(shape[1:]))  # fan_in: (out, in) or (out, in, kh, kw)
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    return (0.02 * rng.standard_normal(shape)).astype(np.float32)


def initial_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """{canonical name: initial weight} for every weight of `shapes`."""
    return {name: initial_weight(name, tuple(shape), seed) for name, shape in shapes.items()}
