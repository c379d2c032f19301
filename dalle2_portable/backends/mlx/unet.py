"""The unCLIP UNets in MLX: Karlo's decoder (diffusers `UNet2DConditionModel`) and its super-res UNets
(diffusers `UNet2DModel`), one class for both, sized by `unclip.unet_blocks`; the call order of the blocks
and skips is `unet_flow`'s, shared with the other backend.

The same tree and names as backends/torch/unet.py (see its docstring). Inside, feature maps are NHWC (MLX's
convolution layout); `UNet.__call__` takes and returns NCHW like the torch module. GroupNorm uses
`pytorch_compatible=True`, which groups channels as torch does.
"""

from __future__ import annotations

from ...unclip import BlockPlan, check_unet_sample, unet_blocks
from ...unet_flow import DownFlow, MidFlow, UNetFlow, UpFlow
from .layers import TimestepEmbedding, Timesteps, attention, mx, nn, silu


def _group_norm(groups: int, channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=eps, pytorch_compatible=True)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (kernel=None): GroupNorm, SiLU, [avg-pool 2x2 / nearest 2x on both paths], conv,
    + time embedding ("default": added; "scale_shift": GroupNorm then * (1 + scale) + shift), GroupNorm, SiLU,
    conv, + the input (a 1x1 conv when channels change), / output_scale_factor."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float, scale_shift: bool,
                 resample: str | None = None, output_scale_factor: float = 1.0):
        super().__init__()
        self.scale_shift, self.resample, self.output_scale_factor = scale_shift, resample, output_scale_factor
        self.norm1 = _group_norm(groups, cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, 2 * cout if scale_shift else cout)
        self.norm2 = _group_norm(groups, cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)

    def _resample(self, x: mx.array) -> mx.array:  # NHWC
        b, h, w, c = x.shape
        if self.resample == "down":  # diffusers Downsample2D(use_conv=False): 2x2 average pool
            return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        if self.resample == "up":  # diffusers Upsample2D(use_conv=False): nearest, 2x
            return mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return x

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:  # (B, H, W, C), (B, T)
        h = silu(self.norm1(x))
        x, h = self._resample(x), self._resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(silu(temb))[:, None, None, :]
        if self.scale_shift:
            scale, shift = mx.split(t, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(silu(h))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Attention(nn.Module):
    """diffusers `Attention` with `AttnAddedKVProcessor2_0`, as the SimpleCrossAttn blocks build it: GroupNorm
    (eps 1e-5, diffusers' fixed value), queries from the feature map, keys/values = [context through add_k/add_v,
    the feature map through to_k/to_v] (context first), output projection, + the input."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.heads = heads
        self.group_norm = _group_norm(groups, channels, 1e-5)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.add_k_proj = nn.Linear(context_dim, channels)
        self.add_v_proj = nn.Linear(context_dim, channels)
        self.to_out = [nn.Linear(channels, channels)]  # diffusers' to_out.1 is a Dropout

    def __call__(self, x: mx.array, context: mx.array, mask: mx.array | None) -> mx.array:
        b, h, w, c = x.shape
        hs = self.group_norm(x).reshape(b, h * w, c)  # (B, HW, C), row-major positions as torch's view
        k = mx.concatenate([self.add_k_proj(context), self.to_k(hs)], axis=1)  # (B, L + HW, C)
        v = mx.concatenate([self.add_v_proj(context), self.to_v(hs)], axis=1)
        if mask is not None:  # (B, 1, 1, L) -> zeros for the feature-map keys
            mask = mx.pad(mask.astype(hs.dtype), [(0, 0), (0, 0), (0, 0), (0, h * w)])
        out = self.to_out[0](attention(self.to_q(hs), k, v, self.heads, mask=mask))  # (B, HW, C)
        return out.reshape(b, h, w, c) + x


class _Block(nn.Module):
    """The resnets and attentions of one block; the subclasses add the resampler (the flow is
    unet_flow's)."""

    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None, output_scale_factor: float = 1.0):
        super().__init__()
        self.resnets = [_resnet(cfg, i, o, None, output_scale_factor) for i, o in plan.resnets]
        if plan.attentions:
            self.attentions = [Attention(plan.channels, plan.heads, context_dim, cfg.norm_num_groups)
                               for _ in range(plan.attentions)]


def _resnet(cfg, cin: int, cout: int, resample: str | None = None, output_scale_factor: float = 1.0):
    return ResnetBlock2D(cin, cout, cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps,
                         cfg.resnet_time_scale_shift == "scale_shift", resample, output_scale_factor)


class DownBlock(DownFlow, _Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim)
        if plan.resample:
            self.downsamplers = [_resnet(cfg, plan.channels, plan.channels, "down")]

    __call__ = DownFlow.run


class MidBlock(MidFlow, _Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim, cfg.mid_block_scale_factor)

    __call__ = MidFlow.run


class UpBlock(UpFlow, _Block):
    def __init__(self, plan: BlockPlan, cfg, context_dim: int | None):
        super().__init__(plan, cfg, context_dim)
        if plan.resample:
            self.upsamplers = [_resnet(cfg, plan.channels, plan.channels, "up")]

    __call__ = UpFlow.run

    @staticmethod
    def concat_channels(a, b):
        return mx.concatenate([a, b], axis=-1)


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
        self.down_blocks = [DownBlock(p, config, context_dim) for p in downs]
        self.mid_block = MidBlock(mid, config, context_dim)
        self.up_blocks = [UpBlock(p, config, context_dim) for p in ups]
        self.conv_norm_out = _group_norm(config.norm_num_groups, c0, config.norm_eps)
        self.conv_out = nn.Conv2d(c0, config.out_channels, 3, padding=1)

    def __call__(self, sample: mx.array, timestep: mx.array, encoder_hidden_states=None, class_labels=None,
                 attention_mask=None) -> mx.array:
        """As the torch module: sample (B, in_channels, H, W) NCHW in, (B, out_channels, H, W) NCHW out."""
        check_unet_sample(tuple(sample.shape), self.config)
        timesteps = mx.broadcast_to(timestep.reshape(-1), (sample.shape[0],))
        emb = self.time_embedding(self.time_proj(timesteps).astype(sample.dtype))  # (B, T)
        emb = self.condition(emb, None if class_labels is None else class_labels.astype(sample.dtype))
        x = self.conv_in(sample.transpose(0, 2, 3, 1))  # NCHW -> NHWC
        x = self.run_blocks(x, emb, encoder_hidden_states, attention_mask)
        return self.conv_out(silu(self.conv_norm_out(x))).transpose(0, 3, 1, 2)  # NHWC -> NCHW
