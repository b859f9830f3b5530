"""Reading stores: :func:`open` returns a :class:`Store`.

A ``Store`` knows its manifest, shard list and vocabulary; it iterates column-projected
record batches and decodes them (dequantization, hash -> id lookup) into
:class:`DecodedRows`, flat numpy arrays that batch into padded torch tensors.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from kdstore import format as F
from kdstore import hashtable, native
from kdstore.errors import CorruptShardError, IncompleteStoreError, StoreFormatError
from kdstore.fs import Location, resolve
from kdstore.hashing import CHECKSUM, file_checksum
from kdstore.encode import decode_index_order
from kdstore.quant import quantizer
from kdstore.refdecode import decode_numpy
from kdstore.rows import DecodedRows, RawRows, _col, _list_parts  # noqa: F401  (DecodedRows, RawRows, _list_parts re-exported)

TARGET_COLUMNS = ("sample_id", "window", "token_start", "context_len", "tokens", "counts", "indices", "probs", "tail")
IGNORE_LABEL = -100  # label of rows stored without one (the torch ignore_index)


class Store:
    """An opened store. Use :func:`kdstore.open`."""

    def __init__(self, location: Location, manifest: F.Manifest) -> None:
        self.location = location
        self.manifest = manifest
        q = manifest.quantization
        self._probs_q = None if q.probs == "count" else quantizer(q.probs, q.bits)
        self._tail_q = quantizer(q.tail_scheme, q.bits)

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
        path = self._inside(F.check_relative_path(rel, source=f"{self.uri}/{F.MANIFEST}"))
        try:
            table = pq.read_table(path, filesystem=self.location.fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CorruptShardError(f"{self.uri}/{rel}: cannot read the vocabulary table ({exc}); re-run the capture") from exc
        if table.schema.remove_metadata() != F.VOCAB_SCHEMA.remove_metadata():
            raise StoreFormatError(f"{self.uri}/{rel}: vocabulary schema {table.schema} does not match format v{F.FORMAT_VERSION}")
        return table

    @cached_property
    def index_order(self) -> np.ndarray | None:
        """``[V]`` int64 teacher id of each stored rank (``rank_delta`` stores), else None.

        Checked against the manifest's checksum and for being a permutation of ``[0, V)``
        when first read: every decoded index goes through it.
        """
        entry = self.manifest.index_order
        if entry is None:
            return None
        rel = entry["file"]
        where = f"{self.uri}/{rel}"
        try:
            with self.location.fs.open_input_stream(self._inside(F.check_relative_path(rel, source=f"{self.uri}/{F.MANIFEST}"))) as f:
                data = f.read()
        except OSError as exc:
            raise CorruptShardError(f"{where}: cannot read the index order ({exc}); the store is incomplete, re-run the capture") from exc
        return decode_index_order(data, entry, self.manifest.teacher.vocab_size, where=where)

    @cached_property
    def _hash_lookup(self) -> tuple[np.ndarray, int]:
        """The vocabulary's (hash, id) lookup table (:func:`kdstore.hashtable.build`)."""
        return hashtable.build(self.vocab.column("hash").to_numpy(), self.vocab.column("id").to_numpy())

    def token_ids(self, hashes: np.ndarray, *, where: str = "") -> np.ndarray:
        """Reverse lookup: token hashes ``[N]`` uint64 -> teacher ids ``[N]`` int64."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if len(hashes) == 0:
            return np.zeros(0, dtype=np.int64)
        if self.vocab.num_rows == 0:
            raise StoreFormatError(f"{self.uri}{where}: the vocabulary table is empty; the store cannot map token hashes to ids")
        if native.AVAILABLE:
            out, missing, first = native.token_ids(hashes, *self._hash_lookup)
        else:
            out = hashtable.lookup(*self._hash_lookup, hashes)
            bad = np.flatnonzero(out < 0)
            missing, first = len(bad), int(bad[0]) if len(bad) else -1
        if missing:
            raise StoreFormatError(
                f"{self.uri}{where}: {missing} token hash(es) not in the vocabulary table "
                f"(first: {int(hashes[first]):#x}); the store's vocab.parquet does not belong to its shards"
            )
        return out

    # -- reading -----------------------------------------------------------------------
    def shard_path(self, shard: F.ShardInfo) -> str:
        return self._inside(F.check_relative_path(shard.file, source=f"{self.uri}/{F.MANIFEST}"))

    def _inside(self, rel: str) -> str:
        """Path of ``rel``; on local disk, refuse a symlink that leads out of the store (a
        store's files are its own: a link could make readers and ``verify`` read, and a
        resumed capture delete or quarantine, files elsewhere)."""
        path = self.location.join(rel)
        if self.location.is_local:
            root = os.path.realpath(self.location.root)
            target = os.path.realpath(path)
            if os.path.commonpath([root, target]) != root:
                raise StoreFormatError(
                    f"{self.uri}/{rel}: is a symlink to {target}, outside the store; copy the file into the store "
                    f"instead of linking it"
                )
        return path

    def open_shard(self, i: int) -> pq.ParquetFile:
        """Open shard ``i`` (footer read, schema checked; pages verified against their CRCs)."""
        shard = self.shards[i]
        path = self.shard_path(shard)
        with self._shard_errors(shard):
            pf = pq.ParquetFile(path, filesystem=self.location.fs, page_checksum_verification=True)
        self._check_schema(pf.schema_arrow, shard.file)
        return pf

    def open_verified(self, i: int) -> pq.ParquetFile:
        """Shard ``i`` read whole into memory and checked against the manifest: its size and
        its ``xxh3_128`` checksum (every byte, footer and page headers included, and the file
        bound to this manifest: a stronger check than page CRCs, which it replaces). Costs
        the shard's size in memory while it is read, and less time than the page-CRC read
        (``bench/reader_bench.py`` times both)."""
        shard = self.shards[i]
        path = self.shard_path(shard)
        with self._shard_errors(shard):
            with self.location.fs.open_input_file(path) as f:
                data = f.read_buffer()
        if data.size != shard.bytes:
            raise CorruptShardError(
                f"{self.uri}/{shard.file}: {data.size} bytes but the manifest says {shard.bytes} (truncated or replaced); "
                f"run 'kd store verify {self.uri}' and re-run the capture with --resume"
            )
        got = file_checksum(memoryview(data))
        if got != shard.checksum:
            raise CorruptShardError(
                f"{self.uri}/{shard.file}: checksum mismatch (manifest {shard.checksum}, file {got}); the shard is corrupt "
                f"(bit flip, partial write or replaced file) — run 'kd store verify {self.uri}' and re-run the capture with --resume"
            )
        with self._shard_errors(shard):
            pf = pq.ParquetFile(pa.BufferReader(data))
        self._check_schema(pf.schema_arrow, shard.file)
        return pf

    def _can_verify_whole(self, shard: F.ShardInfo) -> bool:
        """Whether the manifest holds a whole-file checksum :meth:`open_verified` can check."""
        return shard.checksum.startswith(f"{CHECKSUM}:") and shard.bytes > 0

    @contextmanager
    def _shard_errors(self, shard: F.ShardInfo):
        """Errors opening a shard, named and explained."""
        try:
            yield
        except FileNotFoundError as exc:
            raise CorruptShardError(f"{self.uri}/{shard.file}: shard listed in the manifest is missing; restore it or re-run the capture") from exc
        except (OSError, pa.ArrowInvalid) as exc:
            raise CorruptShardError(
                f"{self.uri}/{shard.file}: cannot read shard ({exc}); it is truncated or corrupt — "
                f"run 'kd store verify {self.uri}' and re-run the capture with --resume"
            ) from exc

    def read_shard(self, i: int, *, columns: Sequence[str] | None = None) -> pa.Table:
        """Read shard ``i`` (column-projected), the whole file checked against the manifest
        (:meth:`open_verified`; page CRCs where the manifest has no whole-file checksum);
        errors name the file and the fix."""
        shard = self.shards[i]
        pf = self.open_verified(i) if self._can_verify_whole(shard) else self.open_shard(i)
        table = self._decode_pages(shard, lambda: pf.read(columns=self._existing(columns)))
        if table.num_rows != shard.rows:
            raise CorruptShardError(f"{self.uri}/{shard.file}: {table.num_rows} rows but the manifest says {shard.rows}; the shard does not belong to this manifest")
        return table

    def _decode_pages(self, shard: F.ShardInfo, read) -> pa.Table:
        """``read()`` (a Parquet read of ``shard``), its decode errors named and explained."""
        try:
            return read()
        except (OSError, pa.ArrowInvalid) as exc:
            raise CorruptShardError(
                f"{self.uri}/{shard.file}: cannot decode shard ({exc}); it is corrupt — "
                f"run 'kd store verify {self.uri}' and re-run the capture with --resume"
            ) from exc

    def read_row_groups(self, i: int, rows: np.ndarray, *, columns: Sequence[str] | None = None) -> tuple[pa.Table, np.ndarray]:
        """Read only the row groups of shard ``i`` that hold the shard-local ``rows``.

        Returns ``(table, row_map)``: the table of those row groups (in file order) and
        ``row_map [shard rows]`` int64, the table row of each shard row (-1 where its row
        group was not read). Decoding is multi-threaded in pyarrow (per column chunk).
        Integrity: a read of every row group checks the whole file against the manifest's
        checksum (:meth:`open_verified`); a read of some row groups checks their page CRCs.
        """
        shard = self.shards[i]
        rows = np.asarray(rows, dtype=np.int64)
        whole = self._can_verify_whole(shard)
        # Every row of the shard: all its row groups, so read and verify the file at once.
        every = whole and len(rows) >= shard.rows and len(np.unique(rows)) == shard.rows
        pf = self.open_verified(i) if every else self.open_shard(i)
        md = pf.metadata
        sizes = np.array([md.row_group(g).num_rows for g in range(md.num_row_groups)], dtype=np.int64)
        starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        if starts[-1] != shard.rows:
            raise CorruptShardError(f"{self.uri}/{shard.file}: {int(starts[-1])} rows but the manifest says {shard.rows}; the shard does not belong to this manifest")
        if len(rows) and (rows.min() < 0 or rows.max() >= shard.rows):
            raise IndexError(f"{self.uri}/{shard.file}: row {int(rows.max())} outside the shard's {shard.rows} rows")
        groups = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        if not every and whole and len(groups) == len(sizes):  # rows spread over every row group
            pf = self.open_verified(i)
        table = self._decode_pages(shard, lambda: pf.read_row_groups(groups.tolist(), columns=self._existing(columns), use_threads=True))
        row_map = np.full(shard.rows, -1, dtype=np.int64)
        at = 0
        for g in groups.tolist():
            row_map[starts[g]:starts[g + 1]] = np.arange(at, at + sizes[g])
            at += int(sizes[g])
        return table, row_map

    def iter_batches(self, *, columns: Sequence[str] | None = None, shards: Sequence[int] | None = None, batch_rows: int = 1024) -> Iterator[pa.RecordBatch]:
        """Stream record batches shard by shard (bounded memory)."""
        cols = self._existing(columns)
        for i in range(len(self.shards)) if shards is None else shards:
            shard = self.shards[i]
            pf = self.open_shard(i)
            it = pf.iter_batches(batch_size=batch_rows, columns=cols)
            while True:
                try:
                    b = next(it)
                except StopIteration:
                    break
                except (OSError, pa.ArrowInvalid) as exc:
                    raise CorruptShardError(
                        f"{self.uri}/{shard.file}: cannot decode shard ({exc}); run 'kd store verify {self.uri}'"
                    ) from exc
                yield b

    def iter_decoded(self, *, batch_rows: int = 1024, with_inputs: bool = True, shards: Sequence[int] | None = None) -> Iterator[DecodedRows]:
        """Decoded rows in store order (see :meth:`decode`)."""
        cols = [c for c in TARGET_COLUMNS + ("label",) if with_inputs or c != "tokens"]
        for i in range(len(self.shards)) if shards is None else shards:
            for b in self.iter_batches(columns=cols, shards=[i], batch_rows=batch_rows):
                yield self.decode(b, with_inputs=with_inputs, source=f"/{self.shards[i].file}")

    def _existing(self, columns: Sequence[str] | None) -> list[str] | None:
        if columns is None:
            return None
        names = set(self.schema.names)
        return [c for c in columns if c in names]

    def _check_schema(self, schema: pa.Schema, file: str) -> None:
        """The file's Arrow schema must be the manifest's (names, types, coding metadata)."""
        expected = self.schema
        for f in schema:
            if f.name not in expected.names:
                raise StoreFormatError(f"{self.uri}/{file}: unexpected column {f.name!r} for this manifest (format v{F.FORMAT_VERSION}); the shard does not belong to this store")
            want = expected.field(f.name).type
            if f.type != want:
                raise StoreFormatError(
                    f"{self.uri}/{file}: column {f.name!r} has type {f.type}, expected {want} "
                    f"(the shard does not match the manifest; re-create the store)"
                )
        missing = [n for n in expected.names if n not in schema.names]
        if missing:
            raise StoreFormatError(f"{self.uri}/{file}: missing column(s) {missing}; the shard does not match the manifest, re-create the store")
        meta = schema.metadata or {}
        for key, value in (expected.metadata or {}).items():
            if key in meta and meta[key] != value:
                raise StoreFormatError(
                    f"{self.uri}/{file}: shard metadata {key.decode()}={meta[key].decode()!r} but the manifest implies "
                    f"{value.decode()!r}; the shard belongs to another store"
                )

    # -- decoding ----------------------------------------------------------------------
    def decode(self, batch: pa.RecordBatch | pa.Table, *, with_inputs: bool = True, source: str = "") -> DecodedRows:
        """Dequantize a batch of rows (see :class:`DecodedRows`).

        Entries of a position come in storage order: ascending teacher index (``sorted_delta``)
        or ascending rank, most frequent id first (``rank_delta``); never probability order.
        Probabilities are dequantized and, per position, ``probs`` and ``tail`` are scaled
        jointly to sum to 1 (the code's error otherwise leaves the sum slightly off). In
        ``sample`` mode ``probs = counts / samples`` exactly and the returned ``tail`` is 0:
        the frequencies are the (unbiased) target. Structural inconsistencies (list lengths
        that disagree, duplicate or out-of-range indices) raise :class:`StoreFormatError`
        naming ``source``.
        """
        return self.decode_raw(self.raw(batch, with_inputs=with_inputs, source=source), source=source)

    def raw(self, batch: pa.RecordBatch | pa.Table, *, with_inputs: bool = True, source: str = "") -> "RawRows":
        """Undecoded rows of a batch as flat numpy arrays (zero-copy where Arrow allows),
        after checking that the list columns agree on positions and entries per row."""
        m = self.manifest
        sel = m.selection
        where = f"{self.uri}{source}"
        pos_off, tail_codes = _list_parts(batch, "tail")
        n_pos = len(tail_codes)
        e_off, gaps = _list_parts(batch, "indices")
        pe_off, pcodes = _list_parts(batch, "probs")
        counts = None
        if sel.variable:
            c_off, counts = _list_parts(batch, "counts")
            if not np.array_equal(c_off, pos_off):
                raise StoreFormatError(f"{where}: 'counts' and 'tail' disagree on positions per row; the shard is corrupt")
            entry_offsets = np.zeros(n_pos + 1, dtype=np.int64)
            np.cumsum(counts, out=entry_offsets[1:])
            row_e = entry_offsets[pos_off]
        else:
            row_e = pos_off * min(sel.k, m.teacher.vocab_size)
        if not np.array_equal(row_e, e_off) or not np.array_equal(pe_off, e_off):
            raise StoreFormatError(
                f"{where}: kept entries per row do not match the per-position counts ({int(row_e[-1])} expected, "
                f"{len(gaps)} indices, {len(pcodes)} probs); the shard is corrupt"
            )
        tokens = None
        names = batch.schema.names
        if with_inputs and m.level == "token" and "tokens" in names:
            t_off, tokens = _list_parts(batch, "tokens")
            if not np.array_equal(t_off, pos_off):
                raise StoreFormatError(f"{where}: 'tokens' and 'tail' disagree on positions per row; the shard is corrupt")
        label = None
        if "label" in names:
            label = np.array(pa.compute.fill_null(batch.column("label"), IGNORE_LABEL).to_numpy(zero_copy_only=False), dtype=np.int64)
        return RawRows(
            sample_id=np.array(batch.column("sample_id").to_pylist(), dtype=object),
            window=_col(batch, "window"), token_start=_col(batch, "token_start"), context_len=_col(batch, "context_len"),
            pos_off=pos_off, counts=counts, gaps=gaps, pcodes=pcodes, tail_codes=tail_codes, tokens=tokens, label=label,
        )

    def decode_raw(self, raw: "RawRows", *, source: str = "") -> DecodedRows:
        """Decode :class:`RawRows` (see :meth:`decode`)."""
        m = self.manifest
        sel = m.selection
        where = f"{self.uri}{source}"
        n_pos = len(raw.tail_codes)
        if raw.counts is None:
            fixed_k = min(sel.k, m.teacher.vocab_size)
            counts = np.full(n_pos, fixed_k, dtype=np.int64)
        else:
            fixed_k = 0
            counts = raw.counts.astype(np.int64)
        entry_offsets = np.zeros(n_pos + 1, dtype=np.int64)
        np.cumsum(counts, out=entry_offsets[1:])
        gaps = raw.gaps
        if entry_offsets[-1] != len(gaps):
            raise StoreFormatError(f"{where}: counts sum to {int(entry_offsets[-1])} but there are {len(gaps)} entries; the shard is corrupt")
        if native.AVAILABLE:
            idx = np.empty(len(gaps), dtype=np.int64)
            probs = np.empty(len(gaps), dtype=np.float32)
            tail = np.empty(n_pos, dtype=np.float32)
            starts = raw.pos_off[:-1]
            self.decode_rows_into(raw, row_pos=starts, row_len=np.diff(raw.pos_off), row_out=starts,
                                  row_ent=entry_offsets[starts], k_out=0, out_idx=idx, out_probs=probs, out_tail=tail, where=where)
        else:
            idx, probs, tail = decode_numpy(raw, counts, entry_offsets, fixed_k, where=where, vocab_size=m.teacher.vocab_size,
                                            samples=sel.samples if sel.mode == "sample" else 0, probs_q=self._probs_q,
                                            tail_q=self._tail_q, index_order=self.index_order)
        if raw.tokens is None:
            input_ids = np.zeros(0, dtype=np.int64)
        elif raw.tokens_are_ids:
            input_ids = raw.tokens.astype(np.int64)
        else:
            input_ids = self.token_ids(raw.tokens, where=source)
        return DecodedRows(
            sample_id=list(raw.sample_id), window=raw.window, token_start=raw.token_start, context_len=raw.context_len,
            positions=raw.pos_off, input_ids=input_ids, counts=counts, entry_offsets=entry_offsets,
            indices=idx, probs=probs, tail=tail, label=raw.label,
        )

    def decode_rows_into(self, raw: "RawRows", *, tokens: np.ndarray | None = None, where: str, row_pos: np.ndarray,
                         row_len: np.ndarray, row_out: np.ndarray, row_ctx: np.ndarray | None = None,
                         row_ent: np.ndarray | None = None, row_pad: np.ndarray | None = None, k_out: int, **outputs) -> None:
        """Decode rows of ``raw`` into any output layout with the native kernel: the rows and
        outputs are those of :func:`kdstore.native.decode_rows` (``row_pos``, ``row_len``,
        ``row_out``, ``k_out``, ``out_idx``, ...); the source arrays, tables and index order
        come from ``raw`` and this store. Requires :data:`kdstore.native.AVAILABLE`."""
        self.row_decoder(raw, k_out=k_out, **outputs)([(raw, tokens, len(row_pos))], row_pos, row_len, row_out, row_ctx, row_ent,
                                                      row_pad, where)

    def row_decoder(self, raw: "RawRows", *, k_out: int, **outputs):
        """:meth:`decode_rows_into` with the outputs bound once, for rows of several shards of
        this store in one kernel call (its shards share one schema, so ``raw``'s code width is
        theirs): ``decode(sources, row_pos, row_len, row_out, row_ctx, row_ent, row_pad,
        where)``, positional, with ``sources`` a sequence of ``(raw, tokens, n_rows)``: source
        i's rows are the next ``n_rows`` of the row arrays; ``where`` a string or one per
        source (the dataset decodes every shard of a batch into its outputs at once;
        :func:`kdstore.native.bound_decoder` says why)."""
        decode = native.bound_decoder(**self._kernel_tables(raw), k_out=k_out, **outputs)

        def decode_raw(sources, row_pos, row_len, row_out, row_ctx, row_ent, row_pad, where) -> None:
            decode([(src.gaps, src.pcodes, src.tail_codes, src.counts, src.entry_starts(), tokens, n) for src, tokens, n in sources],
                   row_pos, row_len, row_out, row_ctx, row_ent, row_pad, where)

        return decode_raw

    def _kernel_tables(self, raw: "RawRows") -> dict[str, Any]:
        """The store's fixed arguments of :func:`kdstore.native.decode_rows` for ``raw``'s code
        width (built once: the kernel is called once per batch)."""
        key = (raw.pcodes.dtype, raw.counts is None)
        cache = self.__dict__.setdefault("_kernel_args", {})
        if key not in cache:
            m = self.manifest
            cache[key] = {"fixed_k": min(m.selection.k, m.teacher.vocab_size) if raw.counts is None else 0,
                          "ptable": self._decode_table(raw.pcodes.dtype),
                          "ttable": None if m.selection.mode == "sample" else self._tail_q.table(),
                          # uint32 (the format's id width), not int64: the kernel looks up every
                          # kept entry's id in it, and at V = 151,936 half the bytes is 5 % less
                          # reader CPU (the table is 0.6 instead of 1.2 MB, next to 1 MB of L2)
                          "order": None if self.index_order is None else self.index_order.astype(np.uint32),
                          "vocab_size": m.teacher.vocab_size}
        return cache[key]

    def _decode_table(self, dtype: np.dtype) -> np.ndarray:
        """float32 code -> probability table for the probability codes (sample mode: code / samples)."""
        if self._probs_q is not None:
            return self._probs_q.table()
        tables = self.__dict__.setdefault("_count_tables", {})
        if dtype not in tables:  # the numpy path's formula, so both give the same float32
            tables[dtype] = np.arange(1 << (8 * np.dtype(dtype).itemsize), dtype=np.float32) / np.float32(self.manifest.selection.samples)
        return tables[dtype]


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

