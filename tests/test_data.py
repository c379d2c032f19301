"""Training data (dalle2_portable/train/data.py, train/shapes.py): the procedural shapes, the image folder and
its bad records, the NCHW batches, and the CLIP embedding cache against CLIP run directly."""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings

import numpy as np
import pytest
from builders import write_tiny_clip
from conftest import BACKENDS
from PIL import Image

import dalle2_portable as d2
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.images import to_pil
from dalle2_portable.train.data import (BadRecordWarning, ImageFolder, cache_embeddings, cache_path,
                                        embedding_size, to_pixels)
from dalle2_portable.train.shapes import (CAPTION_TEMPLATES, COLOURS, POSITIONS, SHAPES, SIZES, TEMPLATES,
                                          ShapesDataset)

FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


# ------------------------------------------------------------------------------------------------- shapes


def test_shapes_are_a_function_of_seed_and_index():
    a, b = ShapesDataset(12, seed=3, size=32), ShapesDataset(40, seed=3, size=32)  # the length changes nothing
    for i in range(12):
        assert a.caption(i) == b.caption(i) and a.attributes(i) == b.attributes(i)
        assert np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i)))
    other = ShapesDataset(12, seed=4, size=32)
    assert [a.caption(i) for i in range(12)] != [other.caption(i) for i in range(12)]
    assert not np.array_equal(a.pixels(range(12)), other.pixels(range(12)))
    with pytest.raises(IndexError):
        a[12]


def test_same_scene_at_two_sizes():
    ds = ShapesDataset(10, seed=0, size=32)
    for i in range(10):
        small = np.asarray(ds.image(i), np.float64)
        big = np.asarray(ds.image(i, size=128).reduce(4), np.float64)
        assert np.abs(small - big).mean() < 3.0, i


def _coverage(pixels: np.ndarray, attrs) -> np.ndarray:
    """How much of each pixel the shape covers: its position between the background and the shape colour
    (an anti-aliased edge pixel is a linear mix of the two)."""
    fg, bg = np.array(attrs.rgb, np.float64), np.array(attrs.background_rgb, np.float64)
    return np.clip((pixels - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg)), 0.0, 1.0)


