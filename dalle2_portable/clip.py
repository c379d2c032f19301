"""CLIP text and image encoding over any backend: tokenise and preprocess in NumPy, run the towers, return NumPy.

    clip = d2.load_clip("openai/clip-vit-base-patch32")      # Hub id, model directory, or converted cache
    clip.encode_text(["a cat", "a dog"])                     # (2, projection_dim) float32
    clip.encode_image([PIL.Image.open("cat.png")])           # (1, projection_dim) float32
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from . import store
from .backends import Backend, get_backend
from .errors import Dalle2Error, Dalle2Warning
from .images import clip_preprocess, load_image
from .paths import inside
from .residency import Components, load_module
from .spec import ImageProcessorConfig, ModelSpec
from .tokenizers import load_tokenizer


def pool_positions(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Which token of each sequence CLIP pools, as transformers' CLIPTextModel chooses it (reference/clip.md §4).

    input_ids (B, L) -> (B,) int64. Legacy configs (eos_token_id == 2, all OpenAI-derived ones) take the argmax
    of the ids: EOS is the largest id, and argmax returns the first one when pads are EOS too. Newer configs take
    the first position of the configured EOS id.
    """
    if eos_token_id == 2:
        return input_ids.argmax(axis=-1).astype(np.int64)
    return (input_ids == eos_token_id).argmax(axis=-1).astype(np.int64)


def normalize(x: np.ndarray) -> np.ndarray:
    """Unit-norm rows (CLIP similarities are cosines)."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass(frozen=True)
class TextCondition:
    """The CLIP text condition of a batch: projected embeddings (B, P), last-layer token states (B, N, D), and
    the tokenizer's mask (B, N) bool (True = a real token)."""

    embeds: np.ndarray
    states: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.embeds)

    def repeat(self, n: int) -> TextCondition:
        """Each row n times in a row (`repeat_interleave`: prompt-major batches, as diffusers orders them)."""
        return TextCondition(*(np.repeat(a, n, axis=0) for a in (self.embeds, self.states, self.mask)))

    @staticmethod
    def cat(*parts: TextCondition) -> TextCondition:
        return TextCondition(*(np.concatenate(a, axis=0) for a in zip(*((p.embeds, p.states, p.mask)
                                                                         for p in parts))))


