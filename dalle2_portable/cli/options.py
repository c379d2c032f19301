"""What the generation verbs share: model and stage options, output names, the pipeline, saving, and reading
a PNG's metadata back (--config-from-metadata)."""

from __future__ import annotations

import json
import string
import warnings
from pathlib import Path

import click

from ..errors import Dalle2Error, Dalle2Warning
from ..schedule import SAMPLERS
from ..spec import STAGES, PipelineDefaults


BACKENDS = click.Choice(["auto", "torch", "mlx"])
DTYPES = click.Choice(["float32", "float16", "bfloat16"])
KARLO = PipelineDefaults()  # quoted in --help only; the model's own defaults apply


def _output_options(default: str):
    """--output (default `default`) and --num-images, as generate, vary and edit take them."""
    def wrap(f):
        f = click.option("--num-images", "-n", type=click.IntRange(min=1), default=1, show_default=True,
                         help="Images per seed (diffusers: num_images_per_prompt).")(f)
        return click.option("--output", "-o", default=default, show_default=True,
                            help="PNG path; several images are written as NAME-0.png, NAME-1.png, ...; {seed} and "
                            "{i} in it are filled in.")(f)
    return wrap


def _model_options(f):
    """--model --revision --backend --device --dtype --seed --lora --threads --low-memory --quiet --force."""
    for decorator in reversed([
        click.option("--model", "-m", default="default", show_default=True,
                     help="A Hub repo id (converted once, cached), a model directory, a local diffusers folder, "
                     "or `default`: the model packaged with dalle2_portable (a folder named default: ./default)."),
        click.option("--revision", default=None, help="Hub branch, tag or commit (default: main)."),
        click.option("--backend", type=BACKENDS, default="auto", show_default=True,
                     help="auto = MLX on Apple Silicon, else PyTorch."),
        click.option("--device", default=None, help="e.g. cuda, cuda:1, cpu, mps, gpu (default: the best there)."),
        click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Compute dtype."),
        click.option("--seed", type=click.IntRange(min=0), multiple=True, default=(0,), show_default=True,
                     help="Seed of the one NumPy noise stream: the same image on every backend. Give it several "
                     "times for one set of images per seed."),
        click.option("--lora", multiple=True, help="A LoRA adapter merged into the model: a safetensors file in "
                     "the diffusers, PEFT or kohya dialect (or a folder holding one), FILE:SCALE for a strength other "
                     "than 1. Repeatable: the adapters add up."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads of the PyTorch backend (default: PyTorch's, all cores)."),
        click.option("--low-memory", is_flag=True, help="Load each stage's weights when it runs and drop them "
                     "after: the peak is the largest stage's, not the whole model's (Karlo on a 16 GB machine); "
                     "the same images, a little more time."),
        click.option("--quiet", is_flag=True, help="No progress bars and no list of written files."),
        click.option("--force", is_flag=True, help="Overwrite existing output files (otherwise they are an error, "
                     "checked before any work starts)."),
    ]):
        f = decorator(f)
    return f


def _stage_option(stage: str, option: str, karlo):
    """The click option --{stage}-{option} (default None: the model's), its help quoting Karlo's value."""
    flag = stage.replace("_", "-")
    if option == "steps":
        kind, text = click.IntRange(min=2), f"{flag} steps (default: the model's; Karlo {karlo})."
    elif option == "guidance":
        kind, text = float, f"{flag} classifier-free guidance scale (default: the model's; Karlo {karlo:g}; 1 = off)."
    else:
        kind, text = click.Choice(SAMPLERS), (f"{flag} sampler (default: the model's; Karlo {karlo}): ancestral is "
                                              "the reference, ddim deterministic DDIM, dpm++2m DPM-Solver++(2M) "
                                              "(diffusers' DPMSolverMultistepScheduler): the one for few steps, "
                                              "e.g. 10.")
    return click.option(f"--{flag}-{option}", f"{stage}_{option}", type=kind, default=None, help=text)


def _stage_options(stages):
    """The options of the named stages, as PipelineDefaults has them: --{stage}-steps and --{stage}-sampler for
    each, --{stage}-guidance for the prior and the decoder (the super-res stage has no guidance); and the
    shorthands mflux and diffusers users bring: --steps (the prior's and the decoder's) and --guidance (the
    decoder's, which shapes the picture)."""
    tuned = [s for s in stages if s != "super_res"]
    shorthands = [
        click.option("--steps", "steps", type=click.IntRange(min=2), default=None,
                     help=f"Steps of the {' and the '.join(tuned)} (a --{{stage}}-steps option wins)."),
        click.option("--guidance", "guidance", type=float, default=None,
                     help="The decoder's guidance scale (--decoder-guidance wins)."),
    ]

    def wrap(f):
        for decorator in reversed(shorthands + [_stage_option(s, k, v) for s in stages
                                                for k, v in KARLO.stage(s).items()]):
            f = decorator(f)
        return f
    return wrap


def _options(stages: dict) -> dict:
    """The stage options the user set (the rest fall back to the model's defaults), --steps and --guidance
    spread over the stages they stand for."""
    stages = dict(stages)
    steps, guidance = stages.pop("steps", None), stages.pop("guidance", None)
    for name in STAGES[:2]:
        if steps is not None and f"{name}_steps" in stages and stages[f"{name}_steps"] is None:
            stages[f"{name}_steps"] = steps
    if guidance is not None and stages.get("decoder_guidance") is None:
        stages["decoder_guidance"] = guidance
    return {k: v for k, v in stages.items() if v is not None}


def _outputs(output: str, n: int, force: bool, suffix: str = ".png", seeds=(0,)) -> dict[int, list[Path]]:
    """{seed: its n paths}. OUT.png for one image; OUT-0.png, OUT-1.png, ... for several; with several seeds
    OUT-s7.png (or OUT-s7-0.png, ...). A name with {seed} and/or {i} is a template instead ("cat-{seed}-{i}.png").
    Checked before any work (the checks every write makes again): an existing file is an error unless --force,
    and so is a missing directory or two images given one name."""
    from ..images import check_output

    path = Path(output)
    if path.suffix.lower() != suffix:
        raise Dalle2Error(f"output {output!r} must end in {suffix}")
    seeds = list(dict.fromkeys(seeds))
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(output) if f is not None}
    except ValueError as e:  # a lone brace
        raise Dalle2Error(f"output {output!r}: not a name template ({e}); write {{{{ and }}}} for braces") from None
    if fields - {"seed", "i"}:
        raise Dalle2Error(f"output {output!r}: a template may hold {{seed}} and {{i}} only, not "
                          f"{{{sorted(fields - {'seed', 'i'})[0]}}}")
    paths = {}
    for seed in seeds:
        if fields:
            paths[seed] = [Path(output.format(seed=seed, i=i)) for i in range(n)]
        else:
            stem = path.stem if len(seeds) == 1 else f"{path.stem}-s{seed}"
            paths[seed] = ([path.with_name(stem + suffix)] if n == 1 else
                           [path.with_name(f"{stem}-{i}{suffix}") for i in range(n)])
    every = [p for ps in paths.values() for p in ps]
    if len(set(every)) < len(every):
        raise Dalle2Error(f"output {output!r} names two images the same; add {{i}}" +
                          (" and {seed}" if len(seeds) > 1 else "") + " to the template")
    for p in every:
        check_output(p, force, suffix)
    return paths


def _pipeline(model, revision, backend, device, dtype, quiet, threads=None, check=None, lora=(), low_memory=False):
    """The pipeline; `check` = (stage names, options): checked against model.json before any weight loads."""
    from ..pipeline import check_options, load_pipeline

    if check is not None:
        model, revision = check_options(model, *check, revision=revision), None
    pipe = load_pipeline(model, backend=backend, device=device, dtype=dtype, revision=revision, progress=not quiet,
                         lora=lora, low_memory=low_memory)
    if threads is not None:
        try:
            pipe.backend.set_threads(threads)
        except Dalle2Error:
            raise Dalle2Error(f"--threads sets PyTorch's CPU threads; the {pipe.backend.name} backend picks its own "
                              "(leave --threads out, or add --backend torch)") from None
    return pipe


def _save(out, paths, force: bool, quiet: bool, extra: dict | None = None) -> None:
    from ..images import save_pngs

    save_pngs(out.images[:len(paths)], paths, [{**out.metadata(i), **(extra or {})} for i in range(len(paths))],
              overwrite=force)  # all or none
    for i, path in enumerate(paths):
        if not quiet:
            score = "" if out.scores is None else f"  (CLIP score {out.scores[i]:.4f})"
            click.echo(f"wrote {path}{score}")


def _from_metadata(png: str) -> dict:
    """What regenerates the one image a `generate` PNG holds, read from its metadata: the call (model directory
    or id, backend, device, dtype, prompt, seed, batch, stage settings) and the image's place in the batch."""
    import dalle2_portable

    from ..images import read_png_metadata

    meta = read_png_metadata(png)
    verb = meta.get("verb")
    if verb not in ("generate", "rerank"):
        raise Dalle2Error(f"{png!r} was not made by `dalle2 generate` (its metadata says verb {verb!r}); "
                          "--config-from-metadata regenerates generate's pictures")
    missing = [k for k in ("prompt", "seed", "num_images", "batch_size", "index", "backend", "dtype") if k not in meta]
    if missing:
        raise Dalle2Error(f"{png!r} lacks {missing[0]!r} in its metadata (made by an earlier version?); it cannot "
                          "be regenerated from it alone")
    if meta["batch_size"] != meta["num_images"]:
        raise Dalle2Error(f"{png!r} came from a call with several prompts; regenerate it from Python with the "
                          "same prompt list")
    model_dir = meta.get("model_dir")
    if model_dir and Path(model_dir).is_dir():
        model = "default" if Path(model_dir) == store_default() else model_dir
    elif meta.get("model") and "/" in meta["model"] and not Path(meta["model"]).is_absolute():
        model = meta["model"]  # a Hub id: converted again if the cache was cleared
    else:
        raise Dalle2Error(f"the model {png!r} was made with ({model_dir or meta.get('model')!r}) is gone; give "
                          "that model back, or regenerate with -m")
    if meta.get("version") != dalle2_portable.__version__:
        warnings.warn(Dalle2Warning(f"{png!r} was made by dalle2_portable {meta.get('version', '(unknown)')}, "
                                    f"this is {dalle2_portable.__version__}: the picture may differ"))
    options = {}
    for stage in STAGES:
        for option in PipelineDefaults.options(stage):
            key = f"{stage}_{option}"
            if key in meta:
                kind = {"steps": int, "guidance": float, "sampler": str}[option]
                options[key] = kind(meta[key])
    index = int(meta["candidate"] if verb == "rerank" else meta["index"])
    return {"model": model, "revision": meta.get("revision") if model == meta.get("model") else None,
            "backend": meta["backend"], "device": meta.get("device"), "dtype": meta["dtype"],
            "prompt": meta["prompt"], "seed": int(meta["seed"]), "num_images": int(meta["num_images"]),
            "index": index, "options": options, "lora": [tuple(x) for x in json.loads(meta.get("lora", "[]"))]}


def store_default() -> Path:
    from ..store import DEFAULT_MODEL_DIR

    return Path(DEFAULT_MODEL_DIR).absolute()
