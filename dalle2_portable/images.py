"""Image in and out: loading, RGB conversion, CLIP preprocessing, PNG writing with metadata.

NumPy + Pillow only (no torch/mlx): the backends receive the float32 arrays built here.

`clip_preprocess` reproduces transformers' `CLIPImageProcessorPil` (transformers 5.23.0,
`image_processing_backends.PilBackend._preprocess` with the numpy helpers of `image_transforms.py`) bit for bit:

    to RGB (uint8)  ->  PIL resize, shortest side = shortest_edge (uint8 in, uint8 out)
                    ->  centre crop on the uint8 array (zero padding where the image is smaller than the crop)
                    ->  float64 * rescale_factor, cast to float32
                    ->  (x - mean) / std in float32

Each step is skipped when its `do_*` flag is off, as there.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import Dalle2Error, Dalle2Warning
from .paths import stale, temporary
from .spec import ImageProcessorConfig, unsupported

ImageSource = Union[str, "os.PathLike[str]", Image.Image]

# Modes whose alpha band (or palette/colour-key transparency, see `_has_alpha`) is composited onto white.
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255, 255)
_PIL_FORMATS = "PNG, JPEG, WebP, GIF, BMP, TIFF, ..."


# ----------------------------------------------------------------------------------------------------- loading


def load_image(src: ImageSource) -> Image.Image:
    """A path (str / PathLike) or a PIL image -> a fully loaded PIL image in mode RGB.

    The file is decoded completely here (`Image.load()`), so a truncated or corrupt file fails now with a
    one-line `Dalle2Error` naming it, not later inside a model. The EXIF orientation tag is applied
    (`ImageOps.exif_transpose`, as diffusers' `load_image` does), so phone photos come out upright.
    Transparency is composited onto white and high-bit-depth greyscale is scaled down: see `to_rgb`.
    """
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "") or "<PIL image>"
        try:
            src.load()
        except Exception as e:  # a lazily opened PIL image whose data is bad
            raise _read_error(name, e) from None
        return to_rgb(_exif_upright(src))
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"load_image: expected a path or a PIL image, got {type(src).__name__}")
    path = os.fspath(src)
    if os.path.isdir(path):  # Image.open would say PermissionError on Windows
        raise _read_error(path, IsADirectoryError())
    try:
        with Image.open(path) as im:
            im.load()  # decode everything now: truncation errors surface here
            image = _exif_upright(im)
            if image is im:
                image = im.copy()  # detach from the file that the `with` closes
    except Exception as e:
        raise _read_error(path, e) from None
    return to_rgb(image)


def _exif_upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # a malformed EXIF block: keep the pixels as stored, like browsers do
        return image


def _read_error(path: str, e: BaseException) -> Dalle2Error:
    """The one-line error for an image that cannot be read, with what to do about it."""
    where = f"cannot read image {path!r}"
    if isinstance(e, FileNotFoundError):
        return Dalle2Error(f"{where}: no such file; check the path")
    if isinstance(e, IsADirectoryError):
        return Dalle2Error(f"{where}: it is a directory, not an image file; pass the path of an image file")
    if isinstance(e, PermissionError):
        return Dalle2Error(f"{where}: permission denied; check the file's permissions")
    if isinstance(e, UnidentifiedImageError):
        return Dalle2Error(f"{where}: not an image file Pillow can open ({_PIL_FORMATS}); "
                           "convert it to PNG or JPEG")
    if isinstance(e, Image.DecompressionBombError):
        return Dalle2Error(f"{where}: the image is too large to decode safely ({e}); downscale it first")
    # OSError("image file is truncated ..."), SyntaxError / ValueError from a plugin's parser, zlib errors, ...
    return Dalle2Error(f"{where}: the file is damaged or truncated ({type(e).__name__}: {e}); "
                       "re-export or re-download it")


# ----------------------------------------------------------------------------------------------- to RGB


def _has_alpha(image: Image.Image) -> bool:
    # An alpha band, or a `transparency` entry (palette index, grey or RGB colour key from a PNG tRNS chunk / GIF).
    # transformers tests `"A" in getbands()`, which is also true for the LAB colour space; LAB has no alpha.
    return image.mode in _ALPHA_MODES or image.info.get("transparency") is not None


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """RGBA -> RGB over an opaque white background (exactly transformers' `convert_to_rgb`; for a fully opaque
    image Pillow's `alpha_composite` returns the source pixels unchanged)."""
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """I;16* / I / F -> (uint8 grey (H, W), alpha (H, W) uint8 or None from a colour-key `transparency`).

    The scale is the range the values are stored in, not Pillow's `convert` (which clips every value above 255
    to 255, so a 16-bit photo becomes almost all white):
      I;16, I;16L, I;16B, I;16N  full 16-bit range: round(v / 257)   (65535 -> 255, 32768 -> 128, 257 -> 1)
      I (int32)                  0..255 -> kept as 8-bit; 0..65535 -> as 16-bit (older Pillow opened 16-bit
                                 PNGs as I); any other range (negative or > 65535) -> min..max stretched to 0..255
      F (float32)                0..1 -> v * 255; 0..255 -> kept; any other range -> min..max stretched;
                                 NaN counts as 0
    Rounding is half up: floor(x + 0.5).
    """
    a = np.asarray(image)  # (H, W): uint16 / >u2 / int32 / float32
    key = image.info.get("transparency")
    alpha = None
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = np.where(a == key, 0, 255).astype(np.uint8)  # grey colour key from a 16-bit PNG's tRNS chunk
    x = a.astype(np.float64)
    if image.mode == "F":
        x = np.nan_to_num(x, nan=0.0, posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).min)
    if image.mode in _INT16_MODES:
        scaled = x / 257.0
    else:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if image.mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = x * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            scaled = x
        elif image.mode == "I" and lo >= 0.0 and hi <= 65535.0:
            scaled = x / 257.0
        elif hi > lo:
            scaled = (x - lo) * (255.0 / (hi - lo))
        else:
            scaled = np.clip(x, 0.0, 255.0)
    grey = np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)
    return grey, alpha


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> mode RGB (the input itself when it already is RGB without transparency).

    - RGBA, LA, PA, RGBa, La and any mode with a `transparency` key (P with a transparent palette entry, L/RGB
      with a PNG colour key) are alpha-composited onto WHITE: a transparent logo stays a logo on white, not a
      black square. Fully opaque RGBA gives exactly `image.convert("RGB")`. This is what transformers'
      `convert_to_rgb` does, so `clip_preprocess` matches `CLIPImageProcessor` on these modes.
    - P, CMYK, L, 1, YCbCr, HSV, LAB, RGBX: Pillow's `convert("RGB")` (CMYK without ICC colour management).
    - I;16 / I;16L / I;16B / I;16N, I, F: scaled to 8 bits by their stored range (see `_high_bit_depth_to_l`;
      I;16: round(v / 257)), then grey -> RGB. Here we deliberately differ from transformers, which calls
      `convert("RGB")` and so clips every 16-bit value above 255 to white.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_rgb: expected a PIL image, got {type(image).__name__}")
    mode = image.mode
    if mode in _INT16_MODES or mode in ("I", "F"):
        grey, alpha = _high_bit_depth_to_l(image)
        if alpha is None:
            return Image.fromarray(grey).convert("RGB")  # (H, W) uint8 -> L -> RGB
        la = Image.fromarray(np.stack([grey, alpha], axis=-1))  # (H, W, 2) uint8 -> LA
        return _composite_on_white(la.convert("RGBA"))
    if _has_alpha(image):
        if mode == "La":  # premultiplied; Pillow converts La only to LA
            image = image.convert("LA")
        return _composite_on_white(image.convert("RGBA"))
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise Dalle2Error(f"cannot convert an image of mode {mode!r} to RGB ({e}); "
                          "save it as an 8-bit RGB PNG or JPEG first") from None


