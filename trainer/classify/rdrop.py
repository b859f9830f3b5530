"""``kd train rdrop``: R-Drop fine-tuning across segmentation granularities (seed 000).

Each training sample is cut into two different token sequences (word / mixed / char, ...; see
:mod:`trainer.classify.segment`) and each sequence goes through the same classifier in training mode, so
every forward pass draws its own dropout mask: two sub-models of one network. The loss is::

    w_ce * 0.5 * (CE(p1, y) + CE(p2, y))
  + w_kl * 0.5 * (KL(p1 || p2) + KL(p2 || p1))
  + w_teacher * T^2 * 0.5 * (KL(t_T || p1_T) + KL(t_T || p2_T))      (optional teacher term)

With ``passes=1`` (and ``w_kl=0``) the same loop is the plain cross-entropy baseline; with one
deterministic granularity (``train_segs=char``) it is the original R-Drop (Liang et al. 2021),
where only the dropout masks differ. The loss is :func:`trainer.core.losses.rdrop_loss`; the
steps run in the classifier loop shared with the cascade (:func:`trainer.classify.loop.train_classifier`).

``kd train rdrop [key=value ...] [--teacher-probs FILE] [--resume RUN_DIR]``; ``--print-config``
lists the keys. Outputs in ``out_dir`` (as ``kd train student``): ``config.json``,
``metrics.jsonl`` (one JSON object per event), ``checkpoints/ckpt-<step>.pt`` (model, optimizer,
scheduler, RNG states and config; ``torch.load(weights_only=True)``), ``model/`` (a
:class:`~trainer.classify.classifiers.TextClassifier` directory), ``result.json`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.core import checkpoint as ckpt_io
from trainer.classify.classifiers import (
    ClassifierArch,
    ClassifierConfig,
    TextClassifier,
    build_classifier,
    classification_metrics,
    count_parameters,
    pad_batch,
    predict_proba_ids,
)
from trainer.classify.data import ClassificationData, Example, load_classification_data, load_teacher_probs_jsonl, take
from trainer.classify.loop import LoopSpec, train_classifier
from trainer.core.config import apply_overrides, format_config, from_dict, to_dict
from trainer.core.runlog import RunLog
from trainer.core.runtime import resolve_device
from trainer.core.losses import RDropLoss, rdrop_loss  # noqa: F401  (RDropLoss: part of this module's API)
from trainer.classify.segment import STOCHASTIC, BPEDropoutSegmenter, SegmentationSampler, Vocab


@dataclass
class RDropConfig(ClassifierArch):
    """Every knob of ``kd train rdrop`` (flat; override with ``key=value``); the model keys come
    from :class:`~trainer.classify.classifiers.ClassifierArch`."""

    # -- data ------------------------------------------------------------------------------
    data: str = "sentiment"  # "sentiment" or a .jsonl / .parquet file of text + label
    eval_data: str = ""  # held-out file; empty: split `data` 80/10/10 by content hash
    test_data: str = ""  # defaults to eval_data
    text_field: str = "text"
    label_field: str = "label"
    words_field: str = ""  # optional gold segmentation (list of strings) in user files
    on_error: str = "raise"  # bad records: "raise", or "skip" (counted, written to rejects.jsonl)
    train_limit: int = 0  # train on a fixed subset of this many examples (0 = all)
    eval_limit: int = 0  # cap validation and test sizes (0 = all)
    # -- segmentation and vocabulary -------------------------------------------------------
    train_segs: str = "word,mixed,char"  # granularities the two views are drawn from
    eval_segs: str = "char"  # deterministic granularities to evaluate on; the first is primary
    p_split: float = 0.5  # mixed: probability of splitting a word into characters
    p_cut: float = 0.3  # random: cut probability per character boundary
    bpe_vocab: int = 8000  # bpe: trained vocabulary size (must exceed the character count)
    bpe_dropout: float = 0.1  # bpe: merge dropout
    min_word_freq: int = 2  # multi-character tokens seen this often get their own id
    max_vocab: int = 60000
    max_len: int = 128  # tokens per view after back-off (also the transformer's positions)
    # -- model: the ClassifierArch fields (arch, d_model, n_layers, n_heads, d_ff, dropout, ...)
    # -- loss ------------------------------------------------------------------------------
    passes: int = 2  # 2 = R-Drop; 1 = single-pass cross-entropy baseline
    w_ce: float = 1.0
    w_kl: float = 1.0
    w_teacher: float = 0.0
    teacher_temperature: float = 1.0
    teacher_probs: str = ""  # JSONL of {"text", "probs"} class soft labels
    # -- optimisation ----------------------------------------------------------------------
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50  # linear warm-up, then linear decay to 0 at `steps`
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    threads: int = 0  # torch intra-op threads (0 = default; 1 is fastest on a busy shared CPU)
    # -- loop ------------------------------------------------------------------------------
    out_dir: str = "runs/rdrop"
    log_every: int = 20
    eval_every: int = 200  # 0 = only at the end
    eval_batch_size: int = 128
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to `steps`
    resume: str = ""  # checkpoint file or run directory to continue from
    progress: bool = True

    def __post_init__(self) -> None:
        if self.passes not in (1, 2):
            raise ValueError(f"passes must be 1 (CE baseline) or 2 (R-Drop), got {self.passes}")
        if self.passes == 1 and self.w_kl:
            raise ValueError("w_kl needs two passes: set passes=2, or w_kl=0 for the CE baseline")
        if min(self.w_ce, self.w_kl, self.w_teacher) < 0:
            raise ValueError("loss weights w_ce, w_kl, w_teacher must be >= 0")
        if self.teacher_probs and not self.w_teacher:
            raise ValueError("teacher_probs is set but w_teacher=0: set w_teacher>0 to use the teacher term")
        if self.w_teacher and not self.teacher_probs:
            raise ValueError("w_teacher>0 needs teacher soft labels: pass --teacher-probs FILE")
        if self.teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, got {self.teacher_temperature}")
        for key in ("steps", "batch_size", "max_len", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not self.train_seg_list() or not self.eval_seg_list():
            raise ValueError("train_segs and eval_segs each need at least one granularity")
        bad = [g for g in self.eval_seg_list() if g in STOCHASTIC]
        if bad:
            raise ValueError(f"eval_segs must be deterministic (char, word, jieba); got {bad}")

    def train_seg_list(self) -> list[str]:
        return [g.strip() for g in self.train_segs.split(",") if g.strip()]

    def eval_seg_list(self) -> list[str]:
        return [g.strip() for g in self.eval_segs.split(",") if g.strip()]


# =========================================================================================
# Set-up helpers
# =========================================================================================
def _build_sampler(cfg: RDropConfig, train: list[Example]) -> SegmentationSampler:
    bpe = None
    if "bpe" in cfg.train_seg_list():
        bpe = BPEDropoutSegmenter.train((ex.text for ex in train), vocab_size=cfg.bpe_vocab, dropout=cfg.bpe_dropout)
    return SegmentationSampler(granularities=cfg.train_seg_list(), p_split=cfg.p_split, p_cut=cfg.p_cut, bpe=bpe)


def _vocab_segmentations(cfg: RDropConfig, train: list[Example], sampler: SegmentationSampler) -> Iterator[tuple[str, ...]]:
    """Deterministic segmentations of the training texts at every granularity in use: chars
    always; words when a word-based granularity is used; undropped BPE for ``bpe``. (``random``
    cuts are not counted: their pieces back off to characters unless they are known words.)"""
    grans = set(cfg.train_seg_list()) | set(cfg.eval_seg_list())
    rng = random.Random(0)
    for ex in train:
        yield tuple(ex.text)
        if grans & {"word", "mixed"}:
            yield sampler.segment(ex.text, "word", rng=rng, words=ex.words)
        if "jieba" in grans:
            yield sampler.segment(ex.text, "jieba", rng=rng)
        if "bpe" in grans and sampler.bpe is not None:
            yield sampler.bpe(ex.text, sample=False)


@dataclass
class _EvalSet:
    """A held-out split encoded once per evaluation granularity."""

    rows: dict[str, list[list[int]]]
    labels: torch.Tensor


def _encode_eval(examples: list[Example], cfg: RDropConfig, sampler: SegmentationSampler, vocab: Vocab) -> _EvalSet:
    rng = random.Random(0)  # eval granularities are deterministic
    rows = {g: [vocab.encode(sampler.segment(ex.text, g, rng=rng, words=ex.words), max_len=cfg.max_len) for ex in examples]
            for g in cfg.eval_seg_list()}
    return _EvalSet(rows=rows, labels=torch.tensor([ex.label for ex in examples]))


def evaluate(model: torch.nn.Module, es: _EvalSet, *, num_classes: int, batch_size: int) -> dict[str, float]:
    """Accuracy / macro-F1 / CE per granularity (``acc_char``, ...), the primary (first) one
    also as ``acc`` / ``f1`` / ``loss``, and ``acc_ens`` / ``f1_ens`` for the mean of the
    granularities' probabilities when there are several."""
    out: dict[str, float] = {}
    all_probs = []
    for k, (g, rows) in enumerate(es.rows.items()):
        probs = predict_proba_ids(model, rows, num_classes=num_classes, batch_size=batch_size)
        m = classification_metrics(probs.argmax(-1), es.labels, num_classes)
        m["loss"] = float(F.nll_loss(probs.clamp_min(1e-12).log(), es.labels))
        out.update({f"{name}_{g}": v for name, v in m.items()})
        if k == 0:
            out.update(m)
        all_probs.append(probs)
    if len(all_probs) > 1:
        m = classification_metrics(torch.stack(all_probs).mean(0).argmax(-1), es.labels, num_classes)
        out.update({f"{name}_ens": v for name, v in m.items()})
    return out


