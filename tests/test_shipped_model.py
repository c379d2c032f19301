"""The model shipped in the package (dalle2_portable/default_model, trained by scripts/train_default_model.sh):
it loads offline on every backend with its checksums verified, a corrupted copy is a one-line error, it draws
the colour and the shape it is asked for (a few prompts; the whole grid is `dalle2 eval`'s job), and the same
seed gives the same picture on MLX and PyTorch."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import BACKENDS

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.cli import main
from dalle2_portable.judge import judge

pytestmark = pytest.mark.skipif(not BACKENDS, reason="needs a backend")
# (prompt, colour, shape): trained and novel phrasings, the README's first command among them
PROMPTS = [("a red circle", "red", "circle"), ("a green triangle", "green", "triangle"),
           ("there is one blue square", "blue", "square"), ("an image of a yellow circle", "yellow", "circle")]


@pytest.fixture(scope="module")
def generated():
    """{backend: the shipped model's images of PROMPTS at its default settings, seed 0}."""
    return {b: d2.load_pipeline(backend=b).generate([p for p, _, _ in PROMPTS], seed=0) for b in BACKENDS}


def test_it_is_in_the_package_within_20_mb_and_verifies():
    spec = store.read_spec(store.DEFAULT_MODEL_DIR)
    files = store.verify_model(store.DEFAULT_MODEL_DIR)  # every file hashed
    assert sum(size for _, size in files) <= 20 * 2**20
    assert {"text_encoder", "image_encoder", "prior", "text_proj", "decoder", "super_res_first"} <= set(
        spec.components)
    about = store.read_about(store.DEFAULT_MODEL_DIR)
    assert about["recipe"].startswith("bash scripts/train_default_model.sh")


def test_it_draws_the_colour_and_shape_asked_for(generated):
    for backend, out in generated.items():
        assert out.images[0].size[0] >= 64
        named = [(j.color, j.shape) for j in map(judge, out.images)]
        assert named == [(c, s) for _, c, s in PROMPTS], (backend, named)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs MLX and PyTorch")
def test_the_same_seed_gives_the_same_picture_on_both_backends(generated):
    a, b = (np.stack([np.asarray(im, np.int16) for im in generated[k].images]) for k in BACKENDS[:2])
    assert np.abs(a - b).max() <= 2  # of 255, per pixel


def test_a_corrupted_copy_is_one_line(tmp_path, monkeypatch):
    copy = shutil.copytree(store.DEFAULT_MODEL_DIR, tmp_path / "default_model")
    data = bytearray((copy / "decoder.safetensors").read_bytes())
    data[-1] ^= 0x01
    (copy / "decoder.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(store, "DEFAULT_MODEL_DIR", copy)
    result = CliRunner().invoke(main, ["generate", "a red circle", "-o", str(tmp_path / "red.png")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "decoder.safetensors" in result.output and "sha256 mismatch" in result.output
    assert not (tmp_path / "red.png").exists()
