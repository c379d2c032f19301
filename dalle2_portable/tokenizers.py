"""Text -> token ids, backend-neutral (numpy out): CLIP's byte-level BPE and SentencePiece.

The CLIP tokenizer reproduces transformers 5.23's `CLIPTokenizer` (models/clip/tokenization_clip.py, which builds
the same `tokenizers` pipeline as `CLIPConverter` in convert_slow_tokenizer.py):
    NFC -> collapse whitespace runs to " " -> lowercase -> split on the CLIP regex (non-matches removed)
    -> ByteLevel (bytes_to_unicode symbols) -> BPE with end_of_word_suffix "</w>",
and `tok(texts, padding="max_length", max_length=L, truncation=True)["input_ids"]`:
    [BOS] + ids[:L - 2] + [EOS] + [pad] * (L - len) -> (B, L) int64.
The special tokens BOS, EOS and the pad token are "added special tokens" (normalized=False) exactly as transformers
registers them: their literal text in a prompt becomes their id. Quirk inherited on purpose: with Karlo's
pad_token "!" every "!" in a prompt is split off as the lone id 0 ("wow!!" -> "wow</w>", "!", "!"), where OpenAI's
original tokenizer would BPE "!!</w>". We match transformers because the diffusers pipelines we compare with do.

Files read (one model's `tokenizer/` folder): vocab.json + merges.txt (the Hub's openai/clip-* and Karlo layout), or
tokenizer.json alone (what transformers 5 `save_pretrained` writes), or tokenizer.model for SentencePiece.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from . import store
from .errors import Dalle2Error
from .spec import TokenizerConfig

BOS = "<|startoftext|>"  # id 49406 in the real CLIP vocab
EOS = "<|endoftext|>"  # id 49407; also CLIP's unk token and the openai repos' pad token
# The split regex of transformers 5's CLIPTokenizer (the converter's, plus the two special tokens first).
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SP_NAMES = ("tokenizer.model", "spiece.model")  # spiece.model: T5-style repos


def _read_json(path: Path) -> Any:
    return store.read_json(path, "re-download or re-convert the tokenizer folder")


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt -> [(a, b)] in rank order. Skips the `#version` header (as tokenizers' BPE::from_file) and blank
    lines; a line that is not two space-separated symbols is an error."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise Dalle2Error(f"{path}: unreadable ({e}); re-download or re-convert the tokenizer folder") from None
    merges = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise Dalle2Error(f"{path}: line {n} is not a merge 'a b'; re-download or re-convert the tokenizer folder")
        merges.append((parts[0], parts[1]))
    return merges


def has_vocab_merges(d: Path) -> bool:
    return (d / "vocab.json").is_file() and (d / "merges.txt").is_file()


def sp_model_file(d: Path) -> Path | None:
    return next((d / n for n in SP_NAMES if (d / n).is_file()), None)


def vocab_merges_from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tokenizer.json -> (vocab, merges). model.merges is ["a b", ...] (tokenizers < 0.20) or [["a", "b"], ...];
    added tokens missing from model.vocab (a re-export may keep the specials only there) are folded in."""
    tj = _read_json(path)
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise Dalle2Error(f"{path}: not a BPE tokenizer.json; use the CLIP tokenizer folder (vocab.json + merges.txt)")
    vocab = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    for tok in tj.get("added_tokens") or []:
        vocab.setdefault(tok["content"], tok["id"])
    return vocab, merges


