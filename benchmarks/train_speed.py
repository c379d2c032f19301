"""Training throughput and peak memory of one optimiser step of Karlo's decoder UNet: our train_step on each
backend against diffusers' own UNet2DConditionModel + torch.optim.AdamW, same weights, same batch, same run.

    python benchmarks/train_speed.py [--size small|karlo] [--batch 4] [--steps 4] [--repeat 2] [--width 1]
                                     [--device cpu] [--backends torch,mlx] [--hybrid] [--profile] [--workdir DIR]
                                     [--variants gc,bf16,gc+bf16,lora,lora+gc] [--no-full]

The model is benchmarks/generate_speed.py's SMALL["decoder"] (Karlo's block types: ResnetDownsampleBlock2D +
SimpleCrossAttn blocks, scale_shift, identity class embedding, 6 output channels for the learned variance; 64 px,
widths 64-256), fp32; --width scales its channels (multiples of 32). diffusers builds it once (its init plus
N(0, 0.005), as generate_speed.py) and its state_dict is saved with safetensors; every row loads those weights.
All inputs are drawn once in NumPy (seed 0) and saved: x0, noise, timesteps, x_t = sqrt(abar) x0 +
sqrt(1 - abar) noise, 81 context tokens (4 extra + 77 text, as Karlo's text_proj gives) with a padding mask,
the additive time embedding, and `UnCLIPSchedule.training_terms(t)`. Every step sees the same batch.

Rows, each in its own process (one framework per process, as the other benchmarks):
  diffusers   the peer: UNet2DConditionModel(x_t, t, encoder_hidden_states, class_labels, attention_mask);
              loss = MSE(out[:, :3], noise); backward; clip_grad_norm_(1.0); AdamW.step; zero_grad
  torch, mlx  ours: backend.build("unet2d_condition", UNet2DConditionConfig.from_hf_config(diffusers config)),
              backend.load_weights, backend.train_step(module, loss, AdamW(lr=1e-4)) with the same epsilon MSE
              written over the facade (train/losses.py `mse`)
  --hybrid    adds ours with the hybrid objective (epsilon MSE + `variational_bound`); the peer has no such
              loss, so those rows are compared with our torch hybrid row, and their ratio is to the peer's MSE step
Each row runs 2 warm-up steps, then --repeat times --steps steps; the time per step is the best repeat's mean.
Peak RSS is the row process's ru_maxrss (model, optimiser state, activations); "of which loading" is its value
before the first step (the weights loaded, and for the lora rows adapted and cast). The first warm-up step's loss is
printed with its relative difference to the peer's (same weights, same batch: they must agree to ~1e-5), and
the last timed step's loss (after the same 2 + repeat x steps updates: a check that the AdamW steps agree).
On a shared machine pass --threads 1: torch's OpenMP threads wait on each other, and with one of 2 cores taken by
another process a 2-thread forward of this UNet (--width 0.5, batch 2) took 6 s, 1 thread 0.2 s.
--profile also splits the torch rows' step into forward + loss, backward, clip + AdamW (median over --steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from generate_speed import SMALL  # noqa: E402

TOKENS, EXTRA = 81, 4  # Karlo's decoder context: 4 text_proj tokens + 77 text tokens
LR, CLIP, WARMUP = 1e-4, 1.0, 2
LORA_RANK = 16  # the lora variants: rank 16, alpha 16, on every attention projection (PEFT's target names)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def decoder_sizes(size: str, width: float) -> dict:
    """diffusers UNet2DConditionModel kwargs: generate_speed's SMALL decoder or Karlo's (tests/builders.py)."""
    if size == "karlo":
        sys.path.insert(0, str(HERE.parent / "tests"))
        from builders import KARLO

        sizes = dict(KARLO["decoder"])
    else:
        sizes = dict(SMALL["decoder"])
    step = max(32, sizes.get("attention_head_dim", 32))  # channels divide into whole heads
    sizes["block_out_channels"] = tuple(max(step, int(round(c * width / step)) * step)
                                        for c in sizes["block_out_channels"])
    return sizes


def build(root: Path, size: str, batch: int, width: float) -> None:
    """diffusers' decoder (weights, config) and the one NumPy batch, written into root."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from dalle2_portable.modules.unet import decoder_attention_mask
    from dalle2_portable.schedule import UnCLIPSchedule
    from dalle2_portable.spec import SchedulerConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**decoder_sizes(size, width))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.005 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(root / "decoder.safetensors"))
    (root / "config.json").write_text(json.dumps(dict(unet.config), default=list))

    rng = np.random.default_rng(0)
    px, temb = unet.config.sample_size, unet.config.block_out_channels[0] * 4
    schedule = UnCLIPSchedule(SchedulerConfig(variance_type="learned_range", clip_sample=False))
    x0 = np.clip(rng.standard_normal((batch, 3, px, px)) * 0.5, -1, 1).astype(np.float32)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int64)
    terms = schedule.training_terms(t)
    x_t = (terms["sqrt_alphas_cumprod"][:, None, None, None] * x0
           + terms["sqrt_one_minus_alphas_cumprod"][:, None, None, None] * noise).astype(np.float32)
    keep = np.arange(TOKENS)[None] < EXTRA + rng.integers(5, TOKENS - EXTRA, batch)[:, None]  # prompt padding
    np.savez(root / "batch.npz", x0=x0, noise=noise, t=t, x_t=x_t, keep=keep,
             mask=decoder_attention_mask(keep),
             context=rng.standard_normal((batch, TOKENS, unet.config.cross_attention_dim), dtype=np.float32),
             time_embedding=rng.standard_normal((batch, temb), dtype=np.float32),
             **{f"terms.{k}": v for k, v in terms.items()})


