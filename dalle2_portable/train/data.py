"""Training data: the dataset interface, the image folder, and the CLIP embedding cache. NumPy + Pillow only.

    ds = ImageFolder("pictures", size=64)          # DIR/metadata.jsonl: {"file_name": ..., "text": ...} per line
    ds = ShapesDataset(length=1000, seed=0)         # train/shapes.py: procedural, from a seed
    len(ds), ds.caption(0), ds.image(0)             # str, PIL RGB at the dataset's size
    ds.pixels([0, 1, 2])                            # float32 (3, 3, size, size) in [-1, 1]: the decoder's input
    emb = cache_embeddings(ds, clip, "run/cache")   # CLIP text condition + image embedding of every item, once
    emb.text_condition([0, 1]), emb.image_embeddings([0, 1])

The prior and the decoder are conditioned on frozen CLIP outputs, so `cache_embeddings` computes them once per
(dataset fingerprint, CLIP identity) and stores them as one safetensors file whose name holds both; a later
call with the same data and CLIP reads the file instead.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from .. import store
from ..clip import CLIP, TextCondition
from ..errors import Dalle2Error
from ..images import write_atomic, load_image

METADATA = "metadata.jsonl"
CACHE_FORMAT = "1"
RECORD_FIX = 'write one JSON object per line: {"file_name": "a.png", "text": "a caption"}'


class Dataset(ABC):
    """What every training dataset offers: a length, a caption and an RGB PIL image per index, the float32
    NCHW batch the decoder trains on, and a fingerprint that changes when the data changes."""

    size: int  # the training size, in pixels (square)

    @abstractmethod
    def __len__(self) -> int:
        """The number of items."""

    @abstractmethod
    def caption(self, i: int) -> str:
        """Item i's caption."""

    @abstractmethod
    def image(self, i: int, size: int | None = None) -> Image.Image:
        """Item i as an RGB PIL image of `size` x `size` px (default: the dataset's size)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A short stable string that changes when any item's picture or caption may have changed."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying what the data is (stored in the embedding cache's metadata)."""

    def pixels(self, indices, size: int | None = None) -> np.ndarray:
        """The items at `indices` as float32 (B, 3, size, size) in [-1, 1] (see `to_pixels`)."""
        return to_pixels([self.image(int(i), size) for i in indices])


def to_pixels(images: list[Image.Image]) -> np.ndarray:
    """RGB PIL images of one size -> float32 (B, 3, H, W) in [-1, 1]: u8 / 127.5 - 1, the inverse of
    `images.to_pil`'s rounding (so to_pil(to_pixels([im])[0]) is `im` again)."""
    u8 = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # (B, H, W, 3)
    x = np.ascontiguousarray(u8.transpose(0, 3, 1, 2), dtype=np.float32)
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return x


# ------------------------------------------------------------------------------------------- the image folder


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line number in metadata.jsonl
    file_name: str  # relative to the folder
    text: str


def warn_bad_record(message: str) -> None:
    """Report one skipped record on stderr (through Python's `warnings`, category `BadRecordWarning`)."""
    warnings.warn(message, BadRecordWarning, stacklevel=3)


class BadRecordWarning(UserWarning):
    """A record of an image folder's metadata.jsonl that was skipped."""


