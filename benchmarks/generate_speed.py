"""Text-to-image time and peak memory: our cascade on each backend against diffusers' UnCLIPPipeline, same
weights, same steps, in the same run.

    python benchmarks/generate_speed.py [--size small|karlo] [--steps 25,25,7] [--batch 1] [--device cpu]
                                        [--workdir DIR] [--repeat 2]

--size small (default) is Karlo's architecture scaled down so a CPU finishes in minutes (Karlo's block types,
scale_shift, learned variance, 64 px decoder and 256 px super-res; ~1/10 of the widths); --size karlo is the real
3.4-billion-parameter cascade (for a GPU). Weights are random (diffusers' init plus N(0, 0.005), small enough
that the random cascade is not chaotic, so the pixel column means something), written by diffusers'
`save_pretrained` and converted once into --workdir. Each row runs in its own process (one backend per process,
as the README's backend timings are taken): it loads the model, runs one short warm-up generation, then times
`--repeat` full generations and reports the best, with the process's peak RSS. The ratio column is row time /
diffusers time.
The last column is the largest pixel difference of each row's image against diffusers' (same noise stream).
On random weights it measures conditioning as much as arithmetic: at the small size the super-res stage fed
diffusers' own 64 px images matches to 0.08/255, but end to end a 5e-4 difference of the 64 px images (from a
4e-6 difference of the embeddings) reaches ~1.7/255 through it. tests/test_sampling.py holds the 1/255 bound on
models built well-conditioned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SMALL = dict(
    prior=dict(num_attention_heads=4, attention_head_dim=32, num_layers=4, embedding_dim=128, num_embeddings=77),
    text_proj=dict(clip_embeddings_dim=128, time_embed_dim=256, cross_attention_dim=256),
    decoder=dict(in_channels=3, out_channels=6, block_out_channels=(64, 128, 192, 256), layers_per_block=2,
                 norm_num_groups=32,
                 down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                 mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                 up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                 attention_head_dim=32,
                 cross_attention_dim=256, class_embed_type="identity", resnet_time_scale_shift="scale_shift",
                 sample_size=64),
    super_res=dict(in_channels=6, out_channels=3, block_out_channels=(32, 64, 96, 128), layers_per_block=2,
                   norm_num_groups=32, down_block_types=("ResnetDownsampleBlock2D",) * 4,
                   up_block_types=("ResnetUpsampleBlock2D",) * 4, add_attention=False, sample_size=256),
    text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, projection_dim=128),
)

BUILD = """
import sys, json; sys.path.insert(0, {tests!r}); sys.path.insert(0, {here!r})
from pathlib import Path
from builders import KARLO, write_clip_vocab, write_tiny_karlo
from generate_speed import SMALL
import dalle2_portable as d2
root = Path({root!r})
write_tiny_karlo(root / "src", write_clip_vocab(root / "vocab"), sizes=dict(small=SMALL, karlo=KARLO)[{size!r}],
                 weight_noise=0.005)
d2.convert(str(root / "src"), str(root / "converted"))
"""

# One row, in its own process: load, warm up, time; print one JSON line.
ROW = """
import json, resource, sys, time, logging
import numpy as np
logging.disable(logging.WARNING)
steps, batch, repeat, device, kind = {steps!r}, {batch}, {repeat}, {device!r}, {kind!r}
prompts = ["a corgi in a spacesuit"] * batch
p, d, s = steps
t0 = time.perf_counter()
if kind == "diffusers":
    import torch
    from diffusers import UnCLIPPipeline
    from diffusers.pipelines.unclip import pipeline_unclip
    from diffusers.schedulers import scheduling_unclip
    pipe = UnCLIPPipeline.from_pretrained({src!r}).to(device)
    pipe.set_progress_bar_config(disable=True)
    def run(seed, steps):
        rng = np.random.default_rng(seed)
        draw = lambda shape, **k: torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(device)
        pipeline_unclip.randn_tensor = scheduling_unclip.randn_tensor = draw
        out = pipe(prompts, prior_num_inference_steps=steps[0], decoder_num_inference_steps=steps[1],
                   super_res_num_inference_steps=steps[2], output_type="np").images
        return out.transpose(0, 3, 1, 2) * 2 - 1
else:
    import dalle2_portable as d2
    pipe = d2.load_pipeline({converted!r}, backend=kind, device=None if device == "cpu" and kind == "mlx" else device)
    def run(seed, steps):
        return pipe.generate(prompts, seed=seed, prior_steps=steps[0], decoder_steps=steps[1],
                             super_res_steps=steps[2]).samples
load = time.perf_counter() - t0
run(1, (2, 2, 2))
best = float("inf")
for _ in range(repeat):
    t = time.perf_counter(); image = run(0, steps); best = min(best, time.perf_counter() - t)
np.save({out!r}, image)
print(json.dumps(dict(load=load, generate=best, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["small", "karlo"], default="small")
    ap.add_argument("--steps", default="25,25,7", help="prior,decoder,super-res steps")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (MLX uses its default device)")
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    steps = tuple(int(x) for x in args.steps.split(","))
    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2_generate_")) / args.size
    if not (root / "converted").exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"building the {args.size} cascade in {root} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", BUILD.format(tests=str(HERE.parent / "tests"), here=str(HERE),
                                                           root=str(root), size=args.size)], check=True)
    import numpy as np

    from dalle2_portable.store import count_parameters, read_spec

    total = sum(n for n, _ in count_parameters(root / "converted", read_spec(root / "converted")).values())
    rows = {}
    for kind in ["diffusers", *args.backends.split(",")]:
        out = root / f"image_{kind}.npy"
        code = ROW.format(steps=steps, batch=args.batch, repeat=args.repeat, device=args.device, kind=kind,
                          src=str(root / "src"), converted=str(root / "converted"), out=str(out))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode:
            print(f"{kind} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        rows[kind]["image"] = np.load(out)
    peer = rows["diffusers"]
    print(f"\n{args.size} cascade, {total:,} parameters, steps {'/'.join(map(str, steps))}, batch {args.batch}, "
          f"device {args.device}, best of {args.repeat}\n")
    print("| runner | load s | generate s | vs diffusers | peak RSS GiB | max pixel diff vs diffusers |")
    print("|---|---|---|---|---|---|")
    for kind, r in rows.items():
        label = "diffusers UnCLIPPipeline" if kind == "diffusers" else f"dalle2_portable {kind}"
        diff = np.abs(r["image"] - peer["image"]).max() * 127.5
        print(f"| {label} | {r['load']:.2f} | {r['generate']:.2f} | {r['generate'] / peer['generate']:.2f} | "
              f"{r['rss']:.2f} | {diff:.3g}/255 |")


if __name__ == "__main__":
    main()
