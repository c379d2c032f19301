"""Reading the reference files that more than one layout converts, in one place: JSON configs, a Hub tokenizer
folder (-> TokenizerConfig and the model directory's canonical tokenizer files), and a transformers CLIP folder
(a `CLIPModel` repo, or Karlo's `text_encoder/` and `image_encoder/` subfolders) -> component files.

A CLIP folder's parameter names are kept as they are (they are our canonical names); only buffers the module tree
does not have are dropped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .. import store
from ..errors import Dalle2Error
from ..spec import CLIPTextConfig, CLIPVisionConfig, Component, TokenizerConfig
from ..tokenizers import EOS, has_vocab_merges, sp_model_file, vocab_merges_from_tokenizer_json
from .weights import Checkpoint, write_component

MERGES_HEADER = "#version: 0.2"  # first line of the Hub's merges.txt; tokenizers and transformers skip it
DEFAULT_MAX_LENGTH = 77
# transformers writes model_max_length = int(1e30) ("no limit") when a folder had no tokenizer_config.json.
_MAX_SANE_LENGTH = 1_000_000

# Buffers older checkpoints saved that are not parameters (transformers registers them non-persistent now).
_DROPPED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# model_type in config.json -> which towers it holds
_TOWERS = {"clip": ("text", "vision"), "clip_text_model": ("text",), "clip_vision_model": ("vision",)}
_PREFIXES = {"text": ("text_model.", "text_projection."), "vision": ("vision_model.", "visual_projection.")}


def read_json(path: Path) -> Any:
    """A source's JSON file; missing or unreadable is one line naming it."""
    return store.read_json(path, "the source folder is incomplete or damaged: download it again")


# ------------------------------------------------------------------------------------------------- tokenizer


