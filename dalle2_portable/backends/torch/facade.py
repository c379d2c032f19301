"""The PyTorch facade (modules.FACADE names): torch's own layers and ops; feature maps NCHW, torch's layout
(channels-last in memory on the CPU: CHANNELS_LAST)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as tF
import torch.utils.checkpoint
from torch import nn

# -- layers ---------------------------------------------------------------------------------------------------
Module, ModuleList, Linear, Conv2d, LayerNorm, Embedding, Identity = (
    nn.Module, nn.ModuleList, nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding, nn.Identity)


def GroupNorm(groups: int, channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps)


def Parameter(shape: tuple[int, ...], init: str = "zeros") -> nn.Parameter:
    """A weight that is not inside a layer: zeros, or standard normal (`init="normal"`)."""
    return nn.Parameter(torch.zeros(shape) if init == "zeros" else torch.empty(shape).normal_())


# -- ops ------------------------------------------------------------------------------------------------------
float32 = torch.float32
exp, log, sin, cos, tanh, sqrt, sigmoid = torch.exp, torch.log, torch.sin, torch.cos, torch.tanh, torch.sqrt, \
    torch.sigmoid
gelu, silu = tF.gelu, tF.silu  # exact (erf) GELU
where, broadcast_to = torch.where, torch.broadcast_to


def clip(x: torch.Tensor, lo=None, hi=None) -> torch.Tensor:  # bounds are Python numbers or None
    return torch.clamp(x, lo, hi)


def stop_gradient(x: torch.Tensor) -> torch.Tensor:
    return x.detach()


def cast(x: torch.Tensor, dtype) -> torch.Tensor:
    return x.to(dtype)


def constant(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A NumPy array as a tensor on `like`'s device (its own dtype kept)."""
    return torch.from_numpy(a).to(like.device)


def arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)


def cat(xs, axis: int) -> torch.Tensor:
    return torch.cat(xs, dim=axis)


def split(x: torch.Tensor, parts: int, axis: int):
    return x.chunk(parts, dim=axis)


def permute(x: torch.Tensor, axes) -> torch.Tensor:
    return x.permute(*axes)


def pad(x: torch.Tensor, widths) -> torch.Tensor:
    """Zero padding with NumPy's per-axis (before, after) widths."""
    return tF.pad(x, [w for before_after in reversed(widths) for w in before_after])


def mean(x: torch.Tensor, axis=None, keepdims: bool = False) -> torch.Tensor:
    return x.mean() if axis is None else x.mean(dim=axis, keepdim=keepdims)


def sum(x: torch.Tensor, axis=None, keepdims: bool = False) -> torch.Tensor:  # noqa: A001 (the facade's name)
    return x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims)


def logsumexp(x: torch.Tensor, axis: int, keepdims: bool = False) -> torch.Tensor:
    return torch.logsumexp(x, dim=axis, keepdim=keepdims)


def sdpa(q, k, v, scale: float, causal: bool, mask):
    """Scaled dot-product attention on (B, H, L, hd); `mask` additive or None."""
    return tF.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def checkpoint(block, *args, **kwargs):
    """`block(*args, **kwargs)` (a module, or any callable), its activations recomputed in the backward pass
    instead of stored: torch's non-reentrant checkpoint, which follows weights and closures too. A plain call
    where no graph is being recorded (inference)."""
    if not torch.is_grad_enabled():
        return block(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, **kwargs)


# -- layout: NCHW, channels-last in memory on the CPU ------------------------------------------------------------
CHANNELS = 1
# Devices whose feature maps (and conv kernels, backends/torch `native`) are channels-last in memory: oneDNN's
# convolutions run 6% faster that way at Karlo's sizes on the CPU (benchmarks/cascade.py), and an NCHW map
# would turn channels-last after each attention block (the (B, HW, C) sequence reshaped back) and make torch copy
# every following kernel at every call. CUDA and MPS keep NCHW: not measured there.
CHANNELS_LAST = ("cpu",)


def memory_format(device) -> torch.memory_format:
    """How a 4-D tensor on `device` is laid out in memory: channels-last on CHANNELS_LAST devices."""
    return torch.channels_last if torch.device(device).type in CHANNELS_LAST else torch.contiguous_format


def to_layout(x: torch.Tensor) -> torch.Tensor:  # canonical NCHW -> this layout (the same shape)
    return x.contiguous(memory_format=memory_format(x.device))


def from_layout(x: torch.Tensor) -> torch.Tensor:  # this layout -> canonical NCHW, contiguous
    return x.contiguous()


def channel_vector(t: torch.Tensor) -> torch.Tensor:  # (B, C) -> broadcastable over a feature map
    return t[:, :, None, None]


def flatten_spatial(x: torch.Tensor) -> torch.Tensor:  # feature map -> (B, HW, C), row-major positions
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)


def unflatten_spatial(seq: torch.Tensor, shape) -> torch.Tensor:  # (B, HW, C) -> a feature map of `shape`
    return seq.transpose(1, 2).reshape(shape)


def avg_pool2(x: torch.Tensor) -> torch.Tensor:  # 2x2 average pool
    return tF.avg_pool2d(x, kernel_size=2, stride=2)


def upsample2(x: torch.Tensor) -> torch.Tensor:  # nearest, 2x
    return tF.interpolate(x, scale_factor=2.0, mode="nearest")
