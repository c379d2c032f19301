"""The `dalle2` command line: thin click commands over the public API.

Every user error is a `Dalle2Error` and is printed as one line `error: ...` with exit status 2.
"""

from __future__ import annotations

import sys

import click

from .errors import Dalle2Error


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Dalle2Error as e:
            click.echo(f"error: {e}", err=True)
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
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
def convert(source, out, revision, dtype, variant, overwrite):
    """Convert SOURCE (a Hub repo id, or a local diffusers unCLIP or transformers CLIP folder) into the model
    directory OUT."""
    from .convert import convert as convert_model
    from .store import count_parameters

    spec = convert_model(source, out, revision=revision, dtype=dtype, overwrite=overwrite, variant=variant)
    counts = count_parameters(out, spec)
    parts = ", ".join(f"{name} {n:,}" for name, (n, _) in counts.items())
    click.echo(f"wrote {out}: {parts} parameters ({dtype})")


@main.command()
@click.argument("model")
@click.option("--revision", default=None, help="Hub revision, when MODEL is a repo id.")
def info(model, revision):
    """Show a model's components, parameter counts, dtypes and source."""
    from .convert import resolve_model
    from .store import count_parameters, read_spec

    model_dir = resolve_model(model, revision=revision)
    spec = read_spec(model_dir)
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
    for key, value in spec.defaults.items():
        click.echo(f"default    {key} = {value}")


if __name__ == "__main__":
    main()
