"""Capture throughput on CUDA at V = 151,936, k = 128: the capture's teacher runner against a
raw bf16 forward of the same model (what the GPU must do anyway).

* Teacher: ``Qwen2Config`` with Qwen2.5-0.5B's shapes (24 layers, hidden 896, 14/2 heads,
  MLP 4,864, V = 151,936, tied embeddings), random init, bf16 (costs only).
* Raw forward: ``model(input_ids).logits`` per batch, nothing else (the ceiling).
* Capture runner: :class:`pipelines.inference.TeacherRunner` (decoder to hidden states,
  LM head + softmax + top-128 per chunk, sparse arrays copied to the host) on the same
  batches: what ``kd cache`` runs per ``RunInference`` batch.
* ``--batches`` batches of ``--tokens`` tokens (windows of ``--window``), after one
  warm-up batch each; arms alternate; CUDA synchronised around every timing; peak CUDA
  memory per arm.

    python bench/gpu_capture_bench.py                # on a CUDA machine; writes docs/benchmarks.md
    python bench/gpu_capture_bench.py --no-record    # print only

Without CUDA it says so and exits 0 (CI and CPU machines run nothing). ``--device cpu`` with
small shapes runs the same measuring code on the CPU (a smoke test of the script, never
recorded: ``tests/test_gpu_bench_script.py``). A capture batch that fails (the runner returns
its reason, e.g. out of memory) stops the benchmark with that reason: no figure from failed
batches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

V = 151_936


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per batch")
    ap.add_argument("--window", type=int, default=2048, help="tokens per window")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=V, help="vocabulary size (the target is 151,936; smaller for a smoke run)")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run of the script, not recorded)")
    ap.add_argument("--no-record", dest="record", action="store_false")
    a = ap.parse_args(argv)
    import torch

    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu_capture_bench: needs a CUDA device (torch.cuda.is_available() is False); nothing to measure here.")
        return 0
    if a.tokens % a.window or a.tokens < a.window:
        ap.error(f"--tokens ({a.tokens}) must be a multiple of --window ({a.window})")
    with tempfile.TemporaryDirectory(prefix="gpu-capture-") as d:
        return _run(a, Path(d), cuda)


def _run(a: argparse.Namespace, tmp: Path, cuda: bool) -> int:
    import torch
    import numpy as np
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bench._report import markdown_table, write_section
    from kdstore.format import Selection
    from pipelines.inference import BatchSpec, TeacherRunner
    from pipelines.teachers import TeacherSpec

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=a.vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=a.layers,
                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=max(8192, a.window))
    model_dir = tmp / "qwen-shape"
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(model_dir))
    runner = TeacherRunner(teacher=TeacherSpec(path=str(model_dir), device=a.device, dtype="bfloat16"),
                           selection=Selection(mode="topk", k=a.k),
                           batch=BatchSpec(micro_batch_tokens=a.tokens, pad_multiple=64))
    model = runner.model.module
    rng = np.random.default_rng(0)
    batches = [[rng.integers(0, min(150_000, a.vocab), a.window) for _ in range(a.tokens // a.window)] for _ in range(a.batches + 1)]
    device = next(model.parameters()).device

    def raw(batch):
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(batch)).to(device)
            model(input_ids=x).logits  # noqa: B018 - the forward is the work

    def capture(batch):
        out = runner.infer(batch, list(range(len(batch))))
        failed = [o for o in out if isinstance(o, str)]
        if failed:  # the runner reports failures as reasons; timing them would flatter the arm
            raise SystemExit(f"gpu_capture_bench: {len(failed)} of {len(out)} capture windows failed: {failed[0]}")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {"raw bf16 forward (logits only)": [], "capture runner (top-k, host arrays)": []}
    peaks: dict[str, float] = {}
    fns = dict(zip(times, (raw, capture)))
    for name, fn in fns.items():  # warm-up: kernels, allocator
        fn(batches[0])
    for b in batches[1:]:
        for name, fn in fns.items():
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn(b)
            sync()
            times[name].append(time.perf_counter() - t0)
            if cuda:
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
    raw_s = statistics.median(times["raw bf16 forward (logits only)"])
    rows = [[name, f"{a.tokens / statistics.median(ts):,.0f}", f"{raw_s / statistics.median(ts):.2f}x",
             f"{peaks[name]:.2f}" if cuda else "-"] for name, ts in times.items()]
    table = markdown_table(["arm", "tokens/s (median)", "vs raw forward", "peak CUDA memory (GiB)"], rows)
    print(table)
    if a.record and not cuda:
        print("(not recorded: a run on a device other than CUDA is a smoke run of the script)")
    elif a.record:
        body = (f"Device: {torch.cuda.get_device_name(0)}. Teacher: Qwen2.5-0.5B shapes ({a.layers} layers, V = {a.vocab:,}), "
                f"random init, bf16. {a.batches} batches of {a.tokens:,} tokens (windows of {a.window}), top-{a.k}, "
                f"arms alternating, medians.\n\n{table}")
        write_section("gpu-capture", f"Capture on CUDA at V = {a.vocab:,}, k = {a.k}", body,
                      command=f"python bench/gpu_capture_bench.py --tokens {a.tokens} --window {a.window} --batches {a.batches} "
                              f"--k {a.k} --layers {a.layers} --vocab {a.vocab} --device {a.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
