"""dalle2_portable.tokenizers (loading) and the converters' tokenizer files (convert/files.py) against
transformers' CLIPTokenizer and sentencepiece, on vocabularies built here.

The real CLIP vocab cannot be downloaded in CI, so `clip_vocab` trains a small byte-level BPE in CLIP's format
(256 byte symbols, the same 256 + "</w>", merge results in rank order, then <|startoftext|>, <|endoftext|>) and the
tokenizer folders get the Hub's tokenizer_config.json / special_tokens_map.json of openai/clip-* and Karlo
(shared/reference/clip.md §1.3, karlo-v1-alpha.md §9).
"""

import io
import json
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import SYLLABLES, added_token as _added, hub_tokenizer_files, write_clip_vocab
from dalle2_portable.convert.files import tokenizer_config_from_hf, write_tokenizer_files
from dalle2_portable.errors import Dalle2Error
from dalle2_portable.spec import TokenizerConfig
from dalle2_portable.tokenizers import load_tokenizer

transformers = pytest.importorskip("transformers")
CLIPTokenizer = transformers.CLIPTokenizer

HARD = [
    "a photo of a cat", "A Photo Of A CAT", "café", "naïve résumé", "Ångström", "cafe\u0301 (decomposed)",
    "🙂", "a 👍🏽 emoji", "👩‍👩‍👧‍👦 family zwj", "flags 🇫🇷🇯🇵🏳️‍🌈", "日本語のテキスト", "中文字符测试", "한국어",
    "مرحبا بالعالم", "!!!???...", "a--b", "'s 're", "it's we're they've I'm you'll he'd don't", "hello! wow!!",
    "a  b\t\tc\n\nd\r\ne", "   leading and trailing   ", "", " ", "\n\t", "UPPER CASE 123", "digits 1234567890 3.14",
    "&amp; html", "a\u00a0b\u3000c\u200bd", "x<|endoftext|>y", "<|startoftext|>hi", "dog's-eye view: 2 cats & dogs; "
    "(very) [weird] {text} #tag @user", "ﬁ ligature Ⅻ ²", "\u0130stanbul ΣΊΣΥΦΟΣ straße",
]
# Case-changed specials: matched as BOS/EOS only through the Hub configs' normalized=True AddedTokens.
HUB_ONLY = ["<|STARTOFTEXT|> up", "x <|ENDOFTEXT|> y"]
LONG = " ".join(random.Random(1).choice(["red", "cat", "on", "a", "mat!", "café", "🙂", "zebra,"]) for _ in range(300))


@pytest.fixture(scope="module")
def clip_vocab(tmp_path_factory):
    return write_clip_vocab(tmp_path_factory.mktemp("clip_bare"))


@pytest.fixture(scope="module")
def hub_dirs(clip_vocab, tmp_path_factory):
    """pad -> (vocab+merges Hub folder, tokenizer.json folder written by transformers 5 save_pretrained)."""
    out = {}
    for pad in ("<|endoftext|>", "!"):
        hub = tmp_path_factory.mktemp("hub")
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(clip_vocab / f, hub / f)
        hub_tokenizer_files(hub, pad)
        saved = tmp_path_factory.mktemp("saved")
        CLIPTokenizer.from_pretrained(hub).save_pretrained(saved)
        assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
        out[pad] = (hub, saved)
    return out


def _ref(ref_dir, texts, **kw):
    enc = CLIPTokenizer.from_pretrained(ref_dir, **kw)(texts, padding="max_length", max_length=77, truncation=True)
    return np.array(enc["input_ids"], dtype=np.int64), np.array(enc["attention_mask"], dtype=np.int64)


@pytest.mark.parametrize("layout", ["vocab_merges", "tokenizer_json"])
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_matches_transformers(hub_dirs, layout, pad):
    d = hub_dirs[pad][0 if layout == "vocab_merges" else 1]
    cfg = tokenizer_config_from_hf(d)
    assert cfg == TokenizerConfig(kind="clip_bpe", max_length=77, pad_token=pad)
    tok = load_tokenizer(d, cfg)
    texts = HARD + HUB_ONLY + [LONG]
    ref_ids, ref_mask = _ref(d, texts)
    ids, mask = tok.encode_with_mask(texts)
    assert ids.dtype == np.int64 and ids.shape == (len(texts), 77)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(tok(texts), ref_ids)
    eos = tok.eos_id
    assert ids[-1, 0] == tok.bos_id and ids[-1, 76] == eos and mask[-1].all()  # 300 words: truncated, EOS kept
    assert ids[HARD.index(""), :3].tolist() == [tok.bos_id, eos, tok.pad_id]
    assert tok.pad_id == (0 if pad == "!" else eos)


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_bare_folder_and_single_string(clip_vocab, pad):
    # No tokenizer_config.json: transformers registers BOS/EOS with normalized=False, which differs from the Hub
    # folders only on case-changed special tokens (HUB_ONLY), so those are left out here.
    tok = load_tokenizer(clip_vocab, TokenizerConfig(pad_token=pad))
    np.testing.assert_array_equal(tok(HARD + [LONG]), _ref(clip_vocab, HARD + [LONG], pad_token=pad)[0])
    one = tok("a photo of a cat")
    assert one.shape == (1, 77)
    np.testing.assert_array_equal(one, tok(["a photo of a cat"]))


