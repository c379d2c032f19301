"""The training loop, written once for every backend: data, NumPy draws, AdamW with warm-up and cosine decay,
EMA, checkpoints and resume, metrics; the backend only runs `train_step`.

    d2.train("prior", data="shapes", out="runs/prior", model="my-model", config="tiny", steps=2000)

A run directory holds everything the run needs to continue, on either backend:
    RUN/run.json          the stage, the settings, the base model, the data, the trained component's config
    RUN/embeddings/       the frozen CLIP outputs of the data (train/data.py `cache_embeddings`)
    RUN/checkpoint/       the last checkpoint (train/checkpoint.py), replaced atomically
    RUN/metrics.jsonl     one line per step: step, loss, learning rate, gradient norm, samples per second
    RUN/model/            the result, written after the last step: the base model with the trained component
                          (its EMA weights), a model directory every verb loads

Every random number a step uses (which items, timesteps, noise, which captions are dropped for
classifier-free guidance) comes from one NumPy Generator whose state the checkpoint keeps, so a resumed run
draws what the uninterrupted run would have drawn, and both backends see the same draws.

Stages so far: the prior (DALL-E 2 section 2.2, as Karlo trains it): given the noised, normalised CLIP image
embedding z_t, the timestep and the caption's CLIP text condition, predict the clean z_0 (Karlo's prior
scheduler: `prediction_type="sample"`); the loss is the MSE to z_0; a caption is replaced by the empty
caption with probability `cond_drop`, the unconditional input that sampling's guidance uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .. import store
from ..backends import get_backend
from ..clip import CLIP, TextCondition
from ..errors import Dalle2Error
from ..modules.init import initial_weights
from ..modules.prior import prior_attention_mask
from ..schedule import UnCLIPSchedule
from ..convert import resolve_model
from ..pipeline import tqdm_progress
from ..spec import COMPONENT_NAMES, Component, ModelSpec, PriorConfig, SchedulerConfig, Source
from . import checkpoint as ckpt_io
from . import losses
from .data import Dataset, ImageFolder, cache_embeddings
from .optim import EMA, AdamW, ema_decay, learning_rate
from .shapes import ShapesDataset

STAGES = ("prior",)
# prior widths by preset; every other size follows from the CLIP (embedding width, caption length)
PRESETS = {"tiny": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2),
           "small": dict(num_attention_heads=4, attention_head_dim=32, num_layers=6)}
# Karlo's prior scheduler (reference karlo-v1-alpha.md): x0 prediction, clipped to +-5 while sampling
PRIOR_SCHEDULER = SchedulerConfig(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                                  clip_sample_range=5.0)
FROZEN = {"prior": ("clip_mean", "clip_std")}  # the CLIP statistics are data, not weights to learn


@dataclass(frozen=True)
class TrainSettings:
    """A run's settings (run.json "settings"); `steps` is the run's total, so a resumed run may extend it."""

    steps: int
    batch_size: int = 16
    lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    ema_max_decay: float = 0.9999
    cond_drop: float = 0.1
    checkpoint_every: int = 100
    seed: int = 0
    data_size: int = 1000  # items of the shapes data

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "data_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Dalle2Error(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise Dalle2Error(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        AdamW(self.lr, eps=1e-8, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)  # checks

    @property
    def optimizer(self) -> AdamW:
        return AdamW(lr=self.lr, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)


def prior_loss(F, prior, x_t, t, text_embeds, text_states, mask, target):
    """The prior's objective: MSE between its x0 prediction and the clean normalised image embedding."""
    return losses.mse(F, prior(x_t, t, text_embeds, text_states, mask), target)


def load_data(data: str | Dataset, settings: TrainSettings) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if str(data) == "shapes":
        return ShapesDataset(length=settings.data_size, seed=settings.seed)
    if not Path(data).is_dir():
        raise Dalle2Error(f"--data {data!r}: give `shapes` or a folder with metadata.jsonl")
    return ImageFolder(data)


