"""Fine-tuning the tiny Karlo (text-to-image: no CLIP image tower) on a 10-image folder, as a user fine-tunes
Karlo on their own pictures: the image tower comes from `--clip` (here the tiny image-variations model, whose
towers are Karlo's, as ViT-L/14 is for the real one); the loss falls and the result generates."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BACKENDS
from click.testing import CliRunner

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.cli import main
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.train.settings import TrainSettings
from dalle2_portable.train.shapes import ShapesDataset


@pytest.fixture
def folder(tmp_path):
    data, root = ShapesDataset(length=10, seed=5), tmp_path / "pictures"
    root.mkdir()
    lines = []
    for i in range(10):
        data.image(i, 32).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": data.caption(i)}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_fine_tuning_karlo_on_ten_pictures(models, folder, tmp_path):
    backend = BACKENDS[0]
    settings = TrainSettings(steps=40, batch_size=5, lr=1e-3, warmup=5, checkpoint_every=40)
    out = d2.train("decoder", folder, tmp_path / "run", models["karlo"], clip=models["iv"], backend=backend,
                   settings=settings)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), (losses[:8], losses[-8:])
    spec = store.read_spec(out)
    assert "prior" in spec.components and "image_encoder" not in spec.components  # still Karlo, tuned
    result = d2.load_pipeline(out, backend=backend).generate("a red circle", prior_steps=3, decoder_steps=3,
                                                             super_res_steps=2)
    assert np.isfinite(result.samples).all() and result.images[0].size[0] == spec.defaults.super_res_sample_size


def test_karlo_without_clip_says_to_pass_one(models, folder, tmp_path):
    result = CliRunner().invoke(main, ["train", "prior", "--data", str(folder), "--out", str(tmp_path / "r"), "-m",
                                       str(models["karlo"]), "--steps", "2", "--backend", BACKENDS[0], "--quiet"])
    assert result.exit_code == 2 and "pass --clip with the CLIP it was trained with" in result.output
    with pytest.raises(Dalle2Error, match="has no image_encoder; use a model that includes it"):
        d2.train("prior", folder, tmp_path / "s", models["karlo"], clip=models["karlo"], backend=BACKENDS[0],
                 settings=TrainSettings(steps=1))
