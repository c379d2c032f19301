"""Prompts beyond the tokenizer's window: cut as transformers cuts them, with one warning line saying what the model
saw, and the PNG recording that text (API and CLI)."""

from __future__ import annotations

import warnings

import pytest
from click.testing import CliRunner

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
    prompt = read_png_metadata(out)["prompt"]
    assert LONG.startswith(prompt) and prompt in lines[0]
