"""The training loop, written once for every backend: data, NumPy draws, AdamW with warm-up and cosine decay,
EMA, checkpoints and resume, metrics; the backend only runs `train_step`.

    d2.train("prior", data="shapes", out="runs/prior", model="my-model", config="tiny", steps=2000)

A run directory holds everything the run needs to continue, on either backend:
    RUN/run.json          the stage, the settings, the base model, the data, the trained component's config
    RUN/embeddings/       the frozen CLIP outputs of the data (train/data.py `cache_embeddings`)
    RUN/checkpoint/       the last checkpoint (train/checkpoint.py), replaced atomically
    RUN/metrics.jsonl     one line per step: step, loss, learning rate, gradient norm, samples per second
    RUN/loss.png          the loss curve, redrawn at every checkpoint
    RUN/model/            the result, written after the last step: the base model with the trained component
                          (its EMA weights), a model directory every verb loads

Every random number a step uses (which items, timesteps, noise, which captions are dropped for
classifier-free guidance) comes from one NumPy Generator whose state the checkpoint keeps, so a resumed run
draws what the uninterrupted run would have drawn, and both backends see the same draws. LoRA dropout's masks
are NumPy draws too, keyed by the seed, the step and the layer (modules/lora.py), so a resumed run drops the
same elements.

The stages (what each trains, its batch and its loss) are in stages.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from .. import store
from ..backends import get_backend
from ..clip import CLIP
from ..convert import resolve_model
from ..distributed import across
from ..errors import Dalle2Error
from ..images import write_atomic
from ..lora import Adapter, LoRALayer, write_adapter
from ..modules import gradient_checkpointing
from ..modules.prior import attended_length
from ..modules.lora import DEFAULT_TARGETS, LoRADropout
from ..modules.init import initial_weights
from ..pipeline import tqdm_progress
from ..schedule import UnCLIPSchedule
from ..spec import COMPONENT_NAMES, PREDICTION_TYPES, Component, ModelSpec, Source
from . import checkpoint as ckpt_io
from .curve import write_curve
from .data import Dataset, ImageFolder, cache_embeddings, embedding_size
from .preview import write_preview
from .seed import seed_model
from .optim import EMA, ema_decay, learning_rate
from .settings import TrainSettings, component_configs
from .shapes import ShapesDataset
from .stages import BATCHES, COMPONENTS, FROZEN, LOSSES, PRESETS, SCHEDULERS, preset_configs

STAGES = tuple(COMPONENTS)
CLIP_INITIAL_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # a LoRA run's result in RUN/lora, diffusers' name


def load_data(data: str | Dataset, settings: TrainSettings) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if str(data) == "shapes":
        return ShapesDataset(length=settings.data_size, seed=settings.seed)
    if not Path(data).is_dir():
        raise Dalle2Error(f"--data {data!r}: give `shapes` or a folder with metadata.jsonl")
    return ImageFolder(data, strict=settings.strict)


def _configs(stage: str, spec: ModelSpec, embeddings, config: str | None, settings: TrainSettings) -> dict:
    """{component: config} to train: the base model's (fine-tuning), or a preset sized from the CLIP."""
    if config is None:
        missing = [c for c in COMPONENTS[stage] if c not in spec.components]
        if missing:
            raise Dalle2Error(f"the base model has no {missing[0]} to fine-tune; pass --config tiny|small to train "
                              f"the {stage} from scratch")
        return {c: spec.components[c].config for c in COMPONENTS[stage]}
    if str(config).endswith(".json"):  # a preset with some fields replaced (settings.component_configs)
        return component_configs(config, lambda preset: _configs(stage, spec, embeddings, preset, settings))
    if config not in PRESETS:
        raise Dalle2Error(f"unknown --config {config!r}; choose one of {', '.join(PRESETS)} or a FILE.json")
    if stage in ("super_res", "clip"):
        return preset_configs(stage, config, 0, 0, settings.image_size, base=spec)
    width, states = embeddings.text.embeds.shape[1], embeddings.text.states.shape
    if stage == "prior" and states[2] != width:
        raise Dalle2Error(f"the CLIP's text width ({states[2]}) differs from its embedding width ({width}); "
                          "unCLIP's prior reads both through one width, so use a CLIP whose hidden size equals its "
                          "projection size")
    return preset_configs(stage, config, width, states[1], settings.image_size)


