"""LoRA adapters (Hu et al. 2021) in the files the ecosystem exchanges, read, written and merged in NumPy.

An adapter adds `scale * (alpha / r) * up @ down` to a layer's weight (a Linear's (out, in) matrix, or a
convolution's kernel with `down` (r, in, kh, kw) and `up` (out, r, 1, 1)). In memory, `Adapter.layers` maps
(component, module path) to `LoRALayer(down, up, alpha)`, the module paths being the model's canonical ones
(diffusers' / transformers'), so the same adapter goes on either backend.

Dialects read (`read_adapter`):
    diffusers  pytorch_lora_weights.safetensors: "unet.<path>.lora_A.weight" / ".lora_B.weight" (a pipeline's
               save_lora_weights; the prefix names the component, PREFIXES), or the same keys without the
               prefix (a model's save_lora_adapter: the component holding the path, the decoder when the
               upsamplers hold it too, as diffusers' `unet` is the decoder); r / lora_alpha / rank_pattern /
               alpha_pattern from the "lora_adapter_metadata" JSON in the safetensors metadata (keys "unet.r"
               or "r"), as diffusers writes it; older "<path>.lora.down.weight" / ".lora.up.weight" keys too
    PEFT       adapter_model.safetensors + adapter_config.json: "base_model.model.<path>.lora_A.weight"
    kohya      "lora_unet_<path with _>.lora_down.weight" / ".lora_up.weight" / ".alpha" ("lora_te_": the text
               encoder)
Without an alpha anywhere, alpha = r (scale 1), diffusers' reading. A key that names no module of the model is an
error naming it, never skipped. `write_adapter` writes the diffusers dialect with its metadata, which diffusers'
`load_lora_weights` / `load_lora_adapter(prefix="unet")` and PEFT read, or kohya's (ComfyUI, A1111).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import Dalle2Error

PREFIXES = {"decoder": "unet", "text_encoder": "text_encoder", "prior": "prior", "text_proj": "text_proj",
            "super_res_first": "super_res_first", "super_res_last": "super_res_last",
            "image_encoder": "image_encoder"}
KOHYA = {"lora_unet": "decoder", "lora_te": "text_encoder"}
FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


@dataclass(frozen=True)
class LoRALayer:
    down: np.ndarray  # lora_A: (r, in) or (r, in, kh, kw)
    up: np.ndarray  # lora_B: (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, scale: float = 1.0) -> np.ndarray:
        """What the layer adds to its weight: scale * alpha / r * up @ down, in the weight's shape."""
        up, down = self.up.astype(np.float64), self.down.astype(np.float64)
        d = up.reshape(up.shape[0], -1) @ down.reshape(self.rank, -1)
        return (scale * self.alpha / self.rank * d).reshape((up.shape[0],) + down.shape[1:])


@dataclass
class Adapter:
    layers: dict[tuple[str, str], LoRALayer] = field(default_factory=dict)
    source: str = "adapter"
    dropout: float = 0.0  # the LoRA dropout it was trained with (PEFT's lora_dropout: a record; merging ignores it)

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.layers})


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key starting with ^ is a regex on the path, else it matches the
    path's tail at a dot boundary."""
    for key, value in patterns.items():
        regex = key if key.startswith("^") else rf"(^|.*\.){key}$"
        if re.match(regex, path):
            return value
    return default


def _alpha(config: dict | None, path: str, rank: int) -> float:
    if not config:
        return float(rank)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", rank))
    if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); as alpha / r that is alpha * sqrt(r)
        alpha = alpha * np.sqrt(rank)
    return float(alpha)


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # a truncated or foreign file: one line
        raise Dalle2Error(f"{str(path)!r} is not a readable safetensors LoRA file ({e})") from None


