"""The unCLIP diffusion prior (diffusers `PriorTransformer`, Karlo's configuration), in MLX.

Class and attribute names are diffusers' (`PriorTransformer`, `BasicTransformerBlock`, `Attention`,
`FeedForward`, `GELU`), so the flattened parameter names are the canonical ones of the weight files;
backends/torch/prior.py is the same tree. The additive attention mask is built once, in NumPy, by
`unclip.prior_attention_mask` and passed in.
"""

from __future__ import annotations

from ...spec import PriorConfig
from .layers import ACTIVATIONS, TimestepEmbedding, Timesteps, attention, mx, nn


class Attention(nn.Module):
    """diffusers `Attention` as `BasicTransformerBlock` builds it for the prior: self-attention, biased q/k/v."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = [nn.Linear(inner, dim)]  # diffusers' to_out.1 is a parameterless Dropout

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:  # (B, L, D) -> (B, L, D)
        return self.to_out[0](attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, mask=mask))


class GELU(nn.Module):
    """diffusers `GELU` (approximate="none"): proj then exact GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def __call__(self, x: mx.array) -> mx.array:
        return ACTIVATIONS["gelu"](self.proj(x))


class FeedForward(nn.Module):
    """diffusers `FeedForward(dim, activation_fn="gelu")`: net = [GELU(dim, 4 dim), Dropout, Linear(4 dim, dim)]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is diffusers' Dropout: identity at inference, kept so that the last Linear is named net.2
        self.net = [GELU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` with norm_type="layer_norm", no cross-attention (so no norm2/attn2):
    x + attn1(norm1(x)), then x + ff(norm3(x)). LayerNorm eps 1e-5, elementwise affine."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        x = x + self.attn1(self.norm1(x), mask)
        return x + self.ff(self.norm3(x))


class PriorTransformer(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        d = config.inner_dim
        self.time_proj = Timesteps(d, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(d, config.time_embed_dim, out_dim=d, act_fn="silu")
        self.proj_in = nn.Linear(config.embedding_dim, d)
        self.embedding_proj = nn.Linear(config.embedding_proj_dim, d)
        self.encoder_hidden_states_proj = nn.Linear(config.embedding_dim, d)
        self.positional_embedding = mx.zeros((1, config.sequence_length, d))
        self.prd_embedding = mx.zeros((1, 1, d))
        self.transformer_blocks = [
            BasicTransformerBlock(d, config.num_attention_heads, config.attention_head_dim)
            for _ in range(config.num_layers)]
        self.norm_out = nn.LayerNorm(d, eps=1e-5)
        self.proj_to_clip_embeddings = nn.Linear(d, config.clip_embed_dim)
        # CLIP image-embedding statistics (Karlo's ViT-L-14_stats.th), used by post_process_latents only
        self.clip_mean = mx.zeros((1, config.clip_embed_dim))
        self.clip_std = mx.zeros((1, config.clip_embed_dim))

    def __call__(self, hidden_states: mx.array, timestep: mx.array, proj_embedding: mx.array,
                encoder_hidden_states: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """hidden_states x_t (B, E); timestep () or (B,), int or float; proj_embedding CLIP text embeds (B, P);
        encoder_hidden_states CLIP text states (B, N, E); attention_mask the additive (B, N+4, N+4) mask of
        `unclip.prior_attention_mask`, or None for no mask at all (as diffusers does without a text mask).
        -> the predicted image embedding (B, clip_embed_dim), before `post_process_latents`.
        Float timesteps reach here in the compute dtype (`Backend.run` casts floats; bf16 rounds 999.0 to 1000.0):
        pass integer timesteps, as the scheduler's are, in reduced precision."""
        b = hidden_states.shape[0]
        timesteps = mx.broadcast_to(timestep.reshape(-1), (b,))  # diffusers: timesteps * ones(B)
        t_emb = self.time_proj(timesteps).astype(hidden_states.dtype)  # (B, D); the sinusoid is float32 in diffusers
        t_emb = self.time_embedding(t_emb)  # (B, D)
        proj_embeddings = self.embedding_proj(proj_embedding)  # (B, D)
        encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states)  # (B, N, D)
        hidden_states = self.proj_in(hidden_states)  # (B, D)
        d = hidden_states.shape[-1]
        prd = mx.broadcast_to(self.prd_embedding.astype(hidden_states.dtype), (b, 1, d))  # (B, 1, D)
        # the sequence [text states (N), text embedding, time, x_t, prd] (B, N + 4, D), as Karlo's xf.py
        x = mx.concatenate([encoder_hidden_states, proj_embeddings[:, None], t_emb[:, None],
                            hidden_states[:, None], prd], axis=1)
        x = x + self.positional_embedding.astype(x.dtype)
        mask = None if attention_mask is None else attention_mask[:, None].astype(x.dtype)  # (B, 1, L, L): all heads
        for block in self.transformer_blocks:
            x = block(x, mask)
        x = self.norm_out(x)
        return self.proj_to_clip_embeddings(x[:, -1])  # the prd token -> (B, clip_embed_dim)

    def post_process_latents(self, prior_latents: mx.array) -> mx.array:
        """Undo the prior's normalisation of CLIP image embeddings: x * clip_std + clip_mean (diffusers)."""
        return prior_latents * self.clip_std + self.clip_mean
