"""MLX 8-bit / 4-bit quantisation of the prior and the UNets, written as a model directory that loads as such.

    d2.quantize("karlo", "karlo-8bit", bits=8)             # dalle2 quantize karlo karlo-8bit --bits 8
    pipe = d2.load_pipeline("karlo-8bit", backend="mlx")    # quantised layers; no float32 copy of their weights
    pipe = d2.load_pipeline("karlo-8bit", backend="torch")  # the same quantised weights, dequantised at load

The format. model.json records, per quantised component, "quantization": {"bits", "group_size", "mode":
"affine", "keep": [module paths left float]} (spec.Quantization). Which layers are quantised follows from that
alone (`quantizable`): every Linear and Conv2d whose row is a multiple of group_size, where a row is a Linear's
input features and a Conv2d's kH*kW*in_channels, unless `keep` names it. `quantize` keeps by default the layers
outside the repeated blocks float (`outside_blocks`: the input and output layers and the time embedding, <1% of
the weights; on the default model this lifts the 8-bit prior's images from 32 to 39 dB PSNR); the CLIP towers
and text_proj are never quantised. A quantised layer X is stored as MLX's QuantizedLinear holds it (MLX's
`mx.quantize`, affine, group-wise):
    X.weight   uint32 (out, row * bits / 32): each weight's code q in [0, 2^bits), packed from the low bits up
    X.scales   float32 (out, row / group_size)
    X.biases   float32 (out, row / group_size)     weight = scales * q + biases, per group of a row
    X.bias     float32 (out,), as it was
A Conv2d kernel's row runs over (kH, kW, in) in that order, MLX's (O, kH, kW, I) layout, so MLX dequantises it
without a transpose (backends/mlx/facade.py `QuantizedConv2d`); every other tensor is float32 in canonical
layout, as in any model directory.

Quantising runs on the MLX backend (its `quantize_component`); loading on MLX builds the same structure
(`nn.quantize` with the predicate above) and loads the stored arrays; the torch backend loads them dequantised
here in NumPy (`dequantized`), so both backends run the same quantised weights.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import Dalle2Error
from .spec import QUANTIZABLE_TYPES, QUANTIZED_GROUP_SIZE, Quantization

DEFAULT_COMPONENTS = ("prior", "decoder", "super_res_first", "super_res_last")  # those a model has
BLOCKS = ("transformer_blocks", "down_blocks", "mid_block", "up_blocks")  # the repeated blocks of the prior / UNets


def quantizable(name: str, shape: tuple[int, ...], q: Quantization) -> bool:
    """Whether the Linear (out, in) or Conv2d (out, in, kH, kW) weight `name` ("<module path>.weight") of this
    shape is quantised under `q`: its module is not in q.keep and its row (all but the first axis, in either
    layout) is a multiple of the group size."""
    return (name.removesuffix(".weight") not in q.keep and len(shape) in (2, 4)
            and math.prod(shape[1:]) % q.group_size == 0)


def outside_blocks(layers) -> tuple[str, ...]:
    """The module paths of the weights `layers` that lie outside the repeated blocks (BLOCKS): a component's
    input and output layers and its time embedding, which `quantize` keeps float by default."""
    return tuple(sorted(n.removesuffix(".weight") for n in layers if n.split(".")[0] not in BLOCKS))


def quantized_shapes(shapes: dict[str, tuple[int, ...]], layers, q: Quantization) -> dict[str, tuple[int, ...]]:
    """The tensors of a quantised component's file from its float view: `shapes` {name: canonical shape} and
    `layers` the names of its Linear and Conv2d weights."""
    out = {}
    for name, shape in shapes.items():
        if name in layers and quantizable(name, shape, q):
            rows, row = shape[0], math.prod(shape[1:])
            prefix = name[: -len("weight")]
            out[name] = (rows, row * q.bits // 32)
            out[prefix + "scales"] = out[prefix + "biases"] = (rows, row // q.group_size)
        else:
            out[name] = tuple(shape)
    return out


def dequantize(packed: np.ndarray, scales: np.ndarray, biases: np.ndarray, q: Quantization) -> np.ndarray:
    """MLX's affine dequantisation in NumPy: (out, row) float32, each weight scales * q + biases of its group, q
    unpacked from uint32 words low bits first (equal to `mx.dequantize` bit for bit: tests/test_quantize.py)."""
    per_word = 32 // q.bits
    shifts = np.arange(0, 32, q.bits, dtype=np.uint32)
    codes = (packed.astype(np.uint32)[..., None] >> shifts) & np.uint32((1 << q.bits) - 1)
    codes = codes.reshape(packed.shape[0], packed.shape[1] * per_word).astype(np.float32)
    groups = codes.reshape(packed.shape[0], -1, q.group_size)
    scales, biases = np.asarray(scales, np.float32), np.asarray(biases, np.float32)
    return (scales[..., None] * groups + biases[..., None]).reshape(codes.shape)


def dequantized(path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], layers,
                q: Quantization) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 NumPy in canonical layout) for every weight of the float module `shapes` describes, read
    one tensor at a time from a quantised file (validated against `quantized_shapes` by the caller)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        for name, shape in shapes.items():
            if not (name in layers and quantizable(name, shape, q)):
                yield name, f.get_tensor(name)
                continue
            prefix = name[: -len("weight")]
            w = dequantize(f.get_tensor(name), f.get_tensor(prefix + "scales"), f.get_tensor(prefix + "biases"), q)
            if len(shape) == 4:  # rows over (kH, kW, in): MLX's kernel layout -> canonical (O, I, kH, kW)
                o, i, kh, kw = shape
                w = w.reshape(o, kh, kw, i).transpose(0, 3, 1, 2)
            yield name, np.ascontiguousarray(w.reshape(shape))


def _chosen(model_dir: Path, spec, components) -> list[str]:
    """The components to quantise: the named ones (each must be there, a prior or a UNet, and not quantised yet),
    or by default every one of DEFAULT_COMPONENTS the model has."""
    if components is None:
        names = [n for n in DEFAULT_COMPONENTS if n in spec.components]
        if not names:
            raise Dalle2Error(f"model {str(model_dir)!r} has no prior or UNet to quantize (it has: "
                              f"{', '.join(spec.components)})")
    else:
        names = [components] if isinstance(components, str) else list(components)
        if not names:
            raise Dalle2Error(f"name the components to quantize, e.g. {','.join(DEFAULT_COMPONENTS)}")
    for name in names:
        if name not in spec.components:
            have = [n for n in DEFAULT_COMPONENTS if n in spec.components]
            raise Dalle2Error(f"model {str(model_dir)!r} has no component {name!r} to quantize; it has "
                              f"{', '.join(have) or 'none that can be quantized'}")
        comp = spec.components[name]
        if comp.type not in QUANTIZABLE_TYPES:
            raise Dalle2Error(f"{name} is a {comp.type} component: only the prior and the UNets are quantized "
                              f"(choose from {', '.join(n for n in DEFAULT_COMPONENTS if n in spec.components)})")
        if comp.quantization is not None:
            raise Dalle2Error(f"the {name} of {str(model_dir)!r} is quantized already ({comp.quantization.describe()});"
                              " quantize the float model it was made from")
    return list(dict.fromkeys(names))


def quantize(model, out, bits: int = 8, group_size: int = QUANTIZED_GROUP_SIZE, components=None,
             all_layers: bool = False, overwrite: bool = False) -> Path:
    """Write OUT: MODEL (a model directory, Hub id or "default") with the prior and the UNets (or `components`)
    quantised to `bits` (8 or 4) with MLX's `mx.quantize` in groups of `group_size` (32, 64 or 128), every other
    file copied, model.json recording each component's quantisation, fresh checksums; atomic, and an existing
    OUT is refused unless `overwrite`. The layers outside the repeated blocks stay float unless `all_layers`.
    Needs MLX (quantising is MLX's); the result loads on either backend."""
    from safetensors.numpy import save_file

    from . import store
    from .backends import get_backend, installed
    from .convert import resolve_model

    q = Quantization(bits=bits, group_size=group_size)
    model_dir = Path(resolve_model(model))
    spec = store.read_spec(model_dir)
    names = _chosen(model_dir, spec, components)
    out_path = Path(out).absolute()
    if out_path.exists() and not overwrite:  # before any work (atomic_directory refuses it too)
        raise Dalle2Error(f"output {str(out_path)!r} already exists; choose another path or pass --force "
                          "(overwrite=True)")
    if out_path == model_dir.absolute():
        raise Dalle2Error("OUT is MODEL itself; write the quantized model to another directory")
    if "mlx" not in installed():
        raise Dalle2Error("quantizing uses MLX's mx.quantize and MLX is not installed; run "
                          "`pip install 'dalle2_portable[mlx]'`")
    backend = get_backend("mlx")
    store.validate(model_dir, spec, backend.parameter_shapes, names)
    chosen = {}
    for name in names:  # each component's quantisation; each must have a layer to quantise, said before writing
        comp = spec.components[name]
        view = backend.parameter_shapes(comp.type, comp.config, q)  # every layer that can be
        layers = [k.removesuffix("scales") + "weight" for k in view if k.endswith(".scales")]
        chosen[name] = q if all_layers else dataclasses.replace(q, keep=outside_blocks(layers))
        if not layers:
            raise Dalle2Error(f"no layer of the {name} has a row (input features, or kernel height x width x input "
                              f"channels) that is a multiple of {group_size}; choose a smaller --group-size")
        if len(layers) == len(chosen[name].keep):
            raise Dalle2Error(f"the only layers of the {name} that can be quantized at group size {group_size} lie "
                              "outside its blocks, which stay float; pass --all-layers or a smaller --group-size")
    quantized = {}
    sources = {store.component_path(model_dir, spec, name).absolute() for name in names}

    def rewritten(folder, entries):  # the files quantised below are not copied first
        return [e for e in entries if (Path(folder) / e).absolute() in sources]

    with store.atomic_directory(out_path, overwrite=overwrite) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True, ignore=rewritten)
        for name in names:
            comp = spec.components[name]
            source = store.component_path(model_dir, spec, name)
            tensors = backend.quantize_component(comp.type, comp.config, source, chosen[name])
            target = tmp / comp.weights
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(target), metadata={"quantization": f"{q.bits}-bit affine, group {q.group_size}"})
            os.chmod(target, source.stat().st_mode & 0o777)  # the permissions the float file had
            del tensors
            backend.free_memory()
            quantized[name] = dataclasses.replace(comp, quantization=chosen[name])
        new = dataclasses.replace(spec, components={k: quantized.get(k, c) for k, c in spec.components.items()})
        about = dict(store.read_about(model_dir) or {})
        about["quantized"] = {"bits": q.bits, "group_size": q.group_size, "mode": q.mode, "components": names,
                              "all_layers": bool(all_layers), "from": str(model_dir)}
        store.write_spec(tmp, new, about=about)
    return out_path