def _prior_config(spec: ModelSpec, embeddings, config: str | None) -> PriorConfig:
    """The prior to train: the base model's (fine-tuning), or a preset sized from the CLIP (from scratch)."""
    if config is None:
        if "prior" not in spec.components:
            raise Dalle2Error("the base model has no prior to fine-tune; pass --config tiny|small to train one "
                              "from scratch")
        return spec.components["prior"].config
    if config not in PRESETS:
        raise Dalle2Error(f"unknown --config {config!r}; choose one of {', '.join(PRESETS)}")
    width, states = embeddings.text.embeds.shape[1], embeddings.text.states.shape
    if states[2] != width:
        raise Dalle2Error(f"the CLIP's text width ({states[2]}) differs from its embedding width ({width}); "
                          "unCLIP's prior reads both through one width, so use a CLIP whose hidden size equals its "
                          "projection size")
    preset = PRESETS[config]
    inner = preset["num_attention_heads"] * preset["attention_head_dim"]  # diffusers' time_embed_dim default
    return PriorConfig(**preset, embedding_dim=width, num_embeddings=states[1], time_embed_dim=inner,
                       embedding_proj_dim=width, clip_embed_dim=width)


def _check_run(run: Path, record: dict, resume: bool) -> None:
    path = run / "run.json"
    if not resume:
        if path.exists():
            raise Dalle2Error(f"{str(run)!r} already holds a run; pass --resume to continue it, or another --out")
        return
    if not path.is_file():
        raise Dalle2Error(f"{str(run)!r} holds no run to resume; start it without --resume")
    before = store.read_json(path, "the run's run.json is damaged; start a new run")
    for key in ("stage", "base_model", "data", "config"):
        if before.get(key) != record.get(key):
            raise Dalle2Error(f"--resume: this run was started with a different {key} ({before.get(key)!r}); "
                              "resume it with the same settings")


def _atomic_json_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(lines))
    os.replace(tmp, path)


def train(stage: str, data, out, model, config: str | None = None, settings: TrainSettings | None = None,
          backend="auto", device: str | None = None, resume: bool = False, progress: bool = False,
          stop_at: int | None = None) -> Path | None:
    """Train one stage; returns the result's model directory (RUN/model). See the module docstring.
    `stop_at`: checkpoint and stop after that step (the schedule still runs to `settings.steps`; continue with
    resume=True); returns None then."""
    if stage not in STAGES:
        raise Dalle2Error(f"unknown stage {stage!r}; this version trains: {', '.join(STAGES)}")
    settings = settings or TrainSettings(steps=1000)
    run = Path(out)
    base = resolve_model(model)
    dataset = load_data(data, settings)
    record = {"stage": stage, "base_model": str(Path(base).absolute()), "data": dataset.describe(),
              "config": config, "settings": dataclasses.asdict(settings)}
    _check_run(run, record, resume)
    b = get_backend(backend, device=device)
    spec = store.read_spec(base)
    clip = CLIP(base, b, spec)
    if "image_encoder" not in clip.modules:
        raise Dalle2Error("the base model has no CLIP image encoder, and the prior learns to predict CLIP image "
                          "embeddings; use a model with both CLIP towers (e.g. an image-variations model)")
    embeddings = cache_embeddings(dataset, clip, run / "embeddings", progress=progress)
    cfg = _prior_config(spec, embeddings, config)
    scheduler = spec.schedulers.get(stage, PRIOR_SCHEDULER)
    if scheduler.prediction_type != "sample":
        raise Dalle2Error(f"the base model's {stage} scheduler predicts {scheduler.prediction_type!r}; the prior "
                          "trains on x0 (\"sample\") predictions, as Karlo's does")
    record["component"] = cfg.to_dict()
    run.mkdir(parents=True, exist_ok=True)
    (run / "run.json").write_text(json.dumps(record, indent=1))

    if config is None:
        prior = b.load_component("prior", cfg, str(store.component_path(base, spec, "prior")))
    else:  # from scratch: NumPy's initial weights (the same on every backend), the CLIP statistics of the data
        prior = b.build("prior", cfg)
        weights = initial_weights(b.parameter_shapes("prior", cfg), settings.seed)
        images = embeddings.image_embeddings()
        weights["clip_mean"] = images.mean(0, keepdims=True).astype(np.float32)
        weights["clip_std"] = images.std(0, keepdims=True).astype(np.float32)
        b.load_weights(prior, weights)
    step_fn = b.train_step(prior, prior_loss, settings.optimizer, FROZEN[stage])
    ema = EMA(b.weights(prior))
    rng, start = np.random.default_rng(settings.seed), 0
    metrics = run / "metrics.jsonl"
    lines = []
    if resume:
        saved = ckpt_io.load(run)
        b.load_weights(prior, saved.weights)
        step_fn.load_state(saved.optimizer)
        ema = EMA(b.from_numpy(prior, saved.ema))
        rng, start = ckpt_io.rng_from_state(saved.rng), saved.step
        if metrics.is_file():  # the lines after the checkpoint are drawn again
            lines = [x for x in metrics.read_text().splitlines(True) if json.loads(x)["step"] <= start]
    _atomic_json_lines(metrics, lines)

    schedule = UnCLIPSchedule(scheduler)
    state = b.state_dict(prior)
    mean, std = state["clip_mean"], state["clip_std"]
    targets = (embeddings.image_embeddings() - mean) / std
    uncond = clip.text_condition([""])
    n, bs = len(dataset), settings.batch_size
    end = settings.steps if stop_at is None else min(settings.steps, stop_at)
    iterator = range(start, end)
    if progress:
        iterator = tqdm_progress(iterator, f"train {stage}", end - start)
    with open(metrics, "a") as log:
        for i in iterator:
            t0 = time.perf_counter()
            idx = rng.choice(n, bs, replace=n < bs)
            t = rng.integers(0, schedule.config.num_train_timesteps, bs)
            noise = rng.standard_normal((bs, targets.shape[1]), dtype=np.float32)
            drop = rng.random(bs) < settings.cond_drop
            text = _drop_captions(embeddings.text_condition(idx), uncond, drop)
            terms = schedule.training_terms(t)
            z0 = targets[idx].astype(np.float32)
            x_t = (terms["sqrt_alphas_cumprod"][:, None] * z0
                   + terms["sqrt_one_minus_alphas_cumprod"][:, None] * noise).astype(np.float32)
            lr = learning_rate(i, settings.lr, settings.warmup, settings.steps)
            loss = step_fn(x_t, t, text.embeds, text.states, prior_attention_mask(text.mask), z0, lr=lr)
            ema.update(b.weights(prior), ema_decay(i + 1, max_decay=settings.ema_max_decay))
            b.sync(ema.shadow)
            log.write(json.dumps({"step": i + 1, "loss": loss, "lr": lr, "grad_norm": step_fn.grad_norm,
                                  "samples_per_s": bs / (time.perf_counter() - t0)}) + "\n")
            log.flush()
            if (i + 1) % settings.checkpoint_every == 0 or i + 1 == end:
                ckpt_io.save(run, ckpt_io.Checkpoint(i + 1, b.state_dict(prior), b.to_numpy(prior, ema.shadow),
                                                     step_fn.state(), rng.bit_generator.state, {}))
    if end < settings.steps:
        return None
    return _write_model(run, base, spec, stage, cfg, scheduler, b.to_numpy(prior, ema.shadow))


