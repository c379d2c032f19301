"""The dpm++2m sampler (dpm_solver.py) against diffusers' DPMSolverMultistepScheduler: its timesteps and sigmas,
every step fed the same model outputs, and whole generations through UnCLIPPipeline with DPM schedulers on the
tiny Karlo models; MLX against PyTorch; its errors.

The reference is `DPMSolverMultistepScheduler.from_config(unclip.config, beta_schedule="squaredcos_cap_v2")`:
a bare from_config of Karlo's Hub scheduler configs builds linear betas (`test_a_bare_from_config_of_karlos_hub_
config_is_linear` shows why the schedule is named). Tolerances (fp32), with what was measured on this machine:
sigmas 1 ulp (torch's vectorised float32 sqrt misrounds 7 of the 1000 table entries by 1 ulp, none of them at the
timesteps of 2-25 steps); single steps and whole chains 1e-6 of the sample's scale (measured 0: bit-identical
at 2, 5, 10 and 25 steps for all four configurations); whole generations as tests/test_sampling.py has them
(embeddings 1e-5, images 1/255 against diffusers, 2/255 between backends) and, since the tiny random models'
images saturate under DPM, every step's unclipped sample to 1e-5 of its scale."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close_to_scale, backend_params, cli
from diffusers import DPMSolverMultistepScheduler, UnCLIPPipeline, UnCLIPScheduler
from test_sampling import PIXEL, PROMPTS, Reference, pipe, to_unit

from dalle2_portable import sampling, store
from dalle2_portable.dpm_solver import DPMSolverMultistep, dpm_timesteps
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.schedule import SAMPLERS, UnCLIPSchedule
from dalle2_portable.spec import SchedulerConfig

DPM = "dpm++2m"

# /work/shared/reference/karlo-v1-alpha.md section 7, verbatim (the decoder's reconstructed there); "v" is ours
HUB = {
    "prior": {"clip_sample": True, "clip_sample_range": 5.0, "num_train_timesteps": 1000, "prediction_type": "sample",
              "variance_type": "fixed_small_log"},
    "decoder": {"clip_sample": True, "clip_sample_range": 1.0, "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "variance_type": "learned_range"},
    "super_res": {"clip_sample": True, "clip_sample_range": 1.0, "num_train_timesteps": 1000,
                  "prediction_type": "epsilon", "variance_type": "fixed_small_log"},
    "v": {"clip_sample": True, "clip_sample_range": 1.0, "num_train_timesteps": 1000,
          "prediction_type": "v_prediction", "variance_type": "fixed_small_log"},
}
SHAPES = {"prior": (2, 8), "decoder": (2, 3, 4, 4), "super_res": (2, 3, 4, 4), "v": (2, 3, 4, 4)}
STEPS = (2, 5, 10, 25)


def reference(unclip_config) -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++(2M) on the stage's own (cosine) schedule, every other option its default."""
    return DPMSolverMultistepScheduler.from_config(unclip_config, beta_schedule="squaredcos_cap_v2")


def hub_pair(stage: str):
    """(diffusers' UnCLIPScheduler as from_pretrained reads Karlo's JSON, our UnCLIPSchedule of the same JSON)."""
    d = {"_class_name": "UnCLIPScheduler", "_diffusers_version": "0.11.0.dev0", **HUB[stage]}
    return UnCLIPScheduler.from_config(d), UnCLIPSchedule(SchedulerConfig.from_hf_config(d))


def test_a_bare_from_config_of_karlos_hub_config_is_linear(models):
    """Why the reference names beta_schedule: Karlo's Hub JSON does not write it, so diffusers records it as a
    default and from_config hands DPM its own default, linear betas (abar(999) 4e-5 instead of the cosine
    schedule's); a config diffusers re-saved (the tiny models') writes it, and a bare from_config is right."""
    unclip, ours = hub_pair("decoder")
    assert DPMSolverMultistepScheduler.from_config(unclip.config).config.beta_schedule == "linear"
    assert reference(unclip.config).config.beta_schedule == "squaredcos_cap_v2"
    saved = json.loads((models["karlo_src"] / "decoder_scheduler" / "scheduler_config.json").read_text())
    bare = DPMSolverMultistepScheduler.from_config(UnCLIPScheduler.from_config(saved).config)
    np.testing.assert_array_equal(bare.alphas_cumprod.numpy(), ours.alphas_cumprod)