def test_pad_bang_splits_exclamations(hub_dirs):
    # transformers quirk kept on purpose: pad_token "!" is a special token, so each "!" is its own id 0.
    karlo = load_tokenizer(hub_dirs["!"][0], TokenizerConfig(pad_token="!"))
    openai = load_tokenizer(hub_dirs["<|endoftext|>"][0], TokenizerConfig())
    k, o = karlo("wow!!")[0], openai("wow!!")[0]
    k, o = k[: list(k).index(karlo.eos_id) + 1], o[: list(o).index(openai.eos_id) + 1]
    assert k[-3:].tolist() == [0, 0, karlo.eos_id]  # "!", "!", EOS
    assert 0 not in o.tolist()  # "!!</w>" is one BPE token there


def test_write_tokenizer_files_round_trip(hub_dirs, clip_vocab, tmp_path):
    hub, saved = hub_dirs["!"]
    cfg = tokenizer_config_from_hf(saved)
    written = write_tokenizer_files(saved, tmp_path / "from_json", cfg)  # tokenizer.json in -> vocab/merges out
    assert sorted(p.name for p in written) == ["merges.txt", "vocab.json"]
    out = tmp_path / "from_json"
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]
    lines = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert lines == (clip_vocab / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert json.loads((out / "vocab.json").read_text("utf-8")) == json.loads((clip_vocab / "vocab.json").read_text())
    texts = HARD + HUB_ONLY + [LONG]
    np.testing.assert_array_equal(load_tokenizer(out, cfg)(texts), _ref(hub, texts)[0])
    # transformers reads the written files too
    np.testing.assert_array_equal(_ref(out, HARD, pad_token="!")[0], load_tokenizer(out, cfg)(HARD))
    write_tokenizer_files(hub, tmp_path / "copied", cfg)  # vocab+merges in -> copied as they are
    for f in ("vocab.json", "merges.txt"):
        assert (tmp_path / "copied" / f).read_bytes() == (hub / f).read_bytes()


def test_tokenizer_config_from_hf_variants(tmp_path, clip_vocab):
    for pad in ("<|endoftext|>", "!"):
        d = tmp_path / ("eot" if pad != "!" else "bang")
        d.mkdir()
        shutil.copy(clip_vocab / "vocab.json", d)
        shutil.copy(clip_vocab / "merges.txt", d)
        hub_tokenizer_files(d, pad)
        assert tokenizer_config_from_hf(d) == TokenizerConfig("clip_bpe", 77, pad)
    # AddedToken dict pad, an absurd model_max_length (transformers' 1e30 "no limit"), special_tokens_map wins
    cfg = json.loads((tmp_path / "eot" / "tokenizer_config.json").read_text())
    cfg.update(pad_token=_added("!"), model_max_length=int(1e30))
    (tmp_path / "eot" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_config_from_hf(tmp_path / "eot") == TokenizerConfig("clip_bpe", 77, "<|endoftext|>")
    (tmp_path / "eot" / "special_tokens_map.json").unlink()
    assert tokenizer_config_from_hf(tmp_path / "eot") == TokenizerConfig("clip_bpe", 77, "!")
    # no config files at all: defaults
    bare = tmp_path / "bare"
    shutil.copytree(clip_vocab, bare)
    assert tokenizer_config_from_hf(bare) == TokenizerConfig()


def _train_sp(d, **ids):
    rng = random.Random(0)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(500)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=200,
                                   minloglevel=2, **ids)
    d.mkdir()
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))


