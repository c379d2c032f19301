"""schedule.py against diffusers' UnCLIPScheduler: betas, cumulative alphas, timesteps and whole step chains
(with the step noise fed from our NumPy draws) for the three configurations Karlo's converted models use."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UnCLIPScheduler
from diffusers.schedulers import scheduling_unclip

from dalle2_portable.errors import Dalle2Error
from dalle2_portable.schedule import UnCLIPSchedule
from dalle2_portable.spec import SchedulerConfig

# reference karlo-v1-alpha.md section 7
KARLO = {
    "prior": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
    "decoder": dict(variance_type="learned_range", prediction_type="epsilon", clip_sample_range=1.0),
    "super_res": dict(variance_type="fixed_small_log", prediction_type="epsilon", clip_sample_range=1.0),
}
SHAPES = {"prior": (2, 8), "decoder": (2, 3, 4, 4), "super_res": (2, 3, 4, 4), "v": (2, 3, 4, 4)}
V = dict(variance_type="fixed_small_log", prediction_type="v_prediction", clip_sample_range=1.0)  # ours only


def test_tables_equal_diffusers():
    ours = UnCLIPSchedule(SchedulerConfig())
    ref = UnCLIPScheduler()
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("n", [2, 3, 7, 10, 25, 50, 1000])
def test_timesteps_equal_diffusers(n):
    ref = UnCLIPScheduler()
    ref.set_timesteps(n)
    np.testing.assert_array_equal(UnCLIPSchedule(SchedulerConfig()).timesteps(n), ref.timesteps.numpy())


def test_karlo_timesteps_and_bad_step_counts():
    s = UnCLIPSchedule(SchedulerConfig())
    assert s.timesteps(7).tolist() == [999, 832, 666, 500, 333, 166, 0]  # reference section 11
    assert s.timesteps(25)[:3].tolist() == [999, 957, 916] and s.timesteps(25)[-2:].tolist() == [42, 0]
    for bad in (1, 0, 1001):
        with pytest.raises(Dalle2Error, match="steps must be between 2 and 1000"):
            s.timesteps(bad)


@pytest.mark.parametrize("stage", sorted(KARLO))
@pytest.mark.parametrize("n", [25, 7, 3])
def test_steps_equal_diffusers(stage, n, monkeypatch):
    """Every step of a chain, each on the same input in both (diffusers' previous sample): x_prev agrees to
    1e-6; x0 to 1e-6 / sqrt(alpha_bar_t), the factor by which the epsilon formula x0 = (x - sqrt(1 - abar) eps)
    / sqrt(abar) magnifies the last-bit rounding of its numerator (seen: 1.2e-6 at t=874, where it is ~6).
    Model outputs are fixed random arrays per step (6 channels for the decoder: epsilon + predicted
    variance in [-1, 1]); diffusers' noise draws are replaced by ours. The chains run on their own outputs end
    within 2e-6 after 25 steps (float32 rounding of the running sample, 1-2 ulp)."""
    cfg = SchedulerConfig(**KARLO[stage])
    ours, ref = UnCLIPSchedule(cfg), UnCLIPScheduler(**KARLO[stage])
    ref.set_timesteps(n)
    timesteps = ours.timesteps(n)
    rng = np.random.default_rng(0)
    shape = SHAPES[stage]
    x_ref = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    x_chain = x_ref.numpy().copy()
    draws = []
    monkeypatch.setattr(scheduling_unclip, "randn_tensor", lambda *a, **k: torch.from_numpy(draws[-1]))
    for i, t in enumerate(timesteps):
        out = rng.standard_normal(shape, dtype=np.float32)
        if stage == "decoder":
            out = np.concatenate([out, rng.uniform(-1, 1, shape).astype(np.float32)], axis=1)
        noise = rng.standard_normal(shape, dtype=np.float32)
        draws.append(noise)
        prev = ours.previous(timesteps, i)
        x, x0 = ours.step(out, t, x_ref.numpy(), prev, noise if t > 0 else None)
        x_chain, _ = ours.step(out, t, x_chain, prev, noise if t > 0 else None)
        ref_out = ref.step(torch.from_numpy(out), ref.timesteps[i], x_ref,
                           prev_timestep=None if prev is None else ref.timesteps[i + 1])
        x_ref = ref_out.prev_sample
        bound = 1e-6 / np.sqrt(ours.alphas_cumprod[t]) if cfg.prediction_type == "epsilon" else 1e-6
        np.testing.assert_allclose(x0, ref_out.pred_original_sample.numpy(), rtol=0, atol=bound)
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=0, atol=1e-6, err_msg=f"{stage} step {i} t={t}")
    np.testing.assert_allclose(x_chain, x_ref.numpy(), rtol=0, atol=2e-6, err_msg=f"{stage} chain")


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_variances_equal_diffusers(stage):
    """The noise scale of every jump of a 25-step schedule (and single steps): exp(log_sigma) = diffusers'."""
    ours, ref = UnCLIPSchedule(SchedulerConfig(**KARLO[stage])), UnCLIPScheduler(**KARLO[stage])
    v = np.linspace(-1, 1, 5, dtype=np.float32)
    ts = ours.timesteps(25)
    for t, prev in [(int(a), int(b)) for a, b in zip(ts[:-1], ts[1:])] + [(500, 499), (1, 0)]:
        got = np.exp(ours.log_sigma(t, prev, v if stage == "decoder" else None))
        want = ref._get_variance(t, prev_timestep=prev, predicted_variance=torch.from_numpy(v))
        want = (0.5 * want).exp() if stage == "decoder" else want
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0, err_msg=f"t={t} prev={prev}")


