"""Synthetic-but-valid stores over a real tokenizer's vocabulary (tests and benchmarks).

The capture pipeline is not needed to exercise alignment: rows are real texts tokenized by
a real (teacher) tokenizer, with byte offsets, and top-k distributions that put the most
mass on the true next token and the rest on ids drawn by corpus frequency (a teacher's
top-k is mostly frequent tokens), so mass shares behave like a real store's.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdstore.align.student import char_to_byte, load_student, refine_byte_offsets


def teacher_vocab_table(tokenizer: Any):
    """The store vocabulary table of a tokenizer (strings, the bytes each stands for in
    text, special flags), from :func:`trainer.data.tokenizers.vocab_table`."""
    from kdstore.tokenizer import vocab_table as _table  # noqa: PLC0415
    from kdstore.writer import vocab_table  # noqa: PLC0415

    t = _table(load_student(tokenizer).tokenizer)
    return vocab_table(ids=t["id"].tolist(), tokens=t["token"], token_bytes=t["bytes"], special=t["is_special"].tolist())


def synthetic_store(
    uri: str | Path,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    k: int = 8,
    mode: str = "topk",
    pad_to: int = 64,
    max_tokens: int = 128,
    seed: int = 0,
    offsets: bool = True,
    name: str = "synthetic-teacher",
    row_group_rows: int = 256,
) -> Any:
    """Write a token-level store for ``texts`` tokenized by ``tokenizer`` and open it.

    Each position keeps ``k`` ids (``top_p``: 1..k), the true next token first, the others
    drawn by corpus frequency (90 %) or uniformly over the padded vocabulary (10 %, so
    padding rows occur). Probabilities: a Dirichlet draw over k+1 buckets, sorted, the last
    bucket being the tail.
    """
    import kdstore  # noqa: PLC0415
    from kdstore.hashing import sample_id, token_hashes  # noqa: PLC0415

    st = load_student(tokenizer)
    V_rows = st.vocab_size
    V = ((V_rows + pad_to - 1) // pad_to) * pad_to
    rng = np.random.default_rng(seed)
    encs = st.tokenizer.encode_batch(list(texts), add_special_tokens=False)
    freq = np.ones(V_rows, dtype=np.float64)
    for e in encs:
        np.add.at(freq, e.ids, 1.0)
    p_draw = 0.9 * np.concatenate([freq / freq.sum(), np.zeros(V - V_rows)]) + 0.1 / V
    hash_of = token_hashes(t.encode("utf-8") for t in st.tokens)
    sel = kdstore.Selection(mode="topk", k=k) if mode == "topk" else kdstore.Selection(mode="top_p", p=0.9, max_k=k)
    teacher = kdstore.TeacherInfo(name_or_path=name, vocab_size=V, tokenizer_vocab_size=V_rows)
    rows = []
    for text, e in zip(texts, encs):
        ids = np.asarray(e.ids[:max_tokens], dtype=np.int64)
        T = len(ids)
        if T == 0:
            continue
        off = np.asarray(e.offsets[:max_tokens], dtype=np.int64).reshape(-1, 2)
        c2b = char_to_byte(text)
        b_start, b_end = refine_byte_offsets(ids, c2b[off[:, 0]], c2b[off[:, 1]], st.token_lengths)
        counts = np.full(T, k, dtype=np.int64) if mode == "topk" else rng.integers(1, k + 1, size=T)
        cand = rng.choice(V, size=(T, 3 * k), p=p_draw)
        idx_rows = []
        for t in range(T):
            first = [int(ids[t + 1])] if t + 1 < T else []
            pick = list(dict.fromkeys(first + cand[t].tolist()))
            while len(pick) < counts[t]:
                pick = list(dict.fromkeys(pick + rng.integers(0, V, size=k).tolist()))
            idx_rows.append(pick[: counts[t]])
        kept = -np.sort(-rng.dirichlet(np.full(k + 1, 0.5), size=T)[:, :k], axis=1)
        probs = np.concatenate([kept[t, : counts[t]] for t in range(T)])
        tail = 1.0 - np.array([kept[t, : counts[t]].sum() for t in range(T)])
        rows.append(kdstore.SoftLabelRow(
            sample_id=sample_id(text), tokens=hash_of[ids], counts=counts, indices=np.concatenate(idx_rows),
            probs=probs, tail=np.clip(tail, 0.0, 1.0), text=text if offsets else None,
            byte_start=b_start if offsets else None, byte_end=b_end if offsets else None,
        ))
    with kdstore.StoreWriter(str(uri), teacher=teacher, selection=sel, columns={"text": offsets, "offsets": offsets},
                             row_group_rows=row_group_rows, overwrite=True) as w:
        w.write_vocab(teacher_vocab_table(tokenizer))
        w.write(rows)
    return kdstore.open(str(uri))


@lru_cache(maxsize=2)
def corpus_tokenizers(n_lines: int = 1000, vocab_size: int = 2000) -> dict[str, Any]:
    """The three tokenizer kinds of :mod:`trainer.data.tokenizers` (byte-level BPE,
    WordPiece, Unigram) trained on the first ``n_lines`` People's Daily training lines, as
    ``transformers`` fast tokenizers (``name_or_path`` is the saved directory). Cached per
    process so test modules share them; the directory lives as long as the process. Unigram
    keeps every corpus character plus 256 byte pieces, so its size is at least that."""
    import atexit  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    from transformers import AutoTokenizer  # noqa: PLC0415

    from trainer.data.corpora import peoples_daily  # noqa: PLC0415
    from trainer.data.tokenizers import train_tokenizer  # noqa: PLC0415

    texts = [s.text for s in peoples_daily("train")[:n_lines]]
    n_chars = len(set("".join(texts)))
    root = Path(tempfile.mkdtemp(prefix="kdstore-align-tok-"))
    atexit.register(shutil.rmtree, root, True)
    sizes = {"bpe": vocab_size, "wordpiece": vocab_size, "unigram": max(vocab_size, n_chars + 256 + 4 + 200)}
    return {k: AutoTokenizer.from_pretrained(str(train_tokenizer(kind=k, texts=texts, vocab_size=v, out_dir=root / k)))
            for k, v in sizes.items()}
