"""Readers for user corpora: plain text, JSONL and Parquet, local paths or remote URIs.

Every input unit (a line, a JSON object, a Parquet row) becomes either a :class:`Record`
or a :class:`DeadLetter` naming its source location (``path:N``, N the 1-based line or row
number) and the reason it was rejected, so counts always add up: units read = records +
dead letters. File-level problems (no file matches, unreadable file, a Parquet file
without the text column) raise :class:`CorpusError` instead, since no per-record answer
exists for them.

This is the one reader of user files: the Beam capture pipeline (one file per DoFn call), the
plain-loop baseline and every trainer (LM text sources, labelled classification files,
teacher soft-label files) read through it. Callers that stop at the first bad record use
:func:`keep_or_raise`: one rule, one message (``path:N: reason``) for every reader.

Labels (``label_field``): an integer class id (not a bool, not a float; a string of digits
reads as its integer), or with ``label_names`` a class name (any string, returned as it is;
the caller maps names to ids).

Remote files go through :mod:`kdstore.fs` (pyarrow filesystems: ``gs://``, ``s3://``,
``hdfs://``, or fsspec); ``.gz``/``.bz2``/``.zst`` text is decompressed by extension.
"""

from __future__ import annotations

import fnmatch
import glob as _glob
import io
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence, Union

import pyarrow.fs as pafs

from kdstore.hashing import sample_id as _sample_id

FORMATS = ("auto", "text", "jsonl", "parquet")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_GLOB_CHARS = set("*?[")


class CorpusError(ValueError):
    """A corpus file (not a single record) cannot be read; the message names the file and the fix."""


class RecordError(CorpusError):
    """A bad record where the caller asked to stop at the first one; the message is
    ``path:N: reason`` and what to do."""


BLANK = "empty line"  # the reason of a blank line: layout between records, never an error


@dataclass(frozen=True)
class Record:
    """One input sample.

    ``sample_id`` is the content hash of (``source_id``, ``text``) (see
    :func:`kdstore.hashing.sample_id`); ``source`` is ``path:N`` for error messages;
    ``label`` an optional integer class id (sequence-level gold label).
    """

    text: str
    sample_id: str
    source: str
    source_id: str | None = None
    label: int | str | None = None
    fields: dict[str, Any] | None = field(default=None, compare=False)  # ReaderSpec.extra_fields, raw


@dataclass(frozen=True)
class DeadLetter:
    """A rejected input unit (or window): why, where, and which sample if known."""

    reason: str
    source: str
    sample_id: str | None = None
    stage: str = "read"
    window: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


Parsed = Union[Record, DeadLetter]
# Characters that print nothing: NUL and other controls, zero-width spaces/joiners, BOM.
_INVISIBLE = dict.fromkeys([*range(0x00, 0x20), 0x7F, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF, 0x00AD])


@dataclass(frozen=True)
class ReaderSpec:
    """How records are parsed.

    format: ``auto`` (by extension: ``.jsonl/.json/.ndjson`` JSONL, ``.parquet/.pq``
    Parquet, anything else plain text, one sample per line), or one of text/jsonl/parquet.
    text_field / id_field / label_field: JSON keys or Parquet columns (ignored for text).
    num_classes: when set, a label outside ``[0, num_classes)`` is a dead letter.
    label_names: string labels are class names (kept as str) instead of errors.
    require_label: a record without a label is a dead letter.
    extra_fields: further keys / columns handed back raw in ``Record.fields`` (checked by the caller).
    sample_id_field: a key/column that may carry the record's sample id as an earlier step
    wrote it; a record whose id differs from the content hash is a dead letter (so a label
    never travels with the wrong text).
    """

    format: str = "auto"
    text_field: str = "text"
    id_field: str | None = None
    label_field: str | None = None
    num_classes: int | None = None
    label_names: bool = False
    require_label: bool = False
    extra_fields: tuple[str, ...] = ()
    sample_id_field: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"input format must be one of {FORMATS}, got {self.format!r}")

    def format_of(self, path: str) -> str:
        if self.format != "auto":
            return self.format
        name = path.lower()
        for suffix in _COMPRESSED:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if name.endswith(_JSONL_SUFFIXES):
            return "jsonl"
        if name.endswith(_PARQUET_SUFFIXES):
            return "parquet"
        return "text"


