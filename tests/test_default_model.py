"""Checksums in model.json (recorded by every writer, verified on load, big files once), the packaged default
model (`model="default"`, the one-line error without it), the "about" block, and the wheel's package data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import BACKENDS

import dalle2_portable as d2
from dalle2_portable import checksums, store
from dalle2_portable.cli import main
from dalle2_portable.convert import resolve_model
from dalle2_portable.train.loop import _write_model

REPO = Path(__file__).resolve().parent.parent
ABOUT = {"recipe": "dalle2 train prior --data shapes --config tiny", "steps": {"prior": 2000, "decoder": 3000},
         "data": "shapes", "accuracy": 0.91, "tags": ["tiny", "shapes"]}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def copy_model(src, dst) -> Path:
    """A private copy (copytree: new inodes, the same mtimes)."""
    return Path(shutil.copytree(src, dst))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor (or the text): the header still reads, only the hash can tell
    path.write_bytes(bytes(data))


def test_every_file_gets_its_sha256(models):
    """The converter (through store.write_spec) records each weight file and each tokenizer file."""
    for name in ("karlo", "iv"):
        model_dir = models[name]
        spec, files = store.read_spec(model_dir), store.read_checksums(model_dir)
        expected = {c.weights for c in spec.components.values()} | {"tokenizer/vocab.json", "tokenizer/merges.txt"}
        assert set(files) == expected
        for rel, entry in files.items():
            data = (model_dir / rel).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, rel
    r = cli("verify", models["karlo"])
    assert r.exit_code == 0, r.output
    assert "ok  decoder.safetensors" in r.output and "ok  tokenizer/merges.txt" in r.output
    assert f"verified {len(expected)} files" in r.output


@pytest.mark.skipif(not BACKENDS, reason="needs a backend")
def test_a_flipped_byte_is_one_line_through_load_pipeline_and_generate(models, tmp_path):
    karlo = copy_model(models["karlo"], tmp_path / "karlo")
    d2.load_pipeline(karlo, backend=BACKENDS[0])  # intact: loads
    flip_last_byte(karlo / "decoder.safetensors")
    with pytest.raises(d2.Dalle2Error) as e:
        d2.load_pipeline(karlo, backend=BACKENDS[0])
    msg = str(e.value)
    assert "\n" not in msg and str(karlo / "decoder.safetensors") in msg
    assert "is corrupted (sha256 mismatch); re-convert the model with `dalle2 convert`" in msg

    out = tmp_path / "cat.png"
    msg = one_line_error(cli("generate", "a cat", "-m", karlo, "-o", out))
    assert "decoder.safetensors" in msg and "sha256 mismatch" in msg and not out.exists()
    assert "decoder.safetensors" in one_line_error(cli("verify", karlo))

    # a tokenizer file: checked with the text encoder, before the tokenizer reads it
    karlo = copy_model(models["karlo"], tmp_path / "karlo2")
    flip_last_byte(karlo / "tokenizer" / "merges.txt")
    with pytest.raises(d2.Dalle2Error, match=r"file .*merges.txt' is corrupted \(sha256 mismatch\)"):
        d2.load_clip(karlo, backend=BACKENDS[0])


@pytest.mark.skipif(not BACKENDS, reason="needs a backend")
def test_model_json_without_checksums_loads_and_record_adds_them(models, tmp_path):
    karlo = copy_model(models["karlo"], tmp_path / "karlo")
    d = json.loads((karlo / "model.json").read_text())
    del d["files"]
    (karlo / "model.json").write_text(json.dumps(d))
    flip_last_byte(karlo / "decoder.safetensors")  # nothing recorded, so nothing to catch it
    assert store.read_checksums(karlo) is None
    d2.load_pipeline(karlo, backend=BACKENDS[0])
    assert "checksums  none recorded" in cli("info", karlo).output
    assert "--record" in one_line_error(cli("verify", karlo))

    r = cli("verify", karlo, "--record")
    assert r.exit_code == 0, r.output
    assert store.read_checksums(karlo)["decoder.safetensors"]["sha256"] == checksums.sha256_file(
        karlo / "decoder.safetensors")
    assert store.read_spec(karlo) == store.read_spec(models["karlo"])
    assert cli("verify", karlo).exit_code == 0


def test_big_files_are_hashed_once_and_trusted_by_size_and_mtime(models, tmp_path, monkeypatch):
    """Above SMALL_FILE a file is hashed once and remembered (device, inode, size, mtime_ns); a changed mtime
    is hashed again; the default model and `verify_model` always hash everything."""
    monkeypatch.setattr(checksums, "SMALL_FILE", 0)  # every file counts as big
    hashed = []
    real = checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    karlo = copy_model(models["karlo"], tmp_path / "karlo")  # new inodes: nothing remembered
    spec = store.read_spec(karlo)
    n = len(store.read_checksums(karlo))
    store.verify_checksums(karlo, spec)
    assert len(hashed) == n
    hashed.clear()
    store.verify_checksums(karlo, spec)
    assert hashed == []

    path = karlo / "decoder.safetensors"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: hashed again, still good
    store.verify_checksums(karlo, spec)
    assert hashed == ["decoder.safetensors"]

    # corruption that keeps the size and the mtime passes the cached check; the full check catches it
    st = path.stat()
    flip_last_byte(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    store.verify_checksums(karlo, spec)
    with pytest.raises(d2.Dalle2Error, match="sha256 mismatch"):
        store.verify_model(karlo)
    with pytest.raises(d2.Dalle2Error, match="sha256 mismatch"):
        store.verify_checksums(karlo, spec, full=True)
    monkeypatch.setattr(store, "DEFAULT_MODEL_DIR", karlo)  # the default model: always in full
    with pytest.raises(d2.Dalle2Error, match="sha256 mismatch.*reinstall dalle2_portable"):
        store.verify_checksums(karlo, spec)

    # write_spec remembers what it hashes: loading a model just written hashes nothing
    monkeypatch.setattr(store, "DEFAULT_MODEL_DIR", tmp_path / "none")
    store.write_spec(karlo, spec)
    hashed.clear()
    store.verify_checksums(karlo, spec)
    assert hashed == []


def test_training_writes_checksums_and_no_about(models, tmp_path):
    """The training loop's _write_model goes through write_spec: checksums of its result, and no "about" even
    when the base model has one."""
    base = copy_model(models["karlo"], tmp_path / "base")
    store.write_spec(base, store.read_spec(base), about=ABOUT)
    out = _write_model(tmp_path / "run", base, store.read_spec(base), {}, None, "prior", {})
    assert store.read_about(base) == ABOUT and store.read_about(out) is None
    assert set(store.read_checksums(out)) == set(store.read_checksums(base))
    assert len(store.verify_model(out)) == len(store.read_checksums(base))


@pytest.mark.skipif(not BACKENDS, reason="needs a backend")
def test_default_is_the_packaged_model(models, tmp_path, monkeypatch):
    packaged = copy_model(models["karlo"], tmp_path / "site" / "dalle2_portable" / "default_model")
    store.write_spec(packaged, store.read_spec(packaged), about=ABOUT)
    monkeypatch.setattr(store, "DEFAULT_MODEL_DIR", packaged)
    copy_model(models["iv"], tmp_path / "cwd" / "default")  # a local folder named default
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_model("default") == packaged  # the bare word: the packaged model
    assert resolve_model("./default").resolve() == (tmp_path / "cwd" / "default").resolve()
    assert resolve_model(Path("default")).resolve() == (tmp_path / "cwd" / "default").resolve()
    with pytest.raises(d2.Dalle2Error, match="the default model has no revisions or variants"):
        resolve_model("default", revision="main")

    pipe = d2.load_pipeline(backend=BACKENDS[0])
    assert pipe.model_dir == packaged and "prior" in pipe.components
    out = pipe.generate("a cat", prior_steps=2, decoder_steps=2, super_res_steps=2)
    assert out.images[0].size == (16, 16)

    r = cli("info")
    assert r.exit_code == 0, r.output
    assert f"model      {packaged}" in r.output
    assert "about      recipe = dalle2 train prior --data shapes --config tiny" in r.output
    assert "about      steps.prior = 2000" in r.output and "about      tags = tiny, shapes" in r.output
    assert "about      accuracy = 0.91" in r.output
    assert cli("verify").exit_code == 0

    flip_last_byte(packaged / "text_proj.safetensors")
    msg = one_line_error(cli("generate", "a cat", "-o", tmp_path / "x.png"))
    assert "text_proj.safetensors" in msg and "sha256 mismatch" in msg and "reinstall dalle2_portable" in msg


def test_missing_default_is_one_line(models, tmp_path, monkeypatch):
    for state in ("missing", "empty", "no checksums"):
        packaged = tmp_path / state / "default_model"
        if state == "empty":
            packaged.mkdir(parents=True)
        elif state == "no checksums":
            copy_model(models["karlo"], packaged)
            d = json.loads((packaged / "model.json").read_text())
            del d["files"]
            (packaged / "model.json").write_text(json.dumps(d))
        monkeypatch.setattr(store, "DEFAULT_MODEL_DIR", packaged)
        want = "records no checksums" if state == "no checksums" else "the default model is not in this install"
        with pytest.raises(d2.Dalle2Error, match=want) as e:
            d2.load_pipeline(backend=BACKENDS[0] if BACKENDS else "auto")
        assert "\n" not in str(e.value)
        msg = one_line_error(cli("generate", "a cat", "-o", tmp_path / "x.png"))
        assert want in msg
        if state != "no checksums":
            assert "--model kakaobrain/karlo-v1-alpha" in msg and "README" in msg
            assert want in one_line_error(cli("info"))


def test_info_prints_the_about_block_and_bad_about_is_one_line(models, tmp_path):
    karlo = copy_model(models["karlo"], tmp_path / "karlo")
    r = cli("info", karlo)
    n = len(store.read_checksums(karlo))
    assert "about " not in r.output and f"checksums  {n} files" in r.output  # converters write no about
    store.write_spec(karlo, store.read_spec(karlo), about=ABOUT)
    lines = cli("info", karlo).output.splitlines()
    assert [x for x in lines if x.startswith("about")] == [
        "about      recipe = dalle2 train prior --data shapes --config tiny", "about      steps.prior = 2000",
        "about      steps.decoder = 3000", "about      data = shapes", "about      accuracy = 0.91",
        "about      tags = tiny, shapes"]
    with pytest.raises(d2.Dalle2Error, match="must be an object of strings and numbers"):
        store.write_spec(karlo, store.read_spec(karlo), about={"steps": {"prior": object()}})
    d = json.loads((karlo / "model.json").read_text())
    d["about"] = ["not", "an", "object"]
    (karlo / "model.json").write_text(json.dumps(d))
    assert "must be an object" in one_line_error(cli("info", karlo))


def _tree(dst: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) copied to dst."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in names:
        if (REPO / name).is_file() and not name.startswith("dalle2_portable/default_model/"):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dst / name)
    return dst


def _wheel(tree: Path, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out),
                    str(tree)], check=True, capture_output=True, cwd=tree)
    return next(out.glob("dalle2_portable-*.whl"))


_PROBE = ("import dalle2_portable, sys; from dalle2_portable import store; from dalle2_portable.convert import "
          "resolve_model\ntry:\n    d = resolve_model('default'); print(len(store.verify_model(d)), d)\n"
          "except dalle2_portable.Dalle2Error as e:\n    print('error:', e)\nprint(dalle2_portable.__file__)")


def test_the_wheel_ships_the_default_model(models, tmp_path):
    """A non-editable build: with an empty default_model/ it builds and imports (loading "default" is the
    one-line error); with a model there, the wheel holds every file of it and loads it from site-packages."""
    for filled in (False, True):
        tree = _tree(tmp_path / f"tree-{filled}")
        packaged = tree / "dalle2_portable" / "default_model"
        if filled:
            copy_model(models["karlo"], packaged)
        else:
            packaged.mkdir()
        wheel = _wheel(tree, tmp_path / f"wheel-{filled}")
        names = set(zipfile.ZipFile(wheel).namelist())
        assert "dalle2_portable/checksums.py" in names
        shipped = {n for n in names if n.startswith("dalle2_portable/default_model/")}
        expected = {f"dalle2_portable/default_model/{p.relative_to(packaged).as_posix()}"
                    for p in packaged.rglob("*") if p.is_file()}
        assert shipped == expected and bool(shipped) == filled
        site = tmp_path / f"site-{filled}"
        zipfile.ZipFile(wheel).extractall(site)
        run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(site)})
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[-1] == str(site / "dalle2_portable" / "__init__.py")
        if filled:
            assert lines[0] == f"{len(store.read_checksums(packaged))} {site / 'dalle2_portable' / 'default_model'}"
        else:
            assert lines[0].startswith("error: the default model is not in this install")
