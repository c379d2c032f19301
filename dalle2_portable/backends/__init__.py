"""The Backend interface, the registry, and the `auto` rule.

A backend holds only what must differ between frameworks: its facade (`backends/<name>/facade.py`: the layers
and the few operations the components in `dalle2_portable.modules` are written against) and its Backend class
(array conversion to and from NumPy, weight layouts, dtypes, devices, and calling a module). The components
themselves are defined once, in `modules/`; `build` makes their native module trees (real `torch.nn.Module` /
`mlx.nn.Module`) with the canonical attribute names. Everything else (tokenising, preprocessing, sampling math)
is NumPy code that hands NumPy arrays in and gets NumPy arrays back.

Backends are imported lazily: `import dalle2_portable` works with only MLX or only PyTorch installed.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import os
import platform
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from ..distributed import SINGLE, World, launcher
from ..errors import Dalle2Error
from ..modules import Bundle, building

DTYPES = ("float32", "float16", "bfloat16")

# component type -> (file in dalle2_portable/modules, class): the one definition every backend builds
MODULES = {
    "clip_text": ("clip", "CLIPTextModelWithProjection"),
    "clip_vision": ("clip", "CLIPVisionModelWithProjection"),
    "clip_logit_scale": ("clip", "CLIPLogitScale"),  # a training stage's, not a model directory component
    "prior": ("prior", "PriorTransformer"),
    "text_proj": ("text_proj", "UnCLIPTextProjModel"),
    "unet2d_condition": ("unet", "UNet"),  # the decoder (diffusers UNet2DConditionModel)
    "unet2d": ("unet", "UNet"),  # the super-res UNets (diffusers UNet2DModel)
}


class Backend(ABC):
    """One framework on one device in one compute dtype."""

    name: str

    def __init__(self, device: str | None = None, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise Dalle2Error(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.dtype = dtype
        self.device = self._resolve_device(device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r}, dtype={self.dtype!r})"

    @abstractmethod
    def _resolve_device(self, device: str | None) -> str:
        """The device to use ('cpu', 'cuda', 'gpu', ...); a device that is not there is a one-line error."""

    # -- modules ---------------------------------------------------------------------------------------------
    @property
    def facade(self):
        """This backend's facade module (backends/<name>/facade.py), what the components are written against."""
        return importlib.import_module(f"{type(self).__module__}.facade")

    @staticmethod
    def module_class(component_type: str) -> type:
        """The backend-neutral class of a component type (dalle2_portable/modules)."""
        if component_type not in MODULES:
            raise Dalle2Error(f"no module for component type {component_type!r}; upgrade dalle2_portable")
        filename, class_name = MODULES[component_type]
        return getattr(importlib.import_module(f"dalle2_portable.modules.{filename}"), class_name)

    def new(self, component_type: str, config: Any):
        """The component's native module tree on this backend's facade, with the framework's initial weights
        (the caller chooses where they live: torch's device or meta context, MLX's lazy arrays)."""
        with building(self.facade):
            return self.module_class(component_type)(config)

    def add_lora(self, module, rank: int, alpha: float, targets: str, dropout=None) -> list[str]:
        """modules.lora.add_lora, its new factors made where this backend keeps weights."""
        from ..modules.lora import add_lora

        return add_lora(module, rank, alpha, targets, dropout)

    @abstractmethod
    def build(self, component_type: str, config: Any):
        """A module with random initial weights, on this backend's device and dtype."""

    def bundle(self, parts: dict):
        """One native module holding already built components as its attributes (`modules.Bundle`)."""
        with building(self.facade):
            return Bundle(parts)

    @abstractmethod
    def parameter_shapes(self, component_type: str, config: Any, quantization=None) -> dict[str, tuple[int, ...]]:
        """{canonical name: shape in canonical (PyTorch) layout}, computed without allocating the weights; with a
        `quantization` (spec.Quantization), the tensors of the quantised component's file (quantize.py)."""

    @abstractmethod
    def load_weights(self, module, tensors: dict[str, np.ndarray], partial: bool = False) -> None:
        """Copy canonical-layout weights into `module` strictly (missing, extra, misshaped all raise); `partial`:
        only these, the others left as they are (a name the module lacks still raises, see `check_names`)."""

    def check_names(self, module, tensors) -> None:
        """A partial load's names must all be the module's, each with the module's number of elements (the
        layouts of a backend may differ from the canonical one, the sizes do not)."""
        have = self.weights(module)
        for name, value in tensors.items():
            if name not in have:
                raise Dalle2Error(f"no weight {name!r} in this module")
            if int(np.prod(have[name].shape)) != np.asarray(value).size:
                raise Dalle2Error(f"weight {name!r} is {tuple(np.shape(value))}, the module's holds "
                                  f"{tuple(have[name].shape)}")

    @abstractmethod
    def load_file(self, module, path: str, dtype: str | None = None) -> None:
        """Load a canonical safetensors file into `module` strictly, cast to this backend's dtype (or `dtype`)."""

    @abstractmethod
    def state_dict(self, module) -> dict[str, np.ndarray]:
        """The module's weights as float32 NumPy arrays, canonical names and layout."""

    # -- calls -----------------------------------------------------------------------------------------------
    @abstractmethod
    def array(self, x: np.ndarray):
        """One contiguous NumPy array -> this backend's array on its device; floats cast to the compute dtype,
        integers and bools kept."""

    def arrays(self, inputs) -> list:
        """`array` over call inputs: None stays None (an optional input left out, e.g. a mask); Python scalars
        and bools become 0-d arrays (e.g. text_proj's CFG flag); a dict of arrays becomes a dict of arrays."""
        def one(x):
            if isinstance(x, dict):
                return dict(zip(x, self.arrays(x.values())))
            return None if x is None else self.array(np.ascontiguousarray(x))

        return [one(x) for x in inputs]

    @abstractmethod
    def run(self, module, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Call `module` on NumPy inputs (floats cast to the compute dtype, integers and bools kept, None passed
        as None), without gradients, and return its outputs as float32 NumPy arrays."""

    @abstractmethod
    def value_and_grad(self, module, loss_fn: Callable) -> Callable[..., tuple[float, dict[str, np.ndarray]]]:
        """The training seam: `fn(*inputs)` computes `loss_fn(F, module, *arrays)` (F this backend's facade; the
        NumPy inputs converted as `run` converts them, dicts of arrays included) with gradients, by the
        framework's own autograd, and returns (the loss as a float, {canonical name: d loss / d weight as float32
        NumPy in canonical layout}) for every weight of `module`. The loss must be a 0-d array."""

    @staticmethod
    def frozen_names(names, frozen) -> list[str]:
        """The weights `frozen` names: each entry a canonical weight name or a prefix of whole modules."""
        out = [k for k in names if any(k == f or k.startswith(f + ".") for f in frozen)]
        unknown = [f for f in frozen if not any(k == f or k.startswith(f + ".") for k in names)]
        if unknown:
            raise Dalle2Error(f"cannot freeze {unknown[0]!r}: the model has no such weight or module")
        return out

    @abstractmethod
    def train_step(self, module, loss_fn: Callable, settings, frozen=(), dtype: str = "float32"):
        """One optimiser step as a callable: `step(*inputs, lr=...)` -> the loss (float). The loss
        `loss_fn(F, module, *arrays)` is differentiated by the framework's autograd, the gradients clipped to
        `settings.max_grad_norm` (train/optim.py `AdamW`) and applied by the framework's AdamW, set up so both
        backends make the same update; the weights `frozen` names (see `frozen_names`) stay as they are.
        `step.accumulate([inputs, ...], lr=...)` -> the mean loss: one step on the mean gradient of equally sized
        micro-batches (`step(*inputs)` is `step.accumulate([inputs])`; backends/step.py holds the control flow).
        `dtype`: the compute dtype, "float32" or "bfloat16" (mixed precision: the weights, gradients, moments and
        update stay float32, the forward and backward run in bfloat16); `module` must hold float32 weights.
        `step.state()` / `step.load_state(d)`: the optimiser's step count and
        moments as {"step", "m.<name>", "v.<name>"} float32 NumPy in canonical names and layout, so a
        checkpoint from one backend resumes on the other; `step.grad_norm`: the last (mean) gradient's norm."""

    @abstractmethod
    def weights(self, module) -> dict:
        """{canonical name: the live weight array}, in this backend's layout, outside any autograd graph."""

    @abstractmethod
    def to_numpy(self, module, arrays: dict) -> dict[str, np.ndarray]:
        """Arrays named and laid out as `module`'s weights -> float32 NumPy in canonical layout."""

    @abstractmethod
    def from_numpy(self, module, tensors: dict[str, np.ndarray]) -> dict:
        """The reverse of `to_numpy`: canonical NumPy -> arrays in this backend's layout and compute dtype."""

    def set_threads(self, n: int) -> None:
        """Use n CPU threads (PyTorch's intra-op pool); a backend that picks its own says so in one line."""
        raise Dalle2Error(f"the {self.name} backend picks its own CPU threads; leave the thread count out (or use "
                          "the torch backend)")

    @abstractmethod
    def sync(self, arrays) -> None:
        """Make sure arrays computed outside a step are computed (MLX is lazy; torch is not)."""

    world = SINGLE  # this process's place among training processes (`join`); one process unless launched
    launched_by: str | None = None  # the launcher whose process group this backend joins (None: one process only)

    def join(self) -> World:
        """Join the process group this backend's launcher set up (distributed.py) and return this process's World
        (also kept as `self.world`); a process no launcher started is SINGLE. A process another launcher started
        is refused in one line."""
        started = launcher()
        if started is None:
            return self.world
        if started != self.launched_by:
            how = f"under {self.launched_by}" if self.launched_by else "in one process (start it without the launcher)"
            raise Dalle2Error(f"this process was started by {started}; the {self.name} backend trains across "
                              f"processes {how} (or give the --backend whose launcher this is)")
        self.world = self._join()
        return self.world

    def _join(self) -> World:
        """Join this backend's launcher's group (only called for a backend that names `launched_by`)."""
        raise NotImplementedError

    def average(self, values: list[float]) -> list[float]:
        """The mean of each value across the training processes (the logged loss; also a barrier)."""
        values = [float(v) for v in values]
        if self.world.size == 1:
            return values
        return [v / self.world.size for v in self._all_sum(values)]

    def _all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the training processes."""
        raise NotImplementedError

    def free_memory(self) -> None:
        """Return the memory of dropped modules to the system (low-memory pipelines call it between stages)."""
        gc.collect()

    def load_component(self, component_type: str, config: Any, path: str, dtype: str | None = None,
                       quantization=None):
        """Build a component and load its weights (the caller validated the file with `store.validate`), in
        this backend's dtype or `dtype` (a LoRA run's frozen base in bfloat16); `quantization`: the file holds
        quantised weights (quantize.py), which the backend runs quantised (MLX) or loads dequantised (torch)."""
        if quantization is not None:
            raise Dalle2Error(f"the {self.name} backend cannot load quantized weights; use --backend mlx")
        module = self.build(component_type, config)
        self.load_file(module, path, dtype)
        return module


# name -> module path of the Backend subclass; `BACKEND` in that module is the class
_REGISTRY = {
    "torch": "dalle2_portable.backends.torch",
    "mlx": "dalle2_portable.backends.mlx",
}
_PACKAGES = {"torch": "torch", "mlx": "mlx.core"}


def installed() -> list[str]:
    """Backends whose framework is importable here (checked without importing it)."""
    out = []
    for name, pkg in _PACKAGES.items():
        try:
            if importlib.util.find_spec(pkg) is not None:
                out.append(name)
        except (ImportError, ValueError):
            pass
    return out


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def auto_backend() -> str:
    """MLX on Apple Silicon; PyTorch where CUDA is present; otherwise the faster on a CPU: PyTorch.

    The CPU figure behind the last rule (README "Backends", benchmarks/backend_speed.py, 2-core x86-64, CLIP
    ViT-B/32, batch 8): PyTorch 312 / 488 ms (text / image), MLX with OpenBLAS preloaded 611 / 749 ms, MLX with
    its bundled BLAS ~20 / 29 s. PyTorch is ~2x faster than the best MLX CPU setup.
    """
    have = installed()
    if not have:
        raise Dalle2Error("no backend is installed; run `pip install 'dalle2_portable[torch]'` or "
                          "`pip install 'dalle2_portable[mlx]'`")
    forced = os.environ.get("DALLE2_BACKEND")
    if forced:
        return forced
    if _is_apple_silicon() and "mlx" in have:
        return "mlx"
    if "torch" in have:
        return "torch"  # CUDA when present (see TorchBackend's device choice), else the faster CPU backend
    return have[0]


def get_backend(name: str = "auto", device: str | None = None, dtype: str = "float32") -> Backend:
    """A Backend instance by name ('auto', 'torch', 'mlx')."""
    if isinstance(name, Backend):
        return name
    if name == "auto":
        name = auto_backend()
    if name not in _REGISTRY:
        raise Dalle2Error(f"unknown backend {name!r}; choose one of auto, {', '.join(_REGISTRY)}")
    if name not in installed():
        raise Dalle2Error(f"backend {name!r} is not installed; run `pip install 'dalle2_portable[{name}]'`")
    module = importlib.import_module(_REGISTRY[name])
    return module.BACKEND(device=device, dtype=dtype)
