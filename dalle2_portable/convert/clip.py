"""transformers CLIP layouts -> the model directory's text_encoder / image_encoder components.

A full `CLIPModel` (both towers) or one of the single-tower classes (`CLIPTextModelWithProjection`,
`CLIPVisionModelWithProjection`): the towers are read by `files.write_clip_components` (shared with Karlo's
encoder subfolders), then the tokenizer and `preprocessor_config.json`.
"""

from __future__ import annotations

from pathlib import Path

from .. import store
from ..spec import ImageProcessorConfig, ModelSpec, PipelineDefaults, Source
from .files import read_json, tokenizer_config_from_hf, write_clip_components, write_tokenizer_files

LAYOUT = "transformers-clip"
# What a CLIP repo needs downloaded besides its weights (see `convert.fetch`).
CONFIG_PATTERNS = ["config.json", "preprocessor_config.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.json"]


def weight_folders(folder: Path) -> dict[str, tuple[str, str]]:
    """{subfolder: (safetensors stem, .bin stem)}: the repo root, transformers' file names."""
    return {"": ("model", "pytorch_model")}


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
                     defaults=PipelineDefaults(**defaults))
    store.write_spec(out, spec)
    return spec
