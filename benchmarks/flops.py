"""FLOPs of one call of each unCLIP component, counted from its config (the model.json spec dataclasses).

Counted: convolutions, linear layers and the two attention matmuls (scores and the weighted sum), at 2 FLOPs per
multiply-add; not counted: biases, norms, activations, additions, resampling (a few per cent of a UNet's time on a
CPU, none of its matmul work). This is the convention of torch's `FlopCounterMode` (mm/addmm/bmm/convolution/
scaled_dot_product_attention), which tests/test_flops.py holds these counts to, exactly, on diffusers' modules.

    unet_flops(cfg, batch, size)     decoder (UNet2DConditionConfig) or super-res (UNet2DConfig), size x size
    prior_flops(cfg, batch)          PriorTransformer
    clip_text_flops(cfg, batch)      CLIPTextModelWithProjection (77 tokens)
    text_proj_flops(cfg, batch)      UnCLIPTextProjModel
"""

from __future__ import annotations

from dalle2_portable.modules.unet import unet_blocks


def linear(rows: int, cin: int, cout: int) -> int:
    return 2 * rows * cin * cout


def conv(batch: int, size: int, cin: int, cout: int, kernel: int) -> int:
    """A stride-1 'same' convolution on a size x size map."""
    return 2 * batch * size * size * cin * cout * kernel * kernel


def attention(batch: int, queries: int, keys: int, width: int) -> int:
    """Q K^T and (softmax) V over all heads: width = heads x head size."""
    return 2 * 2 * batch * queries * keys * width


def unet_flops(cfg, batch: int, size: int, context_tokens: int = 81) -> int:
    """One UNet call on (batch, in_channels, size, size); the decoder's SimpleCrossAttn attentions take
    `context_tokens` context tokens (Karlo: 4 from text_proj + 77 text) besides the feature map's own."""
    c0, temb = cfg.block_out_channels[0], cfg.time_embed_dim
    context = getattr(cfg, "cross_attention_dim", None)
    scale_shift = cfg.resnet_time_scale_shift == "scale_shift"
    total = linear(batch, c0, temb) + linear(batch, temb, temb)  # time_embedding
    total += conv(batch, size, cfg.in_channels, c0, 3)  # conv_in

    def resnet(cin: int, cout: int, r: int, resample: str | None = None) -> int:
        """ResnetBlock2D on an r x r input; resampling (avg-pool / nearest) comes before conv1."""
        r = r // 2 if resample == "down" else r * 2 if resample == "up" else r
        flops = conv(batch, r, cin, cout, 3) + conv(batch, r, cout, cout, 3)
        flops += linear(batch, temb, 2 * cout if scale_shift else cout)  # time_emb_proj
        return flops + (conv(batch, r, cin, cout, 1) if cin != cout else 0)  # conv_shortcut

    def attn(channels: int, r: int) -> int:
        """SimpleCrossAttn: q/k/v/out on the map, add_k/add_v on the context, keys = context + map."""
        hw = r * r
        return (4 * linear(batch * hw, channels, channels) + 2 * linear(batch * context_tokens, context, channels)
                + attention(batch, hw, context_tokens + hw, channels))

    downs, mid, ups = unet_blocks(cfg)
    r = size
    for block in downs:
        for i, (cin, cout) in enumerate(block.resnets):
            total += resnet(cin, cout, r) + (attn(block.channels, r) if i < block.attentions else 0)
        if block.resample:
            total += resnet(block.channels, block.channels, r, "down")
            r //= 2
    total += resnet(*mid.resnets[0], r)
    for i, (cin, cout) in enumerate(mid.resnets[1:]):
        total += (attn(mid.channels, r) if i < mid.attentions else 0) + resnet(cin, cout, r)
    for block in ups:
        for i, (cin, cout) in enumerate(block.resnets):
            total += resnet(cin, cout, r) + (attn(block.channels, r) if i < block.attentions else 0)
        if block.resample:
            total += resnet(block.channels, block.channels, r, "up")
            r *= 2
    return total + conv(batch, size, c0, cfg.out_channels, 3)  # conv_out


def transformer_layer(batch: int, tokens: int, width: int, hidden: int) -> int:
    """Pre-LN block: q/k/v/out projections, attention, a two-layer MLP of `hidden` units."""
    return (4 * linear(batch * tokens, width, width) + attention(batch, tokens, tokens, width)
            + linear(batch * tokens, width, hidden) + linear(batch * tokens, hidden, width))


def prior_flops(cfg, batch: int) -> int:
    """One PriorTransformer call: the sequence [text states, text embedding, time, x_t, prd]; only the prd
    token is projected out."""
    d, n = cfg.inner_dim, cfg.sequence_length
    total = linear(batch, d, cfg.time_embed_dim) + linear(batch, cfg.time_embed_dim, d)  # time_embedding
    total += linear(batch, cfg.embedding_proj_dim, d)  # embedding_proj
    total += linear(batch * cfg.num_embeddings, cfg.embedding_dim, d)  # encoder_hidden_states_proj
    total += linear(batch, cfg.embedding_dim, d)  # proj_in
    total += cfg.num_layers * transformer_layer(batch, n, d, 4 * d)
    return total + linear(batch, d, cfg.clip_embed_dim)  # proj_to_clip_embeddings


def clip_text_flops(cfg, batch: int, tokens: int = 77) -> int:
    """One CLIPTextModelWithProjection call on (batch, tokens) ids; the pooled token is projected."""
    h = cfg.hidden_size
    total = cfg.num_hidden_layers * transformer_layer(batch, tokens, h, cfg.intermediate_size)
    return total + linear(batch, h, cfg.projection_dim)


def text_proj_flops(cfg, batch: int, tokens: int = 77) -> int:
    """One UnCLIPTextProjModel call (batch rows: with guidance, uncond + cond)."""
    c, t, x = cfg.clip_embeddings_dim, cfg.time_embed_dim, cfg.cross_attention_dim
    return (2 * linear(batch, c, t) + linear(batch, c, cfg.clip_extra_context_tokens * x)
            + linear(batch * tokens, c, x))
