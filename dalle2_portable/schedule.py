"""Noise schedules and sampler steps in NumPy, shared by both backends.

`UnCLIPSchedule` is diffusers' `UnCLIPScheduler` computed the same way in the same precision (float32 arrays
and float32 scalars, as diffusers' 0-d torch tensors are), so a step here equals diffusers' step to float32
rounding. The sampler never draws noise: the loop passes each draw in (ARCHITECTURE.md, "Randomness").
"""

from __future__ import annotations

import math

import numpy as np

from .dpm_solver import NAME as DPM, DPMSolverMultistep, dpm_timesteps
from .errors import Dalle2Error
from .spec import SchedulerConfig

F32 = np.float32

# The samplers a stage can use. "ancestral" is the reference: UnCLIPScheduler's DDPM step with its own variance,
# one noise draw per step but the last. "ddim" is deterministic DDIM (eta = 0, diffusers' DDIMScheduler step):
# no noise after the initial latents. "dpm++2m" is DPM-Solver++(2M) (diffusers' DPMSolverMultistepScheduler,
# dpm_solver.py): deterministic and multistep, with its own timesteps; the one for few steps (~10).
SAMPLERS = ("ancestral", "ddim", DPM)


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise Dalle2Error(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return name


def squaredcos_cap_v2_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' `betas_for_alpha_bar` (cosine): beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta) with
    abar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, computed in Python floats, stored as float32."""
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=F32)


class UnCLIPSchedule:
    """The schedule of one stage (prior, decoder or super-res) and its ancestral step."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.betas = squaredcos_cap_v2_betas(config.num_train_timesteps)
        self.alphas = (F32(1.0) - self.betas).astype(F32)
        # torch's float32 cumprod accumulates in float64 on CPU; so do we, then round once (bit-identical)
        self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(F32)

    def training_terms(self, t: np.ndarray) -> dict[str, np.ndarray]:
        """The single-step (t -> t-1) quantities a training loss needs at the (B,) timesteps t, as (B,) float32
        (improved DDPM's GaussianDiffusion, computed in float64 then rounded once): the forward process
        `sqrt_alphas_cumprod`, `sqrt_one_minus_alphas_cumprod`; x0 from epsilon, x0 = `sqrt_recip_alphas_cumprod`
        x_t - `sqrt_recipm1_alphas_cumprod` eps; the posterior q(x_{t-1} | x_t, x0) mean = `posterior_mean_coef1`
        x0 + `posterior_mean_coef2` x_t and `posterior_log_variance_clipped` (t = 0 takes t = 1's, as there);
        and `log_betas`, the upper end of a learned_range variance."""
        t = np.asarray(t, np.int64)
        if t.ndim != 1 or t.min(initial=0) < 0 or t.max(initial=0) >= self.config.num_train_timesteps:
            raise Dalle2Error(f"training timesteps must be a (batch,) array in [0, {self.config.num_train_timesteps})")
        betas, ac = self.betas.astype(np.float64), self.alphas_cumprod.astype(np.float64)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        terms = {
            "sqrt_alphas_cumprod": np.sqrt(ac),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(self.alphas.astype(np.float64)) / (1.0 - ac),
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "log_betas": np.log(betas),
        }
        # x0 from the model's output and x_t: x0 = `x0_from_sample` x_t + `x0_from_output` output
        terms["x0_from_sample"], terms["x0_from_output"] = {
            "epsilon": (terms["sqrt_recip_alphas_cumprod"], -terms["sqrt_recipm1_alphas_cumprod"]),
            "sample": (np.zeros_like(ac), np.ones_like(ac)),
            "v_prediction": (terms["sqrt_alphas_cumprod"], -terms["sqrt_one_minus_alphas_cumprod"]),
        }[self.config.prediction_type]
        return {k: v[t].astype(F32) for k, v in terms.items()}

    def training_target(self, x0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> np.ndarray:
        """What the model learns to output at x_t = sqrt(abar) x0 + sqrt(1 - abar) noise: the noise, x0, or
        v = sqrt(abar) noise - sqrt(1 - abar) x0, by `config.prediction_type`; float32."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return np.asarray(noise, F32)
        if kind == "sample":
            return np.asarray(x0, F32)
        terms = self.training_terms(t)
        shape = (-1,) + (1,) * (np.ndim(x0) - 1)
        v = (terms["sqrt_alphas_cumprod"].reshape(shape) * noise
             - terms["sqrt_one_minus_alphas_cumprod"].reshape(shape) * x0)
        return v.astype(F32)

    def min_snr_weights(self, t: np.ndarray, gamma: float | None) -> np.ndarray:
        """Per-sample loss weights (B,) float32 of min-SNR-gamma (Hang et al. 2023), for this schedule's
        prediction type: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1)
        for v, with SNR = abar / (1 - abar) at t; all ones when gamma is None."""
        t = np.asarray(t, np.int64)
        if gamma is None:
            return np.ones(t.shape, F32)
        ac = self.alphas_cumprod.astype(np.float64)[t]
        snr = ac / (1.0 - ac)
        clipped = np.minimum(snr, gamma)
        weight = {"epsilon": clipped / snr, "sample": clipped,
                  "v_prediction": clipped / (snr + 1.0)}[self.config.prediction_type]
        return weight.astype(F32)

    def timesteps(self, num_inference_steps: int, sampler: str = "ancestral") -> np.ndarray:
        """The descending int64 timesteps `UnCLIPScheduler.set_timesteps` makes: round(i * (T-1)/(n-1)) for
        i < n (NumPy rounding, half to even), reversed. n = 25 gives 999, 957, ..., 42, 0. The dpm++2m sampler
        has its own (DPMSolverMultistepScheduler's: n = 10 gives 999, 899, ..., 100; dpm_solver.py)."""
        if check_sampler(sampler) == DPM:
            return dpm_timesteps(self.config.num_train_timesteps, num_inference_steps)
        n, total = int(num_inference_steps), self.config.num_train_timesteps
        if not 2 <= n <= total:
            raise Dalle2Error(f"steps must be between 2 and {total} for this scheduler, got {num_inference_steps}")
        ratio = (total - 1) / (n - 1)
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)

    @staticmethod
    def previous(timesteps: np.ndarray, i: int) -> int | None:
        """The previous timestep the pipelines pass at step i: the next entry, or None (= t - 1) at the end."""
        return int(timesteps[i + 1]) if i + 1 < len(timesteps) else None

    def _alpha_prod(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else F32(1.0)

    def _beta(self, t: int, prev: int) -> np.float32:
        """The beta of the jump t -> prev: the trained one for a single step, else 1 - abar_t / abar_prev."""
        if prev == t - 1:
            return self.betas[t]
        return F32(F32(1.0) - self._alpha_prod(t) / self._alpha_prod(prev))

    def log_sigma(self, t: int, prev: int, predicted_variance: np.ndarray | None = None):
        """log of the standard deviation of the noise added at t -> prev, as diffusers' `_get_variance` then
        `step` compute it: fixed_small_log = 0.5 log(max(posterior variance, 1e-20)); learned_range = 0.5 x the
        interpolation, by (v + 1) / 2, between log(posterior variance) and log(beta)."""
        beta = self._beta(t, prev)
        variance = F32((F32(1.0) - self._alpha_prod(prev)) / (F32(1.0) - self._alpha_prod(t)) * beta)
        if self.config.variance_type == "fixed_small_log":
            return F32(F32(0.5) * np.log(max(variance, F32(1e-20))))
        if predicted_variance is None:
            raise Dalle2Error("learned_range variance needs the model's predicted variance channels")
        frac = ((predicted_variance + F32(1.0)) / F32(2.0)).astype(F32)
        log_var = frac * np.log(beta) + (F32(1.0) - frac) * np.log(variance)
        return (F32(0.5) * log_var).astype(F32)

    @staticmethod
    def adds_noise(sampler: str, t: int) -> bool:
        """Whether the step at t takes a noise draw (the loop draws it only then, keeping the stream in order):
        ancestral steps but the last; ddim and dpm++2m never."""
        return sampler == "ancestral" and int(t) > 0

    def sample_step(self, sampler: str, model_output: np.ndarray, t: int, sample: np.ndarray, prev: int | None,
                    noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One step of the named single-step sampler: `step` (ancestral) or `ddim_step`."""
        if check_sampler(sampler) == "ancestral":
            return self.step(model_output, t, sample, prev, noise)
        if sampler == "ddim":
            return self.ddim_step(model_output, t, sample, prev)
        raise Dalle2Error(f"the {sampler} sampler is multistep: step it through start({sampler!r}, steps)")

    def start(self, sampler: str, steps: int):
        """One sampling run of `steps` steps of the named sampler, for one loop: `.timesteps` (the sampler's,
        descending) and `.step(i, model_output, sample, noise)` -> (next sample, predicted x0), called for
        i = 0 .. steps - 1 in order. It holds what the sampler keeps between steps (dpm++2m's previous x0)."""
        if check_sampler(sampler) == DPM:
            return DPMSolverMultistep(self.alphas_cumprod, steps, self.config.prediction_type,
                                      self.config.variance_type)
        return _SingleStepRun(self, sampler, steps)

    def _split_variance(self, model_output: np.ndarray, sample: np.ndarray):
        """(prediction, predicted variance or None): a learned_range model's extra channels split off."""
        c = sample.shape[1]
        if model_output.shape[1] == 2 * c and self.config.variance_type == "learned_range":
            return model_output[:, :c], model_output[:, c:]
        return model_output, None

    def _predict_x0(self, model_output: np.ndarray, sample: np.ndarray, a_t: np.float32) -> np.ndarray:
        return self._x0_and_eps(model_output, sample, a_t)[0]

    def _x0_and_eps(self, model_output: np.ndarray, sample: np.ndarray, a_t: np.float32):
        """(x0, epsilon) from the model's prediction of `config.prediction_type` (diffusers' DDIMScheduler
        formulas; v = sqrt(abar) eps - sqrt(1 - abar) x0)."""
        kind = self.config.prediction_type
        root_a, root_b = F32(a_t ** F32(0.5)), F32((F32(1.0) - a_t) ** F32(0.5))
        if kind == "epsilon":
            return (sample - root_b * model_output) / root_a, model_output
        if kind == "v_prediction":
            return root_a * sample - root_b * model_output, root_a * model_output + root_b * sample
        return model_output, (sample - root_a * model_output) / root_b

    def _clip(self, x0: np.ndarray) -> np.ndarray:
        if self.config.clip_sample:
            r = F32(self.config.clip_sample_range)
            return np.clip(x0, -r, r)
        return x0

    def ddim_step(self, model_output: np.ndarray, t: int, sample: np.ndarray, prev: int | None = None):
        """One deterministic DDIM step t -> prev (eta = 0), as diffusers' `DDIMScheduler.step` computes it with
        `set_alpha_to_one=True` (the step to -1 lands on x0): x0 and epsilon from the model output, x0 clipped
        (epsilon is not recomputed from the clipped x0, as there), x_prev = sqrt(abar_prev) x0 +
        sqrt(1 - abar_prev) eps. A learned variance is ignored. Returns (x_prev, predicted x0), float32."""
        t = int(t)
        prev = t - 1 if prev is None else int(prev)
        sample = np.asarray(sample, F32)
        model_output, _ = self._split_variance(np.asarray(model_output, F32), sample)
        a_t, a_prev = self._alpha_prod(t), self._alpha_prod(prev)
        x0, eps = self._x0_and_eps(model_output, sample, a_t)
        x0 = self._clip(x0)
        prev_sample = F32(a_prev ** F32(0.5)) * x0 + F32((F32(1.0) - a_prev) ** F32(0.5)) * eps
        return prev_sample.astype(F32), np.asarray(x0, F32)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray, prev: int | None = None,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One ancestral step t -> prev (default t - 1): returns (x_prev, predicted x0), float32.

        model_output: epsilon or x0 (config.prediction_type); with learned_range it may carry the predicted
        variance as extra channels (the decoder's 6 = 3 + 3), split off here as diffusers does. `noise` is the
        standard-normal draw for this step, required when t > 0 (no noise is added at t = 0)."""
        t = int(t)
        prev = t - 1 if prev is None else int(prev)
        model_output = np.asarray(model_output, F32)
        sample = np.asarray(sample, F32)
        model_output, predicted_variance = self._split_variance(model_output, sample)
        a_t, a_prev = self._alpha_prod(t), self._alpha_prod(prev)
        b_t, b_prev = F32(F32(1.0) - a_t), F32(F32(1.0) - a_prev)
        beta = self._beta(t, prev)
        alpha = self.alphas[t] if prev == t - 1 else F32(F32(1.0) - beta)
        x0 = self._clip(self._predict_x0(model_output, sample, a_t))
        x0_coeff = F32(F32(a_prev ** F32(0.5)) * beta / b_t)
        sample_coeff = F32(F32(alpha ** F32(0.5)) * b_prev / b_t)
        prev_sample = x0_coeff * x0 + sample_coeff * sample
        if t > 0:
            if noise is None:
                raise Dalle2Error(f"the step at t={t} adds noise: pass this step's draw")
            prev_sample = prev_sample + np.exp(self.log_sigma(t, prev, predicted_variance)) * np.asarray(noise, F32)
        return prev_sample.astype(F32), np.asarray(x0, F32)


class _SingleStepRun:
    """A run of a sampler without state between steps (ancestral, ddim): step i goes from timesteps[i] to
    timesteps[i + 1] (the last to t - 1), as the pipelines' `prev_timestep` has it."""

    def __init__(self, schedule: UnCLIPSchedule, sampler: str, steps: int):
        self.schedule, self.sampler = schedule, sampler
        self.timesteps = schedule.timesteps(steps, sampler)

    def step(self, i: int, model_output: np.ndarray, sample: np.ndarray, noise: np.ndarray | None = None):
        return self.schedule.sample_step(self.sampler, model_output, int(self.timesteps[i]), sample,
                                         self.schedule.previous(self.timesteps, i), noise)
