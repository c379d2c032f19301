"""CLIP towers: each backend against transformers on identical weights, and MLX against PyTorch.

fp32 bound (the brief): max |ours - reference| <= 1e-5 x max |reference|, checked on the projected embedding
and on the last hidden states. fp16 / bf16 bounds are what the towers reach here (stated in the README).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close_to_scale, backend_params
from transformers import CLIPTextConfig as HFText
from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers import CLIPVisionConfig as HFVision

from dalle2_portable.backends import get_backend
from dalle2_portable.clip import pool_positions
from dalle2_portable.spec import CLIPTextConfig, CLIPVisionConfig

# relative tolerance per compute dtype (fp16/bf16 measured: see README "Parity")
REL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=300,
            max_position_embeddings=77, projection_dim=24)
VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=48,
              patch_size=8, projection_dim=24)


def _load(backend: str, cfg, ref, dtype: str = "float32"):
    """(backend, module) with the reference module's weights loaded into our module for `cfg`."""
    b = get_backend(backend, dtype=dtype)
    module = b.build(cfg.TYPE, cfg)
    b.load_weights(module, {k: v.numpy() for k, v in ref.state_dict().items()})
    return b, module


def _ids(eos: int, rng: np.random.Generator, pad: int) -> np.ndarray:
    """(3, 77) ids as a tokenizer makes them: BOS, words, EOS, pads; sequences of different lengths."""
    ids = np.full((3, 77), pad, dtype=np.int64)
    for row, n in enumerate((5, 30, 75)):
        ids[row, 0] = eos - 1
        ids[row, 1:n + 1] = rng.integers(1, eos - 1, n)
        ids[row, n + 1] = eos
    return ids


def _text_reference(act: str, eos_token_id: int):
    torch.manual_seed(1)
    cfg = HFText(**TEXT, hidden_act=act, eos_token_id=eos_token_id, bos_token_id=298)
    return CLIPTextModelWithProjection(cfg).eval()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_rule", ["legacy_argmax", "eos_id"])
def test_text_tower_matches_transformers(backend, act, eos_rule):
    eos = 299
    ref = _text_reference(act, 2 if eos_rule == "legacy_argmax" else eos)
    # pads of 0 (Karlo) for the eos-id rule; pads equal to EOS (openai) for the argmax rule, where ties occur
    ids = _ids(eos, np.random.default_rng(0), pad=eos if eos_rule == "legacy_argmax" else 0)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids))
    cfg = CLIPTextConfig.from_hf_config(ref.config.to_dict())
    b, module = _load(backend, cfg, ref)
    embeds, states = b.run(module, ids, pool_positions(ids, cfg.eos_token_id))
    assert_close_to_scale(embeds, out.text_embeds.numpy(), REL["float32"], "text_embeds")
    assert_close_to_scale(states, out.last_hidden_state.numpy(), REL["float32"], "last_hidden_state")


def test_pool_positions_rules():
    ids = np.array([[49406, 5, 6, 49407, 49407, 49407], [49406, 7, 49407, 0, 0, 0]])
    np.testing.assert_array_equal(pool_positions(ids, 2), [3, 2])  # legacy: first argmax, ties -> first
    np.testing.assert_array_equal(pool_positions(ids, 49407), [3, 2])  # first EOS
    ids_extra = np.array([[49406, 49410, 5, 49407, 0]])  # an added token above EOS: only the eos-id rule finds EOS
    assert pool_positions(ids_extra, 2)[0] == 1 and pool_positions(ids_extra, 49407)[0] == 3


def _vision_reference(act: str):
    torch.manual_seed(2)
    return CLIPVisionModelWithProjection(HFVision(**VISION, hidden_act=act)).eval()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vision_tower_matches_transformers(backend, act):
    ref = _vision_reference(act)
    pixels = np.random.default_rng(3).standard_normal((2, 3, 48, 48)).astype(np.float32)
    with torch.no_grad():
        out = ref(torch.from_numpy(pixels))
    cfg = CLIPVisionConfig.from_hf_config(ref.config.to_dict())
    b, module = _load(backend, cfg, ref)
    embeds, states = b.run(module, pixels)
    assert_close_to_scale(embeds, out.image_embeds.numpy(), REL["float32"], "image_embeds")
    assert_close_to_scale(states, out.last_hidden_state.numpy(), REL["float32"], "last_hidden_state")


def _both_towers(dtype: str, backend: str):
    """(text embeds, image embeds) of the same weights and inputs on `backend` in `dtype`."""
    text_ref, vision_ref = _text_reference("quick_gelu", 2), _vision_reference("quick_gelu")
    ids = _ids(299, np.random.default_rng(0), pad=299)
    pixels = np.random.default_rng(3).standard_normal((2, 3, 48, 48)).astype(np.float32)
    out = []
    for ref, inputs in ((text_ref, (ids, pool_positions(ids, 2))), (vision_ref, (pixels,))):
        cfg_cls = CLIPTextConfig if ref is text_ref else CLIPVisionConfig
        b, module = _load(backend, cfg_cls.from_hf_config(ref.config.to_dict()), ref, dtype)
        out.append(b.run(module, *inputs)[0])
    return out


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends installed")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mlx_matches_torch(dtype):
    mlx_out, torch_out = _both_towers(dtype, "mlx"), _both_towers(dtype, "torch")
    for m, t, what in zip(mlx_out, torch_out, ("text", "image")):
        assert_close_to_scale(m, t, REL[dtype], f"mlx vs torch {what} {dtype}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_against_fp32_reference(backend, dtype):
    ref = _both_towers("float32", "torch")
    got = _both_towers(dtype, backend)
    for g, r, what in zip(got, ref, ("text", "image")):
        assert_close_to_scale(g, r, REL[dtype], f"{backend} {what} {dtype} vs fp32")
