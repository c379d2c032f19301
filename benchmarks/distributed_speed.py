"""Training throughput in one and in two processes, per backend, through the launchers users run (torchrun,
mlx.launch): `dalle2 train STAGE` on the packaged default model and the shapes data, the same global batch.

    python benchmarks/distributed_speed.py [--stage decoder] [--steps 20] [--batch 8] [--backends torch,mlx]

Each row is one run in its own processes; its figure is the median samples per second over the steps after the
first two (metrics.jsonl, the whole global batch per step, logged by rank 0). On one machine the processes share
its cores: with 2 cores and 2 processes each gets one (OMP_NUM_THREADS=1 under torchrun, as it sets by
default), so the ratio measures the overhead of splitting the batch and averaging the gradients, not a speed-up;
a speed-up needs a core (or a GPU) per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent


def run(backend: str, processes: int, stage: str, steps: int, batch: int, out: Path) -> float:
    train = [str(BIN / "dalle2"), "train", stage, "--data", "shapes", "--out", str(out), "-m", "default",
             "--steps", str(steps), "--batch-size", str(batch), "--data-size", str(4 * batch), "--quiet",
             "--checkpoint-every", str(steps), "--backend", backend]
    if processes == 1:
        command = train
    elif backend == "torch":
        command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(processes)] + train
    else:
        command = [str(BIN / "mlx.launch"), "-n", str(processes), "--backend", "ring", "--"] + train
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    r = subprocess.run(command, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{backend} x{processes} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    speeds = [json.loads(x)["samples_per_s"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(speeds[2:] or speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="decoder", choices=["prior", "decoder", "super-res"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="the global batch (even)")
    parser.add_argument("--backends", default="torch,mlx")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            one = run(backend, 1, args.stage, args.steps, args.batch, Path(tmp) / f"{backend}-1")
            two = run(backend, 2, args.stage, args.steps, args.batch, Path(tmp) / f"{backend}-2")
            rows.append((backend, one, two))
    print(f"\n{args.stage}, default model, global batch {args.batch}, {args.steps} steps, {os.cpu_count()} cores\n")
    print("| backend | 1 process samples/s | 2 processes samples/s | 2 / 1 |")
    print("|---|---:|---:|---:|")
    for backend, one, two in rows:
        print(f"| {backend} | {one:.1f} | {two:.1f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
