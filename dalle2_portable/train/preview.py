"""Preview images of a run, for fixed validation inputs, through the public pipeline (no second sampler): the
run's model directory (RUN/model, the EMA weights so far) loaded as every verb loads it.

    prior       `generate` of the validation captions (through the base model's decoder and upsamplers)
    decoder     `vary` of the validation images (their CLIP image embeddings decoded), under the originals
    super_res   the same, so the upsampler's output shows beside the images it should reach

RUN/previews/step-000100.png: one row per kind, the validation items in columns; the captions are in the
PNG's text metadata. The CLIP stage has no pixels to show: its validation figure is the retrieval accuracy.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..images import save_png
from .data import Dataset

ITEMS = 4  # validation items shown (the data's first ones: fixed for the whole run)
STEPS = dict(prior_steps=10, decoder_steps=10, super_res_steps=5)


def validation(dataset: Dataset) -> list[int]:
    return list(range(min(ITEMS, len(dataset))))


def write_preview(run: Path, step: int, stage: str, model_dir: Path, backend, dataset: Dataset,
                  lora=()) -> Path:
    """RUN/previews/step-{step:06d}.png of the model in `model_dir` (with the LoRA adapters `lora`, (file,
    scale) pairs, merged) on `backend`; returns the path."""
    from ..pipeline import Pipeline

    pipe = Pipeline(model_dir, backend, lora=lora)
    items = validation(dataset)
    captions = [dataset.caption(i) for i in items]
    if stage == "prior":
        rows = [pipe.generate(captions, seed=0, **STEPS).images]
    else:
        size = (pipe.defaults.super_res_sample_size or pipe.defaults.decoder_sample_size
                or pipe.spec.components["decoder"].config.sample_size)
        originals = [dataset.image(i, size) for i in items]
        options = {k: v for k, v in STEPS.items() if k != "prior_steps"}
        rows = [originals, pipe.vary(originals, seed=0, **options).images]
    width, height = max(im.width for r in rows for im in r), max(im.height for r in rows for im in r)
    grid = Image.new("RGB", (width * len(items), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((width, height), Image.NEAREST), (x * width, y * height))
    path = run / "previews" / f"step-{step:06d}.png"
    path.parent.mkdir(exist_ok=True)
    meta = {"stage": stage, "step": str(step), "captions": " | ".join(captions),
            "rows": "generated" if stage == "prior" else "originals, variations"}
    return save_png(grid, path, meta, overwrite=True)
