"""The training seam: the losses written once over the facade, against NumPy float64 references and the
diffusers-verified sampler math, and differentiated by each framework's autograd to the same gradients."""

from __future__ import annotations

import numpy as np
import pytest
from builders import TINY_LEARNED_VARIANCE_DECODER as DECODER
from conftest import BACKENDS, assert_close_to_scale, backend_params

from dalle2_portable.backends import get_backend
from dalle2_portable.modules.init import initial_weights
from dalle2_portable.modules.unet import decoder_attention_mask
from dalle2_portable.schedule import UnCLIPSchedule
from dalle2_portable.spec import SchedulerConfig
from dalle2_portable.train import losses

SCHEDULE = UnCLIPSchedule(SchedulerConfig(variance_type="learned_range", clip_sample=False))
T = np.array([0, 1, 500, 999], np.int64)  # t = 0 takes the decoder NLL, the others the KL


def _batch(rng, c=3, size=8):
    x0 = np.clip(rng.standard_normal((len(T), c, size, size)) * 0.5, -1, 1).astype(np.float32)
    x0[0, 0, 0, :3] = [-1.0, 1.0, 0.0]  # both tails of the discretised likelihood
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    terms = SCHEDULE.training_terms(T)
    x_t = (terms["sqrt_alphas_cumprod"][:, None, None, None] * x0
           + terms["sqrt_one_minus_alphas_cumprod"][:, None, None, None] * noise).astype(np.float32)
    return x0, noise, x_t, terms


def test_training_terms_agree_with_the_sampler():
    """The posterior mean and learned variance the loss uses are the ones the (diffusers-verified) ancestral
    step samples with, at every t > 0."""
    rng = np.random.default_rng(0)
    x0, noise, x_t, terms = _batch(rng)
    eps = rng.standard_normal(x0.shape, dtype=np.float32)
    v = rng.uniform(-1, 1, x0.shape).astype(np.float32)
    for i, t in enumerate(T[1:], start=1):
        out = np.concatenate([eps[i:i + 1], v[i:i + 1]], axis=1)  # the learned variance does not move the mean
        mean, _ = SCHEDULE.step(out, int(t), x_t[i:i + 1], None, np.zeros_like(x0[:1]))
        x0_hat = terms["sqrt_recip_alphas_cumprod"][i] * x_t[i] - terms["sqrt_recipm1_alphas_cumprod"][i] * eps[i]
        ours = terms["posterior_mean_coef1"][i] * x0_hat + terms["posterior_mean_coef2"][i] * x_t[i]
        assert_close_to_scale(ours, mean[0], 1e-6, f"posterior mean t={t}")  # measured 1.3e-7
        frac = (v[i] + 1) / 2
        log_var = frac * terms["log_betas"][i] + (1 - frac) * terms["posterior_log_variance_clipped"][i]
        sigma = SCHEDULE.log_sigma(int(t), int(t) - 1, v[i])
        # log variances lie in [-20, 0]: float32 rounds them to ~2e-6 (its ulp at 20), whatever their own scale
        assert np.abs(log_var - 2 * sigma).max() <= 5e-6, f"log variance t={t}"


