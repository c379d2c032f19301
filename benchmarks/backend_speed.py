"""CLIP encode speed per backend against transformers, each in its own process (one process per row, so the
backends do not fight over the cores). The figure behind `backend="auto"` on a CPU.

    python benchmarks/backend_speed.py                 # ViT-B/32 towers, batch 8, fp32
    python benchmarks/backend_speed.py --size L14 --batch 4

Rows: transformers (the peer), ours on torch, ours on MLX with OpenBLAS preloaded (the default on Linux when
libopenblas0-pthread is installed), ours on MLX with its bundled BLAS. Weights are random (speed does not depend
on their values). Prints milliseconds per batch (median of --repeat runs after a warm-up) and the ratio to
transformers; below it, MLX's BLAS micro-benchmark (1024^2 fp32 matmul, exp per element).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SIZES = {  # (text config, vision config) of the OpenAI checkpoints, reference/clip.md
    "B32": (dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                 projection_dim=512),
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 patch_size=32, projection_dim=512)),
    "L14": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 projection_dim=768),
            dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 patch_size=14, projection_dim=768)),
}
ROWS = ["transformers", "torch", "mlx", "mlx-bundled-blas"]


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def worker(row: str, size: str, batch: int, repeat: int) -> dict:
    text_cfg, vision_cfg = SIZES[size]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49406, (batch, 77)).astype(np.int64)
    ids[:, -1] = 49407
    pixels = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
    if row == "transformers":
        import torch
        from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                                  CLIPVisionModelWithProjection)

        text = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)).eval()
        vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_cfg)).eval()
        tid, px = torch.from_numpy(ids), torch.from_numpy(pixels)

        def run_text():
            with torch.inference_mode():
                text(tid).text_embeds.numpy()

        def run_image():
            with torch.inference_mode():
                vision(px).image_embeds.numpy()
    else:
        if row == "mlx-bundled-blas":
            os.environ["DALLE2_MLX_BLAS"] = "bundled"
        from dalle2_portable.backends import get_backend
        from dalle2_portable.clip import pool_positions
        from dalle2_portable.spec import CLIPTextConfig, CLIPVisionConfig

        b = get_backend("torch" if row == "torch" else "mlx", device="cpu")
        tcfg, vcfg = CLIPTextConfig(**text_cfg), CLIPVisionConfig(**vision_cfg)
        text, vision = b.build(tcfg.TYPE, tcfg), b.build(vcfg.TYPE, vcfg)
        pos = pool_positions(ids, tcfg.eos_token_id)

        def run_text():
            b.run(text, ids, pos)

        def run_image():
            b.run(vision, pixels)
    out = {"text_ms": _time(run_text, repeat), "image_ms": _time(run_image, repeat)}
    if row.startswith("mlx"):
        import mlx.core as mx

        from dalle2_portable.backends import mlx as mlx_backend

        a = mx.random.normal((1024, 1024))
        x = mx.random.normal((1 << 22,))
        out["matmul_ms"] = _time(lambda: mx.eval(a @ a), 5)
        out["exp_ns"] = _time(lambda: mx.eval(mx.exp(x)), 5) * 1e6 / (1 << 22)
        out["blas"] = mlx_backend.OPENBLAS_LOADED or "bundled"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="B32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--worker", choices=ROWS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.batch, args.repeat)))
        return
    results = {}
    for row in ROWS:
        cmd = [sys.executable, __file__, "--worker", row, "--size", args.size, "--batch", str(args.batch),
               "--repeat", str(args.repeat)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            results[row] = None
            print(f"{row}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        results[row] = json.loads(r.stdout.strip().splitlines()[-1])
    ref = results.get("transformers")
    print(f"\nCLIP {args.size}, batch {args.batch}, fp32, CPU ({os.cpu_count()} cores); "
          "ratio = transformers time / ours (>1: faster than transformers)")
    print(f"{'row':<18}{'text ms':>10}{'ratio':>8}{'image ms':>11}{'ratio':>8}")
    for row, r in results.items():
        if r is None:
            continue
        tr = ref["text_ms"] / r["text_ms"] if ref else float("nan")
        ir = ref["image_ms"] / r["image_ms"] if ref else float("nan")
        print(f"{row:<18}{r['text_ms']:>10.1f}{tr:>8.2f}{r['image_ms']:>11.1f}{ir:>8.2f}")
    print(f"\n{'MLX BLAS':<18}{'1024^2 matmul ms':>18}{'exp ns/elem':>13}")
    for row in ("mlx", "mlx-bundled-blas"):
        if results.get(row):
            r = results[row]
            print(f"{r['blas']:<18}{r['matmul_ms']:>18.1f}{r['exp_ns']:>13.1f}")


if __name__ == "__main__":
    main()
