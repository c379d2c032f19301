"""dalle2_portable.images: CLIP preprocessing against transformers' CLIPImageProcessor (PIL backend), RGB
conversion of every common mode, unreadable inputs, and PNG writing."""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from dalle2_portable.errors import Dalle2Error
from dalle2_portable.images import (
    center_crop,
    clip_preprocess,
    load_image,
    read_png_metadata,
    resize_output_size,
    save_png,
    to_pil,
    to_rgb,
)
from dalle2_portable.spec import ImageProcessorConfig

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# openai/clip-vit-*/preprocessor_config.json (reference/clip.md §1.2), the legacy int-size form
LEGACY = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
          "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN, "image_std": STD,
          "resample": 3, "size": 224}
SIZES = [(224, 224), (640, 480), (480, 640), (300, 1000), (225, 223), (17, 500), (1, 1)]  # (width, height)


# transformers is a dev dependency; the PIL backend is the reference (torchvision is absent)
transformers = pytest.importorskip("transformers")


def _hf_processor(**kwargs):
    logging.getLogger("transformers").setLevel(logging.ERROR)  # the "falling back to ...Pil" notice
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:
        from transformers import CLIPImageProcessor as cls
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kwargs)


def _hf(processor, image) -> np.ndarray:
    return processor(images=[image], return_tensors="np")["pixel_values"]


# name -> (our config, the transformers processor built from the same settings)
CONFIGS = {
    "default": (ImageProcessorConfig(), {}),
    "legacy_openai": (ImageProcessorConfig.from_hf_config(LEGACY), LEGACY),
    "small_bilinear": (ImageProcessorConfig.from_hf_config(
        {"size": {"shortest_edge": 64}, "crop_size": {"height": 48, "width": 56}, "resample": 2}),
        {"size": {"shortest_edge": 64}, "crop_size": {"height": 48, "width": 56}, "resample": 2}),
    # shortest side 32 < crop 48x56: the crop pads with zeros on both axes; NEAREST; no normalisation
    "pad_nearest": (ImageProcessorConfig(shortest_edge=32, crop_height=48, crop_width=56, resample=0,
                                         do_normalize=False),
                    {"size": {"shortest_edge": 32}, "crop_size": {"height": 48, "width": 56}, "resample": 0,
                     "do_normalize": False}),
    # no resize: the image itself is cropped (17-wide images are padded), LANCZOS unused, rescale off
    "no_resize_no_rescale": (ImageProcessorConfig(do_resize=False, crop_height=40, crop_width=30,
                                                  do_rescale=False),
                             {"do_resize": False, "crop_size": {"height": 40, "width": 30}, "do_rescale": False}),
}


@pytest.fixture(scope="module")
def processors():
    return {name: _hf_processor(**kw) for name, (_, kw) in CONFIGS.items()}


def _random_rgb(width, height, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed + 7919 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_clip_preprocess_matches_transformers_exactly(processors, name, size):
    config = CONFIGS[name][0]
    image = _random_rgb(*size)
    ours = clip_preprocess(image, config)
    ref = _hf(processors[name], image)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, config.crop_height, config.crop_width)
    assert ref.shape == ours.shape
    np.testing.assert_array_equal(ours, ref)  # bit for bit, not just allclose


def test_legacy_config_is_read_as_the_default():
    assert ImageProcessorConfig.from_hf_config(LEGACY) == ImageProcessorConfig()


def test_batch_and_paths(tmp_path, processors):
    images = [_random_rgb(640, 480, 1), _random_rgb(300, 1000, 2)]
    images[1].save(tmp_path / "b.png")
    ours = clip_preprocess([images[0], tmp_path / "b.png"], ImageProcessorConfig())
    ref = processors["default"](images=images, return_tensors="np")["pixel_values"]
    assert ours.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(ours, ref)


def test_resize_and_crop_rules():
    # int(size * long / short), truncated
    assert resize_output_size(480, 640, 224) == (224, 298)
    assert resize_output_size(1000, 300, 224) == (746, 224)
    assert resize_output_size(500, 17, 224) == (6588, 224)
    # odd surplus: floor offset (transformers), not torchvision's round-half-even
    x = np.arange(7 * 4).reshape(1, 7, 4)
    assert center_crop(x, 4, 4)[0, 0, 0] == x[0, 1, 0]
    # smaller than the crop: zero padding with ceil(pad / 2) before
    y = center_crop(np.ones((1, 1, 3), np.uint8), 4, 4)
    assert y.shape == (1, 4, 4) and y.sum() == 3 and y[0, 2, 1:4].tolist() == [1, 1, 1]


def test_flags_and_bad_resample():
    image = _random_rgb(50, 40)
    raw = clip_preprocess(image, ImageProcessorConfig(do_resize=False, do_center_crop=False, do_rescale=False,
                                                      do_normalize=False))
    assert raw.dtype == np.float32 and raw.shape == (1, 3, 40, 50)
    np.testing.assert_array_equal(raw[0].transpose(1, 2, 0), np.asarray(image))
    with pytest.raises(Dalle2Error, match="resample"):
        clip_preprocess(image, ImageProcessorConfig(resample=9))
    with pytest.raises(Dalle2Error, match="different sizes"):
        clip_preprocess([image, _random_rgb(40, 50)], ImageProcessorConfig(do_resize=False, do_center_crop=False))


