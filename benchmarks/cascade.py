"""Karlo's cascade stage by stage: time, FLOP/s and peak memory of ours (PyTorch, MLX) against diffusers /
transformers on the same weights, in the same run; and the whole cascade's peak memory per configuration.

    python benchmarks/cascade.py                       # Karlo size (3.4 B parameters, random weights), CPU
    python benchmarks/cascade.py --small               # generate_speed.py's SMALL sizes, a quick check
    python benchmarks/cascade.py --stages prior,decoder --rows peer,torch       # one cell or a few
    python benchmarks/cascade.py --device cuda --dtype float16                  # a GPU machine

The model: Karlo's architectures (tests/builders.py KARLO, from reference/karlo-v1-alpha.md; or --small) with
random weights, written once by diffusers' `UnCLIPPipeline.save_pretrained` (generate_speed.py's BUILD: diffusers'
init plus N(0, 0.005)) and converted by `d2.convert` into --workdir (default /tmp/cascade-<size>; 27 GB at Karlo
size, built in ~2 minutes), reused when it is there. Each side loads its own copy from disk (read once before each
row, so both load from the page cache), so load time is measured too.

Stages (--stages), each timed in its own process per contender (one framework per process, as the other
benchmarks):
  text       one encode of a batch-1 prompt (tokenise + CLIP text tower)
  prior      one prior step with guidance (batch 2: uncond + cond), the second of 25 timesteps
  decoder    one decoder step with guidance (batch 2, 64 x 64, learned variance), the second of 25 timesteps
  super_res  one super_res_first step (batch 1, 256 x 256), the second of 7 timesteps
A step is what the sampling loop does per step: the model call, the guidance arithmetic, the scheduler's step with
its noise draw. Contenders (--rows):
  peer       the same modules from the diffusers-saved folder (`from_pretrained`, eval, no_grad), called as
             `UnCLIPPipeline.__call__` calls them, with its `UnCLIPScheduler`s
  torch, mlx ours: the stage's component loaded as `d2.load_pipeline` loads it (`store.validate`,
             `backend.load_component`), called through `backend.run` with NumPy in and out, as sampling.py does
             (MLX rows are left out where MLX is not installed; MLX uses its default device)
Each process loads its component ("load s"; "of which loading" is the peak RSS before the first call), makes one
warm-up call ("first call s": MLX's lazy arrays and memory-mapped torch weights finish loading there), then times
--repeat calls (--super-res-repeat for super-res; 0 reports the warm-up call) and reports the median. GFLOP / call
is counted from the config (benchmarks/flops.py: convolutions, linears, attention matmuls; equal to torch's
FlopCounterMode) as diffusers computes the step; GFLOP/s is that over the median (so where ours skips work, as
the prior does the padding after a 7-token prompt, `prior_text_inputs`, it is diffusers' work per second and can
pass the peak); "of matmul peak" divides it by the best n x n torch matmul
(n = 1024-2048 on a CPU, 2048-8192 on CUDA, best of 5; fp32 or --dtype) on the same device, measured in the same
run. "max diff" is each row's largest difference from the peer's output (the step's guided model output),
relative to the peer's largest magnitude: same weights and inputs must agree (~1e-6 in fp32).

The cascade section (--stages cascade): one whole generation, text -> 256 px at --cascade-steps, each
configuration in its own process, weights loaded by that process: its peak RSS against diffusers'
UnCLIPPipeline holding every component. CASCADE lists the configurations as `d2.load_pipeline` keyword dicts
(fp32, bfloat16, float16, low_memory, MLX, MLX quantised by `d2.quantize`); one whose keywords load_pipeline
does not take is skipped, saying so.

Results: Markdown tables, printed and written with a JSON twin to
benchmarks/results/cascade-<size>-<device>[-<dtype>]-<date>.{md,json}, with the machine (CPU, cores, memory,
versions, commit, matmul peaks). A run that picks cells (--stages, --rows) updates that day's file: the cells it
ran are replaced, the others kept, every command listed (--fresh starts it over).
On a shared machine pass --threads 1 (as train_speed.py): with 2 cores and another process busy, torch's two
OpenMP threads wait on each other and a step can take 5-10x its time.
--small defaults to --repeat 2 (the full run: 3).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (AnonymousPeak, cpu_name, git_commit, memory_gib, mlx_matmul_gflops,  # noqa: E402
                    peak_rss_gib, torch_matmul_gflops, versions)
from flops import clip_text_flops, prior_flops, unet_flops  # noqa: E402
from generate_speed import BUILD  # noqa: E402

STAGES = ("text", "prior", "decoder", "super_res")
ROWS = ("peer", "torch", "mlx")
LABELS = {"peer": "diffusers / transformers (peer)", "torch": "ours, PyTorch", "mlx": "ours, MLX"}
PROMPT = "a corgi in a spacesuit"
GUIDANCE = {"prior": 4.0, "decoder": 8.0}  # UnCLIPPipeline's defaults
STEPS = {"prior": 25, "decoder": 25, "super_res": 7}  # the schedule a timed step belongs to (Karlo's defaults)
# the few-step schedule the image-time table composes for ours: dpm++2m on every stage (README "Fewer steps")
FEW_STEPS = {"prior": 10, "decoder": 10, "super_res": 3}
COMPONENT = {"text": "text_encoder", "prior": "prior", "decoder": "decoder", "super_res": "super_res_first"}
CONTEXT_EXTRA = 4  # text_proj's image tokens ahead of the 77 text tokens in the decoder's context

# The whole-cascade configurations: (runner, keyword arguments). runner "peer" is diffusers' UnCLIPPipeline
# (kwargs: torch_dtype), "ours" d2.load_pipeline (kwargs as it takes them). Both get --device (torch) and --dtype
# unless the entry says otherwise; "quantize": N loads the model d2.quantize wrote at N bits (made once in the
# workdir). Adding one is one line; a keyword load_pipeline lacks skips the row with a note.
CASCADE = [
    ("peer", {}),
    ("ours", dict(backend="torch")),
    ("ours", dict(backend="torch", dtype="bfloat16")),
    ("ours", dict(backend="torch", dtype="float16")),
    ("ours", dict(backend="torch", low_memory=True)),
    ("ours", dict(backend="torch", low_memory=True, dtype="bfloat16")),
    ("ours", dict(backend="torch", low_memory=True, dtype="float16")),
    ("ours", dict(backend="mlx")),
    ("ours", dict(backend="mlx", low_memory=True)),
    ("ours", dict(backend="mlx", quantize=8)),
    ("ours", dict(backend="mlx", quantize=8, low_memory=True)),
    ("ours", dict(backend="mlx", quantize=4, low_memory=True)),
]


def cascade_config(runner: str, kwargs: dict, device: str, dtype: str) -> dict:
    """The entry's keywords with --device and --dtype filled in where it leaves them out."""
    if runner == "peer":
        return {"torch_dtype": dtype, **kwargs}
    out = {"backend": "torch", "dtype": dtype, **kwargs}
    if out["backend"] == "torch":
        out.setdefault("device", device)
    return out


