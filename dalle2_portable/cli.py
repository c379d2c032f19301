"""The `dalle2` command line: thin click commands over the public API.

Every user error is a `Dalle2Error` and is printed as one line `error: ...` with exit status 2.
"""

from __future__ import annotations

import logging
import signal
import string
import sys
import warnings
from pathlib import Path

import click

from .errors import Dalle2Error, Dalle2Warning
from .schedule import SAMPLERS
from .spec import STAGES, PipelineDefaults

BACKENDS = click.Choice(["auto", "torch", "mlx"])
DTYPES = click.Choice(["float32", "float16", "bfloat16"])
KARLO = PipelineDefaults()  # quoted in --help only; the model's own defaults apply


def _show_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, Dalle2Warning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


class _Signal(BaseException):
    """SIGTERM or SIGHUP, raised where the process is, so that every `finally` runs (temporary files go)."""


def _on_signal(signum, frame):
    raise _Signal(signum)


class _Group(click.Group):
    def invoke(self, ctx):
        warnings.showwarning = _show_warning  # a Dalle2Warning is one line, like an error
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _on_signal)
        if not logging.getLogger("dalle2_portable").handlers:  # what the library does on the user's behalf
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            logging.getLogger("dalle2_portable").addHandler(handler)
            logging.getLogger("dalle2_portable").setLevel(logging.INFO)
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, _Signal) as e:
            signum = e.args[0] if isinstance(e, _Signal) else signal.SIGINT
            click.echo(f"error: interrupted ({signal.Signals(signum).name}); nothing half-written was left", err=True)
            sys.exit(128 + signum)
        except Dalle2Error as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.UsageError as e:  # a bad option value: one line too, pointing at the command's help
            where = e.ctx.command_path if e.ctx else "dalle2"
            click.echo(f"error: {e.format_message().rstrip('.')}; see `{where} --help`", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dalle2_portable")
def main():
    """DALL-E 2 (unCLIP) on MLX and PyTorch."""


@main.command()
@click.argument("source")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--revision", default=None, help="Hub branch, tag or commit (default: main).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Floating-point type of the written weights.")
@click.option("--variant", default=None, help="Read the source's variant weight files, e.g. fp16 "
              "(*.fp16.safetensors).")
@click.option("--force", "overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is "
              "complete). Every command that writes says --force.")
@click.option("--overwrite", "overwrite", is_flag=True, hidden=True)  # the earlier name, still read
def convert(source, out, revision, dtype, variant, overwrite):
    """Convert SOURCE (a Hub repo id, or a local diffusers unCLIP or transformers CLIP folder) into the model
    directory OUT."""
    from .convert import convert as convert_model
    from .store import count_parameters

    spec = convert_model(source, out, revision=revision, dtype=dtype, overwrite=overwrite, variant=variant)
    counts = count_parameters(out, spec)
    parts = ", ".join(f"{name} {n:,}" for name, (n, _) in counts.items())
    click.echo(f"wrote {out}: {parts} parameters ({dtype})")


@main.group()
def cache():
    """The conversion cache (DALLE2_CACHE, default ~/.cache/dalle2_portable): Hub ids and local folders are
    converted into it once."""


@cache.command("list")
def cache_list():
    """Each converted model (size, age, source, path) and each leftover of an interrupted conversion."""
    from .cache import entries
    from .convert import cache_dir

    found = entries()
    for e in found:
        click.echo(f"{e.size / 1e6:>10,.1f} MB  {e.age_days:6.1f} days  {e.source}  {e.path}")
    total = sum(e.size for e in found) / 1e6
    click.echo(f"{len(found)} entries, {total:,.1f} MB in {cache_dir()}")


@cache.command("clear")
@click.argument("names", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
def cache_clear(names, everything):
    """Remove NAMES (paths or sources as `dalle2 cache list` shows them), or everything with --all. A model
    removed is converted again the next time it is loaded."""
    from .cache import entries, remove, select

    if not names and not everything:
        raise Dalle2Error("say what to remove: entries as `dalle2 cache list` shows them, or --all")
    chosen = entries() if everything else select(list(names))
    freed = remove(chosen)
    click.echo(f"removed {len(chosen)} entries, {freed / 1e6:,.1f} MB")


@main.command()
@click.argument("model", default="default")
@click.option("--revision", default=None, help="Hub revision, when MODEL is a repo id.")
def info(model, revision):
    """Show MODEL's components, parameter counts, dtypes, source, defaults, checksums and the notes of its
    "about" block (MODEL: a Hub repo id, a model directory, or by default the packaged model)."""
    from .convert import resolve_model
    from .store import count_parameters, flat_about, read_about, read_checksums, read_spec

    model_dir = resolve_model(model, revision=revision)
    spec = read_spec(model_dir)
    about, files = read_about(model_dir), read_checksums(model_dir)
    src = spec.source
    click.echo(f"model      {model_dir}")
    click.echo(f"source     {src.repo} @ {src.revision or '-'} ({src.layout})")
    counts = count_parameters(model_dir, spec)
    total = 0
    click.echo(f"{'component':<16}{'type':<18}{'parameters':>16}  dtypes")
    for name, comp in spec.components.items():
        n, dtypes = counts[name]
        total += n
        click.echo(f"{name:<16}{comp.type:<18}{n:>16,}  {','.join(dtypes)}")
    click.echo(f"{'total':<34}{total:>16,}")
    if spec.tokenizer:
        t = spec.tokenizer
        click.echo(f"tokenizer  {t.kind}, max_length {t.max_length}, pad {t.pad_token!r}")
    for key, sched in spec.schedulers.items():
        click.echo(f"scheduler  {key}: {sched.prediction_type}, {sched.variance_type}, "
                   f"clip ±{sched.clip_sample_range:g}, {sched.num_train_timesteps} steps")
    for key, value in spec.defaults.to_dict().items():  # those of the stages the model has, and those set
        stage = next((s for s in STAGES if key.startswith(f"{s}_")), None)
        if value is not None and (stage is None or stage in spec.schedulers):
            click.echo(f"default    {key} = {value}")
    if files is None:
        click.echo("checksums  none recorded (`dalle2 verify MODEL --record` adds them)")
    else:
        size = sum(e["size"] for e in files.values())
        click.echo(f"checksums  {len(files)} files, {size / 1e6:,.1f} MB, sha256 (`dalle2 verify` hashes them all)")
    for key, value in flat_about(about or {}):
        click.echo(f"about      {key} = {value}")


@main.command()
@click.argument("model", default="default")
@click.option("--revision", default=None, help="Hub revision, when MODEL is a repo id.")
@click.option("--record", is_flag=True, help="Instead of checking, (re)write the checksums in model.json from the "
              "files as they are now: for a model written before checksums were recorded, or edited by hand.")
def verify(model, revision, record):
    """Hash every file of MODEL and compare it with the SHA-256 its model.json records (loading hashes big
    files only once; this always hashes all). A mismatch is one line naming the file; the exit status is 2."""
    import time

    from .convert import resolve_model
    from .store import read_about, read_spec, verify_model, write_spec

    model_dir = resolve_model(model, revision=revision)
    start = time.perf_counter()
    if record:
        write_spec(model_dir, read_spec(model_dir), about=read_about(model_dir))
        click.echo(f"recorded the checksums of {model_dir}")
        return
    files = verify_model(model_dir)
    for rel, size in files:
        click.echo(f"ok  {rel}  {size:,} bytes")
    total, seconds = sum(n for _, n in files) / 1e6, time.perf_counter() - start
    click.echo(f"verified {len(files)} files of {model_dir}: {total:,.1f} MB in {seconds:.2f} s")



# -- the generation verbs -------------------------------------------------------------------------------------

def _model_options(f):
    """--model --revision --backend --device --dtype --seed --threads --quiet --force."""
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
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads of the PyTorch backend (default: PyTorch's, all cores)."),
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
                                              "the reference, ddim deterministic DDIM (the usual choice for fewer "
                                              "steps).")
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
    from .images import check_output

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


def _pipeline(model, revision, backend, device, dtype, quiet, threads=None):
    from .pipeline import load_pipeline

    pipe = load_pipeline(model, backend=backend, device=device, dtype=dtype, revision=revision, progress=not quiet)
    if threads is not None:
        try:
            pipe.backend.set_threads(threads)
        except Dalle2Error:
            raise Dalle2Error(f"--threads sets PyTorch's CPU threads; the {pipe.backend.name} backend picks its own "
                              "(leave --threads out, or add --backend torch)") from None
    return pipe


def _save(out, paths, force: bool, quiet: bool, extra: dict | None = None) -> None:
    from .images import save_pngs

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

    from .images import read_png_metadata

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
            "index": index, "options": options}


def store_default() -> Path:
    from .store import DEFAULT_MODEL_DIR

    return Path(DEFAULT_MODEL_DIR).absolute()


@main.command()
@click.argument("prompt", required=False)
@click.option("--config-from-metadata", "from_png", type=click.Path(dir_okay=False), default=None,
              help="Regenerate the picture a PNG of `dalle2 generate` holds, exactly, from its metadata (model, "
              "backend, prompt, seed, batch, steps, guidance, samplers); other generation options are refused.")
@click.option("--prompt", "prompt_option", default=None, help="The prompt, as mflux and diffusers name it (or give "
              "it as the argument).")
@click.option("--output", "-o", default="generate.png", show_default=True,
              help="PNG path; several images are written as NAME-0.png, NAME-1.png, ...; {seed} and {i} in it are "
              "filled in.")
@click.option("--num-images", "-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per seed (diffusers: num_images_per_prompt).")
@click.option("--rerank", type=click.IntRange(min=1), default=None,
              help="Generate this many candidates and keep the --num-images best by CLIP similarity.")
@click.option("--clip", "clip_model", default=None, help="CLIP model scoring --rerank (default: the model's own "
              "image tower; Karlo has none: use openai/clip-vit-large-patch14).")
@_stage_options(STAGES)
@_model_options
def generate(prompt, from_png, prompt_option, output, num_images, rerank, clip_model, model, revision, backend,
             device, dtype, seed, threads, quiet, force, **stages):
    """Generate images from PROMPT (prior -> decoder -> super-res). PNGs carry the prompt, seed, model,
    revision, backend, steps and guidance as text metadata."""
    if from_png is not None:
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params if p.name not in ("from_png", "output", "force", "quiet",
                                                                        "threads")
                 and ctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise Dalle2Error(f"--config-from-metadata takes every setting from the PNG; leave out {given[0]}")
        call = _from_metadata(from_png)
        path = _outputs(output, 1, force)[0][0]
        pipe = _pipeline(call["model"], call["revision"], call["backend"], call["device"], call["dtype"], quiet,
                         threads)
        out = pipe.generate(call["prompt"], num_images=call["num_images"], seed=call["seed"], **call["options"])
        _save(out.reorder([call["index"]]), [path], force, quiet,
              {"index": str(call["index"]), "regenerated_from": str(from_png)})  # itself regenerable
        return
    if prompt is not None and prompt_option is not None and prompt != prompt_option:
        raise Dalle2Error("two prompts given (the argument and --prompt); give one")
    prompt = prompt if prompt is not None else prompt_option
    if prompt is None:
        raise Dalle2Error("no prompt; give one: dalle2 generate \"a red circle\" (or --prompt \"a red circle\")")
    if rerank is not None and rerank < num_images:
        raise Dalle2Error(f"--rerank ({rerank}) must be at least --num-images ({num_images})")
    paths = _outputs(output, num_images, force, seeds=seed)
    pipe = _pipeline(model, revision, backend, device, dtype, quiet, threads)
    for s, ps in paths.items():
        if rerank is not None:
            out = pipe.rerank(prompt, candidates=rerank, keep=num_images, clip=clip_model, seed=s,
                              **_options(stages))
        else:
            out = pipe.generate(prompt, num_images=num_images, seed=s, **_options(stages))
        _save(out, ps, force, quiet)


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--output", "-o", default="vary.png", show_default=True,
              help="PNG path; several images are written as NAME-0.png, NAME-1.png, ...")
