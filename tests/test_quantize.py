"""MLX 8-bit / 4-bit quantisation (quantize.py, `dalle2 quantize`): a model directory that loads as such.

What is checked, on the tiny Karlo of the `models` fixture (group size 32, the smallest MLX has, so that its
16-64-wide layers have rows to quantise):
- each quantised component's output against the float32 one, per call (the errors are stated below);
- the stored weights, dequantised in NumPy, equal what MLX dequantises, bit for bit; torch runs those weights;
- the directory loads through load_pipeline and generates (PSNR against float32), the same image on a second
  load, with low_memory, and on torch within the backend-parity tolerances of test_sampling.py;
- bad inputs are one line each.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import BACKENDS, cli
from safetensors.numpy import load_file

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.quantize import dequantize, outside_blocks, quantizable, quantized_shapes
from dalle2_portable.spec import Quantization

needs_mlx = pytest.mark.skipif("mlx" not in BACKENDS, reason="quantizing needs mlx")
needs_both = pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends (MLX quantised vs torch dequantised)")

GROUP = 32
# Relative error of one call, max |quantised - float32| / max |float32|, measured on the tiny Karlo (random
# weights + N(0, 0.05)): 8-bit 5.7e-3 prior, 6.7e-3 decoder, 1.0e-2 super-res; 4-bit 7.9e-2, 1.4e-1, 1.3e-1.
CALL_ERROR = {8: 2e-2, 4: 2.5e-1}
STEPS = dict(prior_steps=10, decoder_steps=10, super_res_steps=7)
PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """{bits: the tiny Karlo quantised to that many bits (group 32)}."""
    if "mlx" not in BACKENDS:
        pytest.skip("quantizing needs mlx")
    root = tmp_path_factory.mktemp("quantized")
    return {bits: d2.quantize(models["karlo"], root / f"q{bits}", bits=bits, group_size=GROUP) for bits in (8, 4)}


def _inputs(spec, name: str, rng) -> tuple:
    """One call's inputs for a component of the tiny Karlo (as sampling.py calls it), batch 2."""
    cfg = spec.components[name].config
    if name == "prior":
        e = cfg.embedding_dim
        return (rng.standard_normal((2, e)).astype(np.float32), np.int64(500),
                rng.standard_normal((2, cfg.embedding_proj_dim)).astype(np.float32),
                rng.standard_normal((2, cfg.num_embeddings, e)).astype(np.float32), None)
    size = cfg.sample_size or 16
    x = rng.standard_normal((2, cfg.in_channels, size, size)).astype(np.float32)
    if name == "decoder":
        tp = spec.components["text_proj"].config
        return (x, np.int64(500), rng.standard_normal((2, 81, cfg.cross_attention_dim)).astype(np.float32),
                rng.standard_normal((2, tp.time_embed_dim)).astype(np.float32), None)
    return (x, np.int64(500))


def _component(backend, model_dir, name):
    spec = store.read_spec(model_dir)
    comp = spec.components[name]
    path = str(store.component_path(model_dir, spec, name))
    if comp.quantization is None:
        return backend.load_component(comp.type, comp.config, path)
    return backend.load_component(comp.type, comp.config, path, quantization=comp.quantization)


def psnr(a, b) -> float:
    """PSNR in dB of two outputs' PNG pixels (uint8)."""
    x = np.stack([np.asarray(im, np.float64) for im in a.images])
    y = np.stack([np.asarray(im, np.float64) for im in b.images])
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


@needs_mlx
@pytest.mark.parametrize("name", ["prior", "decoder", "super_res_first"])
def test_a_quantised_component_follows_the_float_one(models, quantized, name):
    """One call's relative error: small at 8 bits, larger at 4 (CALL_ERROR; measured values there)."""
    b = d2.get_backend("mlx")
    inputs = _inputs(store.read_spec(models["karlo"]), name, np.random.default_rng(0))
    (ref,) = b.run(_component(b, models["karlo"], name), *inputs)
    errors = {}
    for bits, q in quantized.items():
        (out,) = b.run(_component(b, q, name), *inputs)
        errors[bits] = np.abs(out - ref).max() / np.abs(ref).max()
        assert 0 < errors[bits] <= CALL_ERROR[bits], (name, bits, errors[bits])
    assert errors[4] > 3 * errors[8]