def _locate(path: Path) -> tuple[Path, dict | None]:
    """The weights file of `path` (a file, or a folder holding one of FILES) and its adapter_config.json."""
    if path.is_dir():
        found = [path / name for name in FILES if (path / name).is_file()]
        if not found:
            raise Dalle2Error(f"{str(path)!r} holds no {' or '.join(FILES)}; give the LoRA file itself")
        path = found[0]
    elif not path.is_file():
        raise Dalle2Error(f"LoRA file {str(path)!r} does not exist")
    config_file = path.parent / "adapter_config.json"
    config = None
    if path.name == "adapter_model.safetensors" and config_file.is_file():
        config = json.loads(config_file.read_text())
    return path, config


def read_adapter(path, module_paths: dict[str, set[str]]) -> Adapter:
    """An adapter file (any dialect above) resolved against `module_paths`: {component: the module paths that
    hold a weight}. Every key must land on one of them."""
    path, config = _locate(Path(path))
    tensors, metadata = _read_safetensors(path)
    if metadata.get(METADATA_KEY):
        config = json.loads(metadata[METADATA_KEY])
    pairs: dict[tuple[str, str], dict] = {}
    for key, value in tensors.items():
        component, module, part = _parse_key(key, module_paths, str(path))
        pairs.setdefault((component, module), {})[part] = value
    adapter = Adapter(source=str(path))
    for (component, module), parts in pairs.items():
        if "down" not in parts or "up" not in parts:
            raise Dalle2Error(f"{str(path)!r}: {component} {module} has lora_{'A' if 'down' not in parts else 'B'} "
                              "missing; the file is incomplete")
        rank = parts["down"].shape[0]
        prefix = PREFIXES.get(component, component)
        sub = {k.removeprefix(prefix + "."): v for k, v in (config or {}).items() if k.startswith(prefix + ".")}
        alpha = float(parts["alpha"]) if "alpha" in parts else _alpha(sub or config, module, rank)
        adapter.layers[(component, module)] = LoRALayer(parts["down"].astype(np.float32),
                                                        parts["up"].astype(np.float32), alpha)
    if not adapter.layers:
        raise Dalle2Error(f"{str(path)!r} holds no LoRA weights")
    adapter.dropout = max((float(v) for k, v in (config or {}).items()
                           if k.rpartition(".")[2] == "lora_dropout" and isinstance(v, (int, float))), default=0.0)
    return adapter


_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
          "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


def _parse_key(key: str, module_paths: dict[str, set[str]], where: str) -> tuple[str, str, str]:
    """(component, module path, "down" | "up" | "alpha") of one file key, or a one-line error naming it."""
    for suffix, part in _PARTS.items():
        if key.endswith("." + suffix):
            stem = key[: -len(suffix) - 1].removesuffix(".default")  # PEFT's adapter name, if kept
            break
    else:
        raise Dalle2Error(f"{where}: key {key!r} is not a LoRA weight (lora_A / lora_B / lora_down / lora_up / "
                          "alpha)")
    stem = stem.removeprefix("base_model.model.")
    for kohya, component in KOHYA.items():
        if stem.startswith(kohya + "_") and component in module_paths:
            flat = stem[len(kohya) + 1:]
            matches = [p for p in module_paths[component] if p.replace(".", "_") == flat]
            if len(matches) == 1:
                return component, matches[0], part
            return _no_module(key, component, where)
    for component, prefix in PREFIXES.items():
        if stem.startswith(prefix + ".") and component in module_paths:
            module = stem[len(prefix) + 1:]
            return (component, module, part) if module in module_paths[component] else _no_module(
                key, component, where)
    owners = [c for c, paths in module_paths.items() if stem in paths]  # no prefix: the component holding it
    if len(owners) == 1:
        return owners[0], stem, part
    if "decoder" in owners:  # a UNet's own file (save_lora_adapter) is diffusers' `unet`: the decoder
        return "decoder", stem, part
    if owners:
        raise Dalle2Error(f"{where}: key {key!r} names a module of {' and '.join(sorted(owners))}; prefix the "
                          f"file's keys with the one it adapts ('{sorted(owners)[0]}.{stem}...')")
    return _no_module(key, None, where)


