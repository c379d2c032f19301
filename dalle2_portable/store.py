"""The model directory on disk: read and validate `model.json` and the weight files, write atomically.

    my-model/
      model.json                   the ModelSpec (spec.py), format 1; "files": each file's size and SHA-256;
                                   optional "about": free-form notes on how the model was made
      <component>.safetensors      canonical names, PyTorch layout (conv weights OIHW)
      tokenizer/                   vocab.json + merges.txt, or tokenizer.model

Loading validates before it allocates: the safetensors headers are read (names, shapes, dtypes, and that the
file is as long as its header says) and compared with the shapes the backend's module tree expects, so a bad
file fails in milliseconds with one line naming the tensor and the file, before any weight is read. Then the
files' checksums are verified (checksums.py says when a big file is hashed and when it is trusted; the
packaged default model, DEFAULT_MODEL_DIR, is hashed in full on every load). "files" and "about" are outside
the ModelSpec: `write_spec` computes "files" from the directory itself, and a model derived from another (the
training loop's) carries no "about" unless its writer gives one.
Writing happens in a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import checksums
from .errors import Dalle2Error, Dalle2Warning
from .paths import inside, stale, temporary
from .spec import ModelSpec

MODEL_JSON = "model.json"
DEFAULT = "default"  # the model name of the packaged model (the bare word; a folder so named is ./default)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"  # package data, filled at release

# safetensors dtype tags -> bytes per element (the header gives shapes and byte offsets)
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


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


def _model_json(model_dir: str | os.PathLike) -> dict:
    """model.json's content; every problem is one line naming the path and the fix."""
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
    return d


def read_spec(model_dir: str | os.PathLike) -> ModelSpec:
    """Parse `model.json`; every problem is one line naming the path and the fix."""
    return ModelSpec.from_dict(_model_json(model_dir))


def read_checksums(model_dir: str | os.PathLike) -> dict[str, dict] | None:
    """model.json's "files" ({path: {size, sha256}}), or None for a model.json written without them."""
    return checksums.parse(_model_json(model_dir).get("files"), str(Path(model_dir) / MODEL_JSON))


def read_about(model_dir: str | os.PathLike) -> dict | None:
    """model.json's "about" (how the model was made: recipe, steps, data, accuracy, ...), or None."""
    about = _model_json(model_dir).get("about")
    return None if about is None else check_about(about, str(Path(model_dir) / MODEL_JSON))


_SCALARS = (str, int, float, bool, type(None))


def check_about(about, where: str = "about") -> dict:
    """An "about" block is a JSON object of strings and numbers (or lists of them, or objects of those)."""
    def ok(v, depth: int) -> bool:
        if isinstance(v, _SCALARS):
            return True
        if isinstance(v, list):
            return all(isinstance(x, _SCALARS) for x in v)
        return isinstance(v, dict) and depth < 3 and all(isinstance(k, str) and ok(x, depth + 1) for k, x in v.items())

    if not isinstance(about, dict) or not ok(about, 0):
        raise Dalle2Error(f"{where}: \"about\" must be an object of strings and numbers (or lists of them, or "
                          "objects of those, 3 levels at most)")
    return about


