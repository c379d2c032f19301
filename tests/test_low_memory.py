"""`low_memory=True` / `--low-memory`: each stage's weights loaded when it runs and dropped after (residency.py).
The images are the eager pipeline's, bit for bit; no two stages' weights are ever held together (the two
upsamplers included); nothing stays loaded after a call."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import BACKENDS, backend_params, cli
from PIL import Image

import dalle2_portable as d2
from dalle2_portable.lora import Adapter, LoRALayer, write_adapter

STEPS = dict(prior_steps=2, decoder_steps=2, super_res_steps=2)
TOGETHER = {"text_proj": {"decoder"}, "decoder": {"text_proj"}}  # the one stage of two components


def _watch(pipe) -> list[tuple[str, set[str]]]:
    """(component loaded, what else was alive at that moment) for every load the pipeline makes from now on:
    alive, not merely listed as held (a module the sampling loop still referenced would count)."""
    import gc
    import weakref

    seen, alive = [], {}
    for mapping in (pipe.modules, pipe.clip.modules):
        load = mapping._load

        def watched(name, load=load):
            gc.collect()
            seen.append((name, {n for n, ref in alive.items() if ref() is not None}))
            module = load(name)
            alive[name] = weakref.ref(module)
            return module

        mapping._load = watched
    return seen


@pytest.mark.parametrize("backend", backend_params())
def test_low_memory_generates_the_same_images_one_stage_at_a_time(models, backend):
    eager = d2.load_pipeline(models["karlo"], backend=backend)
    lean = d2.load_pipeline(models["karlo"], backend=backend, low_memory=True)
    assert lean.modules.held == [] and lean.clip.modules.held == []  # nothing loaded before the first call
    seen = _watch(lean)
    ours = lean.generate("a red circle", num_images=2, seed=3, **STEPS)
    assert [name for name, _ in seen] == ["text_encoder", "prior", "text_proj", "decoder", "super_res_first",
                                          "super_res_last"]
    for name, held in seen:  # what else was in memory when each was loaded
        assert held <= TOGETHER.get(name, set()), (name, held)
    assert lean.modules.held == [] and lean.clip.modules.held == []  # dropped after the call
    reference = eager.generate("a red circle", num_images=2, seed=3, **STEPS)
    assert np.array_equal(ours.samples, reference.samples), "low_memory changed the images"
    again = lean.generate("a red circle", num_images=2, seed=3, **STEPS)  # loads again, same result
    assert np.array_equal(again.samples, reference.samples)


def test_low_memory_variations_and_lora(models, tmp_path):
    """Image variations (the image tower's stage) and a LoRA adapter merged at each load: the eager images."""
    backend = BACKENDS[0]
    eager = d2.load_pipeline(models["iv"], backend=backend)
    state = eager.backend.state_dict(eager.modules["decoder"])
    rng = np.random.default_rng(0)
    module = next(k.removesuffix(".weight") for k in sorted(state) if k.endswith("attn1.to_q.weight")
                  or k.endswith("attentions.0.to_q.weight"))
    out_f, in_f = state[f"{module}.weight"].shape
    adapter = write_adapter(tmp_path / "a.safetensors", Adapter({("decoder", module): LoRALayer(
        rng.standard_normal((2, in_f)).astype(np.float32), rng.standard_normal((out_f, 2)).astype(np.float32), 2.0)}))
    picture = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    options = dict(decoder_steps=2, super_res_steps=2)
    reference = d2.load_pipeline(models["iv"], backend=backend, lora=[adapter]).vary(picture, seed=1, **options)
    lean = d2.load_pipeline(models["iv"], backend=backend, lora=[adapter], low_memory=True)
    seen = _watch(lean)
    out = lean.vary(picture, seed=1, **options)
    assert [name for name, _ in seen] == ["image_encoder", "text_encoder", "text_proj", "decoder", "super_res_first",
                                          "super_res_last"]
    for name, held in seen:
        assert held <= TOGETHER.get(name, set()), (name, held)
    assert np.array_equal(out.samples, reference.samples)
    plain = eager.vary(picture, seed=1, **options)
    assert not np.array_equal(plain.samples, reference.samples)  # the adapter is merged on the lazy path too


def test_the_cli_takes_low_memory(models, tmp_path):
    out = tmp_path / "a.png"
    cli("generate", "a red circle", "-m", models["karlo"], "--low-memory", "--prior-steps", 2, "--decoder-steps", 2,
        "--super-res-steps", 2, "-o", out, "--quiet")
    cli("generate", "a red circle", "-m", models["karlo"], "--prior-steps", 2, "--decoder-steps", 2,
        "--super-res-steps", 2, "-o", tmp_path / "b.png", "--quiet")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "b.png")))
    cli("generate", "--config-from-metadata", out, "-o", tmp_path / "c.png", "--low-memory", "--quiet")


_HEAP = """
import sys
import numpy as np
from dalle2_portable.residency import return_freed_memory
if sys.argv[1] == "fixed":
    assert return_freed_memory()
def anon():
    return int(next(x for x in open("/proc/self/status") if x.startswith("RssAnon")).split()[1]) >> 10
big = np.ones(16 << 17)  # 16 MiB, mapped on its own; freeing it raises glibc's threshold to 16 MiB ...
del big
blocks = [np.ones(4 << 17) for _ in range(100)]  # ... so that these 4 MiB blocks come from its heap
last = blocks[-1]  # the heap's top stays in use: what lies below it is not given back
before = anon()
del blocks
print(before - anon())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fix is for glibc's malloc, on Linux only")
def test_low_memory_gives_freed_activations_back_to_the_system():
    """With low_memory, freed blocks of 1 MiB or more go back to the system (residency.return_freed_memory):
    400 MiB of 4 MiB arrays freed below a live one are returned; with glibc's default threshold, which the
    first freed 16 MiB block raised, they stay in its heap."""
    freed = {how: int(subprocess.run([sys.executable, "-c", _HEAP, how], capture_output=True, text=True,
                                     check=True).stdout) for how in ("default", "fixed")}
    assert freed["fixed"] >= 380 and freed["default"] < 50, freed
