"""Every component, written once: CLIP, the prior, text_proj and the UNets, over a backend facade.

A component class here (a subclass of `Module`) is written against `self.F`, the facade a backend provides
(backends/<name>/facade.py: its layers and the few operations that differ between frameworks, see FACADE), and
imports no framework. It is never instantiated as it is: inside `building(F)` (which `Backend.build` enters),
`SomeModule(...)` makes an instance of its *native twin*, the class `type(name, (SomeModule, F.Module), {"F": F})`
made once per facade. The twin is a real `torch.nn.Module` or `mlx.nn.Module` with this class's name, so the
flattened parameter names are the canonical ones (transformers' / diffusers') on every backend, and
`torch.compile`, DDP, `mx.compile`, `nn.value_and_grad`, `nn.quantize` and PEFT-style wrapping see plain native
modules. Children made in `__init__` are twins of the same facade, because they are made inside the same
`building` block.

    with building(torch_facade):
        tower = CLIPTextModelWithProjection(config)   # a torch.nn.Module; isinstance(tower, CLIPTextModel...) too

Modules call `forward` (the facade's `Module` maps MLX's `__call__` to it). Feature maps enter and leave the
components in canonical NCHW; inside they are in the facade's layout (`F.to_layout` / `F.from_layout`, NHWC in
MLX), and every layout-dependent step is a facade call, so the same code is right in both.

Gradient checkpointing: a component calls its big blocks (UNet blocks, transformer layers) through
`self.call_block(block, *args)`, which is `block(*args)`, or `F.checkpoint(block, *args)` (the block's activations
recomputed in the backward pass instead of stored) once `gradient_checkpointing(tree)` has turned it on. The same
math either way; only the memory a backward pass holds changes.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from ..errors import Dalle2Error

# The facade's names, each backend's facade.py defines all of them (tests/test_backends.py checks it):
FACADE = {
    "layers": ("Module", "ModuleList", "Linear", "Conv2d", "LayerNorm", "GroupNorm", "Embedding", "Identity",
               "Parameter"),
    "ops": ("float32", "cast", "constant", "arange", "cat", "split", "permute", "pad", "broadcast_to", "exp",
            "log", "sin", "cos", "tanh", "sqrt", "sigmoid", "gelu", "silu", "clip", "where", "mean", "sum",
            "logsumexp", "stop_gradient", "sdpa", "checkpoint"),
    "layout": ("CHANNELS", "to_layout", "from_layout", "channel_vector", "flatten_spatial", "unflatten_spatial",
               "avg_pool2", "upsample2"),
}

_FACADE: contextvars.ContextVar = contextvars.ContextVar("dalle2_portable_facade")


@contextmanager
def building(facade) -> Iterator[None]:
    """Component classes instantiated inside this block become native modules of `facade`."""
    token = _FACADE.set(facade)
    try:
        yield
    finally:
        _FACADE.reset(token)


@functools.cache
def native(cls: type, facade) -> type:
    """The native twin of a component class on a facade: `cls` first in the MRO (its `__init__` and `forward`),
    then the framework's module class. Same name, module and qualname, so the trees of two backends read alike."""
    return type(cls.__name__, (cls, facade.Module), {"F": facade, "__module__": cls.__module__,
                                                     "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})


class Module:
    """The base of every component class. `self.F` is the facade of the backend the instance was built for."""

    F: ClassVar[Any]  # set on the native twins only
    _gradient_checkpointing: bool = False  # set per instance by `gradient_checkpointing`

    def call_block(self, block, *args, **kwargs):
        """`block(*args, **kwargs)`, under `F.checkpoint` when gradient checkpointing is on for this tree. Every
        array the block's gradient flows into must come in through the arguments (its own weights are handled
        by F.checkpoint), and the block must not mutate them: a checkpointed block runs again in the backward."""
        if self._gradient_checkpointing:
            return self.F.checkpoint(block, *args, **kwargs)
        return block(*args, **kwargs)

    def __new__(cls, *args, **kwargs):
        if "F" not in cls.__dict__:  # a backend-neutral class: make its twin on the facade being built
            try:
                facade = _FACADE.get()
            except LookupError:
                raise Dalle2Error(f"{cls.__name__} is backend-neutral; build it through a backend "
                                  "(get_backend(...).build) or inside modules.building(facade)") from None
            cls = native(cls, facade)
        return super(Module, cls).__new__(cls)


class Bundle(Module):
    """Components trained together as one module (a training stage's): each is an attribute, so their weights
    are named "<component>.<canonical name>", and one optimiser and one EMA cover them all."""

    def __init__(self, parts: dict):
        super().__init__()
        for name, module in parts.items():
            setattr(self, name, module)


def gradient_checkpointing(module, on: bool = True):
    """Turn gradient checkpointing on (or off) for every component in a built tree (a component, or a Bundle of
    them), in place; returns `module`. `.modules()` is the native walk over a tree, self included, in torch and
    in MLX alike. Changes memory and time only: the outputs and the gradients are the same."""
    for m in module.modules():
        if isinstance(m, Module):
            m._gradient_checkpointing = bool(on)
    return module
