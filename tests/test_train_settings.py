"""Launching runs: `dalle2 train --from RUN/run.json` re-runs a run to the same weights, `--config FILE.json`
resizes the preset's components, settings read from JSON are checked before anything runs (one line each),
previews are written through the pipeline, accumulation runs, the progress bar shows loss and samples/s, and
`d2.train` is the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import BACKENDS
from PIL import Image
from safetensors.numpy import load_file

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.cli import main
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.train.settings import TrainSettings, settings_from


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _train(base, out, *extra):
    return _cli("train", "prior", "--data", "shapes", "--out", out, "-m", base, "--config", "tiny", "--steps", 4,
                "--data-size", 16, "--batch-size", 4, "--checkpoint-every", 2, "--backend", BACKENDS[0], "--quiet", *extra)


def test_from_run_json_reruns_the_run_bit_for_bit(models, tmp_path):
    first = _train(models["iv"], tmp_path / "a", "--lr", "2e-3", "--min-snr-gamma", "5", "--accumulate", "2")
    assert first.exit_code == 0, first.output
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["settings"]["lr"] == 2e-3 and record["settings"]["accumulate"] == 2
    again = _cli("train", "--from", tmp_path / "a" / "run.json", "--out", tmp_path / "b", "--quiet")
    assert again.exit_code == 0, again.output
    a, b = (load_file(str(tmp_path / r / "checkpoint" / "weights.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # an option given overrides the file's
    third = _cli("train", "--from", tmp_path / "a" / "run.json", "--out", tmp_path / "c", "--steps", 2, "--quiet")
    assert third.exit_code == 0, third.output
    assert json.loads((tmp_path / "c" / "run.json").read_text())["settings"]["steps"] == 2


def test_bad_launch_files_are_one_line_and_write_nothing(models, tmp_path):
    good = json.loads(json.dumps({"stage": "prior", "data_source": "shapes", "base_model": str(models["iv"]),
                                  "config": "tiny", "settings": {"steps": 2}}))
    cases = {"lr": ({**good, "settings": {"steps": 2, "lr": "fast"}}, "setting lr must be float, got 'fast'"),
             "key": ({**good, "settings": {"steps": 2, "learning_rate": 1}}, "unknown setting 'learning_rate'"),
             "stage": ({k: v for k, v in good.items() if k != "stage"}, "no 'stage'"),
             "list": ([1, 2], "expected a JSON object")}
    for name, (doc, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        result = _cli("train", "--from", path, "--out", tmp_path / name, "--quiet")
        assert result.exit_code == 2 and message in result.output, (name, result.output)
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / name).exists()
    result = _cli("train", "--out", tmp_path / "x", "--data", "shapes")
    assert result.exit_code == 2 and "no stage: give STAGE (or --from RUN/run.json)" in result.output


def test_config_file_replaces_preset_fields(models, tmp_path):
    sizes = tmp_path / "sizes.json"
    sizes.write_text(json.dumps({"preset": "tiny", "prior": {"num_layers": 1, "attention_head_dim": 8}}))
    result = _train(models["iv"], tmp_path / "run", "--config", sizes, "--steps", 2)
    assert result.exit_code == 0, result.output
    cfg = store.read_spec(tmp_path / "run" / "model").components["prior"].config
    assert (cfg.num_layers, cfg.attention_head_dim, cfg.num_attention_heads) == (1, 8, 2)
    for doc, message in (({"decoder": {}}, "'decoder' is not trained by this stage; it trains prior"),
                         ({"prior": {"layers": 1}}, "unknown key 'layers' in a prior config"),
                         ({"preset": "huge"}, "unknown --config 'huge'"),
                         ({"prior": {"num_layers": "two"}}, "prior.num_layers must be a JSON int as in the preset (2), got 'two'")):
        sizes.write_text(json.dumps(doc))
        result = _train(models["iv"], tmp_path / "bad", "--config", sizes)
        assert result.exit_code == 2 and message in result.output, result.output


def test_previews_go_through_the_pipeline(models, tmp_path):
    settings = TrainSettings(steps=4, data_size=8, batch_size=4, checkpoint_every=4, preview_every=2)
    out = d2.train("decoder", "shapes", tmp_path / "run", models["iv"], backend=BACKENDS[0], settings=settings)
    previews = sorted(p.name for p in (tmp_path / "run" / "previews").iterdir())
    assert previews == ["step-000002.png", "step-000004.png"]
    image = Image.open(tmp_path / "run" / "previews" / previews[-1])
    size = store.read_spec(out).defaults.super_res_sample_size
    assert image.size == (4 * size, 2 * size) and image.text["rows"] == "originals, variations"
    assert image.text["step"] == "4" and len(image.text["captions"].split(" | ")) == 4


def test_progress_bar_shows_loss_and_samples_per_second(models, tmp_path, capsys):
    settings = TrainSettings(steps=3, data_size=8, batch_size=4, checkpoint_every=3)
    d2.train("prior", "shapes", tmp_path / "run", models["iv"], config="tiny", backend=BACKENDS[0],
             settings=settings, progress=True)
    err = capsys.readouterr().err
    assert "train prior" in err and "loss=" in err and "samples_s=" in err


def test_settings_from_json_values():
    s = settings_from({"steps": 3, "freeze": ["text_proj"], "max_grad_norm": None}, "run.json")
    assert s.freeze == ("text_proj",) and s.max_grad_norm is None
    with pytest.raises(Dalle2Error, match='run.json: no "steps"'):
        settings_from({"lr": 1e-3}, "run.json")
    for bad, message in (({"accumulate": 0}, "accumulate must be a positive integer"),
                         ({"dtype": "float16"}, "unknown dtype 'float16'; choose one of float32, bfloat16"),
                         ({"strict": "yes"}, "setting strict must be bool"),
                         ({"ema_max_decay": 1.0}, "ema must be in [0, 1)")):
        with pytest.raises(Dalle2Error, match=message.replace("[", r"\[").replace(")", r"\)")):
            settings_from({"steps": 1, **bad}, "run.json")


def test_a_model_without_upsampler_ends_at_the_decoder(models, tmp_path):
    """The recipe's intermediate models (a decoder trained on a CLIP + prior, no super-res yet) generate and
    preview at the decoder's size."""
    import dataclasses
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(models["karlo"], folder)
    spec = store.read_spec(folder)
    keep = {k: v for k, v in spec.components.items() if not k.startswith("super_res")}
    schedulers = {k: v for k, v in spec.schedulers.items() if k != "super_res"}
    store.write_spec(folder, dataclasses.replace(spec, components=keep, schedulers=schedulers))
    result = d2.load_pipeline(folder, backend=BACKENDS[0]).generate("a red circle", prior_steps=2, decoder_steps=2,
                                                                    super_res_steps=2)
    size = spec.components["decoder"].config.sample_size
    assert result.images[0].size == (size, size) and "super_res_steps" not in result.settings
