"""convert/clip.py, files.py, hub.py: transformers CLIP layouts -> model directories, then load_clip end to end
against transformers' own outputs on the same folders.

Checkpoints are tiny random models saved by transformers into a local folder and into a local Hub cache; all
loads are offline (HF_HUB_OFFLINE=1, set in conftest).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from builders import put_in_hub_cache, write_clip_vocab, write_tiny_clip
from click.testing import CliRunner
from conftest import assert_close_to_scale, backend_params
from PIL import Image
from safetensors.numpy import load_file
from transformers import (CLIPImageProcessor, CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          CLIPVisionModelWithProjection)

import dalle2_portable as d2
from dalle2_portable.cli import main
from dalle2_portable.store import read_header, read_spec

PROMPTS = ["a photo of a cat", "", "café 🙂 " * 40, "two dogs!!"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, vocab):
    return write_tiny_clip(tmp_path_factory.mktemp("hf") / "tiny-clip", vocab)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 64), (32, 32))]


def _one_line(fn, match):
    with pytest.raises(d2.Dalle2Error, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


# the transformers class each `write_tiny_clip` kind is saved from
REFERENCE = {"clip": CLIPModel, "text": CLIPTextModelWithProjection, "vision": CLIPVisionModelWithProjection}


def _reference(src, kind: str = "clip") -> dict[str, np.ndarray]:
    """transformers on the source folder: its own tokenizer's ids for PROMPTS and its own image processor's pixel
    values for _images(), through the class the folder was saved from. {"text": text_embeds, "image":
    image_embeds} for the towers the folder has (unnormalised projections, as `encode_text` returns them), and
    for CLIPModel "cosine": logits_per_text / exp(logit_scale)."""
    inputs = {}
    if kind != "vision":
        inputs["input_ids"] = CLIPTokenizer.from_pretrained(src)(
            PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    if kind != "text":
        inputs["pixel_values"] = CLIPImageProcessor.from_pretrained(src)(
            images=_images(), return_tensors="pt").pixel_values
    model = REFERENCE[kind].from_pretrained(src).eval()
    with torch.no_grad():
        out = model(**inputs)
        if kind != "clip":
            return {k: getattr(out, f"{k}_embeds").numpy() for k in ("text", "image") if hasattr(out, f"{k}_embeds")}
        # CLIPModel's text_embeds / image_embeds are normalised; the projections themselves:
        return {"text": model.get_text_features(input_ids=inputs["input_ids"]).pooler_output.numpy(),
                "image": model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.numpy(),
                "cosine": (out.logits_per_text / model.logit_scale.exp()).numpy()}


@pytest.mark.parametrize("backend", backend_params())
def test_load_clip_end_to_end_matches_transformers(clip_dir, backend, tmp_path):
    out = tmp_path / "model"
    d2.convert(clip_dir, out)
    clip = d2.load_clip(out, backend=backend)
    ref = _reference(clip_dir)
    assert_close_to_scale(clip.encode_text(PROMPTS), ref["text"], 1e-5, "text")
    assert_close_to_scale(clip.encode_image(_images()), ref["image"], 1e-5, "image")
    assert_close_to_scale(clip.similarity(PROMPTS, _images()), ref["cosine"], 1e-5, "cosine similarity")


def test_model_directory_contents(clip_dir, tmp_path):
    out = tmp_path / "model"
    spec = d2.convert(clip_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.safetensors", "model.json",
                                                      "text_encoder.safetensors", "tokenizer"]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["merges.txt", "vocab.json"]
    assert spec.source.layout == "transformers-clip" and spec.source.revision is None
    assert read_spec(out) == spec  # model.json round-trips
    logit_scale = load_file(clip_dir / "model.safetensors")["logit_scale"]
    assert spec.defaults.clip_logit_scale == float(logit_scale.reshape(()))
    text = read_header(out / "text_encoder.safetensors")
    assert all(k.startswith(("text_model.", "text_projection.")) for k in text)
    assert "text_model.embeddings.position_ids" not in text


@pytest.mark.parametrize("dtype,tag", [("float16", "F16"), ("bfloat16", "BF16")])
def test_convert_dtype(clip_dir, tmp_path, dtype, tag):
    out = tmp_path / "model"
    d2.convert(clip_dir, out, dtype=dtype)
    assert {i.dtype for i in read_header(out / "text_encoder.safetensors").values()} == {tag}
    full = d2.load_clip(clip_dir, backend="torch").encode_text(PROMPTS)
    half = d2.load_clip(out, backend="torch").encode_text(PROMPTS)
    assert_close_to_scale(half, full, 2e-2 if dtype == "bfloat16" else 3e-3, dtype)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["text", "vision"])
@pytest.mark.parametrize("safetensors", [True, False])
def test_single_tower_layouts_match_transformers(tmp_path, vocab, backend, kind, safetensors):
    """CLIPTextModelWithProjection / CLIPVisionModelWithProjection folders, as model.safetensors or as a
    pytorch_model.bin pickle (with the int64 position_ids buffers older repos hold): the converted tower computes
    transformers' text_embeds / image_embeds; the missing tower is a one-line error."""
    src = write_tiny_clip(tmp_path / "src", vocab, kind=kind, safetensors=safetensors, seed=3)
    assert any(src.glob("*.bin")) != safetensors
    spec = d2.convert(src, tmp_path / "out")
    assert list(spec.components) == ["text_encoder" if kind == "text" else "image_encoder"]
    clip = d2.load_clip(tmp_path / "out", backend=backend)
    ref = _reference(src, kind)
    if kind == "text":
        assert_close_to_scale(clip.encode_text(PROMPTS), ref["text"], 1e-5, f"{backend} text_embeds")
        _one_line(lambda: clip.encode_image(_images()), "has no image_encoder")
    else:
        assert_close_to_scale(clip.encode_image(_images()), ref["image"], 1e-5, f"{backend} image_embeds")
        _one_line(lambda: clip.encode_text(PROMPTS), "has no text_encoder")


