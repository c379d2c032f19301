"""The generation verbs (generate, vary, interpolate, edit), `dalle2 compare` and `dalle2 eval`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import Dalle2Error
from ..spec import STAGES
from . import main
from .options import (DTYPES, _from_metadata, _model_options, _options, _output_options, _outputs, _pipeline,
                      _save, _stage_options)


@main.command()
@click.argument("prompt", required=False)
@click.option("--config-from-metadata", "from_png", type=click.Path(dir_okay=False), default=None,
              help="Regenerate the picture a PNG of `dalle2 generate` holds, exactly, from its metadata (model, "
              "backend, prompt, seed, batch, steps, guidance, samplers); other generation options are refused.")
@click.option("--prompt", "prompt_option", default=None, help="The prompt, as mflux and diffusers name it (or give "
              "it as the argument).")
@_output_options("generate.png")
@click.option("--rerank", type=click.IntRange(min=1), default=None,
              help="Generate this many candidates and keep the --num-images best by CLIP similarity.")
@click.option("--clip", "clip_model", default=None, help="CLIP model scoring --rerank (default: the model's own "
              "image tower; Karlo has none: use openai/clip-vit-large-patch14).")
@_stage_options(STAGES)
@_model_options
def generate(prompt, from_png, prompt_option, output, num_images, rerank, clip_model, model, revision, backend,
             device, dtype, seed, lora, threads, low_memory, quiet, force, **stages):
    """Generate images from PROMPT (prior -> decoder -> super-res). PNGs carry the prompt, seed, model,
    revision, backend, steps and guidance as text metadata."""
    if from_png is not None:
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params if p.name not in ("from_png", "output", "force", "quiet",
                                                                        "threads", "low_memory")
                 and ctx.get_parameter_source(p.name) != click.core.ParameterSource.DEFAULT]
        if given:
            raise Dalle2Error(f"--config-from-metadata takes every setting from the PNG; leave out {given[0]}")
        call = _from_metadata(from_png)
        path = _outputs(output, 1, force)[0][0]
        pipe = _pipeline(call["model"], call["revision"], call["backend"], call["device"], call["dtype"], quiet,
                         threads, lora=call["lora"], low_memory=low_memory)
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
    pipe = _pipeline(model, revision, backend, device, dtype, quiet, threads, (STAGES, _options(stages)),
                     lora=lora, low_memory=low_memory)
    for s, ps in paths.items():
        if rerank is not None:
            out = pipe.rerank(prompt, candidates=rerank, keep=num_images, clip=clip_model, seed=s,
                              **_options(stages))
        else:
            out = pipe.generate(prompt, num_images=num_images, seed=s, **_options(stages))
        _save(out, ps, force, quiet)


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@_output_options("vary.png")
@_stage_options(STAGES[1:])
@_model_options
def vary(image, output, num_images, model, revision, backend, device, dtype, seed, lora, threads, low_memory, quiet,
         force, **stages):
    """Variations of IMAGE: its CLIP image embedding decoded again (needs a model with an image encoder, such as
    kakaobrain/karlo-v1-alpha-image-variations)."""
    paths = _outputs(output, num_images, force, seeds=seed)
    pipe = _pipeline(model, revision, backend, device, dtype, quiet, threads, (STAGES[1:], _options(stages)),
                     lora=lora, low_memory=low_memory)
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
def interpolate(start, end, frames, text, output, gif, fps, model, revision, backend, device, dtype, seed, lora,
                threads, low_memory, quiet, force, **stages):
    """Frames along the slerp between two images' CLIP embeddings (or two captions' with --text), sharing one
    noise so they change smoothly."""
    from ..images import save_gif

    if not text and (any(stages.get(f"prior_{k}") is not None for k in ("steps", "guidance", "sampler"))):
        raise Dalle2Error("--prior-* options apply to --text interpolation only")
    if not text:
        stages = {k: v for k, v in stages.items() if not k.startswith("prior_")}  # --steps: the decoder's only
    options = _options(stages)
    paths = _outputs(output, frames, force, seeds=seed)
    gifs = _outputs(str(Path(output).with_suffix(".gif")), 1, force, ".gif", seed) if gif else {}
    pipe = _pipeline(model, revision, backend, device, dtype, quiet, threads,
                     (STAGES if text else STAGES[1:], options), lora=lora, low_memory=low_memory)
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
@_output_options("edit.png")
@_stage_options(STAGES[1:])
@_model_options
def edit(image, source, target, amount, output, num_images, model, revision, backend, device, dtype, seed, lora,
         threads, low_memory, quiet, force, **stages):
    """Edit IMAGE with a DALL-E 2 text diff: its CLIP embedding moved from --from toward --to by --amount."""
    paths = _outputs(output, num_images, force, seeds=seed)
    pipe = _pipeline(model, revision, backend, device, dtype, quiet, threads, (STAGES[1:], _options(stages)),
                     lora=lora, low_memory=low_memory)
    for s, ps in paths.items():
        out = pipe.edit(image, source=source, target=target, amount=amount, num_images=num_images, seed=s,
                        **_options(stages))
        _save(out, ps, force, quiet, {"source_image": str(image)})


@main.command()
@click.argument("prompt")
@click.option("--model", "-m", default="default", show_default=True,
              help="Hub repo id, model directory, or `default` (the packaged model).")
@click.option("--revision", default=None, help="Hub branch, tag or commit.")
@click.option("--backends", default="torch,mlx", show_default=True,
              help="The two to compare, comma-separated, each BACKEND or BACKEND:DEVICE (torch, mlx, torch:cuda, "
              "torch:cpu, mlx:gpu, mlx:cpu): two frameworks, or two devices of one.")
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
    from ..compare import compare_backends
    from ..images import save_png

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

    from ..evaluate import evaluate, markdown_table
    from ..images import check_output, write_atomic
    from ..pipeline import load_pipeline

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