def _check_run(run: Path, record: dict, resume: bool) -> None:
    path = run / "run.json"
    if not resume:
        if path.exists():
            raise Dalle2Error(f"{str(run)!r} already holds a run; pass --resume to continue it, or another --out")
        return
    if not path.is_file():
        raise Dalle2Error(f"{str(run)!r} holds no run to resume; start it without --resume")
    before = store.read_json(path, "the run's run.json is damaged; start a new run")
    for key in ("stage", "base_model", "data", "config", "clip"):
        if before.get(key) != record.get(key):
            raise Dalle2Error(f"--resume: this run was started with a different {key} ({before.get(key)!r}); "
                              "resume it with the same settings")


def train(stage: str, data, out, model=None, config: str | None = None, settings: TrainSettings | None = None,
          backend="auto", device: str | None = None, resume: bool = False, progress: bool = False,
          stop_at: int | None = None, clip: str | None = None) -> Path | None:
    """Train one stage; returns the result's model directory (RUN/model). See the module docstring.
    `clip`: a model whose CLIP image tower encodes the data, for a base model without one (Karlo: the ViT-L/14
    of openai/clip-vit-large-patch14); the base model's text tower encodes the captions.
    `stop_at`: checkpoint and stop after that step (the schedule still runs to `settings.steps`; continue with
    resume=True); returns None then."""
    if stage not in STAGES:
        raise Dalle2Error(f"unknown stage {stage!r}; this version trains: {', '.join(STAGES)}")
    settings = settings or TrainSettings(steps=1000)
    if settings.lora_rank is not None and (config is not None or settings.prediction is not None):
        raise Dalle2Error(f"--lora adapts the base model's {stage} as it is; drop --config and --prediction")
    if settings.sr_crop is not None and stage != "super_res":
        raise Dalle2Error(f"--sr-crop trains the super-res stage on crops; the {stage} trains on whole pictures, "
                          "so drop --sr-crop")
    run = Path(out)
    dataset = load_data(data, settings)
    if model is None:  # from nothing: CLIP seeds its tokenizer and towers, an upsampler an empty model (seed.py)
        if stage not in ("clip", "super_res") or config is None:
            raise Dalle2Error("no base model: give --model; from nothing only the CLIP stage (dalle2 train clip "
                              "--config tiny) and the upsampler (dalle2 train super-res --config tiny --low-size "
                              "N), which sees pixels only, train; the prior and the decoder build on CLIP's result")
        base = (run / "seed").absolute()
    else:
        base = resolve_model(model)
    source = None if isinstance(data, Dataset) else "shapes" if str(data) == "shapes" else str(Path(data).absolute())
    record = {"stage": stage, "base_model": str(Path(base).absolute()), "data": dataset.describe(),
              "data_source": source, "config": config,  # source: what --from relaunches (None: a Python object)
              "clip": None if clip is None else str(Path(resolve_model(clip)).absolute()),
              "settings": dataclasses.asdict(settings)}
    b = get_backend(backend, device=device)
    world = b.join()  # one process, or this one's place among those torchrun / mlx.launch started
    if world.size > 1:
        if stage == "clip":
            raise Dalle2Error("the CLIP stage trains in one process (its contrastive loss compares every caption "
                              "with every picture of the batch); start it without the launcher")
        world.part(settings.batch_size)  # splits evenly, or one line
        progress = progress and world.writer
    _check_run(run, record, resume)
    _barrier(b, world, "starting the run")  # every rank checked the run directory before rank 0 writes to it
    record["backend"], record["device"] = b.name, device
    if model is None:
        if world.writer:
            run.mkdir(parents=True, exist_ok=True)
            seed_model(base, dataset, b, config if config in PRESETS else "tiny", settings.image_size,
                       settings.seed, stage)
        _barrier(b, world, "writing the seed model")
    spec = store.read_spec(base)
    quantized = [n for n in COMPONENTS[stage] if n in spec.components and spec.components[n].quantization]
    if quantized and config is None:  # fine-tuning reads float weights
        how = spec.components[quantized[0]].quantization.describe()
        raise Dalle2Error(f"the base model's {quantized[0]} is quantized ({how}); train from the float model it was "
                          "made from, then quantize the result")
    image_clip, clip, embeddings, uncond = record["clip"], None, None, None
    if stage == "clip":  # its own tokenizer and preprocessing, the towers to train
        missing = [c for c in COMPONENTS[stage] if c not in spec.components]
        if missing:
            raise Dalle2Error(f"the base model has no {missing[0]}; the CLIP stage trains both towers (and takes "
                              "the base model's tokenizer and image size)")
        clip = CLIP(base, b, spec)
    elif stage != "super_res":  # the upsamplers see pixels only
        clip = CLIP(base, b, spec)
        if image_clip:
            clip = clip.with_image_tower(CLIP(image_clip, b))
        if "image_encoder" not in clip.modules:
            raise Dalle2Error(f"the base model has no CLIP image encoder, and the {stage} trains on CLIP image "
                              "embeddings; pass --clip with the CLIP it was trained with (Karlo: "
                              "openai/clip-vit-large-patch14)")
        if world.writer:  # rank 0 encodes the data and writes the cache; the others read it
            embeddings = cache_embeddings(dataset, clip, run / "embeddings", progress=progress)
        _barrier(b, world, "caching the CLIP embeddings")
        if not world.writer:
            embeddings = cache_embeddings(dataset, clip, run / "embeddings")
        uncond = clip.text_condition([""])
    low_size = _low_size(spec, settings) if stage == "super_res" else None
    configs = _configs(stage, spec, embeddings, config, settings)
    _check_crop(stage, configs, settings)
    scheduler = _scheduler(stage, spec, settings)
    record["components"] = {name: cfg.to_dict() for name, cfg in configs.items()}
    if world.writer:
        record["processes"] = world.size
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "run.json", lambda f: f.write(json.dumps(record, indent=1).encode()), True, ".json")

    held = "bfloat16" if settings.lora_rank is not None and settings.dtype == "bfloat16" else None
    parts = {name: _component(b, base, spec, name, cfg, config is None, settings.seed, embeddings, held)
             for name, cfg in configs.items()}
    if stage == "clip":  # the temperature: the base model's when fine-tuning, else CLIP's initial one
        parts["logit_scale"] = b.build("clip_logit_scale", None)
        start_scale = spec.defaults.clip_logit_scale if config is None else None
        b.load_weights(parts["logit_scale"], {"logit_scale": np.array(start_scale or CLIP_INITIAL_SCALE, np.float32)})
    bundle = b.bundle(parts)
    frozen = FROZEN[stage] + tuple(settings.freeze)
    dropout = LoRADropout(settings.lora_dropout) if settings.lora_dropout else None
    if settings.lora_rank is not None:  # the adapters train, every other weight stays
        frozen = _add_lora(b, bundle, stage, settings, dropout)
    gradient_checkpointing(bundle, settings.gradient_checkpointing)
    loss_fn = LOSSES[stage] if dropout is None else dropout.loss(LOSSES[stage])
    step_fn = b.train_step(bundle, loss_fn, settings.optimizer, frozen, dtype=settings.dtype)

    def trained(weights: dict) -> dict:  # what the EMA and the checkpoints hold: a LoRA run's adapters alone
        return {k: v for k, v in weights.items() if ".lora_" in k} if settings.lora_rank is not None else weights

    ema = EMA(trained(b.weights(bundle)))
    rng, start = np.random.default_rng(settings.seed), 0
    metrics = run / "metrics.jsonl"
    lines = []
    if resume:
        saved = ckpt_io.load(run)
        b.load_weights(bundle, saved.weights, partial=settings.lora_rank is not None)  # LoRA: the adapters
        step_fn.load_state(saved.optimizer)
        ema = EMA(b.from_numpy(bundle, saved.ema))
        rng, start = ckpt_io.rng_from_state(saved.rng), saved.step
        if metrics.is_file():  # the lines after the checkpoint are drawn again
            lines = [x for x in metrics.read_text().splitlines(True) if json.loads(x)["step"] <= start]
    if world.writer:
        write_atomic(metrics, lambda f: f.write("".join(lines).encode()), True, ".jsonl")
    curve = [json.loads(x)["loss"] for x in lines]

    ctx = _Context(settings, scheduler and UnCLIPSchedule(scheduler), embeddings, uncond, dataset)
    if stage == "prior":  # the prior's targets: image embeddings normalised by its CLIP statistics
        state = b.state_dict(bundle)
        ctx.targets = (embeddings.image_embeddings() - state["prior.clip_mean"]) / state["prior.clip_std"]
        ctx.text_length = attended_length(np.concatenate([embeddings.text.mask, uncond.mask]))
    elif stage == "decoder":
        ctx.image_size = configs["decoder"].sample_size
        ctx.extra_tokens = configs["text_proj"].clip_extra_context_tokens
    elif stage == "clip":
        ctx.clip, ctx.image_size = clip, embedding_size(clip)
    else:  # the super-res UNet's size, and the decoder's that it upsamples from
        ctx.image_size, ctx.low_size = configs["super_res_first"].sample_size, low_size
    n, bs = len(dataset), settings.batch_size
    end = settings.steps if stop_at is None else min(settings.steps, stop_at)
    # a super-res UNet trained from scratch serves every step: the base's super_res_last belonged to another
    drop = ("super_res_last",) if stage == "super_res" and config is not None else ()

    def result(step: int) -> Path:  # RUN/model (or RUN/lora's adapter) with the EMA weights so far, its preview
        if not world.writer:  # rank 0 writes it
            return run / "lora" / ADAPTER_FILE if settings.lora_rank is not None else run / "model"
        weights = b.to_numpy(bundle, ema.shadow)
        if settings.lora_rank is not None:
            out = _write_adapter(run, weights, settings)
            model, lora = base, [(out, 1.0)]
        else:
            out = model = _write_model(run, base, spec, configs, scheduler, stage, weights, drop, low_size)
            lora = []
        if settings.preview_every and stage != "clip":
            write_preview(run, step, stage, model, b, dataset, lora)
        return out

    iterator = range(start, end)
    if progress:
        iterator = tqdm_progress(iterator, f"train {stage}", end - start)
    part = world.part(bs)  # this process's rows of each global batch (all of them in one process)
    last_saved = f"the last checkpoint (step {start}) is intact: resume it with --resume"
    with open(metrics if world.writer else os.devnull, "a") as log:
        for i in iterator:
            t0 = time.perf_counter()
            batches = [BATCHES[stage](ctx, rng, rng.choice(n, bs, replace=n < bs), part)
                       for _ in range(settings.accumulate)]
            lr = learning_rate(i, settings.lr, settings.warmup, settings.steps)
            with across(world, f"step {i + 1}", last_saved), (
                    contextlib.nullcontext() if dropout is None else dropout.step(settings.seed, 2, i)):
                loss = step_fn.accumulate(batches, lr=lr)  # LoRA dropout's masks keyed by the seed and the step
                if world.size > 1:  # the whole batch's loss: the mean of the processes' slices'
                    loss = b.average([loss])[0]
            ema.update(trained(b.weights(bundle)), ema_decay(i + 1, max_decay=settings.ema_max_decay))
            b.sync(ema.shadow)
            speed = bs * settings.accumulate / (time.perf_counter() - t0)
            log.write(json.dumps({"step": i + 1, "loss": loss, "lr": lr, "grad_norm": step_fn.grad_norm,
                                  "samples_per_s": speed}) + "\n")
            log.flush()
            curve.append(loss)
            if progress:
                iterator.set_postfix(loss=f"{loss:.4g}", samples_s=f"{speed:.1f}")
            if world.writer and ((i + 1) % settings.checkpoint_every == 0 or i + 1 == end):
                kept = b.state_dict(bundle) if settings.lora_rank is None else b.to_numpy(
                    bundle, trained(b.weights(bundle)))
                ckpt_io.save(run, ckpt_io.Checkpoint(i + 1, kept, b.to_numpy(bundle, ema.shadow),
                                                     step_fn.state(), rng.bit_generator.state, {}))
                write_curve(run / "loss.png", curve, f"{stage} on {dataset.describe()}, {b.name}")
                last_saved = f"the last checkpoint (step {i + 1}) is intact: resume it with --resume"
            if settings.preview_every and (i + 1) % settings.preview_every == 0 and i + 1 < settings.steps:
                result(i + 1)
    if end < settings.steps:
        _barrier(b, world, "the last checkpoint")
        return None
    out = result(end)
    _barrier(b, world, "writing the result")  # every rank returns once rank 0 has written it
    return out


