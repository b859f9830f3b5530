"""Real model shapes and corpus sizes: V = 151,936 capture and student loss memory, bytes per
kept entry with 18-bit ids, and a store of 10,000 shards.

Sections (each writes its part of docs/benchmarks.md; ``all`` runs every one):

* ``capture``: a teacher of Qwen2.5-0.5B's shapes (``Qwen2Config``: hidden 896, 14 heads,
  2 KV heads, MLP 4,864, V = 151,936, tied embeddings; 2 of its 24 layers, random init:
  costs only). One batch of 16,384 tokens (32 windows of 512). Arms, each in a fresh
  process for its peak RSS: HF's full-logit forward of the batch (``model(x).logits``) then
  top-k; the capture's runner (:class:`pipelines.inference.TeacherRunner`: decoder to
  hidden states, LM head + selection per chunk); the same runner forced to full logits per
  micro-batch (the pre-chunking capture). Throughput: tokens/s of the runner against the
  plain loop (full-logit forward + ``torch.topk``) over the same model, alternating.
* ``loss``: the student loss at V = 151,936, H = 896, N = 8,192 positions, forward and
  backward: :func:`trainer.core.fused.fused_ce_and_sparse_kd` against logits +
  :func:`trainer.core.losses.ce_and_sparse_kd_loss`; peak RSS of each in its own process.
* ``bytes``: the trained reference teacher's real distributions (People's Daily
  validation) with its 4,032 ids spread over a 151,936-row vocabulary by a fixed random
  injective map (seed 0), stored at k = 32: bytes per kept entry with 18-bit ids.
* ``store``: a synthetic store (labelled so) of 10,000 shards and 10,000,000 rows: open
  time, manifest size, verify time (threads), resume scan time, first batch time.
* ``long``: samples of 8k, 32k and 128k tokens windowed with stride: time, and every
  token's byte span checked against its bytes.

    python bench/scale_bench.py all
    python bench/scale_bench.py capture --tokens 4096     # smaller smoke run (not recorded)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._report import markdown_table, write_section  # noqa: E402

V = 151_936
QWEN = dict(vocab_size=V, hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
            tie_word_embeddings=True, max_position_embeddings=8192)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: list[str], timeout: int = 1800) -> dict:
    """Run one arm in a fresh interpreter (its own peak RSS); returns the JSON it prints."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    p = subprocess.run([sys.executable, __file__, "_arm", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- capture ------------------------------------------------------------------------------------
def qwen_shape_teacher(cache: Path, layers: int) -> Path:
    out = cache / f"qwen2.5-0.5b-shape-l{layers}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, **QWEN)).eval()
    model.save_pretrained(str(out))
    return out


