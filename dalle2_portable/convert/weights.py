"""Read a reference checkpoint tensor by tensor: safetensors (single or sharded) or `.bin` pickles.

Safetensors are opened with `safe_open` and read one tensor at a time. `.bin` files go only through
`torch.load(weights_only=True)` (no arbitrary pickle code runs), memory-mapped where the file allows it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .. import store
from ..backends import get_backend, installed
from ..errors import Dalle2Error


REOPEN_BYTES = 256 * 2**20  # see Checkpoint._handle
_PROGRESS = contextvars.ContextVar("conversion_progress", default=None)  # the bar Checkpoint.get advances


@contextlib.contextmanager
def conversion_progress(total_bytes: int, desc: str):
    """A bar on stderr over the source bytes read while converting (on a terminal only: tqdm's disable=None),
    advanced by every `Checkpoint.get` inside the block."""
    from tqdm import tqdm

    with tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=None, leave=False) as bar:
        token = _PROGRESS.set(bar)
        try:
            yield bar
        finally:
            _PROGRESS.reset(token)


def source_bytes(folder: str | Path, stem: str, bin_stem: str | None = None, variant: str | None = None) -> int:
    """The tensor bytes a Checkpoint of `folder` reads: from the safetensors headers, else the .bin files'
    sizes (0 when the folder has neither: the converter then says what is missing)."""
    v = f".{variant}" if variant else ""
    files = shards(Path(folder), f"{stem}{v}.safetensors")
    if files:
        return sum(info.nbytes for f in files for info in store.read_header(f).values())
    return sum(f.stat().st_size for f in shards(Path(folder), f"{bin_stem or stem}{v}.bin"))


def shards(folder: Path, filename: str) -> list[Path]:
    """`folder/filename`, or the shards its `.index.json` lists; [] when there is neither."""
    single = folder / filename
    if single.is_file():
        return [single]
    index = folder / f"{filename}.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError("a shard name is not a string")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise Dalle2Error(f"cannot read shard index {str(index)!r} ({e}); re-download it") from None
        return [folder / n for n in names]
    return []


def _torch():
    try:
        import torch
    except ImportError:
        raise Dalle2Error("reading this checkpoint needs PyTorch (a .bin file or bfloat16 tensors); run "
                          "`pip install 'dalle2_portable[torch]'` or convert from .safetensors files") from None
    return torch


class Checkpoint:
    """The tensors of one component folder: `{stem}[.variant].safetensors` (or its `.index.json` shards),
    else `{bin_stem}[.variant].bin` (or its shards). transformers names them model / pytorch_model, diffusers
    diffusion_pytorch_model for both."""

    def __init__(self, folder: str | Path, stem: str, bin_stem: str | None = None, variant: str | None = None):
        self.folder = Path(folder)
        bin_stem = bin_stem or stem
        v = f".{variant}" if variant else ""
        self._files: dict[str, Path] = {}  # tensor name -> file
        self._bins: dict[Path, dict] = {}
        self._handles: dict[tuple[Path, str], object] = {}
        self._served = 0  # bytes read through the open handles
        self._infos: dict[str, store.TensorInfo] = {}
        st = shards(self.folder, f"{stem}{v}.safetensors")
        if st:
            for f in st:
                for name, info in store.read_header(f).items():  # checks for truncation up front
                    self._files[name], self._infos[name] = f, info
        else:
            bins = shards(self.folder, f"{bin_stem}{v}.bin")
            if not bins:
                raise Dalle2Error(f"no weights in {str(self.folder)!r}: expected {stem}{v}.safetensors or "
                                  f"{bin_stem}{v}.bin; {self._variant_hint(stem, bin_stem, variant)}")
            for f in bins:
                sd = self._load_bin(f)
                self._bins[f] = sd
                bar = _PROGRESS.get()
                if bar is not None:
                    bar.update(f.stat().st_size)
                for name, t in sd.items():
                    self._files[name] = f
                    self._infos[name] = store.TensorInfo(tuple(t.shape), str(t.dtype))
        self.files = sorted(set(self._files.values()))

    def _variant_hint(self, stem: str, bin_stem: str, variant: str | None) -> str:
        """What to do about missing weights: name the variants the folder does hold, if any."""
        found = sorted({p.name.split(".")[-2] for s in {stem, bin_stem} for p in self.folder.glob(f"{s}.*.*")
                        if p.name.count(".") == 2 and p.suffix in (".safetensors", ".bin")} - {variant})
        if found:
            return f"the folder holds variant files ({', '.join(found)}): pass --variant {found[0]}" + (
                "" if variant is None else " or check the variant name")
        return "check the source folder or download it completely"

    @staticmethod
    def _load_bin(path: Path) -> dict:
        torch = _torch()
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except Exception as e:  # noqa: BLE001  (any failure of an untrusted file becomes one line)
            raise Dalle2Error(f"cannot read checkpoint {str(path)!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); re-download it") from None

    def _handle(self, path: Path, framework: str, nbytes: int):
        """An open safe_open handle on `path`, reused for the next tensors. A handle memory-maps its whole file
        and every page a read touches stays resident until it is closed, so handles are closed once they have
        served REOPEN_BYTES: the process then holds at most that much of the source file (the page cache keeps
        the rest, reclaimable), not the whole 4 GB of Karlo's prior."""
        key = (path, framework)
        if key not in self._handles or self._served > REOPEN_BYTES:
            self._handles.clear()  # dropping a handle unmaps its file (arrays already read are copies)
            self._served = 0
            self._handles[key] = safe_open(path, framework=framework)
        self._served += nbytes
        return self._handles[key]

    def names(self) -> list[str]:
        return list(self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._infos[name].shape)

    def get(self, name: str) -> np.ndarray:
        """One tensor as a NumPy array (bfloat16 is widened to float32, which holds it exactly)."""
        array = self._get(name)
        bar = _PROGRESS.get()
        if bar is not None and self._files[name] not in self._bins:  # a .bin counts whole, when it is read
            bar.update(self._infos[name].nbytes)
        return array

    def _get(self, name: str) -> np.ndarray:
        path = self._files[name]
        if path in self._bins:
            t = self._bins[path][name]
            return t.float().numpy() if t.dtype == _torch().bfloat16 else t.numpy()
        try:
            if self._infos[name].dtype == "BF16":
                return self._handle(path, "pt", self._infos[name].nbytes).get_tensor(name).float().numpy()
            return self._handle(path, "numpy", self._infos[name].nbytes).get_tensor(name)
        except SafetensorError as e:
            raise Dalle2Error(f"cannot read tensor {name!r} from {str(path)!r} ({e}); re-download it") from None


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """The canonical names and shapes a component config needs, from the module tree of an installed backend
    (built without allocating: torch's meta device, MLX's lazy init). Converters check a source against it so
    that a mismatched checkpoint fails before anything is written."""
    have = installed()
    if not have:
        raise Dalle2Error("converting needs a backend to check shapes against; run "
                          "`pip install 'dalle2_portable[torch]'` or `pip install 'dalle2_portable[mlx]'`")
    backend = get_backend("torch" if "torch" in have else have[0])
    return backend.parameter_shapes(config.TYPE, config)


PROGRESS_BYTES = 100_000_000  # a component file at least this big is reported as written (conversion progress)


def write_component(ckpt: Checkpoint, names: list[str], config, path: Path, dtype: str) -> None:
    """Check the tensors `names` of `ckpt` against what `config` needs (names and shapes, one line naming the
    first difference), then stream them into the safetensors file `path` in `dtype`, one tensor at a time."""
    found = {n: store.TensorInfo(ckpt.shape(n), "F32") for n in names}
    store.check_tensors(found, expected_shapes(config), ckpt.files[0], store.SOURCE_FIX)
    store.write_tensors(path, [(n, ckpt.shape(n)) for n in names], ckpt.get, dtype)
    size = path.stat().st_size
    if size >= PROGRESS_BYTES:  # what a user waits for: Karlo's decoder is 2.3 GB, its upsampler 1.9 GB
        logging.getLogger("dalle2_portable").info(f"  wrote {path.stem}: {size / 1e6:,.1f} MB")