def _check_record(directory: Path, number: int, raw: bytes) -> Record | str:
    """Line `number` of metadata.jsonl -> its Record, or what is wrong with it and the fix."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text; save metadata.jsonl as UTF-8"
    except ValueError as e:
        return f"invalid JSON ({e}); {RECORD_FIX}"
    if not isinstance(obj, dict):
        return f"not a JSON object; {RECORD_FIX}"
    for key in ("file_name", "text"):
        if key not in obj:
            return f"missing key {key!r}; {RECORD_FIX}"
    name, text = obj["file_name"], obj["text"]
    if not isinstance(name, str) or not name.strip() or Path(name).is_absolute():
        return f"file_name {name!r} is not a file name relative to the folder; {RECORD_FIX}"
    if not isinstance(text, str) or not text.strip():
        return f"empty caption for {name!r}; write a caption in \"text\" or remove the line"
    path = directory / name
    if not path.is_file():
        return f"file {name!r} not found in {str(directory)!r}; add the file or remove the line"
    try:
        load_image(path)  # decoded completely: a damaged image is reported now, with its line
    except Dalle2Error as e:
        return f"{e} (or remove the line)"
    return Record(number, name, text.strip())


def read_metadata(directory: str | Path, strict: bool = False) -> tuple[list[Record], list[str]]:
    """DIR/metadata.jsonl -> (the usable records in file order, a one-line message per bad record).

    Blank lines are ignored. Each bad record (invalid JSON, a missing key, a missing file, an image Pillow
    cannot decode, an empty caption) gives one message "PATH:LINE: problem; fix" and is skipped; with `strict`
    the first one raises it as a `Dalle2Error` instead."""
    directory = Path(directory)
    meta = directory / METADATA
    if not directory.is_dir():
        raise Dalle2Error(f"image folder {str(directory)!r} does not exist; give a folder holding {METADATA} "
                          "and the images")
    if not meta.is_file():
        raise Dalle2Error(f"{str(directory)!r} has no {METADATA}; write one JSON object per line with "
                          '"file_name" (relative to the folder) and "text" (the caption), the Hugging Face '
                          "imagefolder convention")
    try:
        lines = meta.read_bytes().split(b"\n")
    except OSError as e:
        raise Dalle2Error(f"cannot read {str(meta)!r} ({e.strerror or e}); check its permissions") from None
    records, problems = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        found = _check_record(directory, number, raw)
        if isinstance(found, Record):
            records.append(found)
            continue
        message = f"{str(meta)}:{number}: {found}"
        if strict:
            raise Dalle2Error(f"{message} (strict mode stops at the first bad record)")
        problems.append(message)
    return records, problems


class ImageFolder(Dataset):
    """A folder of images with captions in `metadata.jsonl` (the Hugging Face imagefolder convention).

    Bad records are skipped and listed in `problems` (one line each, with the line number; with `warn`, each
    is also a `BadRecordWarning` on stderr); `strict` raises the first one instead. Images load through
    `images.load_image` (RGB, transparency over white, EXIF orientation) and are centre-cropped to a square and
    resized to the training size (`ImageOps.fit`, Lanczos)."""

    def __init__(self, directory: str | Path, size: int = 64, strict: bool = False, warn: bool = True):
        if int(size) < 8:
            raise Dalle2Error(f"image folder: the training size must be at least 8 px, got {size}; pass a larger "
                              "size")
        self.directory, self.size = Path(directory), int(size)
        self.records, self.problems = read_metadata(self.directory, strict)
        if warn:
            for message in self.problems:
                warn_bad_record(message)
        if not self.records:
            first = f" (first problem: {self.problems[0]})" if self.problems else ""
            raise Dalle2Error(f"image folder {str(self.directory)!r} has no usable record in {METADATA}{first}; "
                              f"{RECORD_FIX}, each naming an image in the folder")

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, i: int) -> str:
        return self.records[i].text

    def path(self, i: int) -> Path:
        return self.directory / self.records[i].file_name

    def image(self, i: int, size: int | None = None) -> Image.Image:
        side = size or self.size
        return ImageOps.fit(load_image(self.path(i)), (side, side), method=Image.Resampling.LANCZOS)

    def fingerprint(self) -> str:
        """Changes when any record's file name, caption, or file (size, modification time) changes."""
        h = hashlib.sha1()
        for i, r in enumerate(self.records):
            try:
                st = self.path(i).stat()
            except OSError as e:
                raise Dalle2Error(f"{str(self.path(i))!r} (line {r.line} of {METADATA}): {e.strerror or e}; "
                                  "restore the file or remove the line") from None
            h.update(json.dumps([r.file_name, st.st_size, st.st_mtime_ns, r.text]).encode() + b"\n")
        return h.hexdigest()[:16]

    def describe(self) -> str:
        return f"image folder {str(self.directory.absolute())} ({len(self)} records)"


# ------------------------------------------------------------------------------------- the embedding cache


