"""The diffusion prior: each backend against diffusers' `PriorTransformer` on identical weights, MLX against
PyTorch in reduced precision, the config translator on Karlo's real config, and the Karlo-size tree.

fp32 bound (the brief): max |ours - diffusers| <= 1e-5 x max |diffusers|. fp16 / bf16 bounds are measured here
(worst seen over these tests, then rounded up about 2x: see REL).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close_to_scale, backend_params
from diffusers import PriorTransformer as HFPrior

from dalle2_portable.backends import get_backend
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.spec import PriorConfig
from dalle2_portable.modules.prior import prior_attention_mask, prior_text_inputs

# measured worst relative error (max abs diff / max abs reference), CPU, these inputs: fp32 mlx 1.6e-7 (torch is
# bit-identical to diffusers); fp16 torch 7.9e-4, mlx 8.9e-4, mlx vs torch 6.5e-4; bf16 torch 4.5e-3,
# mlx 4.5e-3, mlx vs torch 5.2e-3. Bounds are those rounded up ~2x.
REL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.2e-2}
TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16, num_embeddings=7)
# reference karlo-v1-alpha.md section 3, verbatim
KARLO_PRIOR = {"_class_name": "PriorTransformer", "_diffusers_version": "0.11.0.dev0", "additional_embeddings": 4,
               "attention_head_dim": 64, "dropout": 0.0, "embedding_dim": 768, "num_attention_heads": 32,
               "num_embeddings": 77, "num_layers": 20}


def _reference() -> HFPrior:
    """A tiny seeded diffusers prior; its zero-initialised parameters get random values so that they count."""
    torch.manual_seed(0)
    ref = HFPrior(**TINY).eval()
    with torch.no_grad():
        for name in ("positional_embedding", "prd_embedding", "clip_mean", "clip_std"):
            getattr(ref, name).normal_()
    return ref


def _inputs(batch: int = 3):
    """x_t, CLIP text embedding, text states, and a text mask with different padding per row (one full row)."""
    rng = np.random.default_rng(0)
    n, e = TINY["num_embeddings"], TINY["embedding_dim"]
    x = rng.standard_normal((batch, e)).astype(np.float32)
    proj = rng.standard_normal((batch, e)).astype(np.float32)
    states = rng.standard_normal((batch, n, e)).astype(np.float32)
    lengths = [3, n, 5, 1][:batch]
    mask = np.arange(n)[None, :] < np.array(lengths)[:, None]  # (B, N) bool, True = real token
    return x, proj, states, mask


def _load(backend: str, ref: HFPrior, dtype: str = "float32"):
    cfg = PriorConfig.from_hf_config(dict(ref.config))
    b = get_backend(backend, dtype=dtype)
    module = b.build(cfg.TYPE, cfg)
    b.load_weights(module, {k: v.numpy() for k, v in ref.state_dict().items()})
    return b, module


# timesteps as the pipeline passes them (a 0-d int64 from the scheduler's timesteps), per row, and float
TIMESTEPS = {
    "int_scalar": np.array(999, dtype=np.int64),
    "int_per_row": np.array([0, 500, 999], dtype=np.int64),
    "float_scalar": np.array(17.5, dtype=np.float32),
    "float_per_row": np.array([3.25, 250.0, 998.0], dtype=np.float32),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("timestep", sorted(TIMESTEPS))
def test_prior_matches_diffusers(backend, timestep):
    ref = _reference()
    x, proj, states, mask = _inputs()
    t = TIMESTEPS[timestep]
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(proj), torch.from_numpy(states),
                       attention_mask=torch.from_numpy(mask)).predicted_image_embedding.numpy()
    b, module = _load(backend, ref)
    (got,) = b.run(module, x, t, proj, states, prior_attention_mask(mask, 4))
    assert_close_to_scale(got, expected, REL["float32"], f"{backend} prior {timestep}")


@pytest.mark.parametrize("backend", backend_params())
def test_prior_without_mask_and_post_process(backend):
    """No text mask means no mask at all in diffusers (not even the causal one); post_process_latents too."""
    ref = _reference()
    x, proj, states, _ = _inputs(2)
    t = np.array(42, dtype=np.int64)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(proj),
                       torch.from_numpy(states)).predicted_image_embedding
        post = ref.post_process_latents(expected).numpy()
    b, module = _load(backend, ref)
    (got,) = b.run(module, x, t, proj, states, None)
    assert_close_to_scale(got, expected.numpy(), REL["float32"], f"{backend} prior without mask")
    (got_post,) = b.run(module.post_process_latents, expected.numpy())
    assert_close_to_scale(got_post, post, REL["float32"], f"{backend} post_process_latents")


@pytest.mark.parametrize("backend", backend_params())
def test_text_cut_after_the_last_real_token_matches_diffusers(backend):
    """prior_text_inputs cuts the padding no row attends to (rows of 3, 5 and 2 real tokens of 7: 5 kept); the
    prior on the cut inputs gives diffusers' output on the whole ones, and so does a batch of one short row."""
    ref = _reference()
    x, proj, states, _ = _inputs()
    mask = np.arange(TINY["num_embeddings"])[None, :] < np.array([3, 5, 2])[:, None]
    t = np.array(321, dtype=np.int64)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(proj), torch.from_numpy(states),
                       attention_mask=torch.from_numpy(mask)).predicted_image_embedding.numpy()
    cut, cut_mask = prior_text_inputs(states, mask)
    assert cut.shape[1] == 5 and cut_mask.shape == (3, 9, 9)
    kept = [0, 1, 2, 3, 4, 7, 8, 9, 10]  # of the whole mask's 7 text + 4 extra positions
    np.testing.assert_array_equal(cut_mask, prior_attention_mask(mask, 4)[:, kept][..., kept])
    b, module = _load(backend, ref)
    (got,) = b.run(module, x, t, proj, cut, cut_mask)
    assert_close_to_scale(got, expected, REL["float32"], f"{backend} prior, text cut after its last real token")
    (one,) = b.run(module, x[2:], t, proj[2:], *prior_text_inputs(states[2:], mask[2:]))  # 2 tokens of 7
    assert_close_to_scale(one, expected[2:], REL["float32"], f"{backend} prior, one row cut to 2 tokens")
    with pytest.raises(Dalle2Error, match="more than the 7"):
        b.run(module, x, t, proj, np.concatenate([states, states[:, :1]], axis=1), None)


