"""Does a model understand its prompts? Measured on the generated pixels, with no model in the judge.

    from dalle2_portable.evaluate import evaluate, markdown_table
    report = evaluate(pipe, seeds=3)      # pipe = d2.load_pipeline(...): a text-to-image model
    report.accuracy["novel"]["joint"]     # Rate: passed / total of colour and shape both right
    report.checks["edit"]; print(markdown_table([report])); report.to_dict()   # JSON-ready, every picture

The grid is every colour x shape of the shapes data (`train/shapes.py`) in each phrasing of PHRASINGS: the
trained ones (TRAINED, the shapes.TEMPLATES that name only a colour and a shape) and NOVEL ones the model never
saw; each picture is named by `judge.judge`. Then four checks, each through the verb a user calls: variations
of pictures judged right keep their colour and shape; text-diff edits "a red circle" -> "a blue circle" change
the colour and keep the shape; text interpolations pass through in-between pictures (`interpolation_passes`
says exactly what that means); rerank with the model's own CLIP puts a picture judged right first. vary, edit
and rerank need a CLIP image encoder: a model without one reports them skipped, with the reason.
"""

from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import Dalle2Error
from .judge import Judgement, judge
from .train.shapes import COLOURS, SHAPES, TEMPLATES

__all__ = ["evaluate", "EvalReport", "Rate", "judge", "Judgement", "prompt_grid", "Prompt", "caption",
           "interpolation_passes", "markdown_table", "PHRASINGS", "TRAINED", "NOVEL", "CHECKS"]


# -- the prompt grid -------------------------------------------------------------------------------------------
def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


# The trained templates that name only a colour and a shape, and phrasings the model never saw in training.
TRAINED = tuple(t for t in TEMPLATES if _fields(t) == {"color", "shape"})
NOVEL = ("an image of a {color} {shape}", "{color} {shape}", "a drawing of one {color} {shape}",
         "a {shape} that is {color}")
PHRASINGS = TRAINED + NOVEL


@dataclass(frozen=True)
class Prompt:
    text: str
    color: str
    shape: str
    phrasing: str
    trained: bool  # the phrasing is one of shapes.TEMPLATES


