"""Capture throughput: the Beam pipeline (``kd cache``, default local runner) against a plain
Python loop that runs the same teacher forward, the same selection and writes the same
store, on the same real text, in one run; plus bytes/token of the stores per selection mode.

* Teacher: Llama, 4 layers, hidden 256, byte-level BPE vocabulary of 8,000 (padded to
  8,000 rows) trained on People's Daily; trained briefly with next-token CE so its
  distributions are peaked like a real LM's (cached under ``.cache/bench``).
* Corpus: ``--lines`` lines of People's Daily (validation + test splits), one per line.
* Plain loop: :func:`pipelines.plain.capture_plain` (one process; torch uses all cores).
* Pipeline: :func:`pipelines.capture.run` with no runner flags, i.e. the local default
  (FnApiRunner in-process for a CPU teacher, torch using all cores); for top-k also the
  multi-process layout (one SDK process per core sharing one model, ``large_model``), the
  default for GPU teachers.
* Both time the whole capture (teacher hashing, model load, read, tokenize, infer, encode,
  write, manifest), so the pipeline pays its worker start-up in the ratio. Runs alternate
  (plain, pipeline, plain, ...) so machine load hits both alike; medians are reported.

    python bench/capture_bench.py            # the documented run (<~10 min on 2 cores)
    python bench/capture_bench.py --quick    # smoke run, nothing written to docs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # test fixtures (tiny models)
# Both sides get the same OpenMP setting (the pipeline's local default sets it too; set here
# before torch loads so the plain loop in this process has it as well).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench._report import markdown_table, write_section  # noqa: E402

MODES = {
    "topk": ["--select", "topk", "--k", "32"],
    "top_p": ["--select", "top_p", "--p", "0.95", "--max-k", "64"],
    "sample": ["--select", "sample", "--samples", "50"],
}
GROUPS = {
    "soft labels (indices, probs, tail, counts)": ("indices", "probs", "tail", "counts"),
    "input token hashes": ("tokens",),
    "text + byte offsets": ("text", "byte_start", "byte_end"),
    "row ids (sample_id, window, starts)": ("sample_id", "window", "token_start", "context_len"),
}


def build_teacher(cache: Path, *, vocab: int, hidden: int, layers: int, steps: int) -> Path:
    from trainer.data.corpora import peoples_daily
    from trainer.data.tokenizers import prepare_tokenizer
    from fixtures import make_tiny_causal_lm

    out = cache / f"teacher-v{vocab}-h{hidden}-l{layers}-s{steps}"
    if (out / "config.json").is_file():
        return out
    tok = prepare_tokenizer(kind="bpe", vocab_size=vocab, cache_dir=cache / "tokenizers")
    texts = [s.text for s in peoples_daily("train")]
    t0 = time.perf_counter()
    make_tiny_causal_lm(out, tokenizer_dir=tok, hidden=hidden, layers=layers, heads=4, init_std=0.02,
                        pad_vocab_to_multiple_of=64, train_texts=texts[:4000], train_steps=steps, train_seq_len=64,
                        train_batch=16, lr=2e-3, seed=0)
    print(f"built teacher {out.name} in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def teacher_entropy(teacher: Path, texts: list[str]) -> dict[str, float]:
    """Mean next-token entropy (nats) and mean top-p(0.95) set size of the teacher."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    tok = AutoTokenizer.from_pretrained(str(teacher))
    ent, top = [], []
    for t in texts:
        with torch.inference_mode():
            lp = model(input_ids=torch.tensor([tok(t)["input_ids"][:256]])).logits[0].double().log_softmax(-1)
        p = lp.exp()
        ent.append(float(-(p * lp).sum(-1).mean()))
        top.append(float(((p.sort(-1, descending=True).values.cumsum(-1) < 0.95).sum(-1) + 1).float().mean()))
    return {"entropy": statistics.mean(ent), "top_p": statistics.mean(top)}


def column_bytes(uri: str) -> dict[str, int]:
    """Compressed bytes per column over all shards (Parquet column-chunk metadata)."""
    import pyarrow.parquet as pq

    import kdstore

    store = kdstore.open(uri)
    out: dict[str, int] = {}
    for s in store.shards:
        md = pq.ParquetFile(store.shard_path(s), filesystem=store.location.fs).metadata
        for rg in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(rg).column(c)
                name = col.path_in_schema.split(".")[0]
                out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (SDK worker processes)."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def run_plain(args: list[str], out: str) -> dict:
    from pipelines.options import parse_args
    from pipelines.plain import capture_plain

    cfg, _ = parse_args(args + ["--output", out, "--no-progress"])
    c0 = _cpu()
    res = capture_plain(cfg)
    return {"seconds": res["seconds"], "model_seconds": res["model_seconds"], "cpu": _cpu() - c0}


