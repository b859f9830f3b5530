"""End-to-end cascade on a small slice of the real sentiment set: stages A -> split -> B -> C,
checked against the stores by sample id, then restarts and stale-stage errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import kdstore
from trainer.classify import cascade_targets as T
from trainer.classify.cascade import CascadeConfig, StaleStageError, apply_overrides, main, run_cascade

TINY = [
    "train_limit=240", "eval_limit=80", "test_limit=80", "max_len=48", "threads=1",
    "a_d_model=16", "a_n_heads=2", "a_d_ff=32", "a_n_layers=1", "a_max_steps=12", "a_eval_every=6", "a_batch_size=32",
    "b_d_model=16", "b_lstm_hidden=16", "b_max_steps=8", "b_eval_every=4",
    "c_d_model=16", "c_cnn_channels=8", "c_max_steps=16", "c_eval_every=4", "c_patience=2", "threshold=0.5",
]


def _store_rows(path) -> dict[str, tuple[np.ndarray, int]]:
    """sample id -> (dense class probabilities, label), decoded independently of the cascade code."""
    store = kdstore.open(str(path))
    out = {}
    c = store.manifest.teacher.vocab_size
    for batch in store.iter_batches():
        d = store.decode(batch)
        for r, sid in enumerate(d.sample_id):
            p = np.zeros(c, np.float32)
            lo, hi = d.entry_offsets[r], d.entry_offsets[r + 1]
            p[d.indices[lo:hi]] = d.probs[lo:hi]
            out[sid] = (p, int(d.label[r]))
    return out


def _records(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): json.loads(p.read_text())["finished_at"] + json.loads(p.read_text())["fingerprint"]
            for p in root.rglob("*.step.json")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    cfg = apply_overrides(CascadeConfig(run_dir=str(root)), TINY)
    summary = run_cascade(cfg, progress=False)
    return root, cfg, summary


def test_split_obeys_threshold_on_the_cached_store(run_dir):
    root, cfg, summary = run_dir
    a = _store_rows(root / "a/store")
    train = [json.loads(x) for x in (root / "data/train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(a) == {r["sample_id"] for r in train} and len(a) == 240
    split = T.Split.read(root / "a/split/split.parquet")
    assert split.threshold == cfg.threshold and len(split.sample_ids) == 240
    for sid, score, target, label in zip(split.sample_ids, split.scores, split.target, split.labels):
        probs, stored_label = a[sid]
        assert stored_label == label
        assert score == pytest.approx(float(probs[label]), abs=1e-7)
        assert bool(target) == (score >= cfg.threshold)
    assert summary["split"]["target"] + summary["split"]["substandard"] == 240
    assert summary["split"]["substandard"] > 0 and summary["split"]["target"] > 0
    assert (root / "a/split/scores.png").stat().st_size > 0 and (root / "a/model/curve.png").stat().st_size > 0


def test_b_sees_only_substandard_samples(run_dir):
    root, _, summary = run_dir
    split = T.Split.read(root / "a/split/split.parquet")
    sub = set(split.substandard_ids)
    b_inputs = [json.loads(x)["sample_id"] for x in (root / "a/split/substandard.jsonl").read_text(encoding="utf-8").splitlines()]
    assert set(b_inputs) == sub and len(b_inputs) == len(sub)
    assert summary["b"]["train_samples"] == len(sub)
    assert set(_store_rows(root / "b/store")) == sub


def test_c_targets_come_from_the_right_teacher_per_sample(run_dir):
    root, _, summary = run_dir
    split = T.Split.read(root / "a/split/split.parquet")
    a, b = _store_rows(root / "a/store"), _store_rows(root / "b/store")
    table = pq.read_table(root / "c/model/targets.parquet").to_pylist()
    assert len(table) == 240
    is_target = dict(zip(split.sample_ids, split.target))
    for row in table:
        sid = row["sample_id"]
        want_src, store = ("a", a) if is_target[sid] else ("b", b)
        assert row["source"] == want_src
        np.testing.assert_allclose(row["probs"], store[sid][0], rtol=1e-6)
    assert summary["c"]["teacher_counts"] == {"gold": 0, "a": summary["split"]["target"], "b": summary["split"]["substandard"]}
    assert summary["c"]["arch"] == "textcnn" and summary["c"]["steps"] <= 16
    assert 0.0 <= summary["c"]["test"]["acc"] <= 1.0 and summary["c_vs_a"]["parameter_ratio"] > 0


def test_restart_skips_current_steps_and_redoes_stale_ones(run_dir, capsys):
    root, cfg, _ = run_dir
    before = _records(root)
    run_cascade(cfg, progress=False)
    assert _records(root) == before  # nothing redone
    assert "a/model: up to date, skipped" in capsys.readouterr().out

    # A new threshold keeps A (model and store) but redoes the split, B and C.
    cfg2 = apply_overrides(cfg, ["threshold=0.51"])
    run_cascade(cfg2, progress=False)
    after = _records(root)
    for step in ("data.step.json", "a/model.step.json", "a/store.step.json"):
        assert after[step] == before[step]
    for step in ("a/split.step.json", "b/model.step.json", "b/store.step.json", "c/model.step.json"):
        assert after[step] != before[step]

    # Stage C alone with a changed A setting: A's outputs are stale -> a clear error, nothing run.
    with pytest.raises(StaleStageError, match="a/model.*changed: a_lr"):
        run_cascade(apply_overrides(cfg2, ["a_lr=0.01"]), stage="c", progress=False)
    # Other students share A and B: a gold-only student in its own directory runs stage c alone.
    s = run_cascade(apply_overrides(cfg2, ["c_teachers=gold", "c_out=c_gold", "c_max_steps=4"]), stage="c", progress=False)
    assert s["c"]["teacher_counts"] == {"gold": 240, "a": 0, "b": 0}
    assert _records(root)["c/model.step.json"] == after["c/model.step.json"]


def test_cli_errors_and_print_config(run_dir, capsys):
    root, _, _ = run_dir
    assert main(["--print-config", f"run_dir={root}", "threshold=0.7"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == 0.7
    with pytest.raises(SystemExit):
        main(["threshol=0.7"])
    assert "did you mean threshold" in capsys.readouterr().err
    rc = main([f"run_dir={root}", *TINY, "a_lr=0.02", "--stage", "b", "--no-progress"])
    assert rc == 2 and "changed: a_lr" in capsys.readouterr().err
