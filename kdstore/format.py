"""Store format v2: directory layout, Arrow schema, manifest. See ``docs/format.md``.

Layout of a store root::

    manifest.json            written last, atomically: a store without it is incomplete
    vocab.parquet            teacher vocabulary table (id, token, bytes, hash, special)
    index_order.parquet      (``rank_delta`` stores) the teacher id stored at each rank
    shards/*.parquet         soft-label rows (zstd)
    errors/*.jsonl           dead letters: one JSON object per rejected sample

Everything here is pinned by ``tests/test_store_golden.py``; changing it means a new
``FORMAT_VERSION`` and a reader that still accepts the old one.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from kdstore.errors import StoreFormatError
from kdstore.quant import count_dtype, index_dtype

FORMAT_NAME = "kdstore"
FORMAT_VERSION = 2
# v2 = v1 + the ``rank_delta`` index coding and the manifest key ``index_order``; a v1
# store (``sorted_delta`` only, no ``index_order`` key) decodes unchanged.
SUPPORTED_VERSIONS = (1, 2)

MANIFEST = "manifest.json"
VOCAB = "vocab.parquet"
INDEX_ORDER = "index_order.parquet"
SHARD_DIR = "shards"
ERROR_DIR = "errors"

SELECT_MODES = ("topk", "top_p", "sample")
PROB_CODES = ("sqrt", "log", "count")
# Entries of a position sorted by ascending index, indices stored as gaps (docs/format.md).
INDEX_CODING = "sorted_delta"
# v2: the same gaps over each id's rank in ``index_order.parquet`` (frequent ids first), so
# a 150k vocabulary's kept ids cost what a small vocabulary's do (docs/format.md).
RANK_CODING = "rank_delta"
INDEX_CODINGS = (INDEX_CODING, RANK_CODING)
LEVELS = ("token", "sequence")

_PA_UINT = {1: pa.uint8(), 2: pa.uint16(), 4: pa.uint32(), 8: pa.uint64()}


@dataclass
class TeacherInfo:
    """Identity of the model whose distributions are stored.

    ``vocab_size`` is the *padded* vocabulary size (rows of the output embedding), which
    bounds every stored index; ``tokenizer_vocab_size`` is ``len(tokenizer)``. For a
    sequence-level store, ``vocab_size`` is the number of classes.
    """

    name_or_path: str
    vocab_size: int
    weights_hash: str | None = None
    tokenizer_hash: str | None = None
    tokenizer_vocab_size: int | None = None
    revision: str | None = None
    architecture: str | None = None
    num_parameters: int | None = None


@dataclass
class Selection:
    """How kept entries were chosen from each teacher distribution.

    ``topk``: the ``k`` most probable; ``top_p``: the fewest whose mass reaches ``p``
    (at least 1, at most ``max_k``); ``sample``: ``samples`` draws with replacement,
    stored as exact counts (target = counts / samples).
    """

    mode: str
    k: int | None = None
    p: float | None = None
    max_k: int | None = None
    samples: int | None = None
    temperature: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.mode not in SELECT_MODES:
            raise StoreFormatError(f"unknown selection mode {self.mode!r}; expected one of {SELECT_MODES}")
        if self.mode == "topk" and (self.k is None or self.k < 1):
            raise StoreFormatError("selection mode 'topk' needs k >= 1")
        if self.mode == "top_p" and (self.p is None or not 0.0 < self.p <= 1.0 or not self.max_k):
            raise StoreFormatError("selection mode 'top_p' needs 0 < p <= 1 and max_k >= 1")
        if self.mode == "sample" and (self.samples is None or self.samples < 1):
            raise StoreFormatError("selection mode 'sample' needs samples >= 1")
        if self.max_kept > 0xFFFF:
            raise StoreFormatError(f"at most 65535 kept entries per position are supported, got {self.max_kept}")
        if not self.temperature > 0:
            raise StoreFormatError(f"temperature must be > 0, got {self.temperature}")

    @property
    def variable(self) -> bool:
        """True when the number of kept entries varies per position (a ``counts`` column)."""
        return self.mode != "topk"

    @property
    def max_kept(self) -> int:
        return {"topk": self.k, "top_p": self.max_k, "sample": self.samples}[self.mode]  # type: ignore[return-value]


@dataclass
class Quantization:
    """How ``probs`` and ``tail`` are coded (exact mappings in :mod:`kdstore.quant`).

    ``probs``: ``sqrt`` (default), ``log``, or ``count`` (``sample`` mode: exact draw
    counts). ``tail``: ``sqrt`` or ``log``; None means the ``probs`` code (``sqrt`` for
    ``count``). ``bits``: 8 or 16 (both codes). ``log_range``: L of the ``log`` code.
    """

    probs: str
    bits: int
    log_range: float | None = None
    tail: str | None = None

    @property
    def tail_scheme(self) -> str:
        if self.tail is not None:
            return self.tail
        return "sqrt" if self.probs == "count" else self.probs


@dataclass
class ShardInfo:
    file: str
    rows: int
    tokens: int
    entries: int
    bytes: int
    checksum: str


@dataclass
class Manifest:
    teacher: TeacherInfo
    selection: Selection
    quantization: Quantization
    level: str = "token"
    shards: list[ShardInfo] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    vocab: dict[str, Any] | None = None
    errors: dict[str, Any] = field(default_factory=lambda: {"files": [], "count": 0})
    columns: dict[str, bool] = field(default_factory=dict)
    index_dtype: str = ""
    index_coding: str = INDEX_CODING
    index_order: dict[str, Any] | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    created_by: str = ""
    created_at: str = ""
    pipeline: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION

    # -- derived -----------------------------------------------------------------------
    @property
    def index_np_dtype(self):
        return index_dtype(self.teacher.vocab_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest.json") -> "Manifest":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreFormatError(f"{source}: not valid JSON ({exc}); the manifest is corrupt — re-run the capture or restore it") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{source}: not a kdstore manifest (format={d.get('format') if isinstance(d, dict) else None!r})")
        version = d.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise StoreFormatError(
                f"{source}: store format version {version!r} is not supported by this kdstore "
                f"(supports {list(SUPPORTED_VERSIONS)}); upgrade kdstore or re-create the store"
            )
        if "index_coding" not in d:
            raise StoreFormatError(
                f"{source}: manifest has no 'index_coding' (written by a pre-release kdstore whose shards this "
                f"version cannot decode); re-create the store"
            )
        try:
            teacher = TeacherInfo(**d.pop("teacher"))
            selection = Selection(**d.pop("selection"))
            quantization = Quantization(**d.pop("quantization"))
            shards = [ShardInfo(**s) for s in d.pop("shards")]
            m = cls(teacher=teacher, selection=selection, quantization=quantization, shards=shards, **d)
        except (KeyError, TypeError) as exc:
            raise StoreFormatError(f"{source}: manifest is missing or has unexpected fields ({exc})") from exc
        m.validate(source=source)
        return m

    def validate(self, *, source: str = "manifest.json") -> None:
        self.selection.validate()
        if self.level not in LEVELS:
            raise StoreFormatError(f"{source}: unknown level {self.level!r}")
        q = self.quantization
        if q.probs not in PROB_CODES or q.tail_scheme not in ("sqrt", "log") or q.bits not in (8, 16):
            raise StoreFormatError(f"{source}: unknown quantization {q}; format v{FORMAT_VERSION} knows probs in {PROB_CODES}, tail in ('sqrt', 'log'), bits 8 or 16")
        if (q.probs == "count") != (self.selection.mode == "sample"):
            raise StoreFormatError(f"{source}: 'count' quantization goes with selection mode 'sample' only")
        if self.index_coding not in INDEX_CODINGS or (self.format_version == 1 and self.index_coding != INDEX_CODING):
            raise StoreFormatError(f"{source}: unknown index coding {self.index_coding!r} for format v{self.format_version} "
                                   f"(v1 knows {INDEX_CODING!r}, v2 {list(INDEX_CODINGS)})")
        if (self.index_coding == RANK_CODING) != (self.index_order is not None):
            raise StoreFormatError(f"{source}: index coding {self.index_coding!r} " + (
                "needs an 'index_order' entry (the id of each rank); the manifest is corrupt" if self.index_order is None
                else "has an 'index_order' entry, which only 'rank_delta' uses; the manifest is corrupt"))
        if self.index_order is not None:
            rows = self.index_order.get("rows")
            if rows != self.teacher.vocab_size or not self.index_order.get("file"):
                raise StoreFormatError(f"{source}: index_order must name a file of teacher.vocab_size = "
                                       f"{self.teacher.vocab_size} rows, got {self.index_order!r}")
            check_relative_path(self.index_order["file"], source=source)
        if not isinstance(self.teacher.vocab_size, int) or self.teacher.vocab_size < 1:
            raise StoreFormatError(f"{source}: teacher.vocab_size must be a positive integer, got {self.teacher.vocab_size!r}")
        want = str(index_dtype(self.teacher.vocab_size))
        if self.index_dtype and self.index_dtype != want:
            raise StoreFormatError(f"{source}: index_dtype {self.index_dtype!r} does not fit vocab size {self.teacher.vocab_size} (format v{FORMAT_VERSION} uses {want!r})")
        for s in self.shards:
            check_relative_path(s.file, source=source)
        for f in self.errors.get("files", []):
            check_relative_path(f, source=source)


def check_relative_path(rel: str, *, source: str = "manifest.json") -> str:
    """Shard paths must be relative and stay inside the store root."""
    if not isinstance(rel, str) or not rel:
        raise StoreFormatError(f"{source}: empty file name in manifest")
    if rel.startswith("/") or "://" in rel or (len(rel) > 1 and rel[1] == ":") or "\\" in rel:
        raise StoreFormatError(f"{source}: file path {rel!r} is absolute; manifest paths must be relative to the store root")
    parts = rel.split("/")
    if ".." in parts:
        raise StoreFormatError(f"{source}: file path {rel!r} escapes the store root ('..'); refusing to read it")
    norm = posixpath.normpath(rel)
    if norm in (".", ""):
        raise StoreFormatError(f"{source}: file path {rel!r} names the store root, not a file")
    return norm


def probs_dtype(quant: Quantization, selection: Selection):
    if quant.probs == "count":
        return count_dtype(selection.samples or 1)
    import numpy as np  # noqa: PLC0415

    return np.dtype(np.uint8 if quant.bits == 8 else np.uint16)


def tail_dtype(quant: Quantization):
    import numpy as np  # noqa: PLC0415

    return np.dtype(np.uint8 if quant.bits == 8 else np.uint16)


def arrow_schema(manifest: Manifest) -> pa.Schema:
    """Arrow schema of shard files for a given manifest (columns depend on options)."""
    idx = _PA_UINT[manifest.index_np_dtype.itemsize]
    prob = _PA_UINT[probs_dtype(manifest.quantization, manifest.selection).itemsize]
    tail = _PA_UINT[tail_dtype(manifest.quantization).itemsize]
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("window", pa.uint32(), nullable=False),
        pa.field("token_start", pa.uint32(), nullable=False),
        pa.field("context_len", pa.uint32(), nullable=False),
        pa.field("tokens", pa.list_(pa.uint64()), nullable=False),
    ]
    if manifest.selection.variable:
        fields.append(pa.field("counts", pa.list_(pa.uint16()), nullable=False))
    fields += [
        pa.field("indices", pa.list_(idx), nullable=False),
        pa.field("probs", pa.list_(prob), nullable=False),
        pa.field("tail", pa.list_(tail), nullable=False),
    ]
    cols = manifest.columns
    if cols.get("text"):
        fields.append(pa.field("text", pa.string()))
    if cols.get("offsets"):
        fields.append(pa.field("byte_start", pa.list_(pa.uint32())))
        fields.append(pa.field("byte_end", pa.list_(pa.uint32())))
    if cols.get("label"):
        fields.append(pa.field("label", pa.int64()))
    return pa.schema(fields, metadata=shard_metadata(manifest))


def shard_metadata(manifest: Manifest) -> dict[bytes, bytes]:
    """Arrow schema metadata of every shard: enough to decode a shard found on its own."""
    q = manifest.quantization
    return {
        b"kdstore.format_version": str(manifest.format_version).encode(),
        b"kdstore.index_coding": manifest.index_coding.encode(),
        b"kdstore.probs": (q.probs if q.probs == "count" else f"{q.probs}{q.bits}").encode(),
        b"kdstore.tail": f"{q.tail_scheme}{q.bits}".encode(),
        b"kdstore.vocab_size": str(manifest.teacher.vocab_size).encode(),
    }


VOCAB_SCHEMA = pa.schema(
    [
        pa.field("id", pa.uint32(), nullable=False),
        pa.field("token", pa.string(), nullable=False),
        pa.field("bytes", pa.binary(), nullable=False),
        pa.field("hash", pa.uint64(), nullable=False),
        pa.field("special", pa.bool_(), nullable=False),
    ],
    metadata={b"kdstore.format_version": str(FORMAT_VERSION).encode()},
)

# index_order.parquet: row r holds the teacher id stored as rank r (a permutation of
# [0, teacher.vocab_size)); readers map a decoded rank back with ``id = order[rank]``.
INDEX_ORDER_SCHEMA = pa.schema(
    [pa.field("id", pa.uint32(), nullable=False)],
    metadata={b"kdstore.format_version": str(FORMAT_VERSION).encode()},
)
