"""`dalle2 lora fuse`."""

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
