"""``kd train cascade``: cascade distillation (seed 002) with every stage's soft labels in stores.

Stages (``--stage a|b|c|all``) and what each leaves in the run directory::

    data.step.json  data/{train,validation,test}.jsonl  data/vocab.json  data/rejected.jsonl
    a/model/        model A (default: transformer encoder) trained on (x, y)
    a/store/        A's class distribution for every training sample: a sequence-level store
                    written by ``kd cache`` (pipelines/, teacher kind ``classifier-bundle``)
    a/split/        split.parquet (sample_id, label, pred, score, target) + substandard.jsonl
                    + scores.png: score = A's probability of the gold label ("gold_prob") or
                    1[argmax == gold] ("hit"); score >= threshold -> target, else substandard
    b/model/        model B (default: BiLSTM) trained on the substandard samples only
    b/store/        B's distribution for the substandard samples ("optimized labels")
    c/model/        student C (TextCNN) trained on gold labels + A's target labels + B's
                    optimized labels (targets.parquet: which teacher each sample got)
    summary.json    stage sizes and metrics (also printed as a table)

Each step writes ``<step>.step.json`` last, holding a fingerprint of the configuration keys
(and upstream fingerprints) it depends on. A step whose record matches is skipped, so a run
restarts from its outputs; changing e.g. ``threshold`` redoes the split, B and C but not A.
Asking for a stage whose inputs are missing or stale is an error naming the keys that changed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import xxhash

from kdstore.hashing import sample_id as content_id
from kdstore.textio import Record, dedupe
from trainer.classify import cascade_targets as T
from trainer.classify.cascade_config import CascadeConfig, apply_overrides
from trainer.classify.cascade_summary import format_summary, summarize
from trainer.classify.cascade_train import Encoded, encode_texts, evaluate, plot_scores, throughput
from trainer.classify.classifiers import TextClassifier, build_classifier, count_parameters, pad_batch
from trainer.classify.loop import train_classifier
from trainer.core.config import to_dict
from trainer.core.runlog import RunLog
from trainer.core.runtime import resolve_device
from trainer.classify.segment import SegmentationSampler, Vocab

STAGES = ("a", "b", "c", "all")
__all__ = ["CascadeConfig", "apply_overrides", "run_cascade", "summarize", "format_summary", "teacher_table", "main",
           "StaleStageError", "STAGES"]


# -- run directory bookkeeping ------------------------------------------------------------------
def _fingerprint(payload: dict[str, Any]) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode())


class StaleStageError(RuntimeError):
    """A stage's inputs are missing or were made with another configuration."""


class _Run:
    """Step records (``<step>.step.json``, written last) under the run directory."""

    def __init__(self, cfg: CascadeConfig, *, progress: bool) -> None:
        self.cfg = cfg
        self.root = Path(cfg.run_dir)
        self.progress = progress
        self.fps: dict[str, str] = {}

    def path(self, step: str) -> Path:
        return self.root / step

    def record(self, step: str) -> dict | None:
        p = self.root / f"{step}.step.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None

    def spec(self, step: str, keys: Sequence[str], upstream: Sequence[str], *, inputs: dict | None = None) -> dict[str, Any]:
        spec = {"config": {k: getattr(self.cfg, k) for k in keys}, "upstream": {u: self.fps[u] for u in upstream}}
        if inputs:
            spec["inputs"] = inputs  # content fingerprints of external inputs (data files)
        self.fps[step] = _fingerprint(spec)
        return spec

    def done(self, step: str) -> bool:
        rec = self.record(step)
        return rec is not None and rec.get("fingerprint") == self.fps[step]

    def require(self, step: str, spec: dict[str, Any], stage: str) -> dict:
        rec = self.record(step)
        if rec is None:
            raise StaleStageError(f"{self.root}: step {step!r} has not run; run 'kd train cascade --stage {stage}' (or all) first")
        if rec.get("fingerprint") != self.fps[step]:
            changed = sorted(k for k in spec["config"] if rec.get("config", {}).get(k) != spec["config"][k])
            changed += sorted(f"upstream {u}" for u in spec["upstream"] if rec.get("upstream", {}).get(u) != spec["upstream"][u])
            changed += sorted(f"input {k}" for k in spec.get("inputs", {}) if rec.get("inputs", {}).get(k) != spec["inputs"][k])
            raise StaleStageError(
                f"{self.root}: step {step!r} was made with another configuration (changed: {', '.join(changed) or 'code version'}); "
                f"re-run 'kd train cascade --stage {stage}' (or all) with these settings"
            )
        return rec

    def write(self, step: str, spec: dict[str, Any], metrics: dict[str, Any]) -> dict:
        rec = {"step": step, "fingerprint": self.fps[step], **spec, "metrics": metrics,
               "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        p = self.root / f"{step}.step.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2, ensure_ascii=False), encoding="utf-8")
        tmp.replace(p)
        return rec

    def reset(self, step: str) -> Path:
        """Remove a step's record and outputs before redoing it."""
        (self.root / f"{step}.step.json").unlink(missing_ok=True)
        out = self.root / step
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        return out


