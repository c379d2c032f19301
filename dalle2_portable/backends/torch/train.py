"""The PyTorch training step: autograd, clip_grad_norm_, torch.optim.AdamW; state in canonical names."""

from __future__ import annotations

import numpy as np
import torch

from ...errors import Dalle2Error


class TorchTrainStep:
    """`step(*inputs, lr=...)` -> the loss: one optimiser step on `loss_fn(F, module, *arrays)`."""

    def __init__(self, backend, module, loss_fn, settings, frozen=()):
        self.backend, self.module, self.loss_fn = backend, module, loss_fn
        named = dict(module.named_parameters())
        for k in backend.frozen_names(named, frozen):
            named.pop(k).requires_grad_(False)
        self.params = named
        self.max_grad_norm = settings.max_grad_norm
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=settings.lr, betas=settings.betas,
                                           eps=settings.eps, weight_decay=settings.weight_decay)
        self.grad_norm = None  # the last step's global gradient norm, before clipping

    def __call__(self, *inputs, lr: float) -> float:
        args = self.backend.arrays(inputs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.loss_fn(self.backend.facade, self.module, *args)
            loss.backward()
        if self.max_grad_norm is not None:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.max_grad_norm))
        self.optimizer.step()
        return float(loss.detach())

    @property
    def steps(self) -> int:
        first = self.optimizer.state.get(next(iter(self.params.values())), {})
        return int(first["step"]) if "step" in first else 0

    def state(self) -> dict[str, np.ndarray]:
        """{"step": (), "m.<name>": first moment, "v.<name>": second moment}, float32, canonical layout."""
        out = {"step": np.array(self.steps, np.int64)}
        for k, p in self.params.items():
            s = self.optimizer.state.get(p)
            if s:
                out[f"m.{k}"] = s["exp_avg"].detach().float().cpu().numpy()
                out[f"v.{k}"] = s["exp_avg_sq"].detach().float().cpu().numpy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        step = int(state["step"])
        for k, p in self.params.items():
            if f"m.{k}" not in state:
                if step:
                    raise Dalle2Error(f"optimiser state has no moments for {k!r}; resume with the same model")
                continue
            self.optimizer.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.from_numpy(np.require(state[f"m.{k}"], requirements="C")).to(p.device, p.dtype),
                "exp_avg_sq": torch.from_numpy(np.require(state[f"v.{k}"], requirements="C")).to(p.device, p.dtype)}
