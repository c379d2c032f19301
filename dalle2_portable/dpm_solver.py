"""DPM-Solver++(2M) in NumPy: the sampler "dpm++2m", diffusers' `DPMSolverMultistepScheduler` step for step.

What it equals: diffusers 0.37.1 `DPMSolverMultistepScheduler` with the stage's UnCLIPScheduler schedule and
DPM's default options (algorithm_type "dpmsolver++", solver_order 2, solver_type "midpoint", lower_order_final,
timestep_spacing "linspace", final_sigmas_type "zero", lambda_min_clipped -inf, no Karras / exponential / beta /
Lu sigmas, no thresholding), i.e.

    DPMSolverMultistepScheduler.from_config(unclip_scheduler.config, beta_schedule="squaredcos_cap_v2")

The beta_schedule is named on purpose: diffusers' `from_config` drops the keys the source config recorded as
defaults (`_use_default_values`), and Karlo's Hub scheduler_config.json does not write beta_schedule, so a bare
`from_config` of it builds DPM's own default, *linear* betas, which are not the cosine schedule Karlo was
trained on (a config re-saved by a recent diffusers, as the tiny test models', writes the key, and a bare
from_config is right for it).
Here the schedule is always the stage's own (`UnCLIPSchedule.alphas_cumprod`).

    timesteps  round(linspace(0, T - 1, N + 1))[::-1][:-1]: N descending integers, the last ~T/N, not 0
    sigma_i    sqrt((1 - abar_t) / abar_t) at those timesteps, then 0 (the final step lands on x0)
    alpha, sigma_t, lambda = 1 / sqrt(sigma^2 + 1), sigma alpha, log alpha - log sigma_t (per step)
    x0         from the model output by prediction_type: epsilon (x - sigma_t eps) / alpha, sample as is,
               v_prediction alpha x - sigma_t v; a learned_range model's variance channels dropped first
    step 0 and the last step   first order (DDIM in lambda): x' = sigma_t'/sigma_t x - alpha' (e^-h - 1) x0
    the steps between          second order (multistep midpoint), from this x0 and the previous step's

Precision as diffusers computes it: the sigma table in float32, every per-step coefficient a float32 scalar
(log and exp computed in float64 and rounded once), then float32 array arithmetic in diffusers' order. Measured
against diffusers on x86 (tests/test_dpm_solver.py): bit-identical steps at 2-25 steps; torch's vectorised
float32 sqrt and log misround a few table entries by 1 ulp (7 of Karlo's 1000 sigmas, none at the timesteps of
up to 25 steps); at 100 and 999 steps single steps then differ by 1.2e-7 to 7e-7 of the sample's scale
(5.4e-6 for the prior's x0-prediction at 999 steps).

clip_sample: UnCLIPScheduler clips its predicted x0 to +-clip_sample_range (Karlo: 5 for the prior, 1 for the
images); DPMSolverMultistepScheduler has no such option (diffusers ignores the key), so this sampler never clips
x0, exactly as diffusers' DPM does with these configs. As with every sampler, only the decoder's 64 px images
(to [-1, 1], sampling.py) and the final pixels are clipped; the prior's embeddings are not clipped at all.

Deterministic: no noise is drawn after the initial latents (`adds_noise` is False), like "ddim". The multistep
state (the previous step's x0) lives in one `DPMSolverMultistep` object per sampling loop, never globally.
"""

from __future__ import annotations

import numpy as np

from .errors import Dalle2Error

F32 = np.float32
NAME = "dpm++2m"


def dpm_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """The N descending int64 timesteps `DPMSolverMultistepScheduler.set_timesteps(N)` makes ("linspace",
    lambda_min_clipped -inf): round(linspace(0, T - 1, N + 1)) (half to even) reversed, its last (0) dropped.
    N = 10 of T = 1000: 999, 899, ..., 200, 100. N must be 2 .. T - 1 (at N = T two timesteps coincide and
    diffusers' second-order step divides by zero)."""
    n, total = int(steps), int(num_train_timesteps)
    if not 2 <= n <= total - 1:
        raise Dalle2Error(f"steps must be between 2 and {total - 1} for the {NAME} sampler of this scheduler, "
                          f"got {steps}")
    return np.linspace(0, total - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)


