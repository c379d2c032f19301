"""Builders of test checkpoints in the exact upstream layouts (shared by the test modules).

Everything is made here with the reference libraries' own `save_pretrained`, since nothing can be downloaded.
"""

import hashlib
import json
import os
import random
import shutil
from pathlib import Path


from dalle2_portable.spec import UNet2DConditionConfig
from dalle2_portable.tokenizers import train_clip_bpe

SYLLABLES = ("th e an in er re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de "
             "hi ri ro ic ne ea ra ce ca fé ïv ström").split()


def added_token(content):
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
            "__type": "AddedToken"}


def hub_tokenizer_files(d, pad):
    """tokenizer_config.json + special_tokens_map.json as in openai/clip-* (pad "<|endoftext|>") or Karlo ("!")."""
    cfg = {"unk_token": added_token("<|endoftext|>"), "bos_token": added_token("<|startoftext|>"),
           "eos_token": added_token("<|endoftext|>"), "pad_token": pad, "add_prefix_space": False, "errors": "replace",
           "do_lower_case": True, "name_or_path": "openai/clip-vit-large-patch14", "model_max_length": 77,
           "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    stm = {k: ({kk: vv for kk, vv in v.items() if kk != "__type"} if isinstance(v, dict) else v)
           for k, v in cfg.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    (d / "special_tokens_map.json").write_text(json.dumps(stm, indent=2))


def write_clip_vocab(d: Path) -> Path:
    """A CLIP-format vocab.json + merges.txt in `d` (no configs): a byte-level BPE trained on a generated corpus,
    ordered as CLIP orders its vocab (256 byte symbols, the same + "</w>", merge results in rank order, then
    <|startoftext|>, <|endoftext|>); ~2,700 merges, 0.3 s. The real vocab cannot be downloaded in CI."""
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "!", "!!", "?", "...", "'s", " 42"])
             for _ in range(4000)]
    train_clip_bpe(lines, 4000, d)
    assert len((d / "merges.txt").read_text().splitlines()) > 2000
    return d


def put_in_hub_cache(folder: Path, repo_id: str, cache: Path, revision: str = "main") -> str:
    """Lay `folder` out as huggingface_hub caches a snapshot of `repo_id` (blobs, snapshot symlinks, refs).

    Returns the commit hash. `revision` names the ref that points at it (a branch or tag name).
    """
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes()[:1024] for p in files) + revision.encode()).hexdigest()
    snap = repo_dir / "snapshots" / commit
    for p in files:
        data = p.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    return commit


TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77)
TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8)