def cascade_label(runner: str, config: dict) -> str:
    if runner == "peer":
        return "diffusers UnCLIPPipeline" + (f", {config['torch_dtype']}" if config["torch_dtype"] != "float32" else "")
    words = [f"ours, {config['backend']}"] + ([config["dtype"]] if config["dtype"] != "float32" else [])
    words += [f"{config['quantize']}-bit"] if config.get("quantize") else []
    words += [f"{k}={v!r}" for k, v in config.items() if k not in ("backend", "device", "dtype", "quantize")]
    return ", ".join(words)


def cascade_backend(runner: str, config: dict) -> str:
    return "peer" if runner == "peer" else config["backend"]


# -- the workers (each runs in its own process) ---------------------------------------------------------------

def load_ours(root: Path, stage: str, row: str, device: str, dtype: str):
    """The stage's component as Pipeline / CLIP load it: validated against the spec, then residency.load_module."""
    from dalle2_portable import store
    from dalle2_portable.backends import get_backend
    from dalle2_portable.clip import CLIP
    from dalle2_portable.residency import load_module

    backend = get_backend(row, device=None if row == "mlx" else device, dtype=dtype)
    model_dir = root / "converted"
    spec = store.read_spec(model_dir)
    if stage == "text":
        return backend, CLIP(model_dir, backend, spec)
    name = COMPONENT[stage]
    store.validate(model_dir, spec, backend.parameter_shapes, [name])
    return backend, load_module(backend, model_dir, spec, name)


def load_peer(root: Path, stage: str, device: str, dtype: str):
    """The stage's module as UnCLIPPipeline.from_pretrained loads it, and its scheduler."""
    import torch

    dt, src = getattr(torch, dtype), str(root / "src")
    if stage == "text":
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        model = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder", dtype=dt)
        return model.to(device).eval(), CLIPTokenizer.from_pretrained(src, subfolder="tokenizer")
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel

    cls = dict(prior=PriorTransformer, decoder=UNet2DConditionModel, super_res=UNet2DModel)[stage]
    model = cls.from_pretrained(src, subfolder=COMPONENT[stage], torch_dtype=dt).to(device).eval()
    scheduler = UnCLIPScheduler.from_pretrained(src, subfolder=f"{stage}_scheduler")
    scheduler.set_timesteps(STEPS[stage], device=device)
    return model, scheduler


