"""What MLX 8-bit and 4-bit quantisation (dalle2 quantize) costs and saves.

    python benchmarks/quantize.py default [--prompts 8] [--seeds 2] [--group-size 32] [--all-layers]
    python benchmarks/quantize.py karlo [--dir /tmp/karlo-decoder] [--group-size 32] [--keep]

default: the packaged model quantised to 8 and 4 bits; its images (its own 25/25/7 steps) against float32 on
    MLX as PSNR over prompts x seeds (shape/colour captions: of all pixels together, and the median and the
    range of the per-image values), and the files' sizes against float32.
karlo: Karlo's decoder at its real size (UNet2DConditionConfig() is Karlo's; NumPy initial weights,
    modules/init.py, written to --dir: 2.4 GB, deleted afterwards unless --keep), quantised to 8 and 4 bits;
    then, each in its own process on MLX: load + two decoder steps with guidance (batch 2, 64x64), the peak RSS
    (getrusage), the faster step's time, the time to dequantise every quantised weight once (what each step
    spends on it on the CPU: MLX has no quantised convolution, and its CPU quantized_matmul is slower than
    dequantising + BLAS) and the step's relative error against float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CAPTIONS = [f"a {c} {s}" for c, s in (("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                      ("yellow", "circle"), ("purple", "square"), ("orange", "triangle"),
                                      ("white", "circle"), ("black", "square"))]


def size_of(model_dir: Path, names=None) -> int:
    from dalle2_portable import store

    spec = store.read_spec(model_dir)
    return sum((model_dir / c.weights).stat().st_size for n, c in spec.components.items()
               if names is None or n in names)


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def default(args) -> None:
    import dalle2_portable as d2
    from dalle2_portable.store import DEFAULT_MODEL_DIR

    prompts = CAPTIONS[: args.prompts]
    root = Path(tempfile.mkdtemp(prefix="dalle2-quantize-"))
    try:
        dirs = {"float32": Path(DEFAULT_MODEL_DIR)}
        for bits in (8, 4):
            dirs[f"{bits}-bit"] = d2.quantize("default", root / f"q{bits}", bits=bits, group_size=args.group_size,
                                              all_layers=args.all_layers)
        images, seconds = {}, {}
        for name, d in dirs.items():
            pipe = d2.load_pipeline(d, backend="mlx")
            start, outs = time.perf_counter(), []
            for seed in range(args.seeds):
                out = pipe.generate(prompts, seed=seed)
                outs += [np.asarray(im) for im in out.images]
            seconds[name] = time.perf_counter() - start
            images[name] = np.stack(outs)
        parts = ("prior", "decoder", "super_res_first", "super_res_last")
        ref = images["float32"]
        print(f"default model, MLX, {len(prompts)} prompts x {args.seeds} seeds, {ref.shape[1]} px, group size "
              f"{args.group_size}{', all layers' if args.all_layers else ''}")
        print(f"{'weights':<10}{'PSNR dB':>9}{'median':>8}{'min':>8}{'max':>8}{'quantised parts':>17}"
              f"{'whole model':>13}{'s':>8}")
        for name, d in dirs.items():
            per = [psnr(a, b) for a, b in zip(images[name], ref)]
            finite = [p for p in per if np.isfinite(p)] or [float("inf")]
            parts_ratio = size_of(d, parts) / size_of(dirs["float32"], parts)
            whole = size_of(d) / size_of(dirs["float32"])
            print(f"{name:<10}{psnr(images[name], ref):>9.2f}{np.median(per):>8.2f}{min(finite):>8.2f}"
                  f"{max(finite):>8.2f}"
                  f"{parts_ratio:>16.3f}x{whole:>12.3f}x{seconds[name]:>8.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- Karlo's decoder --------------------------------------------------------------------------------------------

def write_decoder(d: Path) -> None:
    """A model directory holding only Karlo's decoder, with NumPy initial weights, written a tensor at a time."""
    from dalle2_portable import store
    from dalle2_portable.backends import get_backend
    from dalle2_portable.modules.init import initial_weight
    from dalle2_portable.spec import Component, ModelSpec, Source, UNet2DConditionConfig

    cfg = UNet2DConditionConfig()
    shapes = get_backend("mlx").parameter_shapes(cfg.TYPE, cfg)
    d.mkdir(parents=True)
    store.write_tensors(d / "decoder.safetensors", list(shapes.items()),
                        lambda name: initial_weight(name, shapes[name], 0))
    store.write_spec(d, ModelSpec(Source("random Karlo-size decoder", layout="dalle2"),
                                  {"decoder": Component(cfg.TYPE, cfg, "decoder.safetensors")}))