# =========================================================================================
# The loop
# =========================================================================================
@dataclass
class TrainResult:
    out_dir: Path
    validation: dict[str, float]
    test: dict[str, float]
    train_seconds: float  # wall seconds of the training steps (segmentation, forward, backward, update)
    train_cpu_seconds: float  # CPU seconds of the same (steadier than wall time on a shared machine)
    steps: int
    parameters: int
    vocab_size: int
    distinct_pair_rate: float  # share of training pairs whose two views differ


def train(cfg: RDropConfig, *, data: ClassificationData | None = None) -> TrainResult:
    """Train one classifier as ``cfg`` says; ``data`` replaces ``cfg.data`` (benchmarks load the
    data once for many runs). Returns held-out metrics; outputs are written to ``cfg.out_dir``."""
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, data)
    finally:
        torch.set_num_threads(threads_before)  # do not leak the setting into the caller's process


@dataclass
class _Setup:
    """Everything a run needs before its first step: the splits, segmentation, vocabulary,
    encoded held-out sets, the teacher's soft labels and the model."""

    data: ClassificationData
    train_set: list[Example]
    val_set: list[Example]
    sampler: SegmentationSampler
    vocab: Vocab
    val_enc: _EvalSet
    test_enc: _EvalSet
    teacher: Any
    mcfg: ClassifierConfig
    model: torch.nn.Module


