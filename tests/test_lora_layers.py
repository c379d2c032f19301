"""Trainable LoRA layers (modules/lora.py): an adapted decoder computes what its merged weights compute; one
LoRA training step agrees across backends and leaves every base weight bit-unchanged; B starts at zero, so an
adapted model starts as its base."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from conftest import BACKENDS, assert_close_to_scale, assert_one_step_agrees, backend_params
from test_train_decoder import _bundle, _inputs

from dalle2_portable import store
from dalle2_portable.backends import get_backend
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.lora import Adapter, LoRALayer, fuse
from dalle2_portable.modules.lora import LoRADropout, add_lora
from dalle2_portable.train.optim import AdamW
from dalle2_portable.train.stages import decoder_loss


def _adapted(backend: str, models, rank=4, alpha=8.0, seed=0, zero_b=False, dtype=None, dropout=None):
    """The decoder bundle (its base in `dtype`) with LoRA on its attention projections, A and B drawn in NumPy
    and loaded alone, their input dropped by `dropout` (a LoRADropout) if given."""
    b, bundle, spec = _bundle(backend, models["iv"], dtype)
    paths = add_lora(bundle, rank, alpha, dropout=dropout)
    shapes = {k: tuple(v.shape) for k, v in b.weights(bundle).items() if ".lora_" in k}
    rng = np.random.default_rng(seed)
    factors = {}
    for p in paths:
        a, bb = shapes[f"{p}.lora_A.weight"], shapes[f"{p}.lora_B.weight"]
        factors[f"{p}.lora_A.weight"] = rng.uniform(-1, 1, a).astype(np.float32) / np.sqrt(a[1])
        factors[f"{p}.lora_B.weight"] = np.zeros(bb, np.float32) if zero_b else rng.standard_normal(bb).astype(
            np.float32) * 0.1
    b.load_weights(bundle, factors, partial=True)
    return b, bundle, spec, paths


def test_the_targets_are_the_attention_projections(models):
    _, _, _, paths = _adapted(BACKENDS[0], models)
    tails = {p.rsplit(".", 1)[-1] if not p.endswith(".0") else "to_out.0" for p in paths}
    assert tails == {"to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"}
    assert all(p.startswith("decoder.") for p in paths)  # text_proj has no attention


@pytest.mark.parametrize("backend", backend_params())
def test_an_adapted_decoder_is_its_merged_weights(models, backend):
    b, bundle, spec, paths = _adapted(backend, models)
    inputs, _ = _inputs(spec)
    adapted, _ = b.value_and_grad(bundle, decoder_loss)(*inputs)
    state = b.state_dict(bundle)
    layers = {("decoder", p.removeprefix("decoder.")): LoRALayer(state[f"{p}.lora_A.weight"],
                                                                  state[f"{p}.lora_B.weight"], 8.0) for p in paths}
    merged_state = {k.removeprefix("decoder."): v for k, v in state.items()
                    if k.startswith("decoder.") and ".lora_" not in k}
    merged_state = fuse(merged_state, Adapter(layers), "decoder")
    _, plain, _ = _bundle(backend, models["iv"])
    b.load_weights(plain, {**{k: v for k, v in state.items() if k.startswith("text_proj.")},
                           **{f"decoder.{k}": v for k, v in merged_state.items()}})
    merged, _ = b.value_and_grad(plain, decoder_loss)(*inputs)
    assert abs(adapted - merged) <= 1e-5 * merged, (adapted, merged)
    _, start, _, _ = _adapted(backend, models, zero_b=True)  # B = 0: the base model's loss exactly
    _, base, _ = _bundle(backend, models["iv"])
    assert_close_to_scale(b.value_and_grad(start, decoder_loss)(*inputs)[0],
                          b.value_and_grad(base, decoder_loss)(*inputs)[0], 1e-6, "B = 0")


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_one_lora_step_agrees_across_backends_and_moves_only_the_adapters(models):
    inputs, _ = _inputs(store.read_spec(models["iv"]), seed=1)
    frozen = [k for k in get_backend("torch").state_dict(_adapted("torch", models)[1]) if ".lora_" not in k]
    assert_one_step_agrees(lambda b: _adapted(b.name, models)[1], decoder_loss, inputs, frozen=frozen)
    adapters = {}
    for name in ("torch", "mlx"):
        b, bundle, _, _ = _adapted(name, models)
        before = {k: v.copy() for k, v in b.state_dict(bundle).items()}  # torch's may share the weights' memory
        step = b.train_step(bundle, decoder_loss, AdamW(lr=1e-3), frozen)
        for _ in range(2):
            step(*inputs, lr=1e-3)
        after = b.state_dict(bundle)
        assert all(np.array_equal(after[k], before[k]) for k in frozen), name  # base weights bit-unchanged
        assert all(not np.array_equal(after[k], before[k]) for k in after if ".lora_" in k), name
        adapters[name] = {k: v.copy() for k, v in after.items() if ".lora_" in k}
    # the adapters after two steps at AdamW's usual eps, of each tensor's scale: measured 1.0e-6 after one
    ours, theirs = adapters["mlx"], adapters["torch"]
    assert max(np.abs(ours[k] - theirs[k]).max() / np.abs(theirs[k]).max() for k in theirs) <= 1e-5


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_lora_dropout_agrees_across_backends_and_with_gradient_checkpointing(models):
    """A step's masks are NumPy's: MLX and torch drop the same elements (the loss and the adapters' gradients
    agree), a checkpointed block computed again in the backward pass drops what its forward dropped (the
    gradients with and without checkpointing agree), each micro-batch has its own masks, and the same key
    draws the same masks again."""
    from dalle2_portable.modules import gradient_checkpointing

    inputs, _ = _inputs(store.read_spec(models["iv"]), seed=1)
    results = {}
    for name in ("torch", "mlx"):
        for checkpointed in (False, True):
            dropout = LoRADropout(0.3)
            b, bundle, _, _ = _adapted(name, models, dropout=dropout)
            gradient_checkpointing(bundle, checkpointed)
            grad = b.value_and_grad(bundle, dropout.loss(decoder_loss))
            exact = grad(*inputs)[0]
            with dropout.step(0, 2, 5):
                first, second = grad(*inputs), grad(*inputs)  # micro-batches 0 and 1
            with dropout.step(0, 2, 5):
                again = grad(*inputs)
            assert first[0] != exact and second[0] != first[0] and again[0] == first[0], (exact, first[0],
                                                                                           second[0], again[0])
            results[name, checkpointed] = first[0], {k: v for k, v in first[1].items() if ".lora_" in k}
    ref_loss, ref = results["torch", False]
    for key, (loss, grads) in results.items():  # measured: MLX 1.9e-7 (loss), 4.2e-6 (gradients); checkpointed 0
        assert abs(loss - ref_loss) <= 1e-5 * ref_loss, key
        assert max(np.abs(grads[k] - ref[k]).max() / np.abs(ref[k]).max() for k in ref) <= 1e-5, key


def test_a_lora_fine_tune_of_karlo_lowers_its_loss_and_its_file_works_everywhere(models, tmp_path):
    """`dalle2 train decoder --lora 4` on ten pictures: the loss falls, OUT/lora's file holds the adapters only
    (every base weight stays in the base model), diffusers' load_lora_adapter reads it into the same decoder
    output as ours, and the run resumes, on the other backend."""
    from diffusers import UNet2DConditionModel
    from test_lora import _ours, _theirs
    from test_train_karlo import folder as make_folder

    import dalle2_portable as d2
    from dalle2_portable.train.settings import TrainSettings

    pictures = make_folder.__wrapped__(tmp_path)
    settings = TrainSettings(steps=40, batch_size=5, lr=1e-2, warmup=5, checkpoint_every=20, lora_rank=4,
                             lora_alpha=8.0)
    backend = BACKENDS[0]
    d2.train("decoder", pictures, tmp_path / "run", models["karlo"], clip=models["iv"], backend=backend,
             settings=settings, stop_at=20)
    out = d2.train("decoder", pictures, tmp_path / "run", models["karlo"], clip=models["iv"], backend=BACKENDS[-1],
                   settings=settings, resume=True)  # on the other backend when both are here
    assert out == tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors" and not (tmp_path / "run" /
                                                                                          "model").exists()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # measured: 0.793 of the first steps' mean, on torch and on MLX alike
    assert len(losses) == 40 and np.mean(losses[-8:]) < 0.87 * np.mean(losses[:8]), (losses[:8], losses[-8:])
    for part in ("weights", "ema", "optimizer"):  # a checkpoint holds the adapters, not the frozen base again
        assert all(".lora_" in k for k in load_file(tmp_path / "run" / "checkpoint" / f"{part}.safetensors")
                   if k != "step"), part
    tensors = load_file(out)
    assert tensors and all(k.startswith("unet.") and ".lora_" in k for k in tensors)
    pipe = d2.load_pipeline(models["karlo"], backend=backend, lora=[out])
    unet = UNet2DConditionModel.from_pretrained(models["karlo_src"] / "decoder").eval()
    unet.load_lora_adapter(str(out.parent), weight_name=out.name, prefix="unet")
    assert_close_to_scale(_ours(pipe), _theirs(unet), 1e-5, "a trained adapter in diffusers")
    with pytest.raises(Dalle2Error, match="drop --config and --prediction"):
        d2.train("decoder", pictures, tmp_path / "x", models["karlo"], clip=models["iv"], config="tiny",
                 backend=backend, settings=settings)
    with pytest.raises(Dalle2Error, match="matches no Linear of the decoder"):
        d2.train("decoder", pictures, tmp_path / "y", models["karlo"], clip=models["iv"], backend=backend,
                 settings=TrainSettings(**{**settings.__dict__, "lora_targets": "nothing"}))


def test_the_prior_trains_an_adapter_too(models, tmp_path):
    """Any stage takes --lora: the prior's attention projections (with LoRA dropout), its file prefixed
    "prior." with the dropout in its metadata, loadable, and previewed through the base model with the adapter
    merged."""
    import dalle2_portable as d2
    from dalle2_portable.lora import METADATA_KEY
    from dalle2_portable.train.settings import TrainSettings

    settings = TrainSettings(steps=3, batch_size=4, data_size=16, checkpoint_every=3, lora_rank=2, preview_every=3,
                             lora_dropout=0.1)
    out = d2.train("prior", "shapes", tmp_path / "run", models["karlo"], clip=models["iv"], backend=BACKENDS[0],
                   settings=settings)
    assert (tmp_path / "run" / "previews" / "step-000003.png").is_file()  # the base model with the adapter
    keys = list(load_file(out))
    assert keys and all(k.startswith("prior.") and ".attn1." in k for k in keys)
    with safe_open(out, "np") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["prior.lora_dropout"] == 0.1
    pipe = d2.load_pipeline(models["karlo"], backend=BACKENDS[0], lora=[out])
    assert {c for c, _ in pipe.adapters[0].layers} == {"prior"} and pipe.adapters[0].dropout == 0.1
    with pytest.raises(Dalle2Error, match="give lora_rank too"):
        TrainSettings(steps=3, lora_dropout=0.1)


def test_an_upsampler_adapts_the_linears_it_is_given(models, tmp_path):
    """No attention in the upsamplers: the default targets are one line saying so; --lora-targets names others."""
    import dalle2_portable as d2
    from dalle2_portable.train.settings import TrainSettings

    settings = TrainSettings(steps=2, batch_size=2, data_size=8, checkpoint_every=2, lora_rank=2)
    with pytest.raises(Dalle2Error, match="the super_res has no attention projection to adapt"):
        d2.train("super_res", "shapes", tmp_path / "a", models["iv"], backend=BACKENDS[0], settings=settings)
    out = d2.train("super_res", "shapes", tmp_path / "b", models["iv"], backend=BACKENDS[0],
                   settings=TrainSettings(**{**settings.__dict__, "lora_targets": r".*time_emb_proj"}))
    assert all(k.startswith("super_res_first.") and ".time_emb_proj.lora_" in k for k in load_file(out))


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_a_bf16_lora_step_holds_the_base_in_bf16(models):
    """--dtype bfloat16 with --lora: the frozen base is held in bfloat16 (no float32 master copy of weights that
    never change), the adapters in float32; the two backends' losses agree to bfloat16's precision."""
    inputs, _ = _inputs(store.read_spec(models["iv"]), seed=1)
    losses = {}
    for name in ("torch", "mlx"):
        b, bundle, _, _ = _adapted(name, models, dtype="bfloat16")  # the base read as a bf16 LoRA run reads it
        frozen = [k for k in b.weights(bundle) if ".lora_" not in k]
        kinds = {k: str(v.dtype) for k, v in b.weights(bundle).items()}
        assert all("bfloat16" in kinds[k] for k in frozen) and all("float32" in v for k, v in kinds.items()
                                                                    if ".lora_" in k), name
        step = b.train_step(bundle, decoder_loss, AdamW(lr=1e-3), frozen, dtype="bfloat16")
        losses[name] = step(*inputs, lr=1e-3)
        assert all("float32" in str(v.dtype) for k, v in b.weights(bundle).items() if ".lora_" in k), name
    assert abs(losses["mlx"] - losses["torch"]) <= 5e-3 * losses["torch"], losses  # measured 7.7e-4


@pytest.mark.parametrize("backend", backend_params())
def test_a_component_loads_straight_into_bf16(models, backend):
    """load_component(dtype="bfloat16"), a bf16 LoRA run's base: each weight is the float32 file's, rounded."""
    b = get_backend(backend)
    spec = store.read_spec(models["iv"])
    cfg, path = spec.components["decoder"].config, str(store.component_path(models["iv"], spec, "decoder"))
    held, full = (b.load_component(cfg.TYPE, cfg, path, dtype) for dtype in ("bfloat16", None))
    assert all("bfloat16" in str(v.dtype) for v in b.weights(held).values())
    import torch  # the reference rounding to bfloat16 (NumPy has no bfloat16)

    ours = b.state_dict(held)
    for k, v in b.state_dict(full).items():
        assert np.array_equal(ours[k], torch.from_numpy(v).to(torch.bfloat16).float().numpy()), k