def stage_inputs(spec, stage: str) -> dict[str, np.ndarray]:
    """The step's inputs, drawn once in NumPy (seed 0): the same for every contender."""
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    mask = np.zeros((2, 77), bool)  # uncond ("": BOS, EOS) then cond (a 7-token prompt)
    mask[0, :2] = mask[1, :9] = True
    if stage == "prior":
        cfg = spec.components["prior"].config
        return dict(x=normal(1, cfg.clip_embed_dim), embeds=normal(2, cfg.embedding_proj_dim),
                    states=normal(2, cfg.num_embeddings, cfg.embedding_dim), mask=mask,
                    noise=normal(1, cfg.clip_embed_dim))
    if stage == "decoder":
        cfg = spec.components["decoder"].config
        size = cfg.sample_size
        context_mask = np.pad(mask, ((0, 0), (CONTEXT_EXTRA, 0)), constant_values=True)
        return dict(x=normal(1, cfg.in_channels, size, size), noise=normal(1, cfg.in_channels, size, size),
                    context=normal(2, CONTEXT_EXTRA + 77, cfg.cross_attention_dim),
                    time=normal(2, cfg.time_embed_dim), mask=context_mask)
    cfg = spec.components["super_res_first"].config
    size, c = cfg.sample_size, cfg.in_channels // 2
    return dict(x=normal(1, c, size, size), noise=normal(1, c, size, size),
                up=np.clip(normal(1, c, size, size) * 0.5, -1, 1))


def ours_step(stage: str, backend, module, spec, d: dict):
    """step() -> the guided model output, doing what sampling.py's loop does per step."""
    from dalle2_portable.modules.prior import prior_text_inputs
    from dalle2_portable.modules.unet import decoder_attention_mask
    from dalle2_portable.sampling import guide
    from dalle2_portable.schedule import UnCLIPSchedule

    if stage == "text":
        return lambda: module.text_condition([PROMPT]).embeds
    schedule = UnCLIPSchedule(spec.schedulers[stage])
    timesteps = schedule.timesteps(STEPS[stage])
    t, prev = int(timesteps[1]), schedule.previous(timesteps, 1)
    x, noise = d["x"], d["noise"]
    if stage == "prior":
        states, mask = prior_text_inputs(d["states"], d["mask"])  # once per sampling call, as in sample_prior

        def predict():
            (pred,) = backend.run(module, np.concatenate([x, x]), np.int64(t), d["embeds"], states, mask)
            return guide(*np.split(pred, 2), GUIDANCE["prior"])
    elif stage == "decoder":
        mask, c = decoder_attention_mask(d["mask"]), x.shape[1]

        def predict():
            (out,) = backend.run(module, np.concatenate([x, x]), np.int64(t), d["context"], d["time"], mask)
            uncond, cond = np.split(out, 2)
            return np.concatenate([guide(uncond[:, :c], cond[:, :c], GUIDANCE["decoder"]), cond[:, c:]], axis=1)
    else:
        def predict():
            (out,) = backend.run(module, np.concatenate([x, d["up"]], axis=1), np.int64(t))
            return out

    def step():
        out = predict()
        schedule.sample_step("ancestral", out, t, x, prev, noise.copy())
        return out

    return step


