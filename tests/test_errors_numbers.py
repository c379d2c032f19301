"""Bad numbers, tried for real through the API and the CLI: seeds, guidance, step counts, and settings that make
a stage non-finite. Each is one line (exit status 2 in the CLI), and nothing is written."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import dalle2_portable as d2
from dalle2_portable.cli import main
from dalle2_portable.sampling import NoiseStream
from dalle2_portable.spec import PipelineDefaults


def _cli_refuses(tmp_path, *args, match):
    out = tmp_path / "x.png"
    r = CliRunner().invoke(main, [str(a) for a in args] + ["--backend", "torch", "--quiet", "-o", str(out)],
                            prog_name="dalle2")
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert match in r.output and "Traceback" not in r.output
    assert not list(tmp_path.glob("x*.png"))
    return r.output


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True, 2**200 * -1])
def test_a_bad_seed_is_one_line_in_the_api(seed):
    with pytest.raises(d2.Dalle2Error, match="seed must be a non-negative integer"):
        NoiseStream(seed)


def test_good_seeds_are_taken():
    assert NoiseStream(np.int64(3)).draw((1,)) == NoiseStream(3).draw((1,))
    assert NoiseStream(None).draw((2,)).shape == (2,) and NoiseStream(2**70).draw((1,)).shape == (1,)


@pytest.mark.parametrize("value", ["-1", "1.5", "x"])
def test_a_bad_seed_is_one_line_in_the_cli(models, tmp_path, value):
    message = _cli_refuses(tmp_path, "generate", "a cat", "-m", models["karlo"], "--seed", value,
                           match="Invalid value for '--seed'")
    assert "see `dalle2 generate --help`" in message


@pytest.mark.parametrize("option", ["prior_guidance", "decoder_guidance"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_guidance_is_refused_before_any_work(option, value):
    with pytest.raises(d2.Dalle2Error, match=f"{option} must be a finite number"):
        PipelineDefaults().override(("prior", "decoder"), {option: value})


def test_non_finite_guidance_in_the_cli(models, tmp_path):
    _cli_refuses(tmp_path, "generate", "a cat", "-m", models["karlo"], "--decoder-guidance", "nan",
                 match="--decoder-guidance must be a finite number")


def test_a_stage_that_goes_non_finite_names_itself_and_saves_nothing(tmp_path):
    pipe = d2.load_pipeline("default", backend="torch")  # its decoder overflows at this scale (inf - inf)
    with pytest.raises(d2.Dalle2Error, match="the decoder stage went non-finite") as e:
        pipe.generate("a cat", decoder_guidance=1e38, decoder_steps=3, super_res_steps=2, decoder_sampler="ddim")
    assert "\n" not in str(e.value)
    _cli_refuses(tmp_path, "generate", "a cat", "--decoder-guidance", "1e38", "--decoder-steps", "3",
                 "--decoder-sampler", "ddim",
                 match="the decoder stage went non-finite")


def test_steps_beyond_the_schedule_are_one_line(models, tmp_path):
    _cli_refuses(tmp_path, "generate", "a cat", "-m", models["karlo"], "--prior-steps", "5000",
                 match="steps must be between 2 and 1000")


def test_steps_are_checked_before_any_weight_loads(models, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(models["karlo"], model)
    (model / "decoder.safetensors").unlink()  # loading would fail on this first
    message = _cli_refuses(tmp_path, "generate", "a cat", "-m", model, "--decoder-steps", "5000",
                           match="decoder steps must be between 2 and 1000")
    assert "decoder.safetensors" not in message
    _cli_refuses(tmp_path, "vary", models["karlo"] / "tokenizer" / "vocab.json", "-m", model, "--super-res-steps",
                 "1001", match="super-res steps must be between 2 and 1000")