class CLIP:
    """The CLIP towers of one model directory on one backend. Either tower may be absent (Karlo has no vision
    tower, Karlo-variations no prior); calling a missing one is a one-line error."""

    def __init__(self, model_dir: str | os.PathLike, backend: Backend, spec: ModelSpec | None = None,
                 low_memory: bool = False, prepare=None):
        """low_memory: each tower loaded at its first use and dropped by `modules.release()` (residency.py);
        prepare(name, module): run on each tower once loaded (a pipeline's LoRA merge)."""
        self.model_dir = Path(model_dir)
        self.spec = spec or store.read_spec(self.model_dir)
        self.backend = backend
        towers = [n for n in ("text_encoder", "image_encoder") if n in self.spec.components]
        if not towers:
            raise Dalle2Error(f"model {str(self.model_dir)!r} has no CLIP tower (text_encoder or image_encoder); "
                              "use a CLIP or unCLIP model")
        store.validate(self.model_dir, self.spec, backend.parameter_shapes, towers)  # before any allocation
        self.modules = Components(towers, partial(load_module, backend, self.model_dir, self.spec, prepare=prepare),
                                  low_memory, backend.free_memory)
        self.tokenizer = None
        if "text_encoder" in towers:
            if self.spec.tokenizer is None:
                raise Dalle2Error(f"model {str(self.model_dir)!r} has a text encoder but no tokenizer in model.json;"
                                  " re-convert it with `dalle2 convert`")
            folder = inside(self.model_dir, "tokenizer", "model.json tokenizer")
            for f in (folder.iterdir() if folder.is_dir() else ()):  # no file of it may lead out either
                inside(self.model_dir, f"tokenizer/{f.name}", "model.json tokenizer")
            self.tokenizer = load_tokenizer(folder, self.spec.tokenizer)
        self.image_processor = self.spec.image_processor or ImageProcessorConfig()
        self.origins = {name: (self.model_dir, self.spec) for name in towers}  # where each tower's weights are

    def with_image_tower(self, other: CLIP) -> CLIP:
        """This CLIP with `other`'s image tower and preprocessing: Karlo ships no vision tower, so training on
        its CLIP image embeddings takes the ViT-L/14 one from openai/clip-vit-large-patch14 (or Karlo's
        image-variations model). The projections must have one width."""
        vision = other._module("image_encoder")
        width = other.origins["image_encoder"][1].components["image_encoder"].config.projection_dim
        if "text_encoder" in self.modules:
            text = self.spec.components["text_encoder"].config.projection_dim
            if text != width:
                raise Dalle2Error(f"the image tower of {str(other.model_dir)!r} projects to {width}, this model's "
                                  f"text tower to {text}; use the CLIP this model was trained with")
        joined = copy.copy(self)
        joined.modules = self.modules.joined("image_encoder", vision)
        joined.origins = {**self.origins, "image_encoder": other.origins["image_encoder"]}
        joined.image_processor = other.image_processor
        return joined

    def _module(self, name: str):
        if name not in self.modules:
            raise Dalle2Error(f"model {str(self.model_dir)!r} has no {name}; use a model that includes it "
                              "(a full CLIP model has both towers)")
        return self.modules[name]

    def tokenize(self, texts: list[str] | str) -> np.ndarray:
        self._module("text_encoder")
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    def text_condition(self, texts: list[str] | str) -> TextCondition:
        """texts -> embeddings, last-layer token states and the tokenizer's mask: what unCLIP conditions on.
        The encoder runs with only its causal mask, as transformers' CLIP and the unCLIP pipelines call it."""
        module = self._module("text_encoder")
        ids, mask = self.tokenizer.encode_with_mask([texts] if isinstance(texts, str) else list(texts))
        eos = self.spec.components["text_encoder"].config.eos_token_id
        embeds, states = self.backend.run(module, ids, pool_positions(ids, eos))
        return TextCondition(embeds, states, mask.astype(bool))

    def as_encoded(self, texts: list[str]) -> list[str]:
        """Each text as the text encoder sees it: itself, or for one longer than the tokenizer's window the part
        kept (the rest is cut, as transformers cuts it), with a Dalle2Warning saying so."""
        used = []
        for text, cut in zip(texts, self.tokenizer.truncations(texts)):
            if cut is not None:
                warnings.warn(Dalle2Warning(
                    f"the prompt {text[:60] + '...' if len(text) > 60 else text!r} is longer than the tokenizer's "
                    f"{self.tokenizer.max_length} tokens; the model sees only {cut!r} (shorten it to keep control)"),
                    stacklevel=3)
            used.append(text if cut is None else cut)
        return used

    def encode_text(self, texts: list[str] | str, return_hidden_states: bool = False):
        """texts -> text embeddings (B, projection_dim); with return_hidden_states also (B, L, D) token states
        (the last layer after final_layer_norm, what unCLIP priors condition on)."""
        cond = self.text_condition(texts)
        return (cond.embeds, cond.states) if return_hidden_states else cond.embeds

    def preprocess(self, images) -> np.ndarray:
        """PIL images or paths -> (B, 3, H, W) float32 as the model's CLIPImageProcessor config makes them."""
        images = [images] if not isinstance(images, (list, tuple)) else images
        return clip_preprocess([load_image(i) for i in images], self.image_processor)

    def encode_image(self, images) -> np.ndarray:
        """PIL images or paths -> image embeddings (B, projection_dim)."""
        module = self._module("image_encoder")
        embeds, _ = self.backend.run(module, self.preprocess(images))
        return embeds

    def similarity(self, texts, images) -> np.ndarray:
        """Cosine similarities (len(texts), len(images)) of the projected embeddings."""
        return normalize(self.encode_text(texts)) @ normalize(self.encode_image(images)).T


def load_clip(model: str | os.PathLike, backend: str | Backend = "auto", device: str | None = None,
              dtype: str = "float32", revision: str | None = None) -> CLIP:
    """CLIP from a model directory, a Hub repo id (converted once, then cached), or a local transformers folder."""
    from .convert import resolve_model  # converters import nothing heavy, but keep the import graph simple

    model_dir = resolve_model(model, revision=revision)
    return CLIP(model_dir, get_backend(backend, device=device, dtype=dtype))
