"""Continual multi-task pre-training (seed 004): what each strategy keeps, and what it buys downstream.

Arms, all at the same total steps (5 stages x ``--stage-steps``) on one small encoder:

* ``sequential`` (ERNIE 2.0): stage s trains tasks 1..s;
* ``multitask``: all tasks in every stage;
* ``continual``: stage s trains task s only;
* ``sequential-plain``: sequential, with plain token masking in place of knowledge masking.

After every stage each task is scored on held-out articles (the stage x task matrix, heatmap
``docs/img/continual_matrix.png``); the final encoders and a random-init encoder of the same
architecture are fine-tuned on sentiment and People's Daily POS tagging over ``--seeds``
seeds. Everything is sized for a shared 2-core CPU (~15 minutes); numbers are small-run
numbers and the timings noisy.

    python bench/continual_bench.py [--stage-steps 60] [--seeds 3] [--finetune-steps 150]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import markdown_table, write_section  # noqa: E402

TASKS = ["knowledge_mask", "token_doc", "reorder", "distance", "kd"]
ARMS = {
    "sequential": ("sequential", TASKS),
    "multitask": ("multitask", TASKS),
    "continual": ("continual", TASKS),
    "sequential-plain": ("sequential", ["token_mask"] + TASKS[1:]),
}
METRIC = {"knowledge_mask": "masked-token acc (whole words/entities masked)", "token_mask": "same held-out set as knowledge_mask",
          "token_doc": "word acc", "reorder": "permutation acc (6 classes)", "distance": "acc (3 classes)",
          "kd": "top-1 agreement with the teacher"}


def heatmap(results: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 3.8))
    for ax, (arm, r) in zip(np.atleast_1d(axes), results.items()):
        tasks = r["tasks"]
        stages = sorted(r["matrix"], key=int)
        m = np.array([[r["matrix"][s][t] for t in tasks] for s in stages])
        # Per-task scale (each column's best = 1) so tasks of different chance levels share one colour map.
        col_max = np.array([max(results[a]["matrix"][s][t] for a in results if t in results[a]["tasks"]
                                for s in results[a]["matrix"]) for t in tasks])
        ax.imshow(m / np.maximum(col_max, 1e-9), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                trained = any(tasks[j] in st for st in r["stage_tasks"][: i + 1])
                ax.text(j, i, f"{m[i, j]:.2f}" + ("" if trained else "*"), ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] / max(col_max[j], 1e-9) < 0.6 else "black")
        ax.set_xticks(range(len(tasks)), [t.replace("_", "\n") for t in tasks], fontsize=8)
        ax.set_yticks(range(len(stages)), [f"after stage {s}" for s in stages], fontsize=8)
        ax.set_title(arm)
    fig.suptitle("held-out metric per task after each stage (* = task not trained yet); colour: share of the best arm",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stores(args, work: Path) -> tuple[dict[str, str], float]:
    """The reference teacher's stores over the training and validation articles (cached)."""
    from trainer.continual.store import capture_articles  # noqa: PLC0415

    t0 = time.perf_counter()
    stores = {}
    for split, kw in (("train", {"doc_limit": args.doc_limit}), ("validation", {"line_limit": 200})):
        uri = work / f"store-{split}-{args.doc_limit}"
        if not (uri / "manifest.json").exists():
            print(f"[bench] capturing the reference teacher over {split} articles ...", flush=True)
            capture_articles(uri, split=split, max_length=64, k=16, **kw)
        stores[split] = str(uri)
    t_store = time.perf_counter() - t0
    return stores, t_store


