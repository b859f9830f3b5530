"""Rows as flat numpy arrays, undecoded (:class:`RawRows`) and decoded (:class:`DecodedRows`),
and the Arrow list helpers the reader uses. Re-exported by :mod:`kdstore.store`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa


@dataclass
class DecodedRows:
    """Decoded soft labels of R rows with P positions and E kept entries in total.

    sample_id: R ids; window/token_start/context_len: ``[R]`` int64.
    positions: ``[R+1]`` int64 offsets of each row's positions into the P axis.
    input_ids: ``[P]`` int64 teacher token ids (token level; empty otherwise).
    counts:    ``[P]`` int64 kept entries per position; ``entry_offsets`` ``[P+1]``.
    indices:   ``[E]`` int64 teacher indices, unique within each position, in storage order
               (ascending id for ``sorted_delta``, ascending rank for ``rank_delta``).
    probs:     ``[E]`` float32, with ``tail`` ``[P]`` float32 summing to 1 per position.
    label:     ``[R]`` int64 (-100 where the row has none) or None without a label column.
    """

    sample_id: list[str]
    window: np.ndarray
    token_start: np.ndarray
    context_len: np.ndarray
    positions: np.ndarray
    input_ids: np.ndarray
    counts: np.ndarray
    entry_offsets: np.ndarray
    indices: np.ndarray
    probs: np.ndarray
    tail: np.ndarray
    label: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.sample_id)

    def to_torch(self) -> dict:
        """The arrays as torch tensors (zero-copy): ``input_ids`` ``[P]``, ``positions``
        ``[R+1]``, ``counts`` ``[P]``, ``entry_offsets`` ``[P+1]``, ``indices`` ``[E]`` long,
        ``probs`` ``[E]`` float32, ``tail`` ``[P]`` float32, ``window``/``token_start``/
        ``context_len`` (``label``) ``[R]``; plus ``sample_id`` (list). For padded ``[B, T, K]``
        batches use :class:`kdstore.SoftLabelDataset`."""
        import torch  # noqa: PLC0415

        out = {"sample_id": self.sample_id}
        for name in ("input_ids", "positions", "counts", "entry_offsets", "indices", "probs", "tail", "window",
                     "token_start", "context_len", "label"):
            v = getattr(self, name)
            if v is not None:
                out[name] = torch.from_numpy(np.ascontiguousarray(v))
        return out


@dataclass
class RawRows:
    """Undecoded rows (R rows, P positions, E entries) as flat numpy arrays.

    pos_off ``[R+1]``; counts ``[P]`` (None for top-k); gaps, pcodes ``[E]`` stored codes;
    tail_codes ``[P]``; tokens ``[P]`` hashes (or teacher ids when ``tokens_are_ids``) or
    None; sample_id object ``[R]``; window/token_start/context_len/label ``[R]``.
    """

    sample_id: np.ndarray
    window: np.ndarray
    token_start: np.ndarray
    context_len: np.ndarray
    pos_off: np.ndarray
    counts: np.ndarray | None
    gaps: np.ndarray
    pcodes: np.ndarray
    tail_codes: np.ndarray
    tokens: np.ndarray | None = None
    label: np.ndarray | None = None
    tokens_are_ids: bool = False
    # Set by a partial read (``Store.read_row_groups``): shard row -> row here, -1 if not read.
    row_map: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return len(self.sample_id)

    def take(self, rows: np.ndarray, *, fixed_k: int = 0) -> "RawRows":
        """Rows ``rows`` (in that order) gathered into new arrays. ``fixed_k``: entries per
        position when ``counts`` is None (top-k)."""
        return RawRows.gather([(self, rows)], fixed_k=fixed_k)

    def _row_entries(self, fixed_k: int) -> np.ndarray:
        """``[R+1]`` offsets of each row's entries (cached)."""
        if self.counts is None:
            return self.pos_off * fixed_k
        cached = self.__dict__.get("_row_e")
        if cached is None:
            cached = self.__dict__["_row_e"] = self._entry_offsets()[self.pos_off]
        return cached

    def _entry_offsets(self) -> np.ndarray:
        """``[P+1]`` int64 entry offsets of the positions (variable k; cached)."""
        cached = self.__dict__.get("_e_off")
        if cached is None:
            cached = np.zeros(len(self.counts) + 1, dtype=np.int64)
            np.cumsum(self.counts, out=cached[1:])
            self.__dict__["_e_off"] = cached
        return cached

    def entry_starts(self) -> np.ndarray | None:
        """``[P]`` int64 first entry of each position (cached); None for top-k."""
        return None if self.counts is None else self._entry_offsets()[:-1]

    def row_plan(self) -> np.ndarray:
        """``[4, R]`` int64 per row (cached): its first position, its positions, its overlap
        context and its window. A batch gathers its rows' plans with one gather per shard
        (``plan.take(rows, axis=1)``: C-contiguous, so each line is a kernel argument as it is)."""
        cached = self.__dict__.get("_row_plan")
        if cached is None:
            cached = self.__dict__["_row_plan"] = np.stack(
                [self.pos_off[:-1], np.diff(self.pos_off), self.context_len, self.window]).astype(np.int64, copy=False)
        return cached

    def row_max_counts(self) -> np.ndarray | None:
        """``[R]`` int64 most kept entries at one position of each row (0 for an empty row;
        cached); None for top-k."""
        if self.counts is None:
            return None
        cached = self.__dict__.get("_row_kmax")
        if cached is None:
            lengths = np.diff(self.pos_off)
            cached = np.zeros(len(lengths), dtype=np.int64)
            nz = lengths > 0
            if nz.any():  # non-empty rows' ranges tile the positions, so reduceat sees each row alone
                cached[nz] = np.maximum.reduceat(self.counts, self.pos_off[:-1][nz])
            self.__dict__["_row_kmax"] = cached
        return cached

    @staticmethod
    def gather(parts: Sequence[tuple["RawRows", np.ndarray]], *, fixed_k: int = 0) -> "RawRows":
        """Rows of several sources, concatenated in order: ``[(raw, rows), ...]``.

        Rows are contiguous ranges of positions and entries, so a row is copied as a slice
        (one ``np.concatenate`` per column) instead of element-wise fancy indexing.
        """
        pos_sl, ent_sl = [], []
        for raw, rows in parts:
            rows = np.asarray(rows, dtype=np.int64)
            re = raw._row_entries(fixed_k)
            pos_sl.append((raw, raw.pos_off[rows].tolist(), raw.pos_off[rows + 1].tolist()))
            ent_sl.append((raw, re[rows].tolist(), re[rows + 1].tolist()))

        def cat(spans, name):
            first = getattr(parts[0][0], name)
            if first is None:
                return None
            pieces = [getattr(raw, name)[a:b] for raw, starts, ends in spans for a, b in zip(starts, ends)]
            return np.concatenate(pieces) if pieces else first[:0]

        rowcat = lambda name: None if getattr(parts[0][0], name) is None else np.concatenate(  # noqa: E731
            [getattr(raw, name)[np.asarray(rows, dtype=np.int64)] for raw, rows in parts])
        lengths = np.concatenate([np.asarray(e) - np.asarray(s) for _, s, e in pos_sl]) if pos_sl else np.zeros(0, np.int64)
        pos_off = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=pos_off[1:])
        return RawRows(
            sample_id=rowcat("sample_id"), window=rowcat("window"), token_start=rowcat("token_start"),
            context_len=rowcat("context_len"), pos_off=pos_off, counts=cat(pos_sl, "counts"), gaps=cat(ent_sl, "gaps"),
            pcodes=cat(ent_sl, "pcodes"), tail_codes=cat(pos_sl, "tail_codes"), tokens=cat(pos_sl, "tokens"),
            label=rowcat("label"), tokens_are_ids=parts[0][0].tokens_are_ids,
        )

    @staticmethod
    def concat(parts: Sequence["RawRows"]) -> "RawRows":
        if len(parts) == 1:
            return parts[0]
        cat = lambda name: None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        lengths = np.concatenate([np.diff(p.pos_off) for p in parts])
        pos_off = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=pos_off[1:])
        return RawRows(
            sample_id=cat("sample_id"), window=cat("window"), token_start=cat("token_start"), context_len=cat("context_len"),
            pos_off=pos_off, counts=cat("counts"), gaps=cat("gaps"), pcodes=cat("pcodes"), tail_codes=cat("tail_codes"),
            tokens=cat("tokens"), label=cat("label"), tokens_are_ids=parts[0].tokens_are_ids,
        )


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, e)`` for each pair, vectorised (int64)."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    out = np.ones(total, dtype=np.int64)
    first = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=first[1:])
    nz = lengths > 0
    out[first[:-1][nz]] = starts[nz] - np.concatenate([[0], ends[nz][:-1] - 1])
    out[0] = starts[nz][0]
    return np.cumsum(out)


def _col(batch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy(zero_copy_only=False).astype(np.int64)


def _list_parts(batch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [R+1] relative to the first value, flat values) of a list column."""
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        # combine_chunks copies even a single chunk (~0.3 ns per kept entry over the shard's
        # list columns): only several chunks need joining.
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    start, end = int(offsets[0]), int(offsets[-1])
    return (offsets - start).astype(np.int64), values[start:end]
