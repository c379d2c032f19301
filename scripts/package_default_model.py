"""Put a model trained by scripts/train_default_model.sh into the package as the default model.

    python scripts/package_default_model.py runs/default [--eval eval.json ...] [--prior-steps 25 ...]

The recipe trains the prior, the decoder and the upsampler side by side, so the model is assembled here:
RUNS/model is RUNS/decoder/model (both CLIP towers, their tokenizer, text_proj, the decoder) with the prior of
RUNS/prior/model, the upsampler of RUNS/sr/model (which must upsample from the decoder's size) and the sampling
defaults it ships with. That
directory is then copied into dalle2_portable/default_model (atomically) with its "about" block (the recipe,
each stage's steps and measured seconds from RUNS/times.txt, the data, and the accuracy table of
`dalle2 eval RUNS/model --json` if given) and the checksums that loading verifies (store.write_spec).
Refuses a model over the 20 MB the package allows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from dalle2_portable import store
from dalle2_portable.spec import COMPONENT_NAMES, Source

LIMIT = 20 * 2**20
STAGES = ("clip", "prior", "decoder", "sr")
# The sampling defaults the model ships with. Measured: guidance hurts the decoder (0.36 joint at 3, 0.76-0.88
# at 1 on the 33 "a {color} {shape}" prompts), and so does the prior's (the grid at seed 0: 0.91 at 2, 0.95 at
# 1, 0.88 at 4); the decoder's ancestral sampler beats DDIM (0.933 vs 0.914 at 3 seeds).
SAMPLING = {"prior_steps": 25, "prior_guidance": 1.0, "prior_sampler": "ancestral", "decoder_steps": 25,
            "decoder_guidance": 1.0, "decoder_sampler": "ancestral", "super_res_steps": 7, "super_res_sampler": "ddim"}


def assemble(decoder: Path, sr: Path, out: Path, defaults: dict, prior: Path | None = None) -> Path:
    """`out`: the decoder's model with the upsampler, the upsampler's scheduler and `defaults` (sampling), and
    the prior of the model `prior` (with its scheduler) when the decoder's model has none."""
    spec, sr_spec = store.read_spec(decoder), store.read_spec(sr)
    low, size = sr_spec.defaults.decoder_sample_size, spec.components["decoder"].config.sample_size
    if low != size:
        raise SystemExit(f"error: {sr} upsamples from {low} px, the decoder in {decoder} makes {size} px; train "
                         f"the upsampler with --low-size {size}")
    parts = {"super_res_first": (sr, sr_spec, "super_res")}
    if prior is not None and "prior" not in spec.components:
        parts["prior"] = (prior, store.read_spec(prior), "prior")
    components, schedulers = dict(spec.components), dict(spec.schedulers)
    with store.atomic_directory(out, overwrite=True) as tmp:
        shutil.copytree(decoder, tmp, dirs_exist_ok=True)
        for name, (folder, part, scheduler) in parts.items():
            components[name] = part.components[name]
            schedulers[scheduler] = part.schedulers[scheduler]
            shutil.copyfile(folder / components[name].weights, tmp / components[name].weights)
        spec = dataclasses.replace(
            spec, components={k: components[k] for k in COMPONENT_NAMES if k in components}, schedulers=schedulers,
            defaults=dataclasses.replace(spec.defaults, **defaults,
                                         super_res_sample_size=sr_spec.defaults.super_res_sample_size))
        store.write_spec(tmp, spec)
    return out


def _rates(results: dict) -> dict:
    """{name: rate} of the results that ran (a check skipped, e.g. edits with no source picture right, has none)."""
    return {k: round(v["rate"], 4) for k, v in results.items() if v["rate"] is not None}


def eval_about(path: Path) -> dict:
    """The `about` entries of a `dalle2 eval --json` report: per backend, the grid's accuracy per phrasing kind
    and the checks' rates, with the seeds they were measured at."""
    about = {}
    for report in json.loads(path.read_text())["reports"]:
        backend = report["backend"]
        for kind, rates in report["accuracy"].items():
            about[f"accuracy.{backend}.{kind}"] = _rates(rates)
        about[f"accuracy.{backend}.checks"] = _rates(report["checks"])
        about[f"accuracy.{backend}.seeds"] = len(report["settings"]["seeds"])
    return about


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path)
    ap.add_argument("--eval", type=Path, action="append", default=[],
                    help="the JSON of `dalle2 eval --json` on this model (repeatable: one per backend, when the "
                    "backends were evaluated in processes of their own)")
    ap.add_argument("--out", type=Path, default=store.DEFAULT_MODEL_DIR)
    for option, default in SAMPLING.items():
        ap.add_argument("--" + option.replace("_", "-"), type=type(default), default=default)
    args = ap.parse_args()
    defaults = {k: getattr(args, k) for k in SAMPLING}
    source = assemble(args.runs / "decoder" / "model", args.runs / "sr" / "model", args.runs / "model", defaults,
                      prior=args.runs / "prior" / "model")
    spec = store.read_spec(source)
    size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    if size > LIMIT:
        raise SystemExit(f"error: {source} is {size / 2**20:.1f} MiB; the package allows 20 MiB")
    about = {"recipe": "bash scripts/train_default_model.sh, then scripts/package_default_model.py"}
    times = {}
    if (args.runs / "times.txt").is_file():
        for line in (args.runs / "times.txt").read_text().splitlines():
            name, seconds = line.split()[:2]
            times[name] = times.get(name, 0) + int(seconds)  # a resumed stage: its parts add up
    for stage in STAGES:
        record = json.loads((args.runs / stage / "run.json").read_text())
        about[f"{stage}.steps"] = record["settings"]["steps"]
        about[f"{stage}.batch_size"] = record["settings"]["batch_size"]
        about[f"{stage}.data"] = record["data"]  # e.g. "shapes (seed 0, 50000 items, generator v3)"
        if stage in times:
            about[f"{stage}.train_seconds"] = times[stage]
    if "all" in times:
        about["recipe.wall_seconds"] = times["all"]  # the script's runs, start to end, added up over resumes
    for path in args.eval:
        about.update(eval_about(path))
    with store.atomic_directory(args.out, overwrite=True) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)  # its model.json is rewritten below
        spec = dataclasses.replace(spec, source=Source("dalle2_portable default", None, "dalle2_portable"))
        store.write_spec(tmp, spec, about=about)
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
