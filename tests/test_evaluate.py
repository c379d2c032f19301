"""The pixel judge (dalle2_portable/judge.py) on the shapes data's own pictures, clean and degraded, and on what
it must call unsure; the prompt grid; and `evaluate` / `dalle2 eval` end to end on the tiny random Karlo (whose
pictures are noise: there only the structure and the counts are checked), once with a painter standing in for
the sampler so the right answers are known.

Measured on 600 items per case (ShapesDataset(seed=1)): clean 32 / 64 / 128 px 100% colour and shape right; blur
radius 1 at 32 px 99.2% (the rest are 8-11 px triangles the judge calls unsure, never wrong); noise sigma 8 at 32
px 99.8%; 32 px upscaled to 64 bilinear 100%. The tests below use fewer items to stay fast."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import AUTO
from PIL import Image, ImageDraw, ImageFilter

from dalle2_portable.cli import main
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.evaluate import (CHECKS, NOVEL, PHRASINGS, TRAINED, Judgement, evaluate, interpolation_passes,
                                      markdown_table, prompt_grid)
from dalle2_portable.judge import judge
from dalle2_portable.train.shapes import (CAPTION_TEMPLATES, COLOURS, SHAPES, TEMPLATES, ShapeAttributes,
                                          ShapesDataset, render)

ON_AUTO = [pytest.param(AUTO, marks=pytest.mark.skipif(AUTO is None, reason="no backend installed"))]
TINY = {"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2}


def right_rate(size: int, n: int, degrade=lambda image, rng: image) -> float:
    """The share of n shapes items at `size` px (degraded) whose colour and shape the judge names right; it
    must never name a wrong one (only right, or unsure)."""
    ds, rng = ShapesDataset(n, seed=7, size=size), np.random.default_rng(0)
    right = 0
    for i in range(n):
        item = ds[i]
        j = judge(degrade(item.image, rng))
        a = item.attributes
        assert j.color in (a.color, None) and j.shape in (a.shape, None), (i, a, j)
        right += j.matches(a.color, a.shape)
    return right / n


@pytest.mark.parametrize("size, n", [(32, 120), (64, 100), (128, 50)])
def test_judge_names_the_shapes_data(size, n):
    assert right_rate(size, n) >= 0.99


def _noise(image, rng, sigma=8.0):
    a = np.asarray(image, np.float64) + rng.normal(0.0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("degrade", [lambda im, rng: im.filter(ImageFilter.GaussianBlur(1)), _noise,
                                     lambda im, rng: im.resize((64, 64), Image.BILINEAR)],
                         ids=["blur-1", "noise-8", "upscaled-to-64"])
def test_judge_on_degraded_pictures(degrade):
    assert right_rate(32, 100, degrade) >= 0.95


def _draw(paint, bg=(255, 255, 255)) -> Image.Image:
    image = Image.new("RGB", (256, 256), bg)
    paint(ImageDraw.Draw(image))
    return image.reduce(4)


def test_judge_reports_nothing_and_unsure_instead_of_guessing():
    red = COLOURS["red"]
    for empty in (np.full((32, 32, 3), 200, np.uint8), Image.new("RGB", (64, 64), COLOURS["blue"])):
        j = judge(empty)
        assert (j.shape, j.color, j.note) == ("none", None, "no foreground")
    unsure = {"a triangle pointing down": lambda d: d.polygon([(40, 40), (200, 40), (120, 200)], fill=red),
              "a diamond": lambda d: d.polygon([(128, 30), (220, 128), (128, 220), (36, 128)], fill=red),
              "two squares": lambda d: (d.rectangle((20, 20, 90, 90), fill=red),
                                        d.rectangle((140, 140, 220, 220), fill=red)),
              "a bar": lambda d: d.rectangle((20, 100, 235, 150), fill=red)}
    for what, paint in unsure.items():
        j = judge(_draw(paint))
        assert j.shape is None and j.color == "red" and j.note, what
    cyan = judge(_draw(lambda d: d.rectangle((60, 60, 190, 190), fill=(0, 230, 230))))
    assert cyan.shape == "square" and cyan.color is None and "none of the named" in cyan.note
    noise = judge(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert noise.shape is None and noise.color is None and "not plain" in noise.note
    for bad in (np.zeros((32, 32, 3), np.float32), np.zeros((4, 4, 3), np.uint8)):
        with pytest.raises(Dalle2Error):
            judge(bad)


def test_prompt_grid_marks_trained_and_novel_phrasings():
    grid = prompt_grid()
    assert len(grid) == len(COLOURS) * len(SHAPES) * len(PHRASINGS)
    assert set(TRAINED) == {"a {color} {shape}", "there is one {color} {shape}"} <= set(TEMPLATES)
    assert NOVEL and not set(NOVEL) & set(CAPTION_TEMPLATES)  # no paraphrase either
    assert {p.trained for p in grid if p.phrasing in NOVEL} == {False}
    assert {p.trained for p in grid if p.phrasing in TRAINED} == {True}
    texts = {p.text for p in grid}
    assert "an orange circle" in texts and "an image of a red square" in texts and "green triangle" in texts
    with pytest.raises(Dalle2Error, match="unknown colour 'teal'"):
        prompt_grid(colors=["teal"])
    with pytest.raises(Dalle2Error, match="nothing else"):
        prompt_grid(phrasings=["a {size} {color} {shape}"])


def test_interpolation_criterion():
    def j(color, shape, rgb):
        return Judgement(color, shape, rgb=rgb)

    red, blue, purple = (230, 25, 25), (30, 60, 220), (130, 40, 180)
    start, end = ("red", "circle"), ("blue", "square")
    ok = [j("red", "circle", red), j("purple", None, purple), j("blue", "square", blue)]
    assert interpolation_passes(ok, start, end) == (True, "passes through in-between pictures")
    jump = [j("red", "circle", red), j("red", "circle", red), j("blue", "square", blue)]
    assert interpolation_passes(jump, start, end)[1] == "no in-between frame"
    back = [j("red", "circle", red), j("blue", "circle", blue), j("red", "square", red), j("blue", "square", blue)]
    assert interpolation_passes(back, start, end)[1] == "the colour goes back and forth"
    assert not interpolation_passes(ok[::-1], start, end)[0]
    for blank in (Judgement(None, "none"), Judgement(None, None, note="the background is not plain")):
        assert interpolation_passes([ok[0], blank, ok[2]], start, end)[1] == ("a frame has no foreground on a "
                                                                              "plain background")


def _counts(report, kind):
    return [report.accuracy[kind][w].total for w in ("color", "shape", "joint")]


@pytest.mark.parametrize("backend", ON_AUTO)
def test_evaluate_runs_on_a_text_to_image_model(models, backend):
    import dalle2_portable as d2

    pipe = d2.load_pipeline(models["karlo"], backend=backend)
    lines = []
    report = evaluate(pipe, quick=True, frames=3, log=lines.append, **TINY)
    assert _counts(report, "trained") == _counts(report, "novel") == [3, 3, 3] and _counts(report, "all") == [6] * 3
    assert [(s["color"], s["shape"]) for s in report.samples[:3]] == [("red", "circle"), ("blue", "square"),
                                                                      ("green", "triangle")]
    for name in ("vary", "edit", "rerank"):  # Karlo has no CLIP image tower
        assert report.checks[name].skipped == "the model has no CLIP image encoder"
    assert report.checks["interpolate"].total == 1 and len(report.details["interpolate"][0]["frames"]) == 3
    assert report.settings["options"] == TINY and lines
    json.dumps(report.to_dict())
    table = markdown_table([report])
    assert "6 pictures per backend (6 prompts x 1 seed)" in table and "skipped: the model has no CLIP" in table
    with pytest.raises(Dalle2Error, match="unknown check"):
        evaluate(pipe, checks=("vary", "paint"))
    iv = d2.load_pipeline(models["iv"], backend=backend)
    with pytest.raises(Dalle2Error, match="has no prior"):
        evaluate(iv, quick=True)


def _paint(prompt: str, rng) -> Image.Image:
    """The picture a perfect model draws for `prompt`: its colour and shape, large, somewhere, from the shapes
    data's own renderer."""
    color = next(c for c in COLOURS if re.search(rf"\b{c}\b", prompt))
    shape = next(s for s in SHAPES if re.search(rf"\b{s}\b", prompt))
    cx, cy = rng.uniform(0.4, 0.6, 2)
    box = (cx - 0.3, cy - 0.3, cx + 0.3, cy + 0.3)
    return render(ShapeAttributes(color, shape, "large", "black" if color == "white" else "white", box,
                                  "middle center", 0), 64)


