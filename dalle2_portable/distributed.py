"""Data-parallel training across processes, on the launchers users already run: `torchrun` (torch.distributed:
gloo on CPU, NCCL on CUDA) and `mlx.launch` (mlx.core.distributed: the ring backend over TCP, MPI where
installed).

The training loop stays backend-neutral. A backend supplies three things (backends/__init__.py): `join()`, which
joins the process group its launcher set up and returns this process's `World` (rank and size; size 1 when no
launcher started it); the averaging of gradients across ranks inside its training step (torch:
DistributedDataParallel; MLX: `nn.average_gradients`); and `average(values)`, the mean of a few floats across
ranks (the logged loss, and a barrier). The loop asks the World which rows of each global batch are its own and
whether it writes.

Every rank draws the same global batch from the same NumPy Generator (indices, timesteps, noise, dropped
captions), then loads and computes only its own contiguous slice of it (`World.part`). Each rank's loss is the
mean over its slice, and the backend averages the gradients, so a step on N ranks is the single-process step
on the whole batch, and every rank holds the same weights after it. Rank 0 alone writes (run.json, embeddings,
metrics, checkpoints, previews, the result); a checkpoint is the whole state whatever the world size, so a run
resumes on any number of processes, or on the other backend.

A rank whose peers stop answering (a process killed, a host gone) must not hang: `across` bounds each step
and each barrier, and ends the process with one line saying what happened and that the last checkpoint is
intact.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import Dalle2Error

TIMEOUT_S = 300.0  # the default bound on one step or barrier across ranks (DALLE2_DIST_TIMEOUT overrides)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes: rank in [0, size)."""

    rank: int = 0
    size: int = 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes every file of the run; the others only compute."""
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's rows of a global batch of n: a contiguous n / size of them."""
        if n % self.size:
            raise Dalle2Error(f"--batch-size {n} does not split evenly over {self.size} processes; use a multiple "
                              f"of {self.size}")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)


SINGLE = World()


def launcher() -> str | None:
    """Which launcher started this process as one of several: "torchrun" (WORLD_SIZE > 1), "mlx.launch"
    (MLX_RANK / MLX_HOSTFILE, or MPI's OMPI_COMM_WORLD_SIZE > 1), or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torchrun"
    if "MLX_RANK" in os.environ or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mlx.launch"
    return None


def launched_rank() -> int:
    """This process's rank as its launcher's environment says (0 when none started it), before joining."""
    for key in ("RANK", "MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def timeout_s() -> float:
    value = os.environ.get("DALLE2_DIST_TIMEOUT", "")
    try:
        return float(value) if value else TIMEOUT_S
    except ValueError:
        raise Dalle2Error(f"DALLE2_DIST_TIMEOUT must be a number of seconds, got {value!r}") from None


@contextmanager
def across(world: World, what: str, checkpoint: str, seconds: float | None = None):
    """Run a block that waits on the other processes (a step, a barrier). A collective that fails because a peer
    is gone (torch.distributed and MLX raise RuntimeError) becomes one line; one that never returns (a peer died
    mid-collective and the collective waits for ever) is cut after `seconds`: one line, and this process ends
    with status 2. One process: neither."""
    if world.size == 1:
        yield
        return
    seconds = timeout_s() if seconds is None else seconds
    who = f"rank {world.rank} of {world.size}"

    def expire():
        sys.stderr.write(f"error: {who}: {what} got no answer from the other processes within {seconds:g} s (one "
                         f"stopped?); {checkpoint}\n")
        sys.stderr.flush()
        os._exit(2)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except RuntimeError as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise Dalle2Error(f"{who}: {what} failed, another process stopped ({cause}); {checkpoint}") from None
    finally:
        timer.cancel()
