"""Prompts beyond the tokenizer's window: cut as transformers cuts them, with one warning line saying what the model
saw, and the PNG recording that text (API and CLI)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import dalle2_portable as d2
from dalle2_portable.cli import main
from dalle2_portable.images import read_png_metadata

LONG = "a red circle " + "with very many words " * 12  # the default model's window is 32 tokens


def test_a_long_prompt_warns_and_records_what_was_used():
    pipe = d2.load_pipeline("default", backend="torch")
    with pytest.warns(d2.Dalle2Warning, match="longer than the tokenizer's 32 tokens") as caught:
        out = pipe.generate([LONG, "a blue square"], decoder_steps=3, super_res_steps=2, prior_steps=3)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    used = out.captions[0]
    assert LONG.startswith(used) and len(used) < len(LONG) and out.captions[1] == "a blue square"
    assert pipe.clip.tokenizer.truncations([used]) == [None]  # the kept part fits: it is all the model saw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("a blue square", decoder_steps=3, super_res_steps=2, prior_steps=3)  # a short one: silent


def test_the_cli_prints_one_warning_line_and_the_png_keeps_the_used_prompt(tmp_path):
    out = tmp_path / "long.png"
    r = CliRunner().invoke(main, ["generate", LONG, "--backend", "torch", "--quiet", "--decoder-steps", "3", "-o",
                                  str(out)])
    assert r.exit_code == 0, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the prompt") and "Traceback" not in r.output
    meta = read_png_metadata(out)
    assert meta["prompt"] == LONG  # as given: the same prompt regenerates the picture, cut the same way
    assert LONG.startswith(meta["prompt_seen"]) and meta["prompt_seen"] in lines[0]
    again = tmp_path / "again.png"
    r = CliRunner().invoke(main, ["generate", "--config-from-metadata", str(out), "--quiet", "-o", str(again)])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


PROMPTS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(prompt=PROMPTS)
def test_any_prompt_survives_the_png_round_trip(prompt, tmp_path_factory):
    """The PNG's text chunks give back exactly the prompt they were given (tEXt or iTXt), whatever it holds:
    NUL, controls, combining marks, any plane."""
    from dalle2_portable.images import save_png

    path = save_png(Image.new("RGB", (2, 2)), tmp_path_factory.mktemp("png") / "p.png", {"prompt": prompt})
    assert read_png_metadata(path)["prompt"] == prompt


@pytest.fixture(scope="module")
def pipe():
    return d2.load_pipeline("default", backend="torch")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=PROMPTS)
def test_any_prompt_generates_or_is_one_line(pipe, prompt):
    """Any text is a prompt: a picture (with at most the truncation warning), or one Dalle2Error line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = pipe.generate(prompt, prior_steps=2, decoder_steps=2, super_res_steps=2)
        except d2.Dalle2Error as e:
            assert "\n" not in str(e)
            return
    assert len(out.images) == 1 and out.images[0].size == (64, 64)
    assert out.captions[0] == (pipe.clip.tokenizer.truncations([prompt])[0] or prompt)
    meta = out.metadata(0)
    assert meta["prompt"] == prompt and meta.get("prompt_seen", prompt) == out.captions[0]
    assert all(isinstance(w.message, d2.Dalle2Warning) and "\n" not in str(w.message) for w in caught)