def _barrier(b, world, what: str) -> None:
    """Wait for every training process (a no-op in one), bounded by distributed.across."""
    if world.size > 1:
        with across(world, what, "nothing of the run was lost"):
            b.average([0.0])


def _add_lora(b, bundle, stage: str, settings: TrainSettings, dropout) -> tuple[str, ...]:
    """LoRA factors on the bundle's matching Linears, A drawn in NumPy (PEFT's kaiming-uniform bound 1/sqrt(in),
    from the run's seed) and loaded alone (a bfloat16 base stays as it was read), B zero, their input dropped
    by `dropout` (a LoRADropout or None); returns every other weight's name: what the step keeps as it is."""
    targets = settings.lora_targets or DEFAULT_TARGETS
    paths = b.add_lora(bundle, settings.lora_rank, settings.lora_alpha or settings.lora_rank, targets, dropout)
    if not paths and settings.lora_targets is None:
        raise Dalle2Error(f"the {stage} has no attention projection to adapt; name its Linears with "
                          "--lora-targets REGEX (e.g. '.*time_emb_proj')")
    if not paths:
        raise Dalle2Error(f"--lora-targets {targets!r} matches no Linear of the {stage}'s components; paths read "
                          "like decoder.mid_block.attentions.0.to_q")
    weights, rng = b.weights(bundle), np.random.default_rng([settings.seed, 1])
    factors = {}
    for path in paths:  # B is zero already (modules/lora.py)
        rank, width = weights[f"{path}.lora_A.weight"].shape
        draw = rng.uniform(-1, 1, (rank, width)).astype(np.float32) / np.sqrt(width)
        factors[f"{path}.lora_A.weight"] = draw.astype(np.float32)
    b.load_weights(bundle, factors, partial=True)
    return tuple(k for k in weights if ".lora_" not in k)


