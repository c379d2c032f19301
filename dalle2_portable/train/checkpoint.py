"""Training checkpoints: weights, EMA weights, optimiser moments, the step and the NumPy RNG state, as
safetensors + JSON in canonical names and layout, so a run checkpointed on one backend resumes on the other.

    RUN/checkpoint/   weights.safetensors  ema.safetensors  optimizer.safetensors  state.json

The directory is written whole into a temporary sibling and renamed into place (store.atomic_directory): a run
killed while writing leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .. import store
from ..errors import Dalle2Error

CHECKPOINT = "checkpoint"
FORMAT = 1


@dataclass
class Checkpoint:
    step: int
    weights: dict[str, np.ndarray]
    ema: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    rng: dict  # numpy Generator.bit_generator.state
    extra: dict  # what the loop wants back (e.g. the stage's running numbers)


def save(run: Path, ckpt: Checkpoint) -> Path:
    with store.atomic_directory(run / CHECKPOINT, overwrite=True) as tmp:
        save_file(ckpt.weights, str(tmp / "weights.safetensors"))
        save_file(ckpt.ema, str(tmp / "ema.safetensors"))
        save_file(ckpt.optimizer, str(tmp / "optimizer.safetensors"))
        state = {"format": FORMAT, "step": ckpt.step, "rng": ckpt.rng, "extra": ckpt.extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    return run / CHECKPOINT


def load(run: Path) -> Checkpoint:
    folder = run / CHECKPOINT
    if not (folder / "state.json").is_file():
        raise Dalle2Error(f"{str(run)!r} has no checkpoint to resume from; start the run without --resume")
    state = store.read_json(folder / "state.json", "the checkpoint is damaged; resume from an earlier run")
    if state.get("format") != FORMAT:
        raise Dalle2Error(f"{str(folder)!r}: unknown checkpoint format {state.get('format')!r}; upgrade "
                          "dalle2_portable")
    tensors = {name: load_file(str(folder / f"{name}.safetensors")) for name in ("weights", "ema", "optimizer")}
    return Checkpoint(int(state["step"]), tensors["weights"], tensors["ema"], tensors["optimizer"], state["rng"],
                      state.get("extra", {}))


def rng_from_state(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng
