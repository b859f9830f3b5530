"""The ``kd`` console script: a thin dispatcher over subcommand modules.

Each subcommand lives in its own module and exposes ``main(argv: list[str] | None) -> int``
with its own ``argparse`` parser, so ``kd train student --help`` is owned by the
trainer and ``kd cache --help`` by the pipeline. Modules are imported lazily: ``kd
store inspect`` does not pay for importing torch or Beam.
"""

from __future__ import annotations

import importlib
import sys

# (command words) -> ("module", "function", one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str, str]] = {
    ("cache",): ("pipelines.capture", "main", "run the teacher over a corpus and write a soft-label store (Beam)"),
    ("store", "inspect"): ("kdstore.tools", "inspect_main", "manifest summary, bytes/token, k statistics"),
    ("store", "verify"): ("kdstore.tools", "verify_main", "check checksums, schema, counts and values; exit 1 on corruption"),
    ("store", "stats"): ("kdstore.tools", "stats_main", "histograms of kept mass, tail mass, entropy and k (PNG)"),
    ("store", "export"): ("kdstore.export", "main", "decoded rows as JSONL or plain-column Parquet (token strings, top-k)"),
    ("store", "merge"): ("kdstore.merge", "merge_main", "combine stores of separate capture jobs; duplicates by sample_id dropped and counted"),
    ("store", "align-report"): ("kdstore.align.report", "main", "vocabulary coverage of a student tokenizer, per policy"),
    ("store", "align-build"): ("kdstore.align.report", "build_main", "write (or --check) the alignment file of a student tokenizer"),
    ("train", "student"): ("trainer.lm.student", "main", "distil a student from a store (or CE / online-teacher baselines)"),
    ("train", "lm"): ("trainer.lm.student", "lm_main", "train a causal LM on text with CE (reference teachers)"),
    ("train", "rdrop"): ("trainer.classify.rdrop", "main", "R-Drop fine-tuning across segmentation granularities"),
    ("train", "cascade"): ("trainer.classify.cascade", "main", "cascade distillation A -> B -> TextCNN student"),
    ("train", "continual"): ("trainer.continual.loop", "main", "ERNIE 2.0 continual multi-task pre-training (seed 004)"),
    ("train", "federated"): ("trainer.federated.run", "main", "shared encoder across private nodes, async count-weighted (Flower)"),
    ("demo",): ("trainer.demo", "main", "the whole path on real data: teacher, capture, student, report"),
}


def _usage(group: str | None = None) -> str:
    head = f"kd {group} <command>" if group else "kd <command>"
    lines = [f"usage: {head} [options]", "", "commands:"]
    for words, (_, _, help_) in COMMANDS.items():
        if group is None or words[0] == group:
            lines.append(f"  kd {' '.join(words):<22} {help_}")
    lines.append("")
    lines.append("Run 'kd <command> --help' for the options of one command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"--version", "version"}:
        from kdstore import __version__

        print(__version__)
        return 0
    for n in (2, 1):
        key = tuple(argv[:n])
        if key in COMMANDS:
            module, func, _ = COMMANDS[key]
            fn = getattr(importlib.import_module(module), func)
            prog = "kd " + " ".join(key)
            rc = fn(argv[n:], prog=prog)
            return int(rc or 0)
    groups = {words[0] for words in COMMANDS if len(words) > 1}
    if argv[0] in groups and (len(argv) == 1 or argv[1] in {"-h", "--help", "help"}):
        print(_usage(argv[0]))  # 'kd store --help', 'kd train'
        return 0
    print(f"kd: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
    print(_usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