def _setup(cfg: RDropConfig, data: ClassificationData | None, out: Path) -> _Setup:
    if data is None:
        data = load_classification_data(cfg.data, eval_source=cfg.eval_data, test_source=cfg.test_data,
                                        text_field=cfg.text_field, label_field=cfg.label_field,
                                        words_field=cfg.words_field, on_error=cfg.on_error)
    if data.rejects:
        print(f"[rdrop] {len(data.rejects)} of {data.read} records rejected (rejects.jsonl); first: {data.rejects[0]}",
              file=sys.stderr)
        (out / "rejects.jsonl").write_text(
            "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in data.rejects), encoding="utf-8")
    train_set = take(data.train, cfg.train_limit)
    val_set, test_set = take(data.validation, cfg.eval_limit), take(data.test, cfg.eval_limit)
    sampler = _build_sampler(cfg, train_set)
    vocab = Vocab.build(_vocab_segmentations(cfg, train_set, sampler), min_freq=cfg.min_word_freq, max_size=cfg.max_vocab)
    vocab.save(out / "vocab.json")
    val_enc, test_enc = (_encode_eval(s, cfg, sampler, vocab) for s in (val_set, test_set))
    teacher = None
    if cfg.teacher_probs:
        # Soft labels keyed by sample id; a store-backed source builds the same TeacherProbs.
        teacher = load_teacher_probs_jsonl(cfg.teacher_probs, num_classes=data.num_classes)
        covered = sum(ex.sample_id in teacher for ex in train_set)
        if covered == 0:
            raise ValueError(f"{cfg.teacher_probs}: none of the {len(train_set)} training texts has teacher probs "
                             f"(is it the teacher file for {cfg.data}?)")
        print(f"[rdrop] teacher soft labels for {covered}/{len(train_set)} training samples", flush=True)
    mcfg = ClassifierConfig.from_dict({**to_dict(cfg), "vocab_size": len(vocab), "num_classes": data.num_classes,
                                       "pad_id": vocab.pad_id})
    model = build_classifier(mcfg).to(resolve_device(cfg.device))
    print(json.dumps({"train": len(train_set), "validation": len(val_set), "test": len(test_set), "vocab": len(vocab),
                      "parameters": count_parameters(model), f"val_coverage_{cfg.eval_seg_list()[0]}": vocab.coverage(
                          sampler.segment(ex.text, cfg.eval_seg_list()[0], rng=random.Random(0), words=ex.words)
                          for ex in val_set[:500])}),
          flush=True)
    return _Setup(data=data, train_set=train_set, val_set=val_set, sampler=sampler, vocab=vocab, val_enc=val_enc,
                  test_enc=test_enc, teacher=teacher, mcfg=mcfg, model=model)


def _batch_loss(cfg: RDropConfig, su: _Setup, rows: list[int], seg_rng: random.Random, stats: dict[str, int]):
    """The R-Drop loss of one batch: views, forward passes, :func:`rdrop_loss` (fp32)."""
    device = resolve_device(cfg.device)
    batch = [su.train_set[i] for i in rows]
    labels = torch.tensor([ex.label for ex in batch], device=device)
    # 1. Views: two different segmentations per sample (one view for the CE baseline).
    if cfg.passes == 2:
        pairs = [su.sampler.sample_pair(ex.text, rng=seg_rng, words=ex.words) for ex in batch]
        views = [[a for a, _ in pairs], [b for _, b in pairs]]
        stats["pairs"] += len(pairs)
        stats["distinct"] += sum(a != b for a, b in pairs)
    else:
        views = [[su.sampler.sample_one(ex.text, rng=seg_rng, words=ex.words) for ex in batch]]
    encoded = [pad_batch([su.vocab.encode(s, max_len=cfg.max_len) for s in v], pad_id=su.vocab.pad_id) for v in views]
    # 2. Forward passes: each call draws fresh dropout masks, i.e. a different sub-model.
    logits = [su.model(ids.to(device), mask.to(device)) for ids, mask in encoded]
    # 3. Loss.
    t_probs = t_mask = None
    if su.teacher is not None:
        t_probs, t_mask = (t.to(device) for t in su.teacher.lookup([ex.sample_id for ex in batch]))
    loss = rdrop_loss(logits[0], logits[1] if len(logits) == 2 else None, labels, w_ce=cfg.w_ce, w_kl=cfg.w_kl,
                      teacher_probs=t_probs, teacher_mask=t_mask, w_teacher=cfg.w_teacher,
                      temperature=cfg.teacher_temperature)
    parts = {"ce": float(loss.ce), "kl": float(loss.kl), "teacher": float(loss.teacher),
             "tokens_per_view": sum(int(m.sum()) for _, m in encoded) / len(batch) / len(views)}
    return loss.total, parts


def _train(cfg: RDropConfig, data: ClassificationData | None) -> TrainResult:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(format_config(cfg), flush=True)  # '*' marks values changed from the defaults
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False), encoding="utf-8")
    su = _setup(cfg, data, out)
    seg_rng = random.Random(cfg.seed + 1)  # segmentation draws, separate from batch order
    stats = {"pairs": 0, "distinct": 0}
    resume = None
    if cfg.resume:
        resume = ckpt_io.load_checkpoint(cfg.resume)
        if resume["model_config"] != to_dict(su.mcfg):
            raise ValueError(f"{resume['path']}: saved for a different model/vocabulary; resume with the run's own config")
        seg_rng.setstate(_as_rng_state(resume["seg_rng"]))
        stats = {k: int(resume["stats"][k]) for k in stats}
        print(f"[rdrop] resumed at step {resume['step']} from {resume['path']}", flush=True)
    num_classes = su.data.num_classes
    spec = LoopSpec(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    warmup_steps=cfg.warmup_steps, grad_clip=cfg.grad_clip, seed=cfg.seed, log_every=cfg.log_every,
                    eval_every=cfg.eval_every, save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints,
                    stop_at=cfg.stop_at, device=str(resolve_device(cfg.device)), progress=cfg.progress, desc="rdrop")
    log = RunLog(out / "metrics.jsonl", resume_step=int(resume["step"]) if resume else None)
    res = train_classifier(
        su.model, spec=spec, lengths=[len(ex.text) for ex in su.train_set],
        loss_fn=lambda rows: _batch_loss(cfg, su, rows, seg_rng, stats),
        evaluate=lambda: evaluate(su.model, su.val_enc, num_classes=num_classes, batch_size=cfg.eval_batch_size),
        log=log, run_dir=out, resume=resume,
        extra_state=lambda: {"config": to_dict(cfg), "model_config": to_dict(su.mcfg), "seg_rng": seg_rng.getstate(),
                             "stats": dict(stats)},
        record_extra=lambda: {"distinct_pairs": stats["distinct"] / max(stats["pairs"], 1)})
    return _finish(cfg, su, res, log, stats, out)


