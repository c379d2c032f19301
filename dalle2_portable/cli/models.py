"""`dalle2 convert`, `dalle2 quantize`, `dalle2 cache list|clear`, `dalle2 info`, `dalle2 verify`."""

from __future__ import annotations


import click

from ..errors import Dalle2Error
from ..spec import QUANTIZED_GROUP_SIZE, STAGES
from . import main


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
    from ..convert import convert as convert_model
    from ..store import count_parameters

    spec = convert_model(source, out, revision=revision, dtype=dtype, overwrite=overwrite, variant=variant)
    counts = count_parameters(out, spec)
    parts = ", ".join(f"{name} {n:,}" for name, (n, _) in counts.items())
    click.echo(f"wrote {out}: {parts} parameters ({dtype})")


@main.command()
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--bits", type=int, default=8, show_default=True, help="Bits per weight: 8 or 4.")
@click.option("--group-size", type=int, default=QUANTIZED_GROUP_SIZE, show_default=True,
              help="Weights sharing one scale and bias: 32, 64 or 128 (a layer whose row is not a multiple of it "
              "stays float32).")
@click.option("--components", default=None, help="Comma-separated components to quantize (default: the prior and "
              "every UNet: prior,decoder,super_res_first,super_res_last; the CLIP towers and text_proj stay float).")
@click.option("--all-layers", is_flag=True, help="Quantize the layers outside the repeated blocks too (the input and "
              "output layers and the time embedding, which stay float by default).")
@click.option("--revision", default=None, help="Hub branch, tag or commit of MODEL (default: main).")
@click.option("--force", "overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is "
              "complete).")
def quantize(model, out, bits, group_size, components, all_layers, revision, overwrite):
    """Write OUT: MODEL (a model directory, Hub id or `default`) with its prior and UNets quantized to 8 or 4 bits
    by MLX (mx.quantize, affine, group-wise), a model directory that loads as any other: quantized on --backend
    mlx, dequantized at load on torch."""
    from ..convert import resolve_model
    from ..quantize import quantize as quantize_model
    from ..store import directory_size, read_spec

    names = None if components is None else [c.strip() for c in components.split(",") if c.strip()]
    source = resolve_model(model, revision=revision)
    path = quantize_model(source, out, bits=bits, group_size=group_size, components=names, all_layers=all_layers,
                          overwrite=overwrite)
    spec = read_spec(path)
    done = [n for n, c in spec.components.items() if c.quantization is not None]
    click.echo(f"wrote {path}: {', '.join(done)} at {bits} bits (group {group_size}); "
               f"{directory_size(path) / 1e6:,.1f} MB (was {directory_size(source) / 1e6:,.1f} MB)")


@main.group()
def cache():
    """The conversion cache (DALLE2_CACHE, default ~/.cache/dalle2_portable): Hub ids and local folders are
    converted into it once."""


@cache.command("list")
def cache_list():
    """Each converted model (size, age, source, path) and each leftover of an interrupted conversion."""
    from ..cache import entries
    from ..convert import cache_dir

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
    from ..cache import entries, remove, select

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
    from ..convert import resolve_model
    from ..store import count_parameters, flat_about, read_about, read_checksums, read_spec

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
        quantized = f"  ({comp.quantization.describe()})" if comp.quantization else ""
        click.echo(f"{name:<16}{comp.type:<18}{n:>16,}  {','.join(dtypes)}{quantized}")
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

    from ..convert import resolve_model
    from ..store import read_about, read_spec, verify_model, write_spec

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
