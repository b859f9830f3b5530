"""Writing stores: row encoding, shard files, vocabulary table, dead letters, manifest.

The pieces are usable separately so that a distributed capture (Beam) can encode and write
shards on many workers and finalize the manifest once at the end:

* :class:`RowEncoder` turns :class:`SoftLabelRow` objects into an Arrow table (vectorised
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
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from kdstore import format as F
from kdstore._version import __version__
from kdstore.errors import StoreFormatError
from kdstore.fs import Location, resolve
from kdstore.hashing import CHECKSUM, SAMPLE_ID_HASH, TOKEN_HASH, file_checksum, token_hashes
from kdstore.quant import LogQuantizer

DEFAULT_SHARD_BYTES = 128 << 20
DEFAULT_ROW_GROUP_ROWS = 1024


@dataclass
class SoftLabelRow:
    """One stored row: a window of a sample (token level) or a whole sample (sequence level).

    tokens:  ``[T]`` uint64 token hashes (empty allowed at sequence level).
    counts:  ``[P]`` kept entries per position (P = T at token level, 1 at sequence level).
    indices: ``[E]`` teacher ids, E = sum(counts), grouped by position, most probable first.
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
) -> F.Manifest:
    """A manifest with everything but shards/totals filled in (validated)."""
    scheme = "count" if selection.mode == "sample" else "log"
    m = F.Manifest(
        teacher=teacher,
        selection=selection,
        quantization=F.Quantization(probs=scheme, bits=bits, log_range=LogQuantizer(bits).log_range),
        level=level,
        columns={"text": False, "offsets": False, "label": False, **(columns or {})},
        index_dtype=str(np.dtype(F.index_dtype(teacher.vocab_size))),
        hashes={"tokens": TOKEN_HASH, "sample_id": SAMPLE_ID_HASH, "checksum": CHECKSUM},
        created_by=f"kdstore {__version__}",
        pipeline=dict(pipeline or {}),
    )
    m.validate(source="new manifest")
    return m


class RowEncoder:
    """Encode rows for one manifest's schema; all quantization happens here."""

    def __init__(self, manifest: F.Manifest) -> None:
        self.manifest = manifest
        self.schema = F.arrow_schema(manifest)
        self._quant = LogQuantizer(manifest.quantization.bits)
        self._idx_dtype = manifest.index_np_dtype
        self._prob_dtype = F.probs_dtype(manifest.quantization, manifest.selection)
        self._sel = manifest.selection

    def encode(self, rows: Sequence[SoftLabelRow]) -> pa.Table:
        """Rows -> Arrow table with ``self.schema``; raises StoreFormatError naming the sample."""
        m, sel = self.manifest, self._sel
        vocab = m.teacher.vocab_size
        for r in rows:
            self._check_row(r, vocab)
        tokens = [np.asarray(r.tokens, dtype=np.uint64) for r in rows]
        counts = [np.asarray(r.counts, dtype=np.int64) for r in rows]
        idx = np.concatenate([np.asarray(r.indices, dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
        probs = np.concatenate([np.asarray(r.probs, dtype=np.float64) for r in rows]) if rows else np.zeros(0)
        tail = np.concatenate([np.asarray(r.tail, dtype=np.float64) for r in rows]) if rows else np.zeros(0)
        if sel.mode == "sample":
            q_probs = np.rint(probs * sel.samples).astype(self._prob_dtype)
        else:
            q_probs = self._quant.encode(probs)
        q_tail = self._quant.encode(np.clip(tail, 0.0, 1.0))
        e_off = _offsets([int(c.sum()) for c in counts])
        p_off = _offsets([len(c) for c in counts])
        cols: dict[str, pa.Array] = {
            "sample_id": pa.array([r.sample_id for r in rows], pa.string()),
            "window": pa.array([r.window for r in rows], pa.uint32()),
            "token_start": pa.array([r.token_start for r in rows], pa.uint32()),
            "context_len": pa.array([r.context_len for r in rows], pa.uint32()),
            "tokens": _list(_offsets([len(t) for t in tokens]), np.concatenate(tokens) if rows else np.zeros(0, np.uint64)),
        }
        if sel.variable:
            cols["counts"] = _list(p_off, np.concatenate(counts).astype(np.uint16) if rows else np.zeros(0, np.uint16))
        cols["indices"] = _list(e_off, idx.astype(self._idx_dtype))
        cols["probs"] = _list(e_off, q_probs)
        cols["tail"] = _list(p_off, q_tail)
        if m.columns.get("text"):
            cols["text"] = pa.array([r.text for r in rows], pa.string())
        if m.columns.get("offsets"):
            bs = [np.asarray(r.byte_start if r.byte_start is not None else [], np.uint32) for r in rows]
            be = [np.asarray(r.byte_end if r.byte_end is not None else [], np.uint32) for r in rows]
            cols["byte_start"] = _list(_offsets([len(b) for b in bs]), np.concatenate(bs) if rows else np.zeros(0, np.uint32))
            cols["byte_end"] = _list(_offsets([len(b) for b in be]), np.concatenate(be) if rows else np.zeros(0, np.uint32))
        if m.columns.get("label"):
            cols["label"] = pa.array([r.label for r in rows], pa.int64())
        return pa.Table.from_arrays([cols[f.name] for f in self.schema], schema=self.schema)

    def _check_row(self, r: SoftLabelRow, vocab: int) -> None:
        sid = r.sample_id
        counts = np.asarray(r.counts)
        n_pos = len(counts)
        where = f"sample {sid!r} window {r.window}"
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
            raise StoreFormatError(f"{where}: top-k rows keep exactly k={self._sel.k} entries per position")
        idx = np.asarray(r.indices)
        if len(idx) and (idx.min() < 0 or idx.max() >= vocab):
            raise StoreFormatError(f"{where}: index {int(idx.max() if idx.max() >= vocab else idx.min())} outside the teacher vocabulary [0, {vocab})")
        for name, arr in (("probs", r.probs), ("tail", r.tail)):
            a = np.asarray(arr, dtype=np.float64)
            if len(a) and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1 + 1e-5):
                raise StoreFormatError(f"{where}: {name} must be finite probabilities in [0, 1]")
        if r.context_len > n_pos:
            raise StoreFormatError(f"{where}: context_len {r.context_len} > {n_pos} positions")


def _offsets(lengths: Iterable[int]) -> np.ndarray:
    lengths = np.fromiter(lengths, dtype=np.int64)
    out = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=out[1:])
    return out


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))


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


