"""The unCLIP diffusion prior (diffusers `PriorTransformer`, Karlo's configuration), in PyTorch.

Class and attribute names are diffusers' (`PriorTransformer`, `BasicTransformerBlock`, `Attention`,
`FeedForward`, `GELU`), so the flattened parameter names are the canonical ones of the weight files;
backends/mlx/prior.py is the same tree. The additive attention mask is built once, in NumPy, by
`unclip.prior_attention_mask` and passed in.
"""

from __future__ import annotations

from ...spec import PriorConfig
from .layers import ACTIVATIONS, TimestepEmbedding, Timesteps, attention, nn, torch


class Attention(nn.Module):
    """diffusers `Attention` as `BasicTransformerBlock` builds it for the prior: self-attention, biased q/k/v."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers' to_out.1 is a parameterless Dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        return self.to_out[0](attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, mask=mask))


class GELU(nn.Module):
    """diffusers `GELU` (approximate="none"): proj then exact GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS["gelu"](self.proj(x))


class FeedForward(nn.Module):
    """diffusers `FeedForward(dim, activation_fn="gelu")`: net = [GELU(dim, 4 dim), Dropout, Linear(4 dim, dim)]."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is diffusers' Dropout: identity at inference, kept so that the last Linear is named net.2
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
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
        self.positional_embedding = nn.Parameter(torch.zeros(1, config.sequence_length, d))
        self.prd_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(d, config.num_attention_heads, config.attention_head_dim)
            for _ in range(config.num_layers)])
        self.norm_out = nn.LayerNorm(d, eps=1e-5)
        self.proj_to_clip_embeddings = nn.Linear(d, config.clip_embed_dim)
        # CLIP image-embedding statistics (Karlo's ViT-L-14_stats.th), used by post_process_latents only
        self.clip_mean = nn.Parameter(torch.zeros(1, config.clip_embed_dim))
        self.clip_std = nn.Parameter(torch.zeros(1, config.clip_embed_dim))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, proj_embedding: torch.Tensor,
                encoder_hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states x_t (B, E); timestep () or (B,), int or float; proj_embedding CLIP text embeds (B, P);
        encoder_hidden_states CLIP text states (B, N, E); attention_mask the additive (B, N+4, N+4) mask of
        `unclip.prior_attention_mask`, or None for no mask at all (as diffusers does without a text mask).
        -> the predicted image embedding (B, clip_embed_dim), before `post_process_latents`.
        Float timesteps reach here in the compute dtype (`Backend.run` casts floats; bf16 rounds 999.0 to 1000.0):
        pass integer timesteps, as the scheduler's are, in reduced precision."""
        b = hidden_states.shape[0]
        timesteps = torch.broadcast_to(timestep.reshape(-1), (b,))  # diffusers: timesteps * ones(B)
        t_emb = self.time_proj(timesteps).to(hidden_states.dtype)  # (B, D); the sinusoid is float32 in diffusers
        t_emb = self.time_embedding(t_emb)  # (B, D)
        proj_embeddings = self.embedding_proj(proj_embedding)  # (B, D)
        encoder_hidden_states = self.encoder_hidden_states_proj(encoder_hidden_states)  # (B, N, D)
        hidden_states = self.proj_in(hidden_states)  # (B, D)
        prd = self.prd_embedding.to(hidden_states.dtype).expand(b, -1, -1)  # (B, 1, D)
        # the sequence [text states (N), text embedding, time, x_t, prd] (B, N + 4, D), as Karlo's xf.py
        x = torch.cat([encoder_hidden_states, proj_embeddings[:, None], t_emb[:, None], hidden_states[:, None],
                       prd], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        mask = None if attention_mask is None else attention_mask[:, None].to(x.dtype)  # (B, 1, L, L): all heads
        for block in self.transformer_blocks:
            x = block(x, mask)
        x = self.norm_out(x)
        return self.proj_to_clip_embeddings(x[:, -1])  # the prd token -> (B, clip_embed_dim)

    def post_process_latents(self, prior_latents: torch.Tensor) -> torch.Tensor:
        """Undo the prior's normalisation of CLIP image embeddings: x * clip_std + clip_mean (diffusers)."""
        return prior_latents * self.clip_std + self.clip_mean
