"""The unCLIP pipeline: one model directory's components on one backend, and the verbs that sample from it.

    pipe = d2.load_pipeline(model="kakaobrain/karlo-v1-alpha")   # Hub id: downloaded + converted once, cached
    out = pipe.generate("a corgi in a spacesuit", num_images=2, seed=0)
    out.images[0].save("corgi.png"); out.image_embeddings          # (2, 768): what the decoder saw
    pipe.vary("corgi.png"); pipe.interpolate("a.png", "b.png", frames=5); pipe.edit("corgi.png", source=...,
        target=..., amount=0.4); pipe.rerank("a corgi", candidates=8)

This module orchestrates: the modules are the backend's, the CLIP towers come through `CLIP`, the loops live
in `sampling.py`, the defaults in the spec (`PipelineDefaults`); the embedding arithmetic the verbs need (slerp,
text diffs) is at the end of this file.
"""

from __future__ import annotations

import functools
import json
import os
from collections import ChainMap
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from . import store
from .backends import Backend, get_backend
from .clip import CLIP, TextCondition, load_clip
from . import __version__
from .errors import Dalle2Error
from .images import to_pil
from .residency import Components, Deferred, load_module
from .sampling import NoiseStream, Progress, Stage, no_progress, sample_decoder, sample_prior, sample_super_res
from .schedule import UnCLIPSchedule
from .spec import STAGES, ModelSpec, PipelineDefaults

# diffusers' UnCLIPPipeline argument names, accepted by every verb as the same options under our names
DIFFUSERS_NAMES = {**{f"{s}_num_inference_steps": f"{s}_steps" for s in STAGES},
                   **{f"{s}_guidance_scale": f"{s}_guidance" for s in ("prior", "decoder")},
                   "num_images_per_prompt": "num_images"}


def diffusers_names(verb):
    """Let `verb` take diffusers' argument names (DIFFUSERS_NAMES) as well as ours; both at once is an error."""
    @functools.wraps(verb)
    def call(self, *args, **kwargs):
        for theirs, ours in DIFFUSERS_NAMES.items():
            if theirs in kwargs:
                if kwargs.get(ours) is not None:
                    raise Dalle2Error(f"{theirs} (diffusers' name) and {ours} are one option; give one of them")
                kwargs[ours] = kwargs.pop(theirs)
        return verb(self, *args, **kwargs)
    return call


UNCLIP_COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last")
REQUIRED = ("text_encoder", "text_proj", "decoder")  # the least an unCLIP model has (variations have no prior)


@dataclass
class UnCLIPOutput:
    """What a verb returns. images: PIL images (prompt-major: each prompt's or input image's num_images in a
    row); image_embeddings (N, D): the CLIP image embeddings the decoder was conditioned on; decoder_samples
    (N, 3, h, w) and samples (N, 3, H, W): the 64 px and final images as float32 in [-1, 1]; captions: the
    caption each image's decoder saw ("" for image-driven verbs); settings: everything needed to reproduce the
    call (verb, seed, steps, guidance, samplers, model, backend); scores: CLIP similarities (rerank only);
    prompts: each image's prompt as given (text verbs; differs from its caption when the prompt was cut)."""

    images: list[Image.Image]
    image_embeddings: np.ndarray
    decoder_samples: np.ndarray
    samples: np.ndarray
    captions: list[str]
    settings: dict = field(default_factory=dict)
    scores: np.ndarray | None = None
    prompts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def metadata(self, i: int) -> dict[str, str]:
        """PNG text metadata for image i: its prompt as given ("prompt": the same prompt regenerates it), the
        part of it the model saw when the tokenizer's window cut it ("prompt_seen"), the call's settings (seed,
        model, revision, backend, steps, guidance, samplers), and its rerank score if any."""
        prompt = self.prompts[i] if self.prompts else self.captions[i]
        meta = {"prompt": prompt, "index": str(i)}
        if prompt != self.captions[i]:
            meta["prompt_seen"] = self.captions[i]
        meta.update({k: str(v) for k, v in self.settings.items() if v is not None and k != "candidate_indices"})
        if "candidate_indices" in self.settings:  # rerank: which of the generated candidates this image is
            meta["candidate"] = str(self.settings["candidate_indices"][i])
        if self.scores is not None:
            meta["clip_score"] = f"{float(self.scores[i]):.6f}"
        return meta

    def reorder(self, order) -> UnCLIPOutput:
        order = list(order)
        return UnCLIPOutput([self.images[i] for i in order], self.image_embeddings[order],
                            self.decoder_samples[order], self.samples[order], [self.captions[i] for i in order],
                            dict(self.settings), None if self.scores is None else self.scores[order],
                            None if self.prompts is None else [self.prompts[i] for i in order])


