"""The CLIP stage: its loss equals transformers' own `CLIPModel(..., return_loss=True)` on the same weights and
batch; one step agrees across backends; trained from scratch on the shapes data its loss falls, the towers
retrieve the right captions, and the result (with its temperature) loads as a CLIP model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_one_step_agrees, backend_params
from transformers import CLIPModel

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.backends import get_backend
from dalle2_portable.convert import resolve_model
from dalle2_portable.train.loop import TrainSettings, _Context, train
from dalle2_portable.train.shapes import ShapesDataset
from dalle2_portable.train.stages import clip_batch, clip_loss


def _bundle(b, model_dir):
    spec = store.read_spec(model_dir)
    parts = {n: b.load_component(spec.components[n].type, spec.components[n].config,
                                 str(store.component_path(model_dir, spec, n)))
             for n in ("text_encoder", "image_encoder")}
    parts["logit_scale"] = b.build("clip_logit_scale", None)
    b.load_weights(parts["logit_scale"], {"logit_scale": np.array(spec.defaults.clip_logit_scale, np.float32)})
    return b.bundle(parts)


def _batch(model_dir, backend: str):
    clip = d2.load_clip(model_dir, backend=backend)
    ctx = _Context(TrainSettings(steps=1), None, None, None, ShapesDataset(length=6, seed=1), clip=clip,
                   image_size=32)
    return clip_batch(ctx, np.random.default_rng(0), np.arange(6))


@pytest.mark.parametrize("backend", backend_params())
def test_clip_loss_equals_transformers(models, backend):
    model_dir = resolve_model(models["clip"])  # the tiny transformers CLIPModel, converted
    ids, positions, pixels = _batch(model_dir, backend)
    b = get_backend(backend)
    ours, _ = b.value_and_grad(_bundle(b, model_dir), clip_loss)(ids, positions, pixels)
    reference = CLIPModel.from_pretrained(models["clip"]).eval()
    with torch.no_grad():
        loss = reference(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                         return_loss=True).loss.item()
    assert abs(ours - loss) <= 1e-5 * loss, (ours, loss)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_one_clip_step_agrees_across_backends(models):
    model_dir = resolve_model(models["clip"])
    assert_one_step_agrees(lambda b: _bundle(b, model_dir), clip_loss, _batch(model_dir, "torch"))


def test_clip_from_scratch_learns_the_shapes(models, tmp_path):
    backend = BACKENDS[0]
    run = tmp_path / "run"
    out = train("clip", "shapes", run, models["iv"], config="tiny", backend=backend,
                settings=TrainSettings(steps=120, data_size=64, batch_size=16, lr=1e-3, warmup=10,
                                       checkpoint_every=60))
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), losses  # measured 2.74 -> ~0.5
    spec = store.read_spec(out)
    assert spec.components["text_encoder"].config.hidden_size == 64 and spec.defaults.clip_logit_scale > 2.6
    clip = d2.load_clip(out, backend=backend)
    data = ShapesDataset(length=64, seed=0)
    scores = clip.similarity([data.caption(i) for i in range(16)], [data.image(i, 32) for i in range(16)])
    assert np.mean(scores.argmax(1) == np.arange(16)) >= 0.5  # chance is 1/16; measured ~0.7 at 120 steps


def test_from_nothing_the_clip_stage_seeds_its_tokenizer_and_towers(tmp_path):
    """No base model: RUN/seed holds a CLIP tokenizer learnt from the captions, which transformers' CLIPTokenizer
    reads as ours does (every caption word one token), and towers at the preset's sizes; the result loads."""
    from transformers import CLIPTokenizer

    settings = TrainSettings(steps=3, data_size=64, batch_size=8, checkpoint_every=3, image_size=32)
    out = train("clip", "shapes", tmp_path / "run", config="tiny", backend=BACKENDS[0], settings=settings)
    seed = tmp_path / "run" / "seed"
    texts = ["a small purple square on a yellow background", "there is one orange circle", "Zebras! 42 ümlaut"]
    clip = d2.load_clip(out, backend=BACKENDS[0])
    ours = clip.tokenize(texts)
    ref = CLIPTokenizer(str(seed / "tokenizer" / "vocab.json"), str(seed / "tokenizer" / "merges.txt"))(
        texts, padding="max_length", max_length=32, truncation=True)["input_ids"]
    assert np.array_equal(ours, np.array(ref))
    assert (ours[0] != ours[0, -1]).sum() == 1 + 8  # BOS + one token per word (EOS pads the rest)
    spec = store.read_spec(out)
    text, vision = spec.components["text_encoder"].config, spec.components["image_encoder"].config
    assert (text.hidden_size, vision.image_size, spec.image_processor.shortest_edge) == (64, 32, 32)
    assert np.isfinite(clip.encode_image([ShapesDataset(length=1, seed=0).image(0, 32)])).all()
    with pytest.raises(Exception, match="from nothing only the CLIP stage .* and the upsampler"):
        train("prior", "shapes", tmp_path / "p", config="tiny", backend=BACKENDS[0], settings=settings)
