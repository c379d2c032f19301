"""The unCLIP UNets, written once over the facade: Karlo's decoder (diffusers `UNet2DConditionModel`) and its
super-res UNets (diffusers `UNet2DModel`), one class for both, sized by `unet_blocks`.

Attribute names are diffusers' (`conv_in`, `time_embedding`, `down_blocks.i.resnets.j.conv1`, `...attentions.j
.add_k_proj`, `...downsamplers.0`, `mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`), so the flattened
parameter names are the canonical ones. The block classes cover diffusers' ResnetDownsampleBlock2D /
SimpleCrossAttnDownBlock2D (`DownBlock`), UNetMidBlock2D / UNetMidBlock2DSimpleCrossAttn (`MidBlock`) and
ResnetUpsampleBlock2D / SimpleCrossAttnUpBlock2D (`UpBlock`): the attention is there when the block type has it.
The UNet takes and returns NCHW; inside, feature maps are in the facade's layout (NHWC in MLX).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import Dalle2Error
from . import Module
from .layers import MASK_FILL, TimestepEmbedding, Timesteps, attention

# -- the plan: diffusers' channel arithmetic, in plain Python ------------------------------------------------


@dataclass(frozen=True)
class BlockPlan:
    """One UNet block as diffusers builds it: its ResNet blocks' (in, out) channels (an up block's inputs include
    the skip connection concatenated before each), how many SimpleCrossAttn attentions with `heads` heads it has
    (one after each resnet; in the mid block one between each pair), and whether it ends in a resampling ResNet
    (down- or upsampler, channels -> channels)."""

    channels: int
    resnets: tuple[tuple[int, int], ...]
    attentions: int
    heads: int
    resample: bool


def unet_blocks(cfg) -> tuple[list[BlockPlan], BlockPlan, list[BlockPlan]]:
    """(down blocks, mid block, up blocks) of a UNet config, with diffusers' channel arithmetic
    (`UNet2DConditionModel.__init__` / `UNet2DModel.__init__` and the block classes' loops). The mid block's
    resnets are [first, then one after each attention]; `resample` is unused there."""
    boc, n, per = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    head_dim = getattr(cfg, "attention_head_dim", None)

    def plan(channels: int, resnets: list[tuple[int, int]], block_type: str, resample: bool, mid=False) -> BlockPlan:
        if "SimpleCrossAttn" not in block_type:
            return BlockPlan(channels, tuple(resnets), 0, 0, resample)
        return BlockPlan(channels, tuple(resnets), len(resnets) - mid, channels // head_dim, resample)

    downs, out = [], boc[0]
    for i, block_type in enumerate(cfg.down_block_types):
        inp, out = out, boc[i]
        downs.append(plan(out, [(inp if j == 0 else out, out) for j in range(per)], block_type, i < n - 1))
    mid = plan(boc[-1], [(boc[-1], boc[-1])] * 2, cfg.mid_block_type, False, mid=True)
    ups, rev = [], boc[::-1]
    out = rev[0]
    for i, block_type in enumerate(cfg.up_block_types):
        prev, out, skip_last = out, rev[i], rev[min(i + 1, n - 1)]
        resnets = [((prev if j == 0 else out) + (skip_last if j == per else out), out) for j in range(per + 1)]
        ups.append(plan(out, resnets, block_type, i < n - 1))
    return downs, mid, ups


def check_unet_sample(shape: tuple[int, ...], cfg) -> None:
    """A sample the UNet can take: (B, in_channels, H, W) with H and W multiples of its total downscale."""
    if len(shape) != 4 or shape[1] != cfg.in_channels:
        raise Dalle2Error(f"UNet input: expected (batch, {cfg.in_channels}, height, width), got {tuple(shape)}")
    if shape[2] % cfg.downscale or shape[3] % cfg.downscale:
        raise Dalle2Error(f"UNet input: height and width must be multiples of {cfg.downscale}, got "
                          f"{shape[2]}x{shape[3]}; resize the image")


def decoder_attention_mask(context_mask: np.ndarray) -> np.ndarray:
    """The decoder's additive context mask, from a (B, L) bool/int mask over the context tokens (1 = attend):
    (1 - mask) * -10000 as (B, 1, 1, L) float32, as `UNet2DConditionModel.forward` builds it. The attention
    layers append zeros for the feature-map keys (diffusers `prepare_attention_mask`)."""
    context_mask = np.asarray(context_mask)
    if context_mask.ndim != 2:
        raise Dalle2Error(f"decoder attention mask: expected (batch, tokens), got shape {context_mask.shape}")
    return ((1.0 - context_mask.astype(np.float32)) * np.float32(MASK_FILL))[:, None, None, :]


# -- the modules ----------------------------------------------------------------------------------------------

class ResnetBlock2D(Module):
    """diffusers `ResnetBlock2D` (kernel=None): GroupNorm, SiLU, [avg-pool 2x2 / nearest 2x on both paths], conv,
    + time embedding ("default": added; "scale_shift": GroupNorm then * (1 + scale) + shift), GroupNorm, SiLU,
    conv, + the input (a 1x1 conv when channels change), / output_scale_factor."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float, scale_shift: bool,
                 resample: str | None = None, output_scale_factor: float = 1.0):
        super().__init__()
        F = self.F
        self.scale_shift, self.resample, self.output_scale_factor = scale_shift, resample, output_scale_factor
        self.norm1 = F.GroupNorm(groups, cin, eps)
        self.conv1 = F.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = F.Linear(temb, 2 * cout if scale_shift else cout)
        self.norm2 = F.GroupNorm(groups, cout, eps)
        self.conv2 = F.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = F.Conv2d(cin, cout, 1) if cin != cout else None

    def _resample(self, x):
        if self.resample == "down":
            return self.F.avg_pool2(x)  # diffusers Downsample2D(use_conv=False)
        if self.resample == "up":
            return self.F.upsample2(x)  # diffusers Upsample2D(use_conv=False): nearest
        return x

    def forward(self, x, temb):  # feature map, (B, T)
        F = self.F
        h = F.silu(self.norm1(x))
        x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(F.silu(temb))  # (B, C) or (B, 2C)
        if self.scale_shift:
            scale, shift = F.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + F.channel_vector(scale)) + F.channel_vector(shift)
        else:
            h = self.norm2(h + F.channel_vector(t))
        h = self.conv2(F.silu(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(Module):
    """diffusers `Attention` with `AttnAddedKVProcessor2_0`, as the SimpleCrossAttn blocks build it: GroupNorm
    (eps 1e-5, diffusers' fixed value), queries from the feature map, keys/values = [context through add_k/add_v,
    the feature map through to_k/to_v] (context first), output projection, + the input."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        F = self.F
        self.heads = heads
        self.group_norm = F.GroupNorm(groups, channels, 1e-5)
        self.to_q = F.Linear(channels, channels)
        self.to_k = F.Linear(channels, channels)
        self.to_v = F.Linear(channels, channels)
        self.add_k_proj = F.Linear(context_dim, channels)
        self.add_v_proj = F.Linear(context_dim, channels)
        self.to_out = F.ModuleList([F.Linear(channels, channels)])  # diffusers' to_out.1 is a Dropout

    def forward(self, x, context, mask):
        F = self.F
        hs = F.flatten_spatial(self.group_norm(x))  # (B, HW, C), row-major positions
        k = F.cat([self.add_k_proj(context), self.to_k(hs)], axis=1)  # (B, L + HW, C)
        v = F.cat([self.add_v_proj(context), self.to_v(hs)], axis=1)
        if mask is not None:  # (B, 1, 1, L) -> zeros for the feature-map keys
            mask = F.pad(F.cast(mask, hs.dtype), [(0, 0), (0, 0), (0, 0), (0, hs.shape[1])])
        out = self.to_out[0](attention(F, self.to_q(hs), k, v, self.heads, mask=mask))  # (B, HW, C)
        return F.unflatten_spatial(out, x.shape) + x


def _resnet(cfg, cin: int, cout: int, resample: str | None = None, output_scale_factor: float = 1.0):
    return ResnetBlock2D(cin, cout, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps,
                         cfg.resnet_time_scale_shift == "scale_shift", resample, output_scale_factor)


class _Block(Module):
    """The resnets and attentions of one block; the subclasses add the resampler and the call order."""

    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None, output_scale_factor: float = 1.0):
        super().__init__()
        F = self.F
        self.resnets = F.ModuleList([_resnet(cfg, i, o, None, output_scale_factor) for i, o in plan.resnets])
        self.attentions = F.ModuleList([Attention(plan.channels, plan.heads, context_dim, cfg.norm_num_groups)
                                        for _ in range(plan.attentions)]) if plan.attentions else None

    def attend(self, i: int, x, context, mask):
        """The i-th attention after a resnet, where the block type has attentions (diffusers' SimpleCrossAttn)."""
        return x if self.attentions is None else self.attentions[i](x, context, mask)


class DownBlock(_Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim)
        self.downsamplers = self.F.ModuleList([_resnet(cfg, plan.channels, plan.channels, "down")]) \
            if plan.resample else None

    def forward(self, x, temb, context, mask):
        """-> (output, the skips it leaves: each resnet(+attention) output, then the downsampler's)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self.attend(i, resnet(x, temb), context, mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, temb)
            skips.append(x)
        return x, skips


class MidBlock(_Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim, cfg.mid_block_scale_factor)

    def forward(self, x, temb, context, mask):
        x = self.resnets[0](x, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            x = resnet(self.attend(i, x, context, mask), temb)
        return x


class UpBlock(_Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim)
        self.upsamplers = self.F.ModuleList([_resnet(cfg, plan.channels, plan.channels, "up")]) \
            if plan.resample else None

    def forward(self, x, skips: list, temb, context, mask):
        """`skips`: this block's, one per resnet, taken from the end, the latest first (diffusers' [-1]). Read,
        not popped: a checkpointed block runs twice on the same arguments."""
        for i, resnet in enumerate(self.resnets):
            x = self.F.cat([x, skips[-1 - i]], axis=self.F.CHANNELS)
            x = self.attend(i, resnet(x, temb), context, mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, temb)
        return x


class UNet(Module):
    """diffusers `UNet2DConditionModel` (decoder config) or `UNet2DModel` (super-res config)."""

    def __init__(self, config):
        super().__init__()
        F = self.F
        self.config = config
        c0, temb = config.block_out_channels[0], config.time_embed_dim
        context_dim = getattr(config, "cross_attention_dim", None)
        self.class_embed_type = getattr(config, "class_embed_type", None)  # "identity" has no weights
        self.conv_in = F.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, temb, out_dim=temb)
        downs, mid, ups = unet_blocks(config)
        self.down_blocks = F.ModuleList([DownBlock(p, config, context_dim) for p in downs])
        self.mid_block = MidBlock(mid, config, context_dim)
        self.up_blocks = F.ModuleList([UpBlock(p, config, context_dim) for p in ups])
        self.conv_norm_out = F.GroupNorm(config.norm_num_groups, c0, config.norm_eps)
        self.conv_out = F.Conv2d(c0, config.out_channels, 3, padding=1)

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None, attention_mask=None):
        """sample (B, in_channels, H, W); timestep () or (B,), int or float (see PriorTransformer.forward on
        reduced precision); decoder only: encoder_hidden_states the context (B, L, cross_attention_dim),
        class_labels the additive time embedding (B, time_embed_dim), attention_mask the additive (B, 1, 1, L)
        of `decoder_attention_mask` or None. -> (B, out_channels, H, W)."""
        F = self.F
        check_unet_sample(tuple(sample.shape), self.config)
        timesteps = F.broadcast_to(timestep.reshape(-1), (sample.shape[0],))
        emb = self.time_embedding(F.cast(self.time_proj(timesteps), sample.dtype))  # (B, T)
        if self.class_embed_type == "identity":  # text_proj's additive time embedding
            if class_labels is None:
                raise Dalle2Error("decoder: class_labels (text_proj's additive time embedding) is required")
            emb = emb + F.cast(class_labels, sample.dtype)
        x = self.conv_in(F.to_layout(sample))
        skips = [x]
        for block in self.down_blocks:  # each block under gradient checkpointing when it is on (call_block)
            x, res = self.call_block(block, x, emb, encoder_hidden_states, attention_mask)
            skips += res
        x = self.call_block(self.mid_block, x, emb, encoder_hidden_states, attention_mask)
        for block in self.up_blocks:
            n = len(block.resnets)  # the skips it consumes
            x = self.call_block(block, x, skips[-n:], emb, encoder_hidden_states, attention_mask)
            del skips[-n:]
        return F.from_layout(self.conv_out(F.silu(self.conv_norm_out(x))))
