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

    def to_json(self) -> dict[str, Any]:
        return {"shards": [asdict(s) for s in self.shards], "samples": self.samples, "rows": self.rows}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ResumeState":
        return cls(shards=[F.ShardInfo(**s) for s in d["shards"]], samples=d["samples"], rows=d["rows"])


def _template_fingerprint(m: F.Manifest) -> dict[str, Any]:
    window = {k: m.pipeline.get(k) for k in ("max_length", "stride", "overflow", "level", "input_format",
                                              "text_field", "id_field", "label_field", "dedupe", "store_text")}
    return {
        "teacher": {k: v for k, v in asdict(m.teacher).items() if k not in ("name_or_path", "revision")},
        "selection": asdict(m.selection), "quantization": asdict(m.quantization), "level": m.level,
        "columns": m.columns, "windowing": window,
    }


def prepare_output(uri: str, manifest: F.Manifest, vocab: pa.Table, *, resume: bool, overwrite: bool) -> tuple[Location, ResumeState, dict]:
    """Create/validate the output; write ``vocab.parquet`` and the sidecar; scan for resume.

    Returns ``(location, resume_state, vocab_entry)``. Raises :class:`OutputExistsError` if
    a store exists and neither flag was given, and :class:`StoreFormatError` if a resumed
    store was captured with a different teacher, tokenizer or selection.
    """
    from kdstore.writer import write_vocab  # noqa: PLC0415

    loc = resolve(uri)
    existing = loc.exists(F.MANIFEST) or loc.list(F.SHARD_DIR) or loc.exists(CAPTURE_SIDECAR)
    state = ResumeState()
    if existing and not (resume or overwrite):
        raise OutputExistsError(
            f"{uri}: a store (or a partial one) is already here; pass --resume to continue it or --overwrite to replace it"
        )
    if existing and overwrite:
        for rel in loc.list(F.SHARD_DIR) + loc.list(F.ERROR_DIR) + [F.MANIFEST, F.VOCAB, CAPTURE_SIDECAR]:
            if loc.exists(rel):
                loc.fs.delete_file(loc.join(rel))
    loc.makedirs()
    if existing and resume:
        _check_compatible(loc, manifest, vocab, uri)
        state = scan_shards(loc, manifest)
    loc.write_bytes_atomic(CAPTURE_SIDECAR, json.dumps({"template": json.loads(manifest.to_json())}, indent=1).encode())
    vocab_entry = write_vocab(loc, vocab)
    return loc, state, vocab_entry


def _check_compatible(loc: Location, manifest: F.Manifest, vocab: pa.Table, uri: str) -> None:
    want = _template_fingerprint(manifest)
    for rel in (F.MANIFEST, CAPTURE_SIDECAR):
        if not loc.exists(rel):
            continue
        d = json.loads(loc.read_bytes(rel))
        old = F.Manifest.from_json(json.dumps(d["template"] if rel == CAPTURE_SIDECAR else d), source=f"{uri}/{rel}")
        have = _template_fingerprint(old)
        diff = sorted(k for k in want if want[k] != have[k])
        if diff:
            raise StoreFormatError(
                f"{uri}: cannot resume: the existing store differs in {diff} "
                f"(existing {[have[k] for k in diff]} vs requested {[want[k] for k in diff]}); "
                f"use the same options, or --overwrite / a new --output"
            )
    if loc.exists(F.VOCAB):
        old_vocab = pq.read_table(loc.join(F.VOCAB), filesystem=loc.fs)
        if not old_vocab.column("hash").equals(vocab.column("hash")):
            raise StoreFormatError(f"{uri}: cannot resume: the store's vocabulary is from another tokenizer")


def scan_shards(loc: Location, manifest: F.Manifest) -> ResumeState:
    """Finished shards of an existing store (listed in its manifest or readable orphans).

    Truncated files (a worker died mid-write) are removed; readable shards from a crashed
    run are kept and their infos (rows, tokens, entries, bytes, checksum) recomputed.
    """
    listed: dict[str, F.ShardInfo] = {}
    if loc.exists(F.MANIFEST):
        old = F.Manifest.from_json(loc.read_bytes(F.MANIFEST).decode(), source=f"{loc.uri}/{F.MANIFEST}")
        listed = {s.file: s for s in old.shards}
    schema = F.arrow_schema(manifest)
    state = ResumeState()
    for rel in loc.list(F.SHARD_DIR):
        if not rel.endswith(".parquet"):
            continue
        info = listed.get(rel)
        try:
            table = pq.read_table(loc.join(rel), columns=["window", "tail", "indices"], filesystem=loc.fs)
            file_schema = pq.read_schema(loc.join(rel), filesystem=loc.fs)
        except (OSError, pa.ArrowInvalid) as exc:
            _LOG.warning("resume: removing unreadable shard %s (%s)", rel, exc)
            loc.fs.delete_file(loc.join(rel))
            state.removed.append(rel)
            continue
        if file_schema.remove_metadata() != schema.remove_metadata():
            raise StoreFormatError(f"{loc.uri}/{rel}: shard schema does not match this capture's options; cannot resume")
        if info is None or loc.size(rel) != info.bytes:
            with loc.fs.open_input_stream(loc.join(rel)) as f:
                checksum = file_checksum(f)
            tail = table.column("tail").combine_chunks()
            idx = table.column("indices").combine_chunks()
            info = F.ShardInfo(file=rel, rows=table.num_rows, tokens=len(tail.values), entries=len(idx.values),
                               bytes=loc.size(rel), checksum=checksum)
        state.shards.append(info)
        state.rows += info.rows
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
) -> F.Manifest:
    """Check the dead-letter rate, write the manifest (last), then remove unlisted files.

    ``error_files``: per written file ``{"file": rel, "count": n, "reasons": {kind: n},
    "inference_samples": [ids], "other": n}``. The error rate is failed samples / input
    records, where a sample with several failed windows counts once.
    Dead letters are recomputed over the whole input by every run (rejected samples are
    never stored, so a resumed run meets them again); files of earlier runs are replaced.
    """
    from kdstore.writer import finalize  # noqa: PLC0415

    loc = resolve(uri)
    dead = sum(e["count"] for e in error_files)
    failed = sum(e.get("other", e["count"]) for e in error_files)
    failed += len(set().union(*(e.get("inference_samples", []) for e in error_files)))
    total_in = input_records
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
    m = finalize(
        loc, manifest, shards=shards, vocab=vocab_entry, error_files=files, dead_letters=dead,
        extra_totals={
            "samples": resume.samples + new_samples, "input_records": input_records, "duplicates": duplicates,
            "failed_samples": failed,
            "resumed_rows": resume.rows,
        },
    )
    keep = {s.file for s in shards} | set(files)
    for rel in loc.list(F.SHARD_DIR) + loc.list(F.ERROR_DIR):
        if rel not in keep and (rel.endswith(".parquet") or rel.endswith(".jsonl")):
            loc.fs.delete_file(loc.join(rel))
    if loc.exists(CAPTURE_SIDECAR):
        loc.fs.delete_file(loc.join(CAPTURE_SIDECAR))
    return m