def _no_module(key: str, component: str | None, where: str):
    into = f"the model's {component}" if component else "any component of the model"
    raise Dalle2Error(f"{where}: key {key!r} matches no module of {into}; the adapter was made for another model "
                      "(or another version of it)")


def write_adapter(path, adapter: Adapter, dialect: str = "diffusers", overwrite: bool = True) -> Path:
    """The diffusers dialect (pipeline save_lora_weights): prefixed keys, fp32, and per component the LoRA
    config as diffusers packs it into the metadata ("unet.r", "unet.lora_alpha", ...); or kohya's
    ("lora_unet_<path with _>.lora_down.weight", ".lora_up.weight", ".alpha"; the decoder and the text encoder
    only, the components kohya names). Atomic."""
    from safetensors.numpy import save

    from .images import write_atomic

    if dialect == "kohya":
        return write_atomic(Path(path), lambda f: f.write(save(_kohya(adapter))), overwrite, ".safetensors")
    if dialect != "diffusers":
        raise Dalle2Error(f"unknown LoRA dialect {dialect!r}; write diffusers or kohya")
    tensors, config = {}, {}
    for (component, module), layer in sorted(adapter.layers.items()):
        prefix = PREFIXES.get(component, component)
        tensors[f"{prefix}.{module}.lora_A.weight"] = np.ascontiguousarray(layer.down, np.float32)
        tensors[f"{prefix}.{module}.lora_B.weight"] = np.ascontiguousarray(layer.up, np.float32)
        config.setdefault(prefix, []).append((module, layer))
    metadata = {}
    for prefix, layers in config.items():
        ranks = [layer.rank for _, layer in layers]
        r = max(set(ranks), key=ranks.count)
        alphas = [layer.alpha for _, layer in layers]
        alpha = max(set(alphas), key=alphas.count)
        packed = {"r": r, "lora_alpha": alpha, "lora_dropout": adapter.dropout, "bias": "none", "use_dora": False,
                  "use_rslora": False, "init_lora_weights": True,
                  "target_modules": sorted(m for m, _ in layers),  # PEFT matches a full path exactly
                  "rank_pattern": {f"^{m}$": lay.rank for m, lay in layers if lay.rank != r},
                  "alpha_pattern": {f"^{m}$": lay.alpha for m, lay in layers if lay.alpha != alpha}}
        metadata.update({f"{prefix}.{k}": v for k, v in packed.items()})
    blob = save(tensors, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})
    path = Path(path)
    write_atomic(path, lambda f: f.write(blob), overwrite, ".safetensors")
    return path


def _kohya(adapter: Adapter) -> dict[str, np.ndarray]:
    names = {component: prefix for prefix, component in KOHYA.items()}
    tensors = {}
    for (component, module), layer in sorted(adapter.layers.items()):
        if component not in names:
            raise Dalle2Error(f"kohya files name the decoder (lora_unet_) and the text encoder (lora_te_) only, "
                              f"not the {component}; write the diffusers dialect")
        stem = f"{names[component]}_{module.replace('.', '_')}"
        tensors[f"{stem}.lora_down.weight"] = np.ascontiguousarray(layer.down, np.float32)
        tensors[f"{stem}.lora_up.weight"] = np.ascontiguousarray(layer.up, np.float32)
        tensors[f"{stem}.alpha"] = np.array(layer.alpha, np.float32)
    return tensors


def fuse(state: dict[str, np.ndarray], adapter: Adapter, component: str, scale: float = 1.0) -> dict:
    """`state` (a component's weights, NumPy) with the adapter's layers of `component` added at `scale`."""
    out = dict(state)
    for (c, module), layer in adapter.layers.items():
        if c != component:
            continue
        name = f"{module}.weight"
        w = out[name]
        delta = layer.delta(scale)
        if delta.shape != w.shape:
            raise Dalle2Error(f"{adapter.source}: {component} {module} is {w.shape[::-1] if w.ndim == 2 else w.shape} "
                              f"but the adapter's update is {delta.shape}; it was made for another model size")
        out[name] = (w.astype(np.float64) + delta).astype(w.dtype)
    return out