def _pretrain(args, work: Path, stores: dict[str, str]) -> tuple[dict, dict]:
    """Every strategy's pre-training run (restartable: finished arms are reused)."""
    from trainer.continual.config import load_config  # noqa: PLC0415
    from trainer.continual.loop import train  # noqa: PLC0415
    from trainer.continual.schedule import parse_stages  # noqa: PLC0415
    from trainer.core.config import to_dict  # noqa: PLC0415

    common = [f"stage_steps={args.stage_steps}", "d_model=64", "n_layers=2", "n_heads=4", "d_ff=128", "max_len=64",
              "batch_size=16", "lr=2e-3", "warmup_steps=20", f"doc_limit={args.doc_limit}", "eval_examples=128",
              f"kd_store={stores['train']}", f"kd_eval_store={stores['validation']}", "progress=false", "log_every=20"]
    results, times = {}, {}
    for arm, (strategy, tasks) in ARMS.items():
        t1 = time.perf_counter()
        cfg = load_config(None, common + [f"strategy={strategy}", f"tasks={','.join(tasks)}", f"out_dir={work / arm}"])
        done, cfg_file = work / arm / "result.json", work / arm / "config.json"
        saved = None
        if done.exists() and cfg_file.exists() and not args.fresh and done.stat().st_mtime >= cfg_file.stat().st_mtime:
            old = json.loads(cfg_file.read_text())
            old.pop("resolved_stages", None)
            saved = json.loads(done.read_text()) if old == to_dict(cfg) else None
        if saved:
            r = saved  # finished earlier with these settings (the bench is restartable)
            print(f"[bench] {arm}: reusing {done}", flush=True)
        else:
            r = train(cfg)
        r["stage_tasks"] = [list(st.tasks) for st in parse_stages(r["stages"], stage_steps=args.stage_steps)]
        r["extras"] = [json.loads(x) for x in (work / arm / "metrics.jsonl").read_text().splitlines()]
        results[arm] = r
        times[arm] = r["train_seconds"] if r is saved else time.perf_counter() - t1
        print(f"[bench] {arm}: {times[arm]:.0f} s, final {r['matrix'][str(len(r['stage_tasks']))]}", flush=True)

    return results, times


def _downstream(args, work: Path, results: dict) -> tuple[dict, float]:
    """Fine-tuning each pre-trained encoder (and from scratch) on sentiment and POS, per seed."""
    from trainer.continual.finetune import FinetuneConfig, finetune  # noqa: PLC0415

    down: dict[str, dict[str, list[float]]] = {}
    cache_path = work / "downstream.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() and not args.fresh else {}
    t2 = time.perf_counter()
    for task in ("sentiment", "pos"):
        for arm in list(ARMS) + ["scratch"]:
            for seed in range(args.seeds):
                enc = "" if arm == "scratch" else results[arm]["encoder"]
                fc = FinetuneConfig(task=task, encoder=enc, model_from=results["sequential"]["encoder"],
                                    steps=args.finetune_steps, batch_size=16, train_limit=3000,
                                    eval_limit=1000 if task == "sentiment" else 300, seed=seed)
                key = f"{task}|{arm}|{seed}|{args.finetune_steps}|{results[arm if arm != 'scratch' else 'sequential']['stages']}"
                if key not in cache:
                    cache[key] = finetune(fc)["metric"]
                    cache_path.write_text(json.dumps(cache, indent=1))
                down.setdefault(task, {}).setdefault(arm, []).append(cache[key])
            print(f"[bench] {task} {arm}: {down[task][arm]}", flush=True)
    t_down = time.perf_counter() - t2

    return down, t_down