def tqdm_progress(iterable, stage: str, total: int):
    """A per-stage progress bar on stderr."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=stage, total=total, leave=False, unit="step")


class Pipeline:
    """The components of an unCLIP model directory on one backend, validated before anything is allocated."""

    def __init__(self, model_dir: str | os.PathLike, backend: Backend, spec: ModelSpec | None = None,
                 progress: Progress = no_progress, lora=(), low_memory: bool = False):
        self.model_dir = Path(model_dir)
        self.progress = progress
        self.spec = spec or store.read_spec(self.model_dir)
        self.backend = backend
        self.low_memory = bool(low_memory)
        _require_unclip(self.model_dir, self.spec)
        parts = [n for n in UNCLIP_COMPONENTS if n in self.spec.components]
        store.validate(self.model_dir, self.spec, backend.parameter_shapes, parts)  # CLIP validates its towers
        self.lora: tuple[tuple[str, float], ...] = ()  # (file, scale) of each adapter merged, for the metadata
        self._merged = []  # (adapter, scale) pairs, merged into each component as it is loaded
        if lora:  # LoRA adapters, merged into the weights (lora.py): (file, scale) pairs or "FILE[:SCALE]"
            from .lora import parse_spec, read_adapters

            pairs = [parse_spec(x) if isinstance(x, (str, os.PathLike)) else x for x in lora]
            self._merged = read_adapters(self.model_dir, self.spec.components, pairs)  # before any loading
            self.lora = tuple((a.source, float(scale)) for a, scale in self._merged)
        self.adapters = [adapter for adapter, _ in self._merged]
        self.clip = CLIP(self.model_dir, backend, self.spec, self.low_memory, self._prepare)
        load = partial(load_module, backend, self.model_dir, self.spec, prepare=self._prepare)
        self.modules = Components(parts, load, self.low_memory, backend.free_memory)
        self._schedules = {k: UnCLIPSchedule(c) for k, c in self.spec.schedulers.items()}
        self._empty = None

    def _prepare(self, name: str, module) -> None:
        """What a component goes through once loaded: the LoRA adapters merged into it."""
        if self._merged:
            from .lora import merge_component

            merge_component(self.backend, module, name, self._merged)

    def _hold(self, *names: str) -> None:
        """low_memory: drop every loaded component but `names` (the stage about to run loads them at first use)."""
        self.clip.modules.release(keep=names)
        self.modules.release(keep=names)

    @property
    def components(self) -> Mapping:
        """Every module by component name, the CLIP towers included (low_memory: each loaded when looked up)."""
        return ChainMap(self.modules, self.clip.modules)

    @property
    def schedulers(self):
        return self.spec.schedulers

    @property
    def defaults(self) -> PipelineDefaults:
        """The model's defaults (model.json "defaults"): what each option a call leaves out takes."""
        return self.spec.defaults

    def __repr__(self) -> str:
        return f"Pipeline({str(self.model_dir)!r}, {self.backend!r}, components={list(self.components)})"

    # -- the pieces the verbs share --------------------------------------------------------------------------
    def _stages(self, names: tuple[str, ...], options: dict) -> dict[str, Stage]:
        return stages_of(self.model_dir, self.spec, self._schedules, names, options)

    def _uncond(self, n: int) -> TextCondition:
        """The empty caption's condition, n rows (classifier-free guidance's unconditional half)."""
        if self._empty is None:
            self._empty = self.clip.text_condition([""])
        return self._empty.repeat(n)

    def image_embeddings(self, images) -> np.ndarray:
        """PIL images or paths -> CLIP image embeddings (B, D) with the model's image encoder. A float NumPy
        array (D,) or (B, D) is taken as embeddings already (e.g. from the prior or another CLIP run)."""
        dim = self.spec.components["text_proj"].config.clip_embeddings_dim
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            emb = np.atleast_2d(images).astype(np.float32)
            if emb.ndim != 2 or emb.shape[1] != dim:
                raise Dalle2Error(f"image embeddings must have shape (batch, {dim}) for this model, got "
                                  f"{images.shape}")
            return emb
        if "image_encoder" not in self.clip.modules:
            raise Dalle2Error(f"model {str(self.model_dir)!r} has no CLIP image encoder, so it cannot embed "
                              "images; use kakaobrain/karlo-v1-alpha-image-variations, or pass CLIP image "
                              "embeddings as a NumPy array")
        embeddings = self.clip.encode_image(list(images) if isinstance(images, (list, tuple)) else [images])
        self._hold("text_encoder")  # low_memory: the image tower's work is done
        return embeddings

    def _decode(self, verb: str, embeddings: np.ndarray, text: TextCondition, captions: list[str],
                stages: dict[str, Stage], noise: NoiseStream, shared: bool, seed) -> UnCLIPOutput:
        """Decoder (64 px) then super-res (256 px) from image embeddings; the output with its settings."""
        dec = stages["decoder"]
        decoder_cfg = self.spec.components["decoder"].config
        size = self.defaults.decoder_sample_size or decoder_cfg.sample_size
        uncond = self._uncond(len(text)) if dec.guided else None  # the text encoder's last use
        self._hold("text_proj", "decoder")
        small = sample_decoder(self.backend, self.modules["text_proj"], self.modules["decoder"], dec, embeddings,
                               text, uncond, decoder_cfg.in_channels, size, noise, shared, self.progress)
        big = small
        if "super_res_first" in self.modules:
            sr_cfg = self.spec.components["super_res_first"].config
            big_size = self.defaults.super_res_sample_size or sr_cfg.sample_size
            self._hold("super_res_first")
            last = "super_res_last" if "super_res_last" in self.modules else "super_res_first"
            if self.low_memory:  # stand-ins: the last step's upsampler is loaded once the first one is freed
                first, last = (Deferred(self.modules, "super_res_first"),
                               Deferred(self.modules, last, ["super_res_first"] if last != "super_res_first" else []))
            else:
                first, last = self.modules["super_res_first"], self.modules[last]
            big = sample_super_res(self.backend, first, last, stages["super_res"], small, big_size, noise, shared,
                                   self.progress)
        self._hold()
        settings = {"verb": verb, "seed": seed, "model": self.spec.source.repo or str(self.model_dir),
                    "revision": self.spec.source.revision, "model_dir": str(Path(self.model_dir).absolute()),
                    "version": __version__, "backend": self.backend.name, "device": self.backend.device,
                    "dtype": self.backend.dtype, "batch_size": len(embeddings),
                    "lora": json.dumps(self.lora) if self.lora else None}
        for name, st in stages.items():
            settings.update({f"{name}_{k}": getattr(st, k) for k in PipelineDefaults.options(name)})
        images = [to_pil(x) for x in big]
        return UnCLIPOutput(images, embeddings, small, big, captions, settings)

    def _require_prior(self) -> None:
        _require_prior(self.model_dir, self.spec)

    def _prior(self, text: TextCondition, stage: Stage, noise: NoiseStream, shared: bool = False) -> np.ndarray:
        self._require_prior()
        dim = self.spec.components["prior"].config.clip_embed_dim
        uncond = self._uncond(len(text)) if stage.guided else None
        self._hold("prior")
        prior = self.modules["prior"]
        return sample_prior(self.backend, prior, stage, text, uncond, dim, noise, shared, self.progress)

    # -- the verbs -------------------------------------------------------------------------------------------
    @diffusers_names
    def generate(self, prompt: str | list[str], num_images: int = 1, seed: int | None = 0,
                 generator: np.random.Generator | None = None, **options) -> UnCLIPOutput:
        """Text to image through the whole cascade: prior -> decoder -> super-res.

        prompt: one caption or a list; num_images per caption (the batch is caption-major). seed or generator
        (a numpy Generator) feeds the one noise stream. options, each None = the model's default (`defaults`,
        for Karlo `PipelineDefaults()`): prior_steps, decoder_steps, super_res_steps, prior_guidance,
        decoder_guidance, prior_sampler, decoder_sampler, super_res_sampler ("ancestral", the reference, or
        "ddim"); the super-res stage has no guidance."""
        prompts = _prompts(prompt)
        stages = self._stages(STAGES, options)
        noise = NoiseStream(seed, generator)
        text = self.clip.text_condition(prompts).repeat(_count(num_images, "num_images"))
        embeddings = self._prior(text, stages["prior"], noise)
        captions = [p for p in self.clip.as_encoded(prompts) for _ in range(num_images)]  # what the model saw
        out = self._decode("generate", embeddings, text, captions, stages, noise, False, seed)
        out.settings["num_images"] = num_images
        out.prompts = [p for p in prompts for _ in range(num_images)]
        return out

    @diffusers_names
    def vary(self, image, num_images: int = 1, seed: int | None = 0, generator: np.random.Generator | None = None,
             **options) -> UnCLIPOutput:
        """Variations of an image (or a list, or CLIP image embeddings as a NumPy array): its CLIP image
        embedding decoded num_images times with the empty caption, as UnCLIPImageVariationPipeline does.
        options: decoder_steps, super_res_steps, decoder_guidance, decoder_sampler, super_res_sampler."""
        stages = self._stages(STAGES[1:], options)
        embeddings = np.repeat(self.image_embeddings(image), _count(num_images, "num_images"), axis=0)
        noise = NoiseStream(seed, generator)
        out = self._decode("vary", embeddings, self._uncond(len(embeddings)), [""] * len(embeddings), stages,
                           noise, False, seed)
        out.settings["num_images"] = num_images
        return out

    @diffusers_names
    def interpolate(self, start, end, frames: int = 5, seed: int | None = 0,
                    generator: np.random.Generator | None = None, kind: str = "image", **options) -> UnCLIPOutput:
        """Frames along the slerp between two CLIP image embeddings, frame 0 = start and frame N-1 = end, all
        frames sharing one noise draw per step so they change smoothly.

        kind="image": start and end are images (PIL or paths) or embeddings (NumPy (D,)); the decoder sees the
        empty caption. kind="text": start and end are captions; their image embeddings come from the prior
        (one shared prior noise), and the decoder's caption condition moves with the frame (embeddings slerped,
        token states interpolated linearly, the union of the two token masks)."""
        frames = _count(frames, "frames")
        if frames < 2:
            raise Dalle2Error(f"frames must be at least 2 (the two ends), got {frames}")
        weights = np.linspace(0.0, 1.0, frames)
        if kind == "image":
            stages = self._stages(STAGES[1:], options)
            a, b = (self.image_embeddings(x) for x in (start, end))
            if len(a) != 1 or len(b) != 1:
                raise Dalle2Error("interpolate takes one start and one end image")
            text, captions = self._uncond(frames), [""] * frames
            noise = NoiseStream(seed, generator)
        elif kind == "text":
            stages = self._stages(STAGES, options)
            start, end = self.clip.as_encoded(_prompts([start, end]))
            ends = self.clip.text_condition([start, end])
            noise = NoiseStream(seed, generator)
            a, b = np.split(self._prior(ends, stages["prior"], noise, shared=True), 2)
            text = _interpolate_text(ends, weights)
            captions = [f"{start} -> {end} ({w:.3f})" for w in weights]
        else:
            raise Dalle2Error(f"unknown interpolation kind {kind!r}; choose image or text")
        embeddings = slerp(a[0], b[0], weights)
        out = self._decode("interpolate", embeddings, text, captions, stages, noise, True, seed)
        out.settings["kind"] = kind
        return out

    @diffusers_names
    def edit(self, image, source: str, target: str, amount: float = 0.5, num_images: int = 1,
             seed: int | None = 0, generator: np.random.Generator | None = None, **options) -> UnCLIPOutput:
        """DALL-E 2 text diffs: move the image's CLIP embedding toward `target` and away from `source` (a caption
        of the image) by `amount` in [0, 1] (0 = a variation of the image; ~0.25-0.5 edits), then decode it
        with the empty caption. Needs the text encoder and an image encoder of the same CLIP (or embeddings)."""
        amount = float(amount)
        if not 0.0 <= amount <= 1.0:
            raise Dalle2Error(f"amount must be between 0 and 1, got {amount}")
        stages = self._stages(STAGES[1:], options)
        z = self.image_embeddings(image)
        source, target = self.clip.as_encoded(_prompts([source, target]))
        captions = self.clip.text_condition([source, target]).embeds
        embeddings = np.repeat(text_diff(z, captions[0], captions[1], amount), _count(num_images, "num_images"), 0)
        noise = NoiseStream(seed, generator)
        out = self._decode("edit", embeddings, self._uncond(len(embeddings)), [""] * len(embeddings), stages,
                           noise, False, seed)
        out.settings.update(source=source, target=target, amount=amount, num_images=num_images)
        return out

    @diffusers_names
    def rerank(self, prompt: str | list[str], candidates: int = 4, keep: int | None = None,
               clip: CLIP | str | None = None, seed: int | None = 0, generator: np.random.Generator | None = None,
               **options) -> UnCLIPOutput:
        """Generate `candidates` images per caption and order each caption's images by CLIP similarity to it,
        best first, keeping the best `keep` (default all); `out.scores` holds the cosine similarities.

        clip: the scoring CLIP (a `CLIP`, or a model id / directory loaded on this backend); default the
        pipeline's own when it has both towers. Karlo has no image tower: pass clip="openai/clip-vit-large-patch14"
        (DALL-E 2's reranking used a CLIP of the same family)."""
        prompts = _prompts(prompt)
        candidates = _count(candidates, "candidates")
        keep = candidates if keep is None else _count(keep, "keep")
        if keep > candidates:
            raise Dalle2Error(f"keep ({keep}) cannot exceed candidates ({candidates})")
        scorer = self._scorer(clip)
        out = self.generate(prompts, num_images=candidates, seed=seed, generator=generator, **options)
        scores = np.concatenate([scorer.similarity([p], out.images[i * candidates:(i + 1) * candidates])[0]
                                 for i, p in enumerate(prompts)])
        order = [i * candidates + j for i in range(len(prompts))
                 for j in np.argsort(-scores[i * candidates:(i + 1) * candidates], kind="stable")[:keep]]
        self._hold()
        out.scores = scores.astype(np.float32)
        out = out.reorder(order)
        out.settings.update(verb="rerank", candidates=candidates, keep=keep,
                            candidate_indices=[i % candidates for i in order],
                            rerank_clip=str(getattr(scorer, "model_dir", clip)) if clip is not None else "own")
        return out

    def _scorer(self, clip) -> CLIP:
        if isinstance(clip, CLIP):
            return clip
        if clip is not None:
            return load_clip(clip, backend=self.backend)
        if "image_encoder" not in self.clip.modules:
            raise Dalle2Error(f"model {str(self.model_dir)!r} has no CLIP image encoder to score images with; pass "
                              "clip='openai/clip-vit-large-patch14' (or another CLIP model)")
        return self.clip