# -- files ---------------------------------------------------------------------------------
def _open_fs(path: str) -> tuple[pafs.FileSystem, str]:
    from kdstore.fs import resolve  # noqa: PLC0415 - keep import of this module light

    loc = resolve(path)
    return loc.fs, loc.root


def expand_inputs(patterns: str | Sequence[str]) -> list[str]:
    """Expand globs (``*``, ``?``, ``[..]``, ``**``) over local paths or URIs.

    ``patterns`` is one pattern, a comma-separated string, or a list. Returns sorted,
    de-duplicated file paths; raises :class:`CorpusError` when a pattern matches nothing.
    """
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    out: list[str] = []
    for pat in patterns:
        pat = pat.strip()
        if "://" not in pat:
            if _GLOB_CHARS & set(pat):
                matches = [p for p in _glob.glob(pat, recursive=True) if os.path.isfile(p)]
            else:
                matches = [pat] if os.path.isfile(pat) else []
            matches = [os.path.abspath(p) for p in matches]
        else:
            matches = _expand_remote(pat)
        if not matches:
            raise CorpusError(f"no input file matches {pat!r}; check the path or glob (quote it so the shell does not expand it)")
        out.extend(sorted(matches))
    return sorted(dict.fromkeys(out))


def _expand_remote(pattern: str) -> list[str]:
    scheme, _, rest = pattern.partition("://")
    if not _GLOB_CHARS & set(rest):
        fs, path = _open_fs(pattern)
        return [pattern] if fs.get_file_info(path).type == pafs.FileType.File else []
    # The directory part before the first glob character is listed recursively.
    first = min(i for i, c in enumerate(rest) if c in _GLOB_CHARS)
    base = rest[: first].rpartition("/")[0]
    fs, root = _open_fs(f"{scheme}://{base}")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    out = []
    for fi in infos:
        if fi.type != pafs.FileType.File:
            continue
        uri = f"{scheme}://{base}/{posixpath.relpath(fi.path, root)}"
        if fnmatch.fnmatchcase(uri, pattern):
            out.append(uri)
    return out


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line_number, raw bytes without the line terminator)`` for a text file (streamed)."""
    fs, p = _open_fs(path)
    try:
        stream = fs.open_input_stream(p, compression="detect")
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path}: cannot open input file ({exc})") from exc
    n = 0
    with stream:
        reader = io.BufferedReader(stream, buffer_size=1 << 20)
        try:
            for n, raw in enumerate(reader, 1):
                yield n, raw.rstrip(b"\r\n")
        except (OSError, EOFError, ValueError) as exc:  # a truncated or corrupt .gz/.bz2/.zst
            raise CorpusError(
                f"{path}: the file is truncated or corrupt after line {n} ({exc}); re-copy or re-compress it "
                f"(the lines before it were read, nothing after it can be)"
            ) from exc


# -- record parsing -------------------------------------------------------------------------
def _decode(raw: bytes, source: str) -> str | DeadLetter:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DeadLetter(reason=f"undecodable: not valid UTF-8 at byte {exc.start} ({exc.reason})", source=source)


def parse_text_line(raw: bytes, source: str) -> Parsed:
    """One line of a plain-text corpus (terminator already removed)."""
    text = _decode(raw, source)
    if isinstance(text, DeadLetter):
        return text
    if not text.strip():
        return DeadLetter(reason=BLANK, source=source)
    bad = _unusable(text)
    if bad:
        return DeadLetter(reason=bad, source=source)
    return Record(text=text, sample_id=_sample_id(text), source=source)


def _unusable(text: str) -> str | None:
    """Why a non-blank text cannot be a sample (None if it can)."""
    if not text.translate(_INVISIBLE).strip():
        return "no visible characters: the text holds only NUL / control / zero-width characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}: the JSON escapes half of a "
                f"UTF-16 pair; fix the producer of this file")
    return None


def _label(value: Any, spec: ReaderSpec, source: str, sid: str) -> int | str | None | DeadLetter:
    """The one label rule (see the module docstring). Booleans and floats are rejected: ``true``
    or ``1.0`` is more often a mistake (a score, a flag) than a class id."""
    field_ = spec.label_field
    if value is None:
        if spec.require_label:
            return DeadLetter(reason=f"missing label field {field_!r}", source=source, sample_id=sid)
        return None
    if isinstance(value, str) and value.strip() and spec.label_names:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        out = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        out = int(value)
    else:
        kind = "an integer class id or a class name" if spec.label_names else "an integer class id"
        return DeadLetter(reason=f"label field {field_!r} is not {kind}: {value!r:.60}", source=source, sample_id=sid)
    if spec.num_classes is not None and not 0 <= out < spec.num_classes:
        return DeadLetter(reason=f"bad label: {value!r} is not a class id in [0, {spec.num_classes})", source=source,
                          sample_id=sid)
    return out


def _record(text: Any, source_id: Any, label: Any, spec: ReaderSpec, source: str, given_id: Any = None,
            extra: dict[str, Any] | None = None) -> Parsed:
    if text is None:
        return DeadLetter(reason=f"field {spec.text_field!r} is missing or null", source=source)
    if not isinstance(text, str):
        return DeadLetter(reason=f"field {spec.text_field!r} is not a string ({type(text).__name__})", source=source)
    if not text.strip():
        return DeadLetter(reason="empty text", source=source)
    bad = _unusable(text)
    if bad:
        return DeadLetter(reason=bad, source=source)
    sid_src = None if source_id is None else str(source_id)
    if spec.id_field and sid_src is None:
        return DeadLetter(reason=f"missing id field {spec.id_field!r}", source=source)
    sid = _sample_id(text, sid_src)
    if given_id is not None and given_id != sid:
        return DeadLetter(reason=f"sample id mismatch: {given_id!r} is not the content hash {sid} of the text", source=source,
                          sample_id=sid)
    lab = _label(label, spec, source, sid) if spec.label_field else None
    if isinstance(lab, DeadLetter):
        return lab
    return Record(text=text, sample_id=sid, source=source, source_id=sid_src, label=lab, fields=extra)


def parse_json_line(raw: bytes, source: str, spec: ReaderSpec) -> Parsed:
    """One line of a JSONL corpus: an object with ``spec.text_field`` (and optional id/label)."""
    line = _decode(raw, source)
    if isinstance(line, DeadLetter):
        return line
    if not line.strip():
        return DeadLetter(reason=BLANK, source=source)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return DeadLetter(reason=f"malformed JSON: {exc.msg} at column {exc.colno}", source=source)
    if not isinstance(obj, dict):
        return DeadLetter(reason=f"JSON value is a {type(obj).__name__}, expected an object with field {spec.text_field!r}", source=source)
    if spec.text_field not in obj:
        return DeadLetter(reason=f"missing field {spec.text_field!r}", source=source)
    return _record(
        obj[spec.text_field], obj.get(spec.id_field) if spec.id_field else None,
        obj.get(spec.label_field) if spec.label_field else None, spec, source,
        obj.get(spec.sample_id_field) if spec.sample_id_field else None,
        {k: obj.get(k) for k in spec.extra_fields} if spec.extra_fields else None,
    )


def iter_parquet(path: str, spec: ReaderSpec, *, batch_rows: int = 8192) -> Iterator[Parsed]:
    """Rows of a Parquet file (streamed by record batch); source is ``path:row`` (1-based)."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    fs, p = _open_fs(path)
    try:
        pf = pq.ParquetFile(p, filesystem=fs)
    except (OSError, ValueError) as exc:
        raise CorpusError(f"{path}: cannot read Parquet file ({exc})") from exc
    names = pf.schema_arrow.names
    wanted = [c for c in (spec.text_field, spec.id_field, spec.label_field, spec.sample_id_field, *spec.extra_fields) if c]
    missing = [c for c in wanted if c not in names]
    if spec.text_field in missing or (spec.id_field and spec.id_field in missing) or set(spec.extra_fields) & set(missing):
        raise CorpusError(f"{path}: no column(s) {missing} (columns: {names}); pass --text-field/--id-field naming existing columns")
    cols = [c for c in dict.fromkeys(wanted) if c in names]
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        data = {c: batch.column(c).to_pylist() for c in cols}
        for i in range(batch.num_rows):
            row += 1
            source = f"{path}:{row}"
            yield _record(
                data[spec.text_field][i], data[spec.id_field][i] if spec.id_field else None,
                data[spec.label_field][i] if spec.label_field in data else None, spec, source,
                data[spec.sample_id_field][i] if spec.sample_id_field in data else None,
                {k: data[k][i] for k in spec.extra_fields} if spec.extra_fields else None,
            )


