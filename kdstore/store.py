"""Reading stores: :func:`open` returns a :class:`Store`.

A ``Store`` knows its manifest, shard list and vocabulary; it iterates column-projected
record batches and decodes them (dequantization, hash -> id lookup) into
:class:`DecodedRows`, flat numpy arrays that batch into padded torch tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore import format as F
from kdstore.errors import CorruptShardError, IncompleteStoreError, StoreFormatError
from kdstore.fs import Location, resolve
from kdstore.quant import LogQuantizer

TARGET_COLUMNS = ("sample_id", "window", "token_start", "context_len", "tokens", "counts", "indices", "probs", "tail")


@dataclass
class DecodedRows:
    """Decoded soft labels of R rows with P positions and E kept entries in total.

    sample_id: R ids; window/token_start/context_len: ``[R]`` int64.
    positions: ``[R+1]`` int64 offsets of each row's positions into the P axis.
    input_ids: ``[P]`` int64 teacher token ids (token level; empty otherwise).
    counts:    ``[P]`` int64 kept entries per position; ``entry_offsets`` ``[P+1]``.
    indices:   ``[E]`` int64 teacher indices; probs ``[E]`` float32; tail ``[P]`` float32.
    label:     ``[R]`` int64 or None.
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


class Store:
    """An opened store. Use :func:`kdstore.open`."""

    def __init__(self, location: Location, manifest: F.Manifest) -> None:
        self.location = location
        self.manifest = manifest
        self._quant = LogQuantizer(manifest.quantization.bits)

    # -- metadata ----------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def shards(self) -> list[F.ShardInfo]:
        return self.manifest.shards

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def schema(self) -> pa.Schema:
        return F.arrow_schema(self.manifest)

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"Store({self.uri!r}, level={m.level}, mode={m.selection.mode}, rows={self.num_rows}, "
            f"tokens={m.totals.get('tokens')}, shards={len(self.shards)})"
        )

    # -- vocabulary --------------------------------------------------------------------
    @cached_property
    def vocab(self) -> pa.Table:
        """The teacher vocabulary table (id, token, bytes, hash, special)."""
        if not self.manifest.vocab:
            raise StoreFormatError(f"{self.uri}: this store has no vocabulary table")
        rel = self.manifest.vocab["file"]
        F.check_relative_path(rel, source=f"{self.uri}/{F.MANIFEST}")
        try:
            table = pq.read_table(self.location.join(rel), filesystem=self.location.fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CorruptShardError(f"{self.uri}/{rel}: cannot read the vocabulary table ({exc}); re-run the capture") from exc
        if table.schema.remove_metadata() != F.VOCAB_SCHEMA.remove_metadata():
            raise StoreFormatError(f"{self.uri}/{rel}: vocabulary schema {table.schema} does not match format v{F.FORMAT_VERSION}")
        return table

    @cached_property
    def _hash_lookup(self) -> tuple[np.ndarray, np.ndarray]:
        h = self.vocab.column("hash").to_numpy()
        ids = self.vocab.column("id").to_numpy().astype(np.int64)
        order = np.argsort(h, kind="stable")
        return h[order], ids[order]

    def token_ids(self, hashes: np.ndarray, *, where: str = "") -> np.ndarray:
        """Reverse lookup: token hashes ``[N]`` uint64 -> teacher ids ``[N]`` int64."""
        hs, ids = self._hash_lookup
        hashes = np.asarray(hashes, dtype=np.uint64)
        pos = np.searchsorted(hs, hashes)
        pos_c = np.minimum(pos, len(hs) - 1)
        bad = hs[pos_c] != hashes
        if bad.any():
            raise StoreFormatError(
                f"{self.uri}{where}: {int(bad.sum())} token hash(es) not in the vocabulary table "
                f"(first: {int(hashes[bad][0]):#x}); the store's vocab.parquet does not belong to its shards"
            )
        return ids[pos_c]

    # -- reading -----------------------------------------------------------------------
    def shard_path(self, shard: F.ShardInfo) -> str:
        return self.location.join(F.check_relative_path(shard.file, source=f"{self.uri}/{F.MANIFEST}"))

    def read_shard(self, i: int, *, columns: Sequence[str] | None = None) -> pa.Table:
        """Read shard ``i`` (column-projected); errors name the file and the fix."""
        shard = self.shards[i]
        path = self.shard_path(shard)
        cols = self._existing(columns)
        try:
            table = pq.read_table(path, columns=cols, filesystem=self.location.fs)
        except FileNotFoundError as exc:
            raise CorruptShardError(f"{self.uri}/{shard.file}: shard listed in the manifest is missing; restore it or re-run the capture") from exc
        except (OSError, pa.ArrowInvalid) as exc:
            raise CorruptShardError(
                f"{self.uri}/{shard.file}: cannot read shard ({exc}); it is truncated or corrupt — "
                f"run 'kd store verify {self.uri}' and re-run the capture with --resume"
            ) from exc
        if table.num_rows != shard.rows:
            raise CorruptShardError(f"{self.uri}/{shard.file}: {table.num_rows} rows but the manifest says {shard.rows}")
        self._check_schema(table, shard.file)
        return table

    def iter_batches(self, *, columns: Sequence[str] | None = None, shards: Sequence[int] | None = None, batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
        """Stream record batches shard by shard (bounded memory)."""
        cols = self._existing(columns)
        for i in range(len(self.shards)) if shards is None else shards:
            shard = self.shards[i]
            try:
                pf = pq.ParquetFile(self.shard_path(shard), filesystem=self.location.fs)
                for b in pf.iter_batches(batch_size=batch_rows, columns=cols):
                    self._check_schema(b, shard.file)
                    yield b
            except (OSError, pa.ArrowInvalid) as exc:
                raise CorruptShardError(
                    f"{self.uri}/{shard.file}: cannot read shard ({exc}); run 'kd store verify {self.uri}'"
                ) from exc

    def iter_decoded(self, *, batch_rows: int = 1024, with_inputs: bool = True) -> Iterator[DecodedRows]:
        for b in self.iter_batches(batch_rows=batch_rows):
            yield self.decode(b, with_inputs=with_inputs)

    def _existing(self, columns: Sequence[str] | None) -> list[str] | None:
        if columns is None:
            return None
        names = set(self.schema.names)
        return [c for c in columns if c in names]

    def _check_schema(self, table, file: str) -> None:
        expected = self.schema
        for f in table.schema:
            if f.name not in expected.names:
                raise StoreFormatError(f"{self.uri}/{file}: unexpected column {f.name!r} for format v{F.FORMAT_VERSION}")
            want = expected.field(f.name).type
            if f.type != want:
                raise StoreFormatError(
                    f"{self.uri}/{file}: column {f.name!r} has type {f.type}, expected {want} "
                    f"(the shard does not match the manifest; re-create the store)"
                )

    # -- decoding ----------------------------------------------------------------------
    def decode(self, batch: pa.RecordBatch | pa.Table, *, with_inputs: bool = True, source: str = "") -> DecodedRows:
        """Dequantize a batch of rows (see :class:`DecodedRows`).

        Probabilities are dequantized and, per position, ``probs`` and ``tail`` are scaled
        jointly to sum to 1 (the code's relative error otherwise leaves the sum off by up
        to ~3 % at 8 bits). In ``sample`` mode ``probs = counts / samples`` exactly and the
        returned ``tail`` is 0: the frequencies are the (unbiased) target.
        """
        m = self.manifest
        sel = m.selection
        tail_col = _list_parts(batch, "tail")
        pos_off, tail_codes = tail_col
        n_pos = len(tail_codes)
        e_off, idx = _list_parts(batch, "indices")
        _, pcodes = _list_parts(batch, "probs")
        if sel.variable:
            _, counts = _list_parts(batch, "counts")
            counts = counts.astype(np.int64)
        else:
            counts = np.full(n_pos, min(sel.k, m.teacher.vocab_size), dtype=np.int64)
        entry_offsets = np.zeros(n_pos + 1, dtype=np.int64)
        np.cumsum(counts, out=entry_offsets[1:])
        if entry_offsets[-1] != len(idx):
            raise StoreFormatError(f"{self.uri}{source}: per-position counts sum to {entry_offsets[-1]} but there are {len(idx)} entries")
        idx = idx.astype(np.int64)
        if len(idx) and int(idx.max()) >= m.teacher.vocab_size:
            raise StoreFormatError(
                f"{self.uri}{source}: index {int(idx.max())} >= teacher vocab size {m.teacher.vocab_size}; the shard is corrupt or from another teacher"
            )
        if sel.mode == "sample":
            probs = pcodes.astype(np.float32) / np.float32(sel.samples)
            tail = np.zeros(n_pos, dtype=np.float32)
        else:
            probs = self._quant.decode(pcodes)
            tail = self._quant.decode(tail_codes)
            total = np.add.reduceat(probs, entry_offsets[:-1]) if len(probs) else np.zeros(n_pos, np.float32)
            total = total + tail
            scale = np.where(total > 0, 1.0 / np.maximum(total, 1e-30), 1.0).astype(np.float32)
            probs = probs * np.repeat(scale, counts)
            tail = tail * scale
        input_ids = np.zeros(0, dtype=np.int64)
        if with_inputs and m.level == "token" and "tokens" in batch.schema.names:
            _, hashes = _list_parts(batch, "tokens")
            input_ids = self.token_ids(hashes, where=source)
        names = batch.schema.names
        label = batch.column("label").to_numpy(zero_copy_only=False) if "label" in names else None
        return DecodedRows(
            sample_id=batch.column("sample_id").to_pylist(),
            window=_col(batch, "window"), token_start=_col(batch, "token_start"), context_len=_col(batch, "context_len"),
            positions=pos_off.astype(np.int64), input_ids=input_ids, counts=counts, entry_offsets=entry_offsets,
            indices=idx, probs=probs.astype(np.float32, copy=False), tail=tail.astype(np.float32, copy=False),
            label=None if label is None else np.asarray(label, dtype=np.int64),
        )


def _col(batch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy(zero_copy_only=False).astype(np.int64)


def _list_parts(batch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [R+1] relative to the first value, flat values) of a list column."""
    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    start, end = int(offsets[0]), int(offsets[-1])
    return (offsets - start).astype(np.int64), values[start:end]


def open(uri: str) -> Store:  # noqa: A001 - mirrors kdstore.open's public name
    """Open a store (local path or URI). Raises :class:`IncompleteStoreError` without a manifest."""
    loc = resolve(uri)
    if not loc.exists(F.MANIFEST):
        if not loc.exists(""):
            raise IncompleteStoreError(f"{uri}: no such store (the directory does not exist)")
        raise IncompleteStoreError(
            f"{uri}: no {F.MANIFEST} — the store is incomplete (the writer did not finish) or not a kdstore "
            f"store; re-run the capture (use --resume to keep finished shards)"
        )
    manifest = F.Manifest.from_json(loc.read_bytes(F.MANIFEST).decode("utf-8", errors="replace"), source=f"{uri}/{F.MANIFEST}")
    return Store(loc, manifest)


def read_dead_letters(store: Store) -> list[dict]:
    """All dead-letter records of a store."""
    out = []
    for rel in store.manifest.errors.get("files", []):
        for line in store.location.read_bytes(rel).decode("utf-8").splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out
