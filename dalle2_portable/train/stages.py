"""What each stage trains and how: its components, its frozen weights, its batch drawn in NumPy, and its loss
written once over the facade. The loop (loop.py) is the same for every stage.

    prior     (DALL-E 2 section 2.2, as Karlo trains it) predict the clean, CLIP-statistics-normalised image
              embedding z_0 from z_t, the timestep and the caption's CLIP condition; MSE to z_0 (Karlo's prior
              scheduler predicts "sample"). A caption becomes the empty caption with probability `cond_drop`,
              the unconditional input sampling's guidance uses.
    decoder   text_proj and the decoder UNet together (section 2.1): predict the noise of x_t from the CLIP
              image embedding and the caption; epsilon MSE, plus improved DDPM's variational bound when the UNet
              learns its variance (Karlo's learned_range). The image embedding becomes text_proj's learned
              unconditional embedding with probability `cond_drop` and the caption the empty caption with
              probability `caption_drop` (the paper's 10% and 50%).
    super_res the first upsampler (Karlo's super_res_first, which the pipeline also uses for the last step
              when a model has no super_res_last): predict the noise of the large x_t given it concatenated
              with the antialiased bicubic upscale of the small image, as sampling feeds it; epsilon MSE. The
              small image is the item drawn at the decoder's size, plus N(0, `sr_noise`) (noise augmentation:
              at sampling time it comes from the decoder, not from a clean downscale). With `sr_crop` the UNet
              (convolutions only) sees a random `sr_crop` px square of both, at one offset per item (DALL-E 2
              trains its upsamplers on quarter-area crops): a step costs that fraction of a whole picture's.
    clip      both CLIP towers and the temperature (Radford et al. 2021): the symmetric cross-entropy of the
              batch's caption-image cosine similarities times exp(logit_scale), clamped at 100 as CLIP does.
              Captions are tokenised and images preprocessed in NumPy as `CLIP` does for inference.

Each batch function draws its randomness (timesteps, noise, dropped conditions, crops) for all of the items
`idx`, in one fixed order, then loads and returns only the rows `part` (distributed.py: each training process
takes its slice of one global batch; one process takes them all), so the draws do not depend on how many
processes share the batch.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..clip import TextCondition
from ..modules.prior import prior_text_inputs
from ..modules.unet import decoder_attention_mask
from ..sampling import upscale_bicubic
from ..clip import pool_positions
from ..spec import PriorConfig, SchedulerConfig, TextProjConfig, UNet2DConditionConfig, UNet2DConfig
from . import losses

# Karlo's schedulers (reference karlo-v1-alpha.md): the prior predicts x0, clipped to +-5 while sampling; the
# decoder predicts the noise and learns its variance
SCHEDULERS = {"prior": SchedulerConfig(variance_type="fixed_small_log", prediction_type="sample",
                                       clip_sample=True, clip_sample_range=5.0),
              "decoder": SchedulerConfig(variance_type="learned_range", prediction_type="epsilon",
                                         clip_sample=True, clip_sample_range=1.0),
              "super_res": SchedulerConfig(variance_type="fixed_small_log", prediction_type="epsilon",
                                           clip_sample=True, clip_sample_range=1.0)}
COMPONENTS = {"prior": ("prior",), "decoder": ("text_proj", "decoder"), "super_res": ("super_res_first",),
              "clip": ("text_encoder", "image_encoder")}
FROZEN = {"prior": ("prior.clip_mean", "prior.clip_std"), "decoder": (), "super_res": (), "clip": ()}  # CLIP stats
MAX_LOGIT_SCALE = 4.6051702  # log(100), CLIP's clamp
CHANNELS = 3  # the pictures' channels (Dataset.pixels: RGB)
ALL = slice(None)  # every row of a batch: one training process
PRESETS = {  # widths from scratch; every other size follows from the CLIP and --image-size
    "tiny": {"prior": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2),
             "decoder": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=16),
             "super_res": dict(block_out_channels=(32, 64), layers_per_block=1),
             "clip": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)},
    "small": {"prior": dict(num_attention_heads=4, attention_head_dim=32, num_layers=6),
              "decoder": dict(block_out_channels=(64, 128, 192), layers_per_block=2, attention_head_dim=32),
              "super_res": dict(block_out_channels=(32, 64, 128), layers_per_block=2),
              "clip": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8)},
}


def preset_configs(stage: str, preset: str, width: int, tokens: int, image_size: int, base=None) -> dict:
    """{component: config} of `stage` from scratch, for CLIP embeddings of `width` and captions of `tokens`
    (the CLIP stage: the towers at the preset's width, with the base model's vocabulary and image size)."""
    p = PRESETS[preset][stage]
    if stage == "clip":
        text, vision = base.components["text_encoder"].config, base.components["image_encoder"].config
        return {"text_encoder": dataclasses.replace(text, **p, projection_dim=p["hidden_size"]),
                "image_encoder": dataclasses.replace(vision, **p, projection_dim=p["hidden_size"])}
    if stage == "prior":
        inner = p["num_attention_heads"] * p["attention_head_dim"]  # diffusers' time_embed_dim default
        return {"prior": PriorConfig(**p, embedding_dim=width, num_embeddings=tokens, time_embed_dim=inner,
                                     embedding_proj_dim=width, clip_embed_dim=width)}
    temb = 4 * p["block_out_channels"][0]
    n = len(p["block_out_channels"])
    if stage == "super_res":
        return {"super_res_first": UNet2DConfig(
            **p, norm_num_groups=8, time_embed_dim=temb, sample_size=image_size, down_block_types=(
                "ResnetDownsampleBlock2D",) * n, up_block_types=("ResnetUpsampleBlock2D",) * n)}
    decoder = UNet2DConditionConfig(
        **p, in_channels=3, out_channels=6, norm_num_groups=8, cross_attention_dim=temb, time_embed_dim=temb,
        class_embed_type="identity", resnet_time_scale_shift="scale_shift", sample_size=image_size,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (n - 1),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D",) * (n - 1) + ("ResnetUpsampleBlock2D",))
    text_proj = TextProjConfig(clip_embeddings_dim=width, time_embed_dim=temb, cross_attention_dim=temb)
    return {"text_proj": text_proj, "decoder": decoder}


def drop_captions(text: TextCondition, uncond: TextCondition, drop: np.ndarray) -> TextCondition:
    """Rows where `drop` is set take the empty caption's condition (classifier-free guidance's training)."""
    if not drop.any():
        return text
    embeds, states, mask = text.embeds.copy(), text.states.copy(), text.mask.copy()
    embeds[drop], states[drop], mask[drop] = uncond.embeds[0], uncond.states[0], uncond.mask[0]
    return TextCondition(embeds, states, mask)


def _noised(schedule, x0: np.ndarray, t: np.ndarray, noise: np.ndarray):
    terms = schedule.training_terms(t)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    x_t = terms["sqrt_alphas_cumprod"].reshape(shape) * x0 + terms["sqrt_one_minus_alphas_cumprod"].reshape(
        shape) * noise
    return x_t.astype(np.float32), terms


def _target(ctx, x0: np.ndarray, noise: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(what the model learns to output, the per-sample min-SNR weights) by the stage's scheduler."""
    return ctx.schedule.training_target(x0, noise, t), ctx.schedule.min_snr_weights(t, ctx.settings.min_snr_gamma)