def caption(phrasing: str, color: str, shape: str) -> str:
    """A phrasing filled in, with "an" before a vowel as the shapes data writes it ("an orange circle")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", phrasing.format(color=color, shape=shape))


def prompt_grid(colors=None, shapes=None, phrasings=PHRASINGS) -> list[Prompt]:
    """Every colour x shape x phrasing (default: all of shapes.COLOURS and shapes.SHAPES, PHRASINGS)."""
    colors, shapes = list(colors or COLOURS), list(shapes or SHAPES)
    for name, known in (("colour", COLOURS), ("shape", SHAPES)):
        bad = [x for x in (colors if name == "colour" else shapes) if x not in known]
        if bad:
            raise Dalle2Error(f"unknown {name} {bad[0]!r}; the shapes data has {', '.join(known)}")
    for p in phrasings:
        if _fields(p) != {"color", "shape"}:
            raise Dalle2Error(f"a phrasing names {{color}} and {{shape}} and nothing else, got {p!r}")
    return [Prompt(caption(p, c, s), c, s, p, p in TEMPLATES) for p in phrasings for c in colors for s in shapes]


# -- the evaluation --------------------------------------------------------------------------------------------
CHECKS = ("vary", "edit", "interpolate", "rerank")
EDITS = (("red", "circle", "blue"), ("blue", "square", "yellow"), ("green", "triangle", "red"),
         ("yellow", "circle", "purple"), ("black", "square", "white"), ("orange", "triangle", "green"))
INTERPOLATIONS = ((("red", "circle"), ("blue", "square")), (("green", "triangle"), ("yellow", "circle")),
                  (("white", "square"), ("black", "triangle")))
_QUICK_COLORS = ("red", "blue", "green")


@dataclass
class Rate:
    """passed of total; `skipped` says why a check did not run; `extra` holds a check's side counts."""

    passed: int = 0
    total: int = 0
    skipped: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def value(self) -> float | None:
        return self.passed / self.total if self.total else None

    def add(self, ok: bool) -> None:
        self.passed, self.total = self.passed + bool(ok), self.total + 1

    def __str__(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        text = f"{self.value:.2f} ({self.passed}/{self.total})" if self.total else "- (0)"
        return " ".join([text, *(f"{k} {v}" for k, v in self.extra.items())])


@dataclass
class EvalReport:
    """accuracy[kind][what]: kind "trained" / "novel" / "all" phrasings, what "color" / "shape" / "joint";
    checks[name] for CHECKS; samples: one record per grid image; details: each check's records."""

    model: str
    backend: str
    settings: dict
    accuracy: dict
    checks: dict
    samples: list
    details: dict

    def to_dict(self) -> dict:
        rate = lambda r: {**asdict(r), "rate": r.value}  # noqa: E731
        return {"model": self.model, "backend": self.backend, "settings": self.settings,
                "accuracy": {k: {w: rate(r) for w, r in v.items()} for k, v in self.accuracy.items()},
                "checks": {k: rate(r) for k, r in self.checks.items()}, "samples": self.samples,
                "details": self.details}


def interpolation_passes(frames: list[Judgement], start: tuple[str, str], end: tuple[str, str]) -> tuple[bool, str]:
    """The interpolation criterion: (1) the end frames judge as their captions; (2) some middle frame shows a
    shape that is neither end's picture (a mix such as a red square, another colour, or a shape the judge is
    unsure of); (3) the change is gradual: every frame has a foreground, and its colour projected on the line
    from the first frame's colour to the last's (0 -> 1) never moves back by more than 0.2."""
    if not (frames[0].matches(*start) and frames[-1].matches(*end)):
        return False, "an end frame is not its caption"
    if any(f.rgb is None for f in frames):
        return False, "a frame has no foreground on a plain background"
    middle = [(f.color, f.shape) not in (start, end) for f in frames[1:-1]]
    if not any(middle):
        return False, "no in-between frame"
    a, b = (np.array(frames[i].rgb, np.float64) for i in (0, -1))
    t = [float((np.array(f.rgb) - a) @ (b - a) / max(float((b - a) @ (b - a)), 1e-9)) for f in frames]
    if any(t1 < t0 - 0.2 for t0, t1 in zip(t, t[1:])):
        return False, "the colour goes back and forth"
    return True, "passes through in-between pictures"


def _chunks(items: list, n: int):
    return [items[i:i + n] for i in range(0, len(items), max(1, n))]


def _record(j: Judgement) -> dict:
    return {"judged_color": j.color, "judged_shape": j.shape, "confidence": round(j.confidence, 3),
            "note": j.note}


def _seeds(seeds, quick: bool) -> list[int]:
    if seeds is None:
        return [0] if quick else [0, 1, 2]
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise Dalle2Error(f"seeds must be a positive count or a list of seeds, got {seeds}")
        return list(range(int(seeds)))
    out = list(seeds) if isinstance(seeds, (list, tuple, range)) else None
    if not out or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0 for x in out):
        raise Dalle2Error(f"seeds must be a positive count or a list of seeds (integers >= 0), got {seeds!r}")
    return [int(x) for x in out]