def flat_about(about: dict, prefix: str = "") -> list[tuple[str, str]]:
    """[("steps.prior", "2000"), ("data", "shapes"), ...]: an about block as `dalle2 info` prints it."""
    out = []
    for k, v in about.items():
        if isinstance(v, dict):
            out += flat_about(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", ", ".join(map(str, v)) if isinstance(v, list) else str(v)))
    return out


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Names, shapes and dtypes of a safetensors file, without reading the tensors.

    The header is checked as safetensors itself checks it (a JSON object of {dtype, shape, data_offsets}
    entries, a string-to-string `__metadata__`, the tensors' bytes back to back from 0 covering the rest of the
    file exactly), and against the dtypes this package reads, so that no file reaches a backend's loader that it
    would reject with a traceback (or worse); a truncated download or copy is reported here, naming the file,
    and not as a crash halfway through loading.
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
            header = json.loads(f.read(n), parse_constant=_not_json)  # NaN / Infinity: strict JSON parsers refuse
        entries = _header_entries(header)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise Dalle2Error(f"weight file {str(path)!r} is not a readable safetensors file ({e}); "
                          "re-convert or re-download it") from None
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, (shape, dtype, begin, stop) in sorted(entries.items(), key=lambda e: e[1][2:]):
        if begin != end:
            raise Dalle2Error(f"weight file {str(path)!r}: tensor {name!r} starts at byte {begin}, not at {end} "
                              "where the data before it ends; the file is corrupt, re-convert or re-download it")
        expected = int(np.prod(shape, dtype=object)) * _DTYPE_SIZES[dtype]
        if stop - begin != expected:
            raise Dalle2Error(f"weight file {str(path)!r}: tensor {name!r} has {stop - begin} bytes for shape "
                              f"{list(shape)} {dtype}; the file is corrupt, re-convert it")
        end = stop
        out[name] = TensorInfo(shape, dtype)
    if 8 + n + end > size:
        raise Dalle2Error(f"weight file {str(path)!r} is truncated ({size} bytes, its header needs "
                          f"{8 + n + end}); re-convert or re-download it")
    if 8 + n + end < size:
        raise Dalle2Error(f"weight file {str(path)!r} has {size - 8 - n - end} bytes after its last tensor; the "
                          "file is corrupt, re-convert or re-download it")
    return {name: out[name] for name in entries}  # the file's own order


def _not_json(word: str):
    raise ValueError(f"{word} is not JSON")


def _header_entries(header) -> dict[str, tuple[tuple[int, ...], str, int, int]]:
    """{name: (shape, dtype, begin, end)} of a parsed safetensors header; ValueError naming what is wrong."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("its __metadata__ is not a map of strings")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ValueError(f"tensor {name!r} lacks dtype, shape or data_offsets")
        shape, dtype, offsets = entry["shape"], entry["dtype"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ValueError(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
        if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
            raise ValueError(f"tensor {name!r} has dtype {dtype!r}; readable are {', '.join(_DTYPE_SIZES)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end]")
        out[name] = (tuple(shape), dtype, offsets[0], offsets[1])
    return out


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


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
    return inside(model_dir, spec.components[name].weights, f"model.json component {name!r}")


def validate(model_dir: str | os.PathLike, spec: ModelSpec, shapes_of, names=None) -> None:
    """Check the component files (`names`, default all) against their recorded checksums (with the
    tokenizer's for the text encoder), then against `shapes_of(type, config) -> {name: shape}`, reading only
    their headers: call it before allocating anything. Checksums first: a changed file is then reported as
    changed, with the fix for where it came from, whatever its header reads."""
    names = list(spec.components if names is None else names)
    verify_checksums(model_dir, spec, names)
    for name in names:
        comp = spec.components[name]
        path = component_path(model_dir, spec, name)
        if comp.quantization is None:
            check_tensors(read_header(path), shapes_of(comp.type, comp.config), path)
        else:  # the backend's view of the quantised module (quantize.py): packed weights, scales, biases
            check_tensors(read_header(path), shapes_of(comp.type, comp.config, comp.quantization), path,
                          "the file does not match the quantization model.json records; quantize the float model "
                          "again with `dalle2 quantize`")


def is_default_model(model_dir: str | os.PathLike) -> bool:
    return Path(model_dir).resolve() == Path(DEFAULT_MODEL_DIR).resolve()


def corruption_fix(model_dir: str | os.PathLike) -> str:
    """What to do about a corrupted file of this model directory."""
    if is_default_model(model_dir):
        return "reinstall dalle2_portable (pip install --force-reinstall dalle2_portable)"
    from .convert import cache_dir

    if Path(cache_dir()).resolve() in Path(model_dir).resolve().parents:
        return f"delete {str(model_dir)!r} and load the model again to re-convert it"
    return "re-convert the model with `dalle2 convert` (or copy or download it again)"


def verify_checksums(model_dir: str | os.PathLike, spec: ModelSpec, names=None, full: bool = False) -> int:
    """Verify the recorded checksums of the components `names` (default all; the text encoder brings the
    tokenizer files) as checksums.py's policy says; the default model always in full, and it must have them.
    A model.json without checksums is not checked. Returns the bytes hashed."""
    files = read_checksums(model_dir)
    default = is_default_model(model_dir)
    if files is None:
        if default:
            raise Dalle2Error(f"the default model's {MODEL_JSON} in {str(model_dir)!r} records no checksums; "
                              "record them with `dalle2 verify default --record` (or reinstall dalle2_portable)")
        return 0
    names = list(spec.components if names is None else names)
    rels = [Path(spec.components[n].weights).as_posix() for n in names]
    if "text_encoder" in names:
        rels += [r for r in files if r.startswith("tokenizer/")]
    return checksums.verify(model_dir, files, rels, corruption_fix(model_dir), full=full or default)


def verify_model(model_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """`dalle2 verify`: hash every file model.json names, ignoring the cache; [(path, size)] when all match."""
    spec = read_spec(model_dir)
    files = read_checksums(model_dir)
    fix = "record them with `dalle2 verify MODEL --record` once you trust the files"
    if files is None:
        raise Dalle2Error(f"{str(Path(model_dir) / MODEL_JSON)!r} records no checksums (written by an earlier "
                          f"version); {fix}")
    unrecorded = [r for r in model_files(model_dir, spec) if r not in files]
    if unrecorded:
        raise Dalle2Error(f"{str(Path(model_dir) / MODEL_JSON)!r} records no checksum for {unrecorded[0]!r}; {fix}")
    checksums.verify(model_dir, files, list(files), corruption_fix(model_dir), full=True)
    return [(r, files[r]["size"]) for r in files]


def model_files(directory: str | os.PathLike, spec: ModelSpec) -> list[str]:
    """The files a model directory consists of, relative: each component's weights, and every file under
    tokenizer/ when the spec has a tokenizer."""
    rels = [Path(c.weights).as_posix() for c in spec.components.values()]
    tok = Path(directory) / "tokenizer"
    if spec.tokenizer is not None and tok.is_dir():
        rels += sorted(p.relative_to(directory).as_posix() for p in tok.rglob("*") if p.is_file())
    return rels


def count_parameters(model_dir: str | os.PathLike, spec: ModelSpec) -> dict[str, tuple[int, list[str]]]:
    """{component: (parameter count, sorted dtypes)} from the headers alone; a quantised layer counts the weights
    its packed words hold, not its scales and biases (quantize.py)."""
    out = {}
    for name, comp in spec.components.items():
        header = read_header(component_path(model_dir, spec, name))
        q = comp.quantization
        count = 0
        for key, info in header.items():
            prefix = key.rpartition(".")[0] + "."
            packed = q is not None and f"{prefix}scales" in header
            if packed and key.endswith((".scales", ".biases")):
                continue
            count += info.numel * (32 // q.bits) if packed and key.endswith(".weight") else info.numel
        out[name] = (count, sorted({i.dtype for i in header.values()}))
    return out


# ---------------------------------------------------------------------------------------------------- writing


def leftovers(out_dir: str | os.PathLike) -> list[Path]:
    """The temporary siblings of `out_dir` that interrupted writes left (a process killed with SIGKILL, or a
    machine that lost power, cleans nothing up): `.NAME.partial-PID-*` / `.NAME.old-PID-*` of a process that is
    gone. Those of a live process are its work in progress and are not listed."""
    out_dir = Path(out_dir).absolute()
    return [p for p in stale(out_dir, ("partial", "old")) if p.is_dir()]


def sweep_leftovers(out_dir: str | os.PathLike) -> int:
    """Delete `leftovers(out_dir)`, saying so (a Dalle2Warning: one line); returns the bytes freed."""
    found = leftovers(out_dir)
    if not found:
        return 0
    freed = sum(directory_size(p) for p in found)
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    warnings.warn(Dalle2Warning(f"removed {len(found)} folder(s) an interrupted write of {str(out_dir)!r} left "
                                f"behind ({freed / 1e6:,.1f} MB)"), stacklevel=3)
    return freed


def directory_size(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out_dir`; on success rename it into place, on any error delete it.

    An existing `out_dir` is refused up front unless `overwrite`; then it is replaced only after the new one is
    complete, so an interrupted run never leaves a half-written model where a good one was.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise Dalle2Error(f"output {str(out_dir)!r} already exists; choose another path or pass --force "
                          "(overwrite=True)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Dalle2Error(f"cannot create {str(out_dir.parent)!r}: {e.strerror or e}; choose a location you can "
                          "write to") from None
    if not os.access(out_dir.parent, os.W_OK):  # before any long work
        raise Dalle2Error(f"cannot write in {str(out_dir.parent)!r}: it is read-only here; choose another location")
    sweep_leftovers(out_dir)
    tmp = temporary(out_dir, "partial")
    try:  # made inside the try: a signal right after it is made still removes it
        tmp.mkdir()
        yield tmp
        if out_dir.exists():
            old = temporary(out_dir, "old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno is not None:  # a full disk, a read-only or vanished location
            raise Dalle2Error(f"cannot write {str(out_dir)!r}: {e.strerror or e}; check the free space and the "
                              "permissions there (nothing was left behind)") from None
        raise


def write_spec(directory: str | os.PathLike, spec: ModelSpec, about: dict | None = None) -> None:
    """Write `model.json` for the files already in `directory`: the spec, each file's size and SHA-256
    ("files", computed here from the files themselves), and `about` if given. The file is replaced atomically,
    so rewriting it in a finished model directory (`dalle2 verify --record`) is safe too."""
    d = spec.to_dict()
    d["files"] = checksums.record(directory, model_files(directory, spec))
    if about is not None:
        d["about"] = check_about(about)
    path = Path(directory) / MODEL_JSON
    tmp = temporary(path)
    try:
        tmp.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise Dalle2Error(f"cannot write {str(path)!r} ({e}); check the folder is writable and has space") from None


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