def test_sentencepiece(tmp_path):
    sp = _train_sp(tmp_path / "sp", unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    texts = ["the cat", "", "Hello, wörld!", " ".join(["theaner"] * 100)]
    assert tokenizer_config_from_hf(tmp_path / "sp") == TokenizerConfig("sentencepiece", 77, "<pad>")
    for pad, pad_id in (("<pad>", 3), ("<unk>", 0), ("<|endoftext|>", 3)):  # not a piece -> sp.pad_id()
        tok = load_tokenizer(tmp_path / "sp", TokenizerConfig("sentencepiece", 16, pad))
        want = np.full((len(texts), 16), pad_id, dtype=np.int64)
        for i, t in enumerate(texts):
            row = [1, *sp.encode(t)[:14], 2]
            want[i, : len(row)] = row
        got = tok(texts)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
        assert got[3, 15] == 2 and got[1, :3].tolist() == [1, 2, pad_id]
    nopad = _train_sp(tmp_path / "nopad", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    assert nopad.pad_id() == -1
    assert load_tokenizer(tmp_path / "nopad", TokenizerConfig("sentencepiece", 8, "<pad>"))("")[0, 2] == 0
    write_tokenizer_files(tmp_path / "sp", tmp_path / "out", TokenizerConfig("sentencepiece"))
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (tmp_path / "sp" / "tokenizer.model").read_bytes()
    _train_sp(tmp_path / "nobos", unk_id=0, bos_id=-1, eos_id=1)
    with pytest.raises(Dalle2Error, match="BOS/EOS") as e:
        load_tokenizer(tmp_path / "nobos", TokenizerConfig("sentencepiece"))
    assert "\n" not in str(e.value)


def _one_line_error(fn, *args, match):
    with pytest.raises(Dalle2Error, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value) and str(e.value).strip()


def test_errors_are_one_line(tmp_path, clip_vocab):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(load_tokenizer, empty, TokenizerConfig(), match="vocab.json")
    _one_line_error(load_tokenizer, empty, TokenizerConfig("sentencepiece"), match="tokenizer.model")
    _one_line_error(write_tokenizer_files, empty, tmp_path / "o1", TokenizerConfig(), match="vocab.json")
    _one_line_error(write_tokenizer_files, empty, tmp_path / "o2", TokenizerConfig("sentencepiece"),
                    match="tokenizer.model")
    _one_line_error(tokenizer_config_from_hf, empty, match="no tokenizer files")
    bad = tmp_path / "bad"
    shutil.copytree(clip_vocab, bad)
    _one_line_error(load_tokenizer, bad, TokenizerConfig(pad_token="<pad>"), match="pad token")
    (bad / "tokenizer_config.json").write_text("{not json\n")
    _one_line_error(tokenizer_config_from_hf, bad, match="cannot read .*tokenizer_config.json.*download it again")
    (bad / "vocab.json").write_text("{\n")
    _one_line_error(load_tokenizer, bad, TokenizerConfig(), match="cannot read .*vocab.json.*re-download or re-convert")
    (bad / "vocab.json").unlink()
    (bad / "tokenizer.json").write_text("[]")
    _one_line_error(load_tokenizer, bad, TokenizerConfig(), match="not a BPE tokenizer.json")
    _one_line_error(load_tokenizer, clip_vocab, TokenizerConfig(max_length=1), match="max_length")


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_truncations_spell_what_transformers_keeps(hub_dirs, pad):
    """A text over the window: the part kept is transformers' decode of its truncated ids; a text that fits: None."""
    d = hub_dirs[pad][0]
    ours = load_tokenizer(d, TokenizerConfig(pad_token=pad, max_length=12))
    ref = CLIPTokenizer.from_pretrained(d)
    texts = [LONG, "a photo of a cat", "naïve résumé " * 8, "日本語のテキスト" * 5]
    got = ours.truncations(texts)
    assert got[1] is None
    for text, cut in zip(texts, got):
        if cut is None:
            continue
        ids = ref(text, max_length=12, truncation=True)["input_ids"]
        assert cut == ref.decode(ids, skip_special_tokens=True).strip(), text


def test_sentencepiece_truncations(tmp_path):
    sp = _train_sp(tmp_path / "sp", unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    tok = load_tokenizer(tmp_path / "sp", TokenizerConfig("sentencepiece", 8, "<pad>"))
    long = " ".join(["theaner"] * 20)
    assert tok.truncations(["the cat", long]) == [None, sp.decode(sp.encode(long)[:6])]


@pytest.fixture(scope="module")
def both_tokenizers(hub_dirs):
    """pad -> (ours, transformers'), each built once for the generated texts below."""
    return {pad: (load_tokenizer(d[0], tokenizer_config_from_hf(d[0])), CLIPTokenizer.from_pretrained(d[0]))
            for pad, d in hub_dirs.items()}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
       | st.lists(st.sampled_from(["a", "red", "circle", "!", "<|endoftext|>", "'s", " ", "\t", "é", "🙂", "ﬁ",
                                   "\u0301", "\u200b", "İ", "ß", "12", "..."]), max_size=30).map("".join),
       pad=st.sampled_from(["<|endoftext|>", "!"]))
def test_any_text_tokenises_as_transformers_does(both_tokenizers, text, pad):
    """Any prompt at all (hypothesis: any Unicode text, and runs of the tricky pieces) gets transformers' ids,
    attention mask and truncation."""
    ours, ref = both_tokenizers[pad]
    enc = ref([text], padding="max_length", max_length=77, truncation=True)
    ids, mask = ours.encode_with_mask([text])
    assert ids[0].tolist() == enc["input_ids"][0], text
    assert mask[0].tolist() == enc["attention_mask"][0], text