def iter_file(path: str, spec: ReaderSpec | None = None) -> Iterator[Parsed]:
    """Records and dead letters of one file, in file order."""
    spec = spec or ReaderSpec()
    fmt = spec.format_of(path)
    if fmt == "parquet":
        yield from iter_parquet(path, spec)
        return
    for n, raw in iter_lines(path):
        source = f"{path}:{n}"
        yield parse_json_line(raw, source, spec) if fmt == "jsonl" else parse_text_line(raw, source)


def iter_records(patterns: str | Sequence[str], spec: ReaderSpec | None = None) -> Iterator[Parsed]:
    """Records and dead letters of every file matching ``patterns`` (sorted file order)."""
    for path in expand_inputs(patterns):
        yield from iter_file(path, spec)


def read_records(patterns: str | Sequence[str], spec: ReaderSpec | None = None) -> tuple[list[Record], list[DeadLetter]]:
    """Convenience for small corpora: all records and all dead letters, as two lists."""
    good: list[Record] = []
    bad: list[DeadLetter] = []
    for item in iter_records(patterns, spec):
        (good if isinstance(item, Record) else bad).append(item)
    return good, bad


# -- duplicates ------------------------------------------------------------------------------------
def _source_order(r: Record) -> tuple:
    """``path:N`` sources in file order (N numerically), for a deterministic first copy."""
    path, _, n = r.source.rpartition(":")
    return (path, int(n) if n.isdigit() else 0, r.source)