def _gaussian_kl(m1, lv1, m2, lv2):  # KL of N(m1, s1^2) || N(m2, s2^2), in the textbook form
    s1, s2 = np.exp(0.5 * lv1), np.exp(0.5 * lv2)
    return np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def _reference_vlb(out, x0, x_t, terms):
    """improved DDPM's _vb_terms_bpd in float64, the CDF as there (tanh approximation)."""
    out, x0, x_t = (np.asarray(a, np.float64) for a in (out, x0, x_t))
    col = {k: np.asarray(v, np.float64)[:, None, None, None] for k, v in terms.items()}
    eps, v = out[:, :3], out[:, 3:]
    log_var = (v + 1) / 2 * col["log_betas"] + (1 - v) / 2 * col["posterior_log_variance_clipped"]
    x0_hat = col["sqrt_recip_alphas_cumprod"] * x_t - col["sqrt_recipm1_alphas_cumprod"] * eps
    mean = col["posterior_mean_coef1"] * x0_hat + col["posterior_mean_coef2"] * x_t
    true_mean = col["posterior_mean_coef1"] * x0 + col["posterior_mean_coef2"] * x_t
    kl = _gaussian_kl(true_mean, col["posterior_log_variance_clipped"], mean, log_var).mean((1, 2, 3))

    def cdf(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    inv = np.exp(-0.5 * log_var)
    upper, lower = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
    bins = np.where(x0 < -0.999, upper, np.where(x0 > 0.999, 1 - lower, upper - lower))
    nll = -np.log(np.maximum(bins, 1e-12)).mean((1, 2, 3))
    return np.where(T == 0, nll, kl) / np.log(2)


@pytest.mark.parametrize("backend", backend_params())
def test_losses_match_float64_references(backend):
    b = get_backend(backend)
    F = b.facade
    rng = np.random.default_rng(1)
    x0, noise, x_t, terms = _batch(rng)
    out = np.concatenate([noise + 0.1 * rng.standard_normal(noise.shape), rng.uniform(-1, 1, noise.shape)],
                         axis=1).astype(np.float32)
    out_, x0_, x_t_, t_, noise_, terms_ = b.arrays([out, x0, x_t, T, noise, terms])
    vlb = np.array(losses.variational_bound(F, out_, x0_, x_t_, t_, terms_).tolist())
    assert_close_to_scale(vlb, _reference_vlb(out, x0, x_t, terms), 1e-5, "variational bound")
    mse = float(losses.mse(F, out_[:, :3], noise_))
    assert abs(mse - np.mean((out[:, :3].astype(np.float64) - noise) ** 2)) <= 1e-6 * mse

    text, image = rng.standard_normal((2, 6, 16)).astype(np.float32)
    scale = np.float32(np.log(1 / 0.07))
    got = float(losses.clip_contrastive(F, *b.arrays([text, image, scale])))
    tn = text / np.linalg.norm(text, axis=1, keepdims=True)
    im = image / np.linalg.norm(image, axis=1, keepdims=True)
    logits = np.exp(np.float64(scale)) * tn.astype(np.float64) @ im.T
    lse_rows, lse_cols = np.log(np.exp(logits).sum(1)), np.log(np.exp(logits).sum(0))  # |logits| <= 14.3
    want = (np.mean(lse_rows - np.diag(logits)) + np.mean(lse_cols - np.diag(logits))) / 2
    assert abs(got - want) <= 1e-5 * want



def decoder_loss(F, unet, x_t, t, context, time_embedding, mask, x0, noise, terms):
    """The hybrid objective of a learned-variance decoder: epsilon MSE + the variational bound."""
    out = unet(x_t, t, context, time_embedding, mask)
    return losses.mse(F, out[:, :3], noise) + F.mean(losses.variational_bound(F, out, x0, x_t, t, terms))


def _decoder_batch(rng):
    x0, noise, x_t, terms = _batch(rng)
    context = rng.standard_normal((len(T), 5, 12), dtype=np.float32)
    time_embedding = rng.standard_normal((len(T), 32), dtype=np.float32)
    mask = decoder_attention_mask(np.array([[1] * 5, [1] * 5, [1, 1, 1, 0, 0], [1] * 5]))
    return x_t, T, context, time_embedding, mask, x0, noise, terms


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_gradients_agree_across_backends():
    """Same weights, same draws: the loss to 1e-5 relative and every weight's gradient to 5e-5 of the largest
    gradient of that tensor, torch autograd against MLX value_and_grad."""
    rng = np.random.default_rng(2)
    torch_b, mlx_b = get_backend("torch"), get_backend("mlx")
    unet = torch_b.build("unet2d_condition", DECODER)
    weights = {k: v + 0.05 * rng.standard_normal(v.shape).astype(np.float32)  # seeded: torch's own init is not
               for k, v in initial_weights(torch_b.parameter_shapes("unet2d_condition", DECODER), 0).items()}
    torch_b.load_weights(unet, weights)
    twin = mlx_b.build("unet2d_condition", DECODER)
    mlx_b.load_weights(twin, weights)
    batch = _decoder_batch(rng)
    loss_t, grads_t = torch_b.value_and_grad(unet, decoder_loss)(*batch)
    loss_m, grads_m = mlx_b.value_and_grad(twin, decoder_loss)(*batch)
    assert abs(loss_m - loss_t) <= 1e-5 * abs(loss_t)
    assert grads_t.keys() == grads_m.keys() == weights.keys()
    worst = max(np.abs(grads_m[k] - grads_t[k]).max() / np.abs(grads_t[k]).max() for k in grads_t)
    assert worst <= 5e-5, worst  # measured 1.1e-5 (2 threads and 1) on these seeded weights


@pytest.mark.parametrize("backend", backend_params())
def test_variational_bound_trains_only_the_variance(backend):
    """stop_gradient on the predicted noise: the bound's gradient reaches conv_out only through the variance
    output channels (3..5); the noise channels' rows get exactly zero."""
    b = get_backend(backend)
    rng = np.random.default_rng(3)
    unet = b.build("unet2d_condition", DECODER)

    def vlb_only(F, unet, x_t, t, context, time_embedding, mask, x0, noise, terms):
        out = unet(x_t, t, context, time_embedding, mask)
        return F.mean(losses.variational_bound(F, out, x0, x_t, t, terms))

    loss, grads = b.value_and_grad(unet, vlb_only)(*_decoder_batch(rng))
    assert np.isfinite(loss) and loss > 0
    assert np.all(grads["conv_out.weight"][:3] == 0) and np.all(grads["conv_out.bias"][:3] == 0)
    assert np.abs(grads["conv_out.weight"][3:]).max() > 0