def _write_adapter(run: Path, weights: dict, settings: TrainSettings) -> Path:
    """RUN/lora/pytorch_lora_weights.safetensors: the adapters of the EMA weights, in diffusers' dialect."""
    layers = {}
    for key, down in weights.items():
        if key.endswith(".lora_A.weight"):
            component, _, module = key.removesuffix(".lora_A.weight").partition(".")
            up = weights[key.replace(".lora_A.", ".lora_B.")]
            layers[(component, module)] = LoRALayer(down, up, float(settings.lora_alpha or settings.lora_rank))
    (run / "lora").mkdir(exist_ok=True)
    return write_adapter(run / "lora" / ADAPTER_FILE,
                         Adapter(layers, dropout=settings.lora_dropout))


def _low_size(spec: ModelSpec, settings: TrainSettings) -> int:
    """The side of the small image a super-res UNet learns to upsample: the base model's decoder's, or
    --low-size (which must agree with a decoder the base model has)."""
    decoder = spec.components.get("decoder")
    size = spec.defaults.decoder_sample_size or (decoder.config.sample_size if decoder else None)
    if settings.low_size is None and size is None:
        raise Dalle2Error("the base model has no decoder to upsample from; pass --low-size N (the --image-size "
                          "of the decoder this upsampler will follow)")
    if settings.low_size is not None and decoder is not None and settings.low_size != size:
        raise Dalle2Error(f"--low-size {settings.low_size} differs from the base model's decoder ({size} px); "
                          "drop --low-size or pass the decoder's size")
    return settings.low_size or size


