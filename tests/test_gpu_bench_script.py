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