def peer_step(stage: str, model, helper, device: str, dtype: str, d: dict):
    """step() -> the guided model output, as UnCLIPPipeline.__call__ does it (the scheduler's step included)."""
    import torch

    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    f = {k: torch.from_numpy(v).to(device, dt if v.dtype == np.float32 else None) for k, v in d.items()}

    if stage == "text":
        def step():
            ids = helper([PROMPT], padding="max_length", max_length=helper.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
            out = model(ids.to(device)).text_embeds
            sync()
            return out
        return step
    scheduler = helper
    t, prev = scheduler.timesteps[1], scheduler.timesteps[2]
    x = f["x"]

    def step():
        if stage == "prior":
            pred = model(torch.cat([x] * 2), timestep=t, proj_embedding=f["embeds"],
                         encoder_hidden_states=f["states"], attention_mask=f["mask"]).predicted_image_embedding
            uncond, cond = pred.chunk(2)
            out = uncond + GUIDANCE["prior"] * (cond - uncond)
            scheduler.step(out, timestep=t, sample=x, prev_timestep=prev)
        elif stage == "decoder":
            pred = model(sample=torch.cat([x] * 2), timestep=t, encoder_hidden_states=f["context"],
                         class_labels=f["time"], attention_mask=f["mask"]).sample
            uncond, cond = pred.chunk(2)
            uncond, _ = uncond.split(x.shape[1], dim=1)
            cond, variance = cond.split(x.shape[1], dim=1)
            out = torch.cat([uncond + GUIDANCE["decoder"] * (cond - uncond), variance], dim=1)
            scheduler.step(out, t, x, prev_timestep=prev)
        else:
            out = model(sample=torch.cat([x, f["up"]], dim=1), timestep=t).sample
            scheduler.step(out, t, x, prev_timestep=prev)
        sync()
        return out

    return step


def stage_worker(args, stage: str, row: str) -> dict:
    from dalle2_portable import store

    root = Path(args.workdir)
    spec = store.read_spec(root / "converted")
    d = stage_inputs(spec, stage) if stage != "text" else {}
    t0 = time.perf_counter()
    if row == "peer":
        import torch

        torch.set_grad_enabled(False)  # UnCLIPPipeline.__call__ runs under torch.no_grad()
        model, helper = load_peer(root, stage, args.device, args.dtype)
        step = peer_step(stage, model, helper, args.device, args.dtype, d)
    else:
        backend, module = load_ours(root, stage, row, args.device, args.dtype)
        step = ours_step(stage, backend, module, spec, d)
    load = time.perf_counter() - t0
    loaded_rss = peak_rss_gib()
    t = time.perf_counter()
    out = step()  # the warm-up, and the output the rows are compared by
    first = time.perf_counter() - t
    out = np.asarray(out.float().cpu().numpy() if hasattr(out, "cpu") else out, np.float32)
    np.save(root / "outputs" / f"{stage}-{row}.npy", out)
    repeat = args.super_res_repeat if stage == "super_res" else args.repeat
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    result = dict(load=load, first=first, loaded_rss=loaded_rss, rss=peak_rss_gib(), times=times,
                  median=statistics.median(times or [first]))  # --repeat 0: the first call's time
    result.update(device_memory(row, args.device))
    if row == "mlx":
        from dalle2_portable.backends import mlx as mlx_backend

        result["blas"] = "OpenBLAS" if mlx_backend.OPENBLAS_LOADED else "bundled BLAS"
    return result


def device_memory(row: str, device: str) -> dict:
    """The accelerator's peak allocation (torch on CUDA; MLX on a GPU), where there is one."""
    if row == "mlx":
        import mlx.core as mx

        if "gpu" in str(mx.default_device()).lower():
            return {"device_peak": mx.get_peak_memory() / 2**30}
    elif device.startswith("cuda"):
        import torch

        return {"device_peak": torch.cuda.max_memory_allocated() / 2**30}
    return {}


def cascade_worker(args, index: int) -> dict:
    """One whole generation with CASCADE[index], the weights loaded in this process."""
    anon = AnonymousPeak()
    runner, config = CASCADE[index]
    config = cascade_config(runner, config, args.device, args.dtype)
    root = Path(args.workdir)
    steps = [int(s) for s in args.cascade_steps.split(",")]
    t0 = time.perf_counter()
    if runner == "peer":
        import torch
        from diffusers import UnCLIPPipeline

        dtype = getattr(torch, config["torch_dtype"])
        pipe = UnCLIPPipeline.from_pretrained(str(root / "src"), torch_dtype=dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        load, loaded_rss = time.perf_counter() - t0, peak_rss_gib()
        t1 = time.perf_counter()
        image = pipe(PROMPT, prior_num_inference_steps=steps[0], decoder_num_inference_steps=steps[1],
                     super_res_num_inference_steps=steps[2], generator=torch.Generator().manual_seed(0),
                     output_type="np").images
    else:
        import dalle2_portable as d2

        bits = config.pop("quantize", None)
        model = root / (f"converted-q{bits}" if bits else "converted")
        pipe = d2.load_pipeline(str(model), **config)
        load, loaded_rss = time.perf_counter() - t0, peak_rss_gib()
        t1 = time.perf_counter()
        try:
            image = pipe.generate(PROMPT, seed=0, prior_steps=steps[0], decoder_steps=steps[1],
                                  super_res_steps=steps[2]).samples
        except d2.Dalle2Error as e:  # e.g. random weights gone non-finite in float16: the peak so far, flagged
            image, failed = None, str(e)
    result = dict(load=load, generate=time.perf_counter() - t1, loaded_rss=loaded_rss, rss=peak_rss_gib(),
                  size=None if image is None else int(np.shape(image)[-2]), steps=args.cascade_steps,
                  anon=anon.sample())
    if image is None:
        result["generate_error"] = failed
    result.update(device_memory(cascade_backend(runner, config), args.device))
    return result


def quantize_worker(args, bits: int) -> dict:
    """The converted model quantised by d2.quantize (MLX), written once beside it."""
    import dalle2_portable as d2

    root = Path(args.workdir)
    t0 = time.perf_counter()
    d2.quantize(str(root / "converted"), str(root / f"converted-q{bits}"), bits=bits)
    return dict(seconds=time.perf_counter() - t0, rss=peak_rss_gib())


def matmul_worker(args, rows) -> dict:
    out = {"torch": torch_matmul_gflops(args.device, args.dtype)}
    if args.dtype != "float32":
        out["torch_float32"] = torch_matmul_gflops(args.device, "float32")
    if "mlx" in rows:
        out["mlx"] = mlx_matmul_gflops(args.dtype)
    return out


# -- the parent: build, run the rows, tabulate ----------------------------------------------------------------

def build(root: Path, size: str) -> None:
    """Karlo's architectures at `size`, random weights, through diffusers' save_pretrained, then d2.convert."""
    print(f"building the {size} cascade in {root} (once) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    code = BUILD.format(tests=str(HERE.parent / "tests"), here=str(HERE), root=str(root), size=size)
    subprocess.run([sys.executable, "-c", code], check=True)
    (root / "built").write_text(f"{size}\n")
    print(f"  built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def warm_page_cache(paths) -> None:
    """Read files once so that every contender loads from the page cache, not from disk (where RAM allows)."""
    for p in paths:
        for f in sorted(Path(p).rglob("*.safetensors")) if Path(p).is_dir() else [Path(p)]:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_worker(args, task: str, env: dict) -> tuple[dict | None, str | None]:
    cmd = [sys.executable, __file__, "--worker", task, "--workdir", args.workdir, "--device", args.device,
           "--dtype", args.dtype, "--repeat", str(args.repeat), "--super-res-repeat", str(args.super_res_repeat),
           "--cascade-steps", args.cascade_steps, "--rows", args.rows]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    print(f"  {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if r.returncode:
        lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
        return None, lines[-1] if lines else f"exit status {r.returncode}"
    return json.loads(r.stdout.strip().splitlines()[-1]), None


def stage_flops(spec, stage: str) -> int:
    c = spec.components[COMPONENT[stage]].config
    if stage == "text":
        return clip_text_flops(c, 1)
    if stage == "prior":
        return prior_flops(c, 2)
    if stage == "decoder":
        return unet_flops(c, 2, c.sample_size, CONTEXT_EXTRA + 77)
    return unet_flops(c, 1, c.sample_size)


def stage_title(spec, stage: str) -> str:
    if stage == "text":
        return "text encoder (batch 1, 77 tokens)"
    if stage == "prior":
        return "prior step, guided (batch 2)"
    c = spec.components[COMPONENT[stage]].config
    if stage == "decoder":
        return f"decoder step, guided (batch 2, {c.sample_size}x{c.sample_size})"
    return f"super-res step (batch 1, {c.sample_size}x{c.sample_size})"


def machine(args, matmul: dict | None) -> dict:
    info = dict(cpu=cpu_name(), cores=os.cpu_count(), memory_gib=memory_gib(), platform=platform.platform(),
                python=platform.python_version(), device=args.device, dtype=args.dtype,
                versions=versions("torch", "mlx", "diffusers", "transformers", "numpy", "dalle2_portable"),
                commit=git_commit(HERE.parent), matmul=matmul)
    if args.device.startswith("cuda"):
        r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                           capture_output=True, text=True)
        info["gpu"] = r.stdout.strip() or None
    return info


def fmt(x, spec=".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def image_times(stages: dict) -> list[str]:
    """A 256 px image's time composed from the step cells (text + steps x step time per stage): diffusers at
    Karlo's 25/25/7, ours at the same and at FEW_STEPS (a DPM-Solver++ step costs what an ancestral one does: one
    model call, the step's arithmetic on a few arrays in NumPy)."""
    def total(row, steps):
        cells = [stages.get(stage, {}).get(row) for stage in STAGES]
        if not all(c and "median" in c for c in cells):
            return None
        return cells[0]["median"] + sum(steps[st] * c["median"] for st, c in zip(STAGES[1:], cells[1:]))

    peer = total("peer", STEPS)
    if peer is None:
        return []
    few = "/".join(str(FEW_STEPS[s]) for s in STAGES[1:])
    lines = ["A 256 px image, composed from the cells above (text + steps x step s; loading and the loop's own "
             "work left out):", "", "| contender | steps | image s | vs diffusers 25/25/7 |", "|---|---|---:|---:|"]
    for row in ROWS:
        for steps, words in ((STEPS, "25/25/7, Karlo's samplers"), (FEW_STEPS, f"{few}, dpm++2m")):
            t = total(row, steps)
            if t is not None and (row != "peer" or steps is STEPS):
                lines.append(f"| {LABELS[row]} | {words} | {t:.1f} | {t / peer:.2f} |")
    return lines + [""]


def markdown(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    v = m["versions"]
    mm = m.get("matmul") or {}
    lines = [f"# unCLIP cascade, {s['size']} size: ours against diffusers ({s['date']})", ""]
    for run in res.get("runs", [dict(command=s["command"])]):
        lines += [f"`{run['command']}`" + (f" ({run['when']})" if len(res.get("runs", ())) > 1 else ""), ""]
    peak = mm.get("torch", {})
    desc = (f"{m['cpu']}, {m['cores']} cores, {fmt(m['memory_gib'], '.0f')} GiB RAM"
            + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; device {m['device']}, {m['dtype']}; "
            + ", ".join(f"{k} {v[k]}" for k in ("torch", "mlx", "diffusers", "transformers") if v.get(k))
            + (f"; commit {m['commit']}" if m.get("commit") else ""))
    lines.append(desc)
    if peak:
        lines.append(f"torch matmul peak: {peak['gflops']:.0f} GFLOP/s ({peak['dtype']}, n = {peak['n']}, "
                     f"{peak['device']})" + (f"; MLX {mm['mlx']['gflops']:.0f} GFLOP/s ({mm['mlx']['blas']})"
                                             if "mlx" in mm else ""))
    lines.append("")
    stages = res.get("stages", {})
    if stages:
        gpu = any("device_peak" in r for rows in stages.values() for r in rows.values() if isinstance(r, dict))
        lines += ["| stage | contender | load s | first call s | step s (median) | ours / peer | GFLOP / call | "
                  "GFLOP/s | of matmul peak | peak RSS GiB | of which loading | max diff vs peer |"
                  + (" peak GPU GiB |" if gpu else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
        for stage in STAGES:
            rows = stages.get(stage)
            if not rows:
                continue
            peer = rows.get("peer")
            for row in ROWS:
                r = rows.get(row)
                if r is None:
                    continue
                label = LABELS[row] + (f" ({r['blas']})" if r.get("blas") else "")
                if "error" in r:
                    lines.append(f"| {r['title']} | {label} | failed: {r['error'][:150]} |")
                    continue
                ok = peer and "median" in peer
                ratio = "peer" if row == "peer" else fmt(r["median"] / peer["median"]) if ok else "n/a"
                gflops = r["flops"] / r["median"] / 1e9
                of_peak = f"{gflops / r['matmul_gflops']:.0%} of {r['matmul_gflops']:.0f}" \
                    if r.get("matmul_gflops") else "n/a"
                diff = "reference" if row == "peer" else fmt(r.get("max_diff"), ".1e")
                n = f"n={len(r['times'])}" if r["times"] else "first call"
                lines.append(f"| {r['title']} | {label} | {r['load']:.2f} | {r['first']:.3f} | {r['median']:.3f} "
                             f"({n}) | {ratio} | {r['flops'] / 1e9:.4g} | {gflops:.0f} | "
                             f"{of_peak} | {r['rss']:.2f} | {r['loaded_rss']:.2f} | {diff} |"
                             + (f" {fmt(r.get('device_peak'))} |" if gpu else ""))
        lines += ["", "first call: the warm-up call (MLX and memory-mapped weights finish loading there). "
                  "ours / peer: step time ratio (below 1: ours is faster). of matmul peak: achieved FLOP/s over "
                  "the torch matmul's GFLOP/s measured in the same run. max diff: largest difference from the "
                  "peer's guided output, relative to its largest magnitude. Peak RSS: the row's process "
                  "(ru_maxrss); of which loading: before the first call.", ""]
        lines += image_times(stages)
    cascade = res.get("cascade", {})
    if cascade:
        gpu = any("device_peak" in r for r in cascade.values())
        peer = cascade.get(cascade_label("peer", cascade_config("peer", {}, m["device"], m["dtype"])))
        lines += ["Whole cascade, text -> 256 px, each configuration in its own process, weights loaded by it "
                  "(steps: prior/decoder/super-res):", "",
                  "| configuration | steps | load s | generate s | peak RSS GiB | of which loading | peak anonymous GiB"
                  " | RSS / peer |"
                  + (" peak GPU GiB |" if gpu else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
        for label, r in cascade.items():
            if "error" in r or "skipped" in r:
                word = "skipped" if "skipped" in r else "failed"
                lines.append(f"| {label} | {word}: {r.get('skipped') or r['error'][:150]} |")
                continue
            ratio = fmt(r["rss"] / peer["rss"]) if peer and "rss" in peer else "n/a"
            if r.get("generate_error"):
                label += f" (stopped: {r['generate_error'][:120]}; figures up to there)"
            lines.append(f"| {label} | {r.get('steps', '?').replace(',', '/')} | {r['load']:.1f} | "
                         f"{r['generate']:.1f} | {r['rss']:.2f} | {r['loaded_rss']:.2f} | {fmt(r.get('anon'))} | "
                         f"{ratio} |"
                         + (f" {fmt(r.get('device_peak'))} |" if gpu else ""))
        lines += ["", "Peak RSS: ru_maxrss of the configuration's process, memory-mapped weight pages included; of "
                  "which loading: before the generation; peak anonymous: RSS less file-backed pages, sampled every "
                  "20 ms (mapped weights are file-backed: the kernel can drop them under pressure and read them "
                  "again, at a cost in time). RSS / peer: peak RSS over diffusers'.", ""]
    if s.get("note"):
        lines += [s["note"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["karlo", "small"], default="karlo")
    ap.add_argument("--small", action="store_true", help="--size small: generate_speed.py's SMALL sizes")
    ap.add_argument("--device", default="cpu", help="torch device for the peer and our torch rows (cpu, cuda)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--stages", default=",".join(STAGES + ("cascade",)),
                    help="comma-separated: text, prior, decoder, super_res, cascade")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated contenders: peer, torch, mlx")
    ap.add_argument("--configs", default=None, help="cascade: only the configurations whose label holds one of "
                    "these |-separated words (e.g. 'diffusers|torch, low_memory|8-bit, low_memory')")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per row after one warm-up (default 3; "
                    "--small 2); 0 reports the warm-up call itself")
    ap.add_argument("--super-res-repeat", type=int, default=None, help="the same for super-res (default --repeat)")
    ap.add_argument("--cascade-steps", default=None, help="prior,decoder,super-res steps of the cascade section "
                    "(default 2,2,2, the fewest diffusers' UnCLIPScheduler takes)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads per row (OMP, OpenBLAS, MKL); 0: defaults")
    ap.add_argument("--workdir", default=None, help="where the built model lives (default /tmp/cascade-<size>)")
    ap.add_argument("--results", default=str(HERE / "results"), help="where the .md / .json go")
    ap.add_argument("--fresh", action="store_true", help="start today's results file over instead of updating it")
    ap.add_argument("--note", default=None, help="a line written under the tables (e.g. the machine was shared)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.small:
        args.size = "small"
    if args.repeat is None:
        args.repeat = 2 if args.size == "small" else 3
    if args.cascade_steps is None:
        args.cascade_steps = "2,2,2"  # the fewest UnCLIPScheduler takes
    if args.super_res_repeat is None:
        args.super_res_repeat = args.repeat
    if args.workdir is None:
        args.workdir = os.path.join(tempfile.gettempdir(), f"cascade-{args.size}")
    if args.worker:
        kind, _, what = args.worker.partition(":")
        if kind == "stage":
            out = stage_worker(args, *what.split("/"))
        elif kind == "cascade":
            out = cascade_worker(args, int(what))
        elif kind == "quantize":
            out = quantize_worker(args, int(what))
        else:
            out = matmul_worker(args, args.rows.split(","))
        print(json.dumps(out))
        return

    stages = [s.replace("-", "_") for s in args.stages.split(",") if s]
    rows = [r for r in args.rows.split(",") if r]
    for s in stages:
        if s not in STAGES + ("cascade",):
            ap.error(f"unknown stage {s!r}")
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}")
    notes = []
    if "mlx" in rows and importlib.util.find_spec("mlx") is None:
        rows.remove("mlx")
        notes.append("MLX is not installed here: no MLX rows.")
    env = dict(os.environ)
    if args.threads:
        env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    args.rows = ",".join(rows)

    root = Path(args.workdir)
    if not (root / "built").is_file():
        root.mkdir(parents=True, exist_ok=True)
        build(root, args.size)
    (root / "outputs").mkdir(exist_ok=True)
    from dalle2_portable import store

    spec = store.read_spec(root / "converted")
    date = datetime.date.today().isoformat()
    name = f"cascade-{args.size}-{args.device.replace(':', '')}" + \
        (f"-{args.dtype}" if args.dtype != "float32" else "") + f"-{date}"
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    res = {} if args.fresh or not path.exists() else json.loads(path.read_text())
    kept = sum(len(v) for v in res.get("stages", {}).values()) + len(res.get("cascade", {}))

    print("measuring the matmul peak ...", end="", file=sys.stderr, flush=True)
    matmul, err = run_worker(args, "matmul", env)
    if err:
        sys.exit(f"the matmul peak failed: {err}")
    command = "python benchmarks/cascade.py " + shlex.join(sys.argv[1:])
    res["settings"] = dict(size=args.size, date=date, command=command.strip(), repeat=args.repeat,
                           super_res_repeat=args.super_res_repeat, cascade_steps=args.cascade_steps,
                           threads=args.threads or "default", note=" ".join(notes + [args.note or ""]).strip())
    res["machine"] = machine(args, matmul)
    when = datetime.datetime.now().isoformat(timespec="seconds")
    res["runs"] = res.get("runs", []) + [dict(when=when, command=command.strip(), matmul=matmul)]

    for stage in (s for s in STAGES if s in stages):
        flops = stage_flops(spec, stage)
        src, conv = root / "src" / COMPONENT[stage], root / "converted"
        for row in rows:
            print(f"timing {stage} / {row} ...", end="", file=sys.stderr, flush=True)
            warm_page_cache([src] if row == "peer" else [p for p in conv.glob("*.safetensors")
                                                         if p.stem.startswith(COMPONENT[stage])])
            r, err = run_worker(args, f"stage:{stage}/{row}", env)
            peak = matmul["torch"]["gflops"]
            r = dict(r or {"error": err}, title=stage_title(spec, stage), flops=flops, when=when,
                     matmul_gflops=peak)
            res.setdefault("stages", {}).setdefault(stage, {})[row] = r
        peer_out = root / "outputs" / f"{stage}-peer.npy"
        if peer_out.exists():
            ref = np.load(peer_out)
            for row in rows:
                mine = root / "outputs" / f"{stage}-{row}.npy"
                r = res["stages"][stage][row]
                if row != "peer" and mine.exists() and "error" not in r:
                    r["max_diff"] = float(np.abs(np.load(mine) - ref).max() / np.abs(ref).max())

    if "cascade" in stages:
        import dalle2_portable as d2
        from dalle2_portable.backends import DTYPES

        takes = set(inspect.signature(d2.load_pipeline).parameters)
        done = set()
        for i, (runner, entry) in enumerate(CASCADE):
            config = cascade_config(runner, entry, args.device, args.dtype)
            label = cascade_label(runner, config)
            if cascade_backend(runner, config) not in rows or label in done:
                continue
            if args.configs and not any(word in label for word in args.configs.split("|")):
                continue
            done.add(label)
            missing = [k for k in entry if runner == "ours" and k not in takes and k != "quantize"]
            why = (f"load_pipeline has no {missing[0]}=" if missing else
                   f"no dtype {config['dtype']!r}" if config.get("dtype", "float32") not in DTYPES else
                   "this dalle2_portable has no d2.quantize" if "quantize" in entry and not hasattr(d2, "quantize")
                   else None)
            if why:
                res.setdefault("cascade", {})[label] = {"skipped": why, "when": when}
                continue
            bits = entry.get("quantize")
            model = root / (f"converted-q{bits}" if bits else "converted")
            if bits and not (model / "model.json").is_file():
                print(f"quantizing to {bits} bits (once) ...", end="", file=sys.stderr, flush=True)
                r, err = run_worker(args, f"quantize:{bits}", env)
                if err:
                    res.setdefault("cascade", {})[label] = {"error": f"d2.quantize: {err}", "when": when}
                    continue
            print(f"whole cascade: {label} ...", end="", file=sys.stderr, flush=True)
            warm_page_cache([root / "src" if runner == "peer" else model])
            r, err = run_worker(args, f"cascade:{i}", env)
            res.setdefault("cascade", {})[label] = dict(r or {"error": err}, when=when)

    text = markdown(res)
    print("\n" + text)
    path.write_text(json.dumps(res, indent=1) + "\n")
    path.with_suffix(".md").write_text(text)
    print(f"written: {path} and {path.with_suffix('.md').name}" +
          (f" (updated: {kept} earlier cells kept unless rerun; --fresh starts over)" if kept else ""),
          file=sys.stderr)


if __name__ == "__main__":
    main()