def _content(tok: Any) -> str | None:
    """A special token as the Hub writes it: a string, or an AddedToken dict {"content": ..., "__type": ...}."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def tokenizer_config_from_hf(directory: str | Path) -> TokenizerConfig:
    """A Hub tokenizer folder -> TokenizerConfig. kind from the files present; pad_token from special_tokens_map.json
    / tokenizer_config.json (string or AddedToken dict); max_length from model_max_length (1e30 sentinel -> 77)."""
    d = Path(directory)
    if has_vocab_merges(d):
        kind = "clip_bpe"
    elif sp_model_file(d) is not None:
        kind = "sentencepiece"
    elif (d / "tokenizer.json").is_file():
        kind = "clip_bpe"
    else:
        raise Dalle2Error(f"{d}: no tokenizer files (vocab.json + merges.txt, tokenizer.json or tokenizer.model); "
                          "point at the repo's tokenizer/ folder")
    tc = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
    stm = read_json(d / "special_tokens_map.json") if (d / "special_tokens_map.json").is_file() else {}
    if not isinstance(tc, dict) or not isinstance(stm, dict):
        raise Dalle2Error(f"{d}: tokenizer_config.json / special_tokens_map.json is not a JSON object; "
                          "re-download the tokenizer folder")
    # transformers (legacy path, no added_tokens_decoder in the config) lets special_tokens_map.json win.
    pad = _content(tc.get("pad_token"))
    if "added_tokens_decoder" not in tc:
        pad = _content(stm.get("pad_token")) or pad
    if pad is None:
        pad = EOS if kind == "clip_bpe" else "<pad>"
    n = tc.get("model_max_length")
    max_length = int(n) if isinstance(n, (int, float)) and 2 <= n <= _MAX_SANE_LENGTH else DEFAULT_MAX_LENGTH
    return TokenizerConfig(kind=kind, max_length=max_length, pad_token=pad)


def write_tokenizer_files(src_dir: str | Path, dst_dir: str | Path, config: TokenizerConfig) -> list[Path]:
    """Write the canonical tokenizer folder of a model directory: clip_bpe -> vocab.json + merges.txt (copied, or
    extracted from tokenizer.json); sentencepiece -> tokenizer.model. Returns the files written."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    if config.kind == "sentencepiece":
        path = sp_model_file(src)
        if path is None:
            raise Dalle2Error(f"{src / 'tokenizer.model'}: file not found; download the repo's SentencePiece "
                              "tokenizer.model into that folder")
        shutil.copyfile(path, dst / "tokenizer.model")
        return [dst / "tokenizer.model"]
    out = [dst / "vocab.json", dst / "merges.txt"]
    if has_vocab_merges(src):
        for p in out:
            if (src / p.name).resolve() != p.resolve():
                shutil.copyfile(src / p.name, p)
        return out
    if not (src / "tokenizer.json").is_file():
        raise Dalle2Error(f"{src / 'vocab.json'}: file not found (nor merges.txt, nor tokenizer.json); download "
                          "the repo's tokenizer/ folder (vocab.json + merges.txt) and convert again")
    vocab, merges = vocab_merges_from_tokenizer_json(src / "tokenizer.json")
    for a, b in merges:
        if " " in a or " " in b or "\n" in a + b:
            raise Dalle2Error(f"{src / 'tokenizer.json'}: merge {a!r} {b!r} cannot be written to merges.txt; "
                              "use a byte-level BPE tokenizer")
    # Same form as transformers' slow save_vocabulary: sorted, indented, UTF-8 (not \u escapes).
    (dst / "vocab.json").write_text(json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    (dst / "merges.txt").write_text(MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                    encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------ CLIP towers


def clip_configs(config: dict, where: str) -> dict[str, CLIPTextConfig | CLIPVisionConfig]:
    """{component name: config} for the towers a transformers CLIP config.json describes."""
    model_type = config.get("model_type")
    if model_type not in _TOWERS:
        raise Dalle2Error(f"{where}: model_type {model_type!r} is not a CLIP model; supported: "
                          f"{', '.join(_TOWERS)}")
    arch = (config.get("architectures") or [""])[0]
    if arch in ("CLIPTextModel", "CLIPVisionModel"):
        raise Dalle2Error(f"{where}: {arch} has no projection layer, so it has no CLIP embedding; use the "
                          f"{arch}WithProjection or CLIPModel checkpoint")
    if model_type == "clip":
        # CLIPModel builds both projections with the top-level projection_dim (default 512).
        proj = config.get("projection_dim", 512)
        return {"text_encoder": CLIPTextConfig.from_hf_config(config.get("text_config") or {}, proj),
                "image_encoder": CLIPVisionConfig.from_hf_config(config.get("vision_config") or {}, proj)}
    if model_type == "clip_text_model":
        return {"text_encoder": CLIPTextConfig.from_hf_config(config)}
    return {"image_encoder": CLIPVisionConfig.from_hf_config(config)}


def write_clip_components(src: Path, out: Path, dtype: str, variant: str | None = None) -> tuple[dict, dict]:
    """Convert the CLIP checkpoint in `src` (config.json; `model.safetensors`, sharded or not, else
    `pytorch_model.bin`) into component files in `out`.

    Returns ({name: Component}, extra defaults such as CLIP's logit_scale). Every tensor is checked against
    the config's expected names and shapes before the file is written.
    """
    configs = clip_configs(read_json(src / "config.json"), str(src / "config.json"))
    ckpt = Checkpoint(src, "model", bin_stem="pytorch_model", variant=variant)
    names = [n for n in ckpt.names() if n not in _DROPPED]
    defaults = {}
    if "logit_scale" in names:  # CLIPModel's temperature: a scalar, kept as a number for similarity scores
        defaults["clip_logit_scale"] = float(ckpt.get("logit_scale").reshape(()))
        names.remove("logit_scale")
    components = {}
    claimed: set[str] = set()
    for name, config in configs.items():
        tower = "text" if name == "text_encoder" else "vision"
        mine = [n for n in names if n.startswith(_PREFIXES[tower])]
        claimed.update(mine)
        filename = f"{name}.safetensors"
        write_component(ckpt, mine, config, out / filename, dtype)
        components[name] = Component(config.TYPE, config, filename)
    stray = [n for n in names if n not in claimed]
    if stray:
        raise Dalle2Error(f"{str(ckpt.files[0])!r} has tensor {stray[0]!r} that belongs to no CLIP tower; is "
                          "this a CLIP checkpoint?")
    return components, defaults
