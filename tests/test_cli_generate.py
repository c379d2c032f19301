"""The generation commands end to end on the tiny converted Karlo models: files, names, metadata, refusal to
overwrite, and `dalle2 compare`'s table and exit status."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import BACKENDS
from PIL import Image

from dalle2_portable.cli import main
from dalle2_portable.images import read_png_metadata
from dalle2_portable.spec import STAGES, PipelineDefaults

STAGES_FLAGS = tuple(f"--{s.replace('_', '-')}-" for s in STAGES)


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_generate_writes_pngs_with_metadata(models, tmp_path):
    out = tmp_path / "cube.png"
    r = run("generate", "a red cube", "-m", models["karlo"], "--backend", "torch", "-n", "2", "--seed", "3",
            "--decoder-steps", "5", "--prior-guidance", "2", "-o", out)
    paths = [tmp_path / "cube-0.png", tmp_path / "cube-1.png"]
    assert "prior:" in r.stderr  # the progress bars, on stderr
    assert r.stdout.split() == ["wrote", str(paths[0]), "wrote", str(paths[1])]
    meta = read_png_metadata(paths[1])
    assert meta["prompt"] == "a red cube" and meta["seed"] == "3" and meta["backend"] == "torch"
    assert meta["decoder_steps"] == "5" and meta["prior_guidance"] == "2.0" and meta["prior_steps"] == "25"
    assert meta["index"] == "1" and "model" in meta and Image.open(paths[0]).size == (16, 16)
    assert "super_res_guidance" not in meta and meta["super_res_steps"] == "7"  # super-res has no guidance

    # the same command again refuses before doing any work; --force replaces
    before = paths[0].read_bytes()
    r = run("generate", "a red cube", "-m", models["karlo"], "-n", "2", "-o", out, ok=False)
    assert r.exit_code == 2 and "refusing to overwrite existing file" in r.output and "--force" in r.output
    assert paths[0].read_bytes() == before
    run("generate", "a red cube", "-m", models["karlo"], "--backend", "torch", "-n", "2", "--seed", "4", "--quiet",
        "--force", "-o", out)
    assert paths[0].read_bytes() != before


def test_generate_single_image_and_bad_output(models, tmp_path):
    run("generate", "a cat", "-m", models["karlo"], "--quiet", "-o", tmp_path / "cat.png")
    assert (tmp_path / "cat.png").exists()
    for bad, message in [(tmp_path / "cat.jpg", "must end in .png"),
                         (tmp_path / "missing" / "cat.png", "does not exist; create it first")]:
        r = run("generate", "a cat", "-m", models["karlo"], "-o", bad, ok=False)
        assert r.exit_code == 2 and message in r.output and len(r.output.strip().splitlines()) == 1


def test_generate_rerank_with_clip(models, tmp_path):
    r = run("generate", "a cat", "-m", models["karlo"], "--rerank", "3", "-n", "2", "--clip", models["clip"],
            "--decoder-steps", "3", "--super-res-steps", "2", "-o", tmp_path / "best.png")
    assert "CLIP score" in r.output
    scores = [float(read_png_metadata(tmp_path / f"best-{i}.png")["clip_score"]) for i in range(2)]
    assert scores[0] >= scores[1]


def test_vary_edit_interpolate(models, tmp_path):
    src, other = tmp_path / "in.png", tmp_path / "other.png"
    for seed, path in enumerate((src, other)):
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(path)
    fast = ["--decoder-steps", "3", "--super-res-steps", "2", "--quiet"]
    run("vary", src, "-m", models["iv"], "-n", "2", "-o", tmp_path / "v.png", *fast)
    assert read_png_metadata(tmp_path / "v-1.png")["verb"] == "vary"
    run("edit", src, "--from", "a photo", "--to", "a painting", "--amount", "0.3", "-m", models["iv"],
        "-o", tmp_path / "e.png", *fast)
    meta = read_png_metadata(tmp_path / "e.png")
    assert meta["target"] == "a painting" and meta["amount"] == "0.3"
    run("interpolate", src, other, "--frames", "3", "-m", models["iv"], "-o", tmp_path / "i.png", *fast)
    assert all((tmp_path / f"i-{k}.png").exists() for k in range(3))
    with Image.open(tmp_path / "i.gif") as gif:
        assert gif.n_frames == 3
    run("interpolate", "a cube", "a ball", "--text", "--frames", "2", "--no-gif", "-m", models["karlo"],
        "-o", tmp_path / "t.png", *fast)
    assert not (tmp_path / "t.gif").exists()
    assert read_png_metadata(tmp_path / "t-1.png")["kind"] == "text"
    r = run("interpolate", src, src, "--prior-steps", "3", "-m", models["iv"], "-o", tmp_path / "x.png", ok=False)
    assert "--prior-* options apply to --text interpolation only" in r.output


def test_stage_options_are_pipeline_defaults():
    """Each command offers exactly the stage options PipelineDefaults has for its stages, and its help quotes
    Karlo's values from there."""
    karlo = PipelineDefaults()
    for command, stages in (("generate", STAGES), ("vary", STAGES[1:]), ("edit", STAGES[1:]),
                            ("interpolate", STAGES), ("compare", STAGES)):
        flags = {o for p in main.commands[command].params for o in p.opts if o.startswith(STAGES_FLAGS)}
        assert flags == {f"--{s.replace('_', '-')}-{k}" for s in stages for k in PipelineDefaults.options(s)}
    text = run("generate", "--help").output
    assert "--super-res-guidance" not in text and f"Karlo {karlo.decoder_guidance:g}; 1 = off" in text
    r = run("generate", "a cat", "--super-res-guidance", "5", ok=False)
    assert r.exit_code == 2 and "No such option '--super-res-guidance'" in r.output


def test_info_shows_the_defaults_of_the_stages_the_model_has(models):
    karlo, iv = (run("info", models[name]).output.splitlines() for name in ("karlo", "iv"))
    assert "default    prior_steps = 25" in karlo and "default    super_res_sample_size = 16" in karlo
    assert "default    decoder_guidance = 8.0" in iv and not any("prior_" in line for line in iv)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_compare_table_image_and_exit_status(models, tmp_path):
    out = tmp_path / "cmp.png"
    r = run("compare", "a red cube", "-m", models["karlo"], "--quiet", "--decoder-steps", "4", "-o", out)
    lines = r.output.splitlines()
    assert lines[0].split()[:2] == ["stage", "shape"]
    assert [line.split()[0] for line in lines[1:4]] == ["prior", "decoder", "super-res"]
    assert lines[-1].startswith("PASS: worst image difference")
    assert Image.open(out).size == (32, 16)  # torch | mlx
    r = run("compare", "a red cube", "-m", models["karlo"], "--quiet", "--decoder-steps", "4", "--tolerance", "-1",
            "--force", "-o", out, ok=False)
    assert r.exit_code == 1 and "FAIL" in r.output