def run_pipeline(args: list[str], out: str) -> dict:
    from pipelines import capture

    c0 = _cpu()
    res = capture.run(args + ["--output", out, "--no-progress"], save_main_session=False)
    return {"seconds": res["seconds"], "cpu": _cpu() - c0}


def _tables(results: dict, stores: dict[str, str], modes: list[str]) -> tuple[str, str]:
    """Throughput table (and the plain == pipeline row check, recorded in ``results``) and bytes table."""
    import kdstore

    # rows are identical between the two captures (checked, not assumed)
    for mode in modes:
        a_rows = [b.to_pydict() for b in kdstore.open(stores[f"{mode}-plain"]).iter_batches(columns=["sample_id", "window", "indices", "probs"])]
        b_rows = [b.to_pydict() for b in kdstore.open(stores[f"{mode}-pipeline"]).iter_batches(columns=["sample_id", "window", "indices", "probs"])]

        def keyed(batches):
            return {(s, w): (i, p) for d in batches for s, w, i, p in zip(d["sample_id"], d["window"], d["indices"], d["probs"])}

        results[mode]["identical"] = keyed(a_rows) == keyed(b_rows)

    rows = []
    for mode in modes:
        r = results[mode]
        plain, pipe = statistics.median(r["plain"]), statistics.median(r["pipeline"])
        model_tps = r["tokens"] / statistics.median(r["model_seconds"])
        ratios = [b / a_ for a_, b in zip(r["plain"], r["pipeline"])]
        cpu_ratio = statistics.median(r["cpu"]["pipeline"]) / statistics.median(r["cpu"]["plain"])
        multi = (f"{statistics.median(r['multiprocess']):,.0f} ({statistics.median(r['multiprocess']) / plain:.2f})"
                 if r["multiprocess"] else "–")
        rows.append([mode, r["tokens"], len(r["plain"]), f"{plain:,.0f}", f"{pipe:,.0f}",
                     f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})", f"{cpu_ratio:.2f}", multi,
                     f"{model_tps:,.0f}", "yes" if r["identical"] else "NO"])
    table1 = markdown_table(
        ["mode", "tokens", "runs each", "plain loop tok/s", "pipeline tok/s (default)", "wall ratio (range)",
         "tokens per CPU-second ratio", "multi-process pipeline tok/s (ratio)", "forward+select only tok/s", "same rows"], rows,
    )
    rows2 = []
    for mode in modes:
        uri = stores[f"{mode}-pipeline"]
        m = kdstore.open(uri).manifest
        cb = column_bytes(uri)
        n = m.totals["tokens"]
        ent = m.totals["entries"] / n
        groups = [sum(cb.get(c, 0) for c in cols) / n for cols in GROUPS.values()]
        rows2.append([mode, f"{ent:.1f}", *[f"{g:.1f}" for g in groups], f"{m.totals['bytes'] / n:.1f}"])
    table2 = markdown_table(["mode", "kept entries/token", *[f"{g} B/token" for g in GROUPS], "whole store B/token"], rows2)
    return table1, table2


