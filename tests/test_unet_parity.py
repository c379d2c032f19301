"""The UNets: the decoder (diffusers `UNet2DConditionModel`) and the super-res UNet (`UNet2DModel`), each backend
against diffusers on identical weights, MLX against PyTorch in reduced precision, the config translators on
Karlo's real configs, and the Karlo-size trees (names, shapes, exact parameter counts) without allocating.

fp32 bound (the brief): max |ours - diffusers| <= 1e-5 x max |diffusers|. fp16 / bf16 bounds: see REL.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close_to_scale, backend_params
from diffusers import UNet2DConditionModel, UNet2DModel

from dalle2_portable.backends import get_backend
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.spec import UNet2DConditionConfig, UNet2DConfig
from dalle2_portable.modules.unet import decoder_attention_mask

# measured worst relative error (max abs diff / max abs reference), CPU, these inputs. fp32: decoder torch 8.5e-7,
# mlx 2.3e-6; super-res torch 0 (bit-identical), mlx 1.8e-6. Against fp32 / mlx vs torch in the same dtype:
# fp16 decoder torch 2.6e-3, mlx 2.9e-3, mlx-torch 2.3e-3; super-res 2.6e-3, 2.7e-3, 2.4e-3.
# bf16 decoder torch 1.5e-2, mlx 2.1e-2, mlx-torch 2.9e-2; super-res 1.6e-2, 2.2e-2, 2.5e-2 (8-bit mantissas
# through ~40 conv/norm layers). Bounds are those rounded up ~2x.
REL = {"float32": 1e-5, "float16": 6e-3, "bfloat16": 6e-2}

# Karlo's decoder layout at toy width: every block type, scale-shift, identity class embedding, 2 heads of 16.
TINY_DECODER = dict(
    in_channels=3, out_channels=6, block_out_channels=(32, 64, 96), layers_per_block=2, norm_num_groups=8,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
    attention_head_dim=16, cross_attention_dim=24, class_embed_type="identity", resnet_time_scale_shift="scale_shift",
    sample_size=16)
TINY_SUPER_RES = dict(
    in_channels=6, out_channels=3, block_out_channels=(32, 64, 96), layers_per_block=2, norm_num_groups=8,
    down_block_types=("ResnetDownsampleBlock2D",) * 3, up_block_types=("ResnetUpsampleBlock2D",) * 3,
    add_attention=False, attention_head_dim=8, sample_size=16)

# reference karlo-v1-alpha.md sections 5 and 6 (0.11 key sets; the files' "_class_name"/version keys included)
KARLO_DECODER = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.11.0.dev0", "act_fn": "silu",
    "attention_head_dim": 64, "block_out_channels": [320, 640, 960, 1280], "center_input_sample": False,
    "class_embed_type": "identity", "cross_attention_dim": 1536,
    "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                         "SimpleCrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 3, "layers_per_block": 3, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_class_embeds": None, "only_cross_attention": False, "out_channels": 6,
    "resnet_time_scale_shift": "scale_shift", "sample_size": 64,
    "up_block_types": ["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                       "ResnetUpsampleBlock2D"],
    "upcast_attention": False, "use_linear_projection": False}
KARLO_SUPER_RES = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.11.0.dev0", "act_fn": "silu", "add_attention": False,
    "attention_head_dim": 8, "block_out_channels": [320, 640, 960, 1280], "center_input_sample": False,
    "down_block_types": ["ResnetDownsampleBlock2D"] * 4, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 6, "layers_per_block": 3, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "out_channels": 3, "resnet_time_scale_shift": "default", "sample_size": 256,
    "time_embedding_type": "positional", "up_block_types": ["ResnetUpsampleBlock2D"] * 4}

KINDS = {"decoder": (UNet2DConditionModel, UNet2DConditionConfig, TINY_DECODER, KARLO_DECODER, 885_439_686),
         "super_res": (UNet2DModel, UNet2DConfig, TINY_SUPER_RES, KARLO_SUPER_RES, 691_579_523)}


def _hf_kwargs(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _reference(kind: str):
    """A tiny seeded diffusers UNet with every weight perturbed (diffusers zero-initialises none here, but the
    perturbation keeps norms and biases away from their 1/0 initial values, so that each one counts)."""
    torch.manual_seed(0)
    ref = KINDS[kind][0](**KINDS[kind][2]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def _load(backend: str, ref, dtype: str = "float32"):
    cfg = KINDS["decoder" if isinstance(ref, UNet2DConditionModel) else "super_res"][1].from_hf_config(dict(ref.config))
    b = get_backend(backend, dtype=dtype)
    module = b.build(cfg.TYPE, cfg)
    b.load_weights(module, {k: v.numpy() for k, v in ref.state_dict().items()})
    return b, module


def _decoder_inputs(batch: int = 2):
    """A sample, the context (7 tokens), the additive time embedding, a context mask with padding in row 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
    context = rng.standard_normal((batch, 7, 24)).astype(np.float32)
    class_labels = rng.standard_normal((batch, 128)).astype(np.float32)
    mask = np.ones((batch, 7), bool)
    mask[0, 4:] = False
    return x, context, class_labels, mask


def _super_res_input(batch: int = 2):
    return np.random.default_rng(1).standard_normal((batch, 6, 16, 16)).astype(np.float32)


