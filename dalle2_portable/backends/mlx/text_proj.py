"""unCLIP's text_proj (diffusers `UnCLIPTextProjModel`), in MLX: CLIP image and text embeddings -> the
decoder's additive time embedding and its context sequence. backends/torch/text_proj.py is the same tree."""

from __future__ import annotations

from ...spec import TextProjConfig
from .layers import mx, nn


class UnCLIPTextProjModel(nn.Module):
    def __init__(self, config: TextProjConfig):
        super().__init__()
        c, t, x = config.clip_embeddings_dim, config.time_embed_dim, config.cross_attention_dim
        self.clip_extra_context_tokens = config.clip_extra_context_tokens
        self.learned_classifier_free_guidance_embeddings = mx.zeros((c,))  # the unconditional image
        self.embedding_proj = nn.Linear(c, t)
        self.clip_image_embeddings_project_to_time_embeddings = nn.Linear(c, t)
        self.clip_extra_context_tokens_proj = nn.Linear(c, self.clip_extra_context_tokens * x)
        self.encoder_hidden_states_proj = nn.Linear(c, x)
        self.text_encoder_hidden_states_norm = nn.LayerNorm(x, eps=1e-5)

    def __call__(self, image_embeddings: mx.array, prompt_embeds: mx.array,
                text_encoder_hidden_states: mx.array, do_classifier_free_guidance=False):
        """image_embeddings (B', C); prompt_embeds (B, C); text_encoder_hidden_states (B, N, C);
        do_classifier_free_guidance: a bool or 0-d array (Backend.run passes arrays); when true, B = 2 B' and the
        learned unconditional embedding is prepended to the images (uncond first, as the prompts are).
        -> (context (B, T + N, X), additive time embedding (B, time_embed_dim))."""
        if bool(do_classifier_free_guidance):
            uncond = mx.broadcast_to(self.learned_classifier_free_guidance_embeddings, image_embeddings.shape)
            image_embeddings = mx.concatenate([uncond, image_embeddings], axis=0)  # (B, C)
        b = prompt_embeds.shape[0]
        # DALL-E 2 section 2.1: "projecting and adding CLIP embeddings to the existing timestep embedding"
        time = self.clip_image_embeddings_project_to_time_embeddings(image_embeddings) + self.embedding_proj(
            prompt_embeds)  # (B, time_embed_dim)
        # "... and projecting CLIP embeddings into four extra tokens of context": channel-major, token j channel c
        # is out[c * T + j] (Karlo's reshape(B, -1, 4) of a channels-first sequence)
        extra = self.clip_extra_context_tokens_proj(image_embeddings)  # (B, T * X)
        extra = extra.reshape(b, -1, self.clip_extra_context_tokens).transpose(0, 2, 1)  # (B, T, X)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_encoder_hidden_states))
        return mx.concatenate([extra, text], axis=1), time  # (B, T + N, X), (B, time_embed_dim)
