"""Encoding rows for a store: :class:`SoftLabelRow`, :func:`new_manifest`, :class:`RowEncoder`.

All quantization and index coding of the format happen here (``docs/format.md``); the
capture pipeline reuses :class:`RowEncoder` on its workers. Re-exported by
:mod:`kdstore.writer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa

from kdstore import format as F
from kdstore._version import __version__
from kdstore.errors import CorruptShardError, StoreFormatError
from kdstore.hashing import CHECKSUM, SAMPLE_ID_HASH, TOKEN_HASH, file_checksum
from kdstore.quant import LOG_RANGE, SCHEMES, delta_encode, quantizer, sort_entries


@dataclass
class SoftLabelRow:
    """One stored row: a window of a sample (token level) or a whole sample (sequence level).

    tokens:  ``[T]`` uint64 token hashes (empty allowed at sequence level).
    counts:  ``[P]`` kept entries per position (P = T at token level, 1 at sequence level).
    indices: ``[E]`` teacher ids, E = sum(counts), grouped by position (any order within a
             position: the encoder sorts them by index; ids unique within a position).
    probs:   ``[E]`` float probabilities (``sample`` mode: frequencies counts/samples).
    tail:    ``[P]`` float mass outside the kept entries.
    byte_start / byte_end: ``[T]`` UTF-8 byte offsets of each token in ``text``.
    """

    sample_id: str
    tokens: np.ndarray
    counts: np.ndarray
    indices: np.ndarray
    probs: np.ndarray
    tail: np.ndarray
    window: int = 0
    token_start: int = 0
    context_len: int = 0
    text: str | None = None
    byte_start: np.ndarray | None = None
    byte_end: np.ndarray | None = None
    label: int | None = None


def new_manifest(
    *,
    teacher: F.TeacherInfo,
    selection: F.Selection,
    bits: int = 8,
    level: str = "token",
    columns: dict[str, bool] | None = None,
    pipeline: dict[str, Any] | None = None,
    scheme: str = "sqrt",
    index_order: dict[str, Any] | None = None,
) -> F.Manifest:
    """A manifest with everything but shards/totals filled in (validated).

    ``scheme``: probability code, ``sqrt`` (default, best bytes for a forward-KL loss) or
    ``log`` (bounded relative error, for reverse-KL/JSD losses); ``sample`` mode always
    stores exact counts. See :mod:`kdstore.quant`. ``index_order``: the manifest entry of
    an ``index_order.parquet`` (:func:`encode_index_order`) for the ``rank_delta`` index
    coding; None stores ids as they are (``sorted_delta``).
    """
    if scheme not in SCHEMES:
        raise StoreFormatError(f"unknown probability code {scheme!r}; expected one of {SCHEMES}")
    probs = "count" if selection.mode == "sample" else scheme
    tail = "sqrt" if probs == "count" else scheme
    m = F.Manifest(
        teacher=teacher,
        selection=selection,
        quantization=F.Quantization(
            probs=probs, bits=bits, tail=tail, log_range=LOG_RANGE.get(bits) if tail == "log" else None,
        ),
        level=level,
        columns={"text": False, "offsets": False, "label": False, **(columns or {})},
        index_dtype=str(np.dtype(F.index_dtype(teacher.vocab_size))),
        index_coding=F.RANK_CODING if index_order is not None else F.INDEX_CODING,
        index_order=index_order,
        hashes={"tokens": TOKEN_HASH, "sample_id": SAMPLE_ID_HASH, "checksum": CHECKSUM},
        created_by=f"kdstore {__version__}",
        pipeline=dict(pipeline or {}),
    )
    m.validate(source="new manifest")
    return m


def frequency_order(counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """``[vocab_size]`` uint32 ids by descending ``counts`` (ties and unseen ids by id).

    ``counts``: ``[n]`` occurrences per teacher id (``n <= vocab_size``; ids past ``n``,
    e.g. the padded rows of an output embedding, count 0). Row ``r`` of the result is the
    id stored as rank ``r`` by the ``rank_delta`` coding.
    """
    c = np.zeros(vocab_size, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or len(counts) > vocab_size or (counts < 0).any():
        raise StoreFormatError(f"index order: counts must be a 1-D array of >= 0 values of length <= vocab size {vocab_size}, got shape {counts.shape}")
    c[: len(counts)] = counts
    return np.argsort(-c, kind="stable").astype(np.uint32)


def encode_index_order(order: np.ndarray, *, source: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """``index_order.parquet`` bytes and its manifest entry, for ``order[rank] = id``.

    ``order`` must be a permutation of ``[0, V)`` (V = the teacher's padded vocabulary).
    ``source``: how the order was made (recorded in the entry, e.g. the counted tokens).
    """
    import pyarrow.parquet as pq  # noqa: PLC0415

    order = np.asarray(order)
    if order.ndim != 1 or not len(order) or not _is_permutation(order, len(order)):
        raise StoreFormatError(f"index order: expected a permutation of [0, {len(order)}), got another array")
    table = pa.Table.from_arrays([pa.array(order.astype(np.uint32), pa.uint32())], schema=F.INDEX_ORDER_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", use_dictionary=False, column_encoding={"id": "DELTA_BINARY_PACKED"})
    data = buf.getvalue().to_pybytes()
    return data, {"file": F.INDEX_ORDER, "rows": int(len(order)), "bytes": len(data), "checksum": file_checksum(data),
                  "source": dict(source or {})}


def _is_permutation(order: np.ndarray, n: int) -> bool:
    """Whether ``order`` holds each of ``0 .. n-1`` exactly once."""
    return len(order) == n and np.array_equal(np.sort(order), np.arange(n))


def decode_index_order(data: bytes, entry: dict[str, Any], vocab_size: int, *, where: str,
                       mismatch: str = "the file is corrupt and every index would decode wrong: restore it or re-create the store",
                       error: type[Exception] = CorruptShardError) -> np.ndarray:
    """Inverse of :func:`encode_index_order`: ``[vocab_size]`` int64 id of each rank (read-only).

    Checks the bytes against ``entry["checksum"]`` (``mismatch``: what the message says to
    do) and that the table is a permutation of ``[0, vocab_size)``; raises ``error`` naming
    ``where``.
    """
    import pyarrow.parquet as pq  # noqa: PLC0415

    if entry.get("checksum") and file_checksum(data) != entry["checksum"]:
        raise error(f"{where}: checksum mismatch (manifest {entry['checksum']}, file {file_checksum(data)}); {mismatch}")
    try:
        order = pq.read_table(pa.BufferReader(data)).column("id").to_numpy().astype(np.int64)
    except (OSError, KeyError, pa.ArrowInvalid) as exc:
        raise error(f"{where}: not an index order table ({exc}); re-create the store") from exc
    if not _is_permutation(order, vocab_size):
        raise error(f"{where}: not a permutation of the {vocab_size} teacher ids; re-create the store")
    order.setflags(write=False)
    return order


class RowEncoder:
    """Encode rows for one manifest's schema; all quantization and index coding happen here.

    Entries of each position are sorted by ascending stored index and the indices stored as
    gaps (see :mod:`kdstore.quant`); the input order of a row's entries does not matter.
    The stored index is the teacher id (``sorted_delta``) or its rank in ``index_order``
    (``rank_delta``: pass the ``[V]`` id-of-rank array the manifest's entry describes).
    """

    def __init__(self, manifest: F.Manifest, *, index_order: np.ndarray | None = None) -> None:
        self.manifest = manifest
        self._rank: np.ndarray | None = None
        self._order = None if index_order is None else np.asarray(index_order, dtype=np.int64)
        if manifest.index_coding == F.RANK_CODING:
            if index_order is None or len(index_order) != manifest.teacher.vocab_size:
                raise StoreFormatError(f"a rank_delta store needs its index order ({manifest.teacher.vocab_size} ids) to encode rows")
            if not _is_permutation(self._order, len(self._order)):
                raise StoreFormatError("the index order is not a permutation of the teacher ids; re-create it (encode_index_order)")
            self._rank = np.empty(len(self._order), dtype=np.int64)
            self._rank[self._order] = np.arange(len(self._order))
        elif index_order is not None:
            raise StoreFormatError("an index order was given for a sorted_delta manifest; make the manifest with index_order=")
        self.schema = F.arrow_schema(manifest)
        q = manifest.quantization
        self._probs_q = None if q.probs == "count" else quantizer(q.probs, q.bits)
        self._tail_q = quantizer(q.tail_scheme, q.bits)
        self._idx_dtype = manifest.index_np_dtype
        self._prob_dtype = F.probs_dtype(manifest.quantization, manifest.selection)
        self._sel = manifest.selection

    def encode(self, rows: Sequence[SoftLabelRow]) -> pa.Table:
        """Rows -> Arrow table with ``self.schema``; raises StoreFormatError naming the sample."""
        m, sel = self.manifest, self._sel
        if not rows:
            return self.schema.empty_table()
        for r in rows:
            self.check_row(r)
        tokens = [np.asarray(r.tokens, dtype=np.uint64) for r in rows]
        counts_l = [np.asarray(r.counts, dtype=np.int64) for r in rows]
        counts = np.concatenate(counts_l)
        idx = np.concatenate([np.asarray(r.indices, dtype=np.int64) for r in rows])
        if self._rank is not None:
            idx = self._rank[idx]  # ids were range-checked by check_row
        probs = np.concatenate([np.asarray(r.probs, dtype=np.float64) for r in rows])
        tail = np.concatenate([np.asarray(r.tail, dtype=np.float64) for r in rows])
        p_off = _offsets(len(c) for c in counts_l)
        pos_e_off = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=pos_e_off[1:])
        order = sort_entries(idx, counts)
        idx, probs = idx[order], probs[order]
        gaps = delta_encode(idx, pos_e_off)
        is_start = np.zeros(len(idx), dtype=bool)
        is_start[pos_e_off[:-1][counts > 0]] = True
        dup = (gaps == 0) & ~is_start
        if dup.any():
            e = int(np.flatnonzero(dup)[0])
            r = rows[_row_of(p_off, int(np.searchsorted(pos_e_off, e, side="right") - 1))]
            raise StoreFormatError(f"sample {r.sample_id!r} window {r.window}: index {int(idx[e] if self._order is None else self._order[idx[e]])} is kept twice at one position; kept indices must be unique")
        if sel.mode == "sample":
            draws = np.rint(probs * sel.samples)
            if np.abs(draws - probs * sel.samples).max(initial=0.0) > 1e-3 or (draws < 1).any():
                e = int(np.argmax((np.abs(draws - probs * sel.samples) > 1e-3) | (draws < 1)))
                r = rows[_row_of(p_off, int(np.searchsorted(pos_e_off, e, side="right") - 1))]
                raise StoreFormatError(f"sample {r.sample_id!r} window {r.window}: sample-mode probs must be draw frequencies counts/{sel.samples} (>= 1 draw each)")
            per_pos = np.bincount(np.repeat(np.arange(len(counts)), counts), weights=draws, minlength=len(counts))
            bad = np.flatnonzero(per_pos != sel.samples)
            if len(bad):
                r = rows[_row_of(p_off, int(bad[0]))]
                raise StoreFormatError(f"sample {r.sample_id!r} window {r.window}: draws at a position sum to {int(per_pos[bad[0]])}, expected samples={sel.samples}")
            q_probs = draws.astype(self._prob_dtype)
        else:
            q_probs = self._probs_q.encode(probs)
        q_tail = self._tail_q.encode(np.clip(tail, 0.0, 1.0))
        e_off = pos_e_off[p_off].astype(np.int32)
        cols: dict[str, pa.Array] = {
            "sample_id": pa.array([r.sample_id for r in rows], pa.string()),
            "window": pa.array([r.window for r in rows], pa.uint32()),
            "token_start": pa.array([r.token_start for r in rows], pa.uint32()),
            "context_len": pa.array([r.context_len for r in rows], pa.uint32()),
            "tokens": _list(_offsets(len(t) for t in tokens), np.concatenate(tokens)),
        }
        if sel.variable:
            cols["counts"] = _list(p_off, counts.astype(np.uint16))
        cols["indices"] = _list(e_off, gaps.astype(self._idx_dtype))
        cols["probs"] = _list(e_off, q_probs)
        cols["tail"] = _list(p_off, q_tail)
        if m.columns.get("text"):
            cols["text"] = pa.array([r.text for r in rows], pa.string())
        if m.columns.get("offsets"):
            bs = [np.asarray(r.byte_start if r.byte_start is not None else [], np.uint32) for r in rows]
            be = [np.asarray(r.byte_end if r.byte_end is not None else [], np.uint32) for r in rows]
            cols["byte_start"] = _list(_offsets(len(b) for b in bs), np.concatenate(bs))
            cols["byte_end"] = _list(_offsets(len(b) for b in be), np.concatenate(be))
        if m.columns.get("label"):
            cols["label"] = pa.array([r.label for r in rows], pa.int64())
        return pa.Table.from_arrays([cols[f.name] for f in self.schema], schema=self.schema)

    def check_row(self, r: SoftLabelRow) -> None:
        """Raise :class:`StoreFormatError` naming the sample if ``r`` cannot be stored.

        A capture can call this per row to send bad rows to the dead-letter area instead
        of failing a whole batch in :meth:`encode`.
        """
        vocab = self.manifest.teacher.vocab_size
        counts = np.asarray(r.counts)
        n_pos = len(counts)
        where = f"sample {r.sample_id!r} window {r.window}"
        if not isinstance(r.sample_id, str) or not r.sample_id:
            raise StoreFormatError(f"{where}: sample_id must be a non-empty string")
        if len(r.tail) != n_pos:
            raise StoreFormatError(f"{where}: {len(r.tail)} tail values for {n_pos} positions")
        if self.manifest.level == "token" and len(r.tokens) != n_pos:
            raise StoreFormatError(f"{where}: {len(r.tokens)} tokens but {n_pos} positions")
        if self.manifest.level == "sequence" and n_pos != 1:
            raise StoreFormatError(f"{where}: a sequence-level row has exactly 1 position, got {n_pos}")
        if int(counts.sum()) != len(r.indices) or len(r.indices) != len(r.probs):
            raise StoreFormatError(f"{where}: counts sum to {int(counts.sum())} but {len(r.indices)} indices / {len(r.probs)} probs")
        if n_pos and counts.min() < 1:
            raise StoreFormatError(f"{where}: every position must keep at least one entry")
        if n_pos and counts.max() > self._sel.max_kept:
            raise StoreFormatError(f"{where}: {int(counts.max())} kept entries exceed the mode's maximum {self._sel.max_kept}")
        if self._sel.mode == "topk" and n_pos and (counts != min(self._sel.k, vocab)).any():
            raise StoreFormatError(f"{where}: top-k rows keep exactly k={min(self._sel.k, vocab)} entries per position")
        idx = np.asarray(r.indices)
        if len(idx) and (idx.min() < 0 or idx.max() >= vocab):
            raise StoreFormatError(f"{where}: index {int(idx.max() if idx.max() >= vocab else idx.min())} outside the teacher vocabulary [0, {vocab})")
        for name, arr in (("probs", r.probs), ("tail", r.tail)):
            a = np.asarray(arr, dtype=np.float64)
            if len(a) and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1 + 1e-5):
                raise StoreFormatError(f"{where}: {name} must be finite probabilities in [0, 1]")
        if r.context_len > n_pos:
            raise StoreFormatError(f"{where}: context_len {r.context_len} > {n_pos} positions")
        if self.manifest.columns.get("offsets") and self.manifest.level == "token":
            for name, arr in (("byte_start", r.byte_start), ("byte_end", r.byte_end)):
                if arr is not None and len(arr) != len(r.tokens):
                    raise StoreFormatError(f"{where}: {len(arr)} {name} offsets for {len(r.tokens)} tokens")

    # Backwards-compatible private name.
    def _check_row(self, r: SoftLabelRow, vocab: int | None = None) -> None:
        self.check_row(r)


def _row_of(row_pos_offsets: np.ndarray, position: int) -> int:
    return int(np.searchsorted(row_pos_offsets, position, side="right") - 1)


def _offsets(lengths: Iterable[int]) -> np.ndarray:
    lengths = np.fromiter(lengths, dtype=np.int64)
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))
