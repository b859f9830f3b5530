"""``kd store align-report URI --student-tokenizer DIR``: vocabulary coverage per policy.

For each unmatched-token policy, the share of the teacher vocabulary and of the stored
probability mass that each alignment rule maps, the share of input tokens mapped to a
student token, and (when the store has text and byte offsets) the fraction of student
positions that receive a teacher target under sequence alignment. Printed as a table and,
with ``--json``, written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdstore.align.sequence import KINDS, SequenceAligner
from kdstore.align.student import load_student
from kdstore.align.vocab import MATCH_RULES, POLICIES, RULES, VocabAlignment


@dataclass
class TeacherUsage:
    """What a store uses of its teacher vocabulary.

    mass ``[V_t]`` float64: summed stored probability per teacher id; inputs ``[V_t]``
    int64: occurrences as input tokens; positions: number of positions; tail_mass: summed
    tail; used ``[V_t]`` bool: id occurs as a kept entry or an input.
    """

    mass: np.ndarray
    inputs: np.ndarray
    positions: int
    tail_mass: float

    @property
    def used(self) -> np.ndarray:
        return (self.mass > 0) | (self.inputs > 0)


def scan_store(store: Any, *, max_rows: int | None = None, batch_rows: int = 1024, progress: bool = True) -> TeacherUsage:
    """One pass over a store (or its first ``max_rows`` rows): mass and input counts per id."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    V = store.manifest.teacher.vocab_size
    mass = np.zeros(V, dtype=np.float64)
    inputs = np.zeros(V, dtype=np.int64)
    positions, tail, rows = 0, 0.0, 0
    total = store.num_rows if max_rows is None else min(max_rows, store.num_rows)
    with tqdm(total=total, unit="row", desc="scan store", disable=not progress, file=sys.stderr) as bar:
        for batch in store.iter_batches(batch_rows=batch_rows):
            if max_rows is not None and rows >= max_rows:
                break
            if max_rows is not None and rows + batch.num_rows > max_rows:
                batch = batch.slice(0, max_rows - rows)
            d = store.decode(batch)
            mass += np.bincount(d.indices, weights=d.probs, minlength=V)
            if len(d.input_ids):
                inputs += np.bincount(d.input_ids, minlength=V)
            positions += len(d.counts)
            tail += float(d.tail.sum(dtype=np.float64))
            rows += batch.num_rows
            bar.update(batch.num_rows)
    return TeacherUsage(mass=mass, inputs=inputs, positions=positions, tail_mass=tail)


def coverage_report(store: Any, student: Any, *, policies=POLICIES, teacher_convention: str | None = None,
                    usage: TeacherUsage | None = None, max_rows: int | None = None, sequence_rows: int = 256,
                    progress: bool = True) -> dict[str, Any]:
    """The report as a dict (see the module doc); ``kd store align-report`` prints it."""
    st = load_student(student)
    usage = usage or scan_store(store, max_rows=max_rows, progress=progress)
    kept = float(usage.mass.sum())
    n_inputs = int(usage.inputs.sum())
    out: dict[str, Any] = {
        "store": store.uri, "student": st.name, "teacher_vocab_size": store.manifest.teacher.vocab_size,
        "student_vocab_size": st.vocab_size, "positions": usage.positions, "kept_mass": kept,
        "tail_mass": usage.tail_mass, "input_tokens": n_inputs, "policies": {},
    }
    first = None
    for policy in policies:
        # "extend" appends only the teacher ids the store uses (seed 001), as align-build does.
        al = VocabAlignment.build(store, st, policy=policy, teacher_convention=teacher_convention,
                                  used=usage.used if policy == "extend" else None)
        first = first or al
        cov = al.coverage(usage.mass)
        # An input token is kept when the student reads it as one id standing for its whole text:
        # a match or a new entry. Under first_piece/split/tail a multi-piece token is fed as its
        # first piece (the rest of its text is lost): counted apart, never as mapped.
        mapped_inputs = np.isin(al.rule_codes, [RULES.index(r) for r in (*MATCH_RULES, "extend")])
        truncated = np.isin(al.rule_codes, [RULES.index(r) for r in ("first_piece", "split", "tail")])
        out["policies"][policy] = {
            "aligned_vocab_size": al.vocab_size,
            "new_tokens": len(al.new_tokens),
            "rules": cov,
            "mapped_mass_share": 1.0 - sum(cov[r]["mass_share"] for r in ("tail", "unmappable", "padding")),
            "input_coverage": float(usage.inputs[mapped_inputs].sum()) / max(1, n_inputs),
            "input_first_piece_only": float(usage.inputs[truncated].sum()) / max(1, n_inputs),
        }
    if first is not None:
        out["teacher_convention"] = first.meta["teacher"]["convention"]
        out["student_convention"] = first.meta["student"]["convention"]
    seq_ok = sequence_rows > 0 and _has_offsets(store)
    fp = VocabAlignment.build(store, st, policy="first_piece", teacher_convention=teacher_convention) if seq_ok else None
    out["sequence"] = _sequence_stats(store, st, fp, rows=sequence_rows) if seq_ok else None
    return out


def _has_offsets(store: Any) -> bool:
    names = store.schema.names
    return all(c in names for c in ("text", "byte_start", "byte_end"))


def _sequence_stats(store: Any, student: Any, alignment: Any, *, rows: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for mode in ("boundary", "one_to_one", "groups"):
        aligner = SequenceAligner(student=student, alignment=alignment, mode=mode)
        tot: dict[str, int] = {}
        seen = 0
        for batch in store.iter_batches(batch_rows=min(rows, 256)):
            if seen >= rows:
                break
            batch = batch.slice(0, rows - seen)
            for k, v in aligner.align_batch(store, batch).stats.items():
                tot[k] = tot.get(k, 0) + v
            seen += batch.num_rows
        n = max(1, tot.get("in_window", 0))
        res[mode] = {"rows": seen, **tot, "target_fraction": tot.get("targets", 0) / n,
                     **{f"share_{k}": tot.get(f"in_{k}", 0) / n for k in KINDS[1:]}}
    return res


def format_report(rep: dict[str, Any]) -> str:
    """Human-readable tables of a :func:`coverage_report` dict."""
    pols = list(rep["policies"])
    lines = [
        f"store {rep['store']}: teacher vocab {rep['teacher_vocab_size']} ({rep.get('teacher_convention')}), "
        f"student {rep['student'] or '?'} vocab {rep['student_vocab_size']} ({rep.get('student_convention')})",
        f"{rep['positions']} positions, kept mass {rep['kept_mass']:.1f}, tail mass {rep['tail_mass']:.1f}, "
        f"{rep['input_tokens']} input tokens",
        "",
        "rule          " + "".join(f"{p + ' vocab%':>19}{p + ' mass%':>19}" for p in pols),
    ]
    for r in RULES:
        cells = [(rep["policies"][p]["rules"][r]["vocab_share"], rep["policies"][p]["rules"][r].get("mass_share", 0.0)) for p in pols]
        if not any(v or m for v, m in cells):
            continue
        lines.append(f"{r:<14}" + "".join(f"{100 * v:>19.2f}{100 * m:>19.2f}" for v, m in cells))
    lines.append("")
    lines.append("policy        aligned vocab   new entries   mass mapped%   inputs mapped%   inputs as first piece only%")
    for p in pols:
        q = rep["policies"][p]
        lines.append(f"{p:<14}{q['aligned_vocab_size']:>13}{q['new_tokens']:>14}{100 * q['mapped_mass_share']:>15.2f}"
                     f"{100 * q['input_coverage']:>17.2f}{100 * q.get('input_first_piece_only', 0.0):>30.2f}")
    seq = rep.get("sequence")
    if seq:
        lines.append("")
        for mode, s in seq.items():
            lines.append(
                f"sequence alignment ({mode}, {s['rows']} rows): {100 * s['target_fraction']:.2f}% of {s['in_window']} "
                f"student positions get a teacher target; tokens in 1:1 / 1:n / n:1 / n:m groups: "
                + " / ".join(f"{100 * s['share_' + k]:.1f}%" for k in KINDS[1:5])
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "kd store align-report") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("uri", help="store directory or URI")
    ap.add_argument("--student-tokenizer", required=True, help="student tokenizer directory (save_pretrained) or tokenizer.json")
    ap.add_argument("--policy", action="append", choices=POLICIES, help="policy to report (repeatable; default: all)")
    ap.add_argument("--teacher-convention", choices=("byte_level", "sentencepiece", "wordpiece", "plain"),
                    help="override the teacher convention inferred from its vocabulary")
    ap.add_argument("--max-rows", type=int, default=None, help="scan only the first N rows for the mass shares")
    ap.add_argument("--sequence-rows", type=int, default=256, help="rows used for the byte-offset alignment statistics")
    ap.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH ('-' for stdout only)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    import kdstore  # noqa: PLC0415

    try:
        store = kdstore.open(args.uri)
        rep = coverage_report(store, args.student_tokenizer, policies=tuple(args.policy or POLICIES),
                              teacher_convention=args.teacher_convention, max_rows=args.max_rows,
                              sequence_rows=args.sequence_rows, progress=not args.quiet)
    except (OSError, ValueError, TypeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(rep, indent=2, ensure_ascii=False)
    if args.json == "-":
        print(text)
        return 0
    print(format_report(rep))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"\nJSON written to {args.json}")
    return 0


def build_main(argv: list[str] | None = None, prog: str = "kd store align-build") -> int:
    """``kd store align-build URI --student-tokenizer DIR --out FILE``: write an alignment file
    (``--check FILE``: verify an existing one belongs to this store and student tokenizer)."""
    ap = argparse.ArgumentParser(prog=prog, description="Write (or check) the vocabulary alignment of a store's teacher "
                                 "with a student tokenizer: the third vocabulary used by 'kd train student --align'.")
    ap.add_argument("uri", help="store directory or URI")
    ap.add_argument("--student-tokenizer", required=True, help="student tokenizer directory (save_pretrained) or tokenizer.json")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="alignment file to write (*.parquet, or *.json)")
    g.add_argument("--check", metavar="FILE", help="only check that FILE belongs to this store and student tokenizer")
    ap.add_argument("--policy", choices=POLICIES + ("continuation",), default="first_piece",
                    help="unmatched teacher tokens (default first_piece: the student tokenizer's first piece); "
                         "continuation: first_piece spread over the student tokens that start with it, weighted by "
                         "their counts on the stored text (kdstore.align.continuation)")
    ap.add_argument("--teacher-convention", choices=("byte_level", "sentencepiece", "wordpiece", "plain"))
    ap.add_argument("--max-rows", type=int, default=None, help="rows scanned for the used-id mask (extend policy)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    import kdstore  # noqa: PLC0415

    try:
        store = kdstore.open(args.uri)
        st = load_student(args.student_tokenizer)
        if args.check:
            al = VocabAlignment.load(args.check, store=store, student=st)
            print(f"{args.check}: OK for {store.uri} and {args.student_tokenizer} (policy {al.policy}, "
                  f"aligned vocab {al.vocab_size})")
            return 0
        if args.policy == "continuation":
            from kdstore.align.continuation import build_continuation  # noqa: PLC0415

            al = build_continuation(store, st, teacher_convention=args.teacher_convention)
        else:
            used = scan_store(store, max_rows=args.max_rows, progress=not args.quiet).used if args.policy == "extend" else None
            al = VocabAlignment.build(store, st, policy=args.policy, teacher_convention=args.teacher_convention, used=used)
        path = al.save(args.out)
        VocabAlignment.load(path, store=store, student=st)  # what a training will check
    except (OSError, ValueError, TypeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    cov = al.coverage()
    matched = sum(cov[r]["count"] for r in MATCH_RULES)
    print(f"wrote {path}: policy {al.policy}, teacher vocab {al.teacher_vocab_size}, aligned vocab {al.vocab_size} "
          f"({len(al.new_tokens)} new entries), {matched} teacher ids matched; checked against {store.uri} and "
          f"{args.student_tokenizer}")
    return 0