def stages_of(model_dir, spec: ModelSpec, schedules: dict, names: tuple[str, ...], options: dict) -> dict[str, Stage]:
    """The Stage of each named stage: the call's options ({stage}_steps, {stage}_guidance, {stage}_sampler as
    the stage has them, each None = the model's default) over the model's defaults, every value checked."""
    settings = spec.defaults.override(names, options)
    if "super_res_first" not in spec.components:  # a cascade without an upsampler ends at the decoder
        names = tuple(s for s in names if s != "super_res")
    stages = {}
    for s in names:
        if s == "prior":
            _require_prior(model_dir, spec)
        if s not in schedules:
            raise Dalle2Error(f"model {str(model_dir)!r} has no {s} scheduler in model.json; "
                              "re-convert it with `dalle2 convert`")
        try:
            stages[s] = Stage(schedules[s], **settings.stage(s))
        except Dalle2Error as e:
            raise Dalle2Error(f"{s.replace('_', '-')} {e}") from None
    return stages


def check_options(model: str | os.PathLike, names: tuple[str, ...], options: dict, revision: str | None = None
                  ) -> Path:
    """Check a call's stage options against the model's schedules and defaults from model.json alone, before
    any weight is loaded (a 13.6 GB load should not precede "steps must be at most 1000"); its directory."""
    from .convert import resolve_model

    model_dir = resolve_model(model, revision=revision)
    spec = store.read_spec(model_dir)
    _require_unclip(model_dir, spec)
    stages_of(model_dir, spec, {k: UnCLIPSchedule(c) for k, c in spec.schedulers.items()}, names, options)
    return model_dir


