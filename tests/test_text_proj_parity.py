"""text_proj: each backend against diffusers' `UnCLIPTextProjModel` on identical weights (with and without
classifier-free guidance), MLX against PyTorch in reduced precision, and the translator on Karlo's config.

fp32 bound (the brief): max |ours - diffusers| <= 1e-5 x max |diffusers|; fp16 / bf16 bounds measured (REL).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close_to_scale, backend_params
from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel as HFTextProj

from dalle2_portable.backends import get_backend
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.spec import TextProjConfig

# measured worst relative error (max abs diff / max abs reference), CPU, these inputs: fp32 mlx 1.6e-7 (torch is
# bit-identical to diffusers); fp16 5.3e-4 both backends vs fp32, mlx vs torch 4e-5; bf16 5.4e-3 both, mlx vs
# torch 0. Bounds are those rounded up ~2x.
REL = {"float32": 1e-5, "float16": 1.2e-3, "bfloat16": 1.2e-2}
TINY = dict(clip_embeddings_dim=16, time_embed_dim=32, cross_attention_dim=24, clip_extra_context_tokens=4)
# reference karlo-v1-alpha.md section 4, verbatim
KARLO_TEXT_PROJ = {"_class_name": "UnCLIPTextProjModel", "_diffusers_version": "0.11.0.dev0",
                   "clip_embeddings_dim": 768, "clip_extra_context_tokens": 4, "cross_attention_dim": 1536,
                   "time_embed_dim": 1280}


def _reference() -> HFTextProj:
    torch.manual_seed(0)
    ref = HFTextProj(**TINY).eval()
    with torch.no_grad():  # zero-initialised in diffusers; random so that the CFG branch is checked
        ref.learned_classifier_free_guidance_embeddings.normal_()
    return ref


def _inputs(cfg_guidance: bool, images: int = 3, tokens: int = 7):
    """image embeddings (B', C), prompt embeds and text states for B = 2 B' (CFG) or B' prompts."""
    rng = np.random.default_rng(0)
    c = TINY["clip_embeddings_dim"]
    b = 2 * images if cfg_guidance else images
    return (rng.standard_normal((images, c)).astype(np.float32), rng.standard_normal((b, c)).astype(np.float32),
            rng.standard_normal((b, tokens, c)).astype(np.float32))


def _load(backend: str, ref: HFTextProj, dtype: str = "float32"):
    cfg = TextProjConfig.from_hf_config(dict(ref.config))
    b = get_backend(backend, dtype=dtype)
    module = b.build(cfg.TYPE, cfg)
    b.load_weights(module, {k: v.numpy() for k, v in ref.state_dict().items()})
    return b, module


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cfg_guidance", [True, False])
def test_text_proj_matches_diffusers(backend, cfg_guidance):
    ref = _reference()
    image, prompt, states = _inputs(cfg_guidance)
    with torch.no_grad():
        context, time = ref(image_embeddings=torch.from_numpy(image), prompt_embeds=torch.from_numpy(prompt),
                            text_encoder_hidden_states=torch.from_numpy(states),
                            do_classifier_free_guidance=cfg_guidance)
    b, module = _load(backend, ref)
    got_context, got_time = b.run(module, image, prompt, states, cfg_guidance)  # the flag as a plain bool
    assert got_context.shape == (prompt.shape[0], 4 + 7, TINY["cross_attention_dim"])
    assert_close_to_scale(got_context, context.numpy(), REL["float32"], f"{backend} context")
    assert_close_to_scale(got_time, time.numpy(), REL["float32"], f"{backend} time embedding")
    # the flag as a 0-d array gives the same
    again = b.run(module, image, prompt, states, np.array(cfg_guidance))
    np.testing.assert_array_equal(again[0], got_context)


def _both(dtype: str, backend: str):
    b, module = _load(backend, _reference(), dtype)
    return b.run(module, *_inputs(True), True)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends installed")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mlx_matches_torch(dtype):
    for m, t, what in zip(_both(dtype, "mlx"), _both(dtype, "torch"), ("context", "time")):
        assert_close_to_scale(m, t, REL[dtype], f"mlx vs torch {what} {dtype}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_against_fp32(backend, dtype):
    for g, r, what in zip(_both(dtype, backend), _both("float32", "torch"), ("context", "time")):
        assert_close_to_scale(g, r, REL[dtype], f"{backend} {what} {dtype} vs fp32")


def test_from_hf_config_karlo():
    cfg = TextProjConfig.from_hf_config(KARLO_TEXT_PROJ)
    assert cfg == TextProjConfig(clip_embeddings_dim=768, time_embed_dim=1280, cross_attention_dim=1536,
                                 clip_extra_context_tokens=4)
    assert TextProjConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Dalle2Error, match="missing required key 'time_embed_dim'") as e:
        TextProjConfig.from_hf_config({"cross_attention_dim": 1536})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("backend", backend_params())
def test_karlo_size_names_shapes_and_count(backend):
    with torch.device("meta"):
        ref = HFTextProj(**{k: v for k, v in KARLO_TEXT_PROJ.items() if not k.startswith("_")})
    canonical = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = get_backend(backend).parameter_shapes("text_proj", TextProjConfig.from_hf_config(KARLO_TEXT_PROJ))
    assert shapes == canonical
    assert sum(int(np.prod(s)) for s in shapes.values()) == 7_878_400
