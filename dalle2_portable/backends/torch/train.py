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