# ------------------------------------------------------------------------------------------------- modes


def _rgba(alpha: int) -> Image.Image:
    a = np.asarray(_random_rgb(64, 48, 3)).copy()
    return Image.fromarray(np.dstack([a, np.full(a.shape[:2], alpha, np.uint8)]))


def test_opaque_rgba_is_plain_rgb(processors):
    rgba = _rgba(255)
    assert rgba.mode == "RGBA"
    assert np.array_equal(np.asarray(to_rgb(rgba)), np.asarray(rgba.convert("RGB")))
    np.testing.assert_array_equal(clip_preprocess(rgba, ImageProcessorConfig()),
                                  _hf(processors["default"], rgba.convert("RGB")))


def test_transparent_becomes_white(processors):
    clear = _rgba(0)
    assert np.all(np.asarray(to_rgb(clear)) == 255)
    half = Image.fromarray(np.dstack([np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 128, np.uint8)]))
    assert np.all(np.abs(np.asarray(to_rgb(half)).astype(int) - 127) <= 1)  # black at 50% over white
    # partial alpha: transformers composites onto white the same way
    mixed = _rgba(0)
    mixed.putalpha(Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint8)))
    np.testing.assert_array_equal(clip_preprocess(mixed, ImageProcessorConfig()), _hf(processors["default"], mixed))


def test_la_and_p_modes(processors):
    la = Image.fromarray(np.dstack([np.full((8, 8), 10, np.uint8), np.zeros((8, 8), np.uint8)]), "LA")
    assert np.all(np.asarray(to_rgb(la)) == 255)
    la_opaque = Image.merge("LA", [_random_rgb(30, 20).convert("L"), Image.new("L", (30, 20), 255)])
    assert np.array_equal(np.asarray(to_rgb(la_opaque)), np.asarray(la_opaque.convert("L").convert("RGB")))

    p = _random_rgb(60, 40).quantize(16)
    assert p.mode == "P" and "transparency" not in p.info
    assert np.array_equal(np.asarray(to_rgb(p)), np.asarray(p.convert("RGB")))
    # P with a transparent palette entry, read back from a real PNG (tRNS chunk)
    buf = io.BytesIO()
    p.save(buf, format="PNG", transparency=int(np.asarray(p)[0, 0]))
    pt = Image.open(io.BytesIO(buf.getvalue()))
    assert pt.mode == "P" and pt.info.get("transparency") is not None
    out = np.asarray(to_rgb(pt))
    assert out[0, 0].tolist() == [255, 255, 255]
    keep = np.asarray(pt) != np.asarray(pt)[0, 0]
    assert np.array_equal(out[keep], np.asarray(pt.convert("RGB"))[keep])
    for image in (p, pt, la):
        np.testing.assert_array_equal(clip_preprocess(image, ImageProcessorConfig()), _hf(processors["default"], image))


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "YCbCr"])
def test_plain_modes_convert_like_pillow(processors, mode):
    image = _random_rgb(70, 50).convert(mode)
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), np.asarray(image.convert("RGB")))
    np.testing.assert_array_equal(clip_preprocess(image, ImageProcessorConfig()), _hf(processors["default"], image))


def test_rgb_is_returned_as_is():
    image = _random_rgb(5, 5)
    assert to_rgb(image) is image


def test_16_bit_png_scales_by_its_range(tmp_path):
    grey = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"
        assert np.asarray(im.convert("RGB"))[0, 3, 0] == 255 and np.asarray(im.convert("RGB"))[0, 1, 0] == 255
    loaded = load_image(tmp_path / "g16.png")
    assert loaded.mode == "RGB"
    assert np.asarray(loaded)[0, :, 0].tolist() == [0, 1, 128, 255]  # Pillow's own convert clips: 0,255,255,255
    assert np.all(np.asarray(loaded) == np.asarray(loaded)[..., :1])  # grey
    big_endian = Image.fromarray(grey).convert("I").convert("I;16B")
    assert big_endian.mode == "I;16B"
    assert np.asarray(to_rgb(big_endian))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32_bit_modes():
    # I holding 16-bit data (how older Pillow opened 16-bit PNGs): same scale as I;16
    i16 = Image.fromarray(np.array([[0, 257, 32768, 65535]], np.int32))
    assert i16.mode == "I" and np.asarray(to_rgb(i16))[0, :, 1].tolist() == [0, 1, 128, 255]
    # I holding 8-bit data (L.convert("I")): unchanged
    l8 = _random_rgb(9, 7).convert("L")
    assert np.array_equal(np.asarray(to_rgb(l8.convert("I"))), np.asarray(l8.convert("RGB")))
    # I outside 0..65535: min..max stretch
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], np.int32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    # F in 0..1: * 255; F in 0..255: as is; other ranges stretched; NaN -> 0
    f01 = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32))
    assert f01.mode == "F" and np.asarray(to_rgb(f01))[0, :, 2].tolist() == [0, 128, 255, 0]
    f255 = Image.fromarray(np.array([[0.0, 100.4, 255.0]], np.float32))
    assert np.asarray(to_rgb(f255))[0, :, 0].tolist() == [0, 100, 255]
    fwide = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32))
    assert np.asarray(to_rgb(fwide))[0, :, 0].tolist() == [0, 128, 255]


