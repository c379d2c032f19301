"""The MLX facade (modules.FACADE names): MLX's own layers and ops; feature maps NHWC, MLX's convolution layout.

Imported through the backend package, so the OpenBLAS preload in backends/mlx/__init__.py runs first.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import checkpoint as _module_checkpoint
from mlx.utils import tree_map


# -- layers ---------------------------------------------------------------------------------------------------
class Module(nn.Module):
    """mlx.nn.Module calling `forward`, the method the component classes define (as torch modules do)."""

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


LayerNorm, Embedding, Identity = nn.LayerNorm, nn.Embedding, nn.Identity


def _in_weight_dtype(x: mx.array, layer: nn.Module) -> mx.array:
    return x if x.dtype == layer.weight.dtype else x.astype(layer.weight.dtype)


class Linear(nn.Linear):
    """nn.Linear computing in its weight's dtype, as torch.autocast casts a matmul's inputs (MLX would promote a
    float32 input and bfloat16 weights to a float32 product): bfloat16 training (backends/mlx/train.py) runs its
    forward on bfloat16 weights with float32 inputs, which the loss reads at full precision. A no-op otherwise:
    `Backend.run` hands a module inputs in its weights' dtype. `nn.quantize` turns it into a QuantizedLinear."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(_in_weight_dtype(x, self))

    def to_quantized(self, group_size: int = 64, bits: int = 8, mode: str = "affine", **_) -> QuantizedLinear:
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's QuantizedLinear (same arrays and names), computing on the CPU as dequantise + matmul: MLX 0.32's CPU
    `quantized_matmul` is a plain loop (0.7 GFLOP/s on a 2048x1280 @ 1280x1280 product, where dequantising the
    weight and multiplying through BLAS reaches 41, float32 48). On the GPU, MLX's quantised kernel."""

    def __call__(self, x: mx.array) -> mx.array:
        if mx.default_device() == mx.gpu:
            return super().__call__(x)
        w = mx.dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits, mode=self.mode)
        y = (x if x.dtype == w.dtype else x.astype(w.dtype)) @ w.T
        return y + self["bias"] if "bias" in self else y


class Conv2d(nn.Conv2d):
    """nn.Conv2d computing in its weight's dtype (see Linear); `nn.quantize` turns it into a QuantizedConv2d."""

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(_in_weight_dtype(x, self))

    def to_quantized(self, group_size: int = 64, bits: int = 8, mode: str = "affine", **_) -> QuantizedConv2d:
        return QuantizedConv2d.from_conv(self, group_size, bits, mode)