def tiny_pairs(models):
    """(diffusers' scheduler from the tiny pipeline's folder, ours from the converted model.json), per stage."""
    spec = store.read_spec(models["karlo"])
    return {s: (UnCLIPScheduler.from_pretrained(models["karlo_src"], subfolder=f"{s}_scheduler"),
                UnCLIPSchedule(spec.schedulers[s])) for s in ("prior", "decoder", "super_res")}


@pytest.mark.parametrize("n", STEPS + (100,))
def test_timesteps_and_sigmas_equal_diffusers(models, n):
    """Karlo's Hub configs, v_prediction and the tiny models' converted schedulers: the same alphas_cumprod
    (bit for bit), timesteps (n = 10: 999, 899, ..., 100) and sigmas to 1 ulp."""
    pairs = {**{k: hub_pair(k) for k in HUB}, **{f"tiny {k}": p for k, p in tiny_pairs(models).items()}}
    for name, (unclip, ours) in pairs.items():
        ref = reference(unclip.config)
        ref.set_timesteps(n)
        np.testing.assert_array_equal(ref.alphas_cumprod.numpy(), ours.alphas_cumprod, err_msg=name)
        run = ours.start(DPM, n)
        np.testing.assert_array_equal(run.timesteps, ref.timesteps.numpy(), err_msg=name)
        np.testing.assert_array_equal(ours.timesteps(n, DPM), run.timesteps)
        np.testing.assert_allclose(run.sigmas, ref.sigmas.numpy(), rtol=1.2e-7, atol=0, err_msg=name)
        assert run.sigmas[-1] == 0 and len(run.sigmas) == n + 1
    assert dpm_timesteps(1000, 10).tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


TOL = 3e-6  # of the scale: the worst step measured on any CPU here (1.3e-6), about 2x


@pytest.mark.parametrize("stage", sorted(HUB))
@pytest.mark.parametrize("n", STEPS)
def test_steps_equal_diffusers(stage, n):
    """Every step fed the same sample (diffusers' previous one) and the same NumPy random model output (6
    channels for the learned-range decoder; x0-scale outputs x3 for the prior): x_next and x0 (diffusers'
    converted `model_outputs[-1]`) to TOL of the scale; then our own chain, run on its own samples from the
    same outputs, ends within TOL of diffusers' chain. Measured: 0 (bit-identical) for every step on an Intel
    Xeon (AVX2); on an AMD EPYC (AVX-512), where torch's vectorised exp / log round differently from NumPy's in
    the last bit, 0 at 2 steps and up to 1.3e-6 of the scale (the prior's 25 steps)."""
    unclip, ours = hub_pair(stage)
    ref = reference(unclip.config)
    ref.set_timesteps(n)
    run, chain = ours.start(DPM, n), ours.start(DPM, n)
    rng = np.random.default_rng(n)
    shape = SHAPES[stage]
    x_ref = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    x_chain = x_ref.numpy().copy()
    worst = 0.0
    for i, t in enumerate(run.timesteps):
        out = rng.standard_normal(shape, dtype=np.float32) * (3 if stage == "prior" else 1)
        if stage == "decoder":
            out = np.concatenate([out, rng.uniform(-1, 1, shape).astype(np.float32)], axis=1)
        assert not ours.adds_noise(DPM, int(t))
        x, x0 = run.step(i, out, x_ref.numpy())
        x_chain, _ = chain.step(i, out, x_chain)
        x_ref = ref.step(torch.from_numpy(out), int(t), x_ref).prev_sample
        what = f"{stage} {n} steps, step {i} t={t}"
        worst = max(worst, assert_close_to_scale(x, x_ref.numpy(), TOL, what),
                    assert_close_to_scale(x0, ref.model_outputs[-1].numpy(), TOL, what + " x0"))
    assert_close_to_scale(x_chain, x_ref.numpy(), TOL, f"{stage} {n}-step chain")
    print(f"{stage} {n}: worst step {worst:.2g} of the scale")


def test_no_clipping_of_x0():
    """UnCLIPScheduler clips the predicted x0 (Karlo's prior to +-5); diffusers' DPM has no clip_sample, so
    neither has dpm++2m: a last step (to sigma 0) returns the model's x0 as is."""
    _, ours = hub_pair("prior")
    run = ours.start(DPM, 2)
    x = np.zeros((1, 4), np.float32)
    big = np.full((1, 4), 9.0, np.float32)
    run.step(0, big, x)
    x, x0 = run.step(1, big, x)
    np.testing.assert_array_equal(x, big)
    assert ours.ddim_step(big, 1, x, 0)[1].max() == 5.0  # ddim clips


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, i, t, x):
        self.calls.append((i, t))
        return np.full_like(x, 0.1)


