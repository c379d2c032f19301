"""LoRA adapters in the ecosystem's files (dalle2_portable/lora.py): an adapter made by diffusers / PEFT on the
tiny Karlo decoder, merged into our decoder, gives diffusers' own adapted output, in each dialect (diffusers'
pipeline file, a model's save_lora_adapter, PEFT's adapter_model.safetensors + adapter_config.json, kohya's);
one written by us loads into diffusers through load_lora_adapter; scale 0 is the base model exactly; the two
backends agree; a key that names no module is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import BACKENDS, assert_close_to_scale, backend_params, cli
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.numpy import load_file, save_file

import dalle2_portable as d2
from dalle2_portable import store
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.images import read_png_metadata
from dalle2_portable.lora import Adapter, LoRALayer, parse_spec, read_adapter, write_adapter
from dalle2_portable.modules.lora import LoRADropout
from dalle2_portable.modules.unet import decoder_attention_mask

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def _inputs():
    rng = np.random.default_rng(0)
    mask = np.ones((2, 81), bool)
    mask[1, 40:] = False
    return (rng.standard_normal((2, 3, 8, 8)).astype(np.float32), np.array(500),
            rng.standard_normal((2, 81, 24)).astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32),
            mask)


def _theirs(unet) -> np.ndarray:
    x, t, context, time, mask = _inputs()
    with torch.no_grad():
        return unet(torch.from_numpy(x), torch.tensor(int(t)), torch.from_numpy(context),
                    class_labels=torch.from_numpy(time), attention_mask=torch.from_numpy(mask)).sample.numpy()


def _ours(pipe) -> np.ndarray:
    x, t, context, time, mask = _inputs()
    return pipe.backend.run(pipe.components["decoder"], x, t, context, time, decoder_attention_mask(mask))[0]


def _adapted_unet(models, alpha=8, rank_pattern=None, targets=TARGETS):
    """diffusers' decoder with a PEFT adapter whose B is not zero (init_lora_weights=False), seeded."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(models["karlo_src"] / "decoder").eval()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                                rank_pattern=rank_pattern or {}))
    return unet


@pytest.fixture(scope="module")
def diffusers_files(models, tmp_path_factory):
    """{dialect: path} of one adapter (alpha 8, rank 4 but 2 on the mid block's to_q) and diffusers' output."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    root = tmp_path_factory.mktemp("lora")
    unet = _adapted_unet(models, rank_pattern={"mid_block.attentions.0.to_q": 2})
    layers = get_peft_model_state_dict(unet)
    StableDiffusionLoraLoaderMixin.save_lora_weights(root / "pipeline", unet_lora_layers=layers,
                                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    unet.save_lora_adapter(root / "model")
    files = {"pipeline": root / "pipeline" / "pytorch_lora_weights.safetensors",
             "model": root / "model" / "pytorch_lora_weights.safetensors"}
    # kohya's names for the same weights, its alpha per module
    tensors = load_file(files["model"])
    kohya = {}
    for key, value in tensors.items():
        module, part = key.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = np.array(8.0, np.float32)
    files["kohya"] = root / "kohya.safetensors"
    save_file(kohya, files["kohya"])
    return files, _theirs(unet)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dialect", ["pipeline", "model", "kohya"])
def test_a_diffusers_adapter_merged_into_ours_is_diffusers_output(models, diffusers_files, backend, dialect):
    files, expected = diffusers_files
    pipe = d2.load_pipeline(models["karlo"], backend=backend, lora=[files[dialect]])
    layers = pipe.adapters[0].layers
    assert {c for c, _ in layers} == {"decoder"} and 2 * len(layers) == len(load_file(files["model"]))
    assert layers[("decoder", "mid_block.attentions.0.to_q")].rank == 2  # rank_pattern
    base = _ours(d2.load_pipeline(models["karlo"], backend=backend))
    assert np.abs(expected - base).max() > 1e-2  # the adapter changes the output
    assert_close_to_scale(_ours(pipe), expected, 1e-5, f"{backend} {dialect}")


@pytest.mark.parametrize("backend", backend_params())
def test_an_adapter_on_convolutions_merges_as_diffusers_applies_it(models, tmp_path, backend):
    """PEFT's conv LoRA (lora_A a kh x kw conv, lora_B 1 x 1) on the resnets' and the UNet's own convolutions,
    saved by diffusers: merged here, the decoder gives diffusers' adapted output."""
    unet = _adapted_unet(models, targets=["conv1", "conv2", "conv_in", "conv_out"])
    unet.save_lora_adapter(tmp_path)
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert load_file(file)["conv_in.lora_A.weight"].ndim == 4
    pipe = d2.load_pipeline(models["karlo"], backend=backend, lora=[file])
    assert_close_to_scale(_ours(pipe), _theirs(unet), 1e-5, f"{backend}: conv adapter")


