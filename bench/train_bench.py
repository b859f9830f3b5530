"""Student distillation: cached soft labels vs online KD vs CE only, in one run.

Reference teacher (``trainer.lm.reference``, cached) and real corpus (People's Daily): the
teacher's distributions over the first ``--docs`` train documents are captured once into
five stores (top-k 8, top-k 32, sample with 32 and with 12 draws, top-p; one teacher pass
feeds all selections), then the same student (``student-tiny``, same steps, batch, seed,
schedule, kd weight) is trained in this process, arm after arm:

1. CE only (``kd_weight=0``)              4. cached ``sample`` (RS-KD draw frequencies), twice:
2. online full KD (teacher every step)       32 draws, and 12 draws (about top-k 8's bytes)
3. cached top-k, k = 8 and 32             5. cached ``top_p``

Each arm reads the same store rows in the same order (the online and CE arms use the
store's input ids and labels only). Reported per arm: held-out CE / perplexity on the
validation split (true next token), full-vocabulary KL(teacher || student) on the same
text, median step time (data + forward + loss + backward + step) and the store's bytes
per token; the modes on the Pareto front of CE vs bytes win at equal bytes. A second table
times online vs cached steps for teachers of growing size (random init: the cost of a step
does not depend on the weights). Step times compare only within one run on one machine.

    python bench/train_bench.py [--steps 300] [--docs 5000] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import markdown_table, write_section  # noqa: E402

IMG = ROOT / "docs" / "img" / "train_bench.png"


def _selections(samples: int, samples_small: int, p: float, max_k: int):
    from kdstore.format import Selection

    return {
        "topk8": Selection(mode="topk", k=8),
        "topk32": Selection(mode="topk", k=32),
        "sample": Selection(mode="sample", samples=samples, seed=0),
        # Few draws: about top-k 8's bytes per token, for the equal-bytes comparison.
        "sample_small": Selection(mode="sample", samples=samples_small, seed=0),
        "top_p": Selection(mode="top_p", p=p, max_k=max_k),
    }


def capture(teacher_dir: Path, out: Path, *, docs: int, samples: int, samples_small: int, p: float, max_k: int,
            max_length: int, threads: int) -> dict[str, dict]:
    """One teacher pass over the first ``docs`` train documents -> five stores (reused when present)."""
    import torch
    from transformers import AutoTokenizer

    import kdstore
    from pipelines.plain import cache_with_model, store_bytes_per_token
    from trainer.lm.models import load_causal_lm
    from trainer.lm.textdata import load_texts

    sels = _selections(samples, samples_small, p, max_k)
    key = f"{teacher_dir.name}-d{docs}-s{samples}-{samples_small}-p{p}-m{max_k}-L{max_length}"
    uris = {name: out / f"{key}-{name}" for name in sels}
    info_path = out / f"{key}.json"
    if not all((u / "manifest.json").exists() for u in uris.values()) or not info_path.exists():
        if threads:
            torch.set_num_threads(threads)
        texts = load_texts("peoples_daily:train")[:docs]
        tok = AutoTokenizer.from_pretrained(str(teacher_dir))
        model = load_causal_lm(teacher_dir)
        t0 = time.perf_counter()
        res = cache_with_model(model, tok, texts, {str(u): sels[n] for n, u in uris.items()}, max_length=max_length,
                               batch_size=32, name_or_path=str(teacher_dir), overwrite=True, progress=True)
        wall = time.perf_counter() - t0
        info_path.write_text(json.dumps({"wall_seconds": wall, "per_store": {n: res[str(u)] for n, u in uris.items()}}))
    info = json.loads(info_path.read_text())
    out_info = {}
    for n, u in uris.items():
        m = kdstore.open(str(u)).manifest
        out_info[n] = {"uri": str(u), "bytes_per_token": store_bytes_per_token(u), "rows": m.totals["rows"],
                       "tokens": m.totals["tokens"], "entries_per_token": m.totals["entries"] / max(1, m.totals["tokens"]),
                       "capture_seconds": info["per_store"][n]["seconds"], "capture_wall_seconds": info["wall_seconds"]}
    return out_info


def run_arms(arms: list[str], stores: dict[str, dict], teacher_dir: Path, work: Path, args) -> dict[str, dict]:
    from trainer.core.config import TrainConfig
    from trainer.lm.student import train

    common = dict(
        model=args.student, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_embed_mult=args.lr_embed_mult,
        warmup_steps=max(1, args.steps // 10),
        seed=0, precision=args.precision, threads=args.threads, eval_data="peoples_daily:validation",
        eval_teacher=str(teacher_dir), tokenizer=str(teacher_dir), eval_every=0, log_every=10, progress=not args.no_progress,
        plots=False, save_model=False, keep_checkpoints=1, save_every=0, kd_weight=args.kd_weight,
    )
    plan = {
        "ce": dict(store=stores["topk32"]["uri"], kd_weight=0.0),
        "online": dict(store=stores["topk32"]["uri"], online_teacher=str(teacher_dir)),
        "topk8": dict(store=stores["topk8"]["uri"]),
        "topk32": dict(store=stores["topk32"]["uri"]),
        "sample": dict(store=stores["sample"]["uri"]),
        "sample_small": dict(store=stores["sample_small"]["uri"]),
        "top_p": dict(store=stores["top_p"]["uri"]),
    }
    results = {}
    for arm in arms:
        print(f"\n=== arm {arm} ===", flush=True)
        cfg = TrainConfig(**{**common, **plan[arm], "out_dir": str(work / "runs" / arm)})
        t0 = time.perf_counter()
        res = train(cfg)
        res["wall_seconds"] = time.perf_counter() - t0
        results[arm] = res
    return results


def step_time_sweep(presets: list[str], store_uri: str, teacher_dir: Path, work: Path, args) -> list[dict]:
    """Median step time of online KD vs cached top-32 vs CE only, for teachers of several
    sizes (weights at random init: a step's cost does not depend on what the model knows)."""
    from trainer.core.config import TrainConfig
    from trainer.lm.models import build_causal_lm, count_parameters, load_causal_lm, vocab_size_of
    from trainer.lm.student import train

    vocab = vocab_size_of(load_causal_lm(teacher_dir))
    rows = []
    for preset in presets:
        tdir = work / "sweep" / preset
        if not (tdir / "config.json").exists():
            build_causal_lm(preset, vocab_size=vocab, seed=0).save_pretrained(tdir)
        n_teacher = count_parameters(load_causal_lm(tdir))
        common = dict(model=args.student, store=store_uri, max_steps=args.sweep_steps, batch_size=args.batch_size, lr=args.lr,
                      seed=0, precision=args.precision, threads=args.threads, progress=False, plots=False, save_model=False,
                      keep_checkpoints=1, save_every=0, log_every=args.sweep_steps, kd_weight=args.kd_weight)
        times, student_params = {}, 0
        for arm, extra in (("online", dict(online_teacher=str(tdir))), ("topk32", {}), ("ce", dict(kd_weight=0.0))):
            print(f"\n=== step-time sweep: teacher {preset}, arm {arm} ===", flush=True)
            res = train(TrainConfig(**{**common, **extra, "out_dir": str(work / "sweep" / f"{preset}-{arm}")}))
            times[arm], student_params = res["step_time_median"], res["parameters"]
        rows.append({"teacher": preset, "parameters": n_teacher, "ratio": n_teacher / student_params, **times})
    return rows


def padding_share(store_uri: str, *, batch_size: int, pack: bool) -> float:
    """Share of padding positions in one epoch of store batches (padded or packed)."""
    from kdstore.dataset import SoftLabelDataset

    real = total = 0
    for b in SoftLabelDataset(store_uri, batch_size=batch_size, seed=0, pack=pack):
        m = b["valid_mask"] if pack else b["attention_mask"]
        real, total = real + int(m.sum()), total + m.numel()
    return 1 - real / max(1, total)


def _median_tokens_per_s(runs: list[dict]) -> float:
    vals = sorted(h["tokens_per_s"] for r in runs for h in r.get("history", []) if h.get("event") == "train")
    return vals[len(vals) // 2] if vals else math.nan


def packing_study(store_uri: str, teacher_dir: Path, work: Path, args) -> tuple[str, dict]:
    """Cached top-32 KD with padded vs packed batches: same rows and steps, alternating runs."""
    from trainer.core.config import TrainConfig
    from trainer.lm.student import train

    common = dict(model=args.student, store=store_uri, max_steps=args.pack_steps, batch_size=args.batch_size, lr=args.lr,
                  lr_embed_mult=args.lr_embed_mult, warmup_steps=max(1, args.pack_steps // 10), seed=0,
                  precision=args.precision, threads=args.threads, eval_data="peoples_daily:validation",
                  tokenizer=str(teacher_dir), eval_every=0, log_every=10, progress=not args.no_progress, plots=False,
                  save_model=False, keep_checkpoints=1, save_every=0, kd_weight=args.kd_weight)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for rep in range(args.pack_reps):
        for pack in (False, True):
            print(f"\n=== packing study: pack={pack}, run {rep + 1}/{args.pack_reps} ===", flush=True)
            runs[pack].append(train(TrainConfig(**{**common, "pack": pack,
                                                   "out_dir": str(work / "runs" / f"pack{int(pack)}-{rep}")})))
    pad = {pack: padding_share(store_uri, batch_size=args.batch_size, pack=pack) for pack in (False, True)}
    med = {pack: sorted(r["step_time_median"] for r in rs)[len(rs) // 2] for pack, rs in runs.items()}
    rows = []
    for pack in (False, True):
        r = runs[pack][0]
        rows.append(["packed (document-masked)" if pack else "padded to the longest row", f"{pad[pack]:.1%}",
                     med[pack] * 1000, f"{_median_tokens_per_s(runs[pack]):,.0f}",
                     f"{med[False] / med[pack]:.2f}x", r["eval_ce"]])
    table = markdown_table(["batches", "padding positions", "step ms (median of runs)", "target tokens/s",
                            "speed vs padded", "held-out CE"], rows)
    return table, {"padding": pad, "speedup": med[False] / med[True]}


LABELS = {"ce": "CE only (kd_weight=0)", "online": "online full KD", "topk8": "cached top-k 8", "topk32": "cached top-k 32",
          "sample": "cached sample", "sample_small": "cached sample (few draws)", "top_p": "cached top-p"}
CACHED = ("topk8", "topk32", "sample", "sample_small", "top_p")


def report(results: dict[str, dict], stores: dict[str, dict], teacher: dict, args) -> tuple[str, dict]:
    on = results.get("online")
    rows = []
    for arm, r in results.items():
        store_key = arm if arm in CACHED else None
        bpt = stores[store_key]["bytes_per_token"] if store_key else math.nan
        ept = stores[store_key]["entries_per_token"] if store_key else math.nan
        d_ce = (r["eval_ce"] / on["eval_ce"] - 1) * 100 if on else math.nan
        speed = on["step_time_median"] / r["step_time_median"] if on else math.nan
        rows.append([LABELS[arm], f"{bpt:.1f}" if store_key else "-", f"{ept:.1f}" if store_key else "-",
                     r["eval_ce"], r["eval_ppl"], r["eval_kl"], f"{d_ce:+.2f}%" if on else "-",
                     r["step_time_median"] * 1000, r.get("step_cpu_median", math.nan) * 1000, f"{speed:.2f}x" if on else "-"])
    table = markdown_table(
        ["arm", "store B/token", "entries/token", "held-out CE", "ppl", "KL(teacher‖student)", "CE vs online",
         "step ms (median)", "step CPU ms", "speed vs online"], rows)
    verdict = {}
    if on and "topk32" in results:
        verdict["topk32_ce_within_1pct_of_online"] = abs(results["topk32"]["eval_ce"] / on["eval_ce"] - 1) <= 0.01
    cached = [a for a in CACHED if a in results]
    if on and cached:
        verdict["min_cached_speedup"] = min(on["step_time_median"] / results[a]["step_time_median"] for a in cached)
    # Equal bytes per token: a mode wins when no other arm has both fewer (or equal) bytes
    # and lower held-out CE (the Pareto front of CE vs bytes).
    verdict["pareto_front"] = [
        a for a in cached
        if not any(stores[b]["bytes_per_token"] <= stores[a]["bytes_per_token"] and results[b]["eval_ce"] < results[a]["eval_ce"]
                   for b in cached if b != a)
    ]
    return table, verdict


def plot(results: dict[str, dict], stores: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for arm in CACHED:
        if arm in results:
            ax.scatter(stores[arm]["bytes_per_token"], results[arm]["eval_ce"], s=60)
            ax.annotate(LABELS[arm].replace("cached ", ""), (stores[arm]["bytes_per_token"], results[arm]["eval_ce"]),
                        textcoords="offset points", xytext=(5, 5))
    for arm, style in (("online", "--"), ("ce", ":")):
        if arm in results:
            ax.axhline(results[arm]["eval_ce"], linestyle=style, color="gray", label=LABELS[arm])
    ax.set(xlabel="store bytes per token (zstd Parquet)", ylabel="held-out CE (nats/token)",
           title="held-out CE vs storage")
    ax.legend()
    ax = axes[1]
    names = list(results)
    ax.bar([LABELS[a].replace("cached ", "") for a in names], [results[a]["step_time_median"] * 1000 for a in names])
    ax.set(ylabel="median step time (ms)", title="step time (same run, same machine)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--docs", type=int, default=5000, help="People's Daily train documents captured (~1 epoch)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-embed-mult", type=float, default=30.0, help="as the reference recipe (trainer.lm.reference)")
    ap.add_argument("--kd-weight", type=float, default=0.5)
    ap.add_argument("--student", default="student-tiny")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--samples", type=int, default=32, help="draws per position for the sample store")
    ap.add_argument("--samples-small", type=int, default=12, help="draws per position for the few-draws sample store")
    ap.add_argument("--p", type=float, default=0.9, help="top-p threshold")
    ap.add_argument("--max-k", type=int, default=32, help="top-p cap")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default); 1 on a shared machine")
    ap.add_argument("--arms", default="ce,online,topk8,topk32,sample,sample_small,top_p")
    ap.add_argument("--sweep", default="teacher-small,teacher-base",
                    help="teacher presets (random init) for the step-time-vs-teacher-size table ('' = skip)")
    ap.add_argument("--sweep-steps", type=int, default=20)
    ap.add_argument("--teacher", default=None, help="a HF model dir instead of the reference teacher (smoke tests)")
    ap.add_argument("--cache-dir", default=None, help="reference teacher cache (default $KDSTORE_CACHE or ~/.cache/kdstore)")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "train_bench"), help="stores and runs")
    ap.add_argument("--pack-steps", type=int, default=150, help="steps per run of the packing study")
    ap.add_argument("--pack-reps", type=int, default=2, help="alternating padded/packed runs of the packing study")
    ap.add_argument("--only-packing", action="store_true", help="run only the padded-vs-packed study (its own section)")
    ap.add_argument("--quick", action="store_true", help="smoke run (few steps/docs); does not write docs/benchmarks.md")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.docs = min(args.steps, 10), min(args.docs, 300)
    return args


def _packing_main(stores: dict[str, dict], teacher_dir: Path, work: Path, args) -> int:
    """``--only-packing``: the padded-vs-packed study alone, in its own section."""
    import torch

    if args.quick:
        args.pack_steps, args.pack_reps = 10, 1
    table, res = packing_study(stores["topk32"]["uri"], teacher_dir, work, args)
    print("\n" + table)
    if not args.quick:
        write_section("train-packing", "Student batches: padded vs packed (document masking)", f"""
Cached top-32 KD (store as in the section above: the first {args.docs} People's Daily train documents, windows of up to
{args.max_length} tokens), `{args.student}`, batch {args.batch_size} rows, {args.pack_steps} steps per run, seed 0,
precision {args.precision}, threads {torch.get_num_threads()}; {args.pack_reps} alternating runs per arm (step time: median
of the runs' medians). Packed: each batch's rows whole in fewer sequences, position ids restarting per row so
that attention stays inside each row (`SoftLabelDataset(pack=True)`, the default of `kd train student`); the rows,
their order and the losses are those of the padded batches.

{table}

Target: at most 10 % padding positions (packed: **{res['padding'][True]:.1%}**, padded: {res['padding'][False]:.1%});
step speed-up from packing: **{res['speedup']:.2f}x**.
""")
    return 0


def _teacher(args) -> tuple[Path, dict]:
    """The teacher's directory and description: ``--teacher``, or the cached reference teacher."""
    from trainer.lm.models import load_causal_lm
    from trainer.lm.reference import default_cache_dir, reference_info, reference_teacher

    if args.teacher:
        teacher_dir = Path(args.teacher)
        return teacher_dir, {"recipe": {"model": teacher_dir.name}, "parameters": sum(
            p.numel() for p in load_causal_lm(teacher_dir).parameters()), "eval_ppl": float("nan")}
    teacher_dir = reference_teacher(cache_dir=Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                                    threads=args.threads)
    return teacher_dir, reference_info(teacher_dir)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    teacher_dir, teacher = _teacher(args)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stores = capture(teacher_dir, work / "stores", docs=args.docs, samples=args.samples, samples_small=args.samples_small,
                     p=args.p, max_k=args.max_k, max_length=args.max_length, threads=args.threads)
    capture_s = next(iter(stores.values()))["capture_wall_seconds"]  # when the stores were made (maybe an earlier run)
    if args.only_packing:
        return _packing_main(stores, teacher_dir, work, args)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    results = run_arms(arms, stores, teacher_dir, work, args)
    sweep = step_time_sweep([t for t in args.sweep.split(",") if t], stores["topk32"]["uri"], teacher_dir, work, args)
    total_s = time.perf_counter() - t_all
    table, verdict = report(results, stores, teacher, args)
    student_params = next(iter(results.values()))["parameters"]
    print("\n" + table)
    print(json.dumps(verdict, indent=1))
    sweep_table = markdown_table(
        ["teacher (random init)", "parameters", "teacher/student", "online KD step ms", "cached top-32 step ms",
         "CE-only step ms", "cached speed-up"],
        [[r["teacher"], f"{r['parameters']:,}", f"{r['ratio']:.1f}x", r["online"] * 1000, r["topk32"] * 1000,
          r["ce"] * 1000, f"{r['online'] / r['topk32']:.2f}x"] for r in sweep]) if sweep else ""
    print("\n" + sweep_table)
    (work / "results.json").write_text(json.dumps({"results": results, "stores": stores, "verdict": verdict, "sweep": sweep}, indent=1,
                                                  default=str))
    if args.quick:
        return 0
    plot(results, stores, IMG)
    store_rows = [[n, s["rows"], s["tokens"], f"{s['entries_per_token']:.1f}", f"{s['bytes_per_token']:.1f}"]
                  for n, s in stores.items()]
    body = f"""
Teacher: `{teacher['recipe']['model']}` ({teacher['parameters']:,} parameters, held-out perplexity
{teacher['eval_ppl']:.1f}); student: `{args.student}` ({student_params:,} parameters, teacher/student =
{teacher['parameters'] / student_params:.1f}x). Every arm: {args.steps} steps, batch {args.batch_size} rows, lr
{args.lr} (embeddings x{args.lr_embed_mult:g}), seed 0, precision {args.precision}, kd_weight {args.kd_weight} (CE-only: 0), forward KL with tail
bucket at T=1, torch threads {torch.get_num_threads()}. Data: the first {args.docs} People's Daily train documents
(windows of up to {args.max_length} tokens), captured once with `pipelines.plain.cache_with_model` (one
teacher pass feeding all five selections; `kd cache` runs one Beam job per selection). Held-out: the validation
split ({results[arms[0]]['eval_tokens']:,} target tokens), CE against the true next token and full-vocabulary
KL(teacher ‖ student). Step time: median wall time of a training step (data, forward, loss, backward, optimizer);
"step CPU ms" is the process CPU time of the step (all threads), which is what an uncontended machine would take
with one thread.

{table}

Stores (sample: {args.samples} draws per position; top-p: p = {args.p}, at most {args.max_k}):

{markdown_table(["store", "rows", "positions", "entries/position", "bytes/position"], store_rows)}

Targets: cached top-32 within 1% of online KD's held-out CE: **{verdict.get('topk32_ce_within_1pct_of_online')}**;
slowest cached arm vs online KD: **{verdict.get('min_cached_speedup', float('nan')):.2f}x** faster (target >= 2x with a
teacher >= 4x the student). Capture of the five stores (one teacher pass): {capture_s:.0f} s (reused by later runs); this run
{total_s / 60:.1f} min.

Equal bytes per token (the Pareto front of held-out CE vs store bytes, cached arms):
**{", ".join(LABELS[a] for a in verdict["pareto_front"])}**.

Step time against teacher size ({args.sweep_steps} steps per arm, median; teachers at random init, same student,
store and batch as above):

{sweep_table}

![held-out CE vs store bytes, step times](img/train_bench.png)
"""
    write_section("train", "Student distillation: cached soft labels vs online KD vs CE only", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