# ------------------------------------------------------------------------------------------ CLIP preprocessing


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(new_height, new_width) with the shorter side = `shortest_edge`, the longer one truncated toward zero.

    transformers `image_transforms.get_resize_output_image_size(image, size, default_to_square=False)` (itself
    torchvision's rule): `int(size * long / short)` in Python float arithmetic; a square gives (size, size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """(C, H, W) -> (C, crop_height, crop_width), transformers `image_transforms.center_crop` exactly.

    Offsets are floor((H - h) / 2) and floor((W - w) / 2), so an odd surplus loses its extra row at the bottom
    (torchvision's CenterCrop, as used by OpenAI's CLIP, rounds half to even instead: for H - h = 3 it starts
    at row 2, transformers at row 1). Where the image is smaller than the crop it is first zero-padded to
    max(H, h) x max(W, w) with ceil(pad / 2) before, then cropped; zeros are black in pixel space."""
    orig_h, orig_w = image.shape[-2:]
    top = (orig_h - crop_height) // 2
    bottom = top + crop_height
    left = (orig_w - crop_width) // 2
    right = left + crop_width
    if top >= 0 and bottom <= orig_h and left >= 0 and right <= orig_w:
        return image[..., top:bottom, left:right]
    new_h, new_w = max(crop_height, orig_h), max(crop_width, orig_w)
    padded = np.zeros_like(image, shape=image.shape[:-2] + (new_h, new_w))
    top_pad = math.ceil((new_h - orig_h) / 2)
    left_pad = math.ceil((new_w - orig_w) / 2)
    padded[..., top_pad:top_pad + orig_h, left_pad:left_pad + orig_w] = image
    top, bottom, left, right = top + top_pad, bottom + top_pad, left + left_pad, right + left_pad
    return padded[..., max(0, top):min(new_h, bottom), max(0, left):min(new_w, right)]


def _resample(code: int) -> Image.Resampling:
    try:
        return Image.Resampling(code)
    except ValueError:
        raise unsupported("resample", code, "image processor config",
                          [f"{int(r)} ({r.name})" for r in Image.Resampling]) from None


def _preprocess_one(image: Image.Image, config: ImageProcessorConfig) -> np.ndarray:
    """RGB PIL image -> (3, h, w): float32 if rescaled or normalised, else uint8."""
    if config.do_resize:
        new_h, new_w = resize_output_size(image.height, image.width, config.shortest_edge)
        # transformers resizes the uint8 image through PIL (its `_rescale_for_pil_conversion` leaves uint8 as is)
        image = image.resize((new_w, new_h), resample=_resample(config.resample))
    x = np.asarray(image).transpose(2, 0, 1)  # (H, W, 3) uint8 -> (3, H, W)
    if config.do_center_crop:
        x = center_crop(x, config.crop_height, config.crop_width)
    if config.do_rescale:
        # image_transforms.rescale: upcast to float64, multiply, then cast to float32
        x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        # image_transforms.normalize: integer input -> float32; mean/std cast to the image's float dtype
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        if len(config.image_mean) != 3 or len(config.image_std) != 3:
            raise Dalle2Error(f"image processor config: image_mean and image_std need 3 values (RGB), got "
                              f"{len(config.image_mean)} and {len(config.image_std)}")
        mean = np.array(config.image_mean, dtype=x.dtype)[:, None, None]
        std = np.array(config.image_std, dtype=x.dtype)[:, None, None]
        x = (x - mean) / std
    return x


def clip_preprocess(images: ImageSource | Sequence[ImageSource], config: ImageProcessorConfig) -> np.ndarray:
    """Image(s) -> pixel values, float32 (B, 3, crop_height, crop_width), as `CLIPImageProcessor` computes them.

    `images`: one PIL image or path, or a sequence of them. PIL images go through `to_rgb` only (so the result
    equals transformers' on the same PIL image); paths go through `load_image` (which also applies EXIF
    orientation). Then resize / centre crop / rescale / normalise as in the module docstring. With
    do_center_crop off the spatial size is the resized one and all images of a batch must agree on it.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    out = []
    for im in images:
        rgb = to_rgb(im) if isinstance(im, Image.Image) else load_image(im)
        out.append(_preprocess_one(rgb, config))
    if not out:
        return np.zeros((0, 3, config.crop_height, config.crop_width), np.float32)
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        raise Dalle2Error(f"cannot batch images of different sizes {sorted(s[1:] for s in shapes)} with "
                          "do_center_crop off; enable do_center_crop or preprocess them one at a time")
    return np.stack(out).astype(np.float32, copy=False)


# -------------------------------------------------------------------------------------------------- output


def to_pil(array: Any) -> Image.Image:
    """A float image in [-1, 1], (H, W, 3) or (3, H, W), -> uint8 RGB PIL image.

    Rule: u8 = rint(clip((x + 1) * 127.5, 0, 255)), computed in float64; `rint` rounds halves to even (the same
    rounding as diffusers' `numpy_to_pil`). -1 -> 0, 0 -> 128 (127.5 rounds to even), 1 -> 255; values outside
    [-1, 1] saturate. A channels-last array wins when both ends have size 3. NaN is an error (a diverged sample
    should not be saved as a plausible grey image).
    Accepts anything `np.asarray` understands (NumPy, MLX float32, CPU torch float32).
    """
    x = np.asarray(array)
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"to_pil: expected an (H, W, 3) or (3, H, W) array, got shape {x.shape}")
    if x.shape[-1] != 3:
        x = x.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    x = x.astype(np.float64)
    if np.isnan(x).any():
        raise ValueError("to_pil: the image contains NaN values")
    u8 = np.rint(np.clip((x + 1.0) * 127.5, 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(u8))  # (H, W, 3) uint8 -> RGB


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict[str, str] | None = None,
             overwrite: bool = False) -> Path:
    """Write `image` as PNG with `metadata` as text chunks (tEXt, or iTXt for non-Latin-1 values); returns the path.

    Atomic: the PNG is written to a hidden temporary file in the same directory, flushed to disk, then moved into
    place, so a crash never leaves a half-written image under `path`, and no temporary file is left behind on
    error. An existing file is never replaced unless `overwrite=True` (without overwrite the final step is a hard
    link, which fails if the name has appeared meanwhile; filesystems without hard links fall back to a check).
    """
    return save_pngs([image], [path], [metadata], overwrite)[0]


