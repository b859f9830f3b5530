"""Tokenization and windowing of samples (shared by the Beam pipeline and the plain loop).

A sample longer than ``max_length`` tokens becomes windows of ``max_length`` tokens that
start every ``stride`` tokens (the last window ends at the sample's end). Window ``w > 0``
overlaps the previous one by ``context_len = previous_end - start`` tokens: those first
positions give the model left context and repeat earlier targets, so trainers skip them.

Each window carries UTF-8 byte offsets of its tokens into the window's ``text``, which is
the part of the sample the window covers (character-aligned; the whole sample for a
single-window sample), so another tokenizer can be aligned to the teacher's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kdstore.textio import DeadLetter, Record

OVERFLOW = ("window", "truncate", "error")


@dataclass
class Window:
    """One model input.

    input_ids:  ``[T]`` int32 teacher token ids.
    byte_start / byte_end: ``[T]`` uint32 UTF-8 byte offsets into ``text`` (None when
        text is not stored).
    key:        64-bit integer ``int(sample_id, 16) ^ window`` that seeds sample-mode draws.
    siblings:   how many windows of the sample this run computes; the writer stores them
        together once all have arrived, or dead-letters all if one failed.
    """

    sample_id: str
    window: int
    token_start: int
    context_len: int
    input_ids: np.ndarray
    source: str
    text: str | None = None
    byte_start: np.ndarray | None = None
    byte_end: np.ndarray | None = None
    label: int | None = None
    siblings: int = 1  # windows of this sample sent to the teacher in this run (all stored, or none)

    @property
    def key(self) -> int:
        return int(self.sample_id, 16) ^ self.window

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class WindowSpec:
    """max_length: tokens per window; stride: start-to-start distance (<= max_length);
    overflow: what to do with samples longer than max_length (window / truncate / error);
    store_text / offsets: keep the window's text / its tokens' byte offsets."""

    max_length: int = 512
    stride: int | None = None
    overflow: str = "window"
    store_text: bool = True
    offsets: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2, got {self.max_length}")
        if self.stride is not None and not 1 <= self.stride <= self.max_length:
            raise ValueError(f"--stride must be in [1, max_length={self.max_length}], got {self.stride}")
        if self.overflow not in OVERFLOW:
            raise ValueError(f"--overflow must be one of {OVERFLOW}, got {self.overflow!r}")

    @property
    def step(self) -> int:
        return self.stride or self.max_length


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(config) -> tuple[int | None, str | None]:
    """``(positions, config key)`` the teacher can attend over, or ``(None, None)`` if its
    config does not say (text config for composite models)."""
    for c in (config, config.get_text_config() if hasattr(config, "get_text_config") else None):
        for key in CONTEXT_KEYS:
            v = getattr(c, key, None) if c is not None else None
            if isinstance(v, int) and v > 0:
                return v, key
    return None, None


def window_starts(n_tokens: int, max_length: int, step: int) -> list[int]:
    """Start offsets of windows ``[s, min(s + max_length, n_tokens))`` covering all tokens:
    every ``step`` tokens until a window reaches the end (the last one may be shorter)."""
    starts = [0]
    while starts[-1] + max_length < n_tokens:
        starts.append(starts[-1] + step)
    return starts


def utf8_char_offsets(text: str) -> np.ndarray:
    """``[len(text) + 1]`` int64: UTF-8 byte offset of each character boundary."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
    out = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(width, out=out[1:])
    return out


