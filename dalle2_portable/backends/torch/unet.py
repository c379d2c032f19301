"""The unCLIP UNets in PyTorch: Karlo's decoder (diffusers `UNet2DConditionModel`) and its super-res UNets
(diffusers `UNet2DModel`), one class for both, sized by `unclip.unet_blocks`; the call order of the blocks
and skips is `unet_flow`'s, shared with the other backend.

Attribute names are diffusers' (`conv_in`, `time_embedding`, `down_blocks.i.resnets.j.conv1`, `...attentions.j
.add_k_proj`, `...downsamplers.0`, `mid_block`, `up_blocks`, `conv_norm_out`, `conv_out`), so the flattened
parameter names are the canonical ones; backends/mlx/unet.py is the same tree (NHWC inside, NCHW at its edges).
The block classes cover diffusers' ResnetDownsampleBlock2D / SimpleCrossAttnDownBlock2D (`DownBlock`),
UNetMidBlock2D / UNetMidBlock2DSimpleCrossAttn (`MidBlock`) and ResnetUpsampleBlock2D / SimpleCrossAttnUpBlock2D
(`UpBlock`): the attention is there when the block type has it.
"""

from __future__ import annotations

import torch.nn.functional as F

from ...unclip import BlockPlan, check_unet_sample, unet_blocks
from ...unet_flow import DownFlow, MidFlow, UNetFlow, UpFlow
from .layers import TimestepEmbedding, Timesteps, attention, nn, silu, torch


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (kernel=None): GroupNorm, SiLU, [avg-pool 2x2 / nearest 2x on both paths], conv,
    + time embedding ("default": added; "scale_shift": GroupNorm then * (1 + scale) + shift), GroupNorm, SiLU,
    conv, + the input (a 1x1 conv when channels change), / output_scale_factor."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float, scale_shift: bool,
                 resample: str | None = None, output_scale_factor: float = 1.0):
        super().__init__()
        self.scale_shift, self.resample, self.output_scale_factor = scale_shift, resample, output_scale_factor
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, 2 * cout if scale_shift else cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)  # diffusers Downsample2D(use_conv=False)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")  # diffusers Upsample2D(use_conv=False)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:  # (B, C, H, W), (B, T)
        h = silu(self.norm1(x))
        x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(silu(temb))[:, :, None, None]
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(silu(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """diffusers `Attention` with `AttnAddedKVProcessor2_0`, as the SimpleCrossAttn blocks build it: GroupNorm
    (eps 1e-5, diffusers' fixed value), queries from the feature map, keys/values = [context through add_k/add_v,
    the feature map through to_k/to_v] (context first), output projection, + the input."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.heads = heads
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-5)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(context_dim, channels)
        self.add_v_proj = nn.Linear(context_dim, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.1 is a Dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        hs = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        k = torch.cat([self.add_k_proj(context), self.to_k(hs)], dim=1)  # (B, L + HW, C)
        v = torch.cat([self.add_v_proj(context), self.to_v(hs)], dim=1)
        if mask is not None:  # (B, 1, 1, L) -> zeros for the feature-map keys
            mask = F.pad(mask.to(hs.dtype), (0, h * w))
        out = self.to_out[0](attention(self.to_q(hs), k, v, self.heads, mask=mask))  # (B, HW, C)
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class _Block(nn.Module):
    """The resnets and attentions of one block; the subclasses add the resampler (the flow is
    unet_flow's)."""

    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None, output_scale_factor: float = 1.0):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(cfg, i, o, None, output_scale_factor) for i, o in plan.resnets])
        if plan.attentions:
            self.attentions = nn.ModuleList([Attention(plan.channels, plan.heads, context_dim, cfg.norm_num_groups)
                                             for _ in range(plan.attentions)])


def _resnet(cfg, cin: int, cout: int, resample: str | None = None, output_scale_factor: float = 1.0):
    return ResnetBlock2D(cin, cout, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps,
                         cfg.resnet_time_scale_shift == "scale_shift", resample, output_scale_factor)


class DownBlock(DownFlow, _Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim)
        if plan.resample:
            self.downsamplers = nn.ModuleList([_resnet(cfg, plan.channels, plan.channels, "down")])

    forward = DownFlow.run


class MidBlock(MidFlow, _Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim, cfg.mid_block_scale_factor)

    forward = MidFlow.run


class UpBlock(UpFlow, _Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim)
        if plan.resample:
            self.upsamplers = nn.ModuleList([_resnet(cfg, plan.channels, plan.channels, "up")])

    forward = UpFlow.run

    @staticmethod
    def concat_channels(a, b):
        return torch.cat([a, b], dim=1)


class UNet(UNetFlow, nn.Module):
    """diffusers `UNet2DConditionModel` (decoder config) or `UNet2DModel` (super-res config)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c0, temb = config.block_out_channels[0], config.time_embed_dim
        context_dim = getattr(config, "cross_attention_dim", None)
        self.class_embed_type = getattr(config, "class_embed_type", None)  # "identity" has no weights
        self.conv_in = nn.Conv2d(config.in_channels, c0, 3, padding=1)
        self.time_proj = Timesteps(c0, config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(c0, temb, out_dim=temb)
        downs, mid, ups = unet_blocks(config)
        self.down_blocks = nn.ModuleList([DownBlock(p, config, context_dim) for p in downs])
        self.mid_block = MidBlock(mid, config, context_dim)
        self.up_blocks = nn.ModuleList([UpBlock(p, config, context_dim) for p in ups])
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, c0, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states=None, class_labels=None,
                attention_mask=None) -> torch.Tensor:
        """sample (B, in_channels, H, W); timestep () or (B,), int or float (see PriorTransformer.forward on
        reduced precision); decoder only: encoder_hidden_states the context (B, L, cross_attention_dim),
        class_labels the additive time embedding (B, time_embed_dim), attention_mask the additive (B, 1, 1, L)
        of `unclip.decoder_attention_mask` or None. -> (B, out_channels, H, W)."""
        check_unet_sample(tuple(sample.shape), self.config)
        timesteps = torch.broadcast_to(timestep.reshape(-1), (sample.shape[0],))
        emb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))  # (B, T)
        emb = self.condition(emb, None if class_labels is None else class_labels.to(sample.dtype))
        x = self.run_blocks(self.conv_in(sample), emb, encoder_hidden_states, attention_mask)
        return self.conv_out(silu(self.conv_norm_out(x)))