def save_pngs(images, paths, metadata=None, overwrite: bool = False) -> list[Path]:
    """`save_png` for a set of images at once: all are written before any is moved into place, so a disk that
    fills, or an error, mid-set leaves none of them (no partial set the next run would refuse to overwrite)."""
    metadata = list(metadata) if metadata is not None else [None] * len(images)
    writes = []
    for image, path, meta in zip(images, paths, metadata):
        if not isinstance(image, Image.Image):
            raise TypeError(f"save_png: expected a PIL image, got {type(image).__name__} (use to_pil for arrays)")
        shown = str(path)
        info = PngImagePlugin.PngInfo()
        for key, value in (meta or {}).items():
            if not isinstance(key, str) or not 1 <= len(key) <= 79 or not _latin1(key):
                raise Dalle2Error(f"cannot write {shown!r}: PNG metadata key {key!r} must be 1 to 79 Latin-1 "
                                  "characters")
            info.add_text(key, str(value))  # non-Latin-1 values become iTXt (UTF-8)
        writes.append((path, lambda f, image=image, info=info: image.save(f, format="PNG", pnginfo=info)))
    return write_atomic_all(writes, overwrite, ".png")


def save_gif(frames: Sequence[Image.Image], path: str | os.PathLike, fps: int = 4, overwrite: bool = False) -> Path:
    """Write `frames` as an animated GIF (`fps` frames per second, looping), atomically and without replacing an
    existing file unless `overwrite=True`, as `save_png` does."""
    frames = list(frames)
    if not frames or not all(isinstance(f, Image.Image) for f in frames):
        raise TypeError("save_gif: expected a non-empty list of PIL images")
    duration = max(1, round(1000 / fps))
    return write_atomic(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                        duration=duration, loop=0), overwrite,
                         ".gif")


