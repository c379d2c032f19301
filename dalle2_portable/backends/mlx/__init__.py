"""The MLX backend: Metal on Apple Silicon, CPU on Linux (`mlx[cpu]`).

Layout: MLX convolutions are NHWC with weights (O, kH, kW, I); the weight files are canonical PyTorch layout
(O, I, kH, kW). The weight transposes happen here at load/save; feature maps are transposed by the facade
(facade.py `to_layout` / `from_layout`) where a component takes or returns NCHW, nowhere else.

Linux BLAS: the `mlx[cpu]` wheel links the reference (Netlib) BLAS; a 1024x1024 fp32 matmul takes ~420 ms on 2
cores. When Debian's OpenBLAS (`libopenblas0-pthread`) is present we load it with RTLD_GLOBAL *before*
`mlx.core`, so MLX's cblas calls resolve to it: the same matmul takes ~14 ms (README, "MLX on Linux"). Set
DALLE2_MLX_BLAS=bundled to keep the bundled BLAS. On macOS, MLX uses Accelerate and Metal; nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

OPENBLAS_LOADED = None  # the path of the OpenBLAS library preloaded, if any


def _preload_openblas() -> str | None:
    if not sys.platform.startswith("linux") or os.environ.get("DALLE2_MLX_BLAS") == "bundled":
        return None
    if "mlx.core" in sys.modules:  # too late: MLX already bound its BLAS symbols
        return None
    for name in ("libopenblas.so.0", ctypes.util.find_library("openblas")):
        if not name:
            continue
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError:
            continue
    return None


OPENBLAS_LOADED = _preload_openblas()

import mlx.core as mx  # noqa: E402  (after the BLAS preload, on purpose)
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from ...distributed import World  # noqa: E402
from ...errors import Dalle2Error  # noqa: E402
from .. import Backend  # noqa: E402
from .train import MLXTrainStep  # noqa: E402

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def _conv_weights(module: nn.Module) -> set[str]:
    """Names of the convolution weights, the only tensors whose layout differs from the canonical one."""
    return {f"{name}.weight" for name, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d))}


def _to_mlx_layout(name: str, w, convs: set[str]):
    # canonical (O, I, kH, kW) -> MLX (O, kH, kW, I)
    return w.transpose(0, 2, 3, 1) if name in convs and w.ndim == 4 else w


def _to_canonical_layout(name: str, w, convs: set[str]):
    # MLX (O, kH, kW, I) -> canonical (O, I, kH, kW)
    return w.transpose(0, 3, 1, 2) if name in convs and w.ndim == 4 else w


def _is_float(a: mx.array) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def quantize_module(module: nn.Module, q) -> nn.Module:
    """`module` with every Linear and Conv2d that quantize.py's `quantizable` selects replaced, in place, by
    MLX's QuantizedLinear or the facade's QuantizedConv2d (`nn.quantize` with that predicate; `mx.quantize` of
    the weights the layers hold: on a lazily built module, a graph that loading replaces unevaluated)."""
    from ...quantize import quantizable

    def chosen(path: str, m: nn.Module) -> bool:
        return (isinstance(m, (nn.Linear, nn.Conv2d)) and hasattr(m, "to_quantized")
                and quantizable(f"{path}.weight", tuple(m.weight.shape), q))

    nn.quantize(module, q.group_size, q.bits, mode=q.mode, class_predicate=chosen)
    return module


class MLXBackend(Backend):
    name = "mlx"

    def _resolve_device(self, device: str | None) -> str:
        if device is None:
            return "gpu" if mx.default_device() == mx.gpu else "cpu"
        if device not in ("cpu", "gpu"):
            raise Dalle2Error(f"unknown mlx device {device!r}; choose cpu or gpu")
        if device == "gpu" and not mx.metal.is_available():
            raise Dalle2Error("mlx device 'gpu' needs Metal (Apple Silicon); use --device cpu")
        return device

    @property
    def stream(self):
        return mx.gpu if self.device == "gpu" else mx.cpu

    @property
    def mx_dtype(self):
        return _DTYPES[self.dtype]

    def build(self, component_type, config):
        module = self.new(component_type, config)
        module.set_dtype(self.mx_dtype)
        module.eval()
        with mx.stream(self.stream):
            mx.eval(module.parameters())
        return module

    def parameter_shapes(self, component_type, config, quantization=None):
        # MLX is lazy: the random init (and its quantisation) is a graph that is never evaluated, so nothing is
        # allocated here. A quantised module's view: the packed weights, scales and biases of its quantised layers.
        module = self.new(component_type, config)
        if quantization is not None:
            quantize_module(module, quantization)
        convs = _conv_weights(module)
        out = {}
        for name, p in tree_flatten(module.parameters()):
            shape = tuple(p.shape)
            out[name] = (shape[0], shape[3], shape[1], shape[2]) if name in convs and len(shape) == 4 else shape
        return out

    def _load(self, module, weights: list[tuple[str, mx.array]], dtype=None, strict=True) -> None:
        convs, kind = _conv_weights(module), _DTYPES[dtype] if dtype else self.mx_dtype
        # floats cast to the dtype; a quantised layer's packed uint32 weights kept as they are
        weights = [(k, _to_mlx_layout(k, v, convs).astype(kind) if _is_float(v) else v) for k, v in weights]
        module.load_weights(weights, strict=strict)  # strict: missing, extra and misshaped all raise
        with mx.stream(self.stream):
            mx.eval(module.parameters())

    def load_weights(self, module, tensors, partial=False):
        if partial:
            self.check_names(module, tensors)
        self._load(module, [(k, mx.array(np.require(v, requirements="C"))) for k, v in tensors.items()],
                   strict=not partial)

    def load_file(self, module, path, dtype=None):
        self._load(module, list(mx.load(str(path)).items()), dtype)

    def load_component(self, component_type, config, path, dtype=None, quantization=None):
        module = self.new(component_type, config)  # lazy init, replaced before it is ever evaluated
        if quantization is not None:  # the quantised structure, its (lazy) arrays replaced by the file's
            quantize_module(module, quantization)
        module.eval()
        self.load_file(module, path, dtype)
        return module

    def quantize_component(self, component_type, config, path, quantization) -> dict[str, np.ndarray]:
        """The tensors of a quantised component file (quantize.py's format) from a float one: the component
        loaded in float32, its layers quantised with `mx.quantize`, read back in canonical names (the packed
        weights uint32, every float tensor float32 in canonical layout)."""
        module = self.load_component(component_type, config, path, dtype="float32")
        quantize_module(module, quantization)
        with mx.stream(self.stream):
            mx.eval(module.parameters())
        return self.state_dict(module)

    def state_dict(self, module):
        return self.to_numpy(module, self.weights(module))

    def array(self, x):
        a = mx.array(x)
        return a.astype(self.mx_dtype) if np.issubdtype(x.dtype, np.floating) else a

    def run(self, module, *inputs):
        args = self.arrays(inputs)
        with mx.stream(self.stream):
            out = module(*args)
            out = out if isinstance(out, tuple) else (out,)
            out = tuple(o.astype(mx.float32) for o in out)  # bf16 has no NumPy dtype: upcast first
            mx.eval(out)
        return tuple(np.array(o) for o in out)

    def value_and_grad(self, module, loss_fn):
        facade = self.facade
        loss_and_grad = nn.value_and_grad(module, lambda *args: loss_fn(facade, module, *args))

        def fn(*inputs):
            args = self.arrays(inputs)
            with mx.stream(self.stream):
                loss, grads = loss_and_grad(*args)
                mx.eval(loss, grads)
            return float(loss), self.to_numpy(module, dict(tree_flatten(grads)))

        return fn

    def train_step(self, module, loss_fn, settings, frozen=(), dtype="float32"):
        return MLXTrainStep(self, module, loss_fn, settings, frozen, dtype)

    def weights(self, module):
        return dict(tree_flatten(module.parameters()))

    def to_numpy(self, module, arrays):
        convs = _conv_weights(module)
        # C order: np.array of a transposed MLX array keeps its strides, and safetensors' numpy writer would
        # write such a buffer as it lies in memory, not in its logical order
        return {k: np.require(np.array(_to_canonical_layout(k, v, convs).astype(mx.float32) if _is_float(v) else v),
                              requirements="C") for k, v in arrays.items()}  # packed quantised weights kept

    def from_numpy(self, module, tensors):
        convs = _conv_weights(module)
        return {k: _to_mlx_layout(k, mx.array(np.require(v, requirements="C")), convs).astype(self.mx_dtype)
                for k, v in tensors.items()}

    def sync(self, arrays) -> None:
        mx.eval(arrays)  # MLX is lazy: evaluate, so that a graph does not grow over steps

    launched_by = "mlx.launch"

    def _join(self):
        try:
            group = mx.distributed.init(strict=True)
        except RuntimeError as e:
            raise Dalle2Error(f"cannot join the mlx.launch group ({str(e).strip().splitlines()[0]}); check the "
                              "hosts given to mlx.launch") from None
        return World(group.rank(), group.size())

    def _all_sum(self, values):
        total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), stream=mx.cpu)
        return [float(v) for v in np.array(total)]

    def free_memory(self) -> None:
        super().free_memory()
        mx.clear_cache()  # MLX keeps freed buffers for reuse until told


BACKEND = MLXBackend
