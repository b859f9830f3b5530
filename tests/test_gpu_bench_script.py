"""``bench/gpu_capture_bench.py`` runs unchanged everywhere: without CUDA it says so and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_capture_bench_exits_cleanly_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_capture_bench.py"), "--no-record"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "needs a CUDA device" in p.stdout


def test_gpu_capture_bench_measures_on_cpu_with_small_shapes():
    """The measuring code itself (model build, both arms, the failure check, the table) runs
    here with ``--device cpu`` and small shapes, so the CUDA run meets no untried code path
    but the device; a CPU run is never recorded in docs/benchmarks.md."""
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_bytes()
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_capture_bench.py"), "--device", "cpu", "--layers", "1",
                        "--tokens", "256", "--window", "128", "--batches", "1", "--k", "8", "--vocab", "4096"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| raw") or line.startswith("| capture")]
    assert len(rows) == 2, p.stdout
    for line in rows:
        tokens_s = float(line.split("|")[2].replace(",", ""))
        assert tokens_s > 0, line
    assert "not recorded" in p.stdout
    assert doc.read_bytes() == before


def test_gpu_capture_bench_rejects_a_batch_that_is_not_whole_windows():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_capture_bench.py"), "--device", "cpu", "--tokens", "100",
                        "--window", "64"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "multiple of --window" in p.stderr, p.stderr
