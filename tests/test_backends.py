"""The Backend contract: identical module trees and canonical names on both backends, the auto rule, and
`import dalle2_portable` with only one backend installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import BACKENDS

from dalle2_portable import backends
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.spec import (COMPONENT_TYPES, CLIPTextConfig, CLIPVisionConfig, PriorConfig, TextProjConfig,
                                  UNet2DConditionConfig, UNet2DConfig)


def _hf_text(cfg):
    from transformers import CLIPTextConfig as C, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(C(**cfg.to_dict()))


def _hf_vision(cfg):
    from transformers import CLIPVisionConfig as C, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(C(**cfg.to_dict()))


def _hf_prior(cfg):
    from diffusers import PriorTransformer

    return PriorTransformer(num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
                            num_layers=cfg.num_layers, embedding_dim=cfg.embedding_dim,
                            num_embeddings=cfg.num_embeddings, additional_embeddings=cfg.additional_embeddings,
                            time_embed_dim=cfg.time_embed_dim, embedding_proj_dim=cfg.embedding_proj_dim,
                            clip_embed_dim=cfg.clip_embed_dim)


def _hf_text_proj(cfg):
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel

    return UnCLIPTextProjModel(**cfg.to_dict())


def _hf_unet(cfg):
    from diffusers import UNet2DConditionModel, UNet2DModel

    d = {k: v for k, v in cfg.to_dict().items() if k != "time_embed_dim"}
    if cfg.TYPE == "unet2d":
        return UNet2DModel(**d, add_attention=False, time_embedding_dim=cfg.time_embed_dim)
    return UNet2DConditionModel(**d, time_embedding_dim=cfg.time_embed_dim)


# Every component type: a tiny config and the reference module whose state_dict names are the canonical names.
# A new component type must be added here (the first test fails until it is).
TINY = {
    "clip_text": (CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=12, projection_dim=8), _hf_text),
    "clip_vision": (CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=16, patch_size=4, projection_dim=8),
                    _hf_vision),
    # time/embedding_proj/clip widths differ from inner_dim and embedding_dim so that each size is checked
    "prior": (PriorConfig(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12,
                          num_embeddings=7, time_embed_dim=20, embedding_proj_dim=10, clip_embed_dim=14),
              _hf_prior),
    "text_proj": (TextProjConfig(clip_embeddings_dim=16, time_embed_dim=32, cross_attention_dim=24,
                                 clip_extra_context_tokens=4), _hf_text_proj),
    # time_embed_dim is not 4x the first width, so that its own size is checked
    "unet2d_condition": (UNet2DConditionConfig(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
        cross_attention_dim=12, time_embed_dim=40, sample_size=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D")), _hf_unet),
    "unet2d": (UNet2DConfig(block_out_channels=(16, 24), layers_per_block=1, norm_num_groups=8, time_embed_dim=40,
                            down_block_types=("ResnetDownsampleBlock2D",) * 2,
                            up_block_types=("ResnetUpsampleBlock2D",) * 2), _hf_unet),
}


def test_every_component_type_is_covered():
    assert set(TINY) == set(COMPONENT_TYPES)


def _class_tree(backend_name: str, module) -> dict[str, str]:
    """{module path: class name} of our own classes, modules/' (framework layers and containers like ModuleList
    left out, and so the MLX facade's Linear / Conv2d, nn.Linear / nn.Conv2d computing in their weight's dtype)."""
    mods = module.named_modules()
    if backend_name == "torch":
        mods = list(mods)
    return {name: type(m).__name__ for name, m in mods if type(m).__module__.startswith("dalle2_portable.modules")}


@pytest.mark.parametrize("ctype", sorted(TINY))
def test_names_and_shapes_identical_across_backends_and_canonical(ctype):
    cfg, reference = TINY[ctype]
    canonical = {k: tuple(v.shape) for k, v in reference(cfg).state_dict().items() if not k.endswith("position_ids")}
    trees = {}
    for name in BACKENDS:
        b = backends.get_backend(name)
        assert b.parameter_shapes(ctype, cfg) == canonical, name
        module = b.build(ctype, cfg)
        assert {k: v.shape for k, v in b.state_dict(module).items()} == canonical, name
        trees[name] = _class_tree(name, module)
    if len(trees) == 2:
        assert trees["torch"] == trees["mlx"]


def test_auto_rule(monkeypatch):
    monkeypatch.delenv("DALLE2_BACKEND", raising=False)
    monkeypatch.setattr(backends, "installed", lambda: ["torch", "mlx"])
    monkeypatch.setattr(backends, "_is_apple_silicon", lambda: True)
    assert backends.auto_backend() == "mlx"
    monkeypatch.setattr(backends, "_is_apple_silicon", lambda: False)
    assert backends.auto_backend() == "torch"  # CUDA, or the faster CPU backend (README: "Choosing a backend")
    monkeypatch.setattr(backends, "installed", lambda: ["mlx"])
    assert backends.auto_backend() == "mlx"
    monkeypatch.setattr(backends, "installed", lambda: [])
    with pytest.raises(Dalle2Error, match="no backend is installed"):
        backends.auto_backend()


def test_bad_backend_device_dtype_are_one_line():
    with pytest.raises(Dalle2Error, match="unknown backend 'jax'"):
        backends.get_backend("jax")
    if "torch" in BACKENDS:
        with pytest.raises(Dalle2Error, match="unknown dtype"):
            backends.get_backend("torch", dtype="float8")
        with pytest.raises(Dalle2Error, match="not available on this machine|unknown torch device"):
            backends.get_backend("torch", device="cuda:7" if not _has_cuda() else "tpu")


def _has_cuda():
    import torch

    return torch.cuda.is_available()


_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {blocked!r} or name.startswith({blocked!r} + "."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends to hide one")
@pytest.mark.parametrize("blocked,other", [("torch", "mlx"), ("mlx", "torch")])
def test_import_with_one_backend(blocked, other):
    code = _BLOCK.format(blocked=blocked) + textwrap.dedent(f"""
        import dalle2_portable as d2
        assert d2.installed_backends() == [{other!r}], d2.installed_backends()
        assert d2.get_backend("auto").name == {other!r}
        try:
            d2.get_backend({blocked!r})
        except d2.Dalle2Error as e:
            print("ERR", e)
        assert {blocked!r} not in sys.modules
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"backend '{blocked}' is not installed" in r.stdout