def test_learned_range_needs_the_variance_and_noise_is_required():
    s = UnCLIPSchedule(SchedulerConfig(**KARLO["decoder"]))
    x = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(Dalle2Error, match="predicted variance"):
        s.step(x, 500, x, 400, np.zeros_like(x))
    with pytest.raises(Dalle2Error, match="pass this step's draw"):
        s.step(np.zeros((1, 6, 2, 2), np.float32), 500, x, 400)
    out, _ = s.step(np.zeros((1, 6, 2, 2), np.float32), 0, x)  # t = 0 adds no noise
    assert out.shape == x.shape


@pytest.mark.parametrize("stage", list(KARLO) + ["v"])
def test_ddim_steps_equal_diffusers(stage):
    """Our DDIM step against diffusers' DDIMScheduler (eta 0, the same cosine betas, set_alpha_to_one) over a
    whole chain of its own uniform timesteps, fed the same model outputs."""
    from diffusers import DDIMScheduler

    cfg = SchedulerConfig(**(V if stage == "v" else KARLO[stage]))
    ref = DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, set_alpha_to_one=True,
                        clip_sample_range=cfg.clip_sample_range, prediction_type=cfg.prediction_type)
    ref.set_timesteps(10)
    ours = UnCLIPSchedule(cfg)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    rng = np.random.default_rng(3)
    shape = SHAPES[stage]
    sample = ref_sample = rng.standard_normal(shape, dtype=np.float32)
    for t in ref.timesteps.tolist():
        out = rng.standard_normal(shape, dtype=np.float32) * (3 if stage == "prior" else 1)
        ref_out = torch.from_numpy(out)
        if stage == "decoder":  # a learned-variance output: DDIM ignores the variance channels
            out = np.concatenate([out, rng.uniform(-1, 1, shape).astype(np.float32)], axis=1)
        prev = t - ref.config.num_train_timesteps // 10
        assert not UnCLIPSchedule.adds_noise("ddim", t)
        sample, x0 = ours.sample_step("ddim", out, t, sample, prev if prev >= 0 else -1)
        r = ref.step(ref_out, t, torch.from_numpy(ref_sample), eta=0.0)
        ref_sample = r.prev_sample.numpy()
        np.testing.assert_allclose(x0, r.pred_original_sample.numpy(), rtol=0, atol=2e-6 * (1 + np.abs(x0).max()))
        np.testing.assert_allclose(sample, ref_sample, rtol=0, atol=2e-6 * (1 + np.abs(ref_sample).max()))
        sample = ref_sample  # next step from identical inputs
    with pytest.raises(Dalle2Error, match="unknown sampler 'euler'"):
        ours.sample_step("euler", out, 0, sample, None)
