"""The super-res stage: its batch is what sampling feeds the upsampler (the noisy large image beside the
antialiased bicubic upscale of the small one); one step agrees across backends; fine-tuning lowers the loss;
a UNet trained from scratch replaces both of the base model's upsamplers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from conftest import BACKENDS, assert_close_to_scale, assert_one_step_agrees

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.sampling import upscale_bicubic
from dalle2_portable.schedule import UnCLIPSchedule
from dalle2_portable.train.loop import TrainSettings, _Context, train
from dalle2_portable.train.shapes import ShapesDataset
from dalle2_portable.train.stages import SCHEDULERS, super_res_batch, super_res_loss

def _package_script():
    path = Path(__file__).parents[1] / "scripts" / "package_default_model.py"
    module_spec = importlib.util.spec_from_file_location("package_default_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


SETTINGS = TrainSettings(steps=60, data_size=32, batch_size=8, lr=1e-3, warmup=10, checkpoint_every=30,
                         image_size=16, sr_noise=0.02)


def _context(**settings):
    data = ShapesDataset(length=8, seed=3)
    return data, _Context(dataclasses.replace(SETTINGS, **settings), UnCLIPSchedule(SCHEDULERS["super_res"]), None,
                          None, data, image_size=16, low_size=8)


def _batch(seed=0, **settings):
    data, ctx = _context(**settings)
    rng = np.random.default_rng(seed)
    return data, super_res_batch(ctx, rng, np.arange(4)), np.random.default_rng(seed)


def test_the_batch_is_what_sampling_feeds():
    data, (sample, t, noise, weights), rng = _batch()
    assert np.array_equal(weights, np.ones(4, np.float32))  # no min-SNR weighting unless asked
    rng.integers(0, 1000, 4)  # replay the draws: timesteps, noise, augmentation
    assert np.array_equal(noise, rng.standard_normal(noise.shape, dtype=np.float32))
    augment = rng.standard_normal((4, 3, 8, 8), dtype=np.float32)
    small = data.pixels(np.arange(4), 8) + np.float32(0.02) * augment
    assert sample.shape == (4, 6, 16, 16)
    assert_close_to_scale(sample[:, 3:], upscale_bicubic(small, 16), 1e-6, "conditioning half")


def test_a_cropped_batch_is_a_square_of_the_whole_one():
    """--sr-crop: after the whole batch's draws, one corner per item; every array is that square of the whole
    batch's (the conditioning upscaled from the whole small image, so no crop edge is made up)."""
    rng = np.random.default_rng(0)
    whole = super_res_batch(_context()[1], rng, np.arange(4))
    corners = rng.integers(0, 16 - 8 + 1, (4, 2))
    _, (sample, t, target, weights), _ = _batch(sr_crop=8)
    assert sample.shape == (4, 6, 8, 8) and target.shape == (4, 3, 8, 8)
    assert np.array_equal(t, whole[1]) and np.array_equal(weights, whole[3])
    for i, (y, x) in enumerate(corners):
        assert np.array_equal(sample[i], whole[0][i, :, y:y + 8, x:x + 8])
        assert np.array_equal(target[i], whole[2][i, :, y:y + 8, x:x + 8])


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
@pytest.mark.parametrize("crop", [None, 8])
def test_one_super_res_step_agrees_across_backends(models, crop):
    spec = store.read_spec(models["iv"])
    cfg, path = spec.components["super_res_first"].config, store.component_path(models["iv"], spec, "super_res_first")
    _, inputs, _ = _batch(1, sr_crop=crop)
    assert_one_step_agrees(lambda b: b.bundle({"super_res_first": b.load_component(cfg.TYPE, cfg, str(path))}),
                           super_res_loss, inputs)


def test_fine_tuning_lowers_the_loss_and_from_scratch_replaces_both_upsamplers(models, tmp_path):
    backend = BACKENDS[0]
    out = train("super_res", "shapes", tmp_path / "tuned", models["iv"], backend=backend, settings=SETTINGS)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), losses  # measured ~0.42
    assert "super_res_last" in store.read_spec(out).components  # fine-tuning keeps the base's last step UNet
    out = train("super_res", "shapes", tmp_path / "new", models["iv"], config="tiny", backend=backend,
                settings=TrainSettings(**{**SETTINGS.__dict__, "steps": 4}))
    spec = store.read_spec(out)
    assert "super_res_last" not in spec.components and spec.defaults.super_res_sample_size == 16
    result = d2.load_pipeline(out, backend=backend).vary(np.ones((1, 16), np.float32), decoder_steps=2,
                                                         super_res_steps=2)
    assert result.samples.shape == (1, 3, 16, 16) and np.isfinite(result.samples).all()


def _without_decoder(model, out: Path) -> Path:
    """A copy of `model` without its decoder (and text_proj), so no decoder fixes an upsampler's small size."""
    shutil.copytree(model, out)
    spec = store.read_spec(out)
    store.write_spec(out, dataclasses.replace(
        spec, components={k: c for k, c in spec.components.items() if k not in ("text_proj", "decoder")},
        defaults=dataclasses.replace(spec.defaults, decoder_sample_size=None)))
    return out