def _drop_captions(text: TextCondition, uncond: TextCondition, drop: np.ndarray) -> TextCondition:
    """Rows where `drop` is set take the empty caption's condition (classifier-free guidance's training)."""
    if not drop.any():
        return text
    embeds, states, mask = text.embeds.copy(), text.states.copy(), text.mask.copy()
    embeds[drop], states[drop], mask[drop] = uncond.embeds[0], uncond.states[0], uncond.mask[0]
    return TextCondition(embeds, states, mask)


def _write_model(run: Path, base: Path, spec: ModelSpec, stage: str, cfg, scheduler, weights: dict) -> Path:
    """RUN/model: the base model's files with the trained component (EMA weights) and its scheduler."""
    with store.atomic_directory(run / "model", overwrite=True) as tmp:
        for name in spec.components:
            if name != stage:
                shutil.copyfile(store.component_path(base, spec, name), tmp / spec.components[name].weights)
        if (Path(base) / "tokenizer").is_dir():
            shutil.copytree(Path(base) / "tokenizer", tmp / "tokenizer")
        save_file(weights, str(tmp / f"{stage}.safetensors"))
        components = dict(spec.components)
        components[stage] = Component(cfg.TYPE, cfg, f"{stage}.safetensors")
        components = {k: components[k] for k in sorted(components, key=_flow_order)}
        schedulers = {**spec.schedulers, stage: scheduler}
        store.write_spec(tmp, dataclasses.replace(spec, components=components, schedulers=schedulers,
                                                  source=Source(str(run.absolute()), None, "dalle2_portable")))
    return run / "model"


def _flow_order(name: str) -> int:
    return COMPONENT_NAMES.index(name)
