"""The training step's control flow, written once; each backend's train.py supplies only the framework's parts.

    step(*inputs, lr=...)          == step.accumulate([inputs], lr)
    step.accumulate(batches, lr)   one optimiser step on the mean of the micro-batches' gradients:
        _start(lr)                     set the learning rate, forget the last step's gradients
        _add(arrays, k, last)  per batch  forward (in the compute dtype) and backward; the gradient (float32)
                                       added to the running sum with weight 1 / k (torch: backward of loss / k;
                                       MLX: the trees summed, divided once in _finish); returns the batch's loss
        _finish(k)                     average across processes (distributed.py: torch's DDP did it in the last
                                       backward; MLX: nn.average_gradients), clip the mean gradient by global
                                       norm, AdamW; returns the norm (or None)

Mixed precision (`dtype="bfloat16"`): the master weights, the gradients, their sum, AdamW's moments and the
update stay float32; only the forward and backward compute runs in bfloat16 (torch: `torch.autocast`; MLX:
bfloat16 copies of the weights, the layers computing in their weights' dtype, the gradients cast to float32).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..errors import Dalle2Error

TRAIN_DTYPES = ("float32", "bfloat16")  # the compute dtypes of a training step (the master weights: float32)


def _shapes(inputs) -> list:
    """The shape of each input (a dict's values in order; None and scalars as ())."""
    out = []
    for x in inputs:
        out += [np.shape(v) for v in x.values()] if isinstance(x, dict) else [np.shape(x)]
    return out


def check_micro_batches(batches) -> list[tuple]:
    """The micro-batches as a list of input tuples, each laid out as the first (equal sizes: the mean of their
    mean losses' gradients is then the whole batch's); anything else is a one-line error."""
    batches = [tuple(b) for b in batches]
    if not batches:
        raise Dalle2Error("accumulate needs at least one micro-batch")
    first = _shapes(batches[0])
    for i, b in enumerate(batches[1:], start=1):
        if _shapes(b) != first:
            raise Dalle2Error(f"micro-batch {i} is laid out as {_shapes(b)}, micro-batch 0 as {first}; "
                              "accumulate needs micro-batches of equal size")
    return batches


class TrainStep(ABC):
    """`step(*inputs, lr=...)` -> the loss: one optimiser step on `loss_fn(F, module, *arrays)`;
    `step.accumulate([inputs, ...], lr=...)` -> the mean loss: one step on the micro-batches' mean gradient.
    `grad_norm`: the last step's global norm of that (mean) gradient, before clipping (None without clipping)."""

    def __init__(self, backend, module, loss_fn, settings, dtype: str = "float32"):
        if dtype not in TRAIN_DTYPES:
            raise Dalle2Error(f"unknown training dtype {dtype!r}; choose one of {', '.join(TRAIN_DTYPES)}")
        if backend.dtype != "float32":
            raise Dalle2Error(f"training keeps float32 master weights, and this backend builds {backend.dtype} ones; "
                              "train on a float32 backend (dtype='bfloat16' to train_step computes in bfloat16)")
        self.backend, self.module, self.loss_fn, self.dtype = backend, module, loss_fn, dtype
        self.max_grad_norm = settings.max_grad_norm
        self.grad_norm = None

    def __call__(self, *inputs, lr: float) -> float:
        return self.accumulate([inputs], lr)

    def accumulate(self, batches, lr: float) -> float:
        batches = check_micro_batches(batches)
        k = len(batches)
        self._start(lr)
        losses = [self._add(self.backend.arrays(inputs), k, i == k - 1) for i, inputs in enumerate(batches)]
        norm = self._finish(k)
        if norm is not None:
            self.grad_norm = float(norm)
        return sum(losses) / k

    @abstractmethod
    def _start(self, lr: float) -> None:
        """Set the learning rate; clear the gradients of the last step."""

    @abstractmethod
    def _add(self, args: list, k: int, last: bool) -> float:
        """Forward and backward of `loss_fn` on one micro-batch's backend arrays, its gradient (float32) added to
        the running sum so that after all `k` the step applies their mean; the micro-batch's loss. `last`: the
        step's last micro-batch (torch's DistributedDataParallel averages across processes in its backward)."""

    @abstractmethod
    def _finish(self, k: int):
        """Average the gradient across training processes (if several; distributed.py), clip the mean gradient
        to `max_grad_norm` and apply AdamW; the norm before clipping, or None."""
