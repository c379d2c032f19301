"""The option names users bring from mflux and diffusers: --prompt, several --seed values, {seed}/{i} output
templates, --steps / --guidance shorthands, --threads, --force everywhere, and diffusers' argument names in the
API. Run for real on the packaged default model at few steps."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import cli
from PIL import Image

import dalle2_portable as d2
from dalle2_portable.images import read_png_metadata

FEW = ["--prior-steps", "3", "--super-res-steps", "2"]


def pixels(path):
    return np.asarray(Image.open(path))


def test_prompt_as_option_or_argument(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    cli("generate", "a red circle", "--backend", "torch", "--quiet", "--decoder-steps", "3", *FEW, "-o", a)
    cli("generate", "--prompt", "a red circle", "--backend", "torch", "--quiet", "--decoder-steps", "3", *FEW, "-o", b)
    assert np.array_equal(pixels(a), pixels(b))
    assert "two prompts" in cli("generate", "a", "--prompt", "b", "-o", tmp_path / "c.png", ok=False).output
    assert "no prompt" in cli("generate", "-o", tmp_path / "c.png", ok=False).output
    assert not (tmp_path / "c.png").exists()


def test_several_seeds_and_templates(tmp_path):
    cli("generate", "a blue square", "--backend", "torch", "--quiet", "--seed", "1", "--seed", "2", "--steps", "3",
        "--super-res-steps", "2", "-o", tmp_path / "sq.png")
    for seed in (1, 2):
        assert read_png_metadata(tmp_path / f"sq-s{seed}.png")["seed"] == str(seed)
    alone = tmp_path / "alone.png"
    cli("generate", "a blue square", "--backend", "torch", "--quiet", "--seed", "2", "--steps", "3",
        "--super-res-steps", "2", "-o", alone)
    assert np.array_equal(pixels(alone), pixels(tmp_path / "sq-s2.png"))  # one set per seed, as if run alone
    cli("generate", "a blue square", "--backend", "torch", "--quiet", "--seed", "5", "--seed", "6", "-n", "2",
        "--steps", "3", "--super-res-steps", "2", "-o", tmp_path / "t-{seed}-{i}.png")
    assert sorted(p.name for p in tmp_path.glob("t-*.png")) == ["t-5-0.png", "t-5-1.png", "t-6-0.png", "t-6-1.png"]
    assert read_png_metadata(tmp_path / "t-6-1.png")["index"] == "1"
    message = cli("generate", "x", "--seed", "1", "--seed", "2", "-o", tmp_path / "same-{i}.png", ok=False).output
    assert "names two images the same" in message and "{seed}" in message
    assert "{seed} and {i} only" in cli("generate", "x", "-o", tmp_path / "{what}.png", ok=False).output


def test_steps_and_guidance_shorthands(tmp_path):
    out = tmp_path / "s.png"
    cli("generate", "a red circle", "--backend", "torch", "--quiet", "--steps", "3", "--decoder-steps", "4",
        "--guidance", "1.5", "--super-res-steps", "2", "-o", out)
    meta = read_png_metadata(out)
    assert (meta["prior_steps"], meta["decoder_steps"], meta["decoder_guidance"]) == ("3", "4", "1.5")
    assert meta["prior_guidance"] == "1.0"  # the model's: --guidance is the decoder's


def test_threads_and_quiet_names(tmp_path):
    out = tmp_path / "t.png"
    cli("generate", "a red circle", "--backend", "torch", "--threads", "1", "--quiet", "--steps", "3",
        "--super-res-steps", "2", "-o", out)
    assert out.exists()
    if "mlx" in d2.installed_backends():
        assert "--threads sets PyTorch's" in cli("generate", "x", "--backend", "mlx", "--threads", "1", "-o",
                                                 tmp_path / "m.png", ok=False).output
    assert "No such option '-q'" in cli("generate", "x", "-q", "-o", tmp_path / "q.png", ok=False).output


def test_diffusers_argument_names():
    pipe = d2.load_pipeline("default", backend="torch")
    ours = pipe.generate("a red circle", num_images=2, prior_steps=3, decoder_steps=3, super_res_steps=2,
                         decoder_guidance=1.5)
    theirs = pipe.generate("a red circle", num_images_per_prompt=2, prior_num_inference_steps=3,
                           decoder_num_inference_steps=3, super_res_num_inference_steps=2, decoder_guidance_scale=1.5)
    assert np.array_equal(ours.samples, theirs.samples) and len(theirs) == 2
    with pytest.raises(d2.Dalle2Error, match="decoder_num_inference_steps .diffusers' name. and decoder_steps"):
        pipe.generate("x", decoder_steps=3, decoder_num_inference_steps=4)


def test_compare_takes_devices(tmp_path):
    out = cli("compare", "a red circle", "--backends", "torch:cpu,torch", "--steps", "3", "--super-res-steps", "2",
              "--quiet", "-o", tmp_path / "c.png").output.split("\n")
    assert any("torch:cpu" in line for line in out) and (tmp_path / "c.png").exists()
    assert "two different backends" in cli("compare", "x", "--backends", "torch,torch", "-o", tmp_path / "d.png",
                                           ok=False).output
