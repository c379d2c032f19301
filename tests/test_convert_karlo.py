"""The Karlo converter on tiny Karlo and Karlo-variations pipelines saved by diffusers' own `save_pretrained`:
from a local folder and from a local Hub cache by id (offline), in safetensors, .bin and fp16-variant form;
the converted components against diffusers' modules loaded from the same folder; bad sources fail in one line
and leave nothing behind."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from builders import put_in_hub_cache, write_clip_vocab, write_tiny_karlo
from click.testing import CliRunner
from conftest import BACKENDS, assert_close_to_scale, backend_params
from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
from safetensors.numpy import load_file
from transformers import CLIPTextModelWithProjection

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.cli import main
from dalle2_portable.convert import karlo as karlo_layout
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.modules.unet import decoder_attention_mask

DIFFUSERS = {"prior": PriorTransformer, "text_proj": UnCLIPTextProjModel, "decoder": UNet2DConditionModel,
             "super_res_first": UNet2DModel, "super_res_last": UNet2DModel}


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    """{form: folder} of tiny Karlo pipelines (built once per module: ~3 s)."""
    root = tmp_path_factory.mktemp("karlo")
    vocab = write_clip_vocab(root / "vocab")
    return {"safetensors": write_tiny_karlo(root / "karlo", vocab),
            "bin": write_tiny_karlo(root / "karlo_bin", vocab, safetensors=False),
            "fp16": write_tiny_karlo(root / "karlo_fp16", vocab, variant="fp16"),
            "variations": write_tiny_karlo(root / "karlo_iv", vocab, variations=True)}


def _copy(src, tmp_path, name="src"):
    return shutil.copytree(src, tmp_path / name)


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_convert_copies_every_tensor_exactly(karlo, tmp_path, form):
    """Each component's tensors equal diffusers' / transformers' own loading of the same folder, bit for bit."""
    src = karlo[form]
    spec = d2.convert(src, tmp_path / "out")
    assert list(spec.components) == ["text_encoder", "prior", "text_proj", "decoder", "super_res_first",
                                     "super_res_last"]
    refs = {n: cls.from_pretrained(src / n) for n, cls in DIFFUSERS.items()}
    refs["text_encoder"] = CLIPTextModelWithProjection.from_pretrained(src / "text_encoder")
    for name, ref in refs.items():
        ours = load_file(tmp_path / "out" / f"{name}.safetensors")
        theirs = {k: v.numpy() for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
        assert sorted(ours) == sorted(theirs), name
        for k, v in theirs.items():
            np.testing.assert_array_equal(ours[k], v, err_msg=f"{name} {k}")


def test_model_json_records_schedulers_tokenizer_and_defaults(karlo, tmp_path):
    src = karlo["safetensors"]
    d2.convert(src, tmp_path / "out")
    spec = store.read_spec(tmp_path / "out")
    assert spec.source.layout == "diffusers-unclip" and spec.source.repo == str(src)
    for ours, folder in (("prior", "prior_scheduler"), ("decoder", "decoder_scheduler"),
                         ("super_res", "super_res_scheduler")):
        ref = UnCLIPScheduler.from_pretrained(src / folder).config
        got = spec.schedulers[ours]
        assert (got.variance_type, got.prediction_type, got.clip_sample, got.clip_sample_range,
                got.num_train_timesteps) == (ref.variance_type, ref.prediction_type, ref.clip_sample,
                                             ref.clip_sample_range, ref.num_train_timesteps)
    assert spec.tokenizer.pad_token == "!"
    d = spec.defaults
    assert (d.prior_steps, d.decoder_steps, d.super_res_steps, d.prior_guidance, d.decoder_guidance,
            d.decoder_sample_size, d.super_res_sample_size) == (25, 25, 7, 4.0, 8.0, 8, 16)
    assert spec.components["super_res_last"].config.sample_size is None  # as on the Hub
    # the text encoder and tokenizer work through load_clip, and pad with "!" = id 0 as Karlo does
    clip = d2.load_clip(tmp_path / "out", backend=BACKENDS[0])
    ids = clip.tokenize(["a cat"])
    assert ids.shape == (1, 77) and ids[0, -1] == 0


@pytest.mark.parametrize("backend", backend_params())
def test_load_pipeline_runs_like_diffusers(karlo, backend):
    """load_pipeline on the local folder: the converted decoder and prior compute what diffusers' do."""
    src = karlo["safetensors"]
    pipe = d2.load_pipeline(src, backend=backend)
    assert set(pipe.components) == {"text_encoder", "prior", "text_proj", "decoder", "super_res_first",
                                    "super_res_last"}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    context = rng.standard_normal((2, 81, 24)).astype(np.float32)
    time = rng.standard_normal((2, 64)).astype(np.float32)
    mask = np.ones((2, 81), bool)
    mask[1, 40:] = False
    ref = UNet2DConditionModel.from_pretrained(src / "decoder").eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.tensor(500), torch.from_numpy(context),
                       class_labels=torch.from_numpy(time), attention_mask=torch.from_numpy(mask)).sample.numpy()
    (got,) = pipe.backend.run(pipe.components["decoder"], x, np.array(500), context, time,
                              decoder_attention_mask(mask))
    assert_close_to_scale(got, expected, 1e-5, f"{backend} converted decoder")
    sr = UNet2DModel.from_pretrained(src / "super_res_last").eval()
    x6 = rng.standard_normal((1, 6, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = sr(torch.from_numpy(x6), torch.tensor(0)).sample.numpy()
    (got,) = pipe.backend.run(pipe.components["super_res_last"], x6, np.array(0))
    assert_close_to_scale(got, expected, 1e-5, f"{backend} converted super_res_last")


def test_variations_pipeline(karlo, tmp_path):
    spec = d2.convert(karlo["variations"], tmp_path / "out")
    assert "prior" not in spec.components and spec.components["image_encoder"].type == "clip_vision"
    assert "prior" not in spec.schedulers and set(spec.schedulers) == {"decoder", "super_res"}
    assert spec.image_processor.shortest_edge == 32 and spec.image_processor.crop_height == 32
    assert spec.defaults.decoder_guidance == 8.0 and spec.defaults.super_res_sample_size == 16
    pipe = d2.load_pipeline(tmp_path / "out", backend=BACKENDS[0])
    assert "image_encoder" in pipe.components and "prior" not in pipe.components


def test_fp16_variant(karlo, tmp_path):
    src = karlo["fp16"]
    d2.convert(src, tmp_path / "out", variant="fp16")
    ours = load_file(tmp_path / "out" / "decoder.safetensors")  # fp32 written from fp16 exactly
    theirs = load_file(src / "decoder" / "diffusion_pytorch_model.fp16.safetensors")
    assert all(ours[k].dtype == np.float32 and np.array_equal(ours[k], theirs[k].astype(np.float32)) for k in theirs)
    with pytest.raises(Dalle2Error, match="holds variant files \\(fp16\\): pass --variant fp16"):
        d2.convert(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_hub_id_offline_converts_once_and_caches(karlo, tmp_path, monkeypatch):
    """A Hub id resolves through the local Hub cache (offline), converts once; the second load converts nothing
    and does not even need the source's weights any more."""
    commit = put_in_hub_cache(karlo["safetensors"], "kakaobrain/karlo-v1-alpha", Path(os.environ["HF_HUB_CACHE"]))
    pipe = d2.load_pipeline("kakaobrain/karlo-v1-alpha", backend=BACKENDS[0])
    assert pipe.model_dir.name == commit and pipe.spec.source.repo == "kakaobrain/karlo-v1-alpha"
    assert pipe.spec.source.revision == commit

    def boom(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(karlo_layout, "convert_karlo", boom)
    for blob in (Path(os.environ["HF_HUB_CACHE"]) / "models--kakaobrain--karlo-v1-alpha" / "blobs").iterdir():
        if blob.stat().st_size > 10_000:  # the weights: gone from the Hub cache
            blob.unlink()
    again = d2.load_pipeline("kakaobrain/karlo-v1-alpha", backend=BACKENDS[0])
    assert again.model_dir == pipe.model_dir


def test_hub_downloads_are_pinned_and_bin_only_where_no_safetensors(karlo, monkeypatch):
    """One Hub resolution: the probe asks for the index files at the revision; every later download asks for
    the commit the probe resolved, first configs + safetensors, then (this repo has none) the .bin files."""
    commit = put_in_hub_cache(karlo["bin"], "kakaobrain/karlo-v1-alpha", Path(os.environ["HF_HUB_CACHE"]))
    calls = []
    real = huggingface_hub.snapshot_download

    def recording(repo, revision=None, allow_patterns=None, **kw):
        calls.append((revision, allow_patterns))
        return real(repo, revision=revision, allow_patterns=allow_patterns, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    d2.load_pipeline("kakaobrain/karlo-v1-alpha", backend=BACKENDS[0])
    assert [revision for revision, _ in calls] == [None, commit, commit]
    assert not any(p.endswith((".safetensors", ".bin")) for p in calls[0][1])
    assert "decoder/diffusion_pytorch_model.safetensors" in calls[1][1]
    assert not any(p.endswith(".bin") for p in calls[1][1])
    assert "decoder/diffusion_pytorch_model.bin" in calls[2][1] and "text_encoder/pytorch_model.bin" in calls[2][1]


def test_model_directory_on_the_hub_downloads_what_its_model_json_names(models, tmp_path, monkeypatch):
    """A repo that holds a converted model directory loads by id; the download each call asks for is all it
    gets (each call's answer is a fresh folder holding only the files its patterns match, as a fresh Hub cache
    would), so weights that nobody asked for cannot be found by accident."""
    repo = "someone/tiny-unclip"
    put_in_hub_cache(models["karlo"], repo, Path(os.environ["HF_HUB_CACHE"]))
    real = huggingface_hub.snapshot_download
    calls = []

    def only_what_was_asked(repo_id, revision=None, allow_patterns=None, **kw):
        full = Path(real(repo_id, revision=revision, allow_patterns=allow_patterns, **kw))
        out = tmp_path / f"download-{len(calls)}" / full.name  # named by its commit, as a snapshot is
        calls.append(allow_patterns)
        for p in full.rglob("*"):
            rel = p.relative_to(full).as_posix()
            if p.is_file() and any(fnmatch.fnmatchcase(rel, pat) for pat in allow_patterns):
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, out / rel)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", only_what_was_asked)
    pipe = d2.load_pipeline(repo, backend=BACKENDS[0])
    assert not any(p.endswith(".safetensors") for p in calls[0])  # the probe fetches index files only
    assert "decoder.safetensors" in calls[1] and "tokenizer/*" in calls[1]
    out = pipe.generate("a red cube", decoder_steps=2, prior_steps=2, super_res_steps=2)
    assert out.images[0].size == (16, 16)


@pytest.mark.parametrize("form,repo,tower", [("bin", "kakaobrain/karlo-v1-alpha", "prior"),
                                             ("variations", "kakaobrain/karlo-v1-alpha-image-variations",
                                              "image_encoder")])
def test_cli_convert_hub_id(karlo, tmp_path, form, repo, tower):
    put_in_hub_cache(karlo[form], repo, Path(os.environ["HF_HUB_CACHE"]))
    r = CliRunner().invoke(main, ["convert", repo, str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "decoder 215,782" in r.output and f"{tower} " in r.output
    r = CliRunner().invoke(main, ["info", str(tmp_path / "out")])
    assert r.exit_code == 0 and "unet2d_condition" in r.output and "learned_range" in r.output
    assert f"{repo} @ " in r.output


def _fail(src, tmp_path, match: str):
    """`dalle2 convert` fails with exit 2 and one line containing `match`; no output and no temporary left."""
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_truncated_weight_file(karlo, tmp_path):
    src = _copy(karlo["safetensors"], tmp_path)
    f = src / "decoder" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _fail(src, tmp_path, "decoder")
    _fail(src, tmp_path, "truncated")


def test_missing_subfolder(karlo, tmp_path):
    src = _copy(karlo["safetensors"], tmp_path)
    shutil.rmtree(src / "super_res_last")
    _fail(src, tmp_path, "missing the subfolder 'super_res_last'")


def test_unknown_block_type(karlo, tmp_path):
    src = _copy(karlo["safetensors"], tmp_path)
    cfg = src / "decoder" / "config.json"
    d = json.loads(cfg.read_text())
    d["down_block_types"][1] = "CrossAttnDownBlock2D"
    cfg.write_text(json.dumps(d))
    _fail(src, tmp_path, "unsupported down_block_types='CrossAttnDownBlock2D'")


def test_unsupported_pipeline_and_missing_entry(karlo, tmp_path):
    src = _copy(karlo["safetensors"], tmp_path)
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    _fail(src, tmp_path, "pipeline 'StableDiffusionPipeline' is not supported")
    del index["prior"]
    (src / "model_index.json").write_text(json.dumps(index))
    _fail(src, tmp_path, "no 'prior' entry")


def test_mismatched_weights_name_the_tensor(karlo, tmp_path):
    """Weights that do not fit the config (another decoder's file) fail naming the tensor, before writing."""
    src = _copy(karlo["safetensors"], tmp_path)
    shutil.copy(src / "super_res_first" / "diffusion_pytorch_model.safetensors",
                src / "decoder" / "diffusion_pytorch_model.safetensors")
    _fail(src, tmp_path, "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("form", ["safetensors", "bin"])
def test_a_terminal_sees_a_progress_bar_over_every_source_byte(karlo, tmp_path, monkeypatch, form):
    """On a terminal, converting shows one bar over the source's tensor bytes (safetensors headers, or the .bin
    files' sizes), and every byte is counted once; off a terminal nothing is drawn."""
    import contextlib
    import io
    import sys

    weights = sys.modules["dalle2_portable.convert.weights"]
    converting = sys.modules["dalle2_portable.convert"]
    seen = []

    @contextlib.contextmanager
    def spy(total, desc):
        with weights.conversion_progress(total, desc) as bar:
            yield bar
            seen.append((bar.n, bar.total, bar.disable))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(converting, "conversion_progress", spy)
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    d2.convert(karlo[form], tmp_path / "tty")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    d2.convert(karlo[form], tmp_path / "pipe")
    (n, total, disabled), (_, _, off) = seen
    assert not disabled and off and total > 0
    assert n == total
    assert "converting" in screen.getvalue() and "B/s" in screen.getvalue()
