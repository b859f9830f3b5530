"""Beam capture of a cascade classifier's predictions into a sequence-level soft-label store.

The ``kd cache`` pipeline reads Hugging Face model directories; the cascade's models are our
own classifier bundles (:class:`trainer.classify.classifiers.TextClassifier`: ``model.pt`` +
``classifier.json`` + ``vocab.json``) with their own segmentation and vocabulary. This module
wraps such a bundle as a Beam ``ModelHandler`` and writes the store with the store's own
writer pieces (:class:`kdstore.writer.RowEncoder`, :class:`~kdstore.writer.ShardWriter`,
:func:`~kdstore.writer.finalize`), so the result is an ordinary store: one row per sample,
``level="sequence"``, class ids as indices, the gold ``label`` column::

    inputs.jsonl ─ ReadInputs ─ ParseRecords ─┬─ records ─ DedupeById ─ Classify (RunInference) ─ WriteShards ─┐
                                              └─ dead letters ─────────────┴──────────────────────────────────┴─ Finalize

Input lines are JSON objects ``{"text": str, "label": int, "sample_id": str (optional)}``; a
given ``sample_id`` must equal :func:`kdstore.hashing.sample_id` of the text (content ids
keep labels from drifting). Malformed lines go to the store's dead-letter area, so
``input lines == rows + dead letters + merged duplicates`` (checked at finalize).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from kdstore import format as F
from kdstore.hashing import file_checksum, sample_id as content_id

_LOG = logging.getLogger(__name__)
NS = "kdstore_cascade_capture"
DEAD = "dead"
#: Length buckets (in characters) for batching: similar lengths share a batch, less padding.
LENGTH_BUCKETS = [16, 32, 64, 128, 256]


def _counter(name: str):
    return Metrics.counter(NS, name)


# -- teacher identity -------------------------------------------------------------------------------
def classifier_teacher(model_dir: str | Path) -> tuple[F.TeacherInfo, dict[str, Any]]:
    """(TeacherInfo, extra) of a classifier bundle. ``vocab_size`` = number of classes (the
    index space of a sequence-level store); hashes are checksums of weights and vocabulary."""
    d = Path(model_dir)
    meta_path = d / "classifier.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{d}: no classifier.json; expected a directory saved by TextClassifier.save")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    cfg, extra = meta["config"], meta.get("extra", {})
    with open(d / "model.pt", "rb") as f:
        weights = file_checksum(f)
    with open(d / "vocab.json", "rb") as f:
        vocab = file_checksum(f)
    n_vocab = len(json.loads((d / "vocab.json").read_text(encoding="utf-8"))["tokens"])
    info = F.TeacherInfo(
        name_or_path=str(d), vocab_size=int(cfg["num_classes"]), weights_hash=weights, tokenizer_hash=vocab,
        tokenizer_vocab_size=n_vocab, architecture=f"kdstore.classifier/{cfg['arch']}",
        num_parameters=extra.get("num_parameters"),
    )
    return info, extra


def _label_vocab_table(label_names: Sequence[str]):
    """Vocabulary of a sequence-level store: class ids with their label names (the stored
    indices are class ids), as ``kd cache`` writes for Hugging Face classifiers."""
    from kdstore.writer import vocab_table  # noqa: PLC0415

    names = [str(x) for x in label_names]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return vocab_table(ids=list(range(len(names))), tokens=names, token_bytes=[x.encode("utf-8") for x in names],
                       special=[False] * len(names))


# -- Beam pieces ------------------------------------------------------------------------------------
class _ParseRecord(beam.DoFn):
    """JSON line -> record dict (main) or dead-letter dict (tag ``dead``)."""

    def __init__(self, source: str, num_classes: int) -> None:
        self._source = source
        self._num_classes = num_classes
        self._ok = _counter("records_read")
        self._bad = _counter("dead_letters")

    def process(self, line: str) -> Iterator[Any]:
        def dead(reason: str, sid: str | None = None):
            self._bad.inc()
            return beam.pvalue.TaggedOutput(DEAD, {"reason": reason, "sample_id": sid, "source": self._source,
                                                  "stage": "parse", "line": line[:200]})

        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            yield dead(f"malformed JSON: {exc.msg}")
            return
        text = rec.get("text") if isinstance(rec, dict) else None
        if not isinstance(text, str) or not text.strip():
            yield dead("empty text: field 'text' must be a non-empty string")
            return
        sid = content_id(text)
        if rec.get("sample_id") not in (None, sid):
            yield dead(f"sample id mismatch: {rec.get('sample_id')!r} is not the content hash {sid} of the text", sid)
            return
        label = rec.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self._num_classes):
            yield dead(f"bad label: {label!r} is not a class id in [0, {self._num_classes})", sid)
            return
        self._ok.inc()
        yield {"sample_id": sid, "text": text, "label": label}


def _first_of_group(kv: tuple[str, Iterable[dict]]) -> Iterator[Any]:
    sid, recs = kv
    recs = list(recs)
    labels = {r["label"] for r in recs}
    if len(labels) > 1:
        for _ in recs:
            yield beam.pvalue.TaggedOutput(DEAD, {"reason": f"conflicting labels: the same text is labelled {sorted(labels, key=str)}",
                                                  "sample_id": sid, "stage": "dedupe"})
        return
    if len(recs) > 1:
        yield beam.pvalue.TaggedOutput("duplicates", len(recs) - 1)
    yield recs[0]


class ClassifierModelHandler(ModelHandler[dict, dict, Any]):
    """``RunInference`` handler for a classifier bundle: ``{"sample_id", "text", "label"}`` ->
    the same dict plus ``indices [K]`` int64 class ids, ``probs [K]`` float32, ``tail`` float.

    Loads :class:`trainer.classify.classifiers.TextClassifier` (weights, vocabulary, segmentation) in
    ``load_model``; inference is length-sorted micro-batches under ``torch.inference_mode``,
    softmax at ``selection.temperature`` and top-k selection with :func:`pipelines.selection.select`.
    """

    def __init__(self, *, model_dir: str, selection: F.Selection, batch_size: int = 256, micro_batch: int = 64,
                 device: str = "cpu") -> None:
        super().__init__(min_batch_size=min(32, batch_size), max_batch_size=batch_size, batch_length_fn=lambda r: len(r["text"]),
                         batch_bucket_boundaries=LENGTH_BUCKETS)
        self._model_dir = model_dir
        self._selection = selection
        self._micro = micro_batch
        self._device = device

    def load_model(self):
        from trainer.classify.classifiers import TextClassifier  # noqa: PLC0415

        clf = TextClassifier.load(self._model_dir)
        clf.model.to(self._device).eval()
        return clf

    def run_inference(self, batch: Sequence[dict], model, inference_args: Optional[dict[str, Any]] = None) -> Iterable[dict]:
        import torch  # noqa: PLC0415

        from pipelines.selection import select  # noqa: PLC0415

        sel = self._selection
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]["text"]))
        out: list[dict | None] = [None] * len(batch)
        with torch.inference_mode():
            for s in range(0, len(order), self._micro):
                idx = order[s : s + self._micro]
                ids, mask = model.encode([batch[i]["text"] for i in idx])
                logits = model.model(ids.to(self._device), mask.to(self._device))
                sp = select(logits.float(), mode="topk", k=sel.k, temperature=sel.temperature).to_numpy()
                for j, i in enumerate(idx):
                    out[i] = {**batch[i], "indices": sp.indices[j].astype(np.int64), "probs": sp.probs[j].astype(np.float32),
                              "tail": float(sp.tail[j])}
        return out  # type: ignore[return-value]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(len(r["text"].encode("utf-8")) for r in batch)

    def get_metrics_namespace(self) -> str:
        return NS


class _WriteShard(beam.DoFn):
    """A batch of predictions -> one Parquet shard (rows sorted by sample id) -> its ShardInfo."""

    def __init__(self, *, store_uri: str, manifest_json: str) -> None:
        self._uri = store_uri
        self._manifest_json = manifest_json
        self._rows = _counter("rows_written")

    def setup(self) -> None:
        from kdstore.fs import resolve  # noqa: PLC0415
        from kdstore.writer import RowEncoder  # noqa: PLC0415

        self._loc = resolve(self._uri)
        self._manifest = F.Manifest.from_json(self._manifest_json)
        self._encoder = RowEncoder(self._manifest)

    def process(self, preds: list[dict]) -> Iterator[dict]:
        from kdstore.writer import ShardWriter, SoftLabelRow, shard_name  # noqa: PLC0415

        rows = [
            SoftLabelRow(sample_id=p["sample_id"], tokens=np.zeros(0, np.uint64), counts=np.array([len(p["indices"])]),
                         indices=p["indices"], probs=p["probs"], tail=np.array([p["tail"]]), label=p["label"])
            for p in sorted(preds, key=lambda p: p["sample_id"])
        ]
        writer = ShardWriter(location=self._loc, rel_path=shard_name(f"part-{uuid.uuid4().hex[:8]}"), manifest=self._manifest)
        writer.write_table(self._encoder.encode(rows))
        info = writer.close()
        self._rows.inc(info.rows)
        yield info.__dict__


class _Finalize(beam.DoFn):
    """Write dead letters, then the manifest (last); check that no input went missing."""

    def __init__(self, *, store_uri: str, manifest_json: str, vocab_entry: dict) -> None:
        self._uri = store_uri
        self._manifest_json = manifest_json
        self._vocab_entry = vocab_entry

    def process(self, _, shards: list[dict], dead: list[dict], n_lines: int, dups: list[int]) -> Iterator[dict]:
        from kdstore.fs import resolve  # noqa: PLC0415
        from kdstore.writer import finalize, write_dead_letters  # noqa: PLC0415

        loc = resolve(self._uri)
        infos = [F.ShardInfo(**s) for s in shards]
        rows, merged = sum(s.rows for s in infos), sum(dups)
        if rows + len(dead) + merged != n_lines:
            raise RuntimeError(f"{self._uri}: {n_lines} input lines but {rows} rows + {len(dead)} dead letters + "
                               f"{merged} merged duplicates; refusing to write a manifest for an inconsistent store")
        err = write_dead_letters(loc, sorted(dead, key=lambda d: (d.get("stage", ""), str(d.get("sample_id")))), name="errors-capture")
        m = finalize(loc, F.Manifest.from_json(self._manifest_json), shards=infos, vocab=self._vocab_entry,
                     error_files=[err] if err else [], dead_letters=len(dead),
                     extra_totals={"samples": rows, "input_records": n_lines, "duplicates": merged})
        yield m.totals


class CaptureClassifier(beam.PTransform):
    """JSON lines -> sequence-level store at ``store_uri`` (emits the manifest totals)."""

    def __init__(self, *, source: str, handler: ClassifierModelHandler, store_uri: str, manifest: F.Manifest,
                 vocab_entry: dict, shard_rows: int = 4096) -> None:
        super().__init__()
        self._source, self._handler, self._uri = source, handler, store_uri
        self._manifest_json = manifest.to_json()
        self._num_classes = manifest.teacher.vocab_size
        self._vocab_entry = vocab_entry
        self._shard_rows = shard_rows

    def expand(self, lines):
        parsed = lines | "ParseRecords" >> beam.ParDo(_ParseRecord(self._source, self._num_classes)).with_outputs(DEAD, main="records")
        unique = (
            parsed.records
            | "KeyById" >> beam.Map(lambda r: (r["sample_id"], r))
            | "GroupById" >> beam.GroupByKey()
            | "DedupeById" >> beam.FlatMap(_first_of_group).with_outputs(DEAD, "duplicates", main="records")
        )
        preds = unique.records | "Classify" >> RunInference(self._handler)
        shards = (
            preds
            | "BatchForShards" >> beam.BatchElements(min_batch_size=self._shard_rows, max_batch_size=self._shard_rows)
            | "WriteShards" >> beam.ParDo(_WriteShard(store_uri=self._uri, manifest_json=self._manifest_json))
        )
        dead = (parsed[DEAD], unique[DEAD]) | "FlattenDead" >> beam.Flatten()
        n_lines = lines | "CountLines" >> beam.combiners.Count.Globally()
        return (
            lines.pipeline
            | "Trigger" >> beam.Create([None])
            | "Finalize" >> beam.ParDo(
                _Finalize(store_uri=self._uri, manifest_json=self._manifest_json, vocab_entry=self._vocab_entry),
                beam.pvalue.AsList(shards), beam.pvalue.AsList(dead), beam.pvalue.AsSingleton(n_lines),
                beam.pvalue.AsList(unique.duplicates),
            )
        )


# -- entry points ----------------------------------------------------------------------------------
def _prepare(model_dir: str, output: str, *, k: int, bits: int, temperature: float, overwrite: bool,
             pipeline_opts: dict[str, Any]) -> tuple[F.Manifest, dict]:
    from kdstore.fs import resolve  # noqa: PLC0415
    from kdstore.writer import new_manifest, write_vocab  # noqa: PLC0415

    teacher, extra = classifier_teacher(model_dir)
    n_cls = teacher.vocab_size
    sel = F.Selection(mode="topk", k=min(k, n_cls) if k > 0 else n_cls, temperature=temperature)
    loc = resolve(output)
    if loc.exists(F.MANIFEST) or loc.exists(F.SHARD_DIR):
        if not overwrite:
            raise FileExistsError(f"{output}: a store (or a partial one) is already here; pass overwrite to replace it")
        if "://" in output and not output.startswith("file://"):
            loc.fs.delete_dir_contents(loc.root)
        else:
            shutil.rmtree(Path(output.removeprefix("file://")))
    loc.makedirs()
    manifest = new_manifest(
        teacher=teacher, selection=sel, bits=bits, level="sequence", columns={"label": True},
        pipeline={"tool": "trainer.classify.cascade_capture", "label_names": extra.get("label_names"),
                  "segmentation": extra.get("segmentation"), "max_len": extra.get("max_len"), **pipeline_opts},
    )
    names = extra.get("label_names") or [str(i) for i in range(n_cls)]
    if len(names) != n_cls:
        raise ValueError(f"{model_dir}: {len(names)} label names for {n_cls} classes in classifier.json")
    vocab_entry = write_vocab(loc, _label_vocab_table(names))
    return manifest, vocab_entry


def capture_classifier(
    *,
    model_dir: str,
    inputs: str,
    output: str,
    k: int = 0,
    bits: int = 16,
    temperature: float = 1.0,
    batch_size: int = 256,
    device: str = "cpu",
    overwrite: bool = False,
    beam_args: Sequence[str] = (),
    test_pipeline: beam.Pipeline | None = None,
) -> dict[str, Any]:
    """Run the classifier bundle at ``model_dir`` over the JSON lines file ``inputs`` and write
    a sequence-level store at ``output``; returns the manifest totals.

    ``k`` = classes kept per sample (0: all, so scores and KD targets are exact); ``bits``:
    probability code width. Without ``--runner`` in ``beam_args`` the pipeline runs on Beam's
    in-process ``FnApiRunner`` (the default DirectRunner would try to download Prism).
    """
    manifest, vocab_entry = _prepare(model_dir, output, k=k, bits=bits, temperature=temperature, overwrite=overwrite,
                                     pipeline_opts={"inputs": inputs, "batch_size": batch_size, "beam_args": list(beam_args)})
    handler = ClassifierModelHandler(model_dir=model_dir, selection=manifest.selection, batch_size=batch_size, device=device)
    opts = PipelineOptions(list(beam_args))
    if test_pipeline is not None:
        p = test_pipeline
    elif any(a.startswith("--runner") for a in beam_args):
        p = beam.Pipeline(options=opts)
    else:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner  # noqa: PLC0415

        p = beam.Pipeline(runner=FnApiRunner(), options=opts)
    with p:
        _ = (
            p
            | "ReadInputs" >> beam.io.ReadFromText(inputs)
            | "Capture" >> CaptureClassifier(source=inputs, handler=handler, store_uri=output, manifest=manifest, vocab_entry=vocab_entry)
        )
    from kdstore.store import open as open_store  # noqa: PLC0415

    return dict(open_store(output).manifest.totals)


def run(argv: list[str] | None = None, save_main_session: bool = True, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Command-line entry: ``python -m trainer.classify.cascade_capture --model-dir D --inputs F --output S [beam options]``."""
    ap = argparse.ArgumentParser(prog="python -m trainer.classify.cascade_capture", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", required=True, help="classifier bundle (TextClassifier.save directory)")
    ap.add_argument("--inputs", required=True, help="JSON lines with text, label (and optional sample_id)")
    ap.add_argument("--output", required=True, help="store directory")
    ap.add_argument("--k", type=int, default=0, help="classes kept per sample (0 = all)")
    ap.add_argument("--quant-bits", type=int, default=16, choices=(8, 16))
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true")
    ns, beam_args = ap.parse_known_args(argv)
    if save_main_session and not any(a.startswith("--save_main_session") for a in beam_args):
        beam_args = [*beam_args, "--save_main_session"]
    return capture_classifier(model_dir=ns.model_dir, inputs=ns.inputs, output=ns.output, k=ns.k, bits=ns.quant_bits,
                              temperature=ns.temperature, batch_size=ns.batch_size, device=ns.device,
                              overwrite=ns.overwrite, beam_args=beam_args, test_pipeline=test_pipeline)


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(), indent=2))