@needs_mlx
def test_the_stored_weights_are_what_mlx_dequantises(models, quantized):
    """Every quantised layer of every component: NumPy's dequantisation of the stored words equals
    mx.dequantize bit for bit, is within one step of the float weight, and is the kernel a QuantizedConv2d
    convolves with; the MLX module's quantised structure is exactly what the file holds."""
    import mlx.core as mx

    b = d2.get_backend("mlx")
    for bits, q in quantized.items():
        spec = store.read_spec(q)
        layers = 0
        for name in ("prior", "decoder", "super_res_first", "super_res_last"):
            comp = spec.components[name]
            assert (comp.quantization.bits, comp.quantization.group_size) == (bits, GROUP)
            quant = comp.quantization
            stored = load_file(str(store.component_path(q, spec, name)))
            float_ = load_file(str(store.component_path(models["karlo"], store.read_spec(models["karlo"]), name)))
            module = _component(b, q, name)
            for key in [k for k in stored if k.endswith(".scales")]:
                p = key.removesuffix("scales")
                w, s, z = stored[p + "weight"], stored[p + "scales"], stored[p + "biases"]
                assert w.dtype == np.uint32 and s.dtype == z.dtype == np.float32
                ours = dequantize(w, s, z, quant)
                theirs = np.array(mx.dequantize(mx.array(w), mx.array(s), mx.array(z), GROUP, bits))
                assert np.array_equal(ours, theirs), p
                ref = float_[p + "weight"]
                rows = ref.transpose(0, 2, 3, 1).reshape(ref.shape[0], -1) if ref.ndim == 4 else ref
                step = np.abs(np.repeat(s, GROUP, axis=1))
                assert np.all(np.abs(ours - rows) <= step + 1e-6), p  # within one step of its group (MLX's
                # affine codes make one end of a group exact, so an error may reach ~1 step, not half of one)
                layer = module
                for part in p.rstrip(".").split("."):
                    layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
                assert type(layer).__name__ == ("QuantizedConv2d" if ref.ndim == 4 else "QuantizedLinear"), p
                layers += 1
            assert set(b.weights(module)) == set(stored)
        assert layers > 50


@needs_mlx
def test_which_layers_are_quantised_follows_the_recorded_quantization(models, quantized):
    """The backends' views of a quantised module agree: MLX's (nn.quantize's structure) is quantized_shapes of
    torch's float view, for every component type, with and without layers kept float; a layer is quantised iff
    its row is a multiple of the group and `keep` does not name it. `quantize` keeps the layers outside the
    repeated blocks float and records them."""
    spec = store.read_spec(models["karlo"])
    mlx_b = d2.get_backend("mlx")
    for name in ("prior", "decoder", "super_res_first"):
        comp = spec.components[name]
        shapes = mlx_b.parameter_shapes(comp.type, comp.config)
        layers = {k for k in shapes if k.endswith(".weight") and len(shapes[k]) in (2, 4)}
        recorded = store.read_spec(quantized[8]).components[name].quantization
        assert recorded.keep == outside_blocks(k for k in layers if quantizable(k, shapes[k], Quantization(8, GROUP)))
        assert all(k.split(".")[0] not in ("down_blocks", "up_blocks", "mid_block", "transformer_blocks")
                   for k in recorded.keep)
        assert recorded.keep or name == "prior"  # the tiny prior's outer layers are 16 wide: none to keep
        for q in (Quantization(8, 32), Quantization(4, 64), recorded):
            view = mlx_b.parameter_shapes(comp.type, comp.config, q)
            packed = {k.removesuffix("scales") + "weight" for k in view if k.endswith(".scales")}
            assert packed == {k for k in layers if quantizable(k, shapes[k], q)}
            assert view == quantized_shapes(shapes, layers, q)
            if "torch" in BACKENDS:
                assert d2.get_backend("torch").parameter_shapes(comp.type, comp.config, q) == view
        assert "time_embedding.linear_2" in recorded.keep or name == "prior"