class QuantizedConv2d(nn.Module):
    """A Conv2d whose kernel is stored as MLX's QuantizedLinear stores its weight (MLX has no quantised
    convolution): `mx.quantize` over each output channel's row of kH*kW*in weights (MLX's (O, kH, kW, I) order),
    packed uint32 `weight`, `scales`, `biases`, and the float `bias`. Each call dequantises the kernel
    (`mx.dequantize`, one kernel at a time) and convolves with `mx.conv2d`: the weights are held at bits/32 of
    their float32 size plus one scale and bias per group; what the dequantisation costs per step is measured by
    benchmarks/quantize.py. Frozen, as QuantizedLinear is."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], stride=(1, 1),
                 padding=(0, 0), dilation=1, groups: int = 1, bias: bool = True, group_size: int = 64,
                 bits: int = 8, mode: str = "affine"):
        super().__init__()
        self.kernel_shape = (out_channels, *kernel_size, in_channels // groups)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.group_size, self.bits, self.mode = group_size, bits, mode
        rows = mx.zeros((out_channels, kernel_size[0] * kernel_size[1] * (in_channels // groups)))
        self.weight, self.scales, self.biases = mx.quantize(rows, group_size, bits, mode=mode)
        if bias:
            self.bias = mx.zeros((out_channels,))
        self.freeze()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, group_size: int, bits: int, mode: str = "affine") -> QuantizedConv2d:
        o, kh, kw, i = conv.weight.shape
        layer = cls(i * conv.groups, o, (kh, kw), conv.stride, conv.padding, conv.dilation, conv.groups,
                    "bias" in conv, group_size, bits, mode)
        layer.weight, layer.scales, layer.biases = mx.quantize(conv.weight.reshape(o, -1), group_size, bits,
                                                               mode=mode)
        if "bias" in conv:
            layer.bias = conv.bias
        layer.freeze()
        return layer

    def _extra_repr(self) -> str:
        o, kh, kw, i = self.kernel_shape
        return (f"{i * self.groups}, {o}, kernel_size={(kh, kw)}, padding={self.padding}, bits={self.bits}, "
                f"group_size={self.group_size}")

    def __call__(self, x: mx.array) -> mx.array:
        w = mx.dequantize(self["weight"], self["scales"], self["biases"], self.group_size, self.bits,
                          mode=self.mode).reshape(self.kernel_shape)
        y = mx.conv2d(x if x.dtype == w.dtype else x.astype(w.dtype), w, self.stride, self.padding, self.dilation,
                      self.groups)
        return y + self["bias"] if "bias" in self else y


def ModuleList(modules) -> list:  # MLX finds modules in plain lists
    return list(modules)


def GroupNorm(groups: int, channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps, pytorch_compatible=True)  # torch's channel grouping


def Parameter(shape: tuple[int, ...], init: str = "zeros") -> mx.array:
    """A weight that is not inside a layer: zeros, or standard normal (`init="normal"`). Lazy until evaluated."""
    return mx.zeros(shape) if init == "zeros" else mx.random.normal(shape)


# -- ops ------------------------------------------------------------------------------------------------------
float32 = mx.float32
exp, log, sin, cos, tanh, sqrt, sigmoid = mx.exp, mx.log, mx.sin, mx.cos, mx.tanh, mx.sqrt, mx.sigmoid
gelu, silu = nn.gelu, nn.silu  # exact (erf) GELU
where, broadcast_to, pad, stop_gradient = mx.where, mx.broadcast_to, mx.pad, mx.stop_gradient  # pad: NumPy's widths


def clip(x: mx.array, lo=None, hi=None) -> mx.array:  # bounds are Python numbers or None
    return mx.clip(x, lo, hi)


def cast(x: mx.array, dtype) -> mx.array:
    return x.astype(dtype)


def constant(a: np.ndarray, like: mx.array) -> mx.array:
    """A NumPy array as an MLX array (its own dtype kept; MLX has one memory for every device)."""
    return mx.array(a)


def arange(n: int, like: mx.array) -> mx.array:
    return mx.arange(n)


def cat(xs, axis: int) -> mx.array:
    return mx.concatenate(xs, axis=axis)


def split(x: mx.array, parts: int, axis: int):
    return mx.split(x, parts, axis=axis)


def permute(x: mx.array, axes) -> mx.array:
    return x.transpose(*axes)


def mean(x: mx.array, axis=None, keepdims: bool = False) -> mx.array:
    return mx.mean(x, axis=axis, keepdims=keepdims)


def sum(x: mx.array, axis=None, keepdims: bool = False) -> mx.array:  # noqa: A001 (the facade's name)
    return mx.sum(x, axis=axis, keepdims=keepdims)


def logsumexp(x: mx.array, axis: int, keepdims: bool = False) -> mx.array:
    return mx.logsumexp(x, axis=axis, keepdims=keepdims)


def sdpa(q, k, v, scale: float, causal: bool, mask):
    """Scaled dot-product attention on (B, H, L, hd); `mask` additive or None."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else mask)


def checkpoint(block: nn.Module, *args, **kwargs):
    """`block(*args, **kwargs)`, its activations recomputed in the backward pass instead of stored. `block` must
    be a module and return arrays (in tuples, lists or dicts): `mx.checkpoint` differentiates only a function's
    inputs, so `mlx.nn.utils.checkpoint` passes the block's trainable parameters in explicitly; other arrays the
    gradient flows into must be arguments. Each distinct array leaves the checkpoint once: `mx.checkpoint`
    (MLX 0.32) keeps only one cotangent of an array it returns twice (the UNet's down blocks return their
    output again among their skips), so the tree is rebuilt outside it."""
    tree = {}

    def distinct(*a, **kw):
        arrays, index = [], {}

        def slot(x):
            if id(x) not in index:
                index[id(x)] = len(arrays)
                arrays.append(x)
            return index[id(x)]

        tree["slots"] = tree_map(slot, block(*a, **kw))
        return arrays

    arrays = _module_checkpoint(block, distinct)(*args, **kwargs)
    return tree_map(lambda i: arrays[i], tree["slots"])


# -- layout: NHWC ---------------------------------------------------------------------------------------------
CHANNELS = -1


def to_layout(x: mx.array) -> mx.array:  # canonical NCHW -> NHWC
    return x.transpose(0, 2, 3, 1)


def from_layout(x: mx.array) -> mx.array:  # NHWC -> canonical NCHW
    return x.transpose(0, 3, 1, 2)


def channel_vector(t: mx.array) -> mx.array:  # (B, C) -> broadcastable over a feature map
    return t[:, None, None, :]


def flatten_spatial(x: mx.array) -> mx.array:  # feature map -> (B, HW, C), row-major positions
    return x.reshape(x.shape[0], -1, x.shape[-1])


def unflatten_spatial(seq: mx.array, shape) -> mx.array:  # (B, HW, C) -> a feature map of `shape`
    return seq.reshape(shape)


def avg_pool2(x: mx.array) -> mx.array:  # 2x2 average pool
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample2(x: mx.array) -> mx.array:  # nearest, 2x
    b, h, w, c = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
