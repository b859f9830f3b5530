"""Writing stores: row encoding, shard files, vocabulary table, dead letters, manifest.

The pieces are usable separately so that a distributed capture (Beam) can encode and write
shards on many workers and finalize the manifest once at the end:

* :class:`RowEncoder` (defined in :mod:`kdstore.encode`, re-exported here) turns :class:`SoftLabelRow` objects into an Arrow table (vectorised
  quantization and list building; validation with messages naming the sample).
* :class:`ShardWriter` writes one Parquet shard (zstd), hashing bytes as they are written.
* :func:`write_vocab`, :func:`write_dead_letters`, :func:`finalize` write the other parts;
  ``finalize`` writes ``manifest.json`` last and atomically.
* :class:`StoreWriter` composes them for single-process use: a context manager that rolls
  shards by size and writes the manifest on a clean exit only.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import time
import uuid
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from kdstore import format as F
from kdstore.encode import RowEncoder, SoftLabelRow, encode_index_order, frequency_order, new_manifest  # noqa: F401  (re-exported)
from kdstore.errors import StoreFormatError
from kdstore.fs import Location, resolve
from kdstore.hashing import CHECKSUM, file_checksum, token_hashes

DEFAULT_SHARD_BYTES = 128 << 20
DEFAULT_ROW_GROUP_ROWS = 1024
# zstd level of shards: 9 is ~1-2 % smaller than 3 on soft labels at a write cost that is
# negligible next to teacher inference; decode speed does not depend on the level.
ZSTD_LEVEL = 9
SHARD_RECORD_DIR = "_shard_records"


class _HashingSink(io.RawIOBase):
    """A write-only file object that forwards to a pyarrow stream while hashing and counting."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._hash = xxhash.xxh3_128()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        mv = memoryview(b)
        self._hash.update(mv)
        self._stream.write(mv)
        self.nbytes += mv.nbytes
        return mv.nbytes

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
        super().close()

    @property
    def checksum(self) -> str:
        return f"{CHECKSUM}:{self._hash.hexdigest()}"


def parquet_options(manifest: F.Manifest, *, compression_level: int = ZSTD_LEVEL) -> dict[str, Any]:
    """Parquet writer settings of format v1 (measured in ``bench/store_bench.py``).

    * ``indices`` (gaps), ``probs``, ``tail``, ``counts``: BYTE_STREAM_SPLIT + zstd. Parquet
      stores every uint8/uint16 as a 4-byte INT32, and plain zstd on interleaved bytes barely
      compresses (2.0 B per uint16 index); split byte streams make the zero high bytes free
      and let zstd entropy-code each byte plane.
    * ``tokens`` (uint64 hashes): dictionary, with a dictionary page large enough for a
      512k-token vocabulary (the 1 MiB default falls back to 8-byte PLAIN above ~131k
      distinct tokens per row group).
    * ``byte_start``/``byte_end`` (increasing per row): DELTA_BINARY_PACKED.
    * Page CRC32 checksums, so a reader detects flipped bits in the page that holds them.
    """
    names = set(F.arrow_schema(manifest).names)
    enc = {f"{c}.list.element": "BYTE_STREAM_SPLIT" for c in ("counts", "indices", "probs", "tail") if c in names}
    enc.update({f"{c}.list.element": "DELTA_BINARY_PACKED" for c in ("byte_start", "byte_end") if c in names})
    return dict(
        compression="zstd",
        compression_level=compression_level,
        use_dictionary=["tokens.list.element"],
        column_encoding=enc,
        dictionary_pagesize_limit=4 << 20,
        write_statistics=["window", "token_start", "context_len"],
        data_page_size=1 << 20,
        write_page_checksum=True,
    )


