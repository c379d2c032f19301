"""The prediction target a stage trains on (epsilon, x0 or v, recorded in the model's scheduler) and min-SNR-gamma
weighting: the targets and weights against diffusers' formulas, the v ancestral step against diffusers'
DDPMScheduler, the learned-variance term the same whatever the prediction, and a prior trained on v generating."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close_to_scale, backend_params
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

import dalle2_portable as d2
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.schedule import UnCLIPSchedule
from dalle2_portable.spec import PREDICTION_TYPES, SchedulerConfig
from dalle2_portable.train.loop import TrainSettings, train

T = np.array([0, 1, 37, 500, 998, 999], np.int64)


def _schedule(kind: str, variance: str = "fixed_small_log") -> UnCLIPSchedule:
    return UnCLIPSchedule(SchedulerConfig(prediction_type=kind, variance_type=variance, clip_sample=False))


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_targets_and_min_snr_weights_equal_diffusers(kind):
    s = _schedule(kind)
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=kind)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((len(T), 3, 4, 4), dtype=np.float32)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    expected = {"epsilon": noise, "sample": x0}.get(kind)
    if kind == "v_prediction":
        expected = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(T)).numpy()
    assert_close_to_scale(s.training_target(x0, noise, T), expected, 1e-6, f"{kind} target")
    # diffusers' train_text_to_image.py: min(snr, gamma) / snr (epsilon), / (snr + 1) (v); x0 takes min(snr, gamma)
    snr = compute_snr(ref, torch.from_numpy(T)).double().numpy()
    clipped = np.minimum(snr, 5.0)
    weights = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
    np.testing.assert_allclose(s.min_snr_weights(T, 5.0), weights, rtol=1e-5)
    assert np.array_equal(s.min_snr_weights(T, None), np.ones(len(T), np.float32))


def test_v_ancestral_steps_are_the_unclip_step_of_diffusers_x0():
    """A v prediction's x0 is DDPMScheduler's (diffusers' v formula; clipped), and our ancestral step from it is
    the UnCLIPScheduler step (tests/test_schedule.py) of that x0. (DDPMScheduler's own step differs from
    UnCLIPScheduler's by its float32 beta, 1 - abar_t / abar_t-1: ~5e-5 at small t, whatever the prediction.)"""
    ours = UnCLIPSchedule(SchedulerConfig(prediction_type="v_prediction", clip_sample_range=1.0))
    as_x0 = UnCLIPSchedule(SchedulerConfig(prediction_type="sample", clip_sample_range=1.0))
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                        variance_type="fixed_small_log", clip_sample=True, clip_sample_range=1.0)
    ref.set_timesteps(1000)
    rng = np.random.default_rng(1)
    for t in (999, 640, 300, 17, 1, 0):
        x, out, noise = (rng.standard_normal((2, 3, 4, 4), dtype=np.float32) for _ in range(3))
        noise = noise if t > 0 else None
        mine, x0 = ours.step(out, t, x, None, noise)
        r = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(0))
        np.testing.assert_allclose(x0, r.pred_original_sample.numpy(), rtol=0, atol=2e-6, err_msg=f"t={t}")
        raw = np.sqrt(ours.alphas_cumprod[t]) * x - np.sqrt(1 - ours.alphas_cumprod[t]) * out
        expected, _ = as_x0.step(raw, t, x, None, noise)
        np.testing.assert_allclose(mine, expected, rtol=0, atol=2e-6, err_msg=f"t={t}")


def test_the_variational_bound_reads_every_prediction_alike():
    """The same model mean expressed as epsilon, x0 or v gives the same learned-variance term."""
    from dalle2_portable.backends import get_backend
    from dalle2_portable.train import losses

    b = get_backend(BACKENDS[0])
    rng = np.random.default_rng(2)
    t = np.array([0, 3, 400, 999], np.int64)
    x0, eps = (rng.uniform(-1, 1, (4, 3, 4, 4)).astype(np.float32) for _ in range(2))
    variance = rng.uniform(-1, 1, x0.shape).astype(np.float32)
    base = _schedule("epsilon", "learned_range")
    terms = base.training_terms(t)
    col = (-1, 1, 1, 1)
    x_t = (terms["sqrt_alphas_cumprod"].reshape(col) * x0 + terms["sqrt_one_minus_alphas_cumprod"].reshape(col)
           * eps).astype(np.float32)
    guess = x0 + rng.normal(0, 0.1, x0.shape).astype(np.float32)  # the model's x0, a little off
    guess_eps = base.training_target(guess, (x_t - terms["sqrt_alphas_cumprod"].reshape(col) * guess)
                                     / terms["sqrt_one_minus_alphas_cumprod"].reshape(col), t)
    values = {}
    for kind in PREDICTION_TYPES:
        s = _schedule(kind, "learned_range")
        pred = s.training_target(guess, guess_eps, t)  # the guess in this prediction's terms
        args = b.arrays((np.concatenate([pred, variance], 1), x0, x_t, t))
        tt = {k: v for k, v in zip(s.training_terms(t), b.arrays(tuple(s.training_terms(t).values())))}
        values[kind] = b.to_numpy(None, {"v": losses.variational_bound(b.facade, *args, tt)})["v"]
    for kind in ("sample", "v_prediction"):
        assert_close_to_scale(values[kind], values["epsilon"], 2e-4, kind)  # t = 999's eps -> x0 amplifies


@pytest.mark.parametrize("backend", backend_params())
def test_a_prior_trained_on_v_with_min_snr_records_it_and_generates(models, tmp_path, backend):
    settings = TrainSettings(steps=6, data_size=16, batch_size=8, checkpoint_every=6, prediction="v_prediction",
                             min_snr_gamma=5.0)
    out = train("prior", "shapes", tmp_path / "run", models["iv"], config="tiny", backend=backend,
                settings=settings)
    pipe = d2.load_pipeline(out, backend=backend)
    assert pipe.spec.schedulers["prior"].prediction_type == "v_prediction"
    result = pipe.generate("a red circle", prior_steps=3, decoder_steps=2, super_res_steps=2)
    assert np.isfinite(result.image_embeddings).all()


def test_bad_prediction_settings_are_one_line(models, tmp_path):
    with pytest.raises(Dalle2Error, match="unknown prediction 'x0'; choose one of epsilon, sample, v_prediction"):
        TrainSettings(steps=1, prediction="x0")
    with pytest.raises(Dalle2Error, match="min_snr_gamma must be positive"):
        TrainSettings(steps=1, min_snr_gamma=0.0)
    with pytest.raises(Dalle2Error, match="the CLIP stage is no diffusion"):
        train("clip", "shapes", tmp_path / "c", models["iv"], config="tiny", backend=BACKENDS[0],
              settings=TrainSettings(steps=1, prediction="epsilon"))