def _clip_vocab_merges(d: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if has_vocab_merges(d):
        vocab = _read_json(d / "vocab.json")
        if not isinstance(vocab, dict):
            raise Dalle2Error(f"{d / 'vocab.json'}: not a token -> id object; re-download the tokenizer folder")
        return vocab, _read_merges(d / "merges.txt")
    if (d / "tokenizer.json").is_file():
        return vocab_merges_from_tokenizer_json(d / "tokenizer.json")
    raise Dalle2Error(f"{d}: no vocab.json + merges.txt (or tokenizer.json) for the CLIP tokenizer; "
                      "re-convert the model or point at the Hub repo's tokenizer/ folder")


class _Tokenizer:
    """Shared batching: `self._encode(texts) -> [[ids]]` without specials; `__call__` adds BOS/EOS, truncates keeping
    EOS, pads. Attributes: max_length, bos_id, eos_id, pad_id."""

    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int

    def _encode(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def encode_with_mask(self, texts: list[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (B, max_length) int64, attention_mask (B, max_length) int64: 1 for BOS..EOS, 0 for pads),
        as transformers' `input_ids` / `attention_mask`."""
        if isinstance(texts, str):
            texts = [texts]
        L = self.max_length
        ids = np.full((len(texts), L), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(texts), L), dtype=np.int64)
        for i, seq in enumerate(self._encode(list(texts))):
            row = [self.bos_id, *seq[: L - 2], self.eos_id]
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        return self.encode_with_mask(texts)[0]

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def truncations(self, texts: list[str]) -> list[str | None]:
        """Per text: None when it fits the window (max_length with BOS and EOS), else the text its kept tokens
        spell (what the encoder sees of it: encode_with_mask cuts the rest, as transformers does)."""
        keep = self.max_length - 2
        return [None if len(seq) <= keep else self._decode(seq[:keep]) for seq in self._encode(list(texts))]


class CLIPBPETokenizer(_Tokenizer):
    """transformers 5 `CLIPTokenizer`, rebuilt with the `tokenizers` library from (vocab, merges)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int, pad_token: str,
                 where: str = "tokenizer"):
        for name, tok in (("BOS", BOS), ("EOS", EOS), ("pad", pad_token)):
            if tok not in vocab:
                fix = ("set the tokenizer's pad_token in model.json to one that is (e.g. '<|endoftext|>')"
                       if name == "pad" else "use the CLIP tokenizer files (vocab.json + merges.txt)")
                raise Dalle2Error(f"{where}: the {name} token {tok!r} is not in the vocabulary; {fix}")
        tk = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                           end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
        tk.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tk.decoder = decoders.ByteLevel()
        # Registered as transformers registers them from the Hub's tokenizer_config.json (openai/clip-*, Karlo):
        # special, ids from the vocab; BOS/EOS are AddedToken dicts with normalized=True there (matched after
        # lowercasing: "<|STARTOFTEXT|>" is BOS), but a plain-string pad_token is normalized=False and, when it is
        # EOS itself (openai repos), overrides EOS's flag: there "<|ENDOFTEXT|>" is ordinary text.
        specials = [AddedToken(BOS, special=True, normalized=True),
                    AddedToken(EOS, special=True, normalized=pad_token != EOS)]
        if pad_token not in (BOS, EOS):
            specials.append(AddedToken(pad_token, special=True, normalized=False))
        tk.add_special_tokens(specials)
        self._tk = tk
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids: list[int]) -> str:
        symbols = {c: b for b, c in _bytes_to_unicode().items()}
        text = "".join(self._tk.id_to_token(i) for i in ids).replace("</w>", " ")
        return bytes(32 if c == " " else symbols[c] for c in text).decode("utf-8", errors="replace").strip()


class SentencePieceTokenizer(_Tokenizer):
    """bos + `sp.encode(text)` + eos, truncated keeping eos, padded with config.pad_token's id (if a piece of the
    model) else sp.pad_id() (else 0)."""

    def __init__(self, path: Path, max_length: int, pad_token: str):
        try:
            self._sp = sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise Dalle2Error(f"{path}: not a SentencePiece model ({e}); re-download or re-convert it") from None
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise Dalle2Error(f"{path}: the SentencePiece model has no BOS/EOS piece (bos_id={sp.bos_id()}, "
                              f"eos_id={sp.eos_id()}); use a model trained with bos_id and eos_id set")
        pid = sp.piece_to_id(pad_token)  # unknown pieces map to unk_id, hence the round-trip check
        if not (0 <= pid < sp.get_piece_size() and sp.id_to_piece(pid) == pad_token):
            pid = sp.pad_id() if sp.pad_id() >= 0 else 0
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = sp.bos_id(), sp.eos_id(), pid

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's bytes_to_unicode: byte -> the symbol byte-level BPE writes it as, in CLIP's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE writes bytes as, in CLIP's vocab order."""
    return list(_bytes_to_unicode().values())


def train_clip_bpe(lines, vocab_size: int, directory: str | Path) -> Path:
    """A CLIP-format tokenizer (vocab.json + merges.txt in `directory`) learnt from `lines` with the `tokenizers`
    library's BPE trainer, through CLIP's own normaliser and split: ordered as CLIP orders its vocab (the 256
    byte symbols, the same + "</w>", each merge's result in rank order, then <|startoftext|>, <|endoftext|>), so
    `CLIPBPETokenizer` (and transformers' CLIPTokenizer) read it as they read openai/clip-*. Byte-level: every
    prompt tokenises, words never seen falling back to smaller pieces."""
    from tokenizers import trainers

    tk = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    tk.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), "removed", invert=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.train_from_iterator(list(lines), trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(m) for m in json.loads(tk.to_str())["model"]["merges"]]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab)
    vocab += [m for m in dict.fromkeys(a + b for a, b in merges) if m not in seen]
    vocab += [BOS, EOS]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                          encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    return directory


def load_tokenizer(directory: str | Path, config: TokenizerConfig) -> _Tokenizer:
    """The tokenizer of `directory` (a model's tokenizer/ folder or a Hub tokenizer folder). Call it with a list of
    strings (or one string) -> (B, config.max_length) int64 ids."""
    d = Path(directory)
    if config.max_length < 2:
        raise Dalle2Error(f"tokenizer max_length {config.max_length} leaves no room for BOS and EOS; "
                          "set it to the text encoder's max_position_embeddings (77 for CLIP)")
    if config.kind == "clip_bpe":
        vocab, merges = _clip_vocab_merges(d)
        return CLIPBPETokenizer(vocab, merges, config.max_length, config.pad_token, where=str(d))
    path = sp_model_file(d)
    if path is None:
        raise Dalle2Error(f"{d / 'tokenizer.model'}: file not found; re-convert the model or copy the "
                          "SentencePiece model there")
    return SentencePieceTokenizer(path, config.max_length, config.pad_token)