def check_output(path: str | os.PathLike, overwrite: bool = False, suffix: str = ".png") -> Path:
    """The checks every write makes first, callable before long work starts: `path` is not a directory, its
    directory exists, and it does not exist yet unless `overwrite`. One-line `Dalle2Error`s; returns the Path."""
    path = Path(path)
    shown = str(path)
    if path.is_dir():
        raise Dalle2Error(f"cannot write {shown!r}: it is a directory; give a file name ending in {suffix}")
    if path.exists() and not overwrite:
        raise _exists_error(shown)
    if not path.parent.is_dir():
        raise Dalle2Error(f"cannot write {shown!r}: the directory {str(path.parent)!r} does not exist; "
                          "create it first")
    if not os.access(path.parent, os.W_OK):
        raise Dalle2Error(f"cannot write {shown!r}: the directory {str(path.parent)!r} is read-only here; choose "
                          "another output path")
    return path


def write_atomic(path: str | os.PathLike, write, overwrite: bool, suffix: str) -> Path:
    """write(file) into a hidden temporary file beside `path`, fsync it, then move it into place (no clobbering
    unless overwrite); nothing is left behind on error."""
    return write_atomic_all([(path, write)], overwrite, suffix)[0]


def write_atomic_all(items, overwrite: bool, suffix: str) -> list[Path]:
    """[(path, write)]: every file written whole to a hidden temporary beside its path first, then all moved into
    place, so a failure while writing (a full disk, a signal) leaves none of them, and no temporary file."""
    paths = [check_output(p, overwrite, suffix) for p, _ in items]
    for path in paths:
        _sweep(path)
    temps: list[str] = []
    shown = str(paths[0]) if paths else ""
    try:
        try:
            for path, (_, write) in zip(paths, items):
                shown = str(path)
                name, fd = _create_temp(path.parent, path.name, shown)
                temps.append(name)
                with os.fdopen(fd, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
            for tmp, path in zip(temps, paths):  # renames: no space needed, so all of them go through
                shown = str(path)
                if overwrite:
                    os.replace(tmp, path)
                else:
                    _move_no_clobber(tmp, path, shown)
        except Dalle2Error:
            raise
        except OSError as e:
            if e.errno is None:  # not the filesystem: Pillow's own "cannot write mode F as PNG" is a bug upstream
                raise
            raise Dalle2Error(f"cannot write {shown!r}: {e.strerror or e}; check the directory's permissions "
                              "and free space" + (" (none of the files was written)" if len(paths) > 1 else "")) \
                from None
    finally:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    return paths


def _latin1(s: str) -> bool:
    try:
        s.encode("latin-1")
        return True
    except UnicodeEncodeError:
        return False


def _exists_error(shown: str) -> Dalle2Error:
    return Dalle2Error(f"refusing to overwrite existing file {shown!r}; pass --force (overwrite=True) or choose "
                       "another output path")


def _sweep(path: Path) -> None:
    """Remove the temporary files a killed writer (SIGKILL, power loss) left beside `path`: `.NAME.PID-*.tmp`
    of a process that is gone, saying so in one line."""
    left = stale(path, suffix=".tmp")
    for p in left:
        p.unlink(missing_ok=True)
    if left:
        warnings.warn(Dalle2Warning(f"removed {len(left)} temporary file(s) an interrupted write of {str(path)!r} "
                                    "left behind"), stacklevel=4)


def _create_temp(directory: Path, name: str, shown: str) -> tuple[str, int]:
    """A new hidden file next to the target, created with mode 0o666 minus the umask (unlike mkstemp's 0o600)."""
    for _ in range(100):
        tmp = str(temporary(directory / name, suffix=".tmp"))  # the pid in the name: see _sweep
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise Dalle2Error(f"cannot write {shown!r}: {e.strerror or e}; check the directory's permissions") \
                from None
    raise Dalle2Error(f"cannot write {shown!r}: could not create a temporary file in {str(directory)!r}")


def _move_no_clobber(tmp: str, path: Path, shown: str) -> None:
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists
    except FileExistsError:
        raise _exists_error(shown) from None
    except OSError:  # no hard links here (FAT, some network filesystems): check, then rename
        if path.exists():
            raise _exists_error(shown) from None
        os.replace(tmp, path)


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file as a dict; {} when it has none.

    A missing / unreadable / non-PNG file raises a one-line `Dalle2Error` naming it."""
    shown = os.fspath(path)
    if os.path.isdir(shown):
        raise _read_error(shown, IsADirectoryError())
    try:
        with Image.open(shown) as im:
            if im.format != "PNG":
                raise Dalle2Error(f"cannot read PNG metadata from {shown!r}: it is a {im.format} file, not a PNG")
            im.load()  # text chunks after the image data are read only once the image is loaded
            return {str(k): str(v) for k, v in im.text.items()}
    except Dalle2Error:
        raise
    except Exception as e:
        raise _read_error(shown, e) from None
