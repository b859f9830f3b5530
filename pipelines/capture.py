"""``kd cache``: run a teacher over a corpus with Apache Beam and write a soft-label store.

    kd cache --teacher models/teacher --input 'corpus/*.jsonl' --output out/store \\
        --select top_p --p 0.95 --max-k 64 [--runner DataflowRunner --project ... ]
    python -m pipelines.capture --teacher ... --input ... --output ...   # same flags

Without ``--runner`` the pipeline runs locally on Beam's ``FnApiRunner`` and needs no
network (the plain ``DirectRunner`` would first try to download the Prism runner): in one
process for a CPU teacher (torch's threads already use every core for the forward pass),
with one SDK process per core sharing one teacher (``large_model``) for a GPU teacher; see
:func:`pipeline_options`.

Steps (see :mod:`pipelines.transforms`): the driver expands the input globs, opens the
teacher (any kind of :mod:`pipelines.teachers`: HF causal LM, HF sequence classifier, the
project's classifier bundle), builds the manifest template, writes ``vocab.parquet`` and
(on ``--resume``) scans the finished shards; the pipeline reads, de-duplicates, tokenizes
and windows, runs the teacher (``RunInference``), writes shards and dead letters, and one
final step writes the manifest.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, SetupOptions, StandardOptions

from kdstore import format as F
from kdstore.textio import CorpusError, ReaderSpec, expand_inputs
from kdstore.errors import StoreFormatError
from kdstore.lease import StoreLockedError, WriterLease
from kdstore.writer import encode_index_order, frequency_order, new_manifest
from pipelines import sinks
from pipelines.model_handler import SoftLabelModelHandler
from pipelines.options import CaptureConfig, parse_args
from pipelines.progress import survey_input
from pipelines.windows import context_length
from pipelines.teachers import Teacher, TeacherError, TeacherSpec, load_config, open_teacher
from pipelines.transforms import (
    BLANK, DEAD, Dedupe, FinalizeStore, ReadCorpus, TeacherInference, Tokenize, WriteDeadLetters, WriteShards, metrics_summary,
)

_LOG = logging.getLogger(__name__)
LOCAL_RUNNER = "FnApiRunner"


@dataclass
class Plan:
    """What the driver resolved before building the pipeline."""

    config: CaptureConfig
    files: list[str]
    teacher: Teacher
    manifest: F.Manifest
    vocab_entry: dict
    resume: sinks.ResumeState
    reader: ReaderSpec
    lease: Any = None  # kdstore.lease.WriterLease held for the run (release() when it ends)
    token_total: int | None = None  # teacher positions to run (progress bar total)
    token_total_exact: bool = True
    index_order: Any = None  # [V] teacher id of each rank (rank_delta stores), else None

    @property
    def level(self) -> str:
        return self.teacher.level

    def teacher_spec(self) -> TeacherSpec:
        return self.config.teacher_spec(self.level, self.teacher.kind)


def plan_capture(cfg: CaptureConfig, *, runner: str = "", local_mode: str | None = None) -> Plan:
    """Resolve inputs, the teacher (:func:`pipelines.teachers.open_teacher`) and the
    manifest template; prepare the output."""
    files = expand_inputs(cfg.input)
    teacher = open_teacher(cfg.teacher, kind=cfg.teacher_kind, level=cfg.level, trust_remote_code=cfg.trust_remote_code)
    level, info = teacher.level, teacher.info
    _resolve_max_length(cfg, teacher)
    selection = cfg.selection(level=level, num_classes=info.vocab_size if level == "sequence" else None)
    wspec = cfg.window_spec(level)
    columns = {
        "text": cfg.store_text, "offsets": cfg.store_text and level == "token", "label": cfg.label_field is not None,
    }
    pipeline_opts = cfg.to_manifest() | {"level": level, "teacher_kind": teacher.kind, "overflow": wspec.overflow,
                                         "runner": runner or LOCAL_RUNNER, "local_mode": local_mode,
                                         "input_files": len(files), "inputs": sinks.input_fingerprint(files),
                                         **teacher.pipeline}
    reader = cfg.reader_spec(num_classes=info.vocab_size if level == "sequence" else None)
    ranked = cfg.index_order == "frequency" and level == "token"
    survey = None
    if cfg.progress or ranked:
        survey = survey_input(files, reader=reader, encoder=teacher.encoder.load(), spec=wspec, dedupe=cfg.dedupe,
                              count_ids=ranked)
    order = order_file = order_entry = None
    if ranked:
        order = frequency_order(survey.id_counts[: info.vocab_size], info.vocab_size)
        order_file, order_entry = encode_index_order(order, source={
            "counts": "input token ids", "tokens": survey.counted_tokens, "chars": survey.counted_chars})
    manifest = new_manifest(teacher=info, selection=selection, bits=cfg.quant_bits, level=level, columns=columns,
                            pipeline=pipeline_opts, scheme=cfg.prob_code, index_order=order_entry)
    # One writer at a time: the lease is taken before the store is touched (kdstore.lease).
    lease = WriterLease.acquire(cfg.output, command=f"kd cache ({runner or LOCAL_RUNNER})", break_stale=cfg.break_lock)
    try:
        loc, resume, vocab_entry = sinks.prepare_output(cfg.output, manifest, teacher.vocab, resume=cfg.resume,
                                                        overwrite=cfg.overwrite, index_order=order_file)
        total, exact = (None, True)
        if cfg.progress:
            total, exact = max(0, survey.tokens - sum(s.tokens for s in resume.shards)), survey.exact
    except BaseException:
        lease.release()
        raise
    return Plan(config=cfg, files=files, teacher=teacher, manifest=manifest, vocab_entry=vocab_entry, resume=resume,
                reader=reader, lease=lease, token_total=total, token_total_exact=exact, index_order=order)


def _resolve_max_length(cfg: CaptureConfig, teacher: Teacher) -> None:
    """``--max-length``: the teacher's context length by default; longer is refused (the
    model would fail on every long window, or silently attend past what it was trained on)."""
    ctx, key = (None, None)
    if (teacher.model_dir / "config.json").is_file():
        ctx, key = context_length(load_config(str(teacher.model_dir), cfg.trust_remote_code))
    if cfg.max_length is None:
        cfg.max_length = ctx or 512
        cfg.batch_tokens = max(cfg.batch_tokens, cfg.max_length)
    elif ctx is not None and cfg.max_length > ctx:
        raise TeacherError(
            f"--max-length {cfg.max_length} is longer than the teacher's context length {ctx} ({key} in "
            f"{cfg.teacher}/config.json); use --max-length {ctx} or less (longer samples are windowed)"
        )
    try:
        cfg.validate()  # again, now that --max-length is known (--batch-tokens must hold a window)
    except ValueError as exc:
        raise TeacherError(str(exc)) from exc


def build_pipeline(p: beam.Pipeline, plan: Plan) -> Any:
    """Apply the capture transforms to ``p``; returns the manifest-totals PCollection."""
    cfg = plan.config
    manifest_json = plan.manifest.to_json()
    files = p | "ListInputs" >> beam.Create(plan.files)
    read = files | "ReadCorpus" >> ReadCorpus(plan.reader)
    unique = read.records | "Dedupe" >> Dedupe(cfg.dedupe)
    tok = unique.records | "Tokenize" >> Tokenize(
        encoder=plan.teacher.encoder, spec=cfg.window_spec(plan.level), store_uri=cfg.output,
        resume_shards=[s.file for s in plan.resume.shards],
    )
    handler = SoftLabelModelHandler(
        teacher=plan.teacher_spec(), selection=plan.manifest.selection, batch=cfg.batch_spec(),
        batch_tokens=cfg.batch_tokens, pad_id=plan.teacher.pad_id, large_model=bool(cfg.large_model),
        model_copies=cfg.model_copies, progress=cfg.progress, progress_total=plan.token_total,
        progress_exact=plan.token_total_exact,
    )
    results = tok.windows | "TeacherInference" >> TeacherInference(handler)
    written = results | "WriteShards" >> WriteShards(
        store_uri=cfg.output, manifest_json=manifest_json, row_group_rows=cfg.row_group_rows, shard_bytes=cfg.shard_bytes,
        shard_seconds=cfg.shard_seconds,
    )
    dead = (read[DEAD], unique[DEAD], tok[DEAD], written[DEAD]) | "AllDeadLetters" >> beam.Flatten()
    error_files = dead | "WriteDeadLetters" >> WriteDeadLetters(cfg.output)
    return p | "FinalizeStore" >> FinalizeStore(
        shards=written.shards, errors=error_files, records=read.records, read_dead=read[DEAD], unique=unique.records,
        dedupe_dead=unique[DEAD], blank=read[BLANK], store_uri=cfg.output, manifest_json=manifest_json,
        vocab_entry=plan.vocab_entry, resume=plan.resume.to_json(), max_error_rate=cfg.max_error_rate,
        lease_token=plan.lease.info.token if plan.lease else None,
    )


def pipeline_options(beam_args: list[str], *, save_main_session: bool, device: str = "cpu") -> tuple[PipelineOptions, str, str | None]:
    """Beam options with the local default filled in; returns ``(options, runner, local mode)``.

    Without ``--runner``: ``FnApiRunner``. For a CPU teacher it runs in-process
    (``in_memory``, one worker): the forward pass already uses every core through torch's
    intra-op threads, and separate SDK processes only add start-up and IPC (measured in
    ``bench/capture_bench.py``). For a GPU teacher it runs one SDK process per core
    (``multi_processing``) feeding one shared model, so reading, tokenizing and encoding
    keep up with the device. ``--direct_running_mode`` / ``--direct_num_workers`` override.
    """
    opts = PipelineOptions(beam_args)
    std = opts.view_as(StandardOptions)
    local_mode = None
    if not std.runner:
        std.runner = LOCAL_RUNNER
        direct = opts.view_as(DirectOptions)
        given = " ".join(beam_args)
        gpu = device.startswith("cuda")
        if "--direct_running_mode" not in given:
            direct.direct_running_mode = "multi_processing" if gpu else "in_memory"
        if "--direct_num_workers" not in given:
            direct.direct_num_workers = 0 if direct.direct_running_mode != "in_memory" else 1  # 0: one per core
        local_mode = "in_process" if direct.direct_running_mode == "in_memory" else direct.direct_running_mode
        if local_mode == "multi_processing":
            # The SDK processes share the cores with the model's OpenMP threads; spin-waiting
            # threads then stall each other (measured: 2.7x slower forward passes on 2 busy
            # cores). Workers inherit the driver's environment; a user setting wins.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if std.runner in ("DirectRunner", "SwitchingDirectRunner"):
        _LOG.warning("DirectRunner first tries to download the Prism runner; use the default (FnApiRunner) offline")
    opts.view_as(SetupOptions).save_main_session = save_main_session
    return opts, std.runner, local_mode


def run(argv: list[str] | None = None, save_main_session: bool = True, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Run a capture; returns ``{"totals": manifest totals, "metrics": counters, "seconds": wall}``.

    ``argv``: ``kd cache`` flags plus Beam options. ``test_pipeline``: a pipeline to build
    into (its own options and runner are used).
    """
    cfg, beam_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    if test_pipeline is not None:
        cfg.large_model = bool(cfg.large_model)
        plan = plan_capture(cfg, runner=type(test_pipeline.runner).__name__)
        p = test_pipeline
    else:
        device = cfg.teacher_spec("token").resolved_device()  # the device rule does not depend on the kind
        opts, runner, local_mode = pipeline_options(beam_args, save_main_session=save_main_session, device=device)
        if cfg.large_model is None:
            # One model per machine shared by its SDK processes, except in-process where
            # there is only one process (the proxy would only add pickling).
            cfg.large_model = local_mode != "in_process"
        plan = plan_capture(cfg, runner=runner, local_mode=local_mode)
        p = beam.Pipeline(options=opts)
    try:
        build_pipeline(p, plan)
        result = p.run()
        result.wait_until_finish()
    finally:
        plan.lease.release()
        from pipelines.inference import close_progress_bars  # noqa: PLC0415

        close_progress_bars()  # in-process runners: the bar's last line belongs here, not at exit
    state = str(result.state)
    if "DONE" not in state:
        raise RuntimeError(f"capture pipeline ended in state {state}")
    from kdstore.store import open as open_store  # noqa: PLC0415

    totals = open_store(cfg.output).manifest.totals
    return {"totals": totals, "metrics": metrics_summary(result), "seconds": time.perf_counter() - t0}


