"""The UNets' data flow, written once for both backends.

The backends' block and UNet classes (backends/<name>/unet.py) build the modules; the order in which they are
called, and which skip feeds which up-block resnet, is here. Nothing in this file touches an array directly: the
one backend-specific operation, joining two feature maps along channels, is the backend's `concat_channels`
(NCHW in torch, NHWC in MLX).
"""

from __future__ import annotations

from .errors import Dalle2Error


class BlockFlow:
    def attend(self, i: int, x, context, mask):
        """The i-th attention after a resnet, where the block type has attentions (diffusers' SimpleCrossAttn)."""
        attentions = getattr(self, "attentions", None)
        return x if attentions is None else attentions[i](x, context, mask)


class DownFlow(BlockFlow):
    def run(self, x, temb, context, mask):
        """-> (output, the skips it leaves: each resnet(+attention) output, then the downsampler's)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self.attend(i, resnet(x, temb), context, mask)
            skips.append(x)
        downsamplers = getattr(self, "downsamplers", None)
        if downsamplers is not None:
            x = downsamplers[0](x, temb)
            skips.append(x)
        return x, skips


class MidFlow(BlockFlow):
    def run(self, x, temb, context, mask):
        x = self.resnets[0](x, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            x = resnet(self.attend(i, x, context, mask), temb)
        return x


class UpFlow(BlockFlow):
    def run(self, x, skips: list, temb, context, mask):
        """Consumes one skip per resnet from the end of `skips`, the latest first (diffusers' [-1])."""
        for i, resnet in enumerate(self.resnets):
            x = self.concat_channels(x, skips.pop())
            x = self.attend(i, resnet(x, temb), context, mask)
        upsamplers = getattr(self, "upsamplers", None)
        if upsamplers is not None:
            x = upsamplers[0](x, temb)
        return x


class UNetFlow:
    def condition(self, emb, class_labels):
        """Add the "identity" class embedding (text_proj's additive time embedding) where the config has one."""
        if self.class_embed_type != "identity":
            return emb
        if class_labels is None:
            raise Dalle2Error("decoder: class_labels (text_proj's additive time embedding) is required")
        return emb + class_labels

    def run_blocks(self, x, emb, context, mask):
        """conv_in's output -> the last up block's output: down blocks, mid block, up blocks with the skips."""
        skips = [x]
        for block in self.down_blocks:
            x, res = block(x, emb, context, mask)
            skips += res
        x = self.mid_block(x, emb, context, mask)
        for block in self.up_blocks:
            x = block(x, skips, emb, context, mask)
        return x