def evaluate(pipe, seeds=None, phrasings=PHRASINGS, colors=None, shapes=None, batch_size: int = 16,
             quick: bool = False, checks=CHECKS, edit_amount: float = 0.5, frames: int = 5, log=None,
             **options) -> EvalReport:
    """Generate the prompt grid with `pipe` (a Pipeline), judge every image, and run the CHECKS.

    seeds: how many (an int: 0, 1, ...) or which (a list); default 3 (quick: 1); grid batch b of seed s is
    sampled with seed 1000 s + b. quick: three colour/shape pairs in one trained and one novel phrasing (in place
    of colors, shapes, phrasings) and one or two of each check. batch_size: images per verb call.
    options: the verbs' stage options (prior_steps, decoder_steps, ...), each left out = the model's default.
    log: a function taking progress lines. vary, edit and rerank need the model's CLIP image encoder; without
    one they are reported skipped with the reason."""
    if "prior" not in pipe.modules:
        raise Dalle2Error(f"model {str(pipe.model_dir)!r} has no prior, so it cannot generate from prompts; "
                          "evaluate a text-to-image model")
    checks = (checks,) if isinstance(checks, str) else tuple(checks)
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise Dalle2Error(f"unknown check {unknown[0]!r}; the checks are {', '.join(CHECKS)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise Dalle2Error(f"batch_size must be a positive integer, got {batch_size!r}")
    run = _Run(pipe, _seeds(seeds, quick), int(batch_size), log or (lambda line: None), options)
    return run(phrasings, colors, shapes, quick, checks, float(edit_amount), frames)


class _Run:
    def __init__(self, pipe, seeds, batch, log, options):
        self.pipe, self.seeds, self.batch, self.log, self.options = pipe, seeds, batch, log, options
        self.image_options = {k: v for k, v in options.items() if not k.startswith("prior_")}
        self.right = {}  # (color, shape) -> generated pictures judged right, in grid order

    def __call__(self, phrasings, colors, shapes, quick, checks, edit_amount, frames) -> EvalReport:
        if quick:
            pairs = list(zip(_QUICK_COLORS, SHAPES))
            grid = [Prompt(caption(p, c, s), c, s, p, p in TEMPLATES) for p in (TRAINED[0], NOVEL[0])
                    for c, s in pairs]
        else:
            grid = prompt_grid(colors, shapes, phrasings)
            cs, ss = list(colors or COLOURS), list(shapes or SHAPES)  # every pair, the shapes turning: varied early
            pairs = [(cs[i], ss[(i + k) % len(ss)]) for k in range(len(ss)) for i in range(len(cs))]
        samples = self.grid(grid)
        accuracy = {}
        for kind, keep in (("trained", True), ("novel", False), ("all", None)):
            rates = accuracy[kind] = {"color": Rate(), "shape": Rate(), "joint": Rate()}
            for r in samples:
                if keep is None or r["trained"] == keep:
                    rates["color"].add(r["judged_color"] == r["color"])
                    rates["shape"].add(r["judged_shape"] == r["shape"])
                    rates["joint"].add(r["judged_color"] == r["color"] and r["judged_shape"] == r["shape"])
        few = 1 if quick else 3
        plan = {"vary": lambda: self.vary([p for p in pairs if p in self.right][:2 * few], 1 if quick else 2),
                "edit": lambda: self.edit(EDITS[:2 * few], 1 if quick else 2, edit_amount),
                "interpolate": lambda: self.interpolate(INTERPOLATIONS[:few], frames),
                "rerank": lambda: self.rerank(pairs[:2 * few], 3 if quick else 4)}
        results = {}
        for name in CHECKS:
            if name not in checks:
                results[name] = (Rate(skipped="not asked for"), [])
                continue
            self.log(f"{self.pipe.backend.name}: {name}")
            results[name] = plan[name]()
        settings = {"seeds": self.seeds, "batch_size": self.batch, "quick": quick, "edit_amount": edit_amount,
                    "frames": frames, "options": self.options, "defaults": self.pipe.defaults.to_dict()}
        return EvalReport(self.pipe.spec.source.repo or str(self.pipe.model_dir), self.pipe.backend.name, settings,
                          accuracy, {k: v[0] for k, v in results.items()}, samples,
                          {k: v[1] for k, v in results.items()})

    def grid(self, grid: list[Prompt]) -> list[dict]:
        samples = []
        for seed in self.seeds:
            for b, chunk in enumerate(_chunks(grid, self.batch)):
                self.log(f"{self.pipe.backend.name}: seed {seed}, images {b * self.batch + len(chunk)}/{len(grid)}")
                call_seed = 1000 * seed + b
                out = self.pipe.generate([p.text for p in chunk], seed=call_seed, **self.options)
                for i, (p, image) in enumerate(zip(chunk, out.images)):
                    j = judge(image)
                    if j.matches(p.color, p.shape):
                        self.right.setdefault((p.color, p.shape), []).append(image)
                    samples.append({**asdict(p), "seed": call_seed, "index": i, **_record(j)})
        return samples

    def _encoder(self) -> str | None:
        if "image_encoder" not in self.pipe.clip.modules:
            return "the model has no CLIP image encoder"
        return None

    def vary(self, pairs, n):
        """Variations of pictures judged right keep their colour and shape."""
        if self._encoder() or not pairs:
            return Rate(skipped=self._encoder() or "no generated picture was judged right"), []
        rate, details = Rate(), []
        for chunk in _chunks(pairs, self.batch // n):
            out = self.pipe.vary([self.right[p][0] for p in chunk], num_images=n, seed=0, **self.image_options)
            for k, image in enumerate(out.images):
                (c, s), j = chunk[k // n], judge(image)
                rate.add(j.matches(c, s))
                details.append({"color": c, "shape": s, **_record(j)})
        return rate, details

    def edit(self, edits, n, amount):
        """edit(picture of "a {c} {s}", source="a {c} {s}", target="a {c2} {s}"): colour changed, shape kept."""
        if self._encoder():
            return Rate(skipped=self._encoder()), []
        phrase = TRAINED[0]
        missing = sorted({(c, s) for c, s, _ in edits} - set(self.right))
        if missing:  # sources the grid did not provide: generate them, and keep those judged right
            out = self.pipe.generate([caption(phrase, c, s) for c, s in missing], seed=0, **self.options)
            for (c, s), image in zip(missing, out.images):
                if judge(image).matches(c, s):
                    self.right.setdefault((c, s), []).append(image)
        rate, details = Rate(extra={"color changed": 0, "shape kept": 0, "sources wrong": 0}), []
        for c, s, c2 in edits:
            if (c, s) not in self.right:
                rate.extra["sources wrong"] += 1
                continue
            out = self.pipe.edit(self.right[(c, s)][0], source=caption(phrase, c, s), target=caption(phrase, c2, s),
                                 amount=amount, num_images=n, seed=0, **self.image_options)
            for image in out.images:
                j = judge(image)
                rate.add(j.matches(c2, s))
                rate.extra["color changed"] += j.color == c2
                rate.extra["shape kept"] += j.shape == s
                details.append({"color": c, "shape": s, "target_color": c2, **_record(j)})
        if not rate.total:
            rate.skipped = "no source picture was judged right"
        return rate, details

    def interpolate(self, pairs, frames):
        """Text interpolation from one caption to another passes through in-between pictures."""
        rate, details = Rate(), []
        for start, end in pairs:
            out = self.pipe.interpolate(caption(TRAINED[0], *start), caption(TRAINED[0], *end), frames=frames,
                                        kind="text", seed=0, **self.options)
            judged = [judge(image) for image in out.images]
            ok, why = interpolation_passes(judged, start, end)
            rate.add(ok)
            details.append({"start": start, "end": end, "passes": ok, "why": why,
                            "frames": [_record(j) for j in judged]})
        return rate, details

    def rerank(self, pairs, candidates):
        """rerank with the model's own CLIP puts a picture judged right first."""
        if self._encoder():
            return Rate(skipped=self._encoder()), []
        rate, details, right = Rate(extra={"candidates right": ""}), [], Rate()
        for chunk in _chunks(pairs, self.batch // candidates):
            out = self.pipe.rerank([caption(TRAINED[0], c, s) for c, s in chunk], candidates=candidates, seed=0,
                                   **self.options)
            for k, (c, s) in enumerate(chunk):
                judged = [judge(image) for image in out.images[k * candidates:(k + 1) * candidates]]
                rate.add(judged[0].matches(c, s))
                for j in judged:
                    right.add(j.matches(c, s))
                details.append({"color": c, "shape": s, "judged": [_record(j) for j in judged]})
        rate.extra["candidates right"] = f"{right.passed}/{right.total}"
        return rate, details


_ROWS = [(f"{what}, {kind} phrasings", kind, key) for kind in ("trained", "novel", "all")
         for what, key in (("colour", "color"), ("shape", "shape"), ("colour and shape", "joint"))]
_CHECK_ROWS = {"vary": "variations keep colour and shape", "edit": "edit changes the colour, keeps the shape",
               "interpolate": "interpolation passes through in-between pictures",
               "rerank": "rerank (own CLIP) puts a right picture first"}


def markdown_table(reports: list[EvalReport]) -> str:
    """One Markdown table, a column per report (backend): rates with their counts."""
    r0 = reports[0]
    sampling = ", ".join(f"{k} {v}" for k, v in r0.settings["options"].items()) or "the model's defaults"
    n = len(r0.settings["seeds"])
    lines = [f"{r0.model}: {len(r0.samples)} pictures per backend ({len(r0.samples) // n} prompts x {n} "
             f"seed{'s' * (n > 1)}); sampling: {sampling}", "",
             "| | " + " | ".join(r.backend for r in reports) + " |", "|---|" + "---|" * len(reports)]
    lines += [f"| {label} | " + " | ".join(str(r.accuracy[kind][key]) for r in reports) + " |"
              for label, kind, key in _ROWS]
    lines += [f"| {label} | " + " | ".join(str(r.checks[name]) for r in reports) + " |"
              for name, label in _CHECK_ROWS.items()]
    return "\n".join(lines)
