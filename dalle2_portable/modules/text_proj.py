"""unCLIP's text_proj (diffusers `UnCLIPTextProjModel`), written once over the facade: CLIP image and text
embeddings -> the decoder's additive time embedding and its context sequence."""

from __future__ import annotations

from ..spec import TextProjConfig
from . import Module


class UnCLIPTextProjModel(Module):
    def __init__(self, config: TextProjConfig):
        super().__init__()
        F = self.F
        c, t, x = config.clip_embeddings_dim, config.time_embed_dim, config.cross_attention_dim
        self.clip_extra_context_tokens = config.clip_extra_context_tokens
        self.learned_classifier_free_guidance_embeddings = F.Parameter((c,))  # the unconditional image
        self.embedding_proj = F.Linear(c, t)
        self.clip_image_embeddings_project_to_time_embeddings = F.Linear(c, t)
        self.clip_extra_context_tokens_proj = F.Linear(c, self.clip_extra_context_tokens * x)
        self.encoder_hidden_states_proj = F.Linear(c, x)
        self.text_encoder_hidden_states_norm = F.LayerNorm(x, eps=1e-5)

    def forward(self, image_embeddings, prompt_embeds, text_encoder_hidden_states, do_classifier_free_guidance=False):
        """image_embeddings (B', C); prompt_embeds (B, C); text_encoder_hidden_states (B, N, C);
        do_classifier_free_guidance: a bool or 0-d array (Backend.run passes arrays); when true, B = 2 B' and the
        learned unconditional embedding is prepended to the images (uncond first, as the prompts are).
        -> (context (B, T + N, X), additive time embedding (B, time_embed_dim))."""
        F = self.F
        if bool(do_classifier_free_guidance):
            uncond = F.broadcast_to(self.learned_classifier_free_guidance_embeddings[None], image_embeddings.shape)
            image_embeddings = F.cat([uncond, image_embeddings], axis=0)  # (B, C)
        b = prompt_embeds.shape[0]
        # DALL-E 2 section 2.1: "projecting and adding CLIP embeddings to the existing timestep embedding"
        time = self.clip_image_embeddings_project_to_time_embeddings(image_embeddings) + self.embedding_proj(
            prompt_embeds)  # (B, time_embed_dim)
        # "... and projecting CLIP embeddings into four extra tokens of context": channel-major, token j channel c
        # is out[c * T + j] (Karlo's reshape(B, -1, 4) of a channels-first sequence)
        extra = self.clip_extra_context_tokens_proj(image_embeddings)  # (B, T * X)
        extra = F.permute(extra.reshape(b, -1, self.clip_extra_context_tokens), (0, 2, 1))  # (B, T, X)
        text = self.text_encoder_hidden_states_norm(self.encoder_hidden_states_proj(text_encoder_hidden_states))
        return F.cat([extra, text], axis=1), time  # (B, T + N, X), (B, time_embed_dim)
