"""MLX 8-bit / 4-bit quantisation of the prior and the UNets, written as a model directory that loads as such.

    d2.quantize("karlo", "karlo-8bit", bits=8)             # dalle2 quantize karlo karlo-8bit --bits 8
    pipe = d2.load_pipeline("karlo-8bit", backend="mlx")    # quantised layers; no float32 copy of their weights
    pipe = d2.load_pipeline("karlo-8bit", backend="torch")  # the same quantised weights, dequantised at load

The format. model.json records, per quantised component, "quantization": {"bits", "group_size", "mode":
"affine"} (spec.Quantization). Which layers are quantised follows from that alone (`quantizable`): every Linear
and Conv2d whose row is a multiple of group_size, where a row is a Linear's input features and a Conv2d's
kH*kW*in_channels; the CLIP towers and text_proj are never quantised. A quantised layer X is stored as MLX's
QuantizedLinear holds it (MLX's `mx.quantize`, affine, group-wise):
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
from .spec import QUANTIZABLE_TYPES, Quantization

DEFAULT_COMPONENTS = ("prior", "decoder", "super_res_first", "super_res_last")  # those a model has


def quantizable(shape: tuple[int, ...], q: Quantization) -> bool:
    """Whether a Linear (out, in) or Conv2d (out, in, kH, kW) weight of this shape is quantised under `q`: its row
    (all but the first axis, in either layout) is a multiple of the group size."""
    return len(shape) in (2, 4) and math.prod(shape[1:]) % q.group_size == 0


def quantized_shapes(shapes: dict[str, tuple[int, ...]], layers, q: Quantization) -> dict[str, tuple[int, ...]]:
    """The tensors of a quantised component's file from its float view: `shapes` {name: canonical shape} and
    `layers` the names of its Linear and Conv2d weights."""
    out = {}
    for name, shape in shapes.items():
        if name in layers and quantizable(shape, q):
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
            if not (name in layers and quantizable(shape, q)):
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


def quantize(model, out, bits: int = 8, group_size: int = 64, components=None, overwrite: bool = False) -> Path:
    """Write OUT: MODEL (a model directory, Hub id or "default") with the prior and the UNets (or `components`)
    quantised to `bits` (8 or 4) with MLX's `mx.quantize` in groups of `group_size` (32, 64 or 128), every other
    file copied, model.json recording each component's quantisation, fresh checksums; atomic, and an existing
    OUT is refused unless `overwrite`. Needs MLX (quantising is MLX's); the result loads on either backend."""
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
    for name in names:  # every chosen component must have a layer to quantise: say so before writing anything
        comp = spec.components[name]
        shapes = backend.parameter_shapes(comp.type, comp.config)
        if shapes == backend.parameter_shapes(comp.type, comp.config, q):
            raise Dalle2Error(f"no layer of the {name} has a row (input features, or kernel height x width x input "
                              f"channels) that is a multiple of {group_size}; choose a smaller --group-size")
    quantized = {}
    with store.atomic_directory(out_path, overwrite=overwrite) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        for name in names:
            comp = spec.components[name]
            tensors = backend.quantize_component(comp.type, comp.config, store.component_path(model_dir, spec, name), q)
            target = tmp / comp.weights
            target.unlink()  # a copied file may be read-only; this replaces it
            save_file(tensors, str(target), metadata={"quantization": f"{q.bits}-bit affine, group {q.group_size}"})
            del tensors
            backend.free_memory()
            quantized[name] = dataclasses.replace(comp, quantization=q)
        new = dataclasses.replace(spec, components={k: quantized.get(k, c) for k, c in spec.components.items()})
        about = dict(store.read_about(model_dir) or {})
        about["quantized"] = {"bits": q.bits, "group_size": q.group_size, "mode": q.mode, "components": names,
                              "from": str(model_dir)}
        store.write_spec(tmp, new, about=about)
    return out_path