def test_hub_cache_by_id_offline_then_cached(clip_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    commit = put_in_hub_cache(clip_dir, "tiny-org/tiny-clip", cache)
    clip = d2.load_clip("tiny-org/tiny-clip", backend="torch")
    assert clip.spec.source.repo == "tiny-org/tiny-clip" and clip.spec.source.revision == commit
    assert str(clip.model_dir).startswith(os.environ["DALLE2_CACHE"])
    assert_close_to_scale(clip.encode_text(PROMPTS), _reference(clip_dir)["text"], 1e-5, "text via hub")
    # The second load converts nothing: the converted files are not rewritten.
    stamp = (clip.model_dir / "text_encoder.safetensors").stat().st_mtime_ns
    again = d2.load_clip("tiny-org/tiny-clip", backend="torch")
    assert again.model_dir == clip.model_dir
    assert (again.model_dir / "text_encoder.safetensors").stat().st_mtime_ns == stamp


def test_hub_revision_and_missing_repo(clip_dir, tmp_path, monkeypatch, vocab):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    other = write_tiny_clip(tmp_path / "v2", vocab, seed=7)
    put_in_hub_cache(clip_dir, "tiny-org/tiny-clip", cache, revision="main")
    v2 = put_in_hub_cache(other, "tiny-org/tiny-clip", cache, revision="v2")
    spec = d2.convert("tiny-org/tiny-clip", tmp_path / "out", revision="v2")
    assert spec.source.revision == v2
    with pytest.raises(d2.Dalle2Error, match="not in the local Hub cache") as e:
        d2.convert("tiny-org/absent", tmp_path / "out2")
    assert "\n" not in str(e.value) and not (tmp_path / "out2").exists()


def test_bad_sources_leave_nothing_behind(clip_dir, tmp_path, vocab):
    truncated = tmp_path / "truncated"
    shutil.copytree(clip_dir, truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _one_line(lambda: d2.convert(truncated, tmp_path / "o1"), "truncated")
    no_config = tmp_path / "noconfig"
    shutil.copytree(clip_dir, no_config)
    (no_config / "config.json").unlink()
    _one_line(lambda: d2.convert(no_config, tmp_path / "o2"), "no config.json")
    wrong = tmp_path / "wrong"
    shutil.copytree(clip_dir, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["text_config"]["hidden_act"] = "relu"
    (wrong / "config.json").write_text(json.dumps(cfg))
    _one_line(lambda: d2.convert(wrong, tmp_path / "o3"), "unsupported hidden_act='relu'")
    misshaped = tmp_path / "misshaped"
    shutil.copytree(clip_dir, misshaped)
    cfg = json.loads((misshaped / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 40
    (misshaped / "config.json").write_text(json.dumps(cfg))
    _one_line(lambda: d2.convert(misshaped, tmp_path / "o4"), "text_model.encoder.layers.0.mlp.fc1.weight")
    for i in range(1, 5):
        assert not (tmp_path / f"o{i}").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_convert_refuses_existing_output_and_overwrites_on_request(clip_dir, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    _one_line(lambda: d2.convert(clip_dir, out), "already exists")
    assert (out / "mine.txt").read_text() == "keep me"
    d2.convert(clip_dir, out, overwrite=True)
    assert (out / "model.json").is_file() and not (out / "mine.txt").exists()


def test_cli_convert_and_info(clip_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "model"
    r = runner.invoke(main, ["convert", str(clip_dir), str(out)])
    assert r.exit_code == 0, r.output
    assert "text_encoder" in r.output
    r = runner.invoke(main, ["info", str(out)])
    assert r.exit_code == 0, r.output
    n_text = sum(int(np.prod(i.shape)) for i in read_header(out / "text_encoder.safetensors").values())
    assert f"{n_text:,}" in r.output and "F32" in r.output and str(clip_dir) in r.output
    r = runner.invoke(main, ["convert", str(clip_dir), str(out)])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and r.output.startswith("error: ")
    r = runner.invoke(main, ["info", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and r.output.count("\n") == 1
