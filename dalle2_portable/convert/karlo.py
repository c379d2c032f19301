"""diffusers unCLIP layouts (kakaobrain/karlo-v1-alpha, kakaobrain/karlo-v1-alpha-image-variations) -> one model
directory with every component, the schedulers, the tokenizer and the pipeline's defaults.

The layout (reference karlo-v1-alpha.md sections 1-2, 12): `model_index.json` names one subfolder per component;
diffusers models hold `config.json` + `diffusion_pytorch_model[.variant].safetensors` (or `.bin`), transformers
models `config.json` + `model[.variant].safetensors` (or `pytorch_model.bin`), schedulers `scheduler_config.json`.
diffusers' parameter names are our canonical names, so each tensor is copied as it is, streamed one at a time.
"""

from __future__ import annotations

from pathlib import Path

from .. import store
from ..errors import Dalle2Error
from ..spec import (COMPONENT_NAMES, Component, ImageProcessorConfig, ModelSpec, PipelineDefaults, PriorConfig,
                    SchedulerConfig, Source, TextProjConfig, UNet2DConditionConfig, UNet2DConfig)
from .files import read_json, tokenizer_config_from_hf, write_clip_components, write_tokenizer_files
from .weights import Checkpoint, write_component

LAYOUT = "diffusers-unclip"
DIFFUSERS_STEM = "diffusion_pytorch_model"

# model_index.json `_class_name` -> the entries the pipeline needs. Anything else listed (a safety checker, say)
# is ignored.
PIPELINES = {
    "UnCLIPPipeline": ("text_encoder", "tokenizer", "prior", "text_proj", "decoder", "super_res_first",
                       "super_res_last", "prior_scheduler", "decoder_scheduler", "super_res_scheduler"),
    "UnCLIPImageVariationPipeline": ("text_encoder", "tokenizer", "image_encoder", "feature_extractor", "text_proj",
                                     "decoder", "super_res_first", "super_res_last", "decoder_scheduler",
                                     "super_res_scheduler"),
}
# entry -> the classes model_index.json may name for it (transformers 5 re-saves CLIPImageProcessor as ...Pil)
CLASSES = {
    "prior": ("PriorTransformer",), "text_proj": ("UnCLIPTextProjModel",), "decoder": ("UNet2DConditionModel",),
    "super_res_first": ("UNet2DModel",), "super_res_last": ("UNet2DModel",),
    "text_encoder": ("CLIPTextModelWithProjection",), "image_encoder": ("CLIPVisionModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "feature_extractor": ("CLIPImageProcessor", "CLIPImageProcessorPil", "CLIPImageProcessorFast",
                          "CLIPFeatureExtractor"),
    "prior_scheduler": ("UnCLIPScheduler",), "decoder_scheduler": ("UnCLIPScheduler",),
    "super_res_scheduler": ("UnCLIPScheduler",),
}
DIFFUSERS_MODELS = {"prior": PriorConfig, "text_proj": TextProjConfig, "decoder": UNet2DConditionConfig,
                    "super_res_first": UNet2DConfig, "super_res_last": UNet2DConfig}
TRANSFORMERS_MODELS = ("text_encoder", "image_encoder")

CONFIG_PATTERNS = ["model_index.json", "*/config.json", "*/scheduler_config.json", "*/preprocessor_config.json",
                   "tokenizer/*.json", "tokenizer/merges.txt"]


def read_index(folder: Path) -> tuple[str, dict]:
    """A diffusers folder's model_index.json: (its pipeline `_class_name`, which must be one we convert; the
    index)."""
    index = read_json(folder / "model_index.json")
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in PIPELINES:
        raise Dalle2Error(f"{str(folder / 'model_index.json')!r}: pipeline {name!r} is not supported; supported: "
                          f"{', '.join(PIPELINES)}")
    return name, index


def weight_folders(folder: Path) -> dict[str, tuple[str, str]]:
    """{subfolder: (safetensors stem, .bin stem)} of the components with weights (what to download)."""
    needed = PIPELINES[read_index(folder)[0]]
    out = {n: (DIFFUSERS_STEM, DIFFUSERS_STEM) for n in DIFFUSERS_MODELS if n in needed}
    out.update({n: ("model", "pytorch_model") for n in TRANSFORMERS_MODELS if n in needed})
    return out


def _check_index(src: Path) -> tuple[str, tuple[str, ...]]:
    """The pipeline class and its entries, each listed with an expected class and present as a subfolder."""
    name, index = read_index(src)
    needed = PIPELINES[name]
    for entry in needed:
        listed = index.get(entry)
        if not (isinstance(listed, list) and len(listed) == 2):
            raise Dalle2Error(f"{str(src / 'model_index.json')!r} has no {entry!r} entry, which {name} needs; "
                              "is this a complete unCLIP pipeline?")
        if listed[1] not in CLASSES[entry]:
            raise Dalle2Error(f"{str(src / 'model_index.json')!r}: {entry} is a {listed[1]}; supported: "
                              f"{', '.join(CLASSES[entry])}")
        if not (src / entry).is_dir():
            raise Dalle2Error(f"{str(src)!r} is missing the subfolder {entry!r} that model_index.json lists; the "
                              "download is incomplete: download the repo again")
    return name, needed


def convert_karlo(src: Path, out: Path, source: Source, dtype: str, variant: str | None = None) -> ModelSpec:
    """A diffusers unCLIP folder -> a complete model directory's content in `out` (which the caller made).

    Every config is read and checked first (an unsupported block type fails before a byte is written), then
    each component's tensors are checked against its config's shapes and streamed into `<name>.safetensors`."""
    _, needed = _check_index(src)
    configs = {n: cls.from_hf_config(read_json(src / n / "config.json"))
               for n, cls in DIFFUSERS_MODELS.items() if n in needed}
    schedulers = {n.removesuffix("_scheduler"): SchedulerConfig.from_hf_config(
        read_json(src / n / "scheduler_config.json"), str(src / n / "scheduler_config.json"))
        for n in needed if n.endswith("_scheduler")}
    tokenizer = tokenizer_config_from_hf(src / "tokenizer")
    processor = None
    if "feature_extractor" in needed:
        processor = ImageProcessorConfig.from_hf_config(read_json(src / "feature_extractor" /
                                                                  "preprocessor_config.json"))
    components: dict[str, Component] = {}
    for tower in TRANSFORMERS_MODELS:
        if tower in needed:
            towers, _ = write_clip_components(src / tower, out, dtype, variant)
            if set(towers) != {tower}:
                raise Dalle2Error(f"{str(src / tower / 'config.json')!r} does not describe the {tower} alone")
            components.update(towers)
    for n, config in configs.items():
        ckpt = Checkpoint(src / n, DIFFUSERS_STEM, variant=variant)
        write_component(ckpt, ckpt.names(), config, out / f"{n}.safetensors", dtype)
        components[n] = Component(config.TYPE, config, f"{n}.safetensors")
    write_tokenizer_files(src / "tokenizer", out / "tokenizer", tokenizer)
    # both pipelines' `__call__` defaults are PipelineDefaults' (a variations model has no prior to use its own)
    defaults = PipelineDefaults(decoder_sample_size=configs["decoder"].sample_size,
                                super_res_sample_size=configs["super_res_first"].sample_size)
    components = {k: components[k] for k in sorted(components, key=COMPONENT_NAMES.index)}  # the flow's order
    spec = ModelSpec(source=source, components=components, tokenizer=tokenizer, image_processor=processor,
                     schedulers=schedulers, defaults=defaults)
    store.write_spec(out, spec)
    return spec