def test_attention_mask_is_diffusers():
    """The NumPy mask equals the one diffusers builds inside forward (before repeating it per head)."""
    ref = _reference()
    _, _, _, mask = _inputs()
    m = (1 - torch.from_numpy(mask).float()) * -10000.0
    m = torch.nn.functional.pad(m, (0, ref.additional_embeddings), value=0.0)
    m = (m[:, None, :] + ref.causal_attention_mask).numpy()
    np.testing.assert_array_equal(prior_attention_mask(mask, 4), m)
    with pytest.raises(Dalle2Error, match="expected \\(batch, tokens\\)"):
        prior_attention_mask(mask[0], 4)


def _both(dtype: str, backend: str):
    ref = _reference()
    x, proj, states, mask = _inputs()
    b, module = _load(backend, ref, dtype)
    return b.run(module, x, np.array([1, 400, 999]), proj, states, prior_attention_mask(mask, 4))[0]


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends installed")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mlx_matches_torch(dtype):
    assert_close_to_scale(_both(dtype, "mlx"), _both(dtype, "torch"), REL[dtype], f"mlx vs torch prior {dtype}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_against_fp32(backend, dtype):
    assert_close_to_scale(_both(dtype, backend), _both("float32", "torch"), REL[dtype],
                          f"{backend} prior {dtype} vs fp32")


def test_from_hf_config_karlo():
    cfg = PriorConfig.from_hf_config(KARLO_PRIOR)
    assert cfg == PriorConfig(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768,
                              num_embeddings=77, additional_embeddings=4, time_embed_dim=2048,
                              embedding_proj_dim=768, clip_embed_dim=768)
    assert cfg.inner_dim == 2048 and cfg.sequence_length == 81
    assert PriorConfig.from_dict(cfg.to_dict()) == cfg
    # the re-saved form (diffusers 0.15+) writes the later keys out, with nulls for the derived sizes
    resaved = {**KARLO_PRIOR, "time_embed_act_fn": "silu", "norm_in_type": None, "embedding_proj_norm_type": None,
               "encoder_hid_proj_type": "linear", "added_emb_type": "prd", "time_embed_dim": None,
               "embedding_proj_dim": None, "clip_embed_dim": None}
    assert PriorConfig.from_hf_config(resaved) == cfg


@pytest.mark.parametrize("key,value", [("time_embed_act_fn", "gelu"), ("norm_in_type", "layer"),
                                       ("embedding_proj_norm_type", "layer"), ("encoder_hid_proj_type", None),
                                       ("added_emb_type", None), ("additional_embeddings", 3)])
def test_unsupported_prior_variant_is_one_line(key, value):
    with pytest.raises(Dalle2Error) as e:
        PriorConfig.from_hf_config({**KARLO_PRIOR, key: value})
    msg = str(e.value)
    assert "\n" not in msg and f"{key}={value!r}" in msg


@pytest.mark.parametrize("backend", backend_params())
def test_karlo_size_names_shapes_and_count(backend):
    """At Karlo's size, without allocating: our names/shapes are diffusers' and the count is 1,022,030,080."""
    with torch.device("meta"):
        ref = HFPrior(**{k: v for k, v in KARLO_PRIOR.items() if not k.startswith("_")})
    canonical = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = get_backend(backend).parameter_shapes("prior", PriorConfig.from_hf_config(KARLO_PRIOR))
    assert shapes == canonical
    assert sum(int(np.prod(s)) for s in shapes.values()) == 1_022_030_080
