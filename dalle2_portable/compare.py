"""Cross-checking backends: one prompt, one seed, every stage of the cascade on two backends, compared.

    report = compare_backends("a corgi", model="kakaobrain/karlo-v1-alpha", backends=("torch", "mlx"), seed=0)
    print(report.table()); report.passed(tolerance=2)      # max pixel difference in 8-bit levels

The noise comes from one NumPy stream on both sides, so any difference is the backends' arithmetic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import Dalle2Error


@dataclass(frozen=True)
class StageDiff:
    """One stage's difference between the two backends: max |a - b| (in the stage's own units: embedding
    units for the prior, 8-bit levels for images) and, for images, PSNR in dB over [0, 255]."""

    stage: str
    shape: tuple[int, ...]
    max_abs: float
    psnr: float | None = None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two [-1, 1] images on a [0, 255] scale; inf when identical."""
    mse = float(np.mean(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) * 127.5) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


@dataclass
class CompareReport:
    backends: tuple[str, str]
    rows: list[StageDiff]
    outputs: dict = field(default_factory=dict)  # backend -> UnCLIPOutput
    seconds: dict = field(default_factory=dict)  # backend -> wall seconds of generate

    def worst_pixel(self) -> float:
        return max(r.max_abs for r in self.rows if r.psnr is not None)

    def passed(self, tolerance: float = 2.0) -> bool:
        """Every image stage within `tolerance` 8-bit levels (2 = the 2/255 the parity tests hold)."""
        return self.worst_pixel() <= tolerance

    def table(self) -> str:
        a, b = self.backends
        lines = [f"{'stage':<14}{'shape':<18}{'max |' + a + ' - ' + b + '|':>22}{'PSNR dB':>10}"]
        for r in self.rows:
            unit = "" if r.psnr is None else " /255"
            p = "-" if r.psnr is None else ("inf" if math.isinf(r.psnr) else f"{r.psnr:.1f}")
            lines.append(f"{r.stage:<14}{'x'.join(map(str, r.shape)):<18}{f'{r.max_abs:.3g}{unit}':>22}{p:>10}")
        lines.append(f"{'time':<14}" + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)

    def side_by_side(self) -> Image.Image:
        """The final images, one row per image: first backend left, second right."""
        a, b = (self.outputs[k].images for k in self.backends)
        w, h = a[0].size
        canvas = Image.new("RGB", (2 * w, h * len(a)), "white")
        for i, (x, y) in enumerate(zip(a, b)):
            canvas.paste(x, (0, i * h))
            canvas.paste(y, (w, i * h))
        return canvas


def compare_backends(prompt: str | list[str], model: str = "default", backends: tuple[str, str] = ("torch", "mlx"),
                     seed: int = 0, num_images: int = 1, dtype: str = "float32", revision: str | None = None,
                     progress: bool = False, **options) -> CompareReport:
    """Generate with the same seed and options on two backends; the per-stage differences. Each backend is
    NAME or NAME:DEVICE ("torch:cuda" vs "torch:cpu" compares two devices of one framework)."""
    from .pipeline import load_pipeline

    backends = tuple(str(b).strip() for b in backends)
    if len(backends) != 2 or backends[0] == backends[1]:
        raise Dalle2Error(f"compare needs two different backends (NAME or NAME:DEVICE), got {backends!r}")
    outputs, seconds = {}, {}
    for name in backends:
        framework, _, device = name.partition(":")
        pipe = load_pipeline(model, backend=framework, device=device or None, dtype=dtype, revision=revision,
                             progress=progress)
        start = time.perf_counter()
        outputs[name] = pipe.generate(prompt, num_images=num_images, seed=seed, **options)
        seconds[name] = time.perf_counter() - start
        del pipe
    x, y = (outputs[k] for k in backends)
    rows = [StageDiff("prior", x.image_embeddings.shape, float(np.abs(x.image_embeddings - y.image_embeddings).max()))]
    for stage, (p, q) in (("decoder", (x.decoder_samples, y.decoder_samples)), ("super-res", (x.samples, y.samples))):
        rows.append(StageDiff(f"{stage} {p.shape[-1]}", p.shape, float(np.abs(p - q).max() * 127.5), psnr(p, q)))
    return CompareReport(tuple(backends), rows, outputs, seconds)
