"""How well a model's upsampler restores clean small pictures: held-out shapes pictures at the decoder's size
go through the upsampler (the model's own steps and sampler, or those given), and the result is compared with
the same pictures drawn at the large size, against the antialiased bicubic upscale every step is conditioned
on.

    python benchmarks/upsampler_quality.py [MODEL ...] [--items 64] [--backend torch] [--seed 0]
                                           [--super-res-steps N] [--super-res-sampler ddim|ancestral]

MODEL: "default" (the packaged model) or a model directory with a decoder and a super_res_first (e.g. the
recipe's runs/default/model). Per model, one row: mean and 99th-percentile absolute error (of 255) of the
upsampler and of bicubic alone, their ratio, and the seconds the upsampler took. The pictures are
ShapesDataset(seed=1) (the recipe trains on seed 0), so the upsampler has not seen them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import dalle2_portable as d2
from dalle2_portable.pipeline import stages_of
from dalle2_portable.sampling import NoiseStream, sample_super_res, upscale_bicubic
from dalle2_portable.schedule import UnCLIPSchedule
from dalle2_portable.train.shapes import ShapesDataset


def errors(images: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(mean, 99th percentile) |difference| in 0..255 units of images in [-1, 1], after rounding to u8."""
    def u8(x):
        return np.round((np.clip(x, -1, 1) + 1) * 127.5)
    diff = np.abs(u8(images) - u8(truth))
    return float(diff.mean()), float(np.percentile(diff, 99))


def measure(model: str, items: int, backend: str, seed: int, options: dict) -> dict:
    pipe = d2.load_pipeline(model, backend=backend)
    spec = pipe.spec
    small_size = spec.defaults.decoder_sample_size or spec.components["decoder"].config.sample_size
    size = spec.defaults.super_res_sample_size or spec.components["super_res_first"].config.sample_size
    data = ShapesDataset(length=items, seed=1)
    small, truth = data.pixels(range(items), small_size), data.pixels(range(items), size)
    schedules = {k: UnCLIPSchedule(c) for k, c in spec.schedulers.items()}
    stage = stages_of(pipe.model_dir, spec, schedules, ("super_res",), options)["super_res"]
    first = pipe.modules["super_res_first"]
    t0 = time.perf_counter()
    out = sample_super_res(pipe.backend, first, pipe.modules.get("super_res_last", first), stage, small, size,
                           NoiseStream(seed))
    seconds = time.perf_counter() - t0
    (mean, p99), (bicubic, bicubic_p99) = errors(out, truth), errors(upscale_bicubic(small, size), truth)
    return {"model": model, "sizes": f"{small_size} -> {size}", "steps": f"{stage.steps} {stage.sampler}",
            "mean": mean, "p99": p99, "bicubic": bicubic, "bicubic_p99": bicubic_p99, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["default"])
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--super-res-steps", type=int, default=None, help="default: each model's")
    ap.add_argument("--super-res-sampler", default=None, help="ddim or ancestral (default: each model's)")
    args = ap.parse_args()
    print(f"{args.items} held-out shapes pictures, {args.backend}; errors in 0..255 per channel value\n")
    print("| model | sizes | steps | mean error | p99 error | bicubic mean | bicubic p99 | mean / bicubic | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        r = measure(model, args.items, args.backend, args.seed,
                    {"super_res_steps": args.super_res_steps, "super_res_sampler": args.super_res_sampler})
        print(f"| {r['model']} | {r['sizes']} | {r['steps']} | {r['mean']:.2f} | {r['p99']:.0f} | "
              f"{r['bicubic']:.2f} | {r['bicubic_p99']:.0f} | {r['mean'] / r['bicubic']:.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
