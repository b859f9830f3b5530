"""The main job, timed from a cold cache, and the reference teacher against a 1/4-size student.

1. ``kd demo`` with its defaults and an empty cache directory (what a fresh machine does:
   tokenizer, reference teacher, Beam capture, fidelity, KD student and CE baseline,
   report) -- wall time per phase against the 15-minute budget (teacher: 10 minutes);
2. the reference student (``RECIPES[recipe + "-student"]``: about 1/4 of the teacher's
   parameters, trained the same way -- CE, same data, steps, schedule) next to the
   reference teacher, held-out perplexity on the People's Daily validation split.

    python bench/demo_bench.py [--recipe cpu] [--cache-dir DIR] [--keep]

The cache directory is created empty (a temporary one unless ``--cache-dir`` names a new
directory), so the teacher is always trained inside the timed run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import markdown_table, write_section  # noqa: E402

BUDGET_S, TEACHER_BUDGET_S = 15 * 60, 10 * 60


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="cpu", help="reference recipe (trainer.lm.reference.RECIPES)")
    ap.add_argument("--cache-dir", default=None, help="a new (empty) cache directory; default: a temporary one")
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache and demo output")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from trainer.demo import DemoConfig, run_demo
    from trainer.lm.reference import RECIPES, reference_student_baseline

    tmp = Path(tempfile.mkdtemp(prefix="kd-demo-bench-"))
    cache = Path(args.cache_dir) if args.cache_dir else tmp / "cache"
    if cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"{cache} is not empty: the benchmark times a cold start; pass a new directory")
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    report = run_demo(DemoConfig(out_dir=str(tmp / "demo"), cache_dir=str(cache), recipe=args.recipe,
                                 progress=not args.no_progress))
    demo_wall, demo_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # The teacher is cached now; this trains only the 1/4-size student (same recipe).
    t1 = time.perf_counter()
    base = reference_student_baseline(cache_dir=cache, recipe=args.recipe, progress=not args.no_progress)
    student_wall = time.perf_counter() - t1

    tm = report["timings"]
    phases = [["data", tm["data_s"]], ["reference teacher (trained)", tm["teacher_s"]], ["Beam capture", tm["capture_s"]],
              ["fidelity check", tm["fidelity_s"]], ["KD student + CE baseline", tm["students_s"]],
              ["report + plots", tm["report_s"]], ["**total**", tm["total_s"]]]
    phase_table = markdown_table(["phase", "wall s"], phases)
    runs = report["runs"]
    demo_table = markdown_table(
        ["model", "parameters", "held-out CE", "perplexity", "KL to teacher"],
        [["teacher", f"{report['teacher']['parameters']:,}", report["teacher"]["eval_ce"], report["teacher"]["eval_ppl"], "-"],
         [f"student (KD from store, a={report['config']['kd_weight']})", f"{runs['student']['parameters']:,}",
          runs["student"]["eval_ce"], runs["student"]["eval_ppl"], runs["student"]["eval_kl"]],
         ["baseline (CE only)", f"{runs['baseline']['parameters']:,}", runs["baseline"]["eval_ce"],
          runs["baseline"]["eval_ppl"], runs["baseline"]["eval_kl"]]])
    t, s = base["teacher"], base["student"]
    ref_table = markdown_table(
        ["model", "preset", "parameters", "steps", "train s", "median step ms", "held-out CE", "perplexity"],
        [[name, r["recipe"]["model"], f"{r['parameters']:,}", r["steps"], r["train_seconds"], r["step_time_median"] * 1000,
          r["eval_ce"], r["eval_ppl"]] for name, r in (("reference teacher", t), ("reference student (1/4)", s))])
    r = RECIPES[args.recipe]
    verdict = {
        "demo_within_15_min": demo_wall <= BUDGET_S,
        "teacher_within_10_min": t["wall_seconds"] <= TEACHER_BUDGET_S,
        "teacher_better_than_student": t["eval_ppl"] < s["eval_ppl"],
        "param_ratio": base["param_ratio"], "ppl_ratio": base["ppl_ratio"], "ce_gap": s["eval_ce"] - t["eval_ce"],
    }
    print(phase_table + "\n\n" + demo_table + "\n\n" + ref_table + "\n" + json.dumps(verdict, indent=1))
    body = f"""
`kd demo` with its defaults from an empty cache directory (tokenizer and reference teacher trained inside the timed
run), torch threads {torch.get_num_threads()}, `os.cpu_count()` = {os.cpu_count()}. Wall {demo_wall:.0f} s
({demo_wall / 60:.1f} min; budget 15 min: **{verdict['demo_within_15_min']}**), process CPU {demo_cpu:.0f} s
(Beam workers and DataLoader workers not included).

{phase_table}

{demo_table}

Reference models (recipe `{args.recipe}`: {r.max_steps} steps x {r.batch_size} windows x {r.seq_len} tokens, lr {r.lr},
embeddings x{r.lr_embed_mult:g}, {r.precision} precision; CE on the People's Daily train split, held-out = the
validation split, {t['eval_tokens']:,} tokens). The teacher trained in {t['wall_seconds']:.0f} s wall (budget 10 min:
**{verdict['teacher_within_10_min']}**); the student recipe differs only in the model preset ({student_wall:.0f} s here).

{ref_table}

Teacher/student parameters {verdict['param_ratio']:.1f}x; student/teacher perplexity {verdict['ppl_ratio']:.3f}
(held-out CE gap {verdict['ce_gap']:.3f} nats/token).
"""
    write_section("demo", "`kd demo` from a cold cache; reference teacher vs a 1/4-size student", body)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
