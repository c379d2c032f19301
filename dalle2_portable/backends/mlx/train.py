"""The MLX training step: mx.value_and_grad over the trainable weights, clip_grad_norm, mlx.optimizers.AdamW with
bias correction (as torch's); state in canonical names and layout (conv moments transposed like the weights).
The control flow (micro-batches, the mean loss, the norm) is backends/step.py's.

MLX has no autocast. bfloat16 compute runs the forward on bfloat16 copies of every weight (the frozen ones too)
and differentiates with respect to the trainable copies; their gradients are cast to float32 and applied to the
float32 master weights, which the module holds again after each micro-batch. The inputs stay float32: the
facade's Linear and Conv2d compute in their weight's dtype (as torch.autocast casts a matmul's inputs), and the
loss reads its targets and the schedule's terms at full precision (cast to bfloat16, x0's rounding is of the
order of the decoder likelihood's 1/255 bins: the decoder's loss moved by 3-12%, against ~0.3% so)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ...errors import Dalle2Error
from ..step import TrainStep


class MLXTrainStep(TrainStep):
    """backends/step.py's TrainStep on MLX: the micro-batches' gradient trees summed in float32, divided once."""

    def __init__(self, backend, module, loss_fn, settings, frozen=(), dtype="float32"):
        super().__init__(backend, module, loss_fn, settings, dtype)
        for name in backend.frozen_names(dict(tree_flatten(module.parameters())), frozen):
            path, _, leaf = name.rpartition(".")
            owner = module
            for part in path.split(".") if path else ():
                owner = owner[int(part)] if isinstance(owner, list) else getattr(owner, part)
            owner.freeze(recurse=False, keys=[leaf])

        def loss_of(weights, *args):  # nn.value_and_grad's inner function, over an explicit weight tree
            module.update(weights)
            return loss_fn(backend.facade, module, *args)

        self.loss_and_grad = mx.value_and_grad(loss_of)
        self.compute = mx.bfloat16 if dtype == "bfloat16" else None
        self.optimizer = optim.AdamW(learning_rate=settings.lr, betas=list(settings.betas), eps=settings.eps,
                                     weight_decay=settings.weight_decay, bias_correction=True)
        self.optimizer.init(module.trainable_parameters())
        self.sum = None  # the float32 gradient tree summed over this step's micro-batches

    def _start(self, lr):
        self.optimizer.learning_rate = mx.array(lr, mx.float32)
        self.sum = None

    def _add(self, args, k, last):
        master = self.module.parameters()
        with mx.stream(self.backend.stream):
            try:
                if self.compute is not None:  # every weight, the frozen too, so that no layer computes in float32
                    self.module.update(tree_map(lambda w: w.astype(self.compute), master))
                loss, grads = self.loss_and_grad(self.module.trainable_parameters(), *args)
            finally:  # the float32 master weights again (the frozen ones the same arrays), even if the loss raised
                self.module.update(master)
            if self.compute is not None:
                grads = tree_map(lambda g: g.astype(mx.float32), grads)
            self.sum = grads if self.sum is None else tree_map(mx.add, self.sum, grads)
            mx.eval(loss, self.sum)  # one micro-batch's graph at a time
        return float(loss.astype(mx.float32))

    def _finish(self, k):
        norm = None
        with mx.stream(self.backend.stream):
            grads = self.sum if k == 1 else tree_map(lambda g: g / k, self.sum)
            if self.backend.world.size > 1:  # the mean over the processes' slices of the batch (distributed.py)
                grads = nn.average_gradients(grads, communication_stream=mx.cpu)
            if self.max_grad_norm is not None:
                grads, norm = optim.clip_grad_norm(grads, self.max_grad_norm)
            self.optimizer.update(self.module, grads)
            mx.eval(self.module.parameters(), self.optimizer.state, *([] if norm is None else [norm]))
        self.sum = None
        return norm

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