# ------------------------------------------------------------------------------------------ unreadable input


def _assert_one_line_naming(excinfo, path):
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg


def test_unreadable_inputs(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    with pytest.raises(Dalle2Error, match="not an image file Pillow can open") as e:
        load_image(text)
    _assert_one_line_naming(e, text)

    missing = tmp_path / "missing.png"
    with pytest.raises(Dalle2Error, match="no such file") as e:
        load_image(str(missing))
    _assert_one_line_naming(e, missing)

    png = io.BytesIO()
    _random_rgb(200, 200).save(png, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    with pytest.raises(Dalle2Error, match="damaged or truncated") as e:
        load_image(truncated)
    _assert_one_line_naming(e, truncated)

    with pytest.raises(Dalle2Error, match="directory") as e:
        load_image(tmp_path)
    _assert_one_line_naming(e, tmp_path)

    with pytest.raises(Dalle2Error) as e:
        clip_preprocess([missing], ImageProcessorConfig())
    _assert_one_line_naming(e, missing)


def test_load_image_modes_and_exif(tmp_path):
    rgba = _rgba(0)
    rgba.save(tmp_path / "clear.png")
    assert np.all(np.asarray(load_image(tmp_path / "clear.png")) == 255)
    assert load_image(rgba).mode == "RGB"
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): a 30x20 stored image loads as 20x30
    exif = Image.Exif()
    exif[0x0112] = 6
    _random_rgb(30, 20).save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 30)


# ---------------------------------------------------------------------------------------------- PNG output


def test_save_png_roundtrip_and_overwrite(tmp_path):
    image = _random_rgb(16, 12)
    path = tmp_path / "out.png"
    meta = {"prompt": "a corgi, wearing a hat", "seed": "42", "unicode": "東京 ☃"}
    assert save_png(image, path, meta) == path
    assert read_png_metadata(path) == meta
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    assert sorted(os.listdir(tmp_path)) == ["out.png"]  # no temporary file left behind

    before = path.read_bytes()
    with pytest.raises(Dalle2Error, match="--force") as e:
        save_png(_random_rgb(8, 8), path)
    _assert_one_line_naming(e, path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["out.png"]

    save_png(_random_rgb(8, 8), path, {"seed": "7"}, overwrite=True)
    assert Image.open(path).size == (8, 8) and read_png_metadata(path) == {"seed": "7"}
    assert sorted(os.listdir(tmp_path)) == ["out.png"]

    save_png(image, tmp_path / "plain.png")
    assert read_png_metadata(tmp_path / "plain.png") == {}


def test_save_png_errors_leave_nothing(tmp_path):
    with pytest.raises(Dalle2Error, match="does not exist") as e:
        save_png(_random_rgb(4, 4), tmp_path / "nope" / "x.png")
    _assert_one_line_naming(e, tmp_path / "nope" / "x.png")
    with pytest.raises(Dalle2Error, match="directory"):
        save_png(_random_rgb(4, 4), tmp_path)
    with pytest.raises(OSError):  # Pillow cannot write mode F as PNG: an internal error, temp file removed
        save_png(Image.new("F", (4, 4)), tmp_path / "f.png")
    assert os.listdir(tmp_path) == []
    jpg = tmp_path / "a.jpg"
    _random_rgb(4, 4).save(jpg)
    with pytest.raises(Dalle2Error, match="not a PNG"):
        read_png_metadata(jpg)
    with pytest.raises(Dalle2Error, match="no such file"):
        read_png_metadata(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------------- to_pil


def test_to_pil_rule_and_layouts():
    hwc = np.array([[[-1.0, 0.0, 1.0], [-2.0, 2.0, 0.5]]], np.float32)  # (1, 2, 3)
    out = to_pil(hwc)
    assert out.mode == "RGB" and out.size == (2, 1)
    assert np.asarray(out).tolist() == [[[0, 128, 255], [0, 255, 191]]]  # 127.5 -> 128 (half to even), 191.25
    chw = hwc.transpose(2, 0, 1)
    assert np.array_equal(np.asarray(to_pil(chw)), np.asarray(out))
    with pytest.raises(ValueError):
        to_pil(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        to_pil(np.full((2, 2, 3), np.nan))


@pytest.mark.parametrize("size_in,size_out", [(8, 16), (64, 256), (7, 20), (16, 16), (32, 8)])
def test_upscale_bicubic_equals_torch_antialias(size_in, size_out):
    """The super-res conditioning image: torch's antialiased bicubic (Keys a=-0.5, border renormalised)."""
    import torch
    import torch.nn.functional as F

    from dalle2_portable.sampling import upscale_bicubic

    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, size_in, size_in)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=[size_out, size_out], mode="bicubic", align_corners=False,
                        antialias=True).numpy()
    got = upscale_bicubic(x, size_out)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