def eps_loss(F, unet, x_t, t, context, time_embedding, mask, x0, noise, terms):
    """The epsilon objective: MSE of the predicted noise (the first 3 of the 6 output channels)."""
    from dalle2_portable.train import losses

    return losses.mse(F, unet(x_t, t, context, time_embedding, mask)[:, :3], noise)


def hybrid_loss(F, unet, x_t, t, context, time_embedding, mask, x0, noise, terms):
    """improved DDPM's hybrid objective (tests/test_losses.py `decoder_loss`): epsilon MSE + L_vlb."""
    from dalle2_portable.train import losses

    out = unet(x_t, t, context, time_embedding, mask)
    return losses.mse(F, out[:, :3], noise) + F.mean(losses.variational_bound(F, out, x0, x_t, t, terms))


def worker(row: str, root: Path, device: str, steps: int, repeat: int, profile: bool, threads: int) -> dict:
    if threads and not row.startswith("mlx"):
        import torch

        torch.set_num_threads(threads)
    d = dict(np.load(root / "batch.npz"))
    terms = {k[6:]: d.pop(k) for k in list(d) if k.startswith("terms.")}
    kind, objective = row.split(":")
    objective, *mods = objective.split("+")  # +gc: gradient checkpointing, +bf16: bfloat16 autocast / compute
    phases = None
    if kind == "diffusers":
        import torch
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file

        config = json.loads((root / "config.json").read_text())
        with torch.device("meta"):  # diffusers' low_cpu_mem_usage loading: no random init to throw away
            unet = UNet2DConditionModel.from_config(config)
        unet.load_state_dict(load_file(str(root / "decoder.safetensors"), device=device), strict=True, assign=True)
        unet.train()
        if "gc" in mods:
            unet.enable_gradient_checkpointing()
        if "lora" in mods:  # PEFT's adapter on the attention projections; add_adapter freezes the rest
            from peft import LoraConfig

            if "bf16" in mods:  # diffusers' LoRA scripts: the frozen base in bf16, the adapters float32
                unet.to(torch.bfloat16)
            unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS))
            for p in unet.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
        names = ("x_t", "t", "context", "time_embedding", "keep", "noise")

        def forward():
            x_t, t, ctx, temb, keep, noise = (torch.from_numpy(d[k]).to(device) for k in names)
            with torch.autocast(device.split(":")[0], torch.bfloat16, enabled="bf16" in mods):
                out = unet(x_t, t, encoder_hidden_states=ctx, class_labels=temb, attention_mask=keep).sample
            return torch.nn.functional.mse_loss(out[:, :3].float(), noise)

        def update():
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)

        def step():
            loss = forward()
            loss.backward()
            update()
            return float(loss.detach())

        if profile:
            phases = (forward, lambda loss: loss.backward(), update)
    else:
        from dalle2_portable.backends import get_backend
        from dalle2_portable.modules import gradient_checkpointing
        from dalle2_portable.spec import UNet2DConditionConfig
        from dalle2_portable.train.optim import AdamW

        backend = get_backend(kind, device=None if kind == "mlx" else device)
        config = UNet2DConditionConfig.from_hf_config(json.loads((root / "config.json").read_text()))
        held = "bfloat16" if "lora" in mods and "bf16" in mods else None  # as train/loop.py: the base in bf16
        unet = backend.load_component("unet2d_condition", config, str(root / "decoder.safetensors"), held)
        loss_fn = dict(eps=eps_loss, hybrid=hybrid_loss)[objective]
        frozen = ()
        if "lora" in mods:  # the same adapter, B zero as PEFT's; every other weight frozen
            from dalle2_portable.modules.lora import DEFAULT_TARGETS

            backend.add_lora(unet, LORA_RANK, LORA_RANK, DEFAULT_TARGETS)
            frozen = [k for k in backend.weights(unet) if ".lora_" not in k]
        gradient_checkpointing(unet, "gc" in mods)
        train_step = backend.train_step(unet, loss_fn, AdamW(lr=LR, max_grad_norm=CLIP), frozen,
                                        dtype="bfloat16" if "bf16" in mods else "float32")
        inputs = (d["x_t"], d["t"], d["context"], d["time_embedding"], d["mask"], d["x0"], d["noise"], terms)

        def step():
            return train_step(*inputs, lr=LR)

        if profile and kind == "torch":  # TorchTrainStep's body, phase by phase
            import torch

            def forward():
                train_step.optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    return loss_fn(backend.facade, unet, *backend.arrays(inputs))

            def update():
                torch.nn.utils.clip_grad_norm_(list(train_step.params.values()), CLIP)
                train_step.optimizer.step()

            phases = (forward, lambda loss: loss.backward(), update)

    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the peak before any step
    first = [step() for _ in range(WARMUP)][0]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(steps):
            last = step()
        best = min(best, (time.perf_counter() - t0) / steps)
    out = dict(step=best, first_loss=first, last_loss=last, loaded_rss=loaded,
               rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    if kind == "mlx":
        from dalle2_portable.backends import mlx as mlx_backend

        out["blas"] = "OpenBLAS" if mlx_backend.OPENBLAS_LOADED else "bundled BLAS"
    if phases:
        import torch

        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        forward, backward, update = phases
        split = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            loss = forward()
            sync()
            t1 = time.perf_counter()
            backward(loss)
            sync()
            t2 = time.perf_counter()
            update()
            sync()
            split.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
        out["phases"] = [statistics.median(x) for x in zip(*split)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--size", choices=["small", "karlo"], default="small",
                    help="generate_speed's SMALL decoder, or Karlo's (for a GPU)")
    ap.add_argument("--width", type=float, default=1.0, help="scale the decoder's channels by this")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (MLX uses its default device)")
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--hybrid", action="store_true", help="also time ours with epsilon MSE + variational bound")
    ap.add_argument("--profile", action="store_true", help="split the torch rows' step into its phases")
    ap.add_argument("--variants", default="", help="also rows with these, comma-separated: gc (gradient "
                    "checkpointing; the peer's enable_gradient_checkpointing), bf16 (mixed precision; the peer "
                    "under torch.autocast), lora (rank-16 adapters trained alone; the peer: PEFT's add_adapter), "
                    "and combinations such as gc+bf16, lora+gc")
    ap.add_argument("--no-full", action="store_true", help="no full fine-tuning rows, only --variants' (at "
                    "Karlo size a full step's AdamW state alone is 7 GB)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads per row (torch, OpenMP, OpenBLAS); 0: the frameworks' defaults")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="d2_train_")) / f"{args.size}_w{args.width:g}_b{args.batch}"
    if args.worker == "build":
        build(root, args.size, args.batch, args.width)
        return
    if args.worker:
        print(json.dumps(worker(args.worker, root, args.device, args.steps, args.repeat, args.profile,
                                 args.threads)))
        return
    env = dict(os.environ)
    if args.threads:
        env.update({k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    cmd = [sys.executable, __file__, "--size", args.size, "--batch", str(args.batch), "--width", str(args.width),
           "--steps", str(args.steps), "--repeat", str(args.repeat), "--device", args.device,
           "--threads", str(args.threads), "--workdir", str(root.parent)] + (["--profile"] if args.profile else [])
    if not (root / "batch.npz").exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"building the decoder and the batch in {root} ...", file=sys.stderr)
        subprocess.run(cmd + ["--worker", "build"], check=True, env=env)
    backends = args.backends.split(",")
    rows = [] if args.no_full else ["diffusers:eps", *(f"{b}:eps" for b in backends)]
    rows += [f"{b}:hybrid" for b in backends] if args.hybrid else []
    for v in filter(None, args.variants.split(",")):
        rows += [f"diffusers:eps+{v}", *(f"{b}:eps+{v}" for b in backends)]
    results = {}
    for row in rows:
        print(f"timing {row} ...", file=sys.stderr)
        r = subprocess.run(cmd + ["--worker", row], capture_output=True, text=True, env=env)
        if r.returncode:
            print(f"{row} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        results[row] = json.loads(r.stdout.strip().splitlines()[-1])

    from safetensors import safe_open

    with safe_open(str(root / "decoder.safetensors"), "np") as f:
        total = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    sizes = decoder_sizes(args.size, args.width)
    peer = results.get("diffusers:eps")
    print(f"\n{args.size} Karlo decoder UNet, widths {'/'.join(map(str, sizes['block_out_channels']))}, "
          f"{total:,} parameters, {sizes['sample_size']} px, batch {args.batch}, fp32, device {args.device}, "
          f"{args.threads or 'default'} threads; "
          f"one AdamW step (clip {CLIP}), best of {args.repeat} x {args.steps} steps after {WARMUP} warm-up\n")
    print("| runner | loss | s / step | samples / s | vs diffusers | peak RSS GiB | of which loading | first-step "
          "loss | vs reference | last-step loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row, r in results.items():
        kind, objective = row.split(":")
        objective, *mods = objective.split("+")
        label = "diffusers UNet2DConditionModel + torch AdamW (peer)" if kind == "diffusers" \
            else f"dalle2_portable {kind} train_step" + (f" ({r['blas']})" if "blas" in r else "")
        label += "".join(f", {m}" for m in mods)
        base = results.get("diffusers:" + "+".join(["eps", *mods]), peer)  # each variant against the peer's
        ref = base if objective == "eps" else results.get("torch:hybrid")
        ratio = f"{r['step'] / base['step']:.2f}" if base else "n/a"
        rel = "reference" if ref is r else "n/a" if ref is None else \
            f"{abs(r['first_loss'] - ref['first_loss']) / abs(ref['first_loss']):.1e}"
        name = "eps MSE" if objective == "eps" else "eps MSE + L_vlb"
        print(f"| {label} | {name} | {r['step']:.3f} | {args.batch / r['step']:.2f} | {ratio} | {r['rss']:.2f} | "
              f"{r['loaded_rss']:.2f} | "
              f"{r['first_loss']:.7g} | {rel} | {r['last_loss']:.7g} |")
    if args.hybrid:
        print("\nThe peer has no variational bound: the hybrid rows' reference loss is ours on torch; their ratio "
              "is to the peer's epsilon-MSE step.")
    split = {row: r["phases"] for row, r in results.items() if "phases" in r}
    if split:
        print("\n| runner | forward + loss ms | backward ms | clip + AdamW ms |\n|---|---:|---:|---:|")
        for row, p in split.items():
            print(f"| {row} | " + " | ".join(f"{x * 1000:.0f}" for x in p) + " |")


if __name__ == "__main__":
    main()