def prior_batch(ctx, rng: np.random.Generator, idx: np.ndarray, part: slice = ALL) -> tuple:
    """(x_t, t, caption embeds, states, attention mask, target, weights) for the items `idx[part]`; the draws
    are made for all of `idx` (module doc)."""
    bs = len(idx)
    t = rng.integers(0, ctx.schedule.config.num_train_timesteps, bs)
    noise = rng.standard_normal((bs, ctx.targets.shape[1]), dtype=np.float32)
    drop = rng.random(bs) < ctx.settings.cond_drop
    idx, t, noise, drop = idx[part], t[part], noise[part], drop[part]
    z0 = ctx.targets[idx].astype(np.float32)
    text = drop_captions(ctx.embeddings.text_condition(idx), ctx.uncond, drop)
    x_t, _ = _noised(ctx.schedule, z0, t, noise)
    # cut after the last token any caption of the data attends to (exact): fewer positions, one shape every step
    states, mask = prior_text_inputs(text.states, text.mask, length=ctx.text_length)
    return (x_t, t, text.embeds, states, mask) + _target(ctx, z0, noise, t)


def prior_loss(F, bundle, x_t, t, text_embeds, text_states, mask, target, weights):
    return losses.mse(F, bundle.prior(x_t, t, text_embeds, text_states, mask), target, weights)


