"""Run by tests/test_distributed.py under torchrun or mlx.launch: one `d2.train` of a tiny model; every rank
then writes the weights its training step ended with to OUT/rank-<r>.safetensors (the run itself writes only
from rank 0).

    python tests/dist_train.py BACKEND STAGE MODEL CLIP OUT SETTINGS_JSON [STOP_AT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.numpy import save_file

import dalle2_portable as d2
from dalle2_portable.backends.step import TrainStep
from dalle2_portable.train.settings import TrainSettings

backend, stage, model, clip, out, settings = sys.argv[1:7]
stop_at = int(sys.argv[7]) if len(sys.argv) > 7 else None
steps = []
accumulate = TrainStep.accumulate


def recorded(self, *args, **kwargs):  # remember the step object, to read its module's weights at the end
    steps[:] = [self]
    return accumulate(self, *args, **kwargs)


TrainStep.accumulate = recorded
d2.train(stage, "shapes", out, model, clip=None if clip == "-" else clip, backend=backend,
         settings=TrainSettings(**json.loads(settings)), stop_at=stop_at, resume=(Path(out) / "run.json").exists())
step = steps[0]
rank = step.backend.world.rank
save_file(step.backend.state_dict(step.module), str(Path(out) / f"rank-{rank}.safetensors"))
