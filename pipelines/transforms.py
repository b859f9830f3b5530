"""Composite PTransforms of the capture pipeline (stable labels; heavy state in ``setup``).

    files ─ ReadCorpus ─┬─ records ─ Dedupe ─┬─ Tokenize ─┬─ windows ─ TeacherInference ─ WriteShards ─┬─ shard infos ─┐
                        └─ dead ─────────────┴─ dead ─────┴─ dead ─────────────────────────────────────────┴─ WriteDeadLetters ─ FinalizeStore

Dead letters of every stage are flattened into one ``WriteDeadLetters``; ``FinalizeStore``
waits (side inputs) for all shard infos, dead-letter files and counts, then writes the
manifest once.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from typing import Any, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils import shared

from kdstore import format as F
from kdstore.textio import BLANK as BLANK_LINE, DeadLetter, ReaderSpec, Record, iter_file, resolve_duplicates
from kdstore.errors import StoreFormatError
from kdstore.fs import resolve
from pipelines import sinks
from pipelines.model_handler import SoftLabelModelHandler
from pipelines.teachers import EncoderSpec, byte_len_of_id, hash_of_id
from pipelines.windows import WindowSpec, make_windows

_LOG = logging.getLogger(__name__)
NS = "kdstore_capture"
DEAD = "dead"
BLANK = "blank"
WINDOW_STAGES = ("inference", "encode", "sample")  # dead letters of one window, not of a whole sample
_clock = time.monotonic  # shard time bound (a module attribute, so tests can drive it)


def _counter(name: str):
    return Metrics.counter(NS, name)


# -- read ---------------------------------------------------------------------------------------
class _ReadFileDoFn(beam.DoFn):
    def __init__(self, spec: ReaderSpec) -> None:
        self._spec = spec
        self._records = _counter("records_read")
        self._dead = _counter("dead_letters")
        self._blank = _counter("blank_lines")

    def process(self, path: str) -> Iterator[Any]:
        for item in iter_file(path, self._spec):
            if isinstance(item, Record):
                self._records.inc()
                yield item
            elif item.reason == BLANK_LINE:  # blank lines: counted, not errors
                self._blank.inc()
                yield beam.pvalue.TaggedOutput(BLANK, 1)
            else:
                self._dead.inc()
                yield beam.pvalue.TaggedOutput(DEAD, item.to_dict())


class ReadCorpus(beam.PTransform):
    """File paths -> ``Record`` (main), dead-letter dicts (tag ``dead``) and a 1 per blank line (tag ``blank``)."""

    def __init__(self, spec: ReaderSpec) -> None:
        super().__init__()
        self._spec = spec

    def expand(self, files):
        return files | "ReadFiles" >> beam.ParDo(_ReadFileDoFn(self._spec)).with_outputs(DEAD, BLANK, main="records")


# -- dedupe ----------------------------------------------------------------------------------------
def _first_of_group(kv: tuple[str, Any]) -> Iterator[Any]:
    _, group = kv
    group = list(group)
    kept, dead = resolve_duplicates(group)  # the one dedupe rule (kdstore.textio)
    for d in dead:
        yield beam.pvalue.TaggedOutput(DEAD, d.to_dict())
    if kept is not None:
        if len(group) > 1:
            _counter("duplicates").inc(len(group) - 1)
        yield kept


class Dedupe(beam.PTransform):
    """Keep one record per sample id (:func:`kdstore.textio.resolve_duplicates`: exact
    copies merge, copies with conflicting labels become dead letters, tag ``dead``). The
    shuffle also spreads records evenly over workers; without dedupe a Reshuffle does that."""

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self._enabled = enabled

    def expand(self, records):
        if not self._enabled:
            # Same outputs as with dedupe (an empty dead-letter output), so callers need no branch.
            return (records | "Spread" >> beam.Reshuffle()
                    | "Keep" >> beam.FlatMap(lambda r: [r]).with_outputs(DEAD, main="records"))
        return (
            records
            | "KeyById" >> beam.Map(lambda r: (r.sample_id, r))
            | "GroupById" >> beam.GroupByKey()
            | "FirstOfGroup" >> beam.FlatMap(_first_of_group).with_outputs(DEAD, main="records")
        )


# -- tokenize + window -----------------------------------------------------------------------------
class _WindowDoFn(beam.DoFn):
    """Records -> windows (dead letters for empty/over-long); skips windows already stored."""

    BUFFER = 256

    def __init__(self, *, encoder: EncoderSpec, spec: WindowSpec, store_uri: str, resume_shards: list[str]) -> None:
        self._encoder = encoder
        self._spec = spec
        self._store_uri = store_uri
        self._resume_shards = resume_shards
        self._shared = shared.Shared()
        self._windows = _counter("windows")
        self._tokens = _counter("tokens")
        self._skipped = _counter("windows_skipped_resume")
        self._dead = _counter("dead_letters")

    def setup(self) -> None:
        # The teacher's text encoder (for HF teachers the backend tokenizer from its JSON: no
        # transformers import on this worker).
        self._enc = self._encoder.load()
        self._byte_len = byte_len_of_id(sinks.read_vocab(self._store_uri)) if self._spec.offsets else None
        self._done = None
        if self._resume_shards:
            # One copy of the stored keys per process, shared by the DoFn instances of its threads.
            tag = f"{self._store_uri}#{len(self._resume_shards)}#{self._resume_shards[0]}"
            self._done_ref = self._shared.acquire(
                lambda: _Keys(sinks.stored_window_keys(self._store_uri, self._resume_shards)), tag=tag)
            self._done = self._done_ref.keys

    def start_bundle(self) -> None:
        self._buf: list[Record] = []

    def process(self, record: Record) -> Iterator[Any]:
        self._buf.append(record)
        if len(self._buf) >= self.BUFFER:
            yield from self._flush()

    def finish_bundle(self) -> Iterator[Any]:
        for item in self._flush():
            yield GlobalWindows.windowed_value(item) if not isinstance(item, beam.pvalue.TaggedOutput) else \
                beam.pvalue.TaggedOutput(item.tag, GlobalWindows.windowed_value(item.value))

    def _flush(self) -> Iterator[Any]:
        if not self._buf:
            return
        records, self._buf = self._buf, []
        ids, spans = self._enc.encode([r.text for r in records], offsets=self._spec.offsets)
        for rec, rid, sp in zip(records, ids, spans):
            res = make_windows(rec, rid, sp, self._spec, byte_len=self._byte_len)
            if isinstance(res, DeadLetter):
                self._dead.inc()
                yield beam.pvalue.TaggedOutput(DEAD, res.to_dict())
                continue
            if self._done is not None:
                stored = sinks.contains(self._done, sinks.window_keys([w.sample_id for w in res], [w.window for w in res]))
                if stored.any():
                    self._skipped.inc(int(stored.sum()))
                    res = [w for w, s in zip(res, stored) if not s]
                    for w in res:
                        w.siblings = len(res)
            for w in res:
                self._windows.inc()
                self._tokens.inc(len(w.input_ids))
                yield w


class _Keys:
    """Holder of the sorted stored-window keys (``Shared`` needs a weak-referenceable object)."""

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys


class Tokenize(beam.PTransform):
    """Records -> ``Window`` (main) and dead letters (tag ``dead``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._kwargs = kwargs

    def expand(self, records):
        return records | "TokenizeAndWindow" >> beam.ParDo(_WindowDoFn(**self._kwargs)).with_outputs(DEAD, main="windows")


# -- inference -------------------------------------------------------------------------------------
class TeacherInference(beam.PTransform):
    """Windows -> ``(Window, SparseOutput | failure reason)`` through ``RunInference``."""

    def __init__(self, handler: SoftLabelModelHandler) -> None:
        super().__init__()
        self._handler = handler

    def expand(self, windows):
        return windows | "RunInference" >> RunInference(self._handler)


# -- shards ----------------------------------------------------------------------------------------
class _WriteShardsDoFn(beam.DoFn):
    """Stores samples whole, encodes them in large tables (one row group each), writes shards.

    The windows of a sample arrive in one bundle (tokenizing, inference and writing are
    fused); they are held until all ``siblings`` are here, then stored together, or, if one
    failed, all dead-lettered (the failed window with its reason, the others "sample
    dropped"). A shard is closed at about ``shard_bytes`` (row groups are cut by an
    estimate of their encoded size, learnt from the shard so far), at ``shard_seconds``
    after it was opened, and at the end of the bundle; its :class:`ShardInfo` is emitted
    then and its record written (:func:`kdstore.writer.write_shard_record`). A retried
    bundle writes new files; the failed attempt's files are not listed and are removed at
    finalize.
    """

    def __init__(self, *, store_uri: str, manifest_json: str, row_group_rows: int, shard_bytes: int,
                 shard_seconds: float = 300.0) -> None:
        self._uri = store_uri
        self._manifest_json = manifest_json
        self._row_group_rows = row_group_rows
        self._shard_bytes = shard_bytes
        self._shard_seconds = shard_seconds
        self._rows_c = _counter("rows_written")
        self._bytes_c = _counter("bytes_written")
        self._dead = _counter("dead_letters")

    def setup(self) -> None:
        from kdstore.writer import RowEncoder  # noqa: PLC0415

        self._loc = resolve(self._uri)
        self._manifest = F.Manifest.from_json(self._manifest_json)
        self._encoder = RowEncoder(self._manifest, index_order=sinks.read_index_order(self._uri, self._manifest))
        self._hash_of_id = hash_of_id(sinks.read_vocab(self._uri))
        self._prefix = f"part-{uuid.uuid4().hex[:8]}"
        self._ratio = 0.5  # encoded bytes per raw array byte; updated from each written row group
        self._footer = 4096  # bytes a shard's close adds (Parquet footer with the schema); learnt at each close

    def start_bundle(self) -> None:
        self._rows: list = []
        self._raw = 0  # raw array bytes of the buffered rows
        self._writer = None
        self._opened = None
        self._samples = 0
        self._pending: dict[str, list] = {}

    def process(self, item) -> Iterator[Any]:
        window, _ = item
        group = self._pending.setdefault(window.sample_id, [])
        group.append(item)
        if len(group) >= window.siblings:
            del self._pending[window.sample_id]
            yield from self._store_sample(group)
        if self._opened is not None and _clock() - self._opened >= self._shard_seconds:
            yield from self._flush(final=True)  # the time bound: a kill loses at most this much

    def finish_bundle(self) -> Iterator[Any]:
        for sid, group in list(self._pending.items()):
            # Not expected (fused stages deliver a sample's windows in one bundle): store
            # what arrived rather than lose it, and say so.
            _LOG.warning("sample %s: %d of %d windows reached the writer's bundle", sid, len(group), group[0][0].siblings)
            for out in self._store_sample(group):
                yield GlobalWindows.windowed_value(out) if not isinstance(out, beam.pvalue.TaggedOutput) else \
                    beam.pvalue.TaggedOutput(out.tag, GlobalWindows.windowed_value(out.value))
        self._pending = {}
        for info in self._flush(final=True):
            yield GlobalWindows.windowed_value(info)

    def _store_sample(self, group: list) -> Iterator[Any]:
        group.sort(key=lambda wo: wo[0].window)
        rows, failed = [], None
        for window, out in group:
            if isinstance(out, str):
                failed = failed or (window, out, "inference")
                continue
            row = sinks.to_row(window, out, self._hash_of_id, level=self._manifest.level, columns=self._manifest.columns)
            try:
                self._encoder.check_row(row)  # one bad row becomes a dead letter instead of failing the bundle
            except StoreFormatError as exc:
                failed = failed or (window, f"encode error: {exc}", "encode")
                continue
            rows.append(row)
        if failed is not None:
            fw, reason, stage = failed
            for window, out in group:
                own = out if isinstance(out, str) else None
                if window is fw:
                    why, st = reason, stage
                elif own is not None:
                    why, st = own, "inference"
                else:
                    why, st = f"sample dropped: window {fw.window} failed: {reason}", "sample"
                self._dead.inc()
                yield beam.pvalue.TaggedOutput(DEAD, DeadLetter(reason=why, source=window.source, sample_id=window.sample_id,
                                                                stage=st, window=window.window).to_dict())
            return
        if self._opened is None:
            self._opened = _clock()
        self._rows.extend(rows)
        self._raw += sum(_raw_bytes(r) for r in rows)
        room = self._shard_bytes - self._footer - (self._writer.bytes_written if self._writer is not None else 0)
        if len(self._rows) >= self._row_group_rows or self._raw * self._ratio >= room:
            yield from self._flush(final=False)

    def _flush(self, *, final: bool) -> Iterator[dict]:
        from kdstore.writer import ShardWriter, shard_name  # noqa: PLC0415

        if self._rows:
            rows, raw, self._rows, self._raw = self._rows, self._raw, [], 0
            self._samples += sum(1 for r in rows if r.window == 0)
            table = self._encoder.encode(rows)
            if self._writer is None:
                self._writer = ShardWriter(location=self._loc, rel_path=shard_name(self._prefix), manifest=self._manifest)
            before = self._writer.bytes_written
            self._writer.write_table(table)
            if raw:
                self._ratio = max(0.01, (self._writer.bytes_written - before) / raw)
            self._rows_c.inc(table.num_rows)
        if self._writer is not None and (final or self._writer.bytes_written + self._footer >= 0.9 * self._shard_bytes):
            before = self._writer.bytes_written
            info = self._writer.close()
            self._footer = max(0, info.bytes - before)
            self._writer = None
            self._opened = None
            self._bytes_c.inc(info.bytes)
            yield {"shard": info.__dict__, "samples": self._samples}
            self._samples = 0
        elif final:
            self._opened = None

    def teardown(self) -> None:
        if getattr(self, "_writer", None) is not None:
            self._writer.abort()


def _raw_bytes(row) -> int:
    """Array bytes of a row before encoding (what the encoded-size estimate scales)."""
    n = sum(getattr(row, a).nbytes for a in ("tokens", "indices", "probs", "tail", "counts") if getattr(row, a) is not None)
    n += sum(getattr(row, a).nbytes for a in ("byte_start", "byte_end") if getattr(row, a) is not None)
    return n + (len(row.text.encode("utf-8")) if row.text else 0)


class WriteShards(beam.PTransform):
    """``(Window, output)`` -> shard info dicts (main) and inference dead letters (tag ``dead``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._kwargs = kwargs

    def expand(self, results):
        return results | "EncodeAndWrite" >> beam.ParDo(_WriteShardsDoFn(**self._kwargs)).with_outputs(DEAD, main="shards")


# -- dead letters ----------------------------------------------------------------------------------
class _WriteDeadLettersDoFn(beam.DoFn):
    def __init__(self, store_uri: str) -> None:
        self._uri = store_uri

    def setup(self) -> None:
        self._loc = resolve(self._uri)

    def start_bundle(self) -> None:
        self._buf: list[dict] = []

    def process(self, record: dict) -> None:
        self._buf.append(record)

    def finish_bundle(self) -> Iterator[Any]:
        from kdstore.writer import write_dead_letters  # noqa: PLC0415

        if not self._buf:
            return
        records = sorted(self._buf, key=lambda r: (r.get("source", ""), r.get("window", 0)))
        self._buf = []
        rel = write_dead_letters(self._loc, records, name=f"errors-{uuid.uuid4().hex[:16]}")
        reasons = Counter(_reason_kind(r["reason"]) for r in records)
        # Inference/encode failures are per window: the error rate counts each failed sample once.
        per_window = [r.get("stage") in WINDOW_STAGES for r in records]
        inference = sorted({r["sample_id"] for r, w in zip(records, per_window) if w})
        yield GlobalWindows.windowed_value({
            "file": rel, "count": len(records), "reasons": dict(reasons), "inference_samples": inference,
            "other": len(records) - sum(per_window),
        })


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: the text before the first ':' ("malformed JSON", ...)."""
    return reason.split(":", 1)[0]


class WriteDeadLetters(beam.PTransform):
    """Dead-letter dicts -> ``errors/*.jsonl`` files, one per bundle; emits file infos."""

    def __init__(self, store_uri: str) -> None:
        super().__init__()
        self._uri = store_uri

    def expand(self, dead):
        return dead | "WriteErrorFiles" >> beam.ParDo(_WriteDeadLettersDoFn(self._uri))


# -- finalize --------------------------------------------------------------------------------------
class _FinalizeDoFn(beam.DoFn):
    def __init__(self, *, store_uri: str, manifest_json: str, vocab_entry: dict, resume: dict, max_error_rate: float,
                 lease_token: str | None = None) -> None:
        self._uri = store_uri
        self._manifest_json = manifest_json
        self._vocab_entry = vocab_entry
        self._resume = resume
        self._max_error_rate = max_error_rate
        self._lease_token = lease_token

    def process(self, _, shards: list[dict], errors: list[dict], n_read: int, n_read_dead: int, n_unique: int,
                n_dedupe_dead: int, n_blank: int = 0) -> Iterator[dict]:
        manifest = F.Manifest.from_json(self._manifest_json)
        m = sinks.finalize_store(
            self._uri, manifest, vocab_entry=self._vocab_entry, resume=sinks.ResumeState.from_json(self._resume),
            new_shards=[F.ShardInfo(**s["shard"]) for s in shards], new_samples=sum(s["samples"] for s in shards),
            # Records either survive dedupe, merge into a kept copy, or are dead letters (conflicting labels);
            # blank lines are counted input but neither.
            error_files=errors, input_records=n_read + n_read_dead + n_blank, duplicates=n_read - n_unique - n_dedupe_dead,
            max_error_rate=self._max_error_rate, blank_lines=n_blank, lease_token=self._lease_token,
        )
        yield m.totals


class FinalizeStore(beam.PTransform):
    """Collects everything and writes the manifest once (after all shards are written)."""

    def __init__(self, *, shards, errors, records, read_dead, unique, dedupe_dead, blank, **kwargs: Any) -> None:
        super().__init__()
        self._pcolls = (shards, errors, records, read_dead, unique, dedupe_dead, blank)
        self._kwargs = kwargs

    def expand(self, pbegin):
        shards, errors, records, read_dead, unique, dedupe_dead, blank = self._pcolls
        all_shards = shards | "CollectShards" >> beam.combiners.ToList()
        all_errors = errors | "CollectErrorFiles" >> beam.combiners.ToList()
        n_read = records | "CountRecords" >> beam.combiners.Count.Globally()
        n_dead = read_dead | "CountReadDeadLetters" >> beam.combiners.Count.Globally()
        n_unique = unique | "CountUnique" >> beam.combiners.Count.Globally()
        n_dedupe_dead = dedupe_dead | "CountDedupeDeadLetters" >> beam.combiners.Count.Globally()
        n_blank = blank | "CountBlankLines" >> beam.combiners.Count.Globally()
        return (
            pbegin
            | "Trigger" >> beam.Create([None])
            | "WriteManifest" >> beam.ParDo(
                _FinalizeDoFn(**self._kwargs), beam.pvalue.AsSingleton(all_shards), beam.pvalue.AsSingleton(all_errors),
                beam.pvalue.AsSingleton(n_read), beam.pvalue.AsSingleton(n_dead), beam.pvalue.AsSingleton(n_unique),
                beam.pvalue.AsSingleton(n_dedupe_dead),
                beam.pvalue.AsSingleton(n_blank),
            )
        )


def metrics_summary(result) -> dict[str, int]:
    """Counter values of a finished pipeline (committed where supported, else attempted)."""
    out: dict[str, int] = {}
    try:
        res = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NS))
    except Exception:  # noqa: BLE001 - some runners do not report metrics
        return out
    for c in res.get("counters", []):
        v = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.name] = out.get(c.key.metric.name, 0) + int(v or 0)
    return out


