"""The unCLIP diffusion prior (diffusers `PriorTransformer`, Karlo's configuration), written once over the facade.

Class and attribute names are diffusers' (`PriorTransformer`, `BasicTransformerBlock`, `Attention`,
`FeedForward`, `GELU`), so the flattened parameter names are the canonical ones of the weight files. The
additive attention mask is built once, in NumPy, by `prior_attention_mask` and passed in.
"""

from __future__ import annotations

import numpy as np

from ..errors import Dalle2Error
from ..spec import PriorConfig
from . import Module
from .layers import ACTIVATIONS, MASK_FILL, TimestepEmbedding, Timesteps, attention


def prior_attention_mask(text_mask: np.ndarray, additional_embeddings: int = 4) -> np.ndarray:
    """The additive self-attention mask of diffusers' `PriorTransformer.forward`, from the tokenizer's mask.

    text_mask (B, N) bool/int, 1 = real token -> (B, N + A, N + A) float32, as diffusers builds it:
      (1 - text_mask) * -10000, padded with A zeros on the right (the text embedding, time, x_t and prd tokens
      are always visible), plus the causal mask (-10000 above the diagonal). Padded text keys behind a causal
      position thus get -20000, as in diffusers. diffusers repeats it per head; the module broadcasts it.
    """
    text_mask = np.asarray(text_mask)
    if text_mask.ndim != 2:
        raise Dalle2Error(f"prior attention mask: expected (batch, tokens), got shape {text_mask.shape}")
    b, n = text_mask.shape
    length = n + additional_embeddings
    padding = (1.0 - text_mask.astype(np.float32)) * np.float32(MASK_FILL)  # (B, N)
    padding = np.pad(padding, ((0, 0), (0, additional_embeddings)))  # (B, L)
    causal = np.triu(np.full((length, length), MASK_FILL, dtype=np.float32), k=1)  # (L, L)
    return (padding[:, None, :] + causal[None]).astype(np.float32)  # (B, L, L): [batch, query, key]


class Attention(Module):
    """diffusers `Attention` as `BasicTransformerBlock` builds it for the prior: self-attention, biased q/k/v."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        F = self.F
        self.heads = heads
        inner = heads * dim_head
        self.to_q = F.Linear(dim, inner)
        self.to_k = F.Linear(dim, inner)
        self.to_v = F.Linear(dim, inner)
        self.to_out = F.ModuleList([F.Linear(inner, dim)])  # diffusers' to_out.1 is a parameterless Dropout

    def forward(self, x, mask):  # (B, L, D) -> (B, L, D)
        return self.to_out[0](attention(self.F, self.to_q(x), self.to_k(x), self.to_v(x), self.heads, mask=mask))


class GELU(Module):
    """diffusers `GELU` (approximate="none"): proj then exact GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = self.F.Linear(dim_in, dim_out)

    def forward(self, x):
        return ACTIVATIONS["gelu"](self.F, self.proj(x))


class FeedForward(Module):
    """diffusers `FeedForward(dim, activation_fn="gelu")`: net = [GELU(dim, 4 dim), Dropout, Linear(4 dim, dim)]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        F = self.F
        # net.1 is diffusers' Dropout: identity at inference, kept so that the last Linear is named net.2
        self.net = F.ModuleList([GELU(dim, dim * mult), F.Identity(), F.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(Module):
    """diffusers `BasicTransformerBlock` with norm_type="layer_norm", no cross-attention (so no norm2/attn2):
    x + attn1(norm1(x)), then x + ff(norm3(x)). LayerNorm eps 1e-5, elementwise affine."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.norm1 = self.F.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm3 = self.F.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x, mask):
        x = x + self.attn1(self.norm1(x), mask)
        return x + self.ff(self.norm3(x))


class PriorTransformer(Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        F = self.F
        d = config.inner_dim
        self.time_proj = Timesteps(d, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(d, config.time_embed_dim, out_dim=d, act_fn="silu")
        self.proj_in = F.Linear(config.embedding_dim, d)
        self.embedding_proj = F.Linear(config.embedding_proj_dim, d)
        self.encoder_hidden_states_proj = F.Linear(config.embedding_dim, d)
        self.positional_embedding = F.Parameter((1, config.sequence_length, d))
        self.prd_embedding = F.Parameter((1, 1, d))
        self.transformer_blocks = F.ModuleList([
            BasicTransformerBlock(d, config.num_attention_heads, config.attention_head_dim)
            for _ in range(config.num_layers)])
        self.norm_out = F.LayerNorm(d, eps=1e-5)
        self.proj_to_clip_embeddings = F.Linear(d, config.clip_embed_dim)
        # CLIP image-embedding statistics (Karlo's ViT-L-14_stats.th), used by post_process_latents only
        self.clip_mean = F.Parameter((1, config.clip_embed_dim))
        self.clip_std = F.Parameter((1, config.clip_embed_dim))

    def forward(self, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask=None):
        """hidden_states x_t (B, E); timestep () or (B,), int or float; proj_embedding CLIP text embeds (B, P);
        encoder_hidden_states CLIP text states (B, N, E); attention_mask the additive (B, N+4, N+4) mask of
        `prior_attention_mask`, or None for no mask at all (as diffusers does without a text mask).
        -> the predicted image embedding (B, clip_embed_dim), before `post_process_latents`.
        Float timesteps reach here in the compute dtype (`Backend.run` casts floats; bf16 rounds 999.0 to 1000.0):
        pass integer timesteps, as the scheduler's are, in reduced precision."""
        F = self.F
        b = hidden_states.shape[0]
        timesteps = F.broadcast_to(timestep.reshape(-1), (b,))  # diffusers: timesteps * ones(B)
        t_emb = F.cast(self.time_proj(timesteps), hidden_states.dtype)  # (B, D); the sinusoid is float32 (diffusers)
        t_emb = self.time_embedding(t_emb)  # (B, D)
        proj_embeddings = self.embedding_proj(proj_embedding)  # (B, D)
        encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states)  # (B, N, D)
        hidden_states = self.proj_in(hidden_states)  # (B, D)
        prd = F.broadcast_to(F.cast(self.prd_embedding, hidden_states.dtype), (b, 1, hidden_states.shape[-1]))
        # the sequence [text states (N), text embedding, time, x_t, prd] (B, N + 4, D), as Karlo's xf.py
        x = F.cat([encoder_hidden_states, proj_embeddings[:, None], t_emb[:, None], hidden_states[:, None], prd],
                  axis=1)
        x = x + F.cast(self.positional_embedding, x.dtype)
        mask = None if attention_mask is None else F.cast(attention_mask[:, None], x.dtype)  # (B, 1, L, L): heads
        for block in self.transformer_blocks:
            x = self.call_block(block, x, mask)  # under gradient checkpointing when it is on
        x = self.norm_out(x)
        return self.proj_to_clip_embeddings(x[:, -1])  # the prd token -> (B, clip_embed_dim)

    def post_process_latents(self, prior_latents):
        """Undo the prior's normalisation of CLIP image embeddings: x * clip_std + clip_mean (diffusers)."""
        return prior_latents * self.clip_std + self.clip_mean
