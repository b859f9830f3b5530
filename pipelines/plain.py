"""The same capture as a plain Python loop (no Beam): the benchmark's baseline.

Reads with :mod:`kdstore.textio`, windows with :mod:`pipelines.windows`, runs the
same :class:`~pipelines.inference.TeacherRunner` on batches of ``batch_tokens`` tokens in
input order, and writes with :class:`kdstore.writer.StoreWriter`. Single process; torch
uses all cores for the forward pass.
"""

from __future__ import annotations

import time
from typing import Any

from kdstore.textio import DeadLetter, Record, iter_records
from kdstore.errors import StoreFormatError
from kdstore.writer import StoreWriter
from pipelines.capture import plan_capture
from pipelines.inference import TeacherRunner
from pipelines.options import CaptureConfig
from pipelines.sinks import CAPTURE_SIDECAR, to_row
from pipelines.teacher import byte_len_of_id, hash_of_id, load_tokenizer, local_model_dir, vocabulary
from pipelines.windows import backend_tokenizer, make_windows, tokenize_batch


def capture_plain(cfg: CaptureConfig) -> dict[str, Any]:
    """Capture ``cfg.input`` into ``cfg.output`` in one process; returns counts and seconds."""
    t0 = time.perf_counter()
    plan = plan_capture(cfg, runner="plain-loop")
    tmpl = plan.manifest  # same teacher, selection and columns as the pipeline
    hf_tok = load_tokenizer(str(local_model_dir(cfg.teacher)), cfg.trust_remote_code)
    tok = backend_tokenizer(hf_tok)
    vocab = plan.vocab
    tvocab = vocabulary(hf_tok) if plan.level == "token" else vocab
    h_of_id, blen = hash_of_id(tvocab), byte_len_of_id(tvocab)
    runner = TeacherRunner(teacher=cfg.teacher_spec(plan.level), selection=plan.manifest.selection, batch=cfg.batch_spec(),
                           pad_id=plan.pad_id, progress=cfg.progress)
    wspec = cfg.window_spec(plan.level)
    writer = StoreWriter(
        cfg.output, teacher=tmpl.teacher, selection=tmpl.selection, bits=cfg.quant_bits, level=plan.level,
        columns=tmpl.columns, pipeline=tmpl.pipeline, row_group_rows=cfg.row_group_rows,
        shard_bytes=cfg.shard_bytes, overwrite=True, scheme=cfg.prob_code,
    )
    writer.write_vocab(vocab)
    seen: set[str] = set()
    counts = {"input_records": 0, "duplicates": 0, "windows": 0, "tokens": 0}
    pending: list = []
    pending_tokens = 0

    def run_batch() -> None:
        nonlocal pending, pending_tokens
        outs = runner.infer([w.input_ids for w in pending], [w.key for w in pending])
        for w, out in zip(pending, outs):
            if isinstance(out, str):
                writer.dead_letter(reason=out, sample_id=w.sample_id, source=w.source, stage="inference", window=w.window)
            else:
                row = to_row(w, out, h_of_id, level=plan.level, columns=tmpl.columns)
                try:
                    writer.encoder.check_row(row)
                except StoreFormatError as exc:
                    writer.dead_letter(reason=f"encode error: {exc}", sample_id=w.sample_id, source=w.source,
                                       stage="encode", window=w.window)
                    continue
                writer.write([row])
        pending, pending_tokens = [], 0

    buf: list[Record] = []

    def tokenize_buffer() -> None:
        nonlocal pending_tokens
        ids, spans = tokenize_batch(tok, [r.text for r in buf], offsets=wspec.offsets)
        for rec, rid, sp in zip(buf, ids, spans):
            res = make_windows(rec, rid, sp, wspec, byte_len=blen)
            if isinstance(res, DeadLetter):
                writer.dead_letter(**res.to_dict())
                continue
            for w in res:
                if pending_tokens + len(w) > cfg.batch_tokens:
                    run_batch()
                pending.append(w)
                pending_tokens += len(w)
                counts["windows"] += 1
                counts["tokens"] += len(w)
        buf.clear()

    with writer:
        for item in iter_records(cfg.input, cfg.reader_spec()):
            counts["input_records"] += 1
            if isinstance(item, DeadLetter):
                writer.dead_letter(**item.to_dict())
                continue
            if cfg.dedupe and item.sample_id in seen:
                counts["duplicates"] += 1
                continue
            seen.add(item.sample_id)
            buf.append(item)
            if len(buf) >= 256:
                tokenize_buffer()
        tokenize_buffer()
        if pending:
            run_batch()
    if writer.location.exists(CAPTURE_SIDECAR):
        writer.location.fs.delete_file(writer.location.join(CAPTURE_SIDECAR))
    counts["seconds"] = time.perf_counter() - t0
    counts["model_seconds"] = runner.seconds
    return counts
