"""Every PNG records what regenerates it alone: `dalle2 generate --config-from-metadata IMAGE.png` makes the same
pixels (image k of -n 3, a reranked pick, and a regenerated picture regenerated again), on the default model."""

from __future__ import annotations

import numpy as np
from conftest import cli
from PIL import Image

from dalle2_portable.images import read_png_metadata, save_png

FEW = ["--steps", "4", "--super-res-steps", "2", "--backend", "torch", "--quiet"]


def same(a, b):
    return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_image_k_of_a_set_regenerates_exactly(tmp_path):
    cli("generate", "a green triangle", "-n", "3", "--seed", "4", *FEW, "-o", tmp_path / "g.png")
    meta = read_png_metadata(tmp_path / "g-2.png")
    assert (meta["index"], meta["num_images"], meta["batch_size"], meta["version"]) == ("2", "3", "3", "0.1.0")
    assert meta["model_dir"].endswith("default_model")
    cli("generate", "--config-from-metadata", tmp_path / "g-2.png", "-o", tmp_path / "again.png", "--quiet")
    assert same(tmp_path / "g-2.png", tmp_path / "again.png")
    assert not same(tmp_path / "g-1.png", tmp_path / "again.png")
    cli("generate", "--config-from-metadata", tmp_path / "again.png", "-o", tmp_path / "again2.png", "--quiet")
    assert same(tmp_path / "g-2.png", tmp_path / "again2.png")  # the regenerated PNG is itself regenerable


def test_a_reranked_pick_regenerates_exactly(tmp_path):
    cli("generate", "a blue square", "--rerank", "3", "-n", "1", *FEW, "-o", tmp_path / "best.png")
    meta = read_png_metadata(tmp_path / "best.png")
    assert meta["verb"] == "rerank" and meta["rerank_clip"] == "own" and meta["keep"] == "1" and "candidate" in meta
    cli("generate", "--config-from-metadata", tmp_path / "best.png", "-o", tmp_path / "again.png", "--quiet")
    assert same(tmp_path / "best.png", tmp_path / "again.png")


def test_bad_uses_are_one_line(tmp_path):
    cli("generate", "a red circle", *FEW, "-o", tmp_path / "r.png")
    assert "leave out --steps" in cli("generate", "--config-from-metadata", tmp_path / "r.png", "--steps", "3",
                                      "-o", tmp_path / "x.png", ok=False).output
    assert "leave out --prompt" in cli("generate", "--config-from-metadata", tmp_path / "r.png", "--prompt", "x",
                                       "-o", tmp_path / "x.png", ok=False).output
    cli("vary", tmp_path / "r.png", *FEW[2:], "--decoder-steps", "3", "-o", tmp_path / "v.png")
    assert "was not made by `dalle2 generate`" in cli("generate", "--config-from-metadata", tmp_path / "v.png",
                                                      "-o", tmp_path / "x.png", ok=False).output
    save_png(Image.new("RGB", (8, 8)), tmp_path / "plain.png")
    assert "was not made by" in cli("generate", "--config-from-metadata", tmp_path / "plain.png", "-o",
                                    tmp_path / "x.png", ok=False).output
    assert not (tmp_path / "x.png").exists()