def test_the_loop_takes_the_samplers_timesteps_and_keeps_its_state_per_call():
    """_loop asks the sampler for its timesteps, draws nothing after the latents, and starts each call fresh:
    two runs of one Stage give the same result as each other and as a hand-made run."""
    _, schedule = hub_pair("super_res")
    stage = sampling.Stage(schedule, 5, sampler=DPM)
    noise = sampling.NoiseStream(0)
    x0 = noise.draw((1, 3, 4, 4))
    outs = []
    for _ in range(2):
        rec = Recorder()
        outs.append(sampling._loop(stage, x0.copy(), rec, noise, False, sampling.no_progress, "super-res"))
        assert rec.calls == [(i, t) for i, t in enumerate([999, 799, 599, 400, 200])]
    assert noise.draws == 1
    run, x = DPMSolverMultistep(schedule.alphas_cumprod, 5), x0.copy()
    for i in range(5):
        x, _ = run.step(i, np.full_like(x, 0.1), x)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], x)


def test_a_run_steps_in_order_and_is_not_a_single_step_sampler():
    _, schedule = hub_pair("decoder")
    run = schedule.start(DPM, 3)
    x = np.zeros((1, 3, 2, 2), np.float32)
    with pytest.raises(Dalle2Error, match="steps in order: expected step 0 of 3, got 1"):
        run.step(1, np.zeros((1, 6, 2, 2), np.float32), x)
    with pytest.raises(Dalle2Error, match="adds no noise"):
        run.step(0, np.zeros((1, 6, 2, 2), np.float32), x, x)
    with pytest.raises(Dalle2Error, match="multistep"):
        schedule.sample_step(DPM, x, 999, x, 500)
    assert SAMPLERS == ("ancestral", "ddim", DPM)


# -- whole generations ------------------------------------------------------------------------------------------

DPM_SETTINGS = dict(prior_sampler=DPM, decoder_sampler=DPM, super_res_sampler=DPM, prior_steps=10,
                    decoder_steps=10, super_res_steps=5)


class DPMForUnCLIP(DPMSolverMultistepScheduler):
    """diffusers' DPM scheduler as UnCLIPPipeline calls it (its loops pass prev_timestep=, which DPM's step does
    not take and would not use: the multistep scheduler keeps its own step index); records every sample."""

    def step(self, model_output, timestep, sample, generator=None, prev_timestep=None, return_dict=True):
        out = super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        self.__dict__.setdefault("samples", []).append(out.prev_sample.numpy().copy())
        return out


def recorded_dpm_steps(monkeypatch) -> list:
    """Every sample our dpm++2m runs step to from now on, in order."""
    samples, step = [], DPMSolverMultistep.step

    def recorded(self, *args, **kwargs):
        x, x0 = step(self, *args, **kwargs)
        samples.append(x.copy())
        return x, x0

    monkeypatch.setattr(DPMSolverMultistep, "step", recorded)
    return samples


@pytest.fixture(scope="module")
def reference_dpm(models):
    """UnCLIPPipeline on the tiny Karlo with its three schedulers swapped for DPM-Solver++(2M), our noise:
    10 / 10 / 5 steps, Karlo's guidance; super_res_last at the last step, as the pipeline has it."""
    mp = pytest.MonkeyPatch()
    try:
        p = UnCLIPPipeline.from_pretrained(models["karlo_src"])
        for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
            setattr(p, name, DPMForUnCLIP.from_config(getattr(p, name).config, beta_schedule="squaredcos_cap_v2"))
        ref = Reference(p, mp)
        pixels = ref(PROMPTS, num_images_per_prompt=2, prior_num_inference_steps=10,
                     decoder_num_inference_steps=10, super_res_num_inference_steps=5)
        steps = [p.prior_scheduler.samples, p.decoder_scheduler.samples, p.super_res_scheduler.samples]
        return ref, pixels, steps
    finally:
        mp.undo()


