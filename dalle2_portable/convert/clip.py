"""transformers CLIP layouts -> the model directory's text_encoder / image_encoder components.

Reads `config.json` of a full `CLIPModel` (both towers) or of the single-tower classes
(`CLIPTextModelWithProjection`, `CLIPVisionModelWithProjection`), the weights (`model.safetensors`, sharded or
not, else `pytorch_model.bin`), the tokenizer and `preprocessor_config.json`. Parameter names are kept as they
are (they are our canonical names); only buffers the module tree does not have are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import store
from ..errors import Dalle2Error
from ..spec import CLIPTextConfig, CLIPVisionConfig, Component, ImageProcessorConfig, ModelSpec, Source
from ..tokenizers import tokenizer_config_from_hf, write_tokenizer_files
from .weights import Checkpoint, write_component

LAYOUT = "transformers-clip"
# What a CLIP repo needs downloaded besides its weights (see `convert.fetch`).
CONFIG_PATTERNS = ["config.json", "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.json"]


def weight_folders(folder: Path) -> dict[str, tuple[str, str]]:
    """{subfolder: (safetensors stem, .bin stem)}: the repo root, transformers' file names."""
    return {"": ("model", "pytorch_model")}

# Buffers older checkpoints saved that are not parameters (transformers registers them non-persistent now).
_DROPPED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

# model_type in config.json -> which towers it holds
_TOWERS = {"clip": ("text", "vision"), "clip_text_model": ("text",), "clip_vision_model": ("vision",)}
_PREFIXES = {"text": ("text_model.", "text_projection."), "vision": ("vision_model.", "visual_projection.")}
_NAMES = {"text": "text_encoder", "vision": "image_encoder"}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Dalle2Error(f"{str(path)!r} is missing; the source folder is incomplete, download it again") from None
    except (OSError, ValueError) as e:
        raise Dalle2Error(f"cannot read {str(path)!r} ({e}); download it again") from None


def clip_configs(config: dict, where: str) -> dict[str, CLIPTextConfig | CLIPVisionConfig]:
    """{component name: config} for the towers a transformers CLIP config.json describes."""
    model_type = config.get("model_type")
    if model_type not in _TOWERS:
        raise Dalle2Error(f"{where}: model_type {model_type!r} is not a CLIP model; supported: "
                          f"{', '.join(_TOWERS)}")
    arch = (config.get("architectures") or [""])[0]
    if arch in ("CLIPTextModel", "CLIPVisionModel"):
        raise Dalle2Error(f"{where}: {arch} has no projection layer, so it has no CLIP embedding; use the "
                          f"{arch}WithProjection or CLIPModel checkpoint")
    if model_type == "clip":
        # CLIPModel builds both projections with the top-level projection_dim (default 512).
        proj = config.get("projection_dim", 512)
        return {"text_encoder": CLIPTextConfig.from_hf_config(config.get("text_config") or {}, proj),
                "image_encoder": CLIPVisionConfig.from_hf_config(config.get("vision_config") or {}, proj)}
    if model_type == "clip_text_model":
        return {"text_encoder": CLIPTextConfig.from_hf_config(config)}
    return {"image_encoder": CLIPVisionConfig.from_hf_config(config)}


def write_clip_components(src: Path, out: Path, dtype: str, variant: str | None = None) -> tuple[dict, dict]:
    """Convert the CLIP checkpoint in `src` into component files in `out`.

    Returns ({name: Component}, extra defaults such as CLIP's logit_scale). Every tensor is checked against
    the config's expected names and shapes before the file is written.
    """
    configs = clip_configs(read_json(src / "config.json"), str(src / "config.json"))
    ckpt = Checkpoint(src, "model", bin_stem="pytorch_model", variant=variant)
    names = [n for n in ckpt.names() if n not in _DROPPED]
    defaults = {}
    if "logit_scale" in names:  # CLIPModel's temperature: a scalar, kept as a number for similarity scores
        defaults["clip_logit_scale"] = float(ckpt.get("logit_scale").reshape(()))
        names.remove("logit_scale")
    components = {}
    claimed: set[str] = set()
    for name, config in configs.items():
        tower = "text" if name == "text_encoder" else "vision"
        mine = [n for n in names if n.startswith(_PREFIXES[tower])]
        claimed.update(mine)
        filename = f"{name}.safetensors"
        write_component(ckpt, mine, config, out / filename, dtype)
        components[name] = Component(config.TYPE, config, filename)
    stray = [n for n in names if n not in claimed]
    if stray:
        raise Dalle2Error(f"{str(ckpt.files[0])!r} has tensor {stray[0]!r} that belongs to no CLIP tower; is "
                          "this a CLIP checkpoint?")
    return components, defaults


def convert_clip(src: Path, out: Path, source: Source, dtype: str, variant: str | None = None) -> ModelSpec:
    """A transformers CLIP folder -> a complete model directory's content in `out` (which the caller made)."""
    components, defaults = write_clip_components(src, out, dtype, variant)
    tokenizer = None
    if "text_encoder" in components:
        tokenizer = tokenizer_config_from_hf(src)
        write_tokenizer_files(src, out / "tokenizer", tokenizer)
    processor = None
    if "image_encoder" in components:
        pre = src / "preprocessor_config.json"
        processor = ImageProcessorConfig.from_hf_config(read_json(pre)) if pre.is_file() else ImageProcessorConfig()
    spec = ModelSpec(source=source, components=components, tokenizer=tokenizer, image_processor=processor,
                     defaults=defaults)
    store.write_spec(out, spec)
    return spec
