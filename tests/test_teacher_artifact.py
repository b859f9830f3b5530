"""The shipped reference teacher (trainer/lm/artifacts/): checksums, recipe key, the
materialized model directory, a corrupted copy's error, the first steps of the recipe
replayed bit for bit, and the wheel carrying the files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from trainer.lm import artifact
from trainer.lm.reference import RECIPES, reference_info

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped() -> Path:
    path = artifact.shipped_artifact("cpu")
    assert path is not None, f"no artifact for recipe 'cpu' under {artifact.ARTIFACT_ROOT}"
    return path


def test_shipped_artifact_verifies_and_is_the_output_of_this_codes_recipe(shipped):
    info = artifact.verify_artifact(shipped)
    artifact.check_recipe(info, shipped)  # recipe fields and cache key (tokenizer, text hash, version) match
    assert set(info["files"]) == set(artifact.SHIPPED_FILES)
    assert shipped.name == f"{RECIPES['cpu'].name}-{info['key']}"
    # a few MB: fp16 weights of 4.2M parameters
    assert (shipped / artifact.WEIGHTS).stat().st_size < 9_000_000
    assert info["reference"]["parameters"] == 4_196_608


def test_shipped_quality_bar_is_recorded_and_rounding_costs_little(shipped):
    info = artifact.artifact_info(shipped)
    fp32, ship = info["eval"]["fp32"], info["eval"]["shipped"]
    assert abs(ship["ppl"] / fp32["ppl"] - 1) < 1e-3  # fp16 storage: under 0.1 % perplexity
    # the teacher clearly beats the 1/4-size student trained by the same recipe
    s = info["student_baseline"]
    assert info["reference"]["parameters"] / s["parameters"] > 3.5
    assert s["eval_ppl"] / ship["ppl"] > 1.2


def test_materialized_teacher_holds_the_shipped_weights_and_is_reused(shipped, tmp_path):
    from safetensors.torch import load_file

    info = artifact.artifact_info(shipped)
    d = artifact.materialize(shipped, cache_dir=tmp_path)
    got, want = load_file(str(d / "model.safetensors")), load_file(str(shipped / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float())
    ref = reference_info(d)
    assert ref["eval_ppl"] == info["eval"]["shipped"]["ppl"] and ref["artifact_sha256"] == info["files"]["model.safetensors"]
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert artifact.materialize(shipped, cache_dir=tmp_path) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    # the fp16-rounded weights are not the recipe's fp32 output: the rebuild comparison says so
    assert not artifact.compare_rebuild(d, shipped)["identical"]


def test_held_out_perplexity_of_the_shipped_weights_is_the_recorded_one(shipped, tmp_path):
    d = artifact.materialize(shipped, cache_dir=tmp_path)
    ev = artifact.heldout_eval(d)
    rec = artifact.artifact_info(shipped)["eval"]["shipped"]
    assert ev["tokens"] == rec["tokens"]
    assert ev["ppl"] == pytest.approx(rec["ppl"], rel=1e-5)


@pytest.mark.parametrize("damage", ["flip", "missing", "key"])
def test_a_damaged_artifact_is_refused_with_the_rebuild_advice(shipped, tmp_path, damage):
    bad = tmp_path / shipped.name
    shutil.copytree(shipped, bad)
    if damage == "flip":
        f = bad / "model.safetensors"
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        f.write_bytes(bytes(raw))
    elif damage == "missing":
        (bad / "tokenizer.json").unlink()
    else:
        meta = json.loads((bad / "artifact.json").read_text())
        meta["key"] = "0" * 16
        (bad / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(artifact.ArtifactError, match="--rebuild-teacher") as exc:
        artifact.materialize(bad, cache_dir=tmp_path / "cache")
    assert str(bad) in str(exc.value)
    assert not (tmp_path / "cache" / "reference" / f"{bad.name}-shipped").exists()


def test_kd_demo_with_a_corrupted_artifact_exits_with_the_message(shipped, tmp_path, monkeypatch, capsys):
    from trainer.demo import main

    root = tmp_path / "artifacts"
    shutil.copytree(shipped, root / shipped.name)
    f = root / shipped.name / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    monkeypatch.setattr(artifact, "ARTIFACT_ROOT", root)
    rc = main(["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "corrupted" in err and "kd demo --rebuild-teacher" in err and str(f) in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_recipe_replays_its_first_steps_bit_for_bit(shipped, tmp_path):
    info = artifact.artifact_info(shipped)
    why = artifact.reproducibility_gap(info)
    if why:
        pytest.skip(why)
    res = artifact.replay_early_steps(shipped, out_dir=tmp_path / "run")
    assert res["logged"], "the artifact records no early steps"
    for step, recorded, replayed in res["logged"]:
        assert replayed == recorded, f"step {step}: loss/grad-norm {replayed} != build's {recorded}"
    assert res["expected_digest"] is not None and res["digest"] == res["expected_digest"]
    assert res["identical"]


@pytest.mark.slow
def test_the_wheel_carries_the_artifact(tmp_path, shipped):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("kdstore-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in (*artifact.SHIPPED_FILES, "artifact.json"):
        assert f"trainer/lm/artifacts/{shipped.name}/{f}" in names


def test_demo_uses_the_shipped_teacher_by_default(shipped, tmp_path, capsys):
    from trainer.demo import DemoConfig, _teacher

    d = _teacher(DemoConfig(cache_dir=str(tmp_path), progress=False), tmp_path)
    assert d == tmp_path / "reference" / f"{shipped.name}-shipped"
    assert "sha256 verified" in capsys.readouterr().out
    assert reference_info(d)["artifact_sha256"] == artifact.artifact_info(shipped)["files"]["model.safetensors"]