# -- data -----------------------------------------------------------------------------------------
@dataclass
class CascadeData:
    """Unique training samples (by content id) and held-out sets, encoded with one vocabulary."""

    train: list[dict]  # {"sample_id", "text", "label"}
    validation: list[dict]
    test: list[dict]
    label_names: list[str]
    vocab: Vocab

    def encode(self, rows: list[dict], cfg: CascadeConfig) -> Encoded:
        return encode_texts([r["text"] for r in rows], [r["label"] for r in rows], [r["sample_id"] for r in rows],
                            vocab=self.vocab, segmentation=cfg.segmentation, max_len=cfg.max_len)


def dedupe_by_id(examples: Sequence[Any]) -> tuple[list[dict], int, list[dict]]:
    """Collapse examples with the same content id by the one dedupe rule
    (:func:`kdstore.textio.resolve_duplicates`: identical copies merge; every copy of a text with
    conflicting labels is rejected). Returns (unique rows, merged copies, rejected records)."""
    recs = [Record(text=e.text, sample_id=content_id(e.text), source=f"train:{i + 1}", label=int(e.label)) for i, e in enumerate(examples)]
    kept, dead, merged = dedupe(recs)
    first = {d.sample_id: d for d in reversed(dead)}  # one rejected record per sample id, with its copy count
    copies = Counter(d.sample_id for d in dead)
    rejected = [{"sample_id": sid, "reason": d.reason, "copies": copies[sid], "text": next(r.text for r in recs if r.sample_id == sid)[:200]}
                for sid, d in first.items()]
    return [{"sample_id": r.sample_id, "text": r.text, "label": r.label} for r in kept], merged, rejected


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_DATA_KEYS = ("data", "eval_data", "test_data", "text_field", "label_field", "train_limit", "eval_limit", "test_limit",
              "segmentation", "vocab_min_freq", "vocab_max_size", "max_len")


def _data_step(run: _Run) -> tuple[CascadeData, dict]:
    from trainer.classify.data import load_classification_data  # noqa: PLC0415

    cfg = run.cfg
    src = load_classification_data(cfg.data, eval_source=cfg.eval_data, test_source=cfg.test_data,
                                   text_field=cfg.text_field, label_field=cfg.label_field)
    # The data's content hash is part of the fingerprint: an edited data file redoes everything.
    spec = run.spec("data", _DATA_KEYS, [], inputs={"data": src.fingerprint()})
    d = run.path("data")
    if not run.done("data"):
        out = run.reset("data")
        train_in = list(src.train)
        train, merged, rejected = dedupe_by_id(train_in)
        if 0 < cfg.train_limit < len(train):
            # A fixed subset of unique samples (lowest content ids): independent of the seed.
            dropped = len(train) - cfg.train_limit
            train = sorted(train, key=lambda r: r["sample_id"])[: cfg.train_limit]
        else:
            dropped = 0
        held = {}
        for name, rows, limit in (("validation", src.validation, cfg.eval_limit), ("test", src.test, cfg.test_limit)):
            # A fixed random sample (not a prefix by id, which would bunch duplicated reviews together).
            rows = random.Random(20_000).sample(list(rows), limit) if 0 < limit < len(rows) else rows
            held[name] = [{"sample_id": content_id(e.text), "text": e.text, "label": int(e.label)} for e in rows]
        sampler = SegmentationSampler(granularities=(cfg.segmentation,))
        rng = random.Random(0)  # deterministic granularities ignore it
        vocab = Vocab.build((sampler.segment(r["text"], cfg.segmentation, rng=rng) for r in train),
                            min_freq=cfg.vocab_min_freq, max_size=cfg.vocab_max_size)
        vocab.save(out / "vocab.json")
        _write_jsonl(out / "train.jsonl", train)
        _write_jsonl(out / "validation.jsonl", held["validation"])
        _write_jsonl(out / "test.jsonl", held["test"])
        _write_jsonl(out / "rejected.jsonl", rejected)
        metrics = {
            "source": src.source, "label_names": list(src.label_names), "train_read": len(train_in),
            "train_unique": len(train) + dropped, "train_used": len(train), "train_left_out_by_limit": dropped,
            "train_duplicates_merged": merged, "train_rejected_conflicting": sum(r["copies"] for r in rejected),
            "validation": len(held["validation"]), "test": len(held["test"]), "vocab_size": len(vocab),
        }
        # Nothing lost silently: read == used + left out by the limit + merged copies + rejected copies.
        if metrics["train_read"] != len(train) + dropped + merged + metrics["train_rejected_conflicting"]:
            raise RuntimeError(f"data accounting broke: {metrics}")
        run.write("data", spec, metrics)
    rec = run.record("data")
    data = CascadeData(train=_read_jsonl(d / "train.jsonl"), validation=_read_jsonl(d / "validation.jsonl"),
                       test=_read_jsonl(d / "test.jsonl"), label_names=rec["metrics"]["label_names"],
                       vocab=Vocab.load(d / "vocab.json"))
    return data, rec


