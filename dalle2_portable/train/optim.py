"""What a training step needs besides the loss, written once: the optimiser's settings, the learning-rate
schedule, and the exponential moving average of the weights.

Each backend builds its framework's own AdamW from `AdamW` (torch.optim.AdamW; mlx.optimizers.AdamW with bias
correction, which MLX leaves off by default), so both compute the same update:
    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
after the gradients are scaled to a global norm of at most `max_grad_norm` (g * min(1, max / (|g| + 1e-6)),
as torch's clip_grad_norm_ and mlx.optimizers.clip_grad_norm both do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import Dalle2Error


@dataclass(frozen=True)
class AdamW:
    """AdamW's settings (torch's defaults, but for the learning rate) and the gradient clipping before it."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self):
        if not (self.lr > 0 and 0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1 and self.eps > 0
                and self.weight_decay >= 0 and (self.max_grad_norm is None or self.max_grad_norm > 0)):
            raise Dalle2Error(f"invalid optimiser settings {self}; the learning rate, eps and max_grad_norm must "
                              "be positive, betas in [0, 1), weight_decay >= 0")


def learning_rate(step: int, base: float, warmup: int, total: int, final: float = 0.0) -> float:
    """The learning rate of step `step` (0-based): linear warm-up from base / warmup to base over `warmup`
    steps, then cosine decay to `final` at step `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_decay(step: int, inv_gamma: float = 1.0, power: float = 2 / 3, max_decay: float = 0.9999) -> float:
    """The EMA decay after `step` optimiser steps, with warm-up: 1 - (1 + step / inv_gamma) ^ -power, at most
    `max_decay` (diffusers' EMAModel with use_ema_warmup; 0 at step 0, so the average starts at the weights)."""
    if step <= 0:
        return 0.0
    return min(max_decay, 1.0 - (1.0 + step / inv_gamma) ** -power)


class EMA:
    """The moving average of a module's weights, on the module's device: `shadow[name] = decay * shadow +
    (1 - decay) * weight`, written once with array arithmetic both frameworks share. `weights` are the live
    arrays of `Backend.weights(module)`."""

    def __init__(self, weights: dict):
        self.shadow = {k: w * 1.0 for k, w in weights.items()}  # a copy, in the weights' own layout

    def update(self, weights: dict, decay: float) -> None:
        for k, w in weights.items():
            self.shadow[k] = self.shadow[k] * decay + w * (1.0 - decay)