class ShardWriter:
    """Write one Parquet shard; ``close()`` returns its :class:`~kdstore.format.ShardInfo`.

    Each :meth:`write_table` call becomes one row group (callers batch rows: see
    ``StoreWriter.row_group_rows``); bytes are hashed (xxh3-128) as they are written.
    """

    def __init__(self, *, location: Location, rel_path: str, manifest: F.Manifest, compression_level: int = ZSTD_LEVEL) -> None:
        F.check_relative_path(rel_path)
        self.rel_path = rel_path
        self.manifest = manifest
        self._schema = F.arrow_schema(manifest)
        location.makedirs(rel_path.rpartition("/")[0] or "")
        self._sink = _HashingSink(location.fs.open_output_stream(location.join(rel_path)))
        try:
            self._writer = pq.ParquetWriter(self._sink, self._schema, **parquet_options(manifest, compression_level=compression_level))
        except Exception:
            self._sink.close()
            raise
        self._location = location
        self.rows = self.tokens = self.entries = self.samples = 0
        self.opened = time.monotonic()

    @property
    def bytes_written(self) -> int:
        return self._sink.nbytes

    def write_table(self, table: pa.Table) -> None:
        if table.schema.remove_metadata() != self._schema.remove_metadata():
            raise StoreFormatError(f"{self.rel_path}: table schema does not match the manifest's:\n{table.schema}\nexpected:\n{self._schema}")
        if table.num_rows == 0:
            return
        self._writer.write_table(table, row_group_size=table.num_rows)
        self.rows += table.num_rows
        self.tokens += _list_total(table.column("tail"))
        self.entries += _list_total(table.column("indices"))
        self.samples += int(pc.sum(pc.equal(table.column("window"), 0)).as_py() or 0)

    def close(self) -> F.ShardInfo:
        """Close the file, then write its record (see :func:`write_shard_record`)."""
        self._writer.close()
        self._sink.close()
        info = F.ShardInfo(
            file=self.rel_path, rows=self.rows, tokens=self.tokens, entries=self.entries,
            bytes=self._sink.nbytes, checksum=self._sink.checksum,
        )
        write_shard_record(self._location, info, samples=self.samples)
        return info

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._sink.close()


def _record_path(rel_path: str) -> str:
    return f"{SHARD_RECORD_DIR}/{rel_path.rpartition('/')[2]}.json"


def write_shard_record(location: Location, info: F.ShardInfo, *, samples: int) -> None:
    """Record a closed shard (``_shard_records/<name>.json``: rows, positions, entries,
    bytes, checksum, samples), written after the file is complete. A resumed capture
    trusts a shard only if its bytes match this record (or the manifest's entry)."""
    rec = asdict(info) | {"samples": int(samples)}
    location.makedirs(SHARD_RECORD_DIR)
    location.write_bytes_atomic(_record_path(info.file), json.dumps(rec, sort_keys=True).encode())


def read_shard_record(location: Location, rel_path: str) -> dict[str, Any] | None:
    """The record of a closed shard, or None (never closed, or the record is unreadable)."""
    rel = _record_path(rel_path)
    try:
        if not location.exists(rel):
            return None
        rec = json.loads(location.read_bytes(rel))
        return rec if isinstance(rec, dict) and rec.get("file") == rel_path else None
    except (OSError, ValueError):
        return None


def _list_total(col: pa.ChunkedArray | pa.Array) -> int:
    """Number of values in a list column (respects slices, unlike ``.values``)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    total = 0
    for c in chunks:
        if len(c):
            total += c.offsets[len(c)].as_py() - c.offsets[0].as_py()
    return total


def shard_name(prefix: str = "part") -> str:
    """A collision-free shard file name (workers write concurrently without coordination)."""
    return f"{F.SHARD_DIR}/{prefix}-{uuid.uuid4().hex[:16]}.parquet"


def vocab_table(*, ids: Sequence[int], tokens: Sequence[str], token_bytes: Sequence[bytes], special: Sequence[bool]) -> pa.Table:
    """Build the vocabulary table; ``hash`` is xxh3-64 of the token string's UTF-8.

    The hash is over the vocabulary *string* ("Ġthe", "##a", "▁the"), not the decoded bytes,
    because decoded bytes are not unique (WordPiece "a" and "##a" both stand for b"a") and
    the reader must invert hashes to ids. ``bytes`` holds what each token stands for in text.
    """
    hashes = token_hashes(t.encode("utf-8") for t in tokens)
    if len(np.unique(hashes)) != len(hashes):
        raise StoreFormatError("vocabulary has duplicate token strings (or a 64-bit hash collision); token strings must be unique")
    return pa.Table.from_arrays(
        [
            pa.array(ids, pa.uint32()), pa.array(list(tokens), pa.string()), pa.array(list(token_bytes), pa.binary()),
            pa.array(hashes, pa.uint64()), pa.array(list(special), pa.bool_()),
        ],
        schema=F.VOCAB_SCHEMA,
    )


def write_vocab(location: Location, table: pa.Table) -> dict[str, Any]:
    """Write ``vocab.parquet``; returns the manifest's ``vocab`` entry."""
    if table.schema.remove_metadata() != F.VOCAB_SCHEMA.remove_metadata():
        raise StoreFormatError(f"vocabulary table schema {table.schema} != {F.VOCAB_SCHEMA}")
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue().to_pybytes()
    location.write_bytes_atomic(F.VOCAB, data)
    return {"file": F.VOCAB, "rows": table.num_rows, "bytes": len(data), "checksum": file_checksum(data)}