# -- model steps ----------------------------------------------------------------------------------
def _device(cfg: CascadeConfig) -> str:
    return str(resolve_device(cfg.device))


def _model_keys(stage: str) -> list[str]:
    keys = [k for k in to_dict(CascadeConfig()) if k.startswith(f"{stage}_") and k != "c_out"]
    return keys + ["seed", "weight_decay", "warmup", "min_delta"]


def _train_and_save(run: _Run, stage: str, step: str, data: CascadeData, train_rows: list[dict],
                    loss_fn_factory: Callable[[Encoded], Callable], *, seed_offset: int, extra: dict | None = None) -> dict:
    cfg, dev = run.cfg, _device(run.cfg)
    out = run.reset(step)
    train = data.encode(train_rows, cfg)
    val, test = data.encode(data.validation, cfg), data.encode(data.test, cfg)
    mcfg = cfg.model_config(stage, vocab_size=len(data.vocab), num_classes=len(data.label_names))
    torch.manual_seed(cfg.seed + seed_offset)
    model = build_classifier(mcfg).to(dev)
    torch.manual_seed(cfg.seed + seed_offset)  # dropout draws independent of the architecture's init
    batch_loss = loss_fn_factory(train)

    def loss_fn(rows: list[int]) -> tuple[torch.Tensor, dict]:
        ids, mask = pad_batch([train.ids[i] for i in rows], pad_id=0)
        return batch_loss(model(ids.to(dev), mask.to(dev)), rows)

    log = RunLog(out / "metrics.jsonl")
    res = train_classifier(model, spec=cfg.loop_spec(stage, seed_offset=seed_offset, device=dev, progress=run.progress),
                           lengths=[len(r) for r in train.ids], loss_fn=loss_fn, log=log,
                           evaluate=(lambda: evaluate(model, val, device=dev)) if len(val) else None)
    params = count_parameters(model)
    metrics = {
        "arch": mcfg.arch, "parameters": params, "train_samples": len(train), "steps": res.steps,
        "best_step": res.best_step, "stopped": res.stopped, "train_seconds": round(res.seconds, 2),
        "validation": evaluate(model, val, device=dev), "test": evaluate(model, test, device=dev),
        "test_samples_per_s": round(throughput(model, test, device=dev), 1), **(extra or {}),
    }
    TextClassifier(model=model.cpu(), config=mcfg, vocab=data.vocab, segmentation=cfg.segmentation, max_len=cfg.max_len,
                   label_names=tuple(data.label_names)).save(out, extra={"num_parameters": params, "stage": stage})
    log.plot(out / "curve.png", train_keys=("loss",), eval_keys=(("loss", "validation CE"), ("acc", "validation accuracy")),
             title=f"stage {stage}: {mcfg.arch}, {len(train)} samples")
    return metrics


