"""The unCLIP diffusion prior (diffusers `PriorTransformer`, Karlo's configuration), written once over the facade.

Class and attribute names are diffusers' (`PriorTransformer`, `BasicTransformerBlock`, `Attention`,
`FeedForward`, `GELU`), so the flattened parameter names are the canonical ones of the weight files. The
additive attention mask is built once, in NumPy, by `prior_attention_mask` and passed in; `prior_text_inputs`
also cuts the text states after the batch's last real token (the padding no position can attend to), which
leaves the output as it was and saves most of a step's work on short prompts.
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


def attended_length(text_mask: np.ndarray) -> int:
    """1 + the position of the last token that any row of the (B, N) tokenizer mask attends to (at least 1)."""
    text_mask = np.asarray(text_mask)
    if text_mask.ndim != 2:
        raise Dalle2Error(f"prior attention mask: expected (batch, tokens), got shape {text_mask.shape}")
    real = np.flatnonzero(text_mask.any(axis=0))
    return int(real[-1]) + 1 if real.size else 1


def prior_text_inputs(states: np.ndarray, text_mask: np.ndarray, additional_embeddings: int = 4,
                      length: int | None = None):
    """(text states (B, N, E), tokenizer mask (B, N)) -> (states (B, n, E), additive mask (B, n + A, n + A)),
    cut after the last token that any row attends to (n = `attended_length`, or `length` if given: a whole
    batch's, so that its micro-batches share one shape): the prior's inputs as the sampler and the training
    loop pass them.

    Exact: a padded key gets -10000 in every row of diffusers' mask, which underflows to a zero attention
    weight, so no position reads one; and the prd token, whose output is the prediction, sits at the end
    with its own position (`PriorTransformer.forward` keeps the extra tokens' positional embeddings). Karlo's
    prompts are a few tokens of 77: a guided step (the empty caption beside the prompt) shrinks from 81
    positions to the prompt's length + 4, and its cost with it."""
    n = attended_length(text_mask) if length is None else length
    return states[:, :n], prior_attention_mask(np.asarray(text_mask)[:, :n], additional_embeddings)


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
        self.num_embeddings = config.num_embeddings

    def forward(self, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask=None):
        """hidden_states x_t (B, E); timestep () or (B,), int or float; proj_embedding CLIP text embeds (B, P);
        encoder_hidden_states CLIP text states (B, N, E), or their first n < N tokens (`prior_text_inputs`: the
        text tokens keep positions 0..n-1, the four extra tokens theirs, N..N+3); attention_mask the additive
        (B, n+4, n+4) mask of `prior_attention_mask`, or None for no mask at all (as diffusers does without a
        text mask).
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
        n = encoder_hidden_states.shape[1]
        if n > self.num_embeddings:
            raise Dalle2Error(f"prior: {n} text tokens, more than the {self.num_embeddings} it has positions for")
        position = F.cast(self.positional_embedding, x.dtype)
        if n < self.num_embeddings:  # text cut after its last attended token: the extra tokens keep theirs
            position = F.cat([position[:, :n], position[:, self.num_embeddings:]], axis=1)
        x = x + position
        mask = None if attention_mask is None else F.cast(attention_mask[:, None], x.dtype)  # (B, 1, L, L): heads
        for block in self.transformer_blocks:
            x = self.call_block(block, x, mask)  # under gradient checkpointing when it is on
        x = self.norm_out(x)
        return self.proj_to_clip_embeddings(x[:, -1])  # the prd token -> (B, clip_embed_dim)

    def post_process_latents(self, prior_latents):
        """Undo the prior's normalisation of CLIP image embeddings: x * clip_std + clip_mean (diffusers)."""
        return prior_latents * self.clip_std + self.clip_mean
