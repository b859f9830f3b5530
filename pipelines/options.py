"""Capture configuration: one flat dataclass, built from ``kd cache`` flags.

Flags that are not ``kd cache`` flags must be real Beam pipeline options (``--runner``,
``--project``, ``--temp_location``, ``--direct_num_workers``...), which pass through
untouched; anything else (a typo such as ``--temprature``) is an error naming the closest
flag, instead of a Beam warning and a run with the defaults.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any

from kdstore.textio import FORMATS, ReaderSpec
from kdstore.format import Selection
from pipelines.inference import BatchSpec
from pipelines.teachers import KINDS, TeacherSpec
from pipelines.windows import OVERFLOW, WindowSpec

INDEX_ORDERS = ("frequency", "id")


@dataclass
class CaptureConfig:
    """Everything a capture needs besides Beam's own options (see ``kd cache --help``)."""

    teacher: str
    input: list[str]
    output: str
    teacher_kind: str = "auto"
    input_format: str = "auto"
    text_field: str = "text"
    id_field: str | None = None
    label_field: str | None = None
    sample_id_field: str | None = None
    level: str = "auto"
    select: str = "topk"
    k: int | None = None
    p: float = 0.95
    max_k: int = 64
    samples: int = 50
    temperature: float = 1.0
    seed: int = 0
    quant_bits: int = 8
    prob_code: str = "sqrt"
    index_order: str = "frequency"
    max_length: int | None = None  # None: the teacher's context length (resolved by the capture's plan)
    stride: int | None = None
    overflow: str | None = None
    store_text: bool = True
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    threads: int | None = None
    batch_tokens: int = 16384
    micro_batch_tokens: int = 4096
    pad_multiple: int = 32
    large_model: bool | None = None  # None: shared across processes unless the runner is in-process
    model_copies: int | None = None
    dedupe: bool = True
    resume: bool = False
    overwrite: bool = False
    break_lock: bool = False
    max_error_rate: float = 0.01
    row_group_rows: int = 1024
    shard_bytes: int = 128 << 20
    shard_seconds: float = 300.0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    # -- derived --------------------------------------------------------------------------
    def reader_spec(self, num_classes: int | None = None) -> ReaderSpec:
        """``num_classes``: labels outside ``[0, num_classes)`` become dead letters (sequence level)."""
        return ReaderSpec(format=self.input_format, text_field=self.text_field, id_field=self.id_field,
                          label_field=self.label_field, num_classes=num_classes, sample_id_field=self.sample_id_field)

    def selection(self, *, level: str, num_classes: int | None = None) -> Selection:
        k = self.k
        if self.select == "topk" and k is None:
            k = num_classes if level == "sequence" and num_classes else 32
        sel = Selection(
            mode=self.select, k=k if self.select == "topk" else None,
            p=self.p if self.select == "top_p" else None, max_k=self.max_k if self.select == "top_p" else None,
            samples=self.samples if self.select == "sample" else None, temperature=self.temperature,
            seed=self.seed if self.select == "sample" else None,
        )
        sel.validate()
        return sel

    def window_spec(self, level: str) -> WindowSpec:
        overflow = self.overflow or ("truncate" if level == "sequence" else "window")
        if level == "sequence" and overflow == "window":
            raise ValueError("--overflow window is for token-level capture; a sequence-level teacher sees one input per sample (use truncate or error)")
        return WindowSpec(max_length=self.max_length, stride=self.stride, overflow=overflow, store_text=self.store_text,
                          offsets=self.store_text and level == "token")

    def batch_spec(self) -> BatchSpec:
        return BatchSpec(micro_batch_tokens=self.micro_batch_tokens, pad_multiple=self.pad_multiple)

    def teacher_spec(self, level: str, kind: str = "hf-causal-lm") -> TeacherSpec:
        return TeacherSpec(path=self.teacher, level=level, kind=kind, device=self.device, dtype=self.dtype,
                           trust_remote_code=self.trust_remote_code, threads=self.threads)

    def validate(self) -> None:
        if self.index_order not in INDEX_ORDERS:
            raise ValueError(f"--index-order must be one of {INDEX_ORDERS}, got {self.index_order!r}")
        if self.quant_bits not in (8, 16):
            raise ValueError(f"--quant-bits must be 8 or 16, got {self.quant_bits}")
        if self.level not in ("auto", "token", "sequence"):
            raise ValueError(f"--level must be auto, token or sequence, got {self.level!r}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"--max-error-rate must be in [0, 1], got {self.max_error_rate}")
        if self.max_length is not None and self.batch_tokens < self.max_length:
            raise ValueError(f"--batch-tokens ({self.batch_tokens}) must be >= --max-length ({self.max_length})")
        if self.shard_bytes < 1 or self.shard_seconds <= 0:
            raise ValueError("--shard-bytes and --shard-seconds must be > 0")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")

    def to_manifest(self) -> dict[str, Any]:
        """Options recorded in the manifest's ``pipeline`` entry."""
        d = asdict(self)
        for key in ("extra", "progress", "resume", "overwrite", "break_lock"):
            d.pop(key, None)
        return d


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help with ``(default: X)`` for every flag that has a real default (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser(prog: str = "kd cache") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False, formatter_class=_DefaultsFormatter,
        description="Run a teacher over a corpus with Apache Beam and write a sparse soft-label store. "
        "Other --flags must be Beam pipeline options (e.g. --runner DataflowRunner --project P "
        "--region R --temp_location gs://...). Without --runner it runs locally on all cores.",
    )
    g = ap.add_argument_group("input / output")
    g.add_argument("--teacher", required=True,
                   help="teacher directory (local path or gs://, s3:// URI): a Hugging Face model or a classifier bundle")
    g.add_argument("--teacher-kind", default="auto", choices=("auto", *KINDS),
                   help="auto (from the directory: classifier.json -> classifier-bundle, a *ForSequenceClassification "
                   "config -> hf-sequence-classifier, else hf-causal-lm) or the kind, checked against the files")
    g.add_argument("--input", required=True, action="append", help="file, glob or URI; repeat or comma-separate for several")
    g.add_argument("--output", required=True, help="store directory (local path or URI)")
    g.add_argument("--input-format", default="auto", choices=FORMATS, help="default: by extension (.jsonl, .parquet, else text lines)")
    g.add_argument("--text-field", default="text", help="JSONL key / Parquet column with the text")
    g.add_argument("--id-field", default=None, help="optional source id key/column (part of the sample id)")
    g.add_argument("--label-field", default=None, help="optional integer gold label key/column (sequence level)")
    g.add_argument("--sample-id-field", default=None,
                   help="optional key/column with sample ids written by an earlier step: a record whose id is not the "
                   "content hash of its text is a dead letter")
    g.add_argument("--resume", action="store_true", help="continue an existing (partial) store: skip stored windows")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store at --output")
    g.add_argument("--break-lock", action="store_true",
                   help="take over a store whose writer lease is stale (its holder is gone); a live writer is never displaced")
    g = ap.add_argument_group("selection and quantization")
    g.add_argument("--level", default="auto", choices=("auto", "token", "sequence"),
                   help="token: next-token distributions; sequence: class distribution (default: from the model's architecture)")
    g.add_argument("--select", default="topk", choices=("topk", "top_p", "sample"))
    g.add_argument("--k", type=int, default=None, help="top-k entries (default 32; number of classes at sequence level)")
    g.add_argument("--p", type=float, default=0.95, help="top_p mass threshold")
    g.add_argument("--max-k", type=int, default=64, help="top_p: most entries kept per position")
    g.add_argument("--samples", type=int, default=50, help="sample: draws per position (RS-KD)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sample mode: seed of the per-sample draw streams")
    g.add_argument("--quant-bits", type=int, default=8, choices=(8, 16))
    g.add_argument("--prob-code", default="sqrt", choices=("sqrt", "log"),
                   help="probability code: sqrt (forward-KL optimal, default) or log (bounded relative error)")
    g.add_argument("--index-order", default="frequency", choices=INDEX_ORDERS,
                   help="how kept ids are stored: 'frequency' stores each id's rank by input-token frequency (counted "
                        "over the first 64 MiB of input; ~0.7 B less per kept entry at a 150k vocabulary), 'id' the "
                        "id itself (format v1's coding). Token level only; sequence level always uses 'id'")
    g = ap.add_argument_group("tokenization")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens per window (default: the teacher's context length; larger is refused)")
    g.add_argument("--stride", type=int, default=None, help="window start distance (< max-length gives overlapping context)")
    g.add_argument("--overflow", default=None, choices=OVERFLOW,
                   help="samples longer than --max-length: window (token default), truncate (sequence default) or error (dead letter)")
    g.add_argument("--no-store-text", dest="store_text", action="store_false", help="do not store text and byte offsets")
    g.add_argument("--no-dedupe", dest="dedupe", action="store_false", help="keep exact duplicate samples (same id) instead of storing once")
    g = ap.add_argument_group("model and batching")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32), float32, bfloat16, float16")
    g.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the teacher directory")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads of the model process")
    g.add_argument("--batch-tokens", type=int, default=16384, help="tokens per RunInference batch")
    g.add_argument("--micro-batch-tokens", type=int, default=4096, help="padded tokens per forward pass")
    g.add_argument("--pad-multiple", type=int, default=32, help="windows are padded to a multiple of this")
    g.add_argument("--large-model", dest="large_model", action="store_true", default=None,
                   help="share one model per machine across SDK processes (default unless the runner is in-process)")
    g.add_argument("--no-large-model", dest="large_model", action="store_false", default=None,
                   help="one model per SDK process instead of one shared per machine")
    g.add_argument("--model-copies", type=int, default=None, help="models per machine (e.g. number of GPUs)")
    g = ap.add_argument_group("faults and output")
    g.add_argument("--max-error-rate", type=float, default=0.01, help="fail when dead letters / input samples exceed this")
    g.add_argument("--row-group-rows", type=int, default=1024, help="most rows per Parquet row group")
    g.add_argument("--shard-bytes", type=int, default=128 << 20, help="close a shard file at about this size")
    g.add_argument("--shard-seconds", type=float, default=300.0,
                   help="close a shard at least this often, so a killed capture loses at most this much work")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def parse_args(argv: list[str], prog: str = "kd cache") -> tuple[CaptureConfig, list[str]]:
    """``(config, beam_args)``; raises SystemExit on bad flags (argparse)."""
    ap = build_parser(prog)
    ns, beam_args = ap.parse_known_args(argv)
    check_beam_args(beam_args, prog=prog, own=ap)
    d = vars(ns)
    inputs = [p for item in d.pop("input") for p in item.split(",") if p.strip()]
    cfg = CaptureConfig(input=inputs, **d)
    try:
        cfg.validate()
    except ValueError as exc:
        ap.error(str(exc))
    return cfg, beam_args


