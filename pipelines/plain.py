"""The capture as a plain Python loop (no Beam): the benchmark's baseline, and in-memory teachers.

Two entry points, one loop (:func:`_capture_loop`):

* :func:`capture_plain` runs a ``kd cache`` configuration in one process: the same plan
  (:func:`pipelines.capture.plan_capture`: teacher kinds, manifest, vocabulary), reader
  (:mod:`kdstore.textio`), dedupe (:func:`kdstore.textio.dedupe`), windows
  (:mod:`pipelines.windows`) and :class:`~pipelines.inference.TeacherRunner` as the Beam
  pipeline, so both store identical rows.
* :func:`cache_with_model` captures a list of texts with a Hugging Face causal LM already in
  memory (tests, training benchmarks) into *several* stores from one teacher pass (one
  selection per store: top-k, top-p and sampling from the same logits).

Records are read, deduplicated and windowed in input order; windows are run on the teacher
in batches of ``batch_tokens`` tokens (the runner buckets them by padded length) and written
with :class:`kdstore.writer.StoreWriter`. Single process; torch uses all cores for the forward.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kdstore.errors import StoreFormatError
from kdstore.format import Selection, TeacherInfo
from kdstore.textio import DeadLetter, Record, dedupe, iter_records, parse_text_line
from kdstore.writer import StoreWriter, frequency_order
from pipelines.capture import plan_capture
from pipelines.inference import BatchSpec, TeacherRunner
from pipelines.options import INDEX_ORDERS, CaptureConfig
from pipelines.progress import add_id_counts
from pipelines.sinks import CAPTURE_SIDECAR, to_row
from pipelines.teachers import EncoderSpec, TeacherModel, TeacherSpec, byte_len_of_id, hash_of_id, vocabulary
from pipelines.windows import WindowSpec, make_windows

TOKENIZE_BUFFER = 256  # records tokenized per call (as the pipeline's window DoFn)


def capture_plain(cfg: CaptureConfig) -> dict[str, Any]:
    """Capture ``cfg.input`` into ``cfg.output`` in one process; returns counts and seconds."""
    t0 = time.perf_counter()
    plan = plan_capture(cfg, runner="plain-loop")
    try:
        return _capture(cfg, plan, t0)
    finally:
        plan.lease.release()  # the store's writer lease, taken by plan_capture


def _capture(cfg: CaptureConfig, plan, t0: float) -> dict[str, Any]:
    tmpl = plan.manifest  # same teacher, selection and columns as the pipeline
    runner = TeacherRunner(teacher=plan.teacher_spec(), selection=tmpl.selection, batch=cfg.batch_spec(),
                           pad_id=plan.teacher.pad_id, progress=cfg.progress)
    writer = StoreWriter(
        cfg.output, teacher=tmpl.teacher, selection=tmpl.selection, bits=cfg.quant_bits, level=plan.level,
        columns=tmpl.columns, pipeline=tmpl.pipeline, row_group_rows=cfg.row_group_rows,
        shard_bytes=cfg.shard_bytes, overwrite=True, scheme=cfg.prob_code,
        index_order=plan.index_order, index_order_source=(tmpl.index_order or {}).get("source"),
    )
    writer.write_vocab(plan.teacher.vocab)
    with writer:
        counts = _capture_loop(
            iter_records(cfg.input, plan.reader), encoder=plan.teacher.encoder, spec=cfg.window_spec(plan.level),
            runner=runner, writers=[writer], vocab=plan.teacher.vocab, batch_tokens=cfg.batch_tokens, dedupe_ids=cfg.dedupe,
        )
    if writer.location.exists(CAPTURE_SIDECAR):
        writer.location.fs.delete_file(writer.location.join(CAPTURE_SIDECAR))
    counts["seconds"] = time.perf_counter() - t0
    counts["model_seconds"] = runner.seconds
    return counts


def cache_with_model(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    stores: Mapping[str, Selection],
    *,
    max_length: int = 128,
    batch_size: int = 32,
    bits: int = 8,
    name_or_path: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = 8 << 20,
    progress: bool = False,
    device: str = "cpu",
    store_text: bool = False,
    index_order: str = "frequency",
) -> dict[str, dict[str, Any]]:
    """Capture ``texts`` with an in-memory causal LM into one store per ``{uri: Selection}``.

    ``store_text``: also store each window's text and its tokens' UTF-8 byte offsets (what a
    student with its own tokenizer needs: ``kd train student --tokenizer STUDENT_DIR``).

    ``tokenizer``: the teacher's fast HF tokenizer (its template's special tokens are
    added, as in ``kd cache``); samples longer than ``max_length`` tokens become
    non-overlapping windows; ``batch_size`` windows of ``max_length`` tokens make one teacher
    batch. The stores' vocabulary is :func:`pipelines.teachers.vocabulary` (token bytes
    from :func:`kdstore.tokenizer.vocab_table`, so byte-level BPE ``Ġ`` is a space).
    Returns ``{uri: {"rows", "tokens", "seconds"}}``; ``seconds`` is the shared teacher
    forward time plus that store's own selection and encoding time. ``index_order``: as
    ``kd cache --index-order`` (``frequency``: ids stored by their rank in the counts of
    ``texts``' tokens; ``id``: as they are).
    """
    import torch  # noqa: PLC0415

    model = model.to(torch.device(device)).eval()
    path = name_or_path or str(getattr(model, "name_or_path", "") or "in-memory")
    info = TeacherInfo(
        name_or_path=path, vocab_size=int(model.get_input_embeddings().weight.shape[0]), tokenizer_vocab_size=len(tokenizer),
        architecture=(getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    vocab = vocabulary(tokenizer)
    sels = list(stores.values())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    runner = TeacherRunner(teacher=TeacherSpec(path=path, level="token"), selection=sels[0], pad_id=int(pad),
                           batch=BatchSpec(), model=TeacherModel.of_hf(model), progress=progress)
    encoder = EncoderSpec(kind="tokenizers", source=tokenizer.backend_tokenizer.to_str())
    order, order_source = _text_index_order(encoder, texts, info.vocab_size, index_order)
    writers = [StoreWriter(uri, teacher=info, selection=sel, bits=bits, overwrite=overwrite, shard_bytes=shard_bytes,
                           columns={"text": True, "offsets": True} if store_text else None,
                           pipeline={"tool": "pipelines.plain.cache_with_model", "max_length": max_length},
                           index_order=order, index_order_source=order_source)
               for uri, sel in stores.items()]
    for w in writers:
        w.write_vocab(vocab)
    records = (parse_text_line(t.encode("utf-8"), f"<texts>:{i + 1}") for i, t in enumerate(texts))
    try:
        counts = _capture_loop(
            records, encoder=encoder,
            spec=WindowSpec(max_length=max_length, overflow="window", store_text=store_text, offsets=store_text), runner=runner,
            writers=writers, vocab=vocab, batch_tokens=batch_size * max_length, dedupe_ids=True, selections=sels,
        )
    except BaseException:
        for w in writers:
            w.abort()  # no manifest: readers reject the partial stores
        raise
    for w in writers:
        w.close()
    return {uri: {"rows": counts["windows"], "tokens": counts["tokens"],
                  "seconds": runner.forward_seconds + runner.select_seconds[s] + counts["write_seconds"][s]}
            for s, uri in enumerate(stores)}


def _capture_loop(
    records: Iterable[Record | DeadLetter],
    *,
    encoder: EncoderSpec,
    spec: WindowSpec,
    runner: TeacherRunner,
    writers: list[StoreWriter],
    vocab,
    batch_tokens: int,
    dedupe_ids: bool,
    selections: Sequence[Selection] | None = None,
) -> dict[str, Any]:
    """Read -> dedupe -> window -> teacher -> rows, one selection per writer (default: the
    runner's). Dead letters go to every writer; returns counts."""
    selections = list(selections or [runner.selection])
    level = writers[0].level
    h_of_id, blen = hash_of_id(vocab), byte_len_of_id(vocab)
    enc = encoder.load()
    counts: dict[str, Any] = {"input_records": 0, "duplicates": 0, "windows": 0, "tokens": 0,
                              "write_seconds": [0.0] * len(writers)}

    def dead_letter(d: DeadLetter) -> None:
        for w in writers:
            w.dead_letter(**d.to_dict())

    good: list[Record] = []
    for item in records:
        counts["input_records"] += 1
        if isinstance(item, DeadLetter):
            dead_letter(item)
        else:
            good.append(item)
    if dedupe_ids:  # the one dedupe rule; a label conflict is only known once every copy is read
        good, dead, counts["duplicates"] = dedupe(good)
        for d in dead:
            dead_letter(d)

    pending: list = []

    def run_batch() -> None:
        outs = runner.infer_many([w.input_ids for w in pending], [w.key for w in pending], selections)
        for s, writer in enumerate(writers):
            t0 = time.perf_counter()
            for win, out in zip(pending, outs[s]):
                if isinstance(out, str):
                    writer.dead_letter(reason=out, sample_id=win.sample_id, source=win.source, stage="inference",
                                       window=win.window)
                    continue
                row = to_row(win, out, h_of_id, level=level, columns=writer.manifest.columns)
                try:
                    writer.encoder.check_row(row)
                except StoreFormatError as exc:
                    writer.dead_letter(reason=f"encode error: {exc}", sample_id=win.sample_id, source=win.source,
                                       stage="encode", window=win.window)
                    continue
                writer.write([row])
            counts["write_seconds"][s] += time.perf_counter() - t0
        pending.clear()

    pending_tokens = 0
    for b0 in range(0, len(good), TOKENIZE_BUFFER):
        buf = good[b0 : b0 + TOKENIZE_BUFFER]
        ids, spans = enc.encode([r.text for r in buf], offsets=spec.offsets)
        for rec, rid, sp in zip(buf, ids, spans):
            res = make_windows(rec, rid, sp, spec, byte_len=blen)
            if isinstance(res, DeadLetter):
                dead_letter(res)
                continue
            for w in res:
                if pending_tokens + len(w) > batch_tokens:
                    run_batch()
                    pending_tokens = 0
                pending.append(w)
                pending_tokens += len(w)
                counts["windows"] += 1
                counts["tokens"] += len(w)
    if pending:
        run_batch()
    return counts


def _text_index_order(encoder: EncoderSpec, texts: Sequence[str], vocab_size: int, how: str):
    """``(order, source)`` for :class:`StoreWriter` from the token counts of ``texts``."""
    if how not in INDEX_ORDERS:
        raise ValueError(f"index_order must be one of {INDEX_ORDERS}, got {how!r}")
    if how == "id":
        return None, None
    enc, counts, tokens = encoder.load(), np.zeros(vocab_size, np.int64), 0
    texts = list(dict.fromkeys(texts))  # each stored sample once, as the capture stores it (and kd cache counts it)
    for s in range(0, len(texts), 1024):
        counts, n = add_id_counts(counts, enc.encode(list(texts[s:s + 1024]), offsets=False)[0])
        tokens += n
    return frequency_order(counts[:vocab_size], vocab_size), {"counts": "input token ids", "tokens": tokens,
                                                 "chars": sum(len(t) for t in texts)}


def store_bytes_per_token(uri: str | Path) -> float:
    """Shard bytes per stored position (zstd Parquet, as written)."""
    import kdstore  # noqa: PLC0415

    m = kdstore.open(str(uri)).manifest
    return m.totals["bytes"] / max(1, m.totals["tokens"])

