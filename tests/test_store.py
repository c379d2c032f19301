"""The model directory: round trip, and every kind of bad directory giving one line and loading nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from builders import write_clip_vocab, write_tiny_clip
from conftest import backend_params
from safetensors.numpy import load_file, save_file

import dalle2_portable as d2
from dalle2_portable import paths, store
from dalle2_portable.backends import get_backend


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    src = write_tiny_clip(root / "src", write_clip_vocab(root / "vocab"))
    d2.convert(src, root / "model")
    return root / "model"


@pytest.fixture
def copy(model_dir, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(model_dir, out)
    return out


def _record(copy):
    """Re-record the checksums after a test changed a file on purpose: what is tested is then the header."""
    store.write_spec(copy, store.read_spec(copy))


def _fails(path, match, backend="torch"):
    with pytest.raises(d2.Dalle2Error, match=match) as e:
        d2.load_clip(path, backend=backend)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("backend", backend_params())
def test_round_trip_weights(model_dir, tmp_path, backend):
    """Weights loaded into a backend and read back equal the file exactly (layout changes undone)."""
    clip = d2.load_clip(model_dir, backend=backend)
    for name, module in clip.modules.items():
        on_disk = load_file(str(model_dir / f"{name}.safetensors"))
        got = clip.backend.state_dict(module)
        assert sorted(got) == sorted(on_disk)
        for k in on_disk:
            np.testing.assert_array_equal(got[k], on_disk[k], err_msg=k)


def test_spec_round_trip(model_dir, copy, tmp_path):
    spec = store.read_spec(model_dir)
    (copy / "model.json").unlink()
    store.write_spec(copy, spec)
    assert store.read_spec(copy) == spec
    d = json.loads((copy / "model.json").read_text())
    assert d["format"] == 1 and "about" not in d
    assert sorted(d["files"]) == ["image_encoder.safetensors", "text_encoder.safetensors", "tokenizer/merges.txt",
                                  "tokenizer/vocab.json"]
    assert d["files"] == json.loads((model_dir / "model.json").read_text())["files"]
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in model_dir.iterdir())  # no temp file
    with pytest.raises(d2.Dalle2Error, match="cannot record the checksum of .*text_encoder.safetensors"):
        store.write_spec(tmp_path, spec)  # a model.json is written for files that are there


def test_bad_checksums_are_one_line(copy):
    """A malformed "files" entry, a grown file and a listed file that is gone: one line each, naming it."""
    d = json.loads((copy / "model.json").read_text())
    good = json.dumps(d)
    d["files"]["tokenizer/vocab.json"]["sha256"] = "XYZ"
    (copy / "model.json").write_text(json.dumps(d))
    assert "'tokenizer/vocab.json' must be" in _fails(copy, "64 lowercase hex digits")
    d["files"] = {"../outside": d["files"]["tokenizer/vocab.json"]}
    (copy / "model.json").write_text(json.dumps(d))
    _fails(copy, "path '../outside' leaves the model directory")

    (copy / "model.json").write_text(good)
    path = copy / "image_encoder.safetensors"
    size = path.stat().st_size
    with open(path, "ab") as f:  # the header still reads: only the recorded size tells
        f.write(b"\0" * 8)
    msg = _fails(copy, rf"is corrupted \({size + 8} bytes, model.json records {size}\)")
    assert str(path) in msg
    path.write_bytes(path.read_bytes()[:size])
    (copy / "tokenizer" / "merges.txt").unlink()
    _fails(copy, "merges.txt' is missing; re-convert the model")


def test_unknown_format(copy):
    d = json.loads((copy / "model.json").read_text())
    d["format"] = 99
    (copy / "model.json").write_text(json.dumps(d))
    _fails(copy, "unknown format 99")


def test_not_a_model_directory(tmp_path):
    _fails(tmp_path, "neither an existing folder|holds no config.json|not a dalle2_portable")
    (tmp_path / "model.json").write_text("{not json")
    _fails(tmp_path, "cannot read")


def test_missing_component_file(copy):
    (copy / "image_encoder.safetensors").unlink()
    assert "image_encoder.safetensors" in _fails(copy, "is missing")


def test_missing_unexpected_misshaped_tensor(copy):
    path = copy / "text_encoder.safetensors"
    good = load_file(str(path))
    name = "text_model.encoder.layers.1.mlp.fc2.bias"

    missing = {k: v for k, v in good.items() if k != name}
    save_file(missing, str(path))
    _record(copy)
    msg = _fails(copy, "missing tensor")
    assert name in msg and str(path) in msg

    save_file({**good, "text_model.extra.weight": np.zeros(3, np.float32)}, str(path))
    _record(copy)
    assert "text_model.extra.weight" in _fails(copy, "unexpected tensor")

    save_file({**good, name: np.zeros(5, np.float32)}, str(path))
    _record(copy)
    msg = _fails(copy, r"has shape \[5\], the config needs \[32\]")
    assert name in msg


@pytest.mark.parametrize("backend", backend_params())
def test_truncated_file_fails_before_loading(copy, backend):
    """With checksums, the recorded size tells; without, the header does."""
    path = copy / "text_encoder.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-100])
    assert str(path) in _fails(copy, rf"is corrupted \({size - 100} bytes, model.json records {size}\)", backend)
    d = json.loads((copy / "model.json").read_text())
    del d["files"]
    (copy / "model.json").write_text(json.dumps(d))
    assert str(path) in _fails(copy, "truncated", backend=backend)


def test_validation_happens_before_allocation(copy, monkeypatch):
    """A bad second file is reported before the first component is built."""
    (copy / "image_encoder.safetensors").write_bytes(b"\x00" * 4)
    _record(copy)
    backend = get_backend("torch")
    built = []
    monkeypatch.setattr(type(backend), "load_component", lambda self, *a: built.append(a))
    with pytest.raises(d2.Dalle2Error, match="not a readable safetensors"):
        d2.clip.CLIP(copy, backend)
    assert built == []


def test_atomic_directory_keeps_old_on_failure(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with store.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (out / "old.txt").read_text() == "old"


def test_streaming_writer_matches_safetensors(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(7)}
    for dtype, np_dtype in (("float32", np.float32), ("float16", np.float16)):
        path = tmp_path / f"{dtype}.safetensors"
        store.write_tensors(path, [(k, v.shape) for k, v in tensors.items()], tensors.__getitem__, dtype)
        back = load_file(str(path))
        for k, v in tensors.items():
            np.testing.assert_array_equal(back[k], v.astype(np_dtype))
    # bfloat16: round to nearest even, read back with torch
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch

    path = tmp_path / "bf16.safetensors"
    store.write_tensors(path, [(k, v.shape) for k, v in tensors.items()], tensors.__getitem__, "bfloat16")
    back = load_torch(str(path))
    for k, v in tensors.items():
        torch.testing.assert_close(back[k], torch.from_numpy(v).to(torch.bfloat16), rtol=0, atol=0)


@settings(max_examples=200, deadline=None)
@given(name=st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                    max_size=20).filter(lambda n: n not in (".", "..")),
       tag=st.sampled_from(["", "partial", "old"]))
def test_temporary_names_parse_back(name, tag):
    """Every atomic writer names its temporary sibling through paths.temporary; the sweep reads the target and
    the writer's pid back from it, whatever dots or dashes the target's own name holds."""
    from pathlib import Path

    tmp = paths.temporary(Path("/x") / name, tag)
    assert tmp.parent == Path("/x")
    assert paths._parse(tmp.name) == (name, tag, os.getpid())
    assert paths.target_of(tmp.name) == name


def test_stale_lists_only_dead_writers(tmp_path):
    """A dead process's temporaries are stale, a live one's (ours) and unrelated files are not."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    target = tmp_path / "a.b.png"
    ours = paths.temporary(target, suffix=".tmp")
    theirs = tmp_path / f".a.b.png.{pid}-0123abcd.tmp"
    other = tmp_path / f".a.b.png.{pid}-0123abcd"        # not the suffix asked for
    unrelated = tmp_path / f".c.png.{pid}-0123abcd.tmp"  # another target
    for p in (ours, theirs, other, unrelated):
        p.write_bytes(b"")
    assert paths.stale(target, suffix=".tmp") == [theirs]
    old = tmp_path / f".m.old-{pid}-ff"
    old.mkdir()
    assert store.leftovers(tmp_path / "m") == [old]