def _require_unclip(model_dir, spec: ModelSpec) -> None:
    missing = [n for n in REQUIRED if n not in spec.components]
    if missing and list(spec.components) == ["super_res_first"]:
        raise Dalle2Error(f"model {str(model_dir)!r} holds an upsampler alone (`dalle2 train super-res` without "
                          "--model), so it draws nothing by itself; join its super_res_first to a model with a "
                          "decoder (scripts/package_default_model.py does for the recipe)")
    if missing:
        raise Dalle2Error(f"model {str(model_dir)!r} has no {missing[0]}, so it is not an unCLIP model; "
                          "CLIP models load with d2.load_clip")


def _require_prior(model_dir, spec: ModelSpec) -> None:
    if "prior" not in spec.components:
        raise Dalle2Error(f"model {str(model_dir)!r} has no prior, so it cannot turn a caption into an image "
                          "embedding (an image-variations model): it can vary, edit and interpolate images; for "
                          "text to image use a model with a prior (the default, or kakaobrain/karlo-v1-alpha)")


def _prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise Dalle2Error(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _count(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise Dalle2Error(f"{name} must be a positive integer, got {n!r}")
    return int(n)


def _interpolate_text(ends: TextCondition, weights: np.ndarray) -> TextCondition:
    """Two captions' conditions (2 rows) -> one row per weight: embeddings slerped, token states interpolated
    linearly, the union of the two masks (so both captions' tokens stay visible along the way)."""
    w = weights[:, None, None].astype(np.float32)
    states = ((1 - w) * ends.states[0] + w * ends.states[1]).astype(np.float32)
    mask = np.repeat((ends.mask[0] | ends.mask[1])[None], len(weights), axis=0)
    return TextCondition(slerp(ends.embeds[0], ends.embeds[1], weights), states, mask)


def slerp(a: np.ndarray, b: np.ndarray, t) -> np.ndarray:
    """Spherical interpolation between embeddings a and b (rows, (..., D)) by t (broadcast over the rows):
    the direction moves along the great circle, the norm linearly (CLIP image embeddings are not unit vectors
    and the decoder was trained on their own scale). t = 0 returns a and t = 1 returns b exactly; nearly
    parallel directions fall back to linear interpolation. Computed in float64, returned as float32."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    t = np.asarray(t, np.float64)[..., None]
    na, nb = np.linalg.norm(a, axis=-1, keepdims=True), np.linalg.norm(b, axis=-1, keepdims=True)
    if (na == 0).any() or (nb == 0).any():
        raise Dalle2Error("slerp: an embedding is all zeros, so it has no direction to interpolate")
    ua, ub = a / na, b / nb
    theta = np.arccos(np.clip((ua * ub).sum(-1, keepdims=True), -1.0, 1.0))
    sin = np.sin(theta)
    near = sin < 1e-6
    safe = np.where(near, 1.0, sin)
    wa = np.where(near, 1.0 - t, np.sin((1.0 - t) * theta) / safe)
    wb = np.where(near, t, np.sin(t * theta) / safe)
    out = (wa * ua + wb * ub) * ((1.0 - t) * na + t * nb)
    out = np.where(t == 0, a, np.where(t == 1, b, out))
    return out.astype(np.float32)


def text_diff(image_embedding: np.ndarray, source: np.ndarray, target: np.ndarray, amount: float) -> np.ndarray:
    """DALL-E 2's text diffs (section 3.3): the normalised difference of the target and source caption
    embeddings, z_d = (z_target - z_source) / |z_target - z_source|, slerped into the image embedding by
    `amount` (0 = the image, 1 = pure z_d), keeping the image embedding's norm. (B, D) rows, float32."""
    d = np.asarray(target, np.float64) - np.asarray(source, np.float64)
    n = np.linalg.norm(d, axis=-1, keepdims=True)
    if (n < 1e-12).any():
        raise Dalle2Error("edit: the source and target captions have the same CLIP embedding; give two "
                          "different captions")
    z = np.asarray(image_embedding, np.float64)
    return slerp(z, d / n * np.linalg.norm(z, axis=-1, keepdims=True), amount)


def load_pipeline(model: str | os.PathLike = "default", backend: str | Backend = "auto", device: str | None = None,
                  dtype: str = "float32", revision: str | None = None, variant: str | None = None,
                  progress: bool = False, lora=(), low_memory: bool = False) -> Pipeline:
    """An unCLIP pipeline from "default" (the packaged model), a model directory, a Hub repo id or a local
    diffusers folder (both converted once, then reused from the cache). `variant` reads variant weight files
    of the source (e.g. "fp16"); `progress` shows a progress bar per sampling stage; `lora`: LoRA files merged
    into the weights, each "FILE[:SCALE]" or (file, scale) (diffusers, PEFT or kohya dialect; lora.py);
    `low_memory`: each stage's weights loaded when it runs and dropped after (residency.py), so the peak is the
    largest stage's, not the whole cascade's; the same images."""
    from .convert import resolve_model

    model_dir = resolve_model(model, revision=revision, variant=variant)
    return Pipeline(model_dir, get_backend(backend, device=device, dtype=dtype),
                    progress=tqdm_progress if progress else no_progress, lora=lora, low_memory=low_memory)