@pytest.mark.parametrize("backend", ON_AUTO)
def test_evaluate_scores_a_perfect_painter(models, backend, monkeypatch):
    """generate patched to paint each prompt: every grid picture is right (so prompts, batches and records line
    up), and the image checks run through the real verbs with the variations model's CLIP image tower lent."""
    import dalle2_portable as d2
    from dalle2_portable.clip import CLIP

    pipe = d2.load_pipeline(models["karlo"], backend=backend)
    pipe.clip = pipe.clip.with_image_tower(CLIP(models["iv"], pipe.backend))
    real, rng = pipe.generate, np.random.default_rng(0)

    def generate(prompt, num_images=1, **kwargs):
        out = real(prompt, num_images=num_images, **kwargs)
        out.images = [_paint(p, rng) for p in ([prompt] if isinstance(prompt, str) else prompt)
                      for _ in range(num_images)]
        return out

    monkeypatch.setattr(pipe, "generate", generate)
    report = evaluate(pipe, quick=True, seeds=[5], batch_size=4, frames=2, **TINY)
    for kind, n in (("trained", 3), ("novel", 3), ("all", 6)):
        assert all((r.passed, r.total) == (n, n) for r in report.accuracy[kind].values())
    assert [s["seed"] for s in report.samples] == [5000] * 4 + [5001] * 2  # 6 prompts in batches of 4
    checks = report.checks
    assert (checks["vary"].total, checks["edit"].total, checks["interpolate"].total) == (2, 2, 1)
    assert checks["edit"].extra["sources wrong"] == 0
    assert (checks["rerank"].passed, checks["rerank"].total, checks["rerank"].extra) == (
        2, 2, {"candidates right": "6/6"})
    assert all(not r.skipped for r in checks.values()) and set(checks) == set(CHECKS)

    small = evaluate(pipe, seeds=1, colors=["white", "blue"], shapes=["triangle"], phrasings=(NOVEL[1], TRAINED[1]),
                     checks=("rerank",), **TINY)
    assert [(s["text"], s["trained"], s["judged_color"]) for s in small.samples] == [
        ("white triangle", False, "white"), ("blue triangle", False, "blue"),
        ("there is one white triangle", True, "white"), ("there is one blue triangle", True, "blue")]
    assert small.accuracy["all"]["joint"].value == 1.0 and small.accuracy["all"]["joint"].total == 4
    assert (small.checks["rerank"].total, small.checks["rerank"].extra) == (2, {"candidates right": "8/8"})
    assert small.checks["vary"].skipped == "not asked for"


@pytest.mark.parametrize("backend", ON_AUTO)
def test_cli_eval(models, backend, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", str(models["karlo"]), "--quick", "--backend", backend, "--quiet", "--json", str(out)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = {line.split(" | ")[0].strip("| "): line for line in r.output.splitlines() if line.startswith("| ")}
    assert rows["colour, trained phrasings"].endswith("/3) |") and rows["colour and shape, all phrasings"]
    assert "skipped: the model has no CLIP image encoder" in rows["rerank (own CLIP) puts a right picture first"]
    assert re.search(r"\(\d/1\)", rows["interpolation passes through in-between pictures"])
    saved = json.loads(out.read_text())
    assert [rep["backend"] for rep in saved["reports"]] == [backend] and len(saved["reports"][0]["samples"]) == 6
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "refusing to overwrite" in again.output  # checked before any sampling
    for bad in ([str(tmp_path / "no-such-model"), "--quick"], [str(models["iv"]), "--quick"]):
        r = CliRunner().invoke(main, ["eval", *bad])
        assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
