"""Documents of 8k+ tokens: windows with stride tile the document, byte offsets stay exact."""

from __future__ import annotations

import numpy as np
import pytest

from kdstore.hashing import sample_id
from kdstore.textio import Record
from pipelines.teachers import byte_len_of_id, load_tokenizer, vocabulary
from pipelines.windows import WindowSpec, backend_tokenizer, make_windows, tokenize_batch
from trainer.data.corpora import peoples_daily
from trainer.data.tokenizers import train_tokenizer


@pytest.fixture(scope="module")
def long_doc(tmp_path_factory):
    lines = [s.text for s in peoples_daily("train")[:2000]]
    hf = load_tokenizer(str(train_tokenizer(kind="bpe", texts=lines[:500], vocab_size=800,
                                            out_dir=tmp_path_factory.mktemp("bpe"))))
    doc = "\n".join(lines[500:1100])  # one People's Daily issue's worth of articles as one sample
    return hf, doc


@pytest.mark.parametrize("max_length, stride", [(512, 384), (2048, 1536), (1000, 1000)])
def test_long_document_windows_tile_it_with_exact_byte_offsets(long_doc, max_length, stride):
    hf, doc = long_doc
    tok = backend_tokenizer(hf)
    (ids,), (spans,) = tokenize_batch(tok, [doc], offsets=True)
    n = len(ids)
    assert n >= 8192
    vocab = vocabulary(hf)
    tb = vocab.column("bytes").to_pylist()
    special = vocab.column("special").to_pylist()
    rec = Record(text=doc, sample_id=sample_id(doc), source="doc.txt:1")
    wins = make_windows(rec, ids, spans, WindowSpec(max_length=max_length, stride=stride), byte_len=byte_len_of_id(vocab))
    assert len(wins) == -(-max(0, n - max_length) // stride) + 1
    # Targets (positions past each window's context) tile the document exactly once.
    assert np.concatenate([w.input_ids[w.context_len:] for w in wins]).tolist() == ids
    raw = doc.encode("utf-8")
    for w in wins:
        assert len(w.input_ids) <= max_length
        text = w.text.encode("utf-8")
        assert text in raw  # a contiguous, character-aligned part of the document
        for t, a, b in zip(w.input_ids.tolist(), w.byte_start.tolist(), w.byte_end.tolist()):
            if not special[t]:
                assert text[a:b] == tb[t]  # byte-level BPE: every token's span holds its bytes
    # The windows' texts, placed at their first token, reconstruct the whole document.
    pos, out = 0, bytearray()
    for w in wins:
        start = raw.index(w.text.encode("utf-8"), max(0, pos - len(w.text.encode("utf-8"))))
        out[start:] = w.text.encode("utf-8")
        pos = start + len(w.text.encode("utf-8"))
    assert bytes(out) == raw