def _user_error_of(exc: BaseException) -> BaseException | None:
    """The user-facing cause inside a runner's wrapped exception, if any."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (sinks.ErrorRateExceeded, CorpusError, TeacherError, StoreFormatError, sinks.OutputExistsError,
                          StoreLockedError)):
            return e
        e = e.__cause__ or e.__context__
    text = str(exc)
    for cls in (sinks.ErrorRateExceeded, CorpusError, StoreLockedError):
        if cls.__name__ in text:
            return cls(text.split(cls.__name__ + ":", 1)[-1].strip().splitlines()[0])
    return None


class _HeldBeamLogs(logging.Handler):
    """Holds Beam's log records while a capture runs: a user error then prints one clean
    line instead of Beam's error log and traceback (the same error, wrapped); anything else
    gets the held records replayed."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._logger = logging.getLogger("apache_beam")

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_HeldBeamLogs":
        self._propagate = self._logger.propagate
        self._logger.addHandler(self)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeHandler(self)
        self._logger.propagate = self._propagate

    def replay(self, min_level: int = logging.NOTSET) -> None:
        for r in self.records:
            # Beam logs a DoFn's exception (ERROR, with traceback) before re-raising it; on a
            # clean run there is none, and on a bug the re-raised traceback follows.
            if r.levelno >= min_level and not (min_level and r.levelno >= logging.ERROR):
                logging.getLogger(r.name).handle(r)
        self.records = []


def main(argv: list[str] | None = None, prog: str = "kd cache") -> int:
    """``kd cache`` entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "-h" in argv or "--help" in argv:
        from pipelines.options import build_parser  # noqa: PLC0415

        build_parser(prog).print_help()
        return 0
    held = _HeldBeamLogs()
    try:
        with held:
            out = run(argv)
    except SystemExit as exc:  # argparse
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - report user errors plainly, re-raise bugs
        user = _user_error_of(exc)
        if user is None:
            held.replay()  # a bug: Beam's own log (with its traceback) helps
            raise
        print(f"{prog}: error: {user}", file=sys.stderr)
        return 1
    held.replay(min_level=logging.WARNING)  # a clean run: Beam's warnings still show
    t = out["totals"]
    print(
        f"{prog}: wrote {t.get('rows', 0)} rows ({t.get('samples', 0)} samples, {t.get('tokens', 0)} positions, "
        f"{t.get('bytes', 0) / 1e6:.2f} MB) in {out['seconds']:.1f}s; dead letters: {t.get('dead_letters', 0)}; "
        f"duplicates: {t.get('duplicates', 0)}; resumed rows: {t.get('resumed_rows', 0)}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
