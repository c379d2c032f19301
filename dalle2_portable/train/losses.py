"""Training objectives, written once over the facade and differentiated by each framework's own autograd.

Every function takes the facade `F` first and backend arrays after, and returns a scalar (or per-sample) array
of that backend, so `Backend.value_and_grad(module, loss_fn)` can differentiate it. Nothing here draws a random
number: timesteps and noise come from NumPy, and the schedule's per-timestep terms from
`UnCLIPSchedule.training_terms`, passed in as (B,) arrays.

    mse                     the epsilon / x0 / v regression every stage uses
    variational_bound       improved DDPM's L_vlb term for a learned_range variance (Nichol & Dhariwal 2021):
                            KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dimension, and the
                            discretised Gaussian decoder NLL at t = 0
    clip_contrastive        CLIP's symmetric cross-entropy over a batch of text and image embeddings
"""

from __future__ import annotations

import math

LOG2 = math.log(2.0)


def mse(F, prediction, target, weights=None):
    """Mean squared error over every element; with per-sample `weights` (B,) (min-SNR-gamma), the batch mean
    of each sample's weighted mean squared error (the same when every weight is 1)."""
    if weights is None:
        return F.mean((prediction - target) ** 2)
    return F.mean(weights * _per_sample_mean(F, (prediction - target) ** 2))


def _per_sample_mean(F, x):
    """Mean over every axis but the batch axis: (B, ...) -> (B,)."""
    return F.mean(x.reshape(x.shape[0], -1), axis=1)


def normal_kl(F, mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + F.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * F.exp(-logvar2))


def approx_standard_normal_cdf(F, x):
    """The tanh approximation of the standard normal CDF that improved DDPM's decoder likelihood uses."""
    return 0.5 * (1.0 + F.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(F, x, means, log_scales):
    """log p(x) of images x in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2), elementwise;
    the end bins take the tails (improved DDPM, after PixelCNN++)."""
    centered = x - means
    inv_stdv = F.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(F, inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(F, inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = F.log(F.clip(cdf_plus, 1e-12))
    log_one_minus_cdf_min = F.log(F.clip(1.0 - cdf_min, 1e-12))
    log_cdf_delta = F.log(F.clip(cdf_plus - cdf_min, 1e-12))
    return F.where(x < -0.999, log_cdf_plus, F.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def variational_bound(F, model_output, x_start, x_t, t, terms):
    """improved DDPM's L_vlb for a model with a learned_range variance, per sample (B,), in bits/dim.

    model_output (B, 2C, H, W): the prediction (noise, x0 or v: the terms' `x0_from_sample` / `x0_from_output`
    turn it into x0), then the variance channels v in [-1, 1] (log variance =
    (v + 1)/2 log beta_t + (1 - v)/2 log posterior variance); x_start the clean images, x_t the noised ones;
    t (B,) the integer timesteps; terms: `UnCLIPSchedule.training_terms(t)` as backend arrays. The
    prediction is held fixed (stop_gradient), so this term trains only the variance and the MSE the mean,
    as in the paper's hybrid objective L_simple + lambda L_vlb."""
    c = x_start.shape[1]
    prediction = F.stop_gradient(model_output[:, :c])
    v = model_output[:, c:]

    def per_sample(name):  # (B,) -> (B, 1, 1, 1)
        return terms[name].reshape(-1, 1, 1, 1)

    frac = (v + 1.0) / 2.0
    min_log = per_sample("posterior_log_variance_clipped")
    model_log_variance = frac * per_sample("log_betas") + (1.0 - frac) * min_log
    pred_x0 = per_sample("x0_from_sample") * x_t + per_sample("x0_from_output") * prediction
    coef1, coef2 = per_sample("posterior_mean_coef1"), per_sample("posterior_mean_coef2")
    model_mean = coef1 * pred_x0 + coef2 * x_t
    true_mean = coef1 * x_start + coef2 * x_t
    kl = _per_sample_mean(F, normal_kl(F, true_mean, min_log, model_mean, model_log_variance)) / LOG2
    nll = -_per_sample_mean(F, discretized_gaussian_log_likelihood(F, x_start, model_mean,
                                                                   0.5 * model_log_variance)) / LOG2
    return F.where(t == 0, nll, kl)


def clip_contrastive(F, text_embeds, image_embeds, logit_scale):
    """CLIP's loss: cosine similarities times exp(logit_scale) (a learned log temperature, a 0-d array), then
    the mean of the text->image and image->text cross-entropies with the matching pairs on the diagonal."""
    t = text_embeds / F.sqrt(F.sum(text_embeds**2, axis=-1, keepdims=True))
    i = image_embeds / F.sqrt(F.sum(image_embeds**2, axis=-1, keepdims=True))
    logits = F.exp(logit_scale) * (t @ i.T)  # (B, B): [text, image]
    diagonal = F.arange(logits.shape[0], like=logits)
    right = logits[diagonal, diagonal]
    text_to_image = F.mean(F.logsumexp(logits, axis=1) - right)
    image_to_text = F.mean(F.logsumexp(logits, axis=0) - right)
    return (text_to_image + image_to_text) / 2.0
