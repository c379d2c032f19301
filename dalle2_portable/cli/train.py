"""`dalle2 train`."""

from __future__ import annotations

import warnings

import click

from ..errors import Dalle2Error
from . import main
from .options import BACKENDS


def _setting(name: str, *decls, **kw):
    """A `dalle2 train` option for TrainSettings field `name`; unset (None) options leave the field to --from's
    value or TrainSettings' default, which the help shows."""
    from ..train.settings import TrainSettings

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
@_setting("lora_rank", "--lora", type=click.IntRange(min=1),
          help="Train LoRA adapters of this rank (base weights frozen); the result is OUT/lora/"
          "pytorch_lora_weights.safetensors, diffusers' dialect (use it with --lora FILE). [default: off]")
@_setting("lora_alpha", "--lora-alpha", type=click.FloatRange(min=0, min_open=True),
          help="The adapters' alpha (scale alpha / rank). [default: the rank]")
@_setting("lora_targets", "--lora-targets", help="Regex on module paths (decoder.mid_block.attentions.0.to_q) of "
          "the Linears to adapt. [default: every attention projection]")
@_setting("lora_dropout", "--lora-dropout", type=click.FloatRange(0, 1, max_open=True),
          help="Dropout on the adapters' input while training (PEFT's lora_dropout).")
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
@_setting("sr_crop", "--sr-crop", type=click.IntRange(min=8),
          help="super-res: train on random N px squares of the pictures (DALL-E 2: a quarter of the area, "
          "--sr-crop 32 at --image-size 64); sampling still makes whole pictures. [default: whole pictures]")
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
def train(stage, recipe, data, out, model, image_clip, config, freeze, resume, stop_at, backend, device, quiet,
          **options):
    """Train STAGE of an unCLIP model on --data; every setting is kept in OUT/run.json, the run resumes on
    either backend, and `--from OUT/run.json` launches it again."""

    from ..train.loop import train as run_training
    from ..distributed import launched_rank
    from ..train.settings import read_recipe, settings_from

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
    if not quiet and launched_rank() == 0:  # one process says it (torchrun / mlx.launch start several)
        click.echo(f"wrote {result}" if result else f"stopped at step {stop_at}; continue with --resume")
