"""Training, written once over the backend facade (docs/ARCHITECTURE.md, "The training seam").

`loop.train` runs a stage (`stages.py`: what it trains, its batch, its loss over `losses.py`) on any backend,
with `optim.py` (AdamW settings, schedules, EMA), `checkpoint.py` and the data of `data.py` / `shapes.py`.
"""

import sys
import types


class _TrainModule(types.ModuleType):
    """This package, callable: `d2.train(stage, data, out, model, ...)` runs `loop.train`, while
    `dalle2_portable.train.loop` and the other submodules import as usual."""

    def __call__(self, *args, **kwargs):
        from .loop import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _TrainModule
