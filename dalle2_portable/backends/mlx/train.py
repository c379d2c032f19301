"""The MLX training step: nn.value_and_grad, clip_grad_norm, mlx.optimizers.AdamW with bias correction (as
torch's); state in canonical names and layout (conv moments transposed like the weights)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ...errors import Dalle2Error


class MLXTrainStep:
    """`step(*inputs, lr=...)` -> the loss: one optimiser step on `loss_fn(F, module, *arrays)`."""

    def __init__(self, backend, module, loss_fn, settings, frozen=()):
        self.backend, self.module = backend, module
        for name in backend.frozen_names(dict(tree_flatten(module.parameters())), frozen):
            path, _, leaf = name.rpartition(".")
            owner = module
            for part in path.split(".") if path else ():
                owner = owner[int(part)] if isinstance(owner, list) else getattr(owner, part)
            owner.freeze(recurse=False, keys=[leaf])
        self.loss_and_grad = nn.value_and_grad(module, lambda *args: loss_fn(backend.facade, module, *args))
        self.max_grad_norm = settings.max_grad_norm
        self.optimizer = optim.AdamW(learning_rate=settings.lr, betas=list(settings.betas), eps=settings.eps,
                                     weight_decay=settings.weight_decay, bias_correction=True)
        self.optimizer.init(module.trainable_parameters())
        self.grad_norm = None  # the last step's global gradient norm, before clipping

    def __call__(self, *inputs, lr: float) -> float:
        args = self.backend.arrays(inputs)
        self.optimizer.learning_rate = mx.array(lr, mx.float32)
        with mx.stream(self.backend.stream):
            loss, grads = self.loss_and_grad(*args)
            if self.max_grad_norm is not None:
                grads, norm = optim.clip_grad_norm(grads, self.max_grad_norm)
                self.grad_norm = norm
            self.optimizer.update(self.module, grads)
            mx.eval(loss, self.module.parameters(), self.optimizer.state)
        if self.grad_norm is not None:
            self.grad_norm = float(self.grad_norm)
        return float(loss)

    @property
    def steps(self) -> int:
        return int(self.optimizer.state["step"])

    def _moments(self, moment: str) -> dict[str, mx.array]:
        """{name: moment} from the optimiser's tree, whose leaves are "<name>.m" / "<name>.v"."""
        return {key[:-2]: value for key, value in tree_flatten(self.optimizer.state)
                if key.endswith(f".{moment}")}

    def state(self) -> dict[str, np.ndarray]:
        """{"step": (), "m.<name>": first moment, "v.<name>": second moment}, float32, canonical layout."""
        out = {"step": np.array(self.steps, np.int64)}
        for moment in ("m", "v"):
            part = self.backend.to_numpy(self.module, self._moments(moment))
            out.update({f"{moment}.{k}": v for k, v in part.items()})
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        names = [k for k, _ in tree_flatten(self.module.trainable_parameters())]
        missing = [k for k in names if f"m.{k}" not in state]
        if missing:
            raise Dalle2Error(f"optimiser state has no moments for {missing[0]!r}; resume with the same model")
        moments = {}
        for moment in ("m", "v"):
            arrays = self.backend.from_numpy(self.module, {k: state[f"{moment}.{k}"] for k in names})
            moments.update({f"{k}.{moment}": v for k, v in arrays.items()})
        tree = tree_unflatten(list(moments.items()))
        tree["step"] = mx.array(int(state["step"]), mx.uint64)
        tree["learning_rate"] = self.optimizer.state["learning_rate"]
        self.optimizer.state = tree
