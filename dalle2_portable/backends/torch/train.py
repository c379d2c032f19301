"""The PyTorch training step: autograd, clip_grad_norm_, torch.optim.AdamW; state in canonical names. The
control flow (micro-batches, the mean loss, the norm) is backends/step.py's; bfloat16 compute by torch.autocast."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from ...errors import Dalle2Error
from ..step import TrainStep


def bfloat16_autocast(device: str):
    """A factory of `torch.autocast` contexts computing in bfloat16 on `device`; a device that cannot (older MPS,
    CUDA before Ampere) is a one-line error, found by a probe: torch either raises or warns and disables it."""
    kind = device.split(":")[0]
    why = "autocast left the product in float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            with torch.autocast(device_type=kind, dtype=torch.bfloat16):
                ok = (torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)).dtype == torch.bfloat16
        except (RuntimeError, UserWarning) as e:
            ok, why = False, (str(e).strip().splitlines() or [type(e).__name__])[0]
    if not ok:
        raise Dalle2Error(f"torch cannot compute in bfloat16 on {device!r} ({why}); train with dtype float32")
    return lambda: torch.autocast(device_type=kind, dtype=torch.bfloat16)


class _Loss(torch.nn.Module):
    """The loss as a module, so that DistributedDataParallel wraps it: its forward is `loss_fn(F, module,
    *args)`, and DDP's hooks average the gradients of `module`'s trainable weights in the backward pass."""

    def __init__(self, module, loss_fn, facade):
        super().__init__()
        self.module, self.loss_fn, self.facade = module, loss_fn, facade

    def forward(self, *args):
        return self.loss_fn(self.facade, self.module, *args)


class TorchTrainStep(TrainStep):
    """backends/step.py's TrainStep on torch: gradients accumulate in the float32 parameters' `.grad`."""

    def __init__(self, backend, module, loss_fn, settings, frozen=(), dtype="float32"):
        super().__init__(backend, module, loss_fn, settings, dtype)
        named = dict(module.named_parameters())
        for k in backend.frozen_names(named, frozen):
            named.pop(k).requires_grad_(False)
        self.params = named
        self.forward, self.ddp = (lambda *args: loss_fn(backend.facade, module, *args)), None
        if backend.world.size > 1:  # DistributedDataParallel averages the gradients in the backward pass
            from torch.nn.parallel import DistributedDataParallel

            cuda = backend.device.startswith("cuda")
            self.ddp = DistributedDataParallel(_Loss(module, loss_fn, backend.facade),
                                               device_ids=[torch.device(backend.device)] if cuda else None)
            self.forward = self.ddp
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=settings.lr, betas=settings.betas,
                                           eps=settings.eps, weight_decay=settings.weight_decay)
        self.compute = bfloat16_autocast(backend.device) if dtype == "bfloat16" else contextlib.nullcontext

    def _start(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def _add(self, args, k, last):
        # DDP: reduce across processes once, in the last micro-batch's backward
        sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
        with torch.enable_grad(), sync:
            with self.compute():  # the forward only: backward runs each op in its forward's dtype
                loss = self.forward(*args)
            (loss / k).backward()  # .grad sums over the micro-batches: their mean gradient after k
        return float(loss.detach().float())

    def _finish(self, k):
        norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm)
        self.optimizer.step()
        return norm

    @property
    def steps(self) -> int:
        first = self.optimizer.state.get(next(iter(self.params.values())), {})
        return int(first["step"]) if "step" in first else 0

    def state(self) -> dict[str, np.ndarray]:
        """{"step": (), "m.<name>": first moment, "v.<name>": second moment}, float32, canonical layout."""
        states = {k: self.optimizer.state[p] for k, p in self.params.items() if self.optimizer.state.get(p)}
        out = {"step": np.array(self.steps, np.int64)}
        for moment, key in (("m", "exp_avg"), ("v", "exp_avg_sq")):
            part = self.backend.to_numpy(self.module, {k: s[key] for k, s in states.items()})
            out.update({f"{moment}.{k}": v for k, v in part.items()})
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        step = int(state["step"])
        missing = [k for k in self.params if f"m.{k}" not in state]
        if missing and step:
            raise Dalle2Error(f"optimiser state has no moments for {missing[0]!r}; resume with the same model")
        names = [k for k in self.params if k not in missing]
        m, v = (self.backend.from_numpy(self.module, {k: state[f"{x}.{k}"] for k in names}) for x in ("m", "v"))
        for k in names:
            self.optimizer.state[self.params[k]] = {"step": torch.tensor(float(step)), "exp_avg": m[k],
                                                    "exp_avg_sq": v[k]}