@needs_mlx
def test_the_quantised_directory_loads_and_generates(models, quantized):
    """load_pipeline on the directory: the images' PSNR against float32 (measured 8-bit 34.4 dB, 4-bit 17.7 dB
    at these 10/10/7 steps; with 2 steps the first decoder step's x0 estimate, x / sqrt(alpha_bar) at t ~ 1000,
    magnifies any change 150x and both fall to ~20 / 14 dB); a second load gives the identical image; the UNets'
    files shrink (measured 0.52x at 8 bits, 0.43x at 4: the tiny model's many narrow layers stay float)."""
    ref = d2.load_pipeline(models["karlo"], backend="mlx").generate(PROMPTS, seed=0, **STEPS)
    floor = {8: 30.0, 4: 14.0}
    scores = {}
    for bits, q in quantized.items():
        out = d2.load_pipeline(q, backend="mlx").generate(PROMPTS, seed=0, **STEPS)
        scores[bits] = psnr(out, ref)
        assert floor[bits] <= scores[bits] < float("inf"), (bits, scores[bits])
        again = d2.load_pipeline(q, backend="mlx").generate(PROMPTS, seed=0, **STEPS)
        assert np.array_equal(again.samples, out.samples)
        assert [np.asarray(a).tobytes() for a in again.images] == [np.asarray(a).tobytes() for a in out.images]
    assert scores[8] > scores[4]
    spec, before = store.read_spec(quantized[8]), store.read_spec(models["karlo"])
    doc = json.loads((quantized[8] / "model.json").read_text())
    assert doc["components"]["decoder"]["quantization"] == {
        "bits": 8, "group_size": GROUP, "mode": "affine", "keep": list(spec.components["decoder"].quantization.keep)}
    assert "quantization" not in doc["components"]["text_encoder"] and "quantization" not in doc["components"][
        "text_proj"]
    assert doc["about"]["quantized"]["components"] == ["prior", "decoder", "super_res_first", "super_res_last"]
    store.verify_model(quantized[8])  # fresh checksums
    for name in ("text_encoder", "text_proj"):  # copied as they were
        assert (quantized[8] / spec.components[name].weights).read_bytes() == (
            models["karlo"] / before.components[name].weights).read_bytes()
    counts, float_counts = store.count_parameters(quantized[8], spec), store.count_parameters(models["karlo"], before)
    assert counts == {k: (n, v if k in ("text_encoder", "text_proj") else ["F32", "U32"])
                      for k, (n, v) in float_counts.items()}  # the same parameters, some of them packed
    size = {bits: sum((q / spec.components[n].weights).stat().st_size for n in ("decoder", "super_res_first"))
            for bits, q in quantized.items()}
    float_size = sum((models["karlo"] / before.components[n].weights).stat().st_size
                     for n in ("decoder", "super_res_first"))
    assert size[8] < 0.6 * float_size and size[4] < size[8]  # a tiny model keeps many of its narrow layers float


