"""`dalle2 lora fuse`, `dalle2 lora convert`."""

from __future__ import annotations

import click

from . import main


@main.group()
def lora():
    """LoRA adapters: safetensors files in the diffusers, PEFT or kohya dialect (generate, vary, interpolate and
    edit take them as --lora FILE[:SCALE])."""


@lora.command()
@click.argument("model")
@click.argument("adapters", nargs=-1, required=True)
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--revision", default=None, help="Hub branch, tag or commit of MODEL (default: main).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
def fuse(model, adapters, out, revision, force):
    """Write OUT: MODEL (a model directory, Hub id or `default`) with each ADAPTER (FILE or FILE:SCALE) merged
    into its weights, a model directory that loads as any other, with fresh checksums."""
    from ..convert import resolve_model
    from ..lora import fuse_model, parse_spec

    path = fuse_model(resolve_model(model, revision=revision), [parse_spec(a) for a in adapters], out,
                      overwrite=force)
    click.echo(f"wrote {path}")


@lora.command()
@click.argument("model")
@click.argument("adapter")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--to", "dialect", type=click.Choice(["diffusers", "kohya"]), default="kohya", show_default=True,
              help="diffusers: pytorch_lora_weights.safetensors keys and metadata (diffusers, PEFT); kohya: "
              "lora_unet_* keys with .alpha (ComfyUI, A1111).")
@click.option("--revision", default=None, help="Hub branch, tag or commit of MODEL (default: main).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def convert(model, adapter, out, dialect, revision, force):
    """Write ADAPTER (any dialect dalle2 reads) as OUT in another dialect; MODEL (the one it adapts) resolves
    its module names."""
    from ..convert import resolve_model
    from ..lora import file_module_paths, read_adapter, write_adapter

    read = read_adapter(adapter, file_module_paths(resolve_model(model, revision=revision)))
    click.echo(f"wrote {write_adapter(out, read, dialect=dialect, overwrite=force)}")