def parquet_options(manifest: F.Manifest, *, compression_level: int = 3) -> dict[str, Any]:
    """Parquet writer settings of format v1 (measured in ``bench/store_bench.py``).

    Dictionary encoding only where values repeat heavily (token hashes); indices and codes
    are PLAIN + zstd, which beat dictionary and delta encodings on bytes and decode speed.
    """
    return dict(
        compression="zstd",
        compression_level=compression_level,
        use_dictionary=["tokens.list.element"],
        write_statistics=["window", "token_start", "context_len"],
        data_page_size=1 << 20,
    )


class ShardWriter:
    """Write one Parquet shard; ``close()`` returns its :class:`~kdstore.format.ShardInfo`."""

    def __init__(self, *, location: Location, rel_path: str, manifest: F.Manifest, compression_level: int = 3) -> None:
        F.check_relative_path(rel_path)
        self.rel_path = rel_path
        self.manifest = manifest
        location.makedirs(rel_path.rpartition("/")[0] or "")
        self._sink = _HashingSink(location.fs.open_output_stream(location.join(rel_path)))
        self._writer = pq.ParquetWriter(
            self._sink, F.arrow_schema(manifest), **parquet_options(manifest, compression_level=compression_level)
        )
        self.rows = self.tokens = self.entries = 0

    @property
    def bytes_written(self) -> int:
        return self._sink.nbytes

    def write_table(self, table: pa.Table) -> None:
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self.rows += table.num_rows
        self.tokens += _num_positions(table)
        self.entries += len(table.column("indices").combine_chunks().values) if table.num_rows else 0

    def close(self) -> F.ShardInfo:
        self._writer.close()
        self._sink.close()
        return F.ShardInfo(
            file=self.rel_path, rows=self.rows, tokens=self.tokens, entries=self.entries,
            bytes=self._sink.nbytes, checksum=self._sink.checksum,
        )

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._sink.close()


def _num_positions(table: pa.Table) -> int:
    tail = table.column("tail").combine_chunks()
    return int(len(tail.values)) if table.num_rows else 0


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
    """

    uri: str
    teacher: F.TeacherInfo
    selection: F.Selection
    bits: int = 8
    level: str = "token"
    columns: dict[str, bool] | None = None
    pipeline: dict[str, Any] | None = None
    shard_bytes: int = DEFAULT_SHARD_BYTES
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    compression_level: int = 3
    overwrite: bool = False
    shard_prefix: str = "part"
    _buffer: list[SoftLabelRow] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.location = resolve(self.uri)
        if self.location.exists(F.MANIFEST) and not self.overwrite:
            raise FileExistsError(f"{self.uri}: a store already exists here; pass overwrite=True or choose another path")
        self.location.makedirs()
        self.manifest = new_manifest(
            teacher=self.teacher, selection=self.selection, bits=self.bits, level=self.level,
            columns=self.columns, pipeline=self.pipeline,
        )
        self.encoder = RowEncoder(self.manifest)
        self._shards: list[F.ShardInfo] = []
        self._current: ShardWriter | None = None
        self._vocab: dict[str, Any] | None = None
        self._errors: list[dict[str, Any]] = []
        self._closed = False
        self._seq = 0

    # -- public ------------------------------------------------------------------------
    def write(self, rows: Iterable[SoftLabelRow]) -> None:
        for r in rows:
            self._buffer.append(r)
            if len(self._buffer) >= self.row_group_rows:
                self._flush()

    def write_vocab(self, table: pa.Table) -> None:
        self._vocab = write_vocab(self.location, table)

    def dead_letter(self, *, reason: str, sample_id: str | None = None, source: str | None = None, **extra: Any) -> None:
        self._errors.append({"reason": reason, "sample_id": sample_id, "source": source, **extra})

    def close(self) -> F.Manifest:
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
        table = self.encoder.encode(self._buffer)
        self._buffer = []
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
