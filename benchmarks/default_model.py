"""Text-to-image time of the packaged default model, at the sampling defaults it ships with, on each backend:
one image and a batch of 8, against the targets (<= 2 s and <= 8 s on 2 CPU cores with torch).

    python benchmarks/default_model.py [--backends torch,mlx] [--model default] [--repeat 3] [--threads N]

Each row runs in its own process (one backend per process, as the other benchmarks): it loads the model, runs
one warm-up generation, then times --repeat generations of "a red circle" (batch 1) or 8 prompts (batch 8) and
reports the best, with the process's peak RSS and the speed of a 1024 x 1024 float32 matmul on the same backend
(GFLOP/s, best of 10): timings from machines of different speed compare through that column. The last column
is the largest pixel difference (of 255) of the row's batch-8 images against the first backend's: the same seed
must give the same picture.
No peer runs this model: diffusers' UnCLIPPipeline samples with UnCLIPScheduler only, which has no v prediction
(the decoder's and upsampler's training target) and no DDIM (the upsampler's shipped sampler), so its speed
ratios live in benchmarks/generate_speed.py, on Karlo's own objective.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name  # noqa: E402

PROMPTS = ["a red circle", "a green triangle", "a blue square", "a yellow circle", "an orange triangle",
           "a purple square", "a pink circle", "a white triangle"]

ROW = """
import json, resource, time
import numpy as np
import dalle2_portable as d2
t0 = time.perf_counter()
pipe = d2.load_pipeline({model!r}, backend={backend!r})
load = time.perf_counter() - t0
pipe.generate({prompts!r}[:1], seed=1)
times = {{}}
for batch in (1, 8):
    best = float("inf")
    for _ in range({repeat}):
        t = time.perf_counter()
        out = pipe.generate({prompts!r}[:batch], seed=0)
        best = min(best, time.perf_counter() - t)
    times[batch] = best
gflops = 0.0
a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
if {backend!r} == "torch":
    import torch
    x = torch.from_numpy(a)
    run = lambda: x @ x
else:
    import mlx.core as mx
    x = mx.array(a)
    run = lambda: mx.eval(x @ x)
run()
for _ in range(10):
    t = time.perf_counter()
    run()
    gflops = max(gflops, 2 * 1024**3 / (time.perf_counter() - t) / 1e9)
np.save({out!r}, np.stack([np.asarray(im) for im in out.images]))
size = out.images[0].size[0]
print(json.dumps(dict(load=load, one=times[1], eight=times[8], size=size, gflops=gflops,
                      defaults=pipe.defaults.to_dict(),
                      rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the rows (default: unset)")
    args = ap.parse_args()
    import numpy as np

    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    work = Path(tempfile.mkdtemp(prefix="d2_default_"))
    rows = {}
    for backend in args.backends.split(","):
        out = work / f"{backend}.npy"
        code = ROW.format(model=args.model, backend=backend, prompts=PROMPTS, repeat=args.repeat, out=str(out))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if r.returncode:
            print(f"{backend} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[backend] = json.loads(r.stdout.strip().splitlines()[-1])
        rows[backend]["images"] = np.load(out).astype(np.int16)
    if not rows:
        raise SystemExit("no row ran")
    first = next(iter(rows.values()))
    d = first["defaults"]
    print(f"\n{args.model} model, {first['size']} px, prior {d['prior_steps']} steps ({d['prior_sampler']}, "
          f"guidance {d['prior_guidance']}), decoder {d['decoder_steps']} ({d['decoder_sampler']}, guidance "
          f"{d['decoder_guidance']}), super-res {d['super_res_steps']} ({d['super_res_sampler']}); "
          f"{os.cpu_count()} CPU cores ({cpu_name()}), threads {args.threads or 'default'}, best of {args.repeat}\n")
    print("| backend | load s | 1 image s (target 2) | batch of 8 s (target 8) | s per image at 8 | peak RSS GiB "
          "| matmul GFLOP/s | max pixel diff vs first |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, r in rows.items():
        diff = np.abs(r["images"] - first["images"]).max()
        print(f"| {backend} | {r['load']:.2f} | {r['one']:.2f} | {r['eight']:.2f} | {r['eight'] / 8:.2f} | "
              f"{r['rss']:.2f} | {r['gflops']:.0f} | {diff}/255 |")


if __name__ == "__main__":
    main()
