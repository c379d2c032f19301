"""Trainable LoRA layers (Hu et al. 2021, PEFT's conventions), written once over the facade.

`LoRALinear` is a Linear whose weight and bias keep the canonical names ("to_q.weight") beside PEFT's two
low-rank factors ("to_q.lora_A.weight" (r, in), "to_q.lora_B.weight" (out, r)): y = x W^T + b + (alpha / r)
B A x. B starts at zero (PEFT's default), so an adapted model starts as its base; A starts as the
framework's Linear init, PEFT's kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); training draws it
again in NumPy (train/loop.py), so both backends start from the same factors. The file names of the
factors are exactly diffusers' (lora.py writes "unet.<path>.lora_A.weight").

`add_lora(tree, rank, alpha, targets, dropout)` replaces, in a built tree (a component or a Bundle), every Linear
whose path matches `targets` by a LoRALinear sharing its weight and bias arrays; returns the adapted paths.

LoRA dropout (PEFT's `lora_dropout`: B A (dropout(x)), the base path untouched) is a `LoRADropout` shared by the
layers of a tree. Its masks are drawn in NumPy, never by a framework's RNG, so both backends drop the same
elements: each layer's mask is a pure function of the step's key, the micro-batch, the layer's path and its
input's shape. It drops only inside `dropout.step(...)`, the training loop's step; everywhere else (sampling,
previews, merged files) the layers are exact. A checkpointed block computed again in the backward pass gets
the mask it had in the forward (the step keeps each micro-batch's masks until the next one starts).
"""

from __future__ import annotations

import re
import zlib
from contextlib import contextmanager

import numpy as np

from . import Module

# PEFT's usual attention targets: the UNets' (diffusers' Attention), the prior's and CLIP's projections
DEFAULT_TARGETS = r"(.*\.)?(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj|q_proj|k_proj|v_proj|out_proj)"


class LoRALinear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float):
        super().__init__()
        F = self.F
        self.weight = F.Parameter((out_features, in_features))
        if bias:
            self.bias = F.Parameter((out_features,))
        self.lora_A = F.Linear(in_features, rank, bias=False)
        self.lora_B = F.Linear(rank, out_features, bias=False)
        self.lora_B.weight = F.Parameter((out_features, rank))  # zeros: the adapted layer starts as its base
        self.scaling = alpha / rank

    lora_dropout = None  # a LoRADropout, set by add_lora on the layers it adapts (a plain attribute, no weight)
    lora_path = ""  # the layer's path in its tree, which keys its dropout masks

    def forward(self, x):
        y = x @ self.F.permute(self.weight, (1, 0))
        if getattr(self, "bias", None) is not None:
            y = y + self.bias
        h = x if self.lora_dropout is None else self.lora_dropout(self.F, self.lora_path, x)
        return y + self.lora_B(self.lora_A(h)) * self.scaling


class LoRADropout:
    """Dropout of probability `p` on the input of a tree's LoRA factors, its masks drawn in NumPy (module doc).

        dropout = LoRADropout(0.1); add_lora(tree, 4, 4.0, dropout=dropout)
        loss_fn = dropout.loss(loss_fn)           # each call: the next micro-batch's masks
        with dropout.step(seed, step):            # masks only in here
            train_step.accumulate(batches, lr)
    """

    def __init__(self, p: float):
        if not 0 <= p < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {p}")
        self.p, self.key, self.batch, self.masks, self.calls = float(p), None, 0, {}, 0

    @contextmanager
    def step(self, *key: int):
        """Drop inside this block; `key` (non-negative integers: the run's seed and the step) keys its masks."""
        self.key, self.batch, self.masks, self.calls = tuple(int(k) for k in key), 0, {}, 0
        try:
            yield
        finally:
            self.key, self.batch, self.masks, self.calls = None, 0, {}, 0

    def loss(self, loss_fn):
        """`loss_fn` (F, module, *arrays), each call of which starts the next micro-batch's masks."""
        def dropped(F, module, *arrays):
            if self.key is not None:  # this call's micro-batch: the number of calls before it in the step
                self.batch, self.calls, self.masks = self.calls, self.calls + 1, {}
            return loss_fn(F, module, *arrays)
        return dropped

    def mask(self, path: str, shape: tuple) -> np.ndarray:
        """The scaled keep-mask (0 or 1 / (1 - p), float32) of the layer at `path` for the current micro-batch."""
        rng = np.random.default_rng([*self.key, self.batch, zlib.crc32(path.encode())])
        return ((rng.random(shape, dtype=np.float32) >= self.p) / np.float32(1 - self.p)).astype(np.float32)

    def __call__(self, F, path: str, x):
        if self.key is None or self.p == 0:
            return x
        shape = tuple(int(n) for n in x.shape)
        if (path, shape) not in self.masks:
            self.masks[path, shape] = F.constant(self.mask(path, shape), x)
        return x * F.cast(self.masks[path, shape], x.dtype)


def _child(owner, name: str):
    return owner[int(name)] if name.isdigit() else getattr(owner, name)


def _set_child(owner, name: str, value) -> None:
    if name.isdigit():
        owner[int(name)] = value
    else:
        setattr(owner, name, value)


def add_lora(tree, rank: int, alpha: float, targets: str = DEFAULT_TARGETS,
             dropout: LoRADropout | None = None) -> list[str]:
    """Put a LoRALinear in place of each Linear of `tree` whose path fully matches the regex `targets` (paths
    as the weights name them: "decoder.mid_block.attentions.0.to_q"), dropping its factors' input by
    `dropout` when given; returns those paths, sorted."""
    from . import building

    F, pattern = tree.F, re.compile(targets)
    found = sorted(path for path, m in tree.named_modules()
                   if path and isinstance(m, F.Linear) and pattern.fullmatch(path) and ".lora_" not in path)
    for path in found:
        *parents, name = path.split(".")
        owner = tree
        for part in parents:
            owner = _child(owner, part)
        base = _child(owner, name)
        out_features, in_features = base.weight.shape
        bias = getattr(base, "bias", None)
        with building(F):
            layer = LoRALinear(in_features, out_features, bias is not None, rank, alpha)
        layer.weight = base.weight
        if bias is not None:
            layer.bias = bias
        layer.lora_dropout, layer.lora_path = dropout, path
        _set_child(owner, name, layer)
    return found