def _finish(cfg: RDropConfig, su: _Setup, res: Any, log: RunLog, stats: dict[str, int], out: Path) -> TrainResult:
    """Held-out test, model directory, ``result.json`` and curves (or a note after ``stop_at``)."""
    n_params = count_parameters(su.model)
    distinct = stats["distinct"] / max(stats["pairs"], 1)
    kw = dict(out_dir=out, validation=res.validation, train_seconds=res.train_seconds,
              train_cpu_seconds=res.train_cpu_seconds, parameters=n_params, vocab_size=len(su.vocab),
              distinct_pair_rate=distinct)
    if res.steps < cfg.steps:
        print(f"[rdrop] stopped at step {res.steps} (stop_at); continue with --resume {out}", flush=True)
        return TrainResult(test={}, steps=res.steps, **kw)
    test_metrics = evaluate(su.model, su.test_enc, num_classes=su.data.num_classes, batch_size=cfg.eval_batch_size)
    log.write({"event": "eval", "split": "test", "step": cfg.steps, **test_metrics})
    result = {"validation": res.validation, "test": test_metrics, "train_seconds": res.train_seconds,
              "train_cpu_seconds": res.train_cpu_seconds, **stats, "steps": cfg.steps, "parameters": n_params,
              "vocab_size": len(su.vocab), "distinct_pair_rate": distinct, "train_examples": len(su.train_set),
              "data": su.data.source, "data_fingerprint": su.data.fingerprint()}
    TextClassifier(model=su.model.cpu(), config=su.mcfg, vocab=su.vocab, segmentation=cfg.eval_seg_list()[0],
                   max_len=cfg.max_len, label_names=su.data.label_names).save(
        out / "model", extra={"train_config": to_dict(cfg), "result": result})
    (out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    log.plot(out / "curves.png", train_keys=("loss", "ce", "kl", "teacher"), train_ylabel="nats / sample",
             eval_keys=(("acc", "validation acc"), ("f1", "validation f1")),
             eval_filter=lambda r: r.get("split") == "validation",
             title=f"{cfg.arch}, passes={cfg.passes}, train_segs={cfg.train_segs}")
    return TrainResult(test=test_metrics, steps=cfg.steps, **kw)


def _as_rng_state(state: Any) -> tuple:
    """``random.Random.getstate()`` comes back from ``torch.load`` with lists for tuples."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


# =========================================================================================
# CLI
# =========================================================================================
def main(argv: list[str] | None = None, prog: str = "kd train rdrop") -> int:
    """``kd train rdrop``: see the module docstring."""
    parser = argparse.ArgumentParser(
        prog=prog, description="R-Drop fine-tuning across segmentation granularities (seed 000).",
        epilog="Any config key can be set as key=value (--print-config lists them).")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--teacher-probs", help='JSONL of {"text", "probs"} class soft labels (sets w_teacher=1 '
                                                "unless given)")
    parser.add_argument("--resume", help="checkpoint file or run directory to continue (its config is reused)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        cfg = RDropConfig()
        if args.resume:
            cfg = apply_overrides(from_dict(RDropConfig, ckpt_io.load_checkpoint(args.resume)["config"]), ["stop_at=0"])
        overrides = list(args.overrides)
        if args.teacher_probs:
            overrides.append(f"teacher_probs={args.teacher_probs}")
            if not any(o.startswith("w_teacher=") for o in overrides) and not cfg.w_teacher:
                overrides.append("w_teacher=1.0")
        if args.resume:
            overrides.append(f"resume={args.resume}")
        cfg = apply_overrides(cfg, overrides)
        if args.print_config:
            print(format_config(cfg))
            return 0
        result = train(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out_dir": str(result.out_dir), "validation": result.validation, "test": result.test,
                      "train_seconds": round(result.train_seconds, 1)}, ensure_ascii=False))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