def byte_spans(text: str, char_spans: np.ndarray, ids: np.ndarray, byte_len: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 byte ``(start [T], end [T])`` of each token from character offsets ``[T, 2]``.

    Byte-level BPE (and byte-fallback) tokens can split a character: such tokens report
    overlapping character spans (``"…：" -> [0, 2), [1, 2)``). Tokens whose span overlaps a
    neighbour's are placed one after another using their byte lengths (``byte_len[id]``),
    each starting where the previous one ended inside the shared character, so the spans
    tile the text exactly; other tokens keep their character span.
    """
    cb = utf8_char_offsets(text)
    cs = np.clip(char_spans[:, 0], 0, len(text))
    ce = np.clip(char_spans[:, 1], 0, len(text))
    start = cb[cs].copy()
    end = cb[ce].copy()
    n = len(ids)
    if byte_len is None or n < 2:
        return start.astype(np.uint32), end.astype(np.uint32)
    nonempty = ce > cs
    overlap = np.zeros(n, dtype=bool)
    ov = (cs[1:] < ce[:-1]) & nonempty[1:] & nonempty[:-1]
    overlap[1:] |= ov
    overlap[:-1] |= ov
    if overlap.any():
        lens = byte_len[np.clip(ids, 0, len(byte_len) - 1)]
        for i in np.flatnonzero(overlap):
            s0, e0 = int(start[i]), int(end[i])
            prev_end = int(end[i - 1]) if i > 0 else 0
            s = prev_end if s0 <= prev_end < e0 else s0
            e = s + int(lens[i])
            start[i], end[i] = s, e if 0 < lens[i] and e <= e0 else e0
    return start.astype(np.uint32), end.astype(np.uint32)


def make_windows(
    record: Record,
    ids: Sequence[int],
    char_spans: np.ndarray | None,
    spec: WindowSpec,
    *,
    byte_len: np.ndarray | None = None,
) -> list[Window] | DeadLetter:
    """Windows of one tokenized record, or a dead letter (no tokens / over-long)."""
    ids = np.asarray(ids, dtype=np.int32)
    n = len(ids)
    if n == 0:
        return DeadLetter(reason="tokenizer produced no tokens", source=record.source, sample_id=record.sample_id, stage="tokenize")
    L = spec.max_length
    if n > L and spec.overflow == "error":
        return DeadLetter(
            reason=f"over-long: {n} tokens > --max-length {L} (use --overflow window or truncate)",
            source=record.source, sample_id=record.sample_id, stage="tokenize",
        )
    starts = [0] if spec.overflow == "truncate" else window_starts(n, L, spec.step)
    bs = be = None
    if spec.store_text and spec.offsets and char_spans is not None:
        bs, be = byte_spans(record.text, np.asarray(char_spans, dtype=np.int64).reshape(-1, 2), ids, byte_len)
    raw = record.text.encode("utf-8") if spec.store_text and len(starts) > 1 else None
    out = []
    prev_end = 0
    for w, s in enumerate(starts):
        e = min(s + L, n)
        text = lo = None
        if spec.store_text:
            if len(starts) == 1:
                text, lo = record.text, 0
            elif bs is not None:
                lo, hi = _char_aligned(raw, bs, be, s, e, first=w == 0, last=e == n)
                text = raw[lo:hi].decode("utf-8")
        out.append(Window(
            sample_id=record.sample_id, window=w, token_start=s, context_len=max(0, prev_end - s),
            input_ids=ids[s:e].copy(), source=record.source, text=text,
            byte_start=None if bs is None else _rebase(bs[s:e], lo), byte_end=None if be is None else _rebase(be[s:e], lo),
            label=record.label, siblings=len(starts),
        ))
        prev_end = e
    return out


def _rebase(a: np.ndarray, lo: int) -> np.ndarray:
    return (a.astype(np.int64) - lo).clip(0).astype(np.uint32)


def _char_aligned(raw: bytes, bs: np.ndarray, be: np.ndarray, s: int, e: int, *, first: bool, last: bool) -> tuple[int, int]:
    """Byte range of the window's text: from the first token's start (0 for the first
    window) to the last token's end (the end for the last window), widened to whole
    UTF-8 characters."""
    lo = 0 if first else int(bs[s])
    hi = len(raw) if last else int(max(be[s:e].max(), lo))
    while lo > 0 and (raw[lo] & 0xC0) == 0x80:  # continuation byte: move to the char start
        lo -= 1
    while hi < len(raw) and (raw[hi] & 0xC0) == 0x80:
        hi += 1
    return lo, hi


def backend_tokenizer(hf_tokenizer):
    """The ``tokenizers.Tokenizer`` a fast HF tokenizer delegates to (special-token templates
    included), without truncation or padding. Workers rebuild it from its JSON
    (:func:`tokenizer_from_json`), which avoids importing transformers there."""
    return tokenizer_from_json(hf_tokenizer.backend_tokenizer.to_str())


def tokenizer_from_json(data: str):
    from tokenizers import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.from_str(data)
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenize_batch(tokenizer, texts: list[str], *, offsets: bool) -> tuple[list[list[int]], list[np.ndarray | None]]:
    """Token ids (with the tokenizer's special tokens) and character spans ``[T, 2]``.

    ``tokenizer``: a ``tokenizers.Tokenizer`` (see :func:`backend_tokenizer`); encoding
    with it equals calling the HF tokenizer with ``add_special_tokens=True``.
    """
    encs = tokenizer.encode_batch(texts, add_special_tokens=True)
    ids = [e.ids for e in encs]
    spans = [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in encs] if offsets else [None] * len(texts)
    return ids, spans