def resolve_duplicates(group: Sequence[Record]) -> tuple[Record | None, list[DeadLetter]]:
    """The records of one sample id -> ``(record to keep or None, dead letters)``.

    Copies with the same label are one sample: the first by source location is kept and
    the other ``len(group) - 1`` are merged duplicates. Copies with different labels are
    all dead letters (stage ``dedupe``): one sample id carries one gold label, and picking
    one would lose a label silently. The one dedupe rule of the Beam capture, the plain
    loop and the trainers (:func:`dedupe`).
    """
    group = sorted(group, key=_source_order)
    labels = sorted({r.label for r in group}, key=str)
    if len(labels) > 1:
        reason = f"conflicting labels: the same text is labelled {labels} by {len(group)} copies"
        return None, [DeadLetter(reason=reason, source=r.source, sample_id=r.sample_id, stage="dedupe") for r in group]
    return group[0], []


def dedupe(records: Iterable[Record]) -> tuple[list[Record], list[DeadLetter], int]:
    """``(unique records in first-occurrence order, dead letters, merged duplicates)`` by
    :func:`resolve_duplicates`; ``len(records) == unique + dead + merged``."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.sample_id, []).append(r)
    kept: list[Record] = []
    dead: list[DeadLetter] = []
    merged = 0
    for group in groups.values():
        first, bad = resolve_duplicates(group)
        dead.extend(bad)
        if first is not None:
            kept.append(first)
            merged += len(group) - 1
    return kept, dead, merged


def keep_or_raise(item: DeadLetter, dead: list[DeadLetter], *, on_error: str, hint: str = "") -> None:
    """The error rule of callers that may stop at the first bad record: ``on_error="skip"``
    keeps ``item`` in ``dead``; ``"raise"`` raises :class:`RecordError` ``path:N: reason`` (plus
    ``hint``, what to do). Blank lines are kept and never raise: they are layout, not records."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if on_error == "raise" and item.reason != BLANK:
        raise RecordError(f"{item.source}: {item.reason}" + (f" ({hint})" if hint else ""))
    dead.append(item)
