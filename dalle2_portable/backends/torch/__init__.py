"""The PyTorch backend: CUDA, MPS or CPU. Weights on disk are already in PyTorch layout; the components are
modules/'s, built on facade.py."""

from __future__ import annotations

import os

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ...distributed import World, timeout_s
from ...errors import Dalle2Error
from .. import Backend
from .train import TorchTrainStep

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _layers(module: torch.nn.Module) -> set[str]:
    """The weights of `module`'s Linear and Conv2d layers (those quantisation may store quantised)."""
    return {f"{name}.weight" for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


class TorchBackend(Backend):
    name = "torch"

    def _resolve_device(self, device: str | None) -> str:
        if device is None:  # the fastest device present
            if torch.cuda.is_available():
                return "cuda"
            if torch.backends.mps.is_available():
                return "mps"
            return "cpu"
        kind = device.split(":")[0]
        ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
        if kind not in ok:
            raise Dalle2Error(f"unknown torch device {device!r}; choose cpu, cuda, cuda:N or mps")
        if not ok[kind]:
            raise Dalle2Error(f"torch device {device!r} is not available on this machine; use --device cpu")
        return device

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def build(self, component_type, config):
        with torch.device(self.device):
            module = self.new(component_type, config)
        return module.to(self.torch_dtype, memory_format=self.facade.memory_format(self.device)).eval()

    def add_lora(self, module, rank, alpha, targets, dropout=None):
        with torch.device(self.device):
            return super().add_lora(module, rank, alpha, targets, dropout)

    def parameter_shapes(self, component_type, config, quantization=None):
        with torch.device("meta"):  # shapes without allocating a byte
            module = self.new(component_type, config)
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if quantization is None:
            return shapes
        from ...quantize import quantized_shapes  # what this backend reads from a quantised file

        return quantized_shapes(shapes, _layers(module), quantization)

    def load_weights(self, module, tensors, partial=False):
        if partial:
            self.check_names(module, tensors)
        module.load_state_dict(self.from_numpy(module, tensors), strict=not partial)

    def native(self, t: torch.Tensor) -> torch.Tensor:
        """A weight as this backend computes with it: conv kernels (4-D) in the facade's memory format."""
        return t.contiguous(memory_format=self.facade.memory_format(t.device)) if t.dim() == 4 else t

    def _is_native(self, t: torch.Tensor) -> bool:  # without touching its data
        return t.dim() != 4 or t.is_contiguous(memory_format=self.facade.memory_format(t.device))

    def load_file(self, module, path, dtype=None):
        # Each tensor is read once, cast, and assigned in place of the random init (no second copy).
        target = _DTYPES[dtype] if dtype else self.torch_dtype
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        sd = {}
        if target == torch.float32:  # the file's own tensors, memory-mapped: pages are read as they are used
            sd = {k: v.to(self.device) for k, v in load_file(str(path), device="cpu").items()}
        # the rest (cast, or copied to channels-last) one tensor at a time, each mapping closed after its copy:
        # the peak is the copy, not the copy beside the file's pages
        for k in keys:
            t = sd.get(k)
            if t is None or not self._is_native(t):
                sd[k] = None  # drop the whole-file view before its pages are touched
                with safe_open(str(path), framework="pt") as f:
                    sd[k] = self.native(f.get_tensor(k).to(self.device, target))
        module.load_state_dict(sd, strict=True, assign=True)

    def load_component(self, component_type, config, path, dtype=None, quantization=None):
        with torch.device("meta"):  # no random init to throw away: the file's tensors are assigned
            module = self.new(component_type, config)
        if quantization is None:
            self.load_file(module, path, dtype)
        else:  # the quantised weights dequantised in NumPy, one tensor at a time: the same weights MLX runs
            from ...quantize import dequantized

            target = _DTYPES[dtype] if dtype else self.torch_dtype
            shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            sd = {k: self.native(torch.from_numpy(v).to(self.device, target))
                  for k, v in dequantized(path, shapes, _layers(module), quantization)}
            module.load_state_dict(sd, strict=True, assign=True)
        return module.eval()

    def state_dict(self, module):
        return self.to_numpy(module, module.state_dict())

    def array(self, x):
        t = torch.from_numpy(x)
        return t.to(self.device, self.torch_dtype) if t.is_floating_point() else t.to(self.device)

    def run(self, module, *inputs):
        args = self.arrays(inputs)
        with torch.inference_mode():
            out = module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.float().cpu().numpy() for o in out)

    def value_and_grad(self, module, loss_fn):
        facade, weights = self.facade, dict(module.named_parameters())

        def fn(*inputs):
            args = self.arrays(inputs)
            module.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(facade, module, *args)
                loss.backward()
            grads = {k: torch.zeros_like(w) if w.grad is None else w.grad for k, w in weights.items()}
            return float(loss.detach()), self.to_numpy(module, grads)

        return fn

    def train_step(self, module, loss_fn, settings, frozen=(), dtype="float32"):
        return TorchTrainStep(self, module, loss_fn, settings, frozen, dtype)

    def weights(self, module):
        return {k: p.detach() for k, p in module.named_parameters()}

    def to_numpy(self, module, arrays):
        return {k: v.detach().float().cpu().contiguous().numpy() for k, v in arrays.items()}  # C order

    def from_numpy(self, module, tensors):
        return {k: torch.from_numpy(np.require(v, requirements="C")).to(self.device, self.torch_dtype)
                for k, v in tensors.items()}

    def set_threads(self, n: int) -> None:
        torch.set_num_threads(n)

    def sync(self, arrays) -> None:
        pass  # torch runs eagerly

    launched_by = "torchrun"

    def _join(self):
        import datetime

        import torch.distributed as dist

        if not dist.is_initialized():
            kind = "gloo"
            if self.device.startswith("cuda"):  # one GPU per process, NCCL between them
                kind, self.device = "nccl", f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(self.device)
            try:
                dist.init_process_group(kind, timeout=datetime.timedelta(seconds=timeout_s()))
            except (RuntimeError, ValueError) as e:
                cause = str(e).strip().splitlines()[0]
                raise Dalle2Error(f"cannot join the torchrun process group ({cause}); check --rdzv-endpoint / "
                                  "MASTER_ADDR (GLOO_SOCKET_IFNAME=lo on one machine)") from None
        return World(dist.get_rank(), dist.get_world_size())

    def _all_sum(self, values):
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.startswith("cuda") else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def free_memory(self) -> None:
        super().free_memory()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        elif self.device.startswith("mps"):
            torch.mps.empty_cache()


BACKEND = TorchBackend