def test_attributes_match_the_pixels():
    size, ds = 64, ShapesDataset(60, seed=1, size=64)
    areas = {}
    for i in range(len(ds)):
        item = ds[i]
        a = item.attributes
        px = np.asarray(item.image).astype(np.int64)
        x0, y0, x1, y1 = a.box_at(size)
        inside = np.zeros(px.shape[:2], bool)
        inside[y0:y1, x0:x1] = True
        assert (px[~inside] == a.background_rgb).all(), i  # nothing of the shape outside its box
        box = px[y0:y1, x0:x1].reshape(-1, 3)
        colours, counts = np.unique(box[(box != a.background_rgb).any(-1)], axis=0, return_counts=True)
        assert tuple(colours[counts.argmax()]) == a.rgb, i  # the most frequent non-background colour
        cover = _coverage(px.astype(np.float64), a)
        side = (a.box[2] - a.box[0]) * size
        assert abs(cover.sum() / side**2 - FILL[a.shape]) < 0.03, (i, a.shape, cover.sum() / side**2)
        lo, hi = SIZES[a.size]
        assert lo <= a.box[2] - a.box[0] <= hi and math.isclose(a.box[2] - a.box[0], a.box[3] - a.box[1])
        if a.shape == "triangle":  # pointing up: narrow at the top of its box, wide at the bottom
            rows = cover[y0:y1, x0:x1].sum(axis=1)
            assert rows[: len(rows) // 4].sum() < rows[-(len(rows) // 4):].sum() / 3, i
        areas.setdefault((a.shape, a.size), []).append(cover.sum())
    for shape in SHAPES:  # small and large are told apart by area alone
        assert min(areas[shape, "large"]) > 2 * max(areas[shape, "small"]), shape


def test_colours_far_apart_background_differs():
    assert len(COLOURS) >= 11 and {"red", "green", "blue", "yellow", "orange", "purple", "pink", "white",
                                   "black", "gray", "brown"} <= set(COLOURS)
    assert min(math.dist(COLOURS[p], COLOURS[q]) for p, q in itertools.combinations(COLOURS, 2)) > 80
    ds = ShapesDataset(300, seed=0, size=16)
    attrs = [ds.attributes(i) for i in range(len(ds))]
    assert all(a.background != a.color for a in attrs)
    assert {a.color for a in attrs} == set(COLOURS) and {a.background for a in attrs} == set(COLOURS)
    assert {a.shape for a in attrs} == set(SHAPES) and {a.size for a in attrs} == set(SIZES)


def test_captions_name_what_is_drawn_and_every_template_is_reached():
    ds = ShapesDataset(300, seed=2, size=16)
    made_up = []
    for i in range(len(ds)):
        a, caption = ds.attributes(i), ds.caption(i)
        template = CAPTION_TEMPLATES[a.template]
        row, col = a.position.split()
        plain = template.format(color=a.color, shape=a.shape, size=a.size, background=a.background,
                                position=POSITIONS[row, col]).split()
        article = [{"an": "a"}.get(w, w) for w in plain]  # "a orange" is written "an orange"
        words = caption.split()
        kept = [words[:k] + words[k + 1:] for k in range(len(words))] if len(words) > len(plain) else [words]
        kept = [w for w in kept if [{"an": "a"}.get(x, x) for x in w] == article]
        assert kept, caption  # the template's sentence, or it with one made-up word of letters
        made_up.append(len(words) > len(plain))
        text = " ".join(kept[0])
        named = text.replace(",", "").split()
        assert a.color in named and a.shape in named, caption
        if "{size}" in template:
            assert a.size in text.split(), caption
        if "{background}" in template:
            assert f"{a.background} background" in text or text.endswith(f"on {a.background}"), caption
        if "{position}" in template:
            assert POSITIONS[row, col] in text, caption
        cx, cy = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
        assert a.position == (f"{('top', 'middle', 'bottom')[min(2, int(cy * 3))]} "
                              f"{('left', 'center', 'right')[min(2, int(cx * 3))]}")
        assert " a orange" not in caption and not caption.startswith("a orange")
    assert {ds.attributes(i).template for i in range(len(ds))} == set(range(len(CAPTION_TEMPLATES)))
    assert 0.4 < np.mean([ds.attributes(i).template >= len(TEMPLATES) for i in range(len(ds))]) < 0.6
    assert 0.15 < np.mean(made_up) < 0.35  # a made-up word in about a quarter
    assert {ds.attributes(i).position for i in range(len(ds))} > {"middle center"}  # several positions
    assert ds.caption(0) != ds.caption(1) or ds.caption(1) != ds.caption(2)


def test_pixels_are_nchw_in_minus_one_one():
    ds = ShapesDataset(5, seed=0, size=32)
    x = ds.pixels([4, 0, 2])
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.5 and x.max() > 0.5
    assert np.array_equal(np.asarray(to_pil(x[0])), np.asarray(ds.image(4)))  # images.to_pil inverts it
    assert ds.pixels([1], size=16).shape == (1, 3, 16, 16)
    assert to_pixels([Image.new("RGB", (2, 2), (0, 255, 0))])[0, :, 0, 0].tolist() == [-1.0, 1.0, -1.0]


def test_fingerprints_change_with_the_data():
    fp = ShapesDataset(10, seed=0).fingerprint()
    assert fp == ShapesDataset(10, seed=0, size=128).fingerprint()  # the training size is not the data
    assert len({fp, ShapesDataset(10, seed=1).fingerprint(), ShapesDataset(11, seed=0).fingerprint()}) == 3
    with pytest.raises(Dalle2Error, match="length >= 1"):
        ShapesDataset(0)


# ------------------------------------------------------------------------------------------- image folder


def _folder(d, lines: list) -> None:
    """Write metadata.jsonl: dicts as JSON, strings verbatim (to write bad lines)."""
    d.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n"
    (d / "metadata.jsonl").write_text(text, encoding="utf-8")


def _good_images(d):
    d.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(d / "red.png")
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))  # fully transparent: white after loading
    rgba.save(d / "clear.png")
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    (d / "sub").mkdir(exist_ok=True)
    Image.fromarray(wide).save(d / "sub" / "wide.png")