def parse_spec(text: str) -> tuple[str, float]:
    """FILE[:SCALE] -> (file, scale); a Windows drive letter or a path with colons keeps its colons."""
    head, sep, tail = str(text).rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
        return head, float(tail)
    return str(text), 1.0


def _read_all(loras, paths) -> list[tuple[Adapter, float]]:
    return [(read_adapter(file, paths), float(scale)) for file, scale in loras]


def _merged(state: dict, adapters: list[tuple[Adapter, float]], component: str) -> dict:
    """`state` with every adapter's layers of `component` added at its scale."""
    for adapter, scale in adapters:
        state = fuse(state, adapter, component, scale)
    return state


def _touched(adapters: list[tuple[Adapter, float]]) -> list[str]:
    return sorted({c for adapter, _ in adapters for c in adapter.components()})


def read_adapters(model_dir, components, loras) -> list[tuple[Adapter, float]]:
    """(adapter, scale) for each (file, scale) of `loras`, resolved against the named `components` of the
    model in `model_dir` (their module paths read from the weight files; nothing loaded)."""
    paths = {k: v for k, v in file_module_paths(model_dir).items() if k in components}
    return _not_quantized(model_dir, _read_all(loras, paths))


def _not_quantized(model_dir, adapters: list[tuple[Adapter, float]]) -> list[tuple[Adapter, float]]:
    """`adapters`, unless one adapts a quantised component (quantize.py), into whose packed weights no adapter
    merges: then one line saying to fuse into the float model first."""
    from . import store

    spec = store.read_spec(model_dir)
    for name in _touched(adapters):
        q = spec.components[name].quantization
        if q is not None:
            raise Dalle2Error(f"the {name} of {str(model_dir)!r} is quantized ({q.describe()}) and a LoRA adapter "
                              "merges into float weights; fuse the adapter into the float model (`dalle2 lora fuse`),"
                              " then quantize the result (`dalle2 quantize`)")
    return adapters


def merge_component(backend, module, component: str, adapters) -> None:
    """Merge the `adapters` ((adapter, scale) pairs) into the loaded `module` of `component`, in place: only
    the weights they adapt are read back and loaded again; a component they leave alone is not touched."""
    names = {f"{m}.weight" for adapter, _ in adapters for c, m in adapter.layers if c == component}
    if names:
        state = backend.to_numpy(module, {k: v for k, v in backend.weights(module).items() if k in names})
        backend.load_weights(module, _merged(state, adapters, component), partial=True)


def file_module_paths(model_dir) -> dict[str, set[str]]:
    """{component: the module paths holding a weight}, read from the model directory's weight files' keys
    (nothing loaded)."""
    from safetensors import safe_open

    from . import store

    spec = store.read_spec(model_dir)
    paths = {}
    for name in spec.components:
        with safe_open(str(store.component_path(model_dir, spec, name)), framework="numpy") as f:
            paths[name] = {k[: -len(".weight")] for k in f.keys() if k.endswith(".weight")}
    return paths


def fuse_model(model_dir, loras, out, overwrite: bool = False) -> Path:
    """A copy of the model directory `model_dir` with each (file, scale) of `loras` merged into its weights,
    written atomically to `out` with fresh checksums. NumPy only: no backend is loaded."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from . import store

    model_dir = Path(model_dir)
    spec = store.read_spec(model_dir)
    files = {name: store.component_path(model_dir, spec, name) for name in spec.components}
    adapters = _not_quantized(model_dir, _read_all(loras, file_module_paths(model_dir)))
    with store.atomic_directory(out, overwrite=overwrite) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        for component in _touched(adapters):
            state = _merged(load_file(str(files[component])), adapters, component)
            save_file(state, str(tmp / spec.components[component].weights))
        about = dict(store.read_about(model_dir) or {})
        about["lora_fused"] = [f"{adapter.source}:{scale:g}" for adapter, scale in adapters]
        store.write_spec(tmp, spec, about=about)
    return Path(out)