def _check_crop(stage: str, configs: dict, settings: TrainSettings) -> None:
    """--sr-crop: no larger than the upsampler's pictures, and a multiple of its UNet's downsampling."""
    crop = settings.sr_crop
    if crop is None or stage != "super_res":
        return
    cfg = configs["super_res_first"]
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if crop > (cfg.sample_size or crop) or crop % factor:
        raise Dalle2Error(f"--sr-crop {crop} must be at most the upsampler's {cfg.sample_size} px and a multiple of "
                          f"{factor}, the factor its UNet downsamples by")


def _scheduler(stage: str, spec: ModelSpec, settings: TrainSettings):
    """The stage's scheduler: the base model's (else Karlo's), predicting `settings.prediction` if given; the
    result's model.json records it, so sampling reads the prediction the model was trained on."""
    if stage == "clip":
        if settings.prediction or settings.min_snr_gamma:
            raise Dalle2Error("the CLIP stage is no diffusion: drop --prediction and --min-snr-gamma")
        return None
    scheduler = spec.schedulers.get(stage, SCHEDULERS[stage])
    if settings.prediction:
        scheduler = dataclasses.replace(scheduler, prediction_type=settings.prediction)
    return scheduler


@dataclass
class _Context:
    """What a stage's batch function reads (stages.py)."""

    settings: TrainSettings
    schedule: UnCLIPSchedule | None  # None for CLIP, which is no diffusion
    embeddings: object
    uncond: object
    dataset: Dataset
    targets: np.ndarray | None = None
    image_size: int | None = None
    extra_tokens: int | None = None
    low_size: int | None = None
    clip: CLIP | None = None
    text_length: int | None = None  # the prior's text positions: up to the data's last attended token