@click.option("--num-images", "-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per seed (diffusers: num_images_per_prompt).")
@_stage_options(STAGES[1:])
@_model_options
def vary(image, output, num_images, model, revision, backend, device, dtype, seed, threads, quiet, force, **stages):
    """Variations of IMAGE: its CLIP image embedding decoded again (needs a model with an image encoder, such as
    kakaobrain/karlo-v1-alpha-image-variations)."""
    paths = _outputs(output, num_images, force, seeds=seed)
    pipe = _pipeline(model, revision, backend, device, dtype, quiet, threads)
    for s, ps in paths.items():
        out = pipe.vary(image, num_images=num_images, seed=s, **_options(stages))
        _save(out, ps, force, quiet, {"source_image": str(image)})


@main.command()
@click.argument("start")
@click.argument("end")
@click.option("--frames", type=click.IntRange(min=2), default=5, show_default=True,
              help="Pictures along the path, both ends included.")
@click.option("--text", is_flag=True, help="START and END are captions (through the prior), not images.")
@click.option("--output", "-o", default="interpolate.png", show_default=True,
              help="Frames are written as NAME-0.png ... NAME-(N-1).png, plus NAME.gif (unless --no-gif).")
@click.option("--gif/--no-gif", default=True, show_default=True, help="Also write the frames as an animated GIF.")
@click.option("--fps", type=click.IntRange(min=1), default=4, show_default=True, help="GIF frame rate.")
@_stage_options(STAGES)
@_model_options
def interpolate(start, end, frames, text, output, gif, fps, model, revision, backend, device, dtype, seed, threads,
                quiet, force, **stages):
    """Frames along the slerp between two images' CLIP embeddings (or two captions' with --text), sharing one
    noise so they change smoothly."""
    from .images import save_gif

    if not text and (any(stages.get(f"prior_{k}") is not None for k in ("steps", "guidance", "sampler"))):
        raise Dalle2Error("--prior-* options apply to --text interpolation only")
    if not text:
        stages = {k: v for k, v in stages.items() if not k.startswith("prior_")}  # --steps: the decoder's only
    options = _options(stages)
    paths = _outputs(output, frames, force, seeds=seed)
    gifs = _outputs(str(Path(output).with_suffix(".gif")), 1, force, ".gif", seed) if gif else {}
    pipe = _pipeline(model, revision, backend, device, dtype, quiet, threads)
    for s, ps in paths.items():
        out = pipe.interpolate(start, end, frames=frames, seed=s, kind="text" if text else "image", **options)
        _save(out, ps, force, quiet, {"start": start, "end": end})
        if gif:
            save_gif(out.images, gifs[s][0], fps=fps, overwrite=force)
            if not quiet:
                click.echo(f"wrote {gifs[s][0]}")


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--from", "source", required=True, help="A caption of IMAGE as it is.")
@click.option("--to", "target", required=True, help="A caption of the image you want.")
@click.option("--amount", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="How far to move toward --to (0 = a variation of IMAGE; 0.25-0.5 edits).")
@click.option("--output", "-o", default="edit.png", show_default=True,
              help="PNG path; several images are written as NAME-0.png, NAME-1.png, ...")