@needs_both
def test_torch_runs_the_same_quantised_weights(models, quantized):
    """torch loads the quantised directory dequantised in NumPy: the MLX images within test_sampling.py's
    backend tolerances (embeddings 1e-5, pixels 2/255), measured 1.8e-6 and 1.3e-5."""
    for bits in (8, 4):
        a = d2.load_pipeline(quantized[bits], backend="mlx").generate(PROMPTS, seed=1, **STEPS)
        t = d2.load_pipeline(quantized[bits], backend="torch").generate(PROMPTS, seed=1, **STEPS)
        np.testing.assert_allclose(a.image_embeddings, t.image_embeddings, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.samples * 0.5 + 0.5, t.samples * 0.5 + 0.5, rtol=0, atol=2 / 255)
        assert max(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()
                   for x, y in zip(a.images, t.images)) <= 2
    # the weights torch holds are the kernels MLX convolves with, exactly
    import mlx.core as mx

    m = _component(d2.get_backend("mlx"), quantized[4], "decoder")
    t = _component(d2.get_backend("torch"), quantized[4], "decoder")
    conv = m.up_blocks[0].resnets[0].conv1
    assert type(conv).__name__ == "QuantizedConv2d"
    w = np.array(mx.dequantize(conv.weight, conv.scales, conv.biases, GROUP, 4).reshape(conv.kernel_shape))
    assert np.array_equal(w.transpose(0, 3, 1, 2), t.up_blocks[0].resnets[0].conv1.weight.detach().numpy())


@needs_mlx
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_low_memory_loads_quantised_components(models, quantized, backend):
    if backend not in BACKENDS:
        pytest.skip(f"{backend} not installed")
    options = dict(prior_steps=2, decoder_steps=2, super_res_steps=2)
    eager = d2.load_pipeline(quantized[8], backend=backend).generate("a red circle", seed=3, **options)
    lean = d2.load_pipeline(quantized[8], backend=backend, low_memory=True)
    out = lean.generate("a red circle", seed=3, **options)
    assert lean.modules.held == [] and np.array_equal(out.samples, eager.samples)


@needs_mlx
def test_bfloat16_runs_a_quantised_model(models, quantized):
    """--dtype bfloat16: the scales, biases and float weights in bfloat16, the packed words as they are."""
    pipe = d2.load_pipeline(quantized[8], backend="mlx", dtype="bfloat16")
    out = pipe.generate("a red circle", seed=0, prior_steps=2, decoder_steps=2, super_res_steps=2)
    assert np.isfinite(out.samples).all()
    conv = pipe.modules["decoder"].up_blocks[0].resnets[0].conv1
    assert str(conv.scales.dtype) == "mlx.core.bfloat16" and str(conv.weight.dtype) == "mlx.core.uint32"


@needs_mlx
def test_the_cli_quantizes_and_info_says_so(models, tmp_path):
    r = cli("quantize", models["karlo"], tmp_path / "q", "--bits", 4, "--group-size", 32, "--components",
            "decoder,prior", "--all-layers")
    assert "prior, decoder at 4 bits" in r.output
    spec = store.read_spec(tmp_path / "q")
    assert {n for n, c in spec.components.items() if c.quantization} == {"prior", "decoder"}
    assert spec.components["decoder"].quantization == Quantization(4, 32)  # --all-layers: none kept float
    assert "time_embedding.linear_2.scales" in load_file(str(tmp_path / "q" / "decoder.safetensors"))
    info = cli("info", tmp_path / "q").output
    assert "4-bit, group 32 (affine)" in info and "U32" in info
    cli("quantize", models["karlo"], tmp_path / "q", "--bits", 8, "--group-size", 32, "--force")
    q = store.read_spec(tmp_path / "q").components["super_res_last"].quantization
    assert (q.bits, q.group_size) == (8, 32) and "time_embedding.linear_2" in q.keep
    assert "time_embedding.linear_2.scales" not in load_file(str(tmp_path / "q" / "super_res_last.safetensors"))
    assert f"8-bit, group 32 (affine, {len(q.keep)} layers float)" in cli("info", tmp_path / "q").output


