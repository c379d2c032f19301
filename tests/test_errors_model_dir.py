"""Bad model directories, tried for real: a model.json may name only files inside its own directory (no '..', no
absolute path, no symlink that leads out), and each refusal is one line naming the field, before any weight is
read. The CLI says the same in one line with exit status 2."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import dalle2_portable as d2
from dalle2_portable.cli import main


@pytest.fixture
def karlo(models, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(models["karlo"], out)
    return out


def _edit(model, change):
    doc = json.loads((model / "model.json").read_text())
    change(doc)
    (model / "model.json").write_text(json.dumps(doc))


def _refused(model, match):
    with pytest.raises(d2.Dalle2Error, match=match) as e:
        d2.load_pipeline(model, backend="torch")
    assert "\n" not in str(e.value)
    r = CliRunner().invoke(main, ["generate", "x", "-m", str(model), "--backend", "torch", "--quiet", "-o",
                                   str(model.parent / "x.png")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output and not (model.parent / "x.png").exists()
    return str(e.value)


@pytest.mark.parametrize("path", ["../decoder.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                  "C:decoder.safetensors", "a\\..\\b", ""])
def test_a_weights_path_outside_the_directory_is_refused(karlo, path):
    outside = karlo.parent / "decoder.safetensors"
    shutil.copyfile(karlo / "decoder.safetensors", outside)  # a real file waits there: it must not be read
    _edit(karlo, lambda d: d["components"]["decoder"].update(weights=path))
    message = _refused(karlo, "model.json component 'decoder'")
    assert ("leaves the model directory" in message) or ("non-empty string" in message)


def test_a_weights_path_of_the_wrong_type_is_one_line(karlo):
    _edit(karlo, lambda d: d["components"]["prior"].update(weights=["prior.safetensors"]))
    _refused(karlo, "'prior' \"weights\": a path must be a non-empty string")


def test_a_symlink_leading_out_is_refused(karlo, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (karlo / "decoder.safetensors").rename(outside)
    (karlo / "decoder.safetensors").symlink_to(outside)
    message = _refused(karlo, "is a link to")
    assert "outside the model directory" in message and str(outside) in message


@pytest.mark.parametrize("checksums", [True, False])
def test_a_tokenizer_leading_out_is_refused(karlo, tmp_path, checksums):
    if not checksums:  # model.json without "files" (written by an earlier version): the loader checks alone
        _edit(karlo, lambda d: d.pop("files"))
    elsewhere = tmp_path / "tok"
    (karlo / "tokenizer").rename(elsewhere)
    (karlo / "tokenizer").symlink_to(elsewhere)
    assert "outside the model directory" in _refused(karlo, "'tokenizer(/[a-z]+\\.[a-z]+)?' is a link to")
    (karlo / "tokenizer").unlink()
    shutil.copytree(elsewhere, karlo / "tokenizer")
    (karlo / "tokenizer" / "vocab.json").unlink()
    (karlo / "tokenizer" / "vocab.json").symlink_to(elsewhere / "vocab.json")
    _refused(karlo, "'tokenizer/vocab.json' is a link to")


def test_a_symlink_inside_the_directory_is_fine(karlo):
    (karlo / "weights").mkdir()
    (karlo / "decoder.safetensors").rename(karlo / "weights" / "decoder.safetensors")
    (karlo / "decoder.safetensors").symlink_to(karlo / "weights" / "decoder.safetensors")
    d2.load_pipeline(karlo, backend="torch")


def test_a_clip_model_is_not_an_unclip_model(models, tmp_path):
    clip = tmp_path / "clip"
    d2.convert(str(models["clip"]), str(clip))
    _refused(clip, r"has no text_proj, so it is not an unCLIP model; CLIP models load with d2.load_clip")
