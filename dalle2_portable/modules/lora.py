"""Trainable LoRA layers (Hu et al. 2021, PEFT's conventions), written once over the facade.

`LoRALinear` is a Linear whose weight and bias keep the canonical names ("to_q.weight") beside PEFT's two
low-rank factors ("to_q.lora_A.weight" (r, in), "to_q.lora_B.weight" (out, r)): y = x W^T + b + (alpha / r)
B A x. B starts at zero (PEFT's default), so an adapted model starts as its base; A starts as the
framework's Linear init, PEFT's kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); training draws it
again in NumPy (train/loop.py), so both backends start from the same factors. The file names of the
factors are exactly diffusers' (lora.py writes "unet.<path>.lora_A.weight").

`add_lora(tree, rank, alpha, targets)` replaces, in a built tree (a component or a Bundle), every Linear whose
path matches `targets` by a LoRALinear sharing its weight and bias arrays; returns the adapted paths.
"""

from __future__ import annotations

import re

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

    def forward(self, x):
        y = x @ self.F.permute(self.weight, (1, 0))
        if getattr(self, "bias", None) is not None:
            y = y + self.bias
        return y + self.lora_B(self.lora_A(x)) * self.scaling


def _child(owner, name: str):
    return owner[int(name)] if name.isdigit() else getattr(owner, name)


def _set_child(owner, name: str, value) -> None:
    if name.isdigit():
        owner[int(name)] = value
    else:
        setattr(owner, name, value)


def add_lora(tree, rank: int, alpha: float, targets: str = DEFAULT_TARGETS) -> list[str]:
    """Put a LoRALinear in place of each Linear of `tree` whose path fully matches the regex `targets` (paths
    as the weights name them: "decoder.mid_block.attentions.0.to_q"); returns those paths, sorted."""
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
        _set_child(owner, name, layer)
    return found