def _ce_loss(train: Encoded) -> Callable:
    def loss(logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(logits.float(), train.labels[rows].to(logits.device))
        return ce, {"ce": float(ce.detach())}

    return loss


def _capture_step(run: _Run, step: str, model_step: str, inputs: Path) -> dict:
    """The model's class distribution for every line of ``inputs``: a sequence-level store
    written by ``kd cache`` (the one capture path; teacher kind ``classifier-bundle``)."""
    from pipelines.capture import run as capture_run  # noqa: PLC0415 - the cascade runs a capture on purpose

    cfg, out = run.cfg, run.reset(step)
    argv = ["--teacher", str(run.path(model_step)), "--teacher-kind", "classifier-bundle", "--input", str(inputs),
            "--output", str(out), "--label-field", "label", "--sample-id-field", "sample_id", "--quant-bits", str(cfg.capture_bits),
            "--max-length", str(cfg.max_len), "--batch-tokens", str(cfg.capture_batch_size * cfg.max_len), "--device", _device(cfg),
            "--temperature", str(cfg.capture_temperature), "--no-store-text", "--overwrite", "--no-progress", *(["--k", str(cfg.capture_k)] if cfg.capture_k > 0 else []),
            *cfg.capture_beam_args.split()]  # --k absent: every class
    return {"store": str(out), **capture_run(argv, save_main_session=False)["totals"]}


# -- stages ---------------------------------------------------------------------------------------
_CAPTURE_KEYS = ["capture_k", "capture_bits", "capture_temperature"]


def _step(run: _Run, step: str, keys: Sequence[str], upstream: Sequence[str], *, stage: str, want: bool, force: bool,
          work: Callable[[], dict]) -> None:
    """Run one step unless its record is current; when the stage was not asked for, only check
    that the record is current (the step's outputs are inputs of a later stage)."""
    spec = run.spec(step, keys, upstream)
    if not want:
        run.require(step, spec, stage)
        return
    if run.done(step) and not force:
        print(f"[cascade] {step}: up to date, skipped")
        return
    t0 = time.perf_counter()
    metrics = work()
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    run.write(step, spec, metrics)
    print(f"[cascade] {step}: done in {metrics['seconds']:.1f} s")


def _split_step(run: _Run, data: CascadeData) -> dict:
    cfg = run.cfg
    out = run.reset("a/split")
    targets = T.read_store_targets(str(run.path("a/store")))
    have, want_ids = set(targets.sample_ids), {r["sample_id"] for r in data.train}
    if have != want_ids:
        missing = sorted(want_ids - have)
        raise RuntimeError(f"{run.path('a/store')}: {len(missing)} training samples have no row (first: {missing[:1]}) and "
                           f"{len(have - want_ids)} rows are not training samples; see the store's errors/ and re-run stage a")
    split = T.split_by_threshold(targets, threshold=cfg.threshold, metric=cfg.score)
    split.write(out / "split.parquet")
    sub = set(split.substandard_ids)
    _write_jsonl(out / "substandard.jsonl", [r for r in data.train if r["sample_id"] in sub])
    plot_scores(split.scores, cfg.threshold, out / "scores.png", title=f"A on its {len(split.sample_ids)} training samples")
    return split.counts()


def _stage_a(run: _Run, data: CascadeData, *, want: bool, force: bool, split: bool = True) -> None:
    kw = dict(stage="a", want=want, force=force)
    _step(run, "a/model", _model_keys("a"), ["data"], **kw,
          work=lambda: _train_and_save(run, "a", "a/model", data, data.train, _ce_loss, seed_offset=0))
    _step(run, "a/store", _CAPTURE_KEYS, ["a/model"], **kw,
          work=lambda: _capture_step(run, "a/store", "a/model", run.path("data") / "train.jsonl"))
    if split:
        _step(run, "a/split", ["threshold", "score"], ["a/store"], **kw, work=lambda: _split_step(run, data))


def _stage_b(run: _Run, data: CascadeData, *, want: bool, force: bool) -> None:
    sub_path = run.path("a/split") / "substandard.jsonl"
    skipped = {"skipped": "no substandard samples: A meets the threshold on every training sample", "train_samples": 0}

    def model() -> dict:
        sub = _read_jsonl(sub_path)
        if not sub:
            run.reset("b/model")
            return dict(skipped)
        return _train_and_save(run, "b", "b/model", data, sub, _ce_loss, seed_offset=1)

    def store() -> dict:
        if not _read_jsonl(sub_path):
            run.reset("b/store")
            return dict(skipped)
        m = _capture_step(run, "b/store", "b/model", sub_path)
        # How B's optimized labels relate to the gold labels of the samples A failed on.
        targets = T.read_store_targets(str(run.path("b/store")))
        scores, preds = T.score_targets(targets, metric="gold_prob")
        m["mean_gold_prob"] = float(scores.mean())
        m["teacher_accuracy"] = float((preds == targets.labels.numpy()).mean())
        return m

    kw = dict(stage="b", want=want, force=force)
    _step(run, "b/model", _model_keys("b"), ["a/split"], **kw, work=model)
    _step(run, "b/store", _CAPTURE_KEYS, ["b/model"], **kw, work=store)


def teacher_table(run_dir: str | Path, data_train: Sequence[dict], *, teachers: str, num_classes: int) -> T.TeacherTable:
    """Per-sample teachers of stage C from a run directory's split and stores (by sample id)."""
    root = Path(run_dir)
    a = T.read_store_targets(str(root / "a/store")) if teachers != "gold" else None
    split = T.Split.read(root / "a/split/split.parquet") if teachers == "cascade" else None
    b = T.read_store_targets(str(root / "b/store")) if split is not None and split.substandard_ids else None
    return T.build_teacher_table(sample_ids=[r["sample_id"] for r in data_train], labels=[r["label"] for r in data_train],
                                 num_classes=num_classes, teachers=teachers, split=split, a=a, b=b)


def _stage_c(run: _Run, data: CascadeData, *, force: bool) -> None:
    cfg = run.cfg
    step = f"{cfg.c_out}/model"
    up = {"cascade": ["data", "a/store", "a/split", "b/store"], "a": ["data", "a/store"], "gold": ["data"]}[cfg.c_teachers]

    def work() -> dict:
        table = teacher_table(run.root, data.train, teachers=cfg.c_teachers, num_classes=len(data.label_names))
        # The student is tempered by the stores' capture temperature; the stored targets are not.
        weights = T.LossWeights(gold=cfg.c_w_gold, target=cfg.c_w_target, optimized=cfg.c_w_optimized,
                                temperature=table.temperature)

        def loss_factory(train: Encoded) -> Callable:
            def loss(logits: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, dict]:
                # Teacher rows are looked up by sample id, never by position in the batch.
                src, probs, kept, tail = (t.to(logits.device) for t in table.lookup([train.sample_ids[i] for i in rows]))
                return T.cascade_loss(logits, train.labels[rows].to(logits.device), src, probs, kept, tail, weights=weights)

            return loss

        m = _train_and_save(run, "c", step, data, data.train, loss_factory, seed_offset=2,
                            extra={"teachers": cfg.c_teachers, "teacher_counts": table.counts()})
        table.write(run.path(step) / "targets.parquet")
        return m

    _step(run, step, _model_keys("c"), up, stage="c", want=True, force=force, work=work)


# -- entry points ---------------------------------------------------------------------------------
def run_cascade(cfg: CascadeConfig, *, stage: str = "all", force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run the requested stage(s) (skipping up-to-date steps); returns the summary."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False), encoding="utf-8")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run = _Run(cfg, progress=progress)
    data, _ = _data_step(run)
    cascade = cfg.c_teachers == "cascade"
    if stage in ("a", "all"):
        _stage_a(run, data, want=True, force=force)
    elif stage == "b" or cfg.c_teachers != "gold":
        # Only check that A's outputs are current; a student taught by A alone needs no split.
        _stage_a(run, data, want=False, force=False, split=stage == "b" or cascade)
    if stage == "b" or (stage == "all" and cascade):
        _stage_b(run, data, want=True, force=force)
    elif stage == "c" and cascade:
        _stage_b(run, data, want=False, force=False)
    if stage in ("c", "all"):
        _stage_c(run, data, force=force)
    summary = summarize(root, c_out=cfg.c_out)
    (root / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


def main(argv: list[str] | None = None, prog: str = "kd train cascade") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description="Cascade distillation (seed 002): A on (x, y); A's soft labels cached in a store; "
        "split at a score threshold; B on the substandard samples; TextCNN student C from gold + A + B labels.",
        epilog="Settings are key=value pairs (see --print-config for all keys), e.g. threshold=0.8 a_max_steps=500.",
    )
    ap.add_argument("overrides", nargs="*", help="key=value settings")
    ap.add_argument("--stage", default="all", choices=STAGES, help="run one stage (its inputs must be up to date) or all")
    ap.add_argument("--config", help="JSON file with settings (overrides apply on top)")
    ap.add_argument("--force", action="store_true", help="redo the requested stage(s) even when up to date")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--print-config", action="store_true", help="print the effective config as JSON and exit")
    ns = ap.parse_args(argv)
    try:
        cfg = CascadeConfig()
        if ns.config:
            base = json.loads(Path(ns.config).read_text(encoding="utf-8"))
            cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])
        cfg = apply_overrides(cfg, ns.overrides)
    except (ValueError, OSError) as exc:
        ap.error(str(exc))
    if ns.print_config:
        print(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False))
        return 0
    try:
        summary = run_cascade(cfg, stage=ns.stage, force=ns.force, progress=ns.progress)
    except (StaleStageError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"summary: {Path(cfg.run_dir) / 'summary.json'}")
    return 0
