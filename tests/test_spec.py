"""spec.py: config translators from the reference formats, JSON round trips, one-line errors."""

import pytest

from dalle2_portable.errors import Dalle2Error
from dalle2_portable.spec import CLIPTextConfig, CLIPVisionConfig, ImageProcessorConfig, ModelSpec, TokenizerConfig


def test_legacy_openai_config_dicts():
    """openai/clip-* config.json (transformers 4.16 dump): the *_config_dict values win."""
    text = {"hidden_size": 512, "eos_token_id": 2, "num_beams": 1, "text_config_dict": {"hidden_size": 768}}
    cfg = CLIPTextConfig.from_hf_config(text, projection_dim=768)
    assert cfg.hidden_size == 768 and cfg.projection_dim == 768 and cfg.eos_token_id == 2
    vision = {"vision_config_dict": {"hidden_size": 1024, "patch_size": 14, "num_hidden_layers": 24,
                                     "num_attention_heads": 16, "intermediate_size": 4096}}
    v = CLIPVisionConfig.from_hf_config(vision, projection_dim=768)
    assert v.num_positions == 257 and v.head_dim == 64


def test_round_trip_and_strict_keys():
    cfg = CLIPVisionConfig(hidden_size=64, num_attention_heads=4, image_size=48, patch_size=8, hidden_act="gelu")
    assert CLIPVisionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Dalle2Error, match="unknown key 'hidden_sise'"):
        CLIPTextConfig.from_dict({"hidden_sise": 3})


@pytest.mark.parametrize("bad,match", [
    (dict(hidden_act="relu"), "unsupported hidden_act='relu'"),
    (dict(hidden_size=30, num_attention_heads=4), "not divisible"),
])
def test_unsupported_values_name_key_and_value(bad, match):
    with pytest.raises(Dalle2Error, match=match) as e:
        CLIPTextConfig(**bad)
    assert "\n" not in str(e.value)


def test_image_processor_both_forms():
    legacy = ImageProcessorConfig.from_hf_config({"size": 224, "crop_size": 224, "resample": 3})
    current = ImageProcessorConfig.from_hf_config({"size": {"shortest_edge": 224},
                                                   "crop_size": {"height": 224, "width": 224}})
    assert legacy == current == ImageProcessorConfig()
    with pytest.raises(Dalle2Error, match="unsupported size"):
        ImageProcessorConfig.from_hf_config({"size": {"height": 224, "width": 224}})


def test_model_spec_rejects_unknown_format_and_component():
    with pytest.raises(Dalle2Error, match="unknown format None"):
        ModelSpec.from_dict({})
    d = {"format": 1, "source": {"repo": "x"}, "components": {"text_encoder": {"type": "clip_text",
                                                                               "config": {}, "weights": "t"}}}
    assert ModelSpec.from_dict(d).components["text_encoder"].config == CLIPTextConfig()
    d["components"]["text_encoder"]["type"] = "resnet"
    with pytest.raises(Dalle2Error, match="unsupported type='resnet'"):
        ModelSpec.from_dict(d)
    with pytest.raises(Dalle2Error, match="unsupported tokenizer kind"):
        TokenizerConfig(kind="wordpiece")