def decoder_batch(ctx, rng: np.random.Generator, idx: np.ndarray, part: slice = ALL) -> tuple:
    """(x_t, t, image embeddings, image-dropped rows, caption embeds, states, context mask, x_0, target,
    weights, the schedule's terms) for the items `idx[part]`; the draws are made for all of `idx`."""
    bs = len(idx)
    t = rng.integers(0, ctx.schedule.config.num_train_timesteps, bs)
    noise = rng.standard_normal((bs, CHANNELS, ctx.image_size, ctx.image_size), dtype=np.float32)
    drop_image = rng.random(bs) < ctx.settings.cond_drop
    drop_caption = rng.random(bs) < ctx.settings.caption_drop
    idx, t, noise, drop_image, drop_caption = (a[part] for a in (idx, t, noise, drop_image, drop_caption))
    x0 = ctx.dataset.pixels(idx, ctx.image_size)
    text = drop_captions(ctx.embeddings.text_condition(idx), ctx.uncond, drop_caption)
    x_t, terms = _noised(ctx.schedule, x0, t, noise)
    extra = ctx.extra_tokens  # text_proj's image tokens, always attended
    mask = decoder_attention_mask(np.pad(text.mask, ((0, 0), (extra, 0)), constant_values=True))
    return (x_t, t, ctx.embeddings.image_embeddings(idx), drop_image[:, None], text.embeds, text.states, mask, x0,
            *_target(ctx, x0, noise, t), terms)


def decoder_loss(F, bundle, x_t, t, image_embeds, drop_image, text_embeds, text_states, mask, x0, target,
                 weights, terms):
    """The prediction's (weighted) MSE, plus the variational bound when the decoder outputs its variance too
    (2C channels)."""
    learned = bundle.text_proj.learned_classifier_free_guidance_embeddings
    image_embeds = F.where(drop_image, learned[None], image_embeds)
    context, time = bundle.text_proj(image_embeds, text_embeds, text_states)
    out = bundle.decoder(x_t, t, context, time, mask)
    c = x0.shape[1]
    loss = losses.mse(F, out[:, :c], target, weights)
    if out.shape[1] == 2 * c:
        loss = loss + F.mean(losses.variational_bound(F, out, x0, x_t, t, terms))
    return loss


def super_res_batch(ctx, rng: np.random.Generator, idx: np.ndarray, part: slice = ALL) -> tuple:
    """(x_t concatenated with the upscaled small image, t, target, weights) for the items `idx[part]`; the
    draws are made for all of `idx`."""
    bs, size, crop = len(idx), ctx.image_size, ctx.settings.sr_crop
    t = rng.integers(0, ctx.schedule.config.num_train_timesteps, bs)
    noise = rng.standard_normal((bs, CHANNELS, size, size), dtype=np.float32)
    augment = rng.standard_normal((bs, CHANNELS, ctx.low_size, ctx.low_size), dtype=np.float32)
    corners = None if crop is None else rng.integers(0, size - crop + 1, (bs, 2))
    idx, t, noise, augment = idx[part], t[part], noise[part], augment[part]
    x0 = ctx.dataset.pixels(idx, size)
    small = ctx.dataset.pixels(idx, ctx.low_size)
    up = upscale_bicubic(small + np.float32(ctx.settings.sr_noise) * augment, size)
    if crop is not None:  # the same square of the picture and of its upscaled small image
        corners = corners[part]
        x0, up, noise = (np.stack([a[i, :, y:y + crop, x:x + crop] for i, (y, x) in enumerate(corners)])
                         for a in (x0, up, noise))
    x_t, _ = _noised(ctx.schedule, x0, t, noise)
    return (np.concatenate([x_t, up], axis=1), t) + _target(ctx, x0, noise, t)


def super_res_loss(F, bundle, sample, t, target, weights):
    return losses.mse(F, bundle.super_res_first(sample, t), target, weights)


def clip_batch(ctx, rng: np.random.Generator, idx: np.ndarray, part: slice = ALL) -> tuple:
    """(token ids, pooled positions, preprocessed pixels) of the items `idx[part]`, as `CLIP` makes them (no
    draws). One process only: the contrastive loss compares every caption with every picture of the batch."""
    idx = idx[part]
    ids = ctx.clip.tokenize([ctx.dataset.caption(int(i)) for i in idx])
    eos = ctx.clip.spec.components["text_encoder"].config.eos_token_id
    pixels = ctx.clip.preprocess([ctx.dataset.image(int(i), ctx.image_size) for i in idx])
    return ids, pool_positions(ids, eos), pixels


def clip_loss(F, bundle, ids, positions, pixels):
    text, _ = bundle.text_encoder(ids, positions)
    image, _ = bundle.image_encoder(pixels)
    scale = F.clip(bundle.logit_scale.logit_scale, None, MAX_LOGIT_SCALE)
    return losses.clip_contrastive(F, text, image, scale)


BATCHES = {"prior": prior_batch, "decoder": decoder_batch, "super_res": super_res_batch, "clip": clip_batch}
LOSSES = {"prior": prior_loss, "decoder": decoder_loss, "super_res": super_res_loss, "clip": clip_loss}
