"""A training run's settings, and the JSON they travel in: `TrainSettings` (RUN/run.json "settings"), a run
re-launched from its run.json (`dalle2 train --from RUN/run.json`), and `--config FILE.json`, the sizes of
the components trained from scratch.

    --config FILE.json   {"preset": "tiny", "decoder": {"block_out_channels": [32, 64, 96]}}: the preset's
                         configs (default tiny) with these fields replaced, checked as model.json's are
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from .. import store
from ..backends.step import TRAIN_DTYPES
from ..errors import Dalle2Error
from ..spec import PREDICTION_TYPES
from .optim import AdamW

ACCEPTS = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), tuple: (tuple,)}


def is_json_type(value, kind: type) -> bool:
    """Whether `value` (read from JSON) is of `kind`: an int is a float, a bool is no number."""
    return isinstance(value, ACCEPTS[kind]) and (kind is bool or not isinstance(value, bool))


@dataclass(frozen=True)
class TrainSettings:
    """A run's settings (run.json "settings"); `steps` is the run's total, so a resumed run may extend it."""

    steps: int
    batch_size: int = 16
    lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    adam_eps: float = 1e-8
    freeze: tuple[str, ...] = ()  # weights or whole modules kept as they are, e.g. ("text_proj",)
    ema_max_decay: float = 0.9999
    cond_drop: float = 0.1  # prior: the caption; decoder: the image embedding
    caption_drop: float = 0.5  # decoder: the caption
    image_size: int = 32  # from scratch: the decoder's / the super-res UNet's sample size
    sr_noise: float = 0.0  # super-res: std of the noise added to the small image (augmentation)
    sr_crop: int | None = None  # super-res: train on random sr_crop px squares of the pictures (None: whole)
    low_size: int | None = None  # super-res: the small image's side (None: the base model's decoder's), so
    #                              an upsampler trains beside its decoder, from a base model that has none yet
    prediction: str | None = None  # what the UNet / prior learns to output (recorded in the model's scheduler):
    #                                "epsilon", "sample" (x0) or "v_prediction"; None: the base model's, else Karlo's
    lora_rank: int | None = None  # train LoRA adapters of this rank instead of the weights (base frozen)
    lora_alpha: float | None = None  # their alpha (scale alpha / rank; None: the rank, scale 1)
    lora_targets: str | None = None  # regex on module paths ("decoder.mid_block.attentions.0.to_q"); None:
    #                                  modules.lora.DEFAULT_TARGETS, the attention projections
    lora_dropout: float = 0.0  # dropout on the adapters' input (PEFT's lora_dropout; masks drawn in NumPy)
    min_snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023; 5 is the paper's)
    accumulate: int = 1  # micro-batches of batch_size per optimiser step (their gradients averaged)
    dtype: str = "float32"  # "bfloat16": mixed precision (float32 master weights, moments and update)
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass: less memory
    checkpoint_every: int = 100
    preview_every: int = 0  # RUN/previews/step-N.png every N steps and at the end (0: none; train/preview.py)
    seed: int = 0
    data_size: int = 1000  # items of the shapes data
    strict: bool = False  # an image folder's first bad record stops the run (else: reported and skipped)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # JSON-borne values of the wrong type: one line, not a TypeError
            value, kind = getattr(self, f.name), f.type.removesuffix(" | None")
            if value is None and f.type.endswith("| None"):
                continue
            if not is_json_type(value, {"bool": bool, "int": int, "float": float, "str": str}.get(kind, tuple)):
                raise Dalle2Error(f"setting {f.name} must be {kind}, got {value!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "data_size", "image_size", "accumulate"):
            if getattr(self, name) < 1:  # an int: checked above
                raise Dalle2Error(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("cond_drop", "caption_drop", "lora_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise Dalle2Error(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.low_size is not None and self.low_size < 8:
            raise Dalle2Error(f"low_size must be at least 8 px, got {self.low_size}")
        if self.sr_crop is not None and self.sr_crop < 8:
            raise Dalle2Error(f"sr_crop must be at least 8 px, got {self.sr_crop}")
        if self.sr_noise < 0:
            raise Dalle2Error(f"sr_noise must be >= 0, got {self.sr_noise}")
        if not 0.0 <= self.ema_max_decay < 1.0:
            raise Dalle2Error(f"ema must be in [0, 1) (0: no averaging), got {self.ema_max_decay}")
        if self.prediction is not None and self.prediction not in PREDICTION_TYPES:
            raise Dalle2Error(f"unknown prediction {self.prediction!r}; choose one of {', '.join(PREDICTION_TYPES)}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise Dalle2Error(f"lora_rank must be a positive integer, got {self.lora_rank}")
        if self.lora_dropout and self.lora_rank is None:
            raise Dalle2Error("lora_dropout drops the adapters' input; give lora_rank too (--lora R)")
        if self.lora_targets is not None:
            try:
                re.compile(self.lora_targets)
            except re.error as e:
                raise Dalle2Error(f"lora_targets {self.lora_targets!r} is not a regular expression ({e})") from None
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise Dalle2Error(f"min_snr_gamma must be positive (5 is usual), got {self.min_snr_gamma}")
        if self.dtype not in TRAIN_DTYPES:
            raise Dalle2Error(f"unknown dtype {self.dtype!r}; choose one of {', '.join(TRAIN_DTYPES)}")
        if self.preview_every < 0:
            raise Dalle2Error(f"preview_every must be >= 0 (0: no previews), got {self.preview_every}")
        self.optimizer  # AdamW checks its settings

    @property
    def optimizer(self) -> AdamW:
        return AdamW(lr=self.lr, eps=self.adam_eps, weight_decay=self.weight_decay,
                     max_grad_norm=self.max_grad_norm)


def settings_from(values: dict, where: str) -> TrainSettings:
    """TrainSettings from a JSON object (run.json "settings"); an unknown key is one line naming it."""
    names = [f.name for f in dataclasses.fields(TrainSettings)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise Dalle2Error(f"{where}: unknown setting {unknown[0]!r}; known settings are {', '.join(names)}")
    if "steps" not in values:
        raise Dalle2Error(f"{where}: no \"steps\"; give the run's total steps")
    return TrainSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def read_recipe(path) -> dict:
    """A run's launch record (RUN/run.json, or one written by hand with the same keys: "stage", "data",
    "base_model", "config", "settings", optional "backend" and "device"), checked before anything runs."""
    record = store.read_json(path, "give the run.json of an earlier run (dalle2 train --from RUN/run.json)")
    if not isinstance(record, dict):
        raise Dalle2Error(f"{str(path)!r}: expected a JSON object with stage, data, base_model and settings")
    missing = [k for k in ("stage", "base_model", "settings") if k not in record]
    missing += [] if "data" in record or "data_source" in record else ["data"]
    if missing:
        raise Dalle2Error(f"{str(path)!r}: no {missing[0]!r}; a run.json names the stage, data, base model and "
                          "settings")
    if not isinstance(record["settings"], dict):
        raise Dalle2Error(f"{str(path)!r}: \"settings\" must be a JSON object of training settings")
    settings_from(record["settings"], str(path))  # every setting checked now, before a long run
    return record


def component_configs(path: str, presets: dict) -> dict:
    """{component: config}: `presets` (the preset's configs, named by the file's "preset") with the file's
    fields replaced, each component checked as model.json's are. `presets(name)` gives a preset's configs."""
    where = f"--config {path}"
    doc = store.read_json(path, "give tiny, small or a JSON file of component sizes")
    if not isinstance(doc, dict):
        raise Dalle2Error(f"{where}: expected a JSON object such as {{\"preset\": \"tiny\", \"decoder\": {{...}}}}")
    preset = doc.get("preset", "tiny")
    configs = presets(preset)
    unknown = sorted(set(doc) - set(configs) - {"preset"})
    if unknown:
        raise Dalle2Error(f"{where}: {unknown[0]!r} is not trained by this stage; it trains "
                          f"{', '.join(configs)}")
    out = {}
    for name, cfg in configs.items():
        fields = doc.get(name, {})
        if not isinstance(fields, dict):
            raise Dalle2Error(f"{where}: {name!r} must be a JSON object of config fields")
        current = cfg.to_dict()
        for key, value in fields.items():  # the preset's value's JSON type (a field that may be null: any)
            like = current.get(key)
            if type(like) in ACCEPTS and not is_json_type(value, type(like)):
                raise Dalle2Error(f"{where}: {name}.{key} must be a JSON {type(like).__name__} as in the preset "
                                  f"({like!r}), got {value!r}")
        out[name] = type(cfg).from_dict({**current, **fields}, where)
    return out