def write_dead_letters(location: Location, records: Sequence[dict[str, Any]], *, name: str | None = None) -> str | None:
    """Write dead-letter records (each with at least ``reason``) as JSONL under ``errors/``.

    Returns the relative file name, or None when there is nothing to write.
    """
    if not records:
        return None
    rel = f"{F.ERROR_DIR}/{name or 'errors-' + uuid.uuid4().hex[:16]}.jsonl"
    location.makedirs(F.ERROR_DIR)
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")
    location.write_bytes_atomic(rel, data)
    return rel


def finalize(
    location: Location,
    manifest: F.Manifest,
    *,
    shards: Sequence[F.ShardInfo],
    vocab: dict[str, Any] | None,
    error_files: Sequence[str] = (),
    dead_letters: int = 0,
    extra_totals: dict[str, int] | None = None,
) -> F.Manifest:
    """Fill shards/totals into ``manifest`` and write ``manifest.json`` last, atomically."""
    shards = sorted(shards, key=lambda s: s.file)
    manifest.shards = list(shards)
    manifest.vocab = vocab
    manifest.errors = {"files": sorted(error_files), "count": int(dead_letters)}
    manifest.totals = {
        "rows": sum(s.rows for s in shards),
        "tokens": sum(s.tokens for s in shards),
        "entries": sum(s.entries for s in shards),
        "bytes": sum(s.bytes for s in shards),
        "dead_letters": int(dead_letters),
        **(extra_totals or {}),
    }
    manifest.created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    manifest.validate(source=location.uri)
    location.write_bytes_atomic(F.MANIFEST, manifest.to_json().encode("utf-8"))
    # The manifest now holds every listed shard's record; the working records go.
    for rel in location.list(SHARD_RECORD_DIR):
        location.fs.delete_file(location.join(rel))
    if location.exists(SHARD_RECORD_DIR):
        location.fs.delete_dir(location.join(SHARD_RECORD_DIR))
    return manifest