def _beam_parser() -> argparse.ArgumentParser:
    """A parser that knows every Beam pipeline option (all ``PipelineOptions`` subclasses)."""
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415

    def subclasses(c):
        for sub in c.__subclasses__():
            yield sub
            yield from subclasses(sub)

    p = argparse.ArgumentParser(allow_abbrev=False, add_help=False, conflict_handler="resolve")
    for cls in sorted(set(subclasses(PipelineOptions)), key=lambda c: c.__name__):
        try:
            cls._add_argparse_args(p)
        except (argparse.ArgumentError, TypeError):  # a third-party options class we cannot introspect
            continue
    return p


def check_beam_args(beam_args: list[str], *, prog: str = "kd cache", own: argparse.ArgumentParser | None = None) -> None:
    """Exit (argparse status 2) if ``beam_args`` holds a flag that is no Beam pipeline option,
    naming the closest ``kd cache`` or Beam flag."""
    import difflib  # noqa: PLC0415

    beam = _beam_parser()
    _, unknown = beam.parse_known_args(beam_args)
    flags = [a for a in unknown if a.startswith("-")]
    if not unknown:
        return
    known = [o for a in (own or build_parser(prog))._actions + beam._actions for o in a.option_strings if o.startswith("--")]
    bad = flags[0].split("=", 1)[0] if flags else unknown[0]
    close = difflib.get_close_matches(bad, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else "; see kd cache --help (Beam options use underscores: --direct_num_workers)"
    what = f"unknown flag {bad}" if flags else f"unexpected argument {bad!r}"
    (own or argparse.ArgumentParser(prog=prog)).error(f"{what}{hint}")