def test_bad_inputs_are_one_line(models, tmp_path):
    q = tmp_path / "q"
    cli("quantize", models["karlo"], q, "--bits", 3, ok=False)
    r = cli("quantize", models["karlo"], q, "--group-size", 48, ok=False)
    assert "32, 64, 128" in r.output
    r = cli("quantize", models["karlo"], q, "--components", "decoder,unet", ok=False)
    assert "'unet'" in r.output
    r = cli("quantize", models["karlo"], q, "--components", "text_encoder", ok=False)
    assert "only the prior and the UNets" in r.output
    r = cli("quantize", models["karlo"], models["karlo"], ok=False)
    assert "already exists" in r.output
    if "mlx" not in BACKENDS:
        return
    r = cli("quantize", models["karlo"], q, "--group-size", 128, ok=False)  # the tiny layers are narrower
    assert "--group-size" in r.output
    assert not q.exists()
    cli("quantize", models["karlo"], q, "--group-size", 32)
    r = cli("quantize", models["karlo"], q, ok=False)
    assert "already exists" in r.output
    r = cli("quantize", q, tmp_path / "qq", "--group-size", 32, ok=False)
    assert "quantized already" in r.output
    with pytest.raises(Dalle2Error, match="bits 3 is not supported"):
        d2.quantize(models["karlo"], tmp_path / "x", bits=3)


@needs_mlx
def test_a_bad_quantised_model_is_one_line(models, quantized, tmp_path):
    """model.json's quantization is checked like any config; a file that does not match it, a LoRA adapter on a
    quantised component and fine-tuning one are one line each."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quantized[8], bad)
    doc = json.loads((bad / "model.json").read_text())
    for value, words in (({"bits": 5, "group_size": 32, "mode": "affine"}, "bits 5 is not supported"),
                         ({"bits": 8, "group_size": 32, "mode": "nf4"}, "mode 'nf4' is not supported"),
                         ({"bits": 8, "group_size": 32, "scheme": "x"}, "unknown key 'scheme'"),
                         ({"bits": "8", "group_size": 32}, "bits must be an integer")):
        d = json.loads(json.dumps(doc))
        d["components"]["decoder"]["quantization"] = value
        (bad / "model.json").write_text(json.dumps(d))
        r = cli("info", bad, ok=False)
        assert words in r.output and "'decoder'" in r.output, r.output
    d = json.loads(json.dumps(doc))
    d["components"]["text_proj"]["quantization"] = {"bits": 8, "group_size": 32}
    (bad / "model.json").write_text(json.dumps(d))
    assert "cannot be quantized" in cli("info", bad, ok=False).output
    d = json.loads(json.dumps(doc))
    del d["components"]["decoder"]["quantization"]  # a quantised file the spec calls float
    del d["files"]
    (bad / "model.json").write_text(json.dumps(d))
    r = cli("generate", "a red circle", "-m", bad, "--backend", "mlx", "-o", tmp_path / "a.png", ok=False)
    assert "unexpected tensor" in r.output and "decoder" in r.output
    d["components"]["prior"]["quantization"] = {"bits": 4, "group_size": 32}  # 8-bit words read as 4-bit
    d["components"]["decoder"]["quantization"] = {"bits": 8, "group_size": 32}
    (bad / "model.json").write_text(json.dumps(d))
    for backend in BACKENDS:
        r = cli("generate", "a red circle", "-m", bad, "--backend", backend, "-o", tmp_path / "a.png", ok=False)
        assert "dalle2 quantize" in r.output and "prior" in r.output
    from dalle2_portable.lora import Adapter, LoRALayer, write_adapter

    state = load_file(str(models["karlo"] / "decoder.safetensors"))
    key = next(k for k in sorted(state) if k.endswith("to_q.weight"))
    out_f, in_f = state[key].shape
    adapter = write_adapter(tmp_path / "a.safetensors", Adapter({("decoder", key.removesuffix(".weight")): LoRALayer(
        np.ones((2, in_f), np.float32), np.ones((out_f, 2), np.float32), 2.0)}))
    r = cli("generate", "a red circle", "-m", quantized[8], "--lora", adapter, "-o", tmp_path / "a.png", ok=False)
    assert "fuse the adapter into the float model" in r.output
    cli("lora", "fuse", quantized[8], adapter, tmp_path / "fused", ok=False)
    with pytest.raises(Dalle2Error, match="train from the float model"):
        d2.train("decoder", data="shapes", out=tmp_path / "run", model=quantized[8],
                 settings=d2.TrainSettings(steps=1))
