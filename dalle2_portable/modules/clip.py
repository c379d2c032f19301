"""CLIP text and vision towers with projections (transformers `CLIPTextModelWithProjection`,
`CLIPVisionModelWithProjection`), written once over the facade.

Class and attribute names are transformers', so the flattened parameter names are the canonical ones of the
weight files. The text tower runs with its causal mask only (no padding mask), as unCLIP pipelines and OpenAI's
`encode_text` call it: positions after EOS cannot reach EOS through a causal mask anyway.
"""

from __future__ import annotations

from ..spec import CLIPTextConfig, CLIPVisionConfig
from . import Module
from .layers import ACTIVATIONS, attention


class CLIPAttention(Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        F = self.F
        self.num_heads = num_heads
        self.q_proj = F.Linear(hidden_size, hidden_size)
        self.k_proj = F.Linear(hidden_size, hidden_size)
        self.v_proj = F.Linear(hidden_size, hidden_size)
        self.out_proj = F.Linear(hidden_size, hidden_size)

    def forward(self, x, causal: bool):  # (B, L, D) -> (B, L, D)
        out = attention(self.F, self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, causal)
        return self.out_proj(out)


class CLIPMLP(Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.act = hidden_act
        self.fc1 = self.F.Linear(hidden_size, intermediate_size)
        self.fc2 = self.F.Linear(intermediate_size, hidden_size)

    def forward(self, x):
        return self.fc2(ACTIVATIONS[self.act](self.F, self.fc1(x)))


class CLIPEncoderLayer(Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        F = self.F
        self.layer_norm1 = F.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = F.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x, causal: bool):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(Module):
    def __init__(self, config):
        super().__init__()
        self.layers = self.F.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, x, causal: bool):
        for layer in self.layers:
            x = self.call_block(layer, x, causal)  # under gradient checkpointing when it is on
        return x


class CLIPTextEmbeddings(Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = self.F.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = self.F.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids):  # (B, L) -> (B, L, D)
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPTextModel(Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = self.F.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids):  # (B, L) -> last_hidden_state (B, L, D)
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True))


class CLIPTextModelWithProjection(Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextModel(config)
        self.text_projection = self.F.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids, pool_positions):
        """input_ids (B, L), pool_positions (B,) from `clip.pool_positions` -> text_embeds (B, P), states (B, L, D)."""
        states = self.text_model(input_ids)
        pooled = states[self.F.arange(states.shape[0], like=states), pool_positions]  # (B, D)
        return self.text_projection(pooled), states


class CLIPVisionEmbeddings(Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        F = self.F
        self.class_embedding = F.Parameter((config.hidden_size,), init="normal")
        self.patch_embedding = F.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                        stride=config.patch_size, bias=False)
        self.position_embedding = F.Embedding(config.num_positions, config.hidden_size)

    def forward(self, pixel_values):  # (B, C, H, W) -> (B, 1 + N, D)
        F = self.F
        patches = F.flatten_spatial(self.patch_embedding(F.to_layout(pixel_values)))  # (B, N, D), row-major
        cls = F.broadcast_to(self.class_embedding, (patches.shape[0], 1, patches.shape[-1]))
        return F.cat([cls, patches], axis=1) + self.position_embedding.weight


class CLIPVisionModel(Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        F = self.F
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = F.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # (sic) transformers' name
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = F.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values):  # -> pooled (B, D), last_hidden_state (B, 1 + N, D)
        states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), causal=False)
        return self.post_layernorm(states[:, 0]), states


class CLIPVisionModelWithProjection(Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionModel(config)
        self.visual_projection = self.F.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, pixel_values):
        """pixel_values (B, C, H, W), CLIP-normalised -> image_embeds (B, P), last_hidden_state (B, 1 + N, D)."""
        pooled, states = self.vision_model(pixel_values)
        return self.visual_projection(pooled), states


class CLIPLogitScale(Module):
    """CLIPModel's learned temperature: `logit_scale`, the log of the factor on the cosine similarities (CLIP
    starts it at log(1 / 0.07); a model directory keeps it in its defaults, `clip_logit_scale`). A module of its
    own so that the CLIP training stage can bundle it with the towers."""

    def __init__(self, config=None):  # no sizes to configure
        super().__init__()
        self.logit_scale = self.F.Parameter(())
