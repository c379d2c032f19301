"""Training from nothing: what the CLIP stage needs from a base model when there is none.

`dalle2 train clip --data shapes --out RUN --config tiny` without `--model` first writes RUN/seed, a model
directory with a CLIP tokenizer learnt from the data's own captions (`tokenizers.train_clip_bpe`: CLIP's format,
byte-level, so every prompt tokenises) and CLIP towers at the preset's sizes (NumPy's initial weights; the stage
trains them from scratch anyway), the vision tower and its preprocessing at `--image-size`. The prior and the
decoder then build on the CLIP stage's result, as with any base model.

An upsampler sees pixels only (no CLIP embedding conditions it), so `dalle2 train super-res --config tiny
--low-size N` also starts from nothing: its RUN/seed is an empty model directory, and RUN/model holds the
upsampler alone, for a model to take in (scripts/package_default_model.py does). The default model's recipe
trains it beside CLIP that way.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.numpy import save_file

from .. import store
from ..modules.init import initial_weights
from ..spec import (CLIPTextConfig, CLIPVisionConfig, Component, ImageProcessorConfig, ModelSpec, PipelineDefaults,
                    Source, TokenizerConfig)
from ..tokenizers import EOS, train_clip_bpe
from .data import Dataset
from .stages import preset_configs

VOCAB = 1024  # BPE vocabulary learnt from the captions (the byte symbols alone take 512)
MAX_LENGTH = 32  # tokens per caption, BOS and EOS included
PATCHES = 8  # the vision tower sees an 8 x 8 grid of patches


def seed_model(directory: Path, dataset: Dataset, backend, preset: str, image_size: int, seed: int,
               stage: str = "clip") -> Path:
    """RUN/seed of `stage` (written atomically; an existing one is kept, the same inputs giving the same files)."""
    if (directory / store.MODEL_JSON).is_file():
        return directory
    if stage == "super_res":  # nothing to seed: the upsampler is built from the preset, the model has it alone
        with store.atomic_directory(directory) as tmp:
            store.write_spec(tmp, ModelSpec(Source("dalle2_portable seed", None, "dalle2_portable"), {}))
        return directory
    with store.atomic_directory(directory) as tmp:
        captions = [dataset.caption(i) for i in range(len(dataset))]
        vocab = train_clip_bpe(captions, VOCAB, tmp / "tokenizer")
        n = len(store.read_json(vocab / "vocab.json", "the seed tokenizer was not written; start again"))
        text = CLIPTextConfig(vocab_size=n, max_position_embeddings=MAX_LENGTH, eos_token_id=n - 1)  # EOS: last
        vision = CLIPVisionConfig(image_size=image_size, patch_size=max(1, image_size // PATCHES))
        base = ModelSpec(Source("dalle2_portable seed", None, "dalle2_portable"),
                         {"text_encoder": Component("clip_text", text, "text_encoder.safetensors"),
                          "image_encoder": Component("clip_vision", vision, "image_encoder.safetensors")})
        sized = preset_configs("clip", preset, 0, 0, image_size, base=base)
        components = {}
        for name, cfg in sized.items():
            save_file(initial_weights(backend.parameter_shapes(cfg.TYPE, cfg), seed), str(tmp / f"{name}.safetensors"))
            components[name] = Component(cfg.TYPE, cfg, f"{name}.safetensors")
        processor = ImageProcessorConfig(shortest_edge=image_size, crop_height=image_size, crop_width=image_size)
        store.write_spec(tmp, ModelSpec(Source("dalle2_portable seed", None, "dalle2_portable"), components,
                                        TokenizerConfig(max_length=MAX_LENGTH, pad_token=EOS), processor,
                                        {}, PipelineDefaults()))
    return directory