BAD = [  # (line content, a phrase its message holds)
    ("{not json", "invalid JSON"),
    ({"file_name": "red.png"}, "missing key 'text'"),
    ({"text": "a caption"}, "missing key 'file_name'"),
    ({"file_name": "gone.png", "text": "a ghost"}, "'gone.png' not found"),
    ({"file_name": "notes.png", "text": "not an image"}, "not an image file"),
    ({"file_name": "cut.png", "text": "truncated"}, "damaged or truncated"),
    ({"file_name": "red.png", "text": "   "}, "empty caption"),
    ("[1, 2]", "not a JSON object"),
]


def _mixed_folder(d):
    _good_images(d)
    (d / "notes.png").write_text("hello")
    full = (d / "red.png").read_bytes()
    (d / "cut.png").write_bytes(full[: len(full) // 2])
    good = [{"file_name": "red.png", "text": "a red picture"}, {"file_name": "clear.png", "text": "nothing"},
            {"file_name": "sub/wide.png", "text": "three stripes"}]
    lines = [good[0], BAD[0][0], BAD[1][0], good[1], "", BAD[2][0], BAD[3][0], BAD[4][0], BAD[5][0],
             BAD[6][0], BAD[7][0], good[2]]
    _folder(d, lines)
    return lines


def test_image_folder_loads_good_records_and_reports_each_bad_one_once(tmp_path):
    lines = _mixed_folder(tmp_path / "data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(tmp_path / "data", size=16)
    assert len(ds) == 3 and [ds.caption(i) for i in range(3)] == ["a red picture", "nothing", "three stripes"]
    assert [r.line for r in ds.records] == [1, 4, 12]
    assert len(ds.problems) == len(BAD)
    for (content, phrase), message in zip(BAD, ds.problems):
        line = lines.index(content) + 1
        assert f"metadata.jsonl:{line}: " in message and phrase in message and "\n" not in message, message
        assert "; " in message  # the fix follows the problem
    assert [str(w.message) for w in caught if w.category is BadRecordWarning] == ds.problems
    images = [ds.image(i) for i in range(3)]
    assert all(im.mode == "RGB" and im.size == (16, 16) for im in images)
    assert np.asarray(images[0])[8, 8].tolist() == [200, 10, 10]
    assert (np.asarray(images[1]) == 255).all()  # transparency over white
    wide = np.asarray(images[2]).astype(int)  # centre-cropped: the green middle third fills the square
    assert (np.abs(wide[:, 2:-2] - [0, 255, 0]) <= 2).all()
    assert ds.pixels([0, 2], size=8).shape == (2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ImageFolder(tmp_path / "data", size=16, warn=False).problems == ds.problems


def test_strict_stops_at_the_first_bad_record_in_one_line(tmp_path):
    _mixed_folder(tmp_path / "data")
    with pytest.raises(Dalle2Error) as e:
        ImageFolder(tmp_path / "data", strict=True)
    message = str(e.value)
    assert "\n" not in message and "metadata.jsonl:2: invalid JSON" in message and "write one JSON object" in message
    assert str(tmp_path / "data" / "metadata.jsonl") in message


def test_no_usable_record_is_one_line(tmp_path):
    _good_images(tmp_path / "data")
    _folder(tmp_path / "data", [BAD[3][0], BAD[6][0]])
    with pytest.raises(Dalle2Error, match=r"no usable record in metadata.jsonl \(first problem: .*:1: file "):
        ImageFolder(tmp_path / "data", warn=False)
    _folder(tmp_path / "empty", [""])
    with pytest.raises(Dalle2Error, match="no usable record"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(Dalle2Error, match="has no metadata.jsonl; write one JSON object per line"):
        ImageFolder(tmp_path)
    with pytest.raises(Dalle2Error, match="does not exist"):
        ImageFolder(tmp_path / "nowhere")
    with pytest.raises(Dalle2Error, match="at least 8 px"):
        ImageFolder(tmp_path / "data", size=0)


def test_folder_fingerprint_follows_files_and_captions(tmp_path):
    d = tmp_path / "data"
    _good_images(d)
    records = [{"file_name": "red.png", "text": "a red picture"}, {"file_name": "clear.png", "text": "nothing"}]
    _folder(d, records)
    fp = ImageFolder(d).fingerprint()
    assert ImageFolder(d, size=32).fingerprint() == fp
    st = (d / "red.png").stat()
    os.utime(d / "red.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was rewritten
    fp2 = ImageFolder(d).fingerprint()
    _folder(d, [records[0], {"file_name": "clear.png", "text": "still nothing"}])
    fp3 = ImageFolder(d).fingerprint()
    _folder(d, records[:1])
    assert len({fp, fp2, fp3, ImageFolder(d).fingerprint()}) == 4


# ------------------------------------------------------------------------------------------ embedding cache


@pytest.fixture(scope="module")
def clips(models, tmp_path_factory):
    """Model directories: the tiny CLIP (both towers), another with other weights, and the tiny Karlo's (text
    tower only)."""
    root = tmp_path_factory.mktemp("data_clips")
    d2.convert(str(models["clip"]), str(root / "clip"))
    d2.convert(str(write_tiny_clip(root / "src1", models["clip"], seed=1)), str(root / "clip1"))
    return {"clip": root / "clip", "clip1": root / "clip1", "karlo": models["karlo"]}


def _load(path):
    return d2.load_clip(path, backend=BACKENDS[0])


def _spy(monkeypatch, clip, name, calls):
    real = getattr(clip, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(clip, name, counted)


def test_cache_equals_clip_run_directly_and_is_reused(clips, tmp_path, monkeypatch):
    clip, ds = _load(clips["clip"]), ShapesDataset(7, seed=0, size=16)
    emb = cache_embeddings(ds, clip, tmp_path / "cache", batch_size=3)
    assert not emb.loaded and [p.name for p in (tmp_path / "cache").iterdir()] == [emb.path.name]
    assert emb.path == cache_path(ds, clip, tmp_path / "cache")
    captions = [ds.caption(i) for i in range(len(ds))]
    want = clip.text_condition(captions)
    side = embedding_size(clip)
    assert side == 32
    want_images = clip.encode_image([ds.image(i, side) for i in range(len(ds))])
    assert emb.text.embeds.dtype == emb.text.states.dtype == emb.image_embeds.dtype == np.float32
    assert emb.text.mask.dtype == bool and np.array_equal(emb.text.mask, want.mask)
    np.testing.assert_allclose(emb.text.embeds, want.embeds, rtol=0, atol=1e-5)
    np.testing.assert_allclose(emb.text.states, want.states, rtol=0, atol=1e-5)
    np.testing.assert_allclose(emb.image_embeddings(), want_images, rtol=0, atol=1e-5)
    sub = emb.text_condition([5, 1])
    assert np.array_equal(sub.states, emb.text.states[[5, 1]]) and emb.image_embeddings([2]).shape == (1, 16)

    again = _load(clips["clip"])  # a new CLIP object from the same directory: the same identity
    calls = []
    _spy(monkeypatch, again, "text_condition", calls)
    _spy(monkeypatch, again, "encode_image", calls)
    hit = cache_embeddings(ds, again, tmp_path / "cache")
    assert hit.loaded and calls == [] and hit.path == emb.path
    for a, b in ((hit.text.embeds, emb.text.embeds), (hit.text.states, emb.text.states),
                 (hit.text.mask, emb.text.mask), (hit.image_embeds, emb.image_embeds)):
        assert a.dtype == b.dtype and np.array_equal(a, b)

    emb.path.write_bytes(b"not a safetensors file")  # a damaged cache is computed again and replaced
    redone = cache_embeddings(ds, again, tmp_path / "cache")
    assert not redone.loaded and calls and cache_embeddings(ds, again, tmp_path / "cache").loaded


def test_changing_the_data_or_the_clip_invalidates_the_cache(clips, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    clip, ds = _load(clips["clip"]), ShapesDataset(4, seed=0, size=16)
    first = cache_embeddings(ds, clip, cache)
    other_seed = cache_embeddings(ShapesDataset(4, seed=1, size=16), clip, cache)
    longer = cache_embeddings(ShapesDataset(5, seed=0, size=16), clip, cache)
    other_clip = cache_embeddings(ds, _load(clips["clip1"]), cache)
    assert not (other_seed.loaded or longer.loaded or other_clip.loaded)
    assert len({first.path, other_seed.path, longer.path, other_clip.path}) == 4
    assert not np.allclose(other_clip.image_embeds, first.image_embeds)
    np.testing.assert_allclose(longer.image_embeds[:4], first.image_embeds, rtol=0, atol=1e-5)

    weights = clips["clip"] / clip.spec.components["text_encoder"].weights
    st = weights.stat()
    try:  # the same directory with a re-written weight file is another CLIP
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert not cache_embeddings(ds, _load(clips["clip"]), cache).loaded
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache_embeddings(ds, _load(clips["clip"]), cache).loaded

    d = tmp_path / "folder"
    _good_images(d)
    _folder(d, [{"file_name": "red.png", "text": "a red picture"}])
    assert not cache_embeddings(ImageFolder(d), clip, cache).loaded
    assert cache_embeddings(ImageFolder(d), clip, cache).loaded
    _folder(d, [{"file_name": "red.png", "text": "a crimson picture"}])
    assert not cache_embeddings(ImageFolder(d), clip, cache).loaded


def test_text_only_clip_caches_text_and_says_images_are_missing(clips, tmp_path):
    clip, ds = _load(clips["karlo"]), ShapesDataset(3, seed=0, size=16)
    assert "image_encoder" not in clip.modules
    emb = cache_embeddings(ds, clip, tmp_path)
    assert emb.image_embeds is None and emb.text.embeds.shape[0] == 3
    np.testing.assert_allclose(emb.text.embeds, clip.text_condition([ds.caption(i) for i in range(3)]).embeds,
                               rtol=0, atol=1e-5)
    with pytest.raises(Dalle2Error) as e:
        emb.image_embeddings([0])
    assert "\n" not in str(e.value) and "has no image encoder" in str(e.value) and "image tower" in str(e.value)
    assert cache_embeddings(ds, clip, tmp_path).loaded


class _Interrupted(ShapesDataset):
    """A shapes dataset whose run is interrupted (Ctrl-C) while its images are being embedded."""

    def image(self, i, size=None):
        if i == 2:
            raise KeyboardInterrupt
        return super().image(i, size)


def test_an_interrupted_cache_leaves_no_file(clips, tmp_path, monkeypatch):
    clip, cache = _load(clips["clip"]), tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        cache_embeddings(_Interrupted(4, seed=0, size=16), clip, cache, batch_size=2)
    assert list(cache.iterdir()) == []

    def interrupted_fsync(fd):  # interrupted after the bytes are written, before the rename
        raise KeyboardInterrupt

    ds = ShapesDataset(4, seed=0, size=16)
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", interrupted_fsync)
        with pytest.raises(KeyboardInterrupt):
            cache_embeddings(ds, clip, cache)
    assert list(cache.iterdir()) == []
    emb = cache_embeddings(ds, clip, cache)
    assert not emb.loaded and list(cache.iterdir()) == [emb.path]
