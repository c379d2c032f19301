"""spec.py: config translators from the reference formats, JSON round trips, one-line errors."""

import inspect

import numpy as np
import pytest
from diffusers import UnCLIPImageVariationPipeline, UnCLIPPipeline

from dalle2_portable.errors import Dalle2Error
from dalle2_portable.spec import (STAGES, CLIPTextConfig, CLIPVisionConfig, ImageProcessorConfig, ModelSpec,
                                  PipelineDefaults, TokenizerConfig)


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


def test_pipeline_defaults_are_diffusers_call_defaults():
    """PipelineDefaults() is what UnCLIPPipeline and UnCLIPImageVariationPipeline use when a call sets nothing."""
    d = PipelineDefaults()
    for cls, stages in ((UnCLIPPipeline, STAGES), (UnCLIPImageVariationPipeline, STAGES[1:])):
        params = inspect.signature(cls.__call__).parameters
        for s in stages:
            assert getattr(d, f"{s}_steps") == params[f"{s}_num_inference_steps"].default
            assert getattr(d, f"{s}_guidance", None) == getattr(params.get(f"{s}_guidance_scale"), "default", None)
    assert [PipelineDefaults.options(s) for s in STAGES] == [("steps", "guidance", "sampler")] * 2 + [
        ("steps", "sampler")]


# model.json "defaults" as the converters before PipelineDefaults wrote them: Karlo, Karlo variations, CLIPModel
LEGACY_DEFAULTS = [
    dict(prior_steps=25, decoder_steps=25, super_res_steps=7, prior_guidance=4.0, decoder_guidance=8.0,
         decoder_sample_size=64, super_res_sample_size=256),
    dict(decoder_steps=25, super_res_steps=7, decoder_guidance=8.0, decoder_sample_size=64,
         super_res_sample_size=256),
    dict(clip_logit_scale=4.6052),
    {},
]


@pytest.mark.parametrize("legacy", LEGACY_DEFAULTS)
def test_model_json_defaults_load_and_round_trip(legacy):
    d = {"format": 1, "source": {"repo": "x"}, "components": {}, "defaults": legacy}
    spec = ModelSpec.from_dict(d)
    assert {k: getattr(spec.defaults, k) for k in legacy} == legacy
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_dict({**d, "defaults": None}).defaults == PipelineDefaults()


@pytest.mark.parametrize("bad,match", [
    (dict(super_res_guidance=4.0), "unknown key 'super_res_guidance' in a defaults config"),
    (dict(prior_steps="25"), "prior_steps must be an integer, got '25'"),
    (dict(decoder_steps=True), "decoder_steps must be an integer, got True"),
    (dict(decoder_guidance="8"), "decoder_guidance must be a finite number, got '8'"),
    (dict(super_res_sampler=None), "super_res_sampler must be a string, got None"),
])
def test_model_json_defaults_are_strict(bad, match):
    with pytest.raises(Dalle2Error, match=match) as e:
        ModelSpec.from_dict({"format": 1, "source": {"repo": "x"}, "components": {}, "defaults": bad})
    assert "\n" not in str(e.value)


def test_pipeline_defaults_types_and_override():
    d = PipelineDefaults(prior_steps=np.int64(5), decoder_guidance=2, clip_logit_scale=np.float32(1.5))
    assert type(d.prior_steps) is int and type(d.decoder_guidance) is float and d.decoder_guidance == 2.0
    assert type(d.clip_logit_scale) is float
    assert d.stage("super_res") == {"steps": 7, "sampler": "ancestral"}
    new = d.override(STAGES[1:], {"decoder_steps": 9, "super_res_sampler": "ddim", "decoder_guidance": None})
    assert (new.decoder_steps, new.super_res_sampler, new.decoder_guidance, new.prior_steps) == (9, "ddim", 2.0, 5)
    with pytest.raises(Dalle2Error, match="unknown option 'super_res_guidance' here; the options are "
                                          "decoder_guidance, decoder_sampler, decoder_steps, super_res_sampler, "
                                          "super_res_steps$"):
        d.override(STAGES[1:], {"super_res_guidance": 50})
    with pytest.raises(Dalle2Error, match="unknown option 'prior_steps'"):
        d.override(STAGES[1:], {"prior_steps": 3})
