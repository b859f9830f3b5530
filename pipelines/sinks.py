"""Store side of the capture: preparing the output, resume scanning, rows, shards, finalize.

Layout rules (see ``kdstore/format.py``): shards and dead-letter files are written by many
workers under unique names; the manifest is written once, last, by :func:`finalize_store`,
listing exactly the shards that succeeded. Files in ``shards/`` or ``errors/`` that the
manifest does not list (left by failed bundles or a crashed run) are removed after the
manifest is written.

A private ``_capture.json`` at the store root records the run's manifest template while a
capture is in progress, so ``--resume`` can refuse to mix rows of a different teacher or
selection; it is removed once the manifest is written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdstore import format as F
from kdstore.errors import StoreFormatError
from kdstore.fs import Location, resolve
from kdstore.hashing import file_checksum
from kdstore.writer import SoftLabelRow

_LOG = logging.getLogger(__name__)

CAPTURE_SIDECAR = "_capture.json"
_KEY_MUL = np.uint64(0x9E3779B97F4A7C15)


class OutputExistsError(FileExistsError):
    """--output already holds a store and neither --resume nor --overwrite was given."""


def window_keys(sample_ids: Iterable[str], windows: Iterable[int]) -> np.ndarray:
    """64-bit keys of ``(sample_id, window)`` pairs (for resume lookups), uint64 ``[N]``."""
    sid = np.fromiter((int(s, 16) for s in sample_ids), dtype=np.uint64)
    w = np.fromiter(windows, dtype=np.uint64, count=len(sid))
    with np.errstate(over="ignore"):
        return sid * _KEY_MUL + w


def to_row(window, out, hash_of_id: np.ndarray, *, level: str, columns: dict[str, bool]) -> SoftLabelRow:
    """A store row from a window and its sparse teacher output."""
    if level == "sequence":
        tokens = np.zeros(0, dtype=np.uint64)
    else:
        tokens = hash_of_id[window.input_ids]
    with_offsets = columns.get("offsets", False) and level == "token"
    return SoftLabelRow(
        sample_id=window.sample_id, tokens=tokens, counts=out.counts, indices=out.indices, probs=out.probs,
        tail=out.tail, window=window.window, token_start=window.token_start, context_len=window.context_len,
        text=window.text if columns.get("text") else None,
        byte_start=window.byte_start if with_offsets else None, byte_end=window.byte_end if with_offsets else None,
        label=window.label if columns.get("label") else None,
    )


# -- output preparation and resume --------------------------------------------------------------
@dataclass
class ResumeState:
    """What a resumed capture keeps: finished shards (their infos) and their window keys."""

    shards: list[F.ShardInfo] = field(default_factory=list)
    samples: int = 0
    rows: int = 0
    removed: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"shards": [asdict(s) for s in self.shards], "samples": self.samples, "rows": self.rows,
                "quarantined": self.quarantined}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ResumeState":
        return cls(shards=[F.ShardInfo(**s) for s in d["shards"]], samples=d["samples"], rows=d["rows"],
                   quarantined=list(d.get("quarantined", [])))


def input_fingerprint(files: list[str]) -> dict[str, Any]:
    """What a resumed capture must find again: the input files and their sizes (a digest,
    plus the list itself for up to 256 files so that a refusal can name the difference)."""
    import xxhash  # noqa: PLC0415

    sized = []
    for f in files:
        loc = resolve(f)
        sized.append([f, int(loc.fs.get_file_info(loc.root).size or 0)])
    digest = xxhash.xxh3_64(json.dumps(sized).encode()).hexdigest()
    return {"files": len(sized), "digest": digest, **({"list": sized} if len(sized) <= 256 else {})}


def _template_fingerprint(m: F.Manifest) -> dict[str, Any]:
    window = {k: m.pipeline.get(k) for k in ("max_length", "stride", "overflow", "level", "input_format",
                                              "text_field", "id_field", "label_field", "dedupe", "store_text")}
    return {
        "teacher": {k: v for k, v in asdict(m.teacher).items() if k not in ("name_or_path", "revision")},
        "selection": asdict(m.selection), "quantization": asdict(m.quantization), "level": m.level,
        "columns": m.columns, "windowing": window, "input": m.pipeline.get("inputs"),
        "index": {"coding": m.index_coding, "order": (m.index_order or {}).get("checksum")},
    }


def _flat(d: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}"))
    return out


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """``key: existing -> requested`` for every setting that differs (input files by name)."""
    out = []
    for key in want:
        a, b = have.get(key), want[key]
        if a == b or (key == "input" and a is None):  # stores from before input fingerprints
            continue
        if key == "input":
            old = {f: n for f, n in a.get("list", [])}
            new = {f: n for f, n in b.get("list", [])}
            parts = [f"removed {f}" for f in sorted(set(old) - set(new))] + [f"added {f}" for f in sorted(set(new) - set(old))]
            parts += [f"changed {f} ({old[f]} -> {new[f]} bytes)" for f in sorted(set(old) & set(new)) if old[f] != new[f]]
            summary = "; ".join(parts[:10]) or f"{a.get('files')} -> {b.get('files')} files with other names or sizes"
            out.append(f"input: {summary}")
            continue
        fa, fb = _flat(a, key), _flat(b, key)
        for k in sorted(set(fa) | set(fb)):
            if fa.get(k) != fb.get(k):
                out.append(f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}")
    return out


def prepare_output(uri: str, manifest: F.Manifest, vocab: pa.Table, *, resume: bool, overwrite: bool,
                   index_order: bytes | None = None) -> tuple[Location, ResumeState, dict]:
    """Create/validate the output; write ``vocab.parquet`` (and ``index_order``: the bytes of
    the manifest's ``index_order`` file), then the sidecar; scan for resume.

    Returns ``(location, resume_state, vocab_entry)``. Raises :class:`OutputExistsError` if
    a store exists and neither flag was given, and :class:`StoreFormatError` if a resumed
    store was captured from other input files or with a different teacher, tokenizer,
    selection, quantization or windowing (the message names each difference).
    """
    from kdstore.writer import SHARD_RECORD_DIR, write_vocab  # noqa: PLC0415

    loc = resolve(uri)
    existing = loc.exists(F.MANIFEST) or loc.list(F.SHARD_DIR) or loc.exists(CAPTURE_SIDECAR)
    state = ResumeState()
    if existing and not (resume or overwrite):
        raise OutputExistsError(
            f"{uri}: a store (or a partial one) is already here; pass --resume to continue it or --overwrite to replace it"
        )
    if existing and overwrite:
        for rel in loc.list(F.SHARD_DIR) + loc.list(F.ERROR_DIR) + loc.list(SHARD_RECORD_DIR) + [F.MANIFEST, F.VOCAB, F.INDEX_ORDER, CAPTURE_SIDECAR]:
            if loc.exists(rel):
                loc.fs.delete_file(loc.join(rel))
    loc.makedirs()
    if existing and resume:
        _check_compatible(loc, manifest, vocab, uri)
        state = scan_shards(loc, manifest)
    loc.write_bytes_atomic(CAPTURE_SIDECAR, json.dumps({"template": json.loads(manifest.to_json())}, indent=1).encode())
    vocab_entry = write_vocab(loc, vocab)
    if index_order is not None:
        loc.write_bytes_atomic(F.INDEX_ORDER, index_order)
    return loc, state, vocab_entry


def _check_compatible(loc: Location, manifest: F.Manifest, vocab: pa.Table, uri: str) -> None:
    want = _template_fingerprint(manifest)
    for rel in (F.MANIFEST, CAPTURE_SIDECAR):
        if not loc.exists(rel):
            continue
        d = json.loads(loc.read_bytes(rel))
        old = F.Manifest.from_json(json.dumps(d["template"] if rel == CAPTURE_SIDECAR else d), source=f"{uri}/{rel}")
        diff = _differences(_template_fingerprint(old), want)
        if any(d.startswith("index.coding: 'sorted_delta'") for d in diff):
            diff.append("(a store written with ids as they are, e.g. before format v2: resume it with --index-order id)")
        if diff:
            raise StoreFormatError(
                f"{uri}: cannot resume: this run differs from the one that wrote the store in {'; '.join(diff)}. "
                f"Resume with the same input and options, or write a new --output (or --overwrite); adding input "
                f"to a store is a separate step, not --resume"
            )
    if loc.exists(F.VOCAB):
        old_vocab = pq.read_table(loc.join(F.VOCAB), filesystem=loc.fs)
        if not old_vocab.column("hash").equals(vocab.column("hash")):
            raise StoreFormatError(f"{uri}: cannot resume: the store's vocabulary is from another tokenizer")


QUARANTINE_DIR = "quarantine"


def scan_shards(loc: Location, manifest: F.Manifest) -> ResumeState:
    """The finished shards of an existing store that a resumed capture keeps.

    A shard is kept only if its bytes match the record written when it was closed: its
    entry in the manifest, or its ``_shard_records/`` record (a crashed run). A shard
    without a record (its writer died before closing it) is removed; a shard whose size
    or checksum differs from its record (corrupted since) is moved to ``quarantine/``.
    Either way its windows are not in the kept set, so the resumed run computes them again.
    """
    from kdstore.writer import read_shard_record  # noqa: PLC0415

    listed: dict[str, F.ShardInfo] = {}
    if loc.exists(F.MANIFEST):
        old = F.Manifest.from_json(loc.read_bytes(F.MANIFEST).decode(), source=f"{loc.uri}/{F.MANIFEST}")
        listed = {s.file: s for s in old.shards}
    schema = F.arrow_schema(manifest)
    state = ResumeState()
    for rel in loc.list(F.SHARD_DIR):
        if not rel.endswith(".parquet"):
            continue
        rec = read_shard_record(loc, rel)
        info = listed.get(rel) or (F.ShardInfo(**{k: rec[k] for k in F.ShardInfo.__dataclass_fields__}) if rec else None)
        if info is None:
            _LOG.warning("resume: removing %s: it was never closed (no record)", rel)
            loc.fs.delete_file(loc.join(rel))
            state.removed.append(rel)
            continue
        size = loc.size(rel)
        checksum = None
        if size == info.bytes:
            with loc.fs.open_input_stream(loc.join(rel)) as f:
                checksum = file_checksum(f)
        if checksum != info.checksum:
            dest = f"{QUARANTINE_DIR}/{rel.rpartition('/')[2]}"
            _LOG.warning("resume: %s does not match the checksum recorded when it was written (%s bytes, recorded %s); "
                         "moved to %s, its samples are redone", rel, size, info.bytes, dest)
            loc.makedirs(QUARANTINE_DIR)
            loc.fs.move(loc.join(rel), loc.join(dest))
            state.quarantined.append(dest)
            continue
        if pq.read_schema(loc.join(rel), filesystem=loc.fs).remove_metadata() != schema.remove_metadata():
            raise StoreFormatError(f"{loc.uri}/{rel}: shard schema does not match this capture's options; cannot resume")
        state.shards.append(info)
        state.rows += info.rows
        if rec is not None and "samples" in rec:
            state.samples += int(rec["samples"])
        else:
            table = pq.read_table(loc.join(rel), columns=["window"], filesystem=loc.fs)
            state.samples += int((table.column("window").to_numpy() == 0).sum())
    return state


def stored_window_keys(uri: str, shard_files: list[str]) -> np.ndarray:
    """Sorted uint64 keys of the ``(sample_id, window)`` pairs stored in ``shard_files``."""
    loc = resolve(uri)
    parts = [np.zeros(0, dtype=np.uint64)]
    for rel in shard_files:
        t = pq.read_table(loc.join(rel), columns=["sample_id", "window"], filesystem=loc.fs)
        parts.append(window_keys(t.column("sample_id").to_pylist(), t.column("window").to_numpy().tolist()))
    return np.sort(np.concatenate(parts))


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


# -- finalize --------------------------------------------------------------------------------------
class ErrorRateExceeded(RuntimeError):
    """Too many dead letters: the manifest is not written."""


def finalize_store(
    uri: str,
    manifest: F.Manifest,
    *,
    vocab_entry: dict,
    resume: ResumeState,
    new_shards: list[F.ShardInfo],
    new_samples: int,
    error_files: list[dict[str, Any]],
    input_records: int,
    duplicates: int,
    max_error_rate: float,
    blank_lines: int = 0,
    lease_token: str | None = None,
) -> F.Manifest:
    """Check the dead-letter rate, write the manifest (last), then remove unlisted files.

    ``error_files``: per written file ``{"file": rel, "count": n, "reasons": {kind: n},
    "inference_samples": [ids], "other": n}``. The error rate is failed samples / input
    records, where a sample with several failed windows counts once.
    Dead letters are recomputed over the whole input by every run (rejected samples are
    never stored, so a resumed run meets them again); files of earlier runs are replaced.
    ``blank_lines`` (skipped, not errors) are neither. ``lease_token``: the manifest is
    written only while the store's writer lease still carries it (fencing, see
    :mod:`kdstore.lease`).
    """
    from kdstore.lease import check_lease  # noqa: PLC0415
    from kdstore.writer import finalize  # noqa: PLC0415

    loc = resolve(uri)
    dead = sum(e["count"] for e in error_files)
    failed = sum(e.get("other", e["count"]) for e in error_files)
    failed += len(set().union(*(e.get("inference_samples", []) for e in error_files)))
    total_in = input_records - blank_lines
    rate = failed / total_in if total_in else 0.0
    if rate > max_error_rate:
        reasons: dict[str, int] = {}
        for e in error_files:
            for r, n in e.get("reasons", {}).items():
                reasons[r] = reasons.get(r, 0) + n
        top = ", ".join(f"{r!r} x{n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5])
        raise ErrorRateExceeded(
            f"{failed} of {total_in} input samples ({rate:.2%}) went to dead letters, above --max-error-rate "
            f"{max_error_rate:g}; no manifest was written. Most common reasons: {top}. Records are in "
            f"{uri}/{F.ERROR_DIR}/. Fix the input (or raise --max-error-rate) and re-run with --resume."
        )
    shards = list(resume.shards) + list(new_shards)
    files = [e["file"] for e in error_files if e.get("file")]
    check_lease(uri, lease_token)
    m = finalize(
        loc, manifest, shards=shards, vocab=vocab_entry, error_files=files, dead_letters=dead,
        extra_totals={
            "samples": resume.samples + new_samples, "input_records": input_records, "duplicates": duplicates,
            "failed_samples": failed, "blank_lines": blank_lines,
            "resumed_rows": resume.rows, "quarantined_shards": len(resume.quarantined),
        },
    )
    keep = {s.file for s in shards} | set(files)
    for rel in loc.list(F.SHARD_DIR) + loc.list(F.ERROR_DIR):
        if rel not in keep and (rel.endswith(".parquet") or rel.endswith(".jsonl")):
            loc.fs.delete_file(loc.join(rel))
    if loc.exists(CAPTURE_SIDECAR):
        loc.fs.delete_file(loc.join(CAPTURE_SIDECAR))
    return m


def read_vocab(uri: str) -> pa.Table:
    """The store's ``vocab.parquet`` (the driver wrote it before the pipeline started)."""
    loc = resolve(uri)
    return pq.read_table(loc.join(F.VOCAB), filesystem=loc.fs)


def read_index_order(uri: str, manifest: F.Manifest) -> np.ndarray | None:
    """The ``[V]`` id of each rank the driver wrote for a ``rank_delta`` store (else None),
    checked against the template's checksum: a worker must encode with the driver's order."""
    if manifest.index_order is None:
        return None
    from kdstore.encode import decode_index_order  # noqa: PLC0415

    return decode_index_order(resolve(uri).read_bytes(F.INDEX_ORDER), manifest.index_order, manifest.teacher.vocab_size,
                              where=f"{uri}/{F.INDEX_ORDER}", error=StoreFormatError,
                              mismatch="not the index order this capture's driver wrote; another run is writing this "
                                       "store? Re-run the capture")