def _arm_capture(mode: str, model_dir: str, tokens: int, k: int, threads: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from kdstore.format import Selection
    from pipelines.inference import BatchSpec, TeacherRunner
    from pipelines.teachers import TeacherSpec

    rng = np.random.default_rng(0)
    win = 512
    ids = [rng.integers(0, 150_000, win) for _ in range(tokens // win)]
    runner = TeacherRunner(teacher=TeacherSpec(path=model_dir, device="cpu", dtype="float32", threads=threads),
                           selection=Selection(mode="topk", k=k), batch=BatchSpec(micro_batch_tokens=tokens))
    loaded = _rss_mb()
    t0 = time.perf_counter()
    if mode == "runner":
        runner.infer(ids, list(range(len(ids))))
    elif mode == "runner-full":
        runner.model.split = None  # the pre-chunking capture: full logits per micro-batch
        runner.infer(ids, list(range(len(ids))))
    elif mode == "hf-full":  # the plain loop: one full-logit forward of the batch, then top-k
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(ids))
            logits = runner.model.module(input_ids=x).logits.reshape(-1, V)  # [tokens, V] fp32, whole
            for r0 in range(0, logits.shape[0], 1024):  # the selection itself in row chunks
                c = logits[r0:r0 + 1024]
                torch.topk(c, k, dim=-1).values - torch.logsumexp(c, -1, keepdim=True)
    else:
        raise SystemExit(f"unknown capture arm {mode}")
    return {"seconds": time.perf_counter() - t0, "peak_mb": _rss_mb(), "loaded_mb": loaded, "tokens": tokens}


def run_capture(a) -> None:
    cache = Path(a.cache)
    model = str(qwen_shape_teacher(cache, a.layers))
    args = [model, str(a.tokens), str(a.k), str(a.threads)]
    res: dict[str, list[dict]] = {"hf-full": [], "runner": [], "runner-full": []}
    for _ in range(a.reps):  # alternate, so machine load hits every arm alike
        for arm in res:
            res[arm].append(_child(["capture", arm, *args]))
    rows, med = [], {}
    labels = {"hf-full": "plain loop: HF full-logit forward of the batch + top-k",
              "runner-full": "capture runner, full logits per micro-batch (before)",
              "runner": "capture runner: hidden states, LM head + selection per chunk (now)"}
    for arm, rs in res.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            rows.append([labels[arm], "failed: " + rs[0]["error"], "", "", ""])
            continue
        med[arm] = statistics.median(r["seconds"] for r in ok)
        peak = max(r["peak_mb"] for r in ok)
        work = max(r["peak_mb"] - r["loaded_mb"] for r in ok)
        rows.append([labels[arm], f"{peak / 1024:.2f}", f"{work / 1024:.2f}", f"{a.tokens / med[arm]:,.0f}",
                     f"{med['hf-full'] / med[arm]:.2f}x" if "hf-full" in med else ""])
    table = markdown_table(["arm", "peak RSS (GiB)", "peak - model loaded (GiB)", "tokens/s (median)", "vs plain loop"], rows)
    print(table)
    if a.record:
        body = (f"Teacher: `Qwen2Config` with Qwen2.5-0.5B's shapes (hidden 896, 14/2 heads, MLP 4,864, V = {V:,}, tied "
                f"embeddings), {a.layers} of 24 layers, random init (costs only), fp32 on CPU, {a.threads} threads. One "
                f"batch of {a.tokens:,} tokens ({a.tokens // 512} windows of 512), top-{a.k}; {a.reps} alternating runs per "
                f"arm, each in a fresh process (peak RSS = `ru_maxrss`). Full fp32 logits of the batch are "
                f"{a.tokens * V * 4 / 2**30:.1f} GiB.\n\n{table}\n\nTargets: capture memory does not grow with batch "
                f"tokens x V; throughput >= 0.9x the plain loop.")
        write_section("scale-capture", f"Capture at V = {V:,}: peak memory and throughput", body,
                      command=f"python bench/scale_bench.py capture --tokens {a.tokens} --reps {a.reps}")


# -- loss ---------------------------------------------------------------------------------------
def _arm_loss(mode: str, n: int, h: int, k: int, chunk: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from trainer.core.fused import fused_ce_and_sparse_kd
    from trainer.core.losses import ce_and_sparse_kd_loss, mix

    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(n, h, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(V, h, generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    idx = torch.randint(0, V, (n, k), generator=g)
    p = torch.softmax(torch.randn(n, k, generator=g), -1) * 0.9
    tail = torch.full((n,), 0.1)
    mask = torch.ones(n, dtype=torch.bool)
    loaded = _rss_mb()
    t0 = time.perf_counter()
    if mode == "fused":
        loss, _, _ = fused_ce_and_sparse_kd(hidden, weight, labels, idx, p, tail, mask, kd_weight=0.5, chunk_size=chunk)
    else:
        ce, kd = ce_and_sparse_kd_loss(hidden @ weight.T, labels, idx, p, tail, mask)
        loss = mix(ce, kd, 0.5)
    loss.backward()
    return {"seconds": time.perf_counter() - t0, "peak_mb": _rss_mb(), "loaded_mb": loaded, "loss": float(loss.detach())}


def _avail_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def run_loss(a) -> None:
    rows = []
    # Unfused memory grows linearly in N: predicted from the last measured run (else from four fp32
    # [N, V] buffers: logits, log-softmax and their grads), so a run that would not fit is skipped.
    last: tuple[int, float] | None = None
    for mode in ("unfused", "fused"):
        for n in sorted({a.positions // 4, a.positions // 2, a.positions}):
            need = last[1] * n / last[0] + 0.5 if last else n * V * 4 * 4 / 2**30 + 2
            if mode == "unfused" and need > _avail_gb() - 2:
                rows.append([mode, n, f"skipped: needs ~{need:.1f} GiB", "", "", ""])
                continue
            r = _child(["loss", mode, str(n), "896", str(a.k), str(a.chunk), str(a.threads)])
            if mode == "unfused" and "peak_mb" in r:
                last = (n, r["peak_mb"] / 1024)
            if "error" in r:
                rows.append([mode, n, "failed: " + r["error"], "", "", ""])
                continue
            rows.append([mode, n, f"{r['peak_mb'] / 1024:.2f}", f"{(r['peak_mb'] - r['loaded_mb']) / 1024:.2f}",
                         f"{r['seconds']:.1f}", f"{r['loss']:.5f}"])
    table = markdown_table(["loss path", "positions N", "peak RSS (GiB)", "peak - inputs (GiB)", "fwd+bwd s",
                            "loss"], rows)
    print(table)
    if a.record:
        body = (f"Student loss CE + sparse KD (k = {a.k}, tail bucket), forward and backward, V = {V:,}, H = 896, fp32 "
                f"on CPU, {a.threads} threads, each run in a fresh process. Fused: LM head + loss per chunk of {a.chunk} "
                f"positions with per-chunk gradients (`trainer/core/fused.py`); unfused: `hidden @ W.T` logits then "
                f"`ce_and_sparse_kd_loss`. The inputs alone (hidden states, head weights and their gradients) are "
                f"{(2 * 896 * V + 2 * 896 * a.positions) * 4 / 2**30:.2f} GiB at N = {a.positions:,}.\n\n{table}\n\n"
                f"Target: the student loss never materialises `[N, V]` fp32 beyond one chunk (fused peak independent "
                f"of N).")
        write_section("scale-loss", f"Student loss at V = {V:,}: fused chunked vs logits", body,
                      command=f"python bench/scale_bench.py loss --positions {a.positions} --chunk {a.chunk}")


def arm_main(argv: list[str]) -> int:
    kind, mode, *rest = argv
    if kind == "capture":
        out = _arm_capture(mode, rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
    elif kind == "loss":
        out = _arm_loss(mode, *(int(x) for x in rest))
    else:
        raise SystemExit(f"unknown arm {kind}")
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_arm":
        return arm_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("section", choices=["capture", "loss", "bytes", "store", "long", "all"])
    ap.add_argument("--max-length", type=int, default=512, help="long: window length")
    ap.add_argument("--stride", type=int, default=384, help="long: window stride")
    ap.add_argument("--tokens", type=int, default=16384, help="capture: tokens per batch")
    ap.add_argument("--layers", type=int, default=2, help="capture: decoder layers of the Qwen-shaped teacher")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--positions", type=int, default=8192, help="loss: positions N")
    ap.add_argument("--chunk", type=int, default=1024, help="loss: fused chunk")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shards", type=int, default=10_000, help="store: shards")
    ap.add_argument("--rows", type=int, default=10_000_000, help="store: rows")
    ap.add_argument("--no-record", dest="record", action="store_false", help="do not write docs/benchmarks.md")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "scale_bench"))
    a = ap.parse_args(argv)
    sections = ["capture", "loss", "bytes", "store", "long"] if a.section == "all" else [a.section]
    for s in sections:
        print(f"== {s}", flush=True)
        {"capture": run_capture, "loss": run_loss, "bytes": run_bytes, "store": run_store, "long": run_long}[s](a)
    return 0


def run_long(a) -> None:
    """Long documents: tokenize + window samples of 8k-128k tokens with stride; check offsets."""
    import numpy as np

    from kdstore.hashing import sample_id
    from kdstore.textio import Record
    from pipelines.teachers import byte_len_of_id, load_tokenizer, vocabulary
    from pipelines.windows import WindowSpec, backend_tokenizer, make_windows, tokenize_batch
    from trainer.data.corpora import peoples_daily
    from trainer.lm.reference import reference_tokenizer, default_cache_dir

    hf = load_tokenizer(str(reference_tokenizer(cache_dir=default_cache_dir())))
    vocab = vocabulary(hf)
    tb, special, blen = vocab.column("bytes").to_pylist(), vocab.column("special").to_pylist(), byte_len_of_id(vocab)
    tok = backend_tokenizer(hf)
    lines = [s.text for s in peoples_daily("train")]
    rows = []
    for target in (8192, 32768, 131072):
        doc, n_lines = "", 0
        while len(tok.encode(doc).ids) < target:
            n_lines += max(1, target // 40)
            doc = "\n".join(lines[:n_lines])
        t0 = time.perf_counter()
        (ids,), (spans,) = tokenize_batch(tok, [doc], offsets=True)
        t_tok = time.perf_counter() - t0
        t0 = time.perf_counter()
        wins = make_windows(Record(text=doc, sample_id=sample_id(doc), source="doc"), ids, spans,
                            WindowSpec(max_length=a.max_length, stride=a.stride), byte_len=blen)
        t_win = time.perf_counter() - t0
        exact = total = 0
        for w in wins:
            text = w.text.encode("utf-8")
            for t, x, y in zip(w.input_ids.tolist(), w.byte_start.tolist(), w.byte_end.tolist()):
                if not special[t]:
                    total += 1
                    exact += text[x:y] == tb[t]
        tiled = np.concatenate([w.input_ids[w.context_len:] for w in wins]).tolist() == ids
        rows.append([f"{len(ids):,}", f"{len(doc.encode()):,}", len(wins), f"{t_tok * 1000:.0f}", f"{t_win * 1000:.0f}",
                     f"{exact}/{total}", "yes" if tiled else "NO"])
    table = markdown_table(["tokens", "bytes", f"windows ({a.max_length}, stride {a.stride})", "tokenize ms",
                            "window + offsets ms", "tokens whose span holds their bytes", "targets tile the sample"], rows)
    print(table)
    if a.record:
        body = (f"People's Daily train lines joined into one sample each, the reference teacher's byte-level BPE "
                f"(4,032), `--max-length {a.max_length} --stride {a.stride}`: windows of at most {a.max_length} tokens "
                f"every {a.stride}, each with its character-aligned text and the UTF-8 byte offsets of its tokens in "
                f"it.\n\n{table}")
        write_section("scale-long", "Long documents: windows with stride, exact byte offsets", body,
                      command=f"python bench/scale_bench.py long --max-length {a.max_length} --stride {a.stride}")


def run_bytes(a) -> None:
    from bench.scale_store import bytes_per_entry_study

    bytes_per_entry_study(a)


def run_store(a) -> None:
    from bench.scale_store import big_store_study

    big_store_study(a)


if __name__ == "__main__":
    sys.exit(main())