def _component(b, base: Path, spec: ModelSpec, name: str, cfg, fine_tune: bool, seed: int, embeddings,
               dtype: str | None = None):
    """One component to train: the base model's weights (in `dtype`: a bfloat16 LoRA run's frozen base, read
    a tensor at a time), or NumPy's initial weights (the same on every backend; a prior's CLIP statistics
    those of the data)."""
    if fine_tune:
        return b.load_component(cfg.TYPE, cfg, str(store.component_path(base, spec, name)), dtype)
    module = b.build(cfg.TYPE, cfg)
    weights = initial_weights(b.parameter_shapes(cfg.TYPE, cfg), seed)
    if name == "prior":
        images = embeddings.image_embeddings()
        weights["clip_mean"] = images.mean(0, keepdims=True).astype(np.float32)
        weights["clip_std"] = images.std(0, keepdims=True).astype(np.float32)
    b.load_weights(module, weights)
    return module


def _write_model(run: Path, base: Path, spec: ModelSpec, configs: dict, scheduler, stage: str, weights: dict,
                 drop: tuple[str, ...] = (), low_size: int | None = None) -> Path:
    """RUN/model: the base model's files (but `drop`) with the trained components (EMA weights) and the stage's
    scheduler. An upsampler's model records the decoder size it upsamples from (`low_size`)."""
    with store.atomic_directory(run / "model", overwrite=True) as tmp:
        components = {k: c for k, c in spec.components.items() if k not in drop}
        for name in components:
            if name not in configs:
                shutil.copyfile(store.component_path(base, spec, name), tmp / spec.components[name].weights)
        if (Path(base) / "tokenizer").is_dir():
            shutil.copytree(Path(base) / "tokenizer", tmp / "tokenizer")
        for name, cfg in configs.items():
            prefix = f"{name}."
            save_file({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                      str(tmp / f"{name}.safetensors"))
            components[name] = Component(cfg.TYPE, cfg, f"{name}.safetensors")
        components = {k: components[k] for k in sorted(components, key=COMPONENT_NAMES.index)}
        defaults = spec.defaults
        if "decoder" in configs:
            defaults = dataclasses.replace(defaults, decoder_sample_size=configs["decoder"].sample_size)
        if "super_res_first" in configs:
            defaults = dataclasses.replace(defaults, super_res_sample_size=configs["super_res_first"].sample_size,
                                           decoder_sample_size=low_size)
        if "logit_scale.logit_scale" in weights:
            defaults = dataclasses.replace(defaults, clip_logit_scale=float(weights["logit_scale.logit_scale"]))
        schedulers = {**spec.schedulers, stage: scheduler} if scheduler is not None else spec.schedulers
        store.write_spec(tmp, dataclasses.replace(spec, components=components, defaults=defaults,
                                                  schedulers=schedulers,
                                                  source=Source(str(run.absolute()), None, "dalle2_portable")))
    return run / "model"
