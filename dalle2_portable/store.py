"""The model directory on disk: read and validate `model.json` and the weight files, write atomically.

    my-model/
      model.json                   the ModelSpec (spec.py), format 1
      <component>.safetensors      canonical names, PyTorch layout (conv weights OIHW)
      tokenizer/                   vocab.json + merges.txt, or tokenizer.model

Loading validates before it allocates: the safetensors headers are read (names, shapes, dtypes, and that the
file is as long as its header says) and compared with the shapes the backend's module tree expects, so a bad
file fails in milliseconds with one line naming the tensor and the file, before any weight is read.
Writing happens in a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import Dalle2Error
from .spec import ModelSpec

MODEL_JSON = "model.json"

# safetensors dtype tags -> bytes per element (the header gives shapes and byte offsets)
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # safetensors tag: "F32", "F16", "BF16", ...

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_SIZES.get(self.dtype, 4)


def read_json(path: str | os.PathLike, fix: str):
    """A JSON file's content; a missing or unreadable file is one line naming it, then `fix` (what to do)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Dalle2Error(f"{str(path)!r} is missing; {fix}") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON, bad UTF-8
        raise Dalle2Error(f"cannot read {str(path)!r} ({e}); {fix}") from None


def read_spec(model_dir: str | os.PathLike) -> ModelSpec:
    """Parse `model.json`; every problem is one line naming the path and the fix."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise Dalle2Error(f"model directory {str(model_dir)!r} does not exist; give a model directory, a Hub "
                          "repo id, or convert one with `dalle2 convert SOURCE OUT`")
    path = model_dir / MODEL_JSON
    if not path.is_file():
        raise Dalle2Error(f"{str(model_dir)!r} is not a dalle2_portable model directory (no {MODEL_JSON}); "
                          "convert a checkpoint into it with `dalle2 convert SOURCE OUT`")
    d = read_json(path, "re-convert the model with `dalle2 convert`")
    if not isinstance(d, dict):
        raise Dalle2Error(f"{str(path)!r} is not a JSON object; re-convert the model with `dalle2 convert`")
    return ModelSpec.from_dict(d)


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a safetensors file, without reading the tensors.

    Also checks that the file holds every byte its header points to, so a truncated download or copy is
    reported here, naming the file, and not as a crash halfway through loading.
    """
    path = Path(path)
    if not path.is_file():
        raise Dalle2Error(f"weight file {str(path)!r} is missing; re-convert the model with `dalle2 convert`")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # u64 header length, then the JSON header
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise Dalle2Error(f"weight file {str(path)!r} is not a readable safetensors file ({e}); "
                          "re-convert or re-download it") from None
    header.pop("__metadata__", None)
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        shape, dtype = tuple(entry["shape"]), entry["dtype"]
        begin, stop = entry["data_offsets"]
        expected = int(np.prod(shape, dtype=np.int64)) * _DTYPE_SIZES.get(dtype, 0)
        if _DTYPE_SIZES.get(dtype) and stop - begin != expected:
            raise Dalle2Error(f"weight file {str(path)!r}: tensor {name!r} has {stop - begin} bytes for shape "
                              f"{list(shape)} {dtype}; the file is corrupt, re-convert it")
        end = max(end, stop)
        out[name] = TensorInfo(shape, dtype)
    if 8 + n + end > size:
        raise Dalle2Error(f"weight file {str(path)!r} is truncated ({size} bytes, its header needs "
                          f"{8 + n + end}); re-convert or re-download it")
    return out


MODEL_FIX = "the file does not match its config in model.json; re-convert the model with `dalle2 convert`"
SOURCE_FIX = "the weights do not match the config.json beside them; download the source again"


