"""The decoder stage: its loss (text_proj + decoder, epsilon MSE + improved DDPM's variational bound) equals the
same loss computed from diffusers' own UnCLIPTextProjModel and UNet2DConditionModel outputs on the same weights
and draws; one step agrees across backends; fine-tuning the tiny Karlo decoder lowers the loss and the result
decodes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_one_step_agrees, backend_params
from diffusers import UNet2DConditionModel
from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
from test_losses import SCHEDULE, T, _reference_vlb

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.backends import get_backend
from dalle2_portable.modules.unet import decoder_attention_mask
from dalle2_portable.train.loop import TrainSettings, train
from dalle2_portable.train.stages import decoder_loss


def _inputs(spec, seed: int = 0):
    """A batch as stages.decoder_batch lays it out, at T's four timesteps, one image embedding dropped."""
    rng = np.random.default_rng(seed)
    dec, tp = spec.components["decoder"].config, spec.components["text_proj"].config
    b, size, tokens = len(T), dec.sample_size, 6
    x0 = np.clip(rng.standard_normal((b, 3, size, size)) * 0.5, -1, 1).astype(np.float32)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    terms = SCHEDULE.training_terms(T)
    x_t = (terms["sqrt_alphas_cumprod"][:, None, None, None] * x0
           + terms["sqrt_one_minus_alphas_cumprod"][:, None, None, None] * noise).astype(np.float32)
    text_mask = np.ones((b, tokens), bool)
    text_mask[1, 4:] = False
    mask = decoder_attention_mask(np.pad(text_mask, ((0, 0), (tp.clip_extra_context_tokens, 0)), constant_values=True))
    c = tp.clip_embeddings_dim
    return (x_t, T, rng.standard_normal((b, c), dtype=np.float32), np.array([[False], [True], [False], [False]]),
            rng.standard_normal((b, c), dtype=np.float32), rng.standard_normal((b, tokens, c), dtype=np.float32),
            mask, x0, noise, np.ones(b, np.float32), terms), text_mask


def _bundle(backend: str, model_dir, dtype=None):
    b = get_backend(backend)
    spec = store.read_spec(model_dir)
    parts = {n: b.load_component(spec.components[n].type, spec.components[n].config,
                                 str(store.component_path(model_dir, spec, n)), dtype)
             for n in ("text_proj", "decoder")}
    return b, b.bundle(parts), spec


@pytest.mark.parametrize("backend", backend_params())
def test_decoder_loss_equals_diffusers(models, backend):
    b, bundle, spec = _bundle(backend, models["iv"])
    inputs, text_mask = _inputs(spec)
    ours, _ = b.value_and_grad(bundle, decoder_loss)(*inputs)
    x_t, t, image, drop, embeds, states, _, x0, noise, _, terms = inputs
    text_proj = UnCLIPTextProjModel.from_pretrained(models["iv_src"], subfolder="text_proj").eval()
    unet = UNet2DConditionModel.from_pretrained(models["iv_src"], subfolder="decoder").eval()
    with torch.no_grad():
        image = np.where(drop, text_proj.learned_classifier_free_guidance_embeddings.numpy()[None], image)
        hidden, time = text_proj(image_embeddings=torch.from_numpy(image), prompt_embeds=torch.from_numpy(embeds),
                                 text_encoder_hidden_states=torch.from_numpy(states),
                                 do_classifier_free_guidance=False)
        full_mask = np.pad(text_mask, ((0, 0), (hidden.shape[1] - text_mask.shape[1], 0)), constant_values=True)
        out = unet(torch.from_numpy(x_t), torch.from_numpy(t), encoder_hidden_states=hidden, class_labels=time,
                   attention_mask=torch.from_numpy(full_mask)).sample.numpy().astype(np.float64)
    reference = np.mean((out[:, :3] - noise) ** 2) + np.mean(_reference_vlb(out, x0, x_t, terms))
    assert abs(ours - reference) <= 1e-5 * reference, (ours, reference)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_one_decoder_step_agrees_across_backends(models):
    inputs, _ = _inputs(store.read_spec(models["iv"]), seed=1)
    assert_one_step_agrees(lambda b: _bundle(b.name, models["iv"])[1], decoder_loss, inputs)


def test_fine_tuning_the_decoder_lowers_the_loss_and_decodes(models, tmp_path):
    backend = BACKENDS[0]
    run = tmp_path / "run"
    out = train("decoder", "shapes", run, models["iv"], backend=backend,
                settings=TrainSettings(steps=60, data_size=32, batch_size=8, lr=1e-3, warmup=10,
                                       checkpoint_every=30))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    # the variational bound at t near 999 spikes single steps (a poorly calibrated variance there): medians
    assert np.median(losses[-20:]) < 0.7 * np.median(losses[:10]), losses  # measured ~0.45
    pipe = d2.load_pipeline(out, backend=backend)
    assert pipe.spec.components["decoder"].config == store.read_spec(models["iv"]).components["decoder"].config
    result = pipe.vary(np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32), decoder_steps=3,
                       super_res_steps=2)
    assert result.decoder_samples.shape == (1, 3, 8, 8) and np.isfinite(result.samples).all()


def test_cli_trains_from_an_image_folder_and_reports_bad_records_in_one_line(models, tmp_path):
    """As a user runs it (a subprocess: warnings reach stderr as the CLI formats them, not pytest's capture)."""
    import os
    import subprocess
    import sys

    from PIL import Image

    pics = tmp_path / "pics"
    pics.mkdir()
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        Image.new("RGB", (40, 30), colour).save(pics / f"{i}.png")
    (pics / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "red"}\n{"file_name": "gone.png", '
                                         '"text": "x"}\n{"file_name": "1.png", "text": "blue"}\n')
    args = [sys.executable, "-m", "dalle2_portable.cli", "train", "decoder", "--out", str(tmp_path / "run"), "-m",
            str(models["iv"]), "--steps", "3", "--batch-size", "2", "--backend", BACKENDS[0], "--quiet"]
    r = subprocess.run(args + ["--data", str(pics)], capture_output=True, text=True, env=os.environ, timeout=300)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "metadata.jsonl" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert ":2: file 'gone.png' not found" in warnings[0]
    assert (tmp_path / "run" / "model" / "model.json").is_file()
    r = subprocess.run(args + ["--data", str(tmp_path / "nowhere")], capture_output=True, text=True, env=os.environ,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "give `shapes` or a folder" in lines[0], r.stderr


def test_freeze_keeps_a_component_and_unknown_names_are_one_line(models, tmp_path):
    from safetensors.numpy import load_file

    from dalle2_portable.errors import Dalle2Error

    settings = TrainSettings(steps=3, data_size=8, batch_size=4, lr=1e-3, warmup=1, freeze=("text_proj",))
    out = train("decoder", "shapes", tmp_path / "run", models["iv"], backend=BACKENDS[0], settings=settings)
    for name, moved in (("text_proj", False), ("decoder", True)):
        before, after = (load_file(str(d / f"{name}.safetensors")) for d in (models["iv"], out))
        change = max(np.abs(after[k] - before[k]).max() / np.abs(before[k]).max() for k in before)
        # frozen: only the EMA's float rounding (decay * w + (1 - decay) * w); trained: lr-sized steps
        assert (change > 1e-4) if moved else (change < 1e-6), (name, change)
    with pytest.raises(Dalle2Error, match="cannot freeze 'decoder.nope'"):
        train("decoder", "shapes", tmp_path / "bad", models["iv"], backend=BACKENDS[0],
              settings=TrainSettings(steps=1, data_size=8, batch_size=4, freeze=("decoder.nope",)))
