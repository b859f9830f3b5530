"""``tensorboard=true``: every metrics.jsonl record also lands in TensorBoard event files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.core.config import TrainConfig, apply_overrides
from trainer.core.runlog import RunLog
from trainer.core.runtime import Dist


def _scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _dist():
    return Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), started=False)


def _log_steps(log, steps):
    for s in steps:
        log.train(s, {"loss": [1.0 / s, 2.0 / s], "ce": [0.5], "kd": [float("nan")], "step_s": [0.1], "tokens": [100]}, world=1)


def test_records_become_scalars_next_to_metrics_jsonl(tmp_path):
    cfg = apply_overrides(TrainConfig(store="x"), ["tensorboard=true"])
    assert cfg.tensorboard is True
    log = RunLog(tmp_path / "metrics.jsonl", resume_step=None, tensorboard=cfg.tensorboard)
    _log_steps(log, [1, 2, 3])
    log.eval(3, {"ce": 2.5, "ppl": math.exp(2.5), "kl_kind": "forward", "kl": 0.25, "tokens": 10}, None)
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sc = _scalars(tmp_path / "tensorboard")
    train = [r for r in recs if r["event"] == "train"]
    assert sc["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert sc["train/tokens_per_s"] == [(r["step"], pytest.approx(r["tokens_per_s"])) for r in train]
    assert "train/kd" not in sc  # NaN (null in JSON) is not a point
    assert sc["eval/eval_kl"] == [(3, pytest.approx(0.25))]
    assert "eval/eval_kl_kind" not in sc  # strings are not scalars


def test_resume_purges_events_after_the_checkpoint(tmp_path):
    cfg = TrainConfig(store="x", tensorboard=True)
    log = RunLog(tmp_path / "metrics.jsonl", resume_step=None, tensorboard=cfg.tensorboard)
    _log_steps(log, [1, 2, 3, 4])
    log._tb.close()
    log = RunLog(tmp_path / "metrics.jsonl", resume_step=2, tensorboard=cfg.tensorboard)  # resumed from the step-2 checkpoint
    _log_steps(log, [3, 4])
    log._tb.close()
    steps = [s for s, _ in _scalars(tmp_path / "tensorboard")["train/loss"]]
    assert steps == [1, 2, 3, 4]


def test_off_by_default_writes_nothing(tmp_path):
    RunLog(tmp_path / "metrics.jsonl", tensorboard=TrainConfig(store="x").tensorboard).train(1, {"loss": [1.0]}, world=1)
    assert not (tmp_path / "tensorboard").exists()