def check_tensors(found: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], path: str | os.PathLike,
                  fix: str = MODEL_FIX) -> None:
    """Missing, unexpected and misshaped tensors each raise one line naming the tensor and the file, then `fix`
    (what to do: a model directory's file is re-converted, a source's re-downloaded)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    where = f"weight file {str(path)!r}"
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise Dalle2Error(f"{where} is missing tensor {missing[0]!r}{more}; {fix}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise Dalle2Error(f"{where} has unexpected tensor {unexpected[0]!r}{more}; {fix}")
    for name, shape in expected.items():
        if tuple(found[name].shape) != tuple(shape):
            raise Dalle2Error(f"{where}: tensor {name!r} has shape {list(found[name].shape)}, the config needs "
                              f"{list(shape)}; {fix}")


def component_path(model_dir: str | os.PathLike, spec: ModelSpec, name: str) -> Path:
    if name not in spec.components:
        have = ", ".join(spec.components) or "none"
        raise Dalle2Error(f"model {str(model_dir)!r} has no {name} (it has: {have}); use a model that includes it")
    return Path(model_dir) / spec.components[name].weights


def validate(model_dir: str | os.PathLike, spec: ModelSpec, shapes_of, names=None) -> None:
    """Check the component files (`names`, default all) against `shapes_of(type, config) -> {name: shape}`,
    reading only their headers: call it before allocating anything."""
    for name in spec.components if names is None else names:
        comp = spec.components[name]
        path = component_path(model_dir, spec, name)
        check_tensors(read_header(path), shapes_of(comp.type, comp.config), path)


def count_parameters(model_dir: str | os.PathLike, spec: ModelSpec) -> dict[str, tuple[int, list[str]]]:
    """{component: (parameter count, sorted dtypes)} from the headers alone."""
    out = {}
    for name in spec.components:
        infos = read_header(component_path(model_dir, spec, name)).values()
        out[name] = (sum(i.numel for i in infos), sorted({i.dtype for i in infos}))
    return out


# ---------------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out_dir`; on success rename it into place, on any error delete it.

    An existing `out_dir` is refused up front unless `overwrite`; then it is replaced only after the new one is
    complete, so an interrupted run never leaves a half-written model where a good one was.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise Dalle2Error(f"output {str(out_dir)!r} already exists; choose another path or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_spec(directory: str | os.PathLike, spec: ModelSpec) -> None:
    text = json.dumps(spec.to_dict(), indent=2) + "\n"
    (Path(directory) / MODEL_JSON).write_text(text, encoding="utf-8")


OUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def _encode(x: np.ndarray, tag: str) -> bytes:
    """Little-endian bytes of `x` as safetensors dtype `tag` (F32, F16, or BF16 with round-to-nearest-even)."""
    if tag == "BF16":  # NumPy has no bfloat16: keep the top 16 bits of the fp32 pattern, rounded to even
        u = np.ascontiguousarray(x, dtype="<f4").view("<u4").astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype("<u2").tobytes()
    return np.ascontiguousarray(x, dtype={"F32": "<f4", "F16": "<f2"}[tag]).tobytes()


def write_tensors(path: str | os.PathLike, entries: list[tuple[str, tuple[int, ...]]], get_tensor,
                  dtype: str = "float32", metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file one tensor at a time.

    `entries` are (name, shape) in file order, known up front (from the source's headers), so the header is
    written first and each tensor's bytes follow as `get_tensor(name)` returns it: peak memory is the largest
    single tensor, not the model. (The safetensors library only writes from a complete dict, hence this writer;
    the format is 8 bytes of header length, the JSON header padded to 8 bytes, then the raw data.)
    Every tensor is stored as `dtype`, whatever its type: the converters pass floating-point parameters only
    (integer buffers such as CLIP's position_ids are dropped before).
    """
    out_tag = OUT_DTYPES[dtype]
    header: dict[str, object] = {"__metadata__": dict(metadata or {})} if metadata else {}
    offset = 0
    for name, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPE_SIZES[out_tag]
        header[name] = {"dtype": out_tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in entries:
            x = np.asarray(get_tensor(name))
            if tuple(x.shape) != tuple(shape):
                raise Dalle2Error(f"tensor {name!r} read with shape {list(x.shape)}, its header said {list(shape)}")
            f.write(_encode(x, out_tag))