def write_tiny_clip(d: Path, vocab_dir: Path, kind: str = "clip", pad: str = "<|endoftext|>", seed: int = 0,
                    safetensors: bool = True, text: dict | None = None, vision: dict | None = None) -> Path:
    """A tiny random transformers CLIP checkpoint saved as the Hub stores one, with tokenizer files from
    `vocab_dir` and a preprocessor_config.json. kind: "clip" (CLIPModel), "text" (CLIPTextModelWithProjection)
    or "vision" (CLIPVisionModelWithProjection). `text` / `vision` override config values."""
    import torch
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig,
                              CLIPTextModelWithProjection, CLIPVisionConfig, CLIPVisionModelWithProjection)

    vocab_size = len(json.loads((vocab_dir / "vocab.json").read_text()))
    tcfg = dict(TINY_TEXT, vocab_size=vocab_size, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                projection_dim=16, **(text or {}))
    vcfg = dict(TINY_VISION, projection_dim=16, **(vision or {}))
    torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=tcfg, vision_config=vcfg, projection_dim=16))
    elif kind == "text":
        model = CLIPTextModelWithProjection(CLIPTextConfig(**tcfg))
    else:
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**vcfg))
    d.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(d)
    if not safetensors:
        # transformers 5 writes only safetensors; the Hub's older repos hold pytorch_model.bin pickles that
        # also carry the int64 `position_ids` buffers (karlo-v1-alpha.md: "torch.LongStorage").
        (d / "model.safetensors").unlink()
        sd = dict(model.state_dict())
        for tower, n in (("text_model", tcfg["max_position_embeddings"]),
                         ("vision_model", (vcfg["image_size"] // vcfg["patch_size"]) ** 2 + 1)):
            if any(k.startswith(tower) for k in sd):
                sd[f"{tower}.embeddings.position_ids"] = torch.arange(n)[None]
        torch.save(sd, d / "pytorch_model.bin")
    if kind != "vision":
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(vocab_dir / f, d / f)
        hub_tokenizer_files(d, pad)
    if kind != "text":
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


# A tiny Karlo: sizes chain as in the real one (CLIP width = prior width = text_proj input; text_proj's time and
# context widths = the decoder's), every block type of the real decoder and super-res UNets present.
TINY_KARLO = dict(
    prior=dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=16, num_embeddings=77),
    text_proj=dict(clip_embeddings_dim=16, time_embed_dim=64, cross_attention_dim=24),
    decoder=dict(in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                 down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                 mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                 up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), attention_head_dim=8,
                 cross_attention_dim=24, class_embed_type="identity", resnet_time_scale_shift="scale_shift",
                 sample_size=8),
    super_res=dict(in_channels=6, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
                   down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
                   add_attention=False, sample_size=16),
)


# The real sizes (reference karlo-v1-alpha.md sections 3-8), for benchmarks/convert_karlo.py.
KARLO = dict(
    prior=dict(num_attention_heads=32, attention_head_dim=64, num_layers=20, embedding_dim=768, num_embeddings=77),
    text_proj=dict(clip_embeddings_dim=768, time_embed_dim=1280, cross_attention_dim=1536),
    decoder=dict(TINY_KARLO["decoder"], block_out_channels=(320, 640, 960, 1280), layers_per_block=3,
                 norm_num_groups=32, attention_head_dim=64, cross_attention_dim=1536, sample_size=64,
                 down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                 up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",)),
    super_res=dict(TINY_KARLO["super_res"], block_out_channels=(320, 640, 960, 1280), layers_per_block=3,
                   norm_num_groups=32, down_block_types=("ResnetDownsampleBlock2D",) * 4,
                   up_block_types=("ResnetUpsampleBlock2D",) * 4, sample_size=256),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408),
)


def write_tiny_karlo(d: Path, vocab_dir: Path, variations: bool = False, safetensors: bool = True,
                     variant: str | None = None, seed: int = 0, sizes: dict | None = None,
                     weight_noise: float = 0.05) -> Path:
    """A tiny random kakaobrain/karlo-v1-alpha (or -image-variations) saved by diffusers' own
    `UnCLIPPipeline.save_pretrained` (model_index.json, one subfolder per component), with the tokenizer files
    in the Hub's form. safetensors=False writes the `.bin` pickles the Hub also holds (the text encoder's with
    its int64 position_ids buffer); `variant` names the weight files as diffusers' variants do (`.fp16.`).
    sizes=KARLO builds the real sizes (~3.4 billion parameters, 13.6 GB on disk: for benchmarks only).

    Conditioning (the sampling tests rely on it): Karlo's own scale_shift time conditioning, every weight
    perturbed by N(0, 0.05), 8 px decoder and 16 px super-res. A 1e-5 change of the initial latents then moves
    the final image by ~2e-5 (tests/test_sampling.py measures it): the cascade is not chaotic, so parity
    tolerances there measure the implementation, not amplified rounding. Wider models need less noise
    (`weight_noise`): at benchmarks/generate_speed.py's small size (64-256 channels, 64 / 256 px), 0.05 makes
    the super-res stage chaotic (a 3e-3 difference in its input flips pixels), 0.005 does not."""
    import torch
    from diffusers import (PriorTransformer, UnCLIPImageVariationPipeline, UnCLIPPipeline, UnCLIPScheduler,
                           UNet2DConditionModel, UNet2DModel)
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    sizes = sizes or TINY_KARLO
    vocab_size = len(json.loads((vocab_dir / "vocab.json").read_text()))
    torch.manual_seed(seed)
    text = {**TINY_TEXT, "hidden_size": 16, "projection_dim": 16, "vocab_size": vocab_size, **sizes.get("text", {})}
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text, eos_token_id=2, pad_token_id=1))
    parts = dict(
        decoder=UNet2DConditionModel(**sizes["decoder"]), text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(str(vocab_dir / "vocab.json"), str(vocab_dir / "merges.txt"), pad_token="!"),
        text_proj=UnCLIPTextProjModel(**sizes["text_proj"]),
        super_res_first=UNet2DModel(**sizes["super_res"]),
        super_res_last=UNet2DModel(**dict(sizes["super_res"], sample_size=None)),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))
    for name in ("decoder", "text_proj", "super_res_first", "super_res_last"):  # no zero-initialised weights
        with torch.no_grad():
            for p in parts[name].parameters():
                p.add_(weight_noise * torch.randn_like(p))
    if variations:
        parts.update(feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32}),
                     image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**dict(TINY_VISION,
                                                                                          projection_dim=16))))
        pipe = UnCLIPImageVariationPipeline(**parts)
    else:
        prior = PriorTransformer(**sizes["prior"])
        with torch.no_grad():
            for p in prior.parameters():
                p.add_(weight_noise * torch.randn_like(p))
            prior.clip_std.add_(1.0)  # CLIP-scale embeddings out of post_process_latents, as Karlo's statistics give
        pipe = UnCLIPPipeline(prior=prior, prior_scheduler=UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0), **parts)
    pipe.save_pretrained(d, safe_serialization=safetensors, variant=variant)
    v = f".{variant}" if variant else ""
    for tower in ("text_encoder", "image_encoder"):
        if not safetensors and tower in parts:  # transformers 5 saves safetensors only
            _transformers_to_bin(d / tower, parts[tower], v)
    tok = d / "tokenizer"  # the Hub's form: vocab + merges + the two json files (karlo-v1-alpha.md section 9)
    shutil.rmtree(tok)
    tok.mkdir()
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / f, tok / f)
    hub_tokenizer_files(tok, "!")
    return d


def _transformers_to_bin(folder: Path, model, v: str) -> None:
    """Replace a transformers folder's safetensors with the `pytorch_model.bin` pickle older Hub repos hold."""
    import torch

    for f in folder.glob("model*.safetensors"):
        f.unlink()
    sd = dict(model.state_dict())
    for tower in ("text_model", "vision_model"):
        emb = f"{tower}.embeddings.position_embedding.weight"
        if emb in sd:
            sd[f"{tower}.embeddings.position_ids"] = torch.arange(sd[emb].shape[0])[None]
    torch.save(sd, folder / f"pytorch_model{v}.bin")


# Karlo's decoder layout at toy width (every block type, scale-shift, learned variance): the training tests' model
TINY_LEARNED_VARIANCE_DECODER = UNet2DConditionConfig(
    in_channels=3, out_channels=6, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
    attention_head_dim=8, cross_attention_dim=12, time_embed_dim=32, class_embed_type="identity",
    resnet_time_scale_shift="scale_shift", sample_size=8,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"))