@pytest.mark.parametrize("backend", backend_params())
def test_generate_matches_diffusers_with_dpm(models, reference_dpm, backend, monkeypatch):
    """2 prompts x 2 images, all three stages on dpm++2m: the three initial latents are all the noise on both
    sides; embeddings to 1e-5, final images to 1/255. The tiny models' weights are random, so their epsilon at
    t = 999 is no estimate of the noise and, unclipped (DPM has no clip_sample), the decoder's and the
    upsampler's x0 = (x - sigma eps) / alpha blow up by 1 / alpha (~1e4): their images end saturated at +-1.
    So every step's sample of every stage is compared before any clipping, to 1e-5 of that step's scale
    (measured max over the 25 steps: torch 1.6e-6, MLX 3.1e-6; embeddings 1.2e-6 and 1.9e-6)."""
    ref, pixels, ref_steps = reference_dpm
    ours = recorded_dpm_steps(monkeypatch)
    out = pipe(models, "karlo", backend).generate(PROMPTS, num_images=2, seed=0, **DPM_SETTINGS)
    assert ref.draws == 3 and [len(s) for s in ref_steps] == [10, 10, 5] and len(ours) == 25
    worst = max(assert_close_to_scale(a, b, 1e-5, f"{backend} step {i}")
                for i, (a, b) in enumerate(zip(ours, [x for s in ref_steps for x in s])))
    np.testing.assert_allclose(out.image_embeddings, ref.embeddings, rtol=0, atol=1e-5)
    np.testing.assert_allclose(to_unit(out.samples), pixels, rtol=0, atol=PIXEL)
    assert out.settings["decoder_sampler"] == DPM and out.settings["super_res_steps"] == 5
    print(f"{backend}: embeddings {np.abs(out.image_embeddings - ref.embeddings).max():.2g}, worst step "
          f"{worst:.2g} of its scale")


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_backends_agree_with_dpm(models, monkeypatch):
    """MLX and PyTorch, same seed, dpm++2m on every stage at 10 / 10 / 5 steps: embeddings to 1e-5, pixels to
    2/255, and (the images being saturated, see above) every step's sample to 1e-5 of its scale (measured:
    embeddings 1.7e-6, steps 2.9e-6 of the scale)."""
    outs, steps = [], []
    for name in ("torch", "mlx"):
        with monkeypatch.context() as m:
            steps.append(recorded_dpm_steps(m))
            outs.append(pipe(models, "karlo", name).generate("a cat", num_images=2, seed=1, **DPM_SETTINGS))
    a, b = outs
    np.testing.assert_allclose(a.image_embeddings, b.image_embeddings, rtol=0, atol=1e-5)
    np.testing.assert_allclose(to_unit(a.samples), to_unit(b.samples), rtol=0, atol=2 * PIXEL)
    assert len(steps[0]) == len(steps[1]) == 25
    worst = max(assert_close_to_scale(m, t, 1e-5, f"step {i}") for i, (t, m) in enumerate(zip(*steps)))
    print(f"embeddings {np.abs(a.image_embeddings - b.image_embeddings).max():.2g}, worst step {worst:.2g}")


# -- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(decoder_sampler="dpm++3m"), "decoder unknown sampler 'dpm++3m'; choose one of ancestral, ddim, dpm++2m"),
    (dict(decoder_sampler=DPM, decoder_steps=1000), "decoder steps must be between 2 and 999 for the dpm++2m "
                                                    "sampler of this scheduler, got 1000"),
    (dict(prior_sampler=DPM, prior_steps=1), "prior steps must be between 2 and 999 for the dpm++2m sampler of this "
                                              "scheduler, got 1"),
])
def test_bad_sampler_and_steps_are_one_line(models, options, match):
    with pytest.raises(Dalle2Error, match=f"^{re.escape(match)}$") as e:
        pipe(models, "karlo", BACKENDS[0]).generate("a", **options)
    assert "\n" not in str(e.value)


def test_cli_takes_dpm_and_refuses_bad_names_and_steps_in_one_line(models):
    assert DPM in cli("generate", "--help").output
    r = cli("generate", "a", "-m", models["karlo"], "--decoder-sampler", "euler", ok=False)
    assert "euler" in r.output and DPM in r.output
    r = cli("generate", "a", "-m", models["karlo"], "--super-res-sampler", DPM, "--super-res-steps", 1000, ok=False)
    assert "super-res steps must be between 2 and 999 for the dpm++2m sampler" in r.output