def clip_identity(clip: CLIP) -> str:
    """A fingerprint of what a CLIP computes: its model.json (source repo and revision, configs, tokenizer and
    image-processor settings), the weight files of its loaded towers and its tokenizer files (names, sizes,
    modification times), and the backend's compute dtype."""
    h = hashlib.sha1()
    for name in sorted(clip.modules):  # each tower's model (two, when the image tower is another model's)
        model_dir, spec = clip.origins[name]
        h.update((Path(model_dir) / store.MODEL_JSON).read_bytes())
        files = [store.component_path(model_dir, spec, name)]
        files += sorted(p for p in (Path(model_dir) / "tokenizer").rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"{name}:{p.relative_to(model_dir)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(f"dtype={clip.backend.dtype}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Embeddings:
    """The frozen CLIP outputs of every item of a dataset, row i = item i (NumPy; float32, mask bool).

    `text` holds the caption condition (embeds (N, P), states (N, L, D), mask (N, L)); `image_embeds` (N, P) is
    None when the CLIP has no image tower. `loaded` says whether they were read from `path` (else computed)."""

    text: TextCondition
    image_embeds: np.ndarray | None
    path: Path
    clip_model: str
    loaded: bool

    def __len__(self) -> int:
        return len(self.text)

    def text_condition(self, indices) -> TextCondition:
        idx = np.asarray(indices, dtype=np.int64)
        return TextCondition(self.text.embeds[idx], self.text.states[idx], self.text.mask[idx])

    def image_embeddings(self, indices=None) -> np.ndarray:
        """The CLIP image embeddings of `indices` (all rows if None); one line if the CLIP had no image tower."""
        if self.image_embeds is None:
            raise Dalle2Error(f"the CLIP model {self.clip_model!r} has no image encoder, so the embedding cache "
                              f"{self.path.name} holds text only, and the prior and the decoder train on CLIP "
                              "image embeddings; pass a CLIP model with an image tower (for Karlo: "
                              "openai/clip-vit-large-patch14)")
        return self.image_embeds if indices is None else self.image_embeds[np.asarray(indices, dtype=np.int64)]


def cache_path(dataset: Dataset, clip: CLIP, directory: str | Path) -> Path:
    """Where the embeddings of `dataset` under `clip` are cached: the name holds both fingerprints."""
    return _cache_file(directory, dataset.fingerprint(), clip_identity(clip))


def _cache_file(directory: str | Path, data_key: str, clip_key: str) -> Path:
    return Path(directory) / f"clip-embeddings-{data_key}-{clip_key}.safetensors"


def embedding_size(clip: CLIP) -> int:
    """The square side items are drawn at for CLIP's image tower: the preprocessor's resize target (so its
    resize is a no-op and its centre crop sees the whole square), or its crop size when it does not resize."""
    p = clip.image_processor
    return p.shortest_edge if p.do_resize else max(p.crop_height, p.crop_width)


def cache_embeddings(dataset: Dataset, clip: CLIP, directory: str | Path, batch_size: int = 64,
                     progress: bool = False) -> Embeddings:
    """The CLIP text condition of every caption and (if `clip` has an image tower) the CLIP image embedding of
    every image, read from `directory` when cached for this dataset fingerprint and CLIP identity, else computed
    in batches of `batch_size` and written there atomically (a temporary file renamed into place).

    Each distinct caption is encoded once. Images are embedded from `dataset.image(i, embedding_size(clip))`:
    the source drawn at CLIP's input size, not the (smaller) training size. A cache file that cannot be read or
    does not match the dataset's length is computed again and replaced."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data_key, clip_key = dataset.fingerprint(), clip_identity(clip)
    path = _cache_file(directory, data_key, clip_key)
    has_images = "image_encoder" in clip.modules
    arrays = _read_cache(path, len(dataset), has_images)
    loaded = arrays is not None
    if not loaded:
        arrays = _compute(dataset, clip, max(1, int(batch_size)), progress)
        source = clip.spec.source
        metadata = {"format": CACHE_FORMAT, "dataset": dataset.describe(), "dataset_fingerprint": data_key,
                    "clip_identity": clip_key, "clip_model":
                    str(Path(clip.model_dir).absolute()), "clip_source": f"{source.repo}@{source.revision}",
                    "dtype": clip.backend.dtype, "count": str(len(dataset))}
        blob = safetensors_bytes(arrays, metadata=metadata)
        write_atomic(path, lambda f: f.write(blob), True, ".safetensors")
    text = TextCondition(arrays["text_embeds"], arrays["text_states"], arrays["text_mask"].astype(bool))
    return Embeddings(text, arrays.get("image_embeds"), path, str(clip.model_dir), loaded)


def _read_cache(path: Path, count: int, has_images: bool) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}).get("format") != CACHE_FORMAT:
                return None
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # damaged: compute again
        return None
    needed = ["text_embeds", "text_states", "text_mask"] + (["image_embeds"] if has_images else [])
    if any(k not in arrays or len(arrays[k]) != count for k in needed):
        return None
    return arrays


def _compute(dataset: Dataset, clip: CLIP, batch_size: int, progress: bool) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    n = len(dataset)
    captions = [dataset.caption(i) for i in range(n)]
    distinct = list(dict.fromkeys(captions))
    has_images = "image_encoder" in clip.modules
    bar = tqdm(total=len(distinct) + (n if has_images else 0), desc="CLIP embeddings", unit="item",
               disable=not progress, file=sys.stderr, leave=False)
    with bar:
        parts = []
        for b in range(0, len(distinct), batch_size):
            parts.append(clip.text_condition(distinct[b:b + batch_size]))
            bar.update(len(parts[-1]))
        cond = TextCondition.cat(*parts)
        row = {c: j for j, c in enumerate(distinct)}
        rows = np.array([row[c] for c in captions], dtype=np.int64)
        out = {"text_embeds": cond.embeds[rows].astype(np.float32), "text_states":
               cond.states[rows].astype(np.float32), "text_mask": cond.mask[rows].astype(bool)}
        if has_images:
            side, embeds = embedding_size(clip), []
            for b in range(0, n, batch_size):
                embeds.append(clip.encode_image([dataset.image(i, side) for i in range(b, min(n, b + batch_size))]))
                bar.update(len(embeds[-1]))
            out["image_embeds"] = np.concatenate(embeds).astype(np.float32)
    return out