@dataclass
class StoreWriter:
    """Single-process store writer (a context manager).

    >>> with StoreWriter("out/store", teacher=..., selection=Selection(mode="topk", k=32)) as w:
    ...     w.write_vocab(vocab_table(...))
    ...     w.write(rows)
    ...     w.dead_letter(sample_id="ab12...", source="corpus.txt:17", reason="empty line")

    Rows are buffered and written in row groups of ``row_group_rows``; shards roll over at
    ``shard_bytes``. The manifest is written by ``close()`` (on a clean ``with`` exit) and
    last: a crash leaves a store without manifest, which readers reject as incomplete.
    ``overwrite=True`` replaces an existing (or incomplete) store: its manifest is deleted
    first, so readers never see the old manifest next to new shards.
    ``index_order``: ``[V]`` teacher id of each rank (frequent ids first, e.g.
    :func:`kdstore.encode.frequency_order`) for the ``rank_delta`` index coding, which makes
    kept ids of a large vocabulary cheaper (``docs/format.md``); ``index_order_source``
    says how it was made (recorded in the manifest).
    """

    uri: str
    _: KW_ONLY
    teacher: F.TeacherInfo
    selection: F.Selection
    bits: int = 8
    scheme: str = "sqrt"
    level: str = "token"
    columns: dict[str, bool] | None = None
    pipeline: dict[str, Any] | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    compression_level: int = ZSTD_LEVEL
    overwrite: bool = False
    shard_prefix: str = "part"
    index_order: np.ndarray | None = None
    index_order_source: dict[str, Any] | None = None
    _buffer: list[SoftLabelRow] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.uri = str(self.uri)
        self.location = resolve(self.uri)
        # Validate everything before touching the filesystem.
        order_file, order_entry = (None, None)
        if self.index_order is not None:
            order_file, order_entry = encode_index_order(self.index_order, source=self.index_order_source)
        self.manifest = new_manifest(
            teacher=self.teacher, selection=self.selection, bits=self.bits, level=self.level,
            columns=self.columns, pipeline=self.pipeline, scheme=self.scheme, index_order=order_entry,
        )
        self.encoder = RowEncoder(self.manifest, index_order=self.index_order)
        old = [F.MANIFEST] if self.location.exists(F.MANIFEST) else []
        old += self.location.list(F.SHARD_DIR) + self.location.list(F.ERROR_DIR)
        if old and not self.overwrite:
            what = "a store" if old[0] == F.MANIFEST else "an incomplete store (shards without a manifest)"
            raise FileExistsError(f"{self.uri}: {what} already exists here; pass overwrite=True to replace it, or choose another path")
        if old:
            for rel in old + [f for f in (F.VOCAB, F.INDEX_ORDER) if self.location.exists(f)]:
                self.location.fs.delete_file(self.location.join(rel))  # manifest first: see docstring
        self.location.makedirs()
        if order_file is not None:
            self.location.write_bytes_atomic(F.INDEX_ORDER, order_file)
        self._shards: list[F.ShardInfo] = []
        self._current: ShardWriter | None = None
        self._vocab: dict[str, Any] | None = None
        self._errors: list[dict[str, Any]] = []
        self._closed = False
        self._seq = 0

    # -- public ------------------------------------------------------------------------
    def write(self, rows: Iterable[SoftLabelRow]) -> None:
        """Buffer rows (validated and encoded per row group; errors name the sample)."""
        if self._closed:
            raise RuntimeError(f"{self.uri}: the writer is closed")
        for r in rows:
            self._buffer.append(r)
            if len(self._buffer) >= self.row_group_rows:
                self._flush()

    def write_vocab(self, table: pa.Table) -> None:
        """Write the teacher vocabulary table (see :func:`vocab_table`)."""
        self._vocab = write_vocab(self.location, table)

    def dead_letter(self, *, reason: str, sample_id: str | None = None, source: str | None = None, **extra: Any) -> None:
        """Record a rejected sample (written to ``errors/`` and counted in the manifest)."""
        self._errors.append({"reason": reason, "sample_id": sample_id, "source": source, **extra})

    def close(self) -> F.Manifest:
        """Flush, close the last shard, write dead letters, then the manifest (last)."""
        if self._closed:
            return self.manifest
        self._flush()
        if self._current is not None:
            self._shards.append(self._current.close())
            self._current = None
        err = write_dead_letters(self.location, self._errors, name=f"{self.shard_prefix}-errors")
        self._closed = True
        return finalize(
            self.location, self.manifest, shards=self._shards, vocab=self._vocab,
            error_files=[err] if err else [], dead_letters=len(self._errors),
        )

    def abort(self) -> None:
        """Close files without writing a manifest (the store stays incomplete)."""
        if self._current is not None:
            self._current.abort()
            self._current = None
        self._buffer = []
        self._closed = True

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- private -----------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._buffer:
            return
        buffer, self._buffer = self._buffer, []
        table = self.encoder.encode(buffer)
        if self._current is None:
            self._current = ShardWriter(
                location=self.location, rel_path=f"{F.SHARD_DIR}/{self.shard_prefix}-{self._seq:05d}.parquet",
                manifest=self.manifest, compression_level=self.compression_level,
            )
            self._seq += 1
        self._current.write_table(table)
        if self._current.bytes_written >= self.shard_bytes:
            self._shards.append(self._current.close())
            self._current = None
