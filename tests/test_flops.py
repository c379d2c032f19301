"""benchmarks/flops.py, the FLOP counter of benchmarks/cascade.py: counted from our configs, it must equal what
torch's FlopCounterMode counts when diffusers' and transformers' own modules run (same convention: 2 FLOPs per
multiply-add of convolutions, linears and attention matmuls), at a tiny size and at Karlo's, where it must give
issue 15's figures. The modules run on the meta device (no weights, no arithmetic): ~3 s, most of it
importing diffusers."""

import sys
from pathlib import Path

import pytest

from builders import KARLO, TINY_KARLO, TINY_TEXT

from dalle2_portable.spec import CLIPTextConfig, PriorConfig, UNet2DConditionConfig, UNet2DConfig

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
flop_counter = pytest.importorskip("torch.utils.flop_counter")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from flops import clip_text_flops, prior_flops, unet_flops  # noqa: E402


def counted(module, *args, **kwargs) -> int:
    with flop_counter.FlopCounterMode(display=False) as mode:
        module(*args, **kwargs)
    return mode.get_total_flops()


def reference(sizes: dict) -> dict[str, tuple[int, int]]:
    """{component: (FlopCounterMode's count on diffusers / transformers, ours from the config)}."""
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig as HFTextConfig, CLIPTextModelWithProjection

    out = {}
    with torch.device("meta"):
        dec = UNet2DConditionModel(**sizes["decoder"])
        px, ctx, temb = dec.config.sample_size, dec.config.cross_attention_dim, 4 * dec.config.block_out_channels[0]
        mask = torch.ones(2, 81, dtype=torch.bool)
        mask[0, 10:] = False
        theirs = counted(dec, torch.randn(2, 3, px, px), torch.tensor(957), encoder_hidden_states=torch.randn(
            2, 81, ctx), class_labels=torch.randn(2, temb), attention_mask=mask)
        out["decoder"] = theirs, unet_flops(UNet2DConditionConfig.from_hf_config(dict(dec.config)), 2, px, 81)

        sr = UNet2DModel(**sizes["super_res"])
        px = sr.config.sample_size
        theirs = counted(sr, torch.randn(1, 6, px, px), torch.tensor(832))
        out["super_res"] = theirs, unet_flops(UNet2DConfig.from_hf_config(dict(sr.config)), 1, px)

        prior = PriorTransformer(**sizes["prior"])
        c = prior.config
        theirs = counted(prior, torch.randn(2, c.embedding_dim), timestep=torch.tensor(957),
                         proj_embedding=torch.randn(2, c.embedding_dim),
                         encoder_hidden_states=torch.randn(2, c.num_embeddings, c.embedding_dim),
                         attention_mask=torch.ones(2, c.num_embeddings, dtype=torch.bool))
        out["prior"] = theirs, prior_flops(PriorConfig.from_hf_config(dict(c)), 2)

        text = {**TINY_TEXT, "projection_dim": 16, **sizes.get("text", {})}
        clip = CLIPTextModelWithProjection(HFTextConfig(**text))
        theirs = counted(clip, torch.zeros(1, 77, dtype=torch.long))
        out["text"] = theirs, clip_text_flops(CLIPTextConfig(**text), 1)
    return out


def test_the_counter_is_flop_counter_mode_on_the_reference_modules():
    for name, (theirs, ours) in reference(TINY_KARLO).items():
        assert ours == theirs, name


def test_karlo_size_gives_the_issue_figures():
    got = reference(KARLO)
    for name, (theirs, ours) in got.items():
        assert ours == theirs, name
    # issue 15: decoder step with guidance 1.22 TFLOP, super-res step 8.50, prior step with guidance 0.33
    assert round(got["decoder"][1] / 1e12, 2) == 1.22
    assert round(got["super_res"][1] / 1e12, 2) == 8.50
    assert round(got["prior"][1] / 1e12, 2) == 0.33


def test_a_hand_count():
    """One CLIP text layer by hand: q/k/v/out 4 x 2 L h^2, attention 2 x 2 L^2 h, MLP 2 x 2 L h i; + projection."""
    cfg = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         projection_dim=4)
    L, h, i = 77, 8, 16
    assert clip_text_flops(cfg, 1) == 4 * 2 * L * h * h + 2 * 2 * L * L * h + 2 * 2 * L * h * i + 2 * h * 4
