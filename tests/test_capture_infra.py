"""Cluster launch material: scripts parse (bash -n), the worker image builds on Beam's SDK
image with this package, and every script drives the capture module."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "infra").rglob("*.sh"))


def test_scripts_exist():
    assert {p.relative_to(ROOT).as_posix() for p in SCRIPTS} >= {
        "infra/dataflow/launch.sh", "infra/flink/run.sh", "infra/spark/run.sh",
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_script_parses_and_runs_the_capture(script):
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "python -m pipelines.capture" in text and "--teacher" in text


def test_dataflow_script_gpu_variant_pins_one_model_per_gpu():
    text = (ROOT / "infra" / "dataflow" / "launch.sh").read_text()
    assert "worker_accelerator=type:" in text and "no_use_multiple_sdk_containers" in text
    assert "--device cuda" in text and "--sdk_container_image" in text
    # missing configuration is reported, not silently defaulted
    res = subprocess.run(["bash", str(ROOT / "infra" / "dataflow" / "launch.sh"), "cpu"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert res.returncode != 0 and "set PROJECT" in res.stderr


def test_dockerfile_builds_on_beam_sdk_image_with_this_package():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    assert "FROM apache/beam_python${PY_VERSION}_sdk:${BEAM_VERSION}" in text
    assert "COPY pipelines" in text and "COPY kdstore" in text and "pip install" in text
    import apache_beam

    assert f"BEAM_VERSION={apache_beam.__version__}" in text  # image matches the pinned SDK
