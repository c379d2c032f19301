"""Read a reference checkpoint tensor by tensor: safetensors (single or sharded) or `.bin` pickles.

Safetensors are opened with `safe_open` and read one tensor at a time. `.bin` files go only through
`torch.load(weights_only=True)` (no arbitrary pickle code runs), memory-mapped where the file allows it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .. import store
from ..backends import get_backend, installed
from ..errors import Dalle2Error


REOPEN_BYTES = 256 * 2**20  # see Checkpoint._handle


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
        st = self._shards(f"{stem}{v}.safetensors")
        if st:
            for f in st:
                for name, info in store.read_header(f).items():  # checks for truncation up front
                    self._files[name], self._infos[name] = f, info
        else:
            bins = self._shards(f"{bin_stem}{v}.bin")
            if not bins:
                raise Dalle2Error(f"no weights in {str(self.folder)!r}: expected {stem}{v}.safetensors or "
                                  f"{bin_stem}{v}.bin; {self._variant_hint(stem, bin_stem, variant)}")
            for f in bins:
                sd = self._load_bin(f)
                self._bins[f] = sd
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

    def _shards(self, filename: str) -> list[Path]:
        single = self.folder / filename
        if single.is_file():
            return [single]
        index = self.folder / f"{filename}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise Dalle2Error(f"cannot read shard index {str(index)!r} ({e}); re-download it") from None
            return [self.folder / f for f in sorted(set(weight_map.values()))]
        return []

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