def _report(args, work: Path, results: dict, times: dict, down: dict, t_store: float, t_down: float) -> str:
    heatmap(results, ROOT / "docs" / "img" / "continual_matrix.png")
    body = [
        f"Encoder: BERT-style, d_model 64, 2 layers, 4 heads, d_ff 128, max_len 64 "
        f"({results['sequential']['encoder_parameters']:,} encoder parameters, vocabulary 4,035 = the reference "
        f"teacher's padded BPE 4,032 + [MASK]/[CLS]/[SEP]). {args.doc_limit} People's Daily training articles; "
        f"held-out: the validation articles ({128} examples per task). Batch 16, AdamW lr 2e-3, 20 warm-up steps then constant "
        f"(lr_schedule=constant). {len(TASKS)} stages x {args.stage_steps} steps = {len(TASKS) * args.stage_steps} steps per arm, one task "
        f"per step. kd: reference teacher (4.2M params) top-16 store over the same {args.doc_limit} articles, "
        f"64-token windows, loss 0.5 CE + 0.5 KL.",
        "",
        "Metrics (higher is better): " + "; ".join(f"{t}: {m}" for t, m in METRIC.items()) + ".",
        "",
        "### Stage x task matrix (held-out metric after each stage)",
        "",
        "![stage x task](img/continual_matrix.png)",
        "",
    ]
    for arm, r in results.items():
        rows = []
        for s in sorted(r["matrix"], key=int):
            rows.append([f"after stage {s} ({', '.join(r['stage_tasks'][int(s) - 1])})"]
                        + [r["matrix"][s][t] for t in r["tasks"]])
        body += [f"**{arm}** ({times[arm]:.0f} s)", "", markdown_table(["stage"] + r["tasks"], rows), ""]
    # Forgetting: each task's best held-out value over the stages vs its value at the end.
    rows = []
    for arm, r in results.items():
        last = str(len(r["stage_tasks"]))
        drops = [max(r["matrix"][s][t] for s in r["matrix"]) - r["matrix"][last][t] for t in r["tasks"]]
        rows.append([arm] + [r["matrix"][last][t] for t in r["tasks"]] + [statistics.mean(drops)])
    body += ["### Final held-out metrics and forgetting", "",
             markdown_table(["arm"] + [t if t != "knowledge_mask" else "mask task" for t in TASKS]
                            + ["mean drop from best stage"], rows), ""]
    ent = []
    for arm, r in results.items():
        mask_task = r["tasks"][0]
        last = [x for x in r["extras"] if x.get("event") == "stage_eval" and x["task"] == mask_task][-1]
        ent.append([arm, mask_task, last["word_acc"], last["entity_acc"], last["token_acc"]])
    body += ["Masking tasks on the same held-out sets (final encoders): whole-word/entity-masked accuracy, its entity "
             "tokens only, and single-token-masked accuracy.", "",
             markdown_table(["arm", "mask task", "word/entity masked acc", "entity tokens acc", "single-token masked acc"], ent), ""]
    rows = []
    for arm in list(ARMS) + ["scratch"]:
        rows.append([arm] + [f"{statistics.mean(down[t][arm]):.4f} ± {statistics.pstdev(down[t][arm]):.4f}"
                             for t in ("sentiment", "pos")])
    body += [f"### Downstream: fine-tuned {args.finetune_steps} steps (batch 16), mean ± std over {args.seeds} seeds", "",
             "Sentiment: 3,000 training reviews, test accuracy on 1,000; POS: 3,000 training lines of training "
             "articles, word accuracy on 300 test-article lines (tag = gold People's Daily POS, 40 tags).", "",
             markdown_table(["encoder", "sentiment acc", "POS word acc"], rows), "",
             f"Wall time: store capture {t_store:.0f} s, pre-training {sum(times.values()):.0f} s, fine-tuning "
             f"{t_down:.0f} s (shared, loaded 2-core machine: timings are noisy).", ""]
    text = "\n".join(body)
    print(text)
    (work / "bench.json").write_text(json.dumps({"matrix": {a: r["matrix"] for a, r in results.items()},
                                                 "downstream": down, "times": times}, indent=2))
    return text



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage-steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--doc-limit", type=int, default=300, help="training articles (the kd store covers the same ones)")
    ap.add_argument("--work", default="/tmp/kdstore-continual-bench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="retrain arms whose result.json is already in --work")
    args = ap.parse_args()

    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    stores, t_store = _stores(args, work)
    results, times = _pretrain(args, work, stores)
    down, t_down = _downstream(args, work, results)
    text = _report(args, work, results, times, down, t_store, t_down)
    if not args.no_write:
        write_section("continual", "Continual multi-task pre-training (seed 004)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