def _docs_body(a: argparse.Namespace, entropy: dict, table1: str, table2: str) -> str:
    import torch

    device = a.device if a.device == "cpu" else f"{a.device} ({torch.cuda.get_device_name(0)}, bf16)"
    body = (
        f"Teacher: Llama 4 layers, hidden 256, vocab 8,000 (byte-level BPE on People's Daily), trained "
        f"{a.train_steps} steps: mean next-token entropy {entropy['entropy']:.2f} nats (uniform: 8.99), "
        f"{entropy['top_p']:.0f} tokens to reach p=0.95 — a weak, flat teacher, so top-p hits its max-k and "
        f"samples are mostly unique (a well-trained LM keeps far fewer). Corpus: People's Daily lines "
        f"(validation + test), {a.lines} for top-k, {a.mode_lines} for the other modes; windows of 256 tokens; "
        f"device: {device}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. "
        f"Top-k 32, top-p 0.95 (max 64), sample 50 draws; 8-bit sqrt code; text and byte offsets stored.\n\n"
        f"Throughput of the whole capture (start-up, model load, read, tokenize, forward, select, encode, write); "
        f"median of runs in alternating order (the machine is shared, so single runs vary; the range of "
        f"per-pair ratios is shown, and the ratio of tokens per CPU-second, which load disturbs less). "
        f"*pipeline (default)*: `kd cache` without runner flags (in-process "
        f"FnApiRunner for a CPU teacher); *multi-process*: one SDK process per core sharing one model "
        f"(`large_model`, the GPU default), one run. *forward+select only*: the plain loop's tokens per "
        f"second inside the teacher call (the ceiling for all). *same rows*: plain and pipeline stores hold "
        f"identical rows.\n\n"
        f"{table1}\n\nBytes per token of the pipeline's stores (zstd Parquet, compressed column chunks):\n\n{table2}\n\n"
        f"![capture throughput](capture_bench.png)\n"
    )
    return body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=700, help="corpus lines for the top-k comparison")
    ap.add_argument("--mode-lines", type=int, default=400, help="corpus lines for the other modes")
    ap.add_argument("--reps", type=int, default=3, help="alternating plain/pipeline repetitions for top-k")
    ap.add_argument("--train-steps", type=int, default=100, help="teacher training steps (cached)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (then bf16)")
    ap.add_argument("--no-multiprocess", dest="multiprocess", action="store_false",
                    help="skip the multi-process layout run")
    ap.add_argument("--quick", action="store_true", help="small smoke run; does not write docs/benchmarks.md")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench"))
    ap.add_argument("--out", default="", help="keep stores here (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.quick:
        a.lines, a.mode_lines, a.reps, a.train_steps = 200, 100, 1, 10
    import kdstore
    from trainer.data.corpora import peoples_daily

    cache = Path(a.cache)
    teacher = build_teacher(cache, vocab=8000, hidden=256, layers=4, steps=a.train_steps)
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="capture_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    texts = [s.text for s in peoples_daily("validation") + peoples_daily("test")]
    corpora = {}
    for name, n in (("topk", a.lines), ("other", a.mode_lines)):
        corpora[name] = work / f"corpus-{n}.txt"
        corpora[name].write_text("\n".join(texts[:n]) + "\n", encoding="utf-8")
    dtype = ["--dtype", "bfloat16"] if a.device.startswith("cuda") else []
    entropy = teacher_entropy(teacher, texts[:100])

    results: dict[str, dict[str, list]] = {}
    stores: dict[str, str] = {}
    modes = [m for m in a.modes.split(",") if m]
    for mode in modes:
        reps = a.reps if mode == "topk" else 1
        r = results.setdefault(mode, {"plain": [], "pipeline": [], "multiprocess": [], "tokens": 0, "model_seconds": [],
                                      "cpu": {"plain": [], "pipeline": [], "multiprocess": []}})
        corpus = corpora["topk" if mode == "topk" else "other"]
        base = ["--teacher", str(teacher), "--input", str(corpus), "--max-length", "256", "--device", a.device, *dtype]
        for i in range(reps):
            kinds = [("plain", run_plain, []), ("pipeline", run_pipeline, [])]
            if i % 2:  # alternate the order: a trend in machine load favours neither side
                kinds.reverse()
            if mode == "topk" and i == 0 and a.multiprocess:
                kinds.append(("multiprocess", run_pipeline, ["--direct_running_mode", "multi_processing",
                                                             "--direct_num_workers", "0"]))
            for kind, fn, extra in kinds:
                out = str(work / f"{mode}-{kind}-{i}")
                res = fn(base + MODES[mode] + extra, out)
                tokens = kdstore.open(out).manifest.totals["tokens"]
                r["tokens"] = tokens
                r[kind].append(tokens / res["seconds"])
                r["cpu"][kind].append(tokens / res["cpu"])
                if "model_seconds" in res:
                    r["model_seconds"].append(res["model_seconds"])
                stores[f"{mode}-{kind}"] = out
                print(f"{mode:6s} {kind:12s} rep {i}: {tokens} tokens in {res['seconds']:.1f}s = "
                      f"{tokens / res['seconds']:,.0f} tok/s; {res['cpu']:.1f} CPU s", flush=True)
    table1, table2 = _tables(results, stores, modes)
    print(table1)
    print()
    print(table2)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if a.quick:
        return 0
    png = ROOT / "docs" / "capture_bench.png"
    _plot(results, modes, png)
    body = _docs_body(a, entropy, table1, table2)
    write_section("capture", "Capture: Beam pipeline vs plain loop", body, command="python bench/capture_bench.py")
    return 0


def _plot(results: dict, modes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(modes))
    series = [("plain loop", "plain"), ("Beam pipeline (local default)", "pipeline"),
              ("Beam pipeline, multi-process + shared model", "multiprocess")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for j, (label, key) in enumerate(series):
        vals = [statistics.median(results[m][key]) if results[m].get(key) else 0.0 for m in modes]
        if any(vals):
            ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=label)
    ax.set_xticks(x, modes)
    ax.set_ylabel("tokens / s (whole capture)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8, frameon=False)
    ax.set_title("Capture throughput, same teacher and corpus (2-core CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