@pytest.mark.slow
def test_an_upsampler_trains_beside_its_decoder_from_a_base_without_one(models, tmp_path):
    """--low-size: the upsampler of a decoder still training (the default model's recipe runs them side by
    side) learns from a base model with no decoder, and its model records the size it upsamples from."""
    size = store.read_spec(models["iv"]).components["decoder"].config.sample_size
    base = _without_decoder(models["iv"], tmp_path / "no_decoder")
    settings = TrainSettings(**{**SETTINGS.__dict__, "steps": 2})
    with pytest.raises(Dalle2Error, match="no decoder to upsample from; pass --low-size"):
        train("super_res", "shapes", tmp_path / "a", base, config="tiny", backend=BACKENDS[0], settings=settings)
    out = train("super_res", "shapes", tmp_path / "b", base, config="tiny", backend=BACKENDS[0],
                settings=dataclasses.replace(settings, low_size=size))
    assert store.read_spec(out).defaults.decoder_sample_size == size
    # the recipe's last step joins it to the decoder (scripts/package_default_model.py)
    joined = _package_script().assemble(Path(models["iv"]), out, tmp_path / "joined", {"super_res_steps": 2})
    spec = store.read_spec(joined)
    assert spec.components["super_res_first"] == store.read_spec(out).components["super_res_first"]
    assert spec.defaults.super_res_steps == 2 and spec.defaults.super_res_sample_size == 16
    result = d2.load_pipeline(joined, backend=BACKENDS[0]).vary(np.ones((1, 16), np.float32), decoder_steps=2)
    assert result.samples.shape == (1, 3, 16, 16)
    assert store.verify_model(joined)  # its checksums were written
    with pytest.raises(Dalle2Error, match=f"--low-size {size + 4} differs from the base model's decoder"):
        train("super_res", "shapes", tmp_path / "c", models["iv"], config="tiny", backend=BACKENDS[0],
              settings=dataclasses.replace(settings, low_size=size + 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_upsampler_trains_from_nothing(models, tmp_path, backend):
    """It sees pixels only, so no base model is needed (the recipe trains it beside CLIP): RUN/model holds the
    upsampler alone, with the very weights a run on a base model gets from the same seed and draws."""
    settings = TrainSettings(**{**SETTINGS.__dict__, "steps": 3})
    with pytest.raises(Dalle2Error, match="no decoder to upsample from; pass --low-size"):
        train("super_res", "shapes", tmp_path / "a", None, config="tiny", backend=backend, settings=settings)
    settings = dataclasses.replace(settings, low_size=8)
    with pytest.raises(Dalle2Error, match="no base model: give --model"):
        train("super_res", "shapes", tmp_path / "b", None, backend=backend, settings=settings)
    out = train("super_res", "shapes", tmp_path / "c", None, config="tiny", backend=backend, settings=settings)
    spec = store.read_spec(out)
    assert list(spec.components) == ["super_res_first"] and spec.tokenizer is None
    assert (spec.defaults.decoder_sample_size, spec.defaults.super_res_sample_size) == (8, 16)
    assert store.verify_model(out)
    with pytest.raises(Dalle2Error, match="holds an upsampler alone .* join its super_res_first to a model"):
        d2.load_pipeline(out, backend=backend)
    # the same stage on a base model whose decoder is not there to fix the size
    base = _without_decoder(models["iv"], tmp_path / "no_decoder")
    on_base = train("super_res", "shapes", tmp_path / "d", base, config="tiny", backend=backend, settings=settings)
    ours, theirs = (load_file(str(p / "super_res_first.safetensors")) for p in (out, on_base))
    assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_an_upsampler_trained_on_crops_upsamples_whole_pictures(models, tmp_path):
    """--sr-crop: the run learns from squares, the model it writes samples whole pictures; a crop the UNet
    cannot take, or a crop for another stage, is one line before anything trains."""
    size = store.read_spec(models["iv"]).components["decoder"].config.sample_size
    settings = TrainSettings(**{**SETTINGS.__dict__, "steps": 3, "low_size": size})
    backend = BACKENDS[0]
    for crop, message in ((32, "--sr-crop 32 must be at most the upsampler's 16 px"), (9, "a multiple of 2")):
        with pytest.raises(Dalle2Error, match=message):
            train("super_res", "shapes", tmp_path / f"bad{crop}", None, config="tiny", backend=backend,
                  settings=dataclasses.replace(settings, sr_crop=crop))
    with pytest.raises(Dalle2Error, match="the decoder trains on whole pictures, so drop --sr-crop"):
        train("decoder", "shapes", tmp_path / "decoder", models["iv"], backend=backend,
              settings=dataclasses.replace(settings, sr_crop=8))
    out = train("super_res", "shapes", tmp_path / "crop", None, config="tiny", backend=backend,
                settings=dataclasses.replace(settings, sr_crop=8))
    spec = store.read_spec(out)
    assert spec.defaults.super_res_sample_size == 16
    joined = _package_script().assemble(Path(models["iv"]), out, tmp_path / "joined", {"super_res_steps": 2})
    result = d2.load_pipeline(joined, backend=backend).vary(np.ones((1, 16), np.float32), decoder_steps=2)
    assert result.samples.shape == (1, 3, 16, 16) and np.isfinite(result.samples).all()
