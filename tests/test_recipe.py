"""The default model's recipe end to end, as wiring: scripts/train_default_model.sh with SMOKE=1 (every stage 2
steps on 64 items; the real run is hours) trains every stage through `dalle2 train`, records each stage's
seconds, skips what is done when run again, and scripts/package_default_model.py joins the stages into a model
directory that loads, verifies and draws."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import BACKENDS

import dalle2_portable as d2

ROOT = Path(__file__).parents[1]


def test_the_recipe_trains_resumes_and_packages(tmp_path):
    runs = tmp_path / "runs"
    env = dict(os.environ, SMOKE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    first = subprocess.run(["bash", "scripts/train_default_model.sh", str(runs)], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    times = (runs / "times.txt").read_text().splitlines()
    names = [t.split()[0] for t in times]
    assert sorted(names[:-1]) == ["clip", "decoder", "prior", "sr"], times
    # two lanes: CLIP then the decoder, beside the upsampler then the prior (which waits for CLIP too)
    assert names.index("clip") < names.index("decoder") and max(names.index("clip"), names.index("sr")) < \
        names.index("prior"), times
    assert names[-1] == "all", times  # the script's wall time
    again = subprocess.run(["bash", "scripts/train_default_model.sh", str(runs)], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(line for line in again.stdout.splitlines() if line.endswith("/model)")) == [
        f"{name}: done ({runs / name / 'model'})" for name in ("clip", "decoder", "prior", "sr")]
    assert (runs / "times.txt").read_text().splitlines() == times  # nothing was trained again

    out = tmp_path / "model"
    r = subprocess.run([sys.executable, "scripts/package_default_model.py", str(runs), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    about = json.loads((out / "model.json").read_text())["about"]
    assert about["recipe.wall_seconds"] > 0
    assert about["prior.steps"] == 2 and about["sr.data"].startswith("shapes (seed 0, 64 items")
    spec = d2.store.read_spec(out)  # the prior trained beside the decoder, joined here with its scheduler
    assert list(spec.components) == ["text_encoder", "image_encoder", "prior", "text_proj", "decoder",
                                     "super_res_first"]
    assert set(spec.schedulers) == {"prior", "decoder", "super_res"}
    assert {f"{s}.train_seconds" for s in ("clip", "prior", "decoder", "sr")} <= about.keys()
    assert d2.store.verify_model(out)
    pipe = d2.load_pipeline(out, backend="torch")
    assert pipe.defaults.prior_guidance == 1.0 and pipe.defaults.decoder_sampler == "ancestral"
    image = pipe.generate("a red circle", prior_steps=2, decoder_steps=2, super_res_steps=2).images[0]
    assert image.size == (64, 64)

    # the evaluation, one process per backend, joins the `about` block: --eval once per JSON
    evals = []
    for backend in BACKENDS:
        evals += ["--eval", str(tmp_path / f"{backend}.json")]
        r = subprocess.run(["dalle2", "eval", str(out), "--quick", "--steps", "2", "--super-res-steps", "2",
                            "--backend", backend, "--json", evals[-1], "--quiet"], env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "scripts/package_default_model.py", str(runs), "--out", str(out), *evals],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    about = json.loads((out / "model.json").read_text())["about"]
    for backend in BACKENDS:
        assert 0 <= about[f"accuracy.{backend}.all"]["joint"] <= 1 and about[f"accuracy.{backend}.seeds"] == 1