@click.option("--num-images", "-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per seed (diffusers: num_images_per_prompt).")
@_stage_options(STAGES[1:])
@_model_options
def edit(image, source, target, amount, output, num_images, model, revision, backend, device, dtype, seed, threads,
         quiet, force, **stages):
    """Edit IMAGE with a DALL-E 2 text diff: its CLIP embedding moved from --from toward --to by --amount."""
    paths = _outputs(output, num_images, force, seeds=seed)
    pipe = _pipeline(model, revision, backend, device, dtype, quiet, threads)
    for s, ps in paths.items():
        out = pipe.edit(image, source=source, target=target, amount=amount, num_images=num_images, seed=s,
                        **_options(stages))
        _save(out, ps, force, quiet, {"source_image": str(image)})


@main.command()
@click.argument("prompt")
@click.option("--model", "-m", default="default", show_default=True,
              help="Hub repo id, model directory, or `default` (the packaged model).")
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--backends", default="torch,mlx", show_default=True, help="The two backends to compare.")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Compute dtype of both.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The one seed both backends draw the noise from.")
@click.option("--num-images", "-n", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per seed (diffusers: num_images_per_prompt).")
@click.option("--tolerance", type=float, default=2.0, show_default=True,
              help="Largest allowed image difference, in 8-bit levels; above it the exit status is 1.")
@click.option("--output", "-o", default="compare.png", show_default=True,
              help="Side-by-side PNG of the final images (first backend left).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--force", is_flag=True, help="Overwrite --output if it exists.")
@_stage_options(STAGES)
def compare(prompt, model, revision, backends, dtype, seed, num_images, tolerance, output, quiet, force, **stages):
    """Run PROMPT on two backends with one seed; print each stage's difference (prior embedding, decoder 64,
    super-res 256: max abs difference and PSNR); write the images side by side; exit 1 above --tolerance."""
    from .compare import compare_backends
    from .images import save_png

    path = _outputs(output, 1, force)[0][0]
    names = tuple(b.strip() for b in backends.split(","))
    report = compare_backends(prompt, model, names, seed=seed, num_images=num_images, dtype=dtype,
                              revision=revision, progress=not quiet, **_options(stages))
    click.echo(report.table())
    save_png(report.side_by_side(), path, {"prompt": prompt, "seed": str(seed), "backends": ",".join(names)},
             overwrite=force)
    ok = report.passed(tolerance)
    click.echo(f"wrote {path}\n{'PASS' if ok else 'FAIL'}: worst image difference "
               f"{report.worst_pixel():.3g}/255 (tolerance {tolerance:g}/255)")
    if not ok:
        sys.exit(1)


@main.command("eval")
@click.argument("model", default="default", required=False)
@click.option("--backend", type=click.Choice(["auto", "torch", "mlx", "both"]), default="auto", show_default=True,
              help="both = a column per backend.")
@click.option("--seeds", type=click.IntRange(min=1), default=None,
              help="Pictures per prompt (seeds 0..N-1). [default: 3; 1 with --quick]")
@click.option("--quick", is_flag=True, help="A handful of prompts (three colour/shape pairs, a trained and a novel "
              "phrasing) and one or two of each check.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Also write the whole report (every picture's judgement) as JSON.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Pictures per sampling call.")
@click.option("--revision", default=None, help="Hub branch, tag or commit (default: main).")
@click.option("--device", default=None, help="e.g. cuda, cpu, gpu (default: the best there).")
@click.option("--dtype", type=DTYPES, default="float32", show_default=True, help="Compute dtype.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--force", is_flag=True, help="Overwrite --json's file if it exists.")
@_stage_options(STAGES)
def eval_(model, backend, seeds, quick, json_out, batch_size, revision, device, dtype, quiet, force, **stages):
    """Measure whether MODEL draws what its prompts say, from the pixels: generate every colour x shape of the
    shapes data in trained and novel phrasings, name each picture's colour and shape (dalle2_portable.evaluate),
    and check variations, edits, interpolations and reranking. Prints a Markdown table. MODEL: a model directory
    or Hub id (default: the embedded default model)."""
    import json

    from .evaluate import evaluate, markdown_table
    from .images import check_output, write_atomic
    from .pipeline import load_pipeline

    if json_out is not None:
        check_output(json_out, force, ".json")
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    reports = []
    for name in ("torch", "mlx") if backend == "both" else (backend,):
        pipe = load_pipeline(model, backend=name, device=device, dtype=dtype, revision=revision)
        reports.append(evaluate(pipe, seeds=seeds, quick=quick, batch_size=batch_size, log=log,
                                **_options(stages)))
    click.echo(markdown_table(reports))
    if json_out is not None:
        text = json.dumps({"model": model, "reports": [r.to_dict() for r in reports]}, indent=1)
        write_atomic(json_out, lambda f: f.write(text.encode()), force, ".json")
        if not quiet:
            click.echo(f"wrote {json_out}")


def _setting(name: str, *decls, **kw):
    """A `dalle2 train` option for TrainSettings field `name`; unset (None) options leave the field to --from's
    value or TrainSettings' default, which the help shows."""
    from .train.settings import TrainSettings

    default = TrainSettings.__dataclass_fields__[name].default
    shown = f" [default: {default}]" if default not in (None, (), False) else ""
    return click.option(*decls, name, default=None, help=kw.pop("help", "") + shown, **kw)


@main.command()
@click.argument("stage", type=click.Choice(["clip", "prior", "decoder", "super-res"]), required=False)
@click.option("--from", "recipe", type=click.Path(dir_okay=False), default=None,
              help="Launch from a run.json (an earlier run's, or written by hand): its stage, data, model, config "
              "and settings, each overridden by the options given here. Re-runs a run: --from RUN/run.json --out NEW.")
@click.option("--data", default=None, help="`shapes` (the procedural shapes data) or a folder with metadata.jsonl "
              "(file_name + text per line).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="The run directory: checkpoints, metrics.jsonl, and the result in OUT/model.")
@click.option("--model", "-m", default=None, help="The base model (Hub id or model directory): its CLIP encodes "
              "the data, and the result is it with the trained stage. None: `train clip --config` from nothing.")
@click.option("--clip", "image_clip", default=None, help="A model whose CLIP image tower encodes the data, for a "
              "base model without one (Karlo: openai/clip-vit-large-patch14).")
@click.option("--config", default=None, help="tiny|small|FILE.json: train the stage from scratch at this size "
              "(FILE.json: {\"preset\": \"tiny\", \"decoder\": {fields}}). Default: fine-tune the base model's.")
@_setting("steps", "--steps", type=click.IntRange(min=1), help="The run's total steps. [default: 1000]")
@_setting("batch_size", "--batch-size", type=click.IntRange(min=1))
@_setting("accumulate", "--accumulate", type=click.IntRange(min=1),
          help="Micro-batches of --batch-size per optimiser step (gradients averaged).")
@_setting("lr", "--lr", type=click.FloatRange(min=0, min_open=True),
          help="Peak learning rate (linear warm-up, then cosine decay to 0 at --steps).")
@_setting("warmup", "--warmup", type=click.IntRange(min=1))
@_setting("weight_decay", "--weight-decay", type=click.FloatRange(min=0))
@_setting("ema_max_decay", "--ema", type=click.FloatRange(0, 1, max_open=True),
          help="The EMA's largest decay (warm-up 1 - (1 + step)^-2/3); 0: the result is the raw weights.")
@_setting("prediction", "--prediction", type=click.Choice(["epsilon", "sample", "v_prediction"]),
          help="What the model learns to output (kept in its scheduler). [default: the base model's]")
@_setting("min_snr_gamma", "--min-snr-gamma", type=click.FloatRange(min=0, min_open=True),
          help="Weight the loss by min-SNR-gamma (5 is usual). [default: off]")
@_setting("dtype", "--dtype", type=click.Choice(["float32", "bfloat16"]),
          help="bfloat16: mixed precision (float32 master weights and optimiser).")
@_setting("gradient_checkpointing", "--gradient-checkpointing", type=bool, is_flag=True, flag_value=True,
          help="Recompute activations in the backward pass: less memory, more time.")
@_setting("cond_drop", "--cond-drop", type=click.FloatRange(0, 1, max_open=True),
          help="Classifier-free guidance's dropout: the prior's caption, the decoder's image embedding.")
@_setting("caption_drop", "--caption-drop", type=click.FloatRange(0, 1, max_open=True),
          help="The decoder's caption dropout.")
@_setting("image_size", "--image-size", type=click.IntRange(min=8),
          help="The decoder's or the super-res UNet's sample size when trained from scratch.")
@_setting("sr_noise", "--sr-noise", type=click.FloatRange(min=0),
          help="super-res: std of the noise added to the small image (augmentation).")
@_setting("low_size", "--low-size", type=click.IntRange(min=8),
          help="super-res: the small image's side. [default: the base model's decoder's]")
@_setting("checkpoint_every", "--checkpoint-every", type=click.IntRange(min=1))
@_setting("preview_every", "--preview-every", type=click.IntRange(min=0),
          help="OUT/previews/step-N.png every N steps and at the end (0: none).")
@click.option("--freeze", multiple=True, help="Keep a component or weight as it is (repeatable), e.g. "
              "--freeze text_proj or --freeze decoder.conv_in.")
@_setting("data_size", "--data-size", type=click.IntRange(min=1), help="Items of the shapes data.")
@_setting("strict", "--strict", type=bool, is_flag=True, flag_value=True,
          help="Stop at an image folder's first bad record (default: report each and skip it).")
@_setting("seed", "--seed", type=click.IntRange(min=0), help="Seed of the run's one NumPy generator.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint (on any backend).")
@click.option("--stop-at", type=click.IntRange(min=1), default=None,
              help="Checkpoint and stop after this step (continue later with --resume).")
@click.option("--backend", type=BACKENDS, default=None, help="[default: auto, or --from's]")
@click.option("--device", default=None, help="e.g. cuda, cpu, mps, gpu (default: the best there).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(stage, recipe, data, out, model, image_clip, config, freeze, resume, stop_at, backend, device, quiet, **options):
    """Train STAGE of an unCLIP model on --data; every setting is kept in OUT/run.json, the run resumes on
    either backend, and `--from OUT/run.json` launches it again."""
    import warnings

    from .train.loop import train as run_training
    from .train.settings import read_recipe, settings_from

    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # bad data records: one line each
    base = read_recipe(recipe) if recipe else {"settings": {}}
    given = {k: v for k, v in options.items() if v is not None}
    if freeze:
        given["freeze"] = list(freeze)
    values = {"steps": 1000, **base["settings"], **given}
    settings = settings_from(values, recipe or "dalle2 train")
    stage = stage or base.get("stage")
    data = data or base.get("data_source")
    model = model or base.get("base_model")
    for name, value, flag in (("stage", stage, "STAGE"), ("data", data, "--data")):
        if value is None:
            raise Dalle2Error(f"no {name}: give {flag}" + ("" if recipe else " (or --from RUN/run.json)"))
    result = run_training(stage.replace("-", "_"), data, out, model, config=config or base.get("config"),
                          settings=settings, backend=backend or base.get("backend", "auto"),
                          device=device or base.get("device"), resume=resume, progress=not quiet, stop_at=stop_at,
                          clip=image_clip or base.get("clip"))
    if not quiet:
        click.echo(f"wrote {result}" if result else f"stopped at step {stop_at}; continue with --resume")


if __name__ == "__main__":
    main()