def dpm_sigmas(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """(N + 1,) float32: sqrt((1 - abar) / abar) (float32, as diffusers' torch table) at each timestep, then 0."""
    ac = np.asarray(alphas_cumprod, F32)
    table = np.sqrt((F32(1.0) - ac) / ac)  # torch's ** 0.5 is a (correctly rounded) sqrt
    sigmas = np.interp(timesteps, np.arange(0, len(table)), table)  # integer timesteps: the table's entries
    return np.concatenate([sigmas, [0.0]]).astype(F32)


def _log(x: np.float32) -> np.float32:
    with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf, as in torch
        return F32(np.log(np.float64(x)))


def _exp(x: np.float32) -> np.float32:
    return F32(np.exp(np.float64(x)))


def alpha_sigma_lambda(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """diffusers' `_sigma_to_alpha_sigma_t` and the log-SNR of the step: (alpha_t, sigma_t, lambda_t), float32
    scalars. sigma = 0 gives (1, 0, +inf)."""
    sigma = F32(sigma)
    alpha = F32(F32(1.0) / np.sqrt(sigma * sigma + F32(1.0)))
    sigma_t = F32(sigma * alpha)
    return alpha, sigma_t, F32(_log(alpha) - _log(sigma_t))


class DPMSolverMultistep:
    """One sampling run of DPM-Solver++(2M) over `steps` steps of a stage's schedule; `step` must be called for
    i = 0, 1, ..., N - 1 in order (the previous x0 is this object's state, as diffusers' `model_outputs`).

    alphas_cumprod: the stage's float32 table (UnCLIPSchedule.alphas_cumprod); prediction_type and
    variance_type as the stage's SchedulerConfig has them."""

    def __init__(self, alphas_cumprod: np.ndarray, steps: int, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small_log"):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise Dalle2Error(f"the {NAME} sampler takes epsilon, sample or v_prediction models, not "
                              f"{prediction_type!r}")
        self.timesteps = dpm_timesteps(len(alphas_cumprod), steps)
        self.sigmas = dpm_sigmas(alphas_cumprod, self.timesteps)
        self.prediction_type, self.variance_type = prediction_type, variance_type
        self._index, self._previous = 0, None  # the next step's index; the last step's x0

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x0 from the model output at the current step (diffusers' `convert_model_output`, dpmsolver++). A
        learned_range model's extra channels are dropped (diffusers drops all but the first 3 for epsilon; the
        same for 3-channel images, and here for every prediction type)."""
        c = sample.shape[1]
        if self.variance_type in ("learned", "learned_range") and model_output.shape[1] == 2 * c:
            model_output = model_output[:, :c]
        if self.prediction_type == "sample":
            return model_output
        alpha, sigma, _ = alpha_sigma_lambda(self.sigmas[self._index])
        if self.prediction_type == "epsilon":
            return (sample - sigma * model_output) / alpha
        return alpha * sample - sigma * model_output

    def first_order_update(self, x0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """diffusers' `dpm_solver_first_order_update` (dpmsolver++): DDIM in lambda from sigma_i to sigma_i+1."""
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[self._index + 1])
        _, sigma_s, lambda_s = alpha_sigma_lambda(self.sigmas[self._index])
        h = F32(lambda_t - lambda_s)
        return F32(sigma_t / sigma_s) * sample - F32(alpha_t * F32(_exp(-h) - F32(1.0))) * x0

    def second_order_update(self, x0: np.ndarray, previous: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """diffusers' `multistep_dpm_solver_second_order_update` (dpmsolver++, midpoint): D0 = this x0,
        D1 = (m0 - m1) / r0 with r0 = h_0 / h the ratio of the last two lambda steps."""
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(self.sigmas[self._index + 1])
        _, sigma_s0, lambda_s0 = alpha_sigma_lambda(self.sigmas[self._index])
        _, _, lambda_s1 = alpha_sigma_lambda(self.sigmas[self._index - 1])
        h, h_0 = F32(lambda_t - lambda_s0), F32(lambda_s0 - lambda_s1)
        r0 = F32(h_0 / h)
        d1 = F32(F32(1.0) / r0) * (x0 - previous)
        coeff = F32(alpha_t * F32(_exp(-h) - F32(1.0)))
        return F32(sigma_t / sigma_s0) * sample - coeff * x0 - F32(F32(0.5) * coeff) * d1

    def step(self, i: int, model_output: np.ndarray, sample: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Step i (timesteps[i] -> timesteps[i + 1], the last to x0): (x_next, this step's x0), float32. First
        order at the first step (no previous x0 yet) and at the last (final sigma 0), second order between.
        `noise` is accepted for the loop's sake and must be None (this sampler draws none)."""
        if i != self._index or i >= len(self.timesteps):
            raise Dalle2Error(f"the {NAME} sampler steps in order: expected step {self._index} of "
                              f"{len(self.timesteps)}, got {i}")
        if noise is not None:
            raise Dalle2Error(f"the {NAME} sampler adds no noise; pass none")
        sample = np.asarray(sample, F32)
        x0 = np.asarray(self.convert_model_output(np.asarray(model_output, F32), sample), F32)
        if self._previous is None or i == len(self.timesteps) - 1:
            x = self.first_order_update(x0, sample)
        else:
            x = self.second_order_update(x0, self._previous, sample)
        self._previous, self._index = x0, i + 1
        return np.asarray(x, F32), x0