def step(model_dir: str, out: str, repeat: int = 2) -> None:
    """In its own process: load the decoder, `repeat` guided steps; print JSON (times, peak RSS); save the output."""
    import resource

    from dalle2_portable import store
    from dalle2_portable.backends import get_backend

    b = get_backend("mlx")  # before importing mlx.core: the backend preloads OpenBLAS (backends/mlx)
    import mlx.core as mx

    def rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB

    spec = store.read_spec(model_dir)
    comp = spec.components["decoder"]
    start = time.perf_counter()
    store.validate(model_dir, spec, b.parameter_shapes, ["decoder"])
    path = str(store.component_path(model_dir, spec, "decoder"))
    module = (b.load_component(comp.type, comp.config, path) if comp.quantization is None else
              b.load_component(comp.type, comp.config, path, quantization=comp.quantization))
    load_s, load_rss = time.perf_counter() - start, rss()
    rng = np.random.default_rng(0)
    cfg = comp.config
    x = rng.standard_normal((1, cfg.in_channels, 64, 64)).astype(np.float32)
    context = rng.standard_normal((2, 81, cfg.cross_attention_dim)).astype(np.float32)
    temb = rng.standard_normal((2, cfg.time_embed_dim)).astype(np.float32)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        (y,) = b.run(module, np.concatenate([x, x]), np.int64(500), context, temb, None)
        times.append(time.perf_counter() - start)
    np.save(out, y)
    layers = [m for _, m in module.named_modules() if type(m).__name__ in ("QuantizedConv2d", "QuantizedLinear")]
    dequant_s = None
    if layers:  # the dequantisation alone, as each step does it on the CPU: every quantised weight once
        start = time.perf_counter()
        for m in layers:
            mx.eval(mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, mode=m.mode))
        dequant_s = time.perf_counter() - start
    convs = sum(type(m).__name__ == "QuantizedConv2d" for m in layers)
    from dalle2_portable.backends import mlx as mlx_backend

    print(json.dumps({"openblas": mlx_backend.OPENBLAS_LOADED, "load_s": load_s, "load_rss_gib": load_rss,
                      "first_step_s": times[0], "step_s": min(times), "peak_rss_gib": rss(), "dequant_s": dequant_s,
                      "quantized_convs": convs, "quantized_linears": len(layers) - convs}))


def karlo(args) -> None:
    import dalle2_portable as d2

    root = Path(args.dir)
    created = not root.exists()
    try:
        src = root / "float32"
        if not (src / "model.json").exists():
            start = time.perf_counter()
            write_decoder(src)
            print(f"wrote {src} ({size_of(src) / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
        dirs = {"float32": src}
        for bits in (8, 4):
            d = root / f"{bits}-bit"
            if not (d / "model.json").exists():
                start = time.perf_counter()
                d2.quantize(src, d, bits=bits, group_size=args.group_size)
                print(f"quantised to {bits} bits in {time.perf_counter() - start:.0f} s", flush=True)
            dirs[f"{bits}-bit"] = d
        rows = {}
        for name, d in dirs.items():
            out = root / f"{name}.npy"
            r = subprocess.run([sys.executable, __file__, "_step", str(d), str(out)], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name}: {r.stderr.strip().splitlines()[-1]}")
            rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
            print(name, rows[name], flush=True)
        ref = np.load(root / "float32.npy")
        print(f"Karlo decoder (UNet2DConditionConfig(), random weights), MLX, guided step (batch 2, 64x64), "
              f"group size {args.group_size}")
        print(f"{'weights':<10}{'file':>9}{'rel err max':>13}{'rel err rms':>13}{'load s':>8}{'step s':>8}"
              f"{'dequant s':>11}{'peak RSS':>12}{'of fp32':>9}")
        for name, d in dirs.items():
            y = np.load(root / f"{name}.npy")
            rel_max = np.abs(y - ref).max() / np.abs(ref).max()
            rel_rms = np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref ** 2))
            r = rows[name]
            deq = "-" if r["dequant_s"] is None else f"{r['dequant_s']:.2f}"
            print(f"{name:<10}{size_of(d) / size_of(src):>8.3f}x{rel_max:>13.2e}{rel_rms:>13.2e}{r['load_s']:>8.1f}"
                  f"{r['step_s']:>8.1f}{deq:>11}{r['peak_rss_gib']:>8.2f} GiB"
                  f"{r['peak_rss_gib'] / rows['float32']['peak_rss_gib']:>8.2f}x")
    finally:
        if created and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        step(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["default", "karlo"])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--group-size", type=int, default=32, help="32 (the default of d2.quantize), 64 or 128")
    p.add_argument("--all-layers", action="store_true", help="quantise the layers outside the blocks too")
    p.add_argument("--dir", default="/tmp/karlo-decoder-quantize")
    p.add_argument("--keep", action="store_true", help="keep --dir (the float and quantised decoders)")
    args = p.parse_args()
    default(args) if args.what == "default" else karlo(args)


if __name__ == "__main__":
    main()