TIMESTEPS = {"int_scalar": np.array(999, dtype=np.int64), "int_per_row": np.array([0, 700], dtype=np.int64),
             "float_per_row": np.array([3.25, 998.0], dtype=np.float32)}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("timestep", sorted(TIMESTEPS))
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no_mask"])
def test_decoder_matches_diffusers(backend, timestep, masked):
    ref = _reference("decoder")
    x, context, class_labels, mask = _decoder_inputs()
    t = TIMESTEPS[timestep]
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context),
                       class_labels=torch.from_numpy(class_labels),
                       attention_mask=torch.from_numpy(mask) if masked else None).sample.numpy()
    b, module = _load(backend, ref)
    (got,) = b.run(module, x, t, context, class_labels, decoder_attention_mask(mask) if masked else None)
    assert_close_to_scale(got, expected, REL["float32"], f"{backend} decoder {timestep}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("timestep", sorted(TIMESTEPS))
def test_super_res_matches_diffusers(backend, timestep):
    ref = _reference("super_res")
    x, t = _super_res_input(), TIMESTEPS[timestep]
    with torch.no_grad():
        expected = ref(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    b, module = _load(backend, ref)
    (got,) = b.run(module, x, t)
    assert_close_to_scale(got, expected, REL["float32"], f"{backend} super-res {timestep}")


def _run(kind: str, backend: str, dtype: str):
    b, module = _load(backend, _reference(kind), dtype)
    t = np.array([1, 999])
    if kind == "decoder":
        x, context, class_labels, mask = _decoder_inputs()
        return b.run(module, x, t, context, class_labels, decoder_attention_mask(mask))[0]
    return b.run(module, _super_res_input(), t)[0]


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends installed")
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mlx_matches_torch(kind, dtype):
    assert_close_to_scale(_run(kind, "mlx", dtype), _run(kind, "torch", dtype), REL[dtype],
                          f"mlx vs torch {kind} {dtype}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_against_fp32(backend, kind, dtype):
    assert_close_to_scale(_run(kind, backend, dtype), _run(kind, "torch", "float32"), REL[dtype],
                          f"{backend} {kind} {dtype} vs fp32")


@pytest.mark.parametrize("backend", backend_params())
def test_bad_input_is_one_line(backend):
    b, module = _load(backend, _reference("decoder"))
    x, context, class_labels, mask = _decoder_inputs()
    with pytest.raises(Dalle2Error, match="multiples of 4, got 18x16"):
        b.run(module, np.zeros((2, 3, 18, 16), np.float32), np.array(1), context, class_labels, None)
    with pytest.raises(Dalle2Error, match=r"expected \(batch, 3, height, width\)"):
        b.run(module, np.zeros((2, 4, 16, 16), np.float32), np.array(1), context, class_labels, None)
    with pytest.raises(Dalle2Error, match="class_labels .* is required"):
        b.run(module, x, np.array(1), context, None, None)


def test_from_hf_config_karlo():
    dec = UNet2DConditionConfig.from_hf_config(KARLO_DECODER)
    assert dec == UNet2DConditionConfig()  # our defaults are Karlo's decoder
    assert (dec.time_embed_dim, dec.downscale, dec.attention_head_dim) == (1280, 8, 64)
    sr = UNet2DConfig.from_hf_config(KARLO_SUPER_RES)
    assert sr == UNet2DConfig()
    assert UNet2DConfig.from_hf_config({**KARLO_SUPER_RES, "sample_size": None}).sample_size is None  # super_res_last
    for cfg in (dec, sr):
        assert type(cfg).from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kind,key,value", [
    ("decoder", "class_embed_type", "timestep"), ("decoder", "only_cross_attention", True),
    ("decoder", "resnet_time_scale_shift", "spatial"), ("decoder", "act_fn", "gelu"),
    ("decoder", "addition_embed_type", "text"), ("decoder", "attention_head_dim", [64, 64, 64, 64]),
    ("decoder", "mid_block_type", "UNetMidBlock2DCrossAttn"),
    ("decoder", "down_block_types", ["CrossAttnDownBlock2D"] * 4),
    ("super_res", "add_attention", True), ("super_res", "time_embedding_type", "fourier"),
    ("super_res", "up_block_types", ["AttnUpBlock2D"] * 4), ("super_res", "class_embed_type", "identity")])
def test_unsupported_variant_is_one_line(kind, key, value):
    _, config_cls, _, karlo, _ = KINDS[kind]
    with pytest.raises(Dalle2Error) as e:
        config_cls.from_hf_config({**karlo, key: value})
    msg = str(e.value)
    assert "\n" not in msg and key in msg and repr(value if not isinstance(value, list) else value[0]) in msg


def test_missing_keys_take_diffusers_defaults():
    """A key left out means diffusers' default (e.g. add_attention=True), not Karlo's value: an error here."""
    karlo = dict(KARLO_SUPER_RES)
    del karlo["add_attention"]
    with pytest.raises(Dalle2Error, match="add_attention=True"):
        UNet2DConfig.from_hf_config(karlo)
    karlo = dict(KARLO_DECODER)
    del karlo["mid_block_type"]
    with pytest.raises(Dalle2Error, match="mid_block_type='UNetMidBlock2DCrossAttn'"):
        UNet2DConditionConfig.from_hf_config(karlo)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_karlo_size_names_shapes_and_count(backend, kind):
    """At Karlo's size, without allocating: names/shapes are diffusers' and the counts are the Hub's."""
    hf_cls, config_cls, _, karlo, count = KINDS[kind]
    with torch.device("meta"):
        ref = hf_cls(**_hf_kwargs(karlo))
    canonical = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = get_backend(backend).parameter_shapes(config_cls.TYPE, config_cls.from_hf_config(karlo))
    assert shapes == canonical
    assert sum(int(np.prod(s)) for s in shapes.values()) == count