def test_a_peft_adapter_folder_loads(models, tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(models["karlo_src"] / "decoder").eval()
    peft_model = get_peft_model(unet, LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS,
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    expected = _theirs(peft_model.base_model.model)
    pipe = d2.load_pipeline(models["karlo"], backend=BACKENDS[0], lora=[tmp_path / "peft"])
    assert_close_to_scale(_ours(pipe), expected, 1e-5, "PEFT folder")


@pytest.mark.parametrize("backend", backend_params())
def test_lora_dropout_drops_what_peft_drops_given_the_same_masks(models, backend):
    """PEFT's LoRA layer in training mode (`lora_B(lora_A(lora_dropout(x))) * scaling`), its dropout module
    replaced by one applying our NumPy masks, against our layers unmerged with LoRADropout(0.5): the same
    decoder output. Outside a step, ours drops nothing."""
    dropout = LoRADropout(0.5)

    class Masks(torch.nn.Module):  # PEFT's lora_dropout["default"], its mask ours
        def __init__(self, path):
            super().__init__()
            self.path = path

        def forward(self, x):
            return x * torch.from_numpy(dropout.mask(self.path, tuple(x.shape)))

    unet = _adapted_unet(models)
    state = get_peft_model_state_dict(unet)
    for path, module in unet.named_modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            module.lora_dropout["default"] = Masks(path)
    unet.train()
    pipe = d2.load_pipeline(models["karlo"], backend=backend)
    decoder = pipe.components["decoder"]
    paths = pipe.backend.add_lora(decoder, 4, 8.0, r".*\.(" + "|".join(TARGETS).replace(".", r"\.") + ")",
                                  dropout)
    assert len(paths) == len(state) // 2
    pipe.backend.load_weights(decoder, state, partial=True)
    exact = _ours(pipe)
    with dropout.step(0, 2, 7):
        ours, theirs = _ours(pipe), _theirs(unet)
    assert np.abs(ours - exact).max() > 0.1 * np.abs(exact).max()  # the masks change the output
    assert_close_to_scale(ours, theirs, 1e-5, f"{backend}: LoRA dropout")
    assert np.array_equal(_ours(pipe), exact)  # outside a step: no dropout


def _our_adapter(models, rank=3, alpha=6.0) -> Adapter:
    """Random down and up weights (NumPy) on every attention projection of the decoder."""
    pipe = d2.load_pipeline(models["karlo"], backend=BACKENDS[0])
    state = pipe.backend.state_dict(pipe.components["decoder"])
    rng = np.random.default_rng(1)
    layers = {}
    for key in sorted(state):
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and any(module.endswith("." + t) for t in TARGETS):
            out, inp = state[key].shape
            layers[("decoder", module)] = LoRALayer(rng.standard_normal((rank, inp)).astype(np.float32) * 0.3,
                                                    rng.standard_normal((out, rank)).astype(np.float32) * 0.3, alpha)
    return Adapter(layers)


@pytest.mark.parametrize("backend", backend_params())
def test_our_adapter_loads_into_diffusers(models, tmp_path, backend):
    path = write_adapter(tmp_path / "pytorch_lora_weights.safetensors", _our_adapter(models))
    unet = UNet2DConditionModel.from_pretrained(models["karlo_src"] / "decoder").eval()
    unet.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet")  # offline: name the file
    config = unet.peft_config["default_0"]
    assert (config.r, config.lora_alpha) == (3, 6.0)
    pipe = d2.load_pipeline(models["karlo"], backend=backend, lora=[path])
    assert_close_to_scale(_ours(pipe), _theirs(unet), 1e-5, f"{backend}: ours in diffusers")


def test_scale_zero_is_the_base_model_and_scales_add_up(models, tmp_path):
    path = write_adapter(tmp_path / "a.safetensors", _our_adapter(models))
    backend = BACKENDS[0]
    base = d2.load_pipeline(models["karlo"], backend=backend)
    zero = d2.load_pipeline(models["karlo"], backend=backend, lora=[f"{path}:0"])
    for name in base.components:
        ours, theirs = (p.backend.state_dict(p.components[name]) for p in (zero, base))
        assert all(np.array_equal(ours[k], theirs[k]) for k in theirs), name
    halves = d2.load_pipeline(models["karlo"], backend=backend, lora=[f"{path}:0.5", (path, 0.5)])
    whole = d2.load_pipeline(models["karlo"], backend=backend, lora=[path])
    assert_close_to_scale(_ours(halves), _ours(whole), 1e-5, "two halves, one whole")


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both backends")
def test_the_backends_agree_with_an_adapter(models, tmp_path):
    path = write_adapter(tmp_path / "a.safetensors", _our_adapter(models))
    torch_out, mlx_out = (_ours(d2.load_pipeline(models["karlo"], backend=b, lora=[path])) for b in ("torch", "mlx"))
    assert_close_to_scale(mlx_out, torch_out, 1e-5, "MLX vs torch")


def test_foreign_keys_and_files_are_one_line(models, tmp_path):
    adapter = _our_adapter(models)
    (component, module), layer = next(iter(adapter.layers.items()))
    path = write_adapter(tmp_path / "bad.safetensors", Adapter({("decoder", module + "x"): layer}))
    with pytest.raises(Dalle2Error, match=r"key 'unet\..*xx?\.lora_[AB]\.weight' matches no module of the model's "
                                          "decoder"):
        d2.load_pipeline(models["karlo"], backend=BACKENDS[0], lora=[path])
    save_file({"conv_in.lora_A.weight": layer.down, "conv_in.lora_B.weight": layer.up}, tmp_path / "u.safetensors")
    with pytest.raises(Dalle2Error, match="names a module of super_res_first and super_res_last; prefix"):
        read_adapter(tmp_path / "u.safetensors", {"super_res_first": {"conv_in"}, "super_res_last": {"conv_in"}})
    wrong = {("decoder", module): LoRALayer(layer.down[:, :-1], layer.up, layer.alpha)}
    with pytest.raises(Dalle2Error, match="made for another model size"):
        d2.load_pipeline(models["karlo"], backend=BACKENDS[0], lora=[write_adapter(tmp_path / "w.safetensors",
                                                                                  Adapter(wrong))])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for bad, message in ((tmp_path / "junk.safetensors", "not a readable safetensors LoRA file"),
                         (tmp_path / "missing.safetensors", "does not exist"), (tmp_path, "holds no")):
        with pytest.raises(Dalle2Error, match=message):
            d2.load_pipeline(models["karlo"], backend=BACKENDS[0], lora=[bad])
    save_file({"unet.x.weight": np.zeros(2, np.float32)}, tmp_path / "other.safetensors")
    with pytest.raises(Dalle2Error, match="is not a LoRA weight"):
        d2.load_pipeline(models["karlo"], backend=BACKENDS[0], lora=[tmp_path / "other.safetensors"])


def test_the_file_is_diffusers_dialect(models, tmp_path):
    from safetensors import safe_open

    path = write_adapter(tmp_path / "pytorch_lora_weights.safetensors", _our_adapter(models))
    with safe_open(str(path), framework="numpy") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    config = json.loads(metadata["lora_adapter_metadata"])
    assert config["unet.r"] == 3 and config["unet.lora_alpha"] == 6.0 and metadata["format"] == "pt"


def test_file_and_scale():
    assert parse_spec("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert parse_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_spec("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    assert parse_spec("a.safetensors:-1e-1") == ("a.safetensors", -0.1)


def test_fuse_writes_a_model_that_is_the_adapted_one(models, tmp_path):
    path = write_adapter(tmp_path / "a.safetensors", _our_adapter(models))
    cli("lora", "fuse", models["karlo"], f"{path}:0.7", tmp_path / "fused")
    fused = d2.load_pipeline(tmp_path / "fused", backend=BACKENDS[0])
    merged = d2.load_pipeline(models["karlo"], backend=BACKENDS[0], lora=[(path, 0.7)])
    assert_close_to_scale(_ours(fused), _ours(merged), 1e-6, "fused directory vs merged at load")
    assert store.verify_model(tmp_path / "fused")
    assert store.read_about(tmp_path / "fused")["lora_fused"] == [f"{path}:0.7"]
    assert "exists" in cli("lora", "fuse", models["karlo"], path, tmp_path / "fused", ok=False).output
    assert "does not exist" in cli("lora", "fuse", models["karlo"], tmp_path / "no.safetensors", tmp_path / "x",
                                   ok=False).output
    assert not (tmp_path / "x").exists()


def test_generate_takes_lora_and_its_png_regenerates(models, tmp_path):
    path = write_adapter(tmp_path / "a.safetensors", _our_adapter(models))
    few = ["-m", models["karlo"], "--steps", "2", "--super-res-steps", "2", "--backend", BACKENDS[0], "--quiet"]
    cli("generate", "a photo", *few, "--lora", f"{path}:0.5", "-o", tmp_path / "a.png")
    cli("generate", "a photo", *few, "-o", tmp_path / "base.png")
    assert json.loads(read_png_metadata(tmp_path / "a.png")["lora"]) == [[str(path), 0.5]]
    cli("generate", "--config-from-metadata", tmp_path / "a.png", "-o", tmp_path / "again.png", "--quiet")
    pixels = [np.asarray(Image.open(tmp_path / name)) for name in ("a.png", "again.png", "base.png")]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    assert "does not exist" in cli("vary", tmp_path / "a.png", *few, "--lora", tmp_path / "none.safetensors",
                                   "-o", tmp_path / "v.png", ok=False).output


def test_convert_writes_kohya_and_back(models, tmp_path):
    path = write_adapter(tmp_path / "pytorch_lora_weights.safetensors", _our_adapter(models))
    cli("lora", "convert", models["karlo"], path, tmp_path / "k.safetensors", "--to", "kohya")
    keys = list(load_file(tmp_path / "k.safetensors"))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    cli("lora", "convert", models["karlo"], tmp_path / "k.safetensors", tmp_path / "d.safetensors", "--to",
        "diffusers")
    outs = [_ours(d2.load_pipeline(models["karlo"], backend=BACKENDS[0], lora=[p]))
            for p in (path, tmp_path / "k.safetensors", tmp_path / "d.safetensors")]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert "refusing to overwrite" in cli("lora", "convert", models["karlo"], path, tmp_path / "k.safetensors",
                                         ok=False).output
    prior = write_adapter(tmp_path / "p.safetensors", Adapter({("prior", "x"): LoRALayer(
        np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32), 1.0)}))
    with pytest.raises(Dalle2Error, match="kohya files name the decoder"):
        write_adapter(tmp_path / "pk.safetensors", read_adapter(prior, {"prior": {"x"}}), dialect="kohya")
