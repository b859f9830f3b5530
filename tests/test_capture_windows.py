"""Tokenization and windowing of the capture (no Beam, no model)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.corpora import peoples_daily
from kdstore.textio import DeadLetter, Record
from trainer.data.tokenizers import train_tokenizer
from kdstore.hashing import sample_id
from pipelines.teachers import byte_len_of_id, load_tokenizer, vocabulary
from pipelines.windows import (
    WindowSpec, backend_tokenizer, byte_spans, make_windows, tokenize_batch, utf8_char_offsets, window_starts,
)


@given(n=st.integers(1, 2000), L=st.integers(2, 300), data=st.data())
@settings(max_examples=300, deadline=None)
def test_window_starts_cover_every_token_with_bounded_windows(n, L, data):
    step = data.draw(st.integers(1, L))
    starts = window_starts(n, L, step)
    ends = [min(s + L, n) for s in starts]
    assert starts[0] == 0 and ends[-1] == n
    assert all(b - a == step for a, b in zip(starts, starts[1:]))  # regular stride
    assert all(e > s for s, e in zip(starts, ends))
    assert all(ends[i] < n for i in range(len(ends) - 1))  # stop once a window reaches the end
    covered = np.zeros(n, dtype=int)
    for s, e in zip(starts, ends):
        covered[s:e] += 1
    assert covered.min() >= 1


def test_utf8_char_offsets():
    assert utf8_char_offsets("aé中😀").tolist() == [0, 1, 3, 6, 10]


@pytest.fixture(scope="module")
def texts():
    return [s.text for s in peoples_daily("train")[:300]]


@pytest.fixture(scope="module", params=["bpe", "wordpiece", "unigram"])
def tokenizer(request, tmp_path_factory, texts):
    size = {"bpe": 700, "wordpiece": 1500, "unigram": 2500}[request.param]  # unigram keeps every character
    d = train_tokenizer(kind=request.param, texts=texts, vocab_size=size, out_dir=tmp_path_factory.mktemp(request.param))
    return request.param, load_tokenizer(str(d))


def test_backend_tokenizer_equals_hf_tokenizer(tokenizer, texts):
    """Workers encode with the backend JSON (no transformers import): same ids, same offsets."""
    _, hf = tokenizer
    sample = texts[:50] + ["Hello  world", " 前导空格", "ｆｕｌｌ width １２"]
    enc = hf(sample, add_special_tokens=True, return_offsets_mapping=True)
    ids, spans = tokenize_batch(backend_tokenizer(hf), sample, offsets=True)
    assert ids == enc["input_ids"]
    assert [s.tolist() for s in spans] == [[list(o) for o in x] for x in enc["offset_mapping"]]


def test_byte_spans_frame_token_bytes(tokenizer, texts):
    """Every non-special token's byte span holds exactly its bytes where the convention keeps
    text bytes (byte-level BPE always; WordPiece drops ##; Unigram may prepend ▁)."""
    kind, hf = tokenizer
    vocab = vocabulary(hf)
    tb, sp, blen = vocab.column("bytes").to_pylist(), vocab.column("special").to_pylist(), byte_len_of_id(vocab)
    ids, spans = tokenize_batch(backend_tokenizer(hf), texts[:100], offsets=True)
    exact = 0
    for text, i, s in zip(texts[:100], ids, spans):
        bs, be = byte_spans(text, s, np.asarray(i), blen)
        raw = text.encode("utf-8")
        assert (be >= bs).all() and be.max() <= len(raw)
        for t, a, b in zip(i, bs, be):
            if sp[t]:
                continue
            if kind == "bpe":
                assert raw[a:b] == tb[t]
            exact += raw[a:b] == tb[t]
    assert exact > 0


def _record(text: str) -> Record:
    return Record(text=text, sample_id=sample_id(text), source="f.txt:1")


def test_make_windows_overflow_modes_and_context(texts):
    hf = load_tokenizer(str(train_tokenizer(kind="bpe", texts=texts, vocab_size=500, out_dir=_tmp())))
    text = max(texts, key=len)
    (ids,), (spans,) = tokenize_batch(backend_tokenizer(hf), [text], offsets=True)
    n = len(ids)
    assert n > 40
    w = make_windows(_record(text), ids, spans, WindowSpec(max_length=16, stride=10))
    assert [x.token_start for x in w] == window_starts(n, 16, 10)
    assert [x.context_len for x in w] == [0] + [6] * (len(w) - 1)
    assert np.concatenate([x.input_ids[x.context_len:] for x in w]).tolist() == ids  # targets tile the sample
    assert all(x.key == int(x.sample_id, 16) ^ x.window for x in w)
    t = make_windows(_record(text), ids, spans, WindowSpec(max_length=16, overflow="truncate"))
    assert len(t) == 1 and t[0].input_ids.tolist() == ids[:16] and t[0].text == text
    e = make_windows(_record(text), ids, spans, WindowSpec(max_length=16, overflow="error"))
    assert isinstance(e, DeadLetter) and e.reason.startswith(f"over-long: {n} tokens") and e.stage == "tokenize"
    none = make_windows(_record(text), [], np.zeros((0, 2)), WindowSpec())
    assert isinstance(none, DeadLetter) and none.reason == "tokenizer produced no tokens"
    with pytest.raises(ValueError, match="stride"):
        WindowSpec(max_length=8, stride=9)


def _tmp():
    import tempfile

    return tempfile.mkdtemp(prefix="kd-win-")
