"""Aggregation rules of ``kd train federated`` against hand-computed values, and config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.federated.aggregate import (AsyncAggregator, RejectedUpdate, check_update, fold, fold_weight,
                                         weighted_average)
from trainer.federated.config import FederatedConfig, load_config
from trainer.federated.run import main


def p(x: float, y: list[float]) -> dict[str, np.ndarray]:
    return {"a": np.array([x], dtype=np.float32), "b": np.array(y, dtype=np.float32)}


def test_first_aggregation_is_sample_weighted():
    # (1*100 + 4*300) / 400 = 3.25 ; b: (0*100 + 8*300)/400 = 6, (2*100 + 2*300)/400 = 2
    agg = AsyncAggregator(params=p(0, [0, 0]))
    out = agg.initial({7: (p(1, [0, 2]), 100), 9: (p(4, [8, 2]), 300)})
    assert out["a"][0] == pytest.approx(3.25) and out["b"].tolist() == pytest.approx([6.0, 2.0])
    assert agg.version == 1 and agg.counts == {7: 1, 9: 1}


def test_fold_weight_hand_values():
    # alpha * n^-beta * (1+s)^-gamma : 0.6 * 2^-0.5 * 3^-0.5 = 0.6 / sqrt(6)
    assert fold_weight(count=2, staleness=2, alpha=0.6, count_power=0.5, staleness_power=0.5) == pytest.approx(
        0.6 / math.sqrt(6))
    assert fold_weight(count=4, staleness=0, alpha=0.8, count_power=1.0, staleness_power=0.5) == pytest.approx(0.2)
    # count_power 0 and staleness_power 0: constant alpha (plain FedAsync without decay)
    assert fold_weight(count=9, staleness=5, alpha=0.3, count_power=0.0, staleness_power=0.0) == pytest.approx(0.3)
    assert fold_weight(count=1, staleness=0, alpha=1.0, count_power=0.5, staleness_power=0.5, max_weight=0.7) == 0.7
    with pytest.raises(ValueError):
        fold_weight(count=0, staleness=0, alpha=0.5, count_power=0.5, staleness_power=0.5)


def test_async_sequence_matches_hand_computation():
    """Two nodes after the first round; three folds with counts 2, 2, 3 and staleness 0, 1, 1."""
    agg = AsyncAggregator(params=p(0, [0, 0]), alpha=0.5, count_power=1.0, staleness_power=1.0)
    agg.initial({1: (p(2, [2, 2]), 1), 2: (p(4, [4, 4]), 1)})  # global a = 3, version 1
    # node 1, trained from version 1 (staleness 0), its 2nd update: w = 0.5 / 2 / 1 = 0.25
    w1 = agg.add(1, p(7, [7, 7]), base_version=1)
    assert w1 == pytest.approx(0.25) and agg.params["a"][0] == pytest.approx(0.75 * 3 + 0.25 * 7)  # 4.0
    # node 2, also from version 1, now one fold stale: w = 0.5 / 2 / 2 = 0.125
    w2 = agg.add(2, p(12, [0, 0]), base_version=1)
    assert w2 == pytest.approx(0.125) and agg.params["a"][0] == pytest.approx(0.875 * 4.0 + 0.125 * 12)  # 5.0
    # node 1 again from version 2 (staleness 1), 3rd update: w = 0.5 / 3 / 2 = 1/12
    w3 = agg.add(1, p(17, [0, 0]), base_version=2)
    assert w3 == pytest.approx(1 / 12) and agg.params["a"][0] == pytest.approx(5.0 * 11 / 12 + 17 / 12)  # 6.0
    assert agg.version == 4 and agg.counts == {1: 3, 2: 2}


def test_bad_updates_rejected_counted_and_not_folded():
    agg = AsyncAggregator(params=p(1, [1, 1]))
    agg.initial({1: (p(1, [1, 1]), 1)})
    before = {k: v.copy() for k, v in agg.params.items()}
    bad = [p(float("nan"), [1, 1]), p(1, [1, float("inf")]), {"a": np.ones(1, np.float32), "b": np.ones(3, np.float32)},
           {"a": np.ones(1, np.float32)}, {"a": np.ones(1, np.int64), "b": np.ones(2, np.int64)}]
    for u in bad:
        with pytest.raises(RejectedUpdate):
            agg.add(1, u, base_version=1)
    assert agg.rejected == {1: 5} and agg.version == 1 and agg.counts == {1: 1}
    assert all(np.array_equal(before[k], agg.params[k]) for k in before)
    check_update(p(2, [3, 4]), agg.params)  # a good one passes


def test_weighted_average_and_fold_primitives():
    out = weighted_average([p(1, [1, 1]), p(3, [5, 1])], [1.0, 3.0])
    assert out["a"][0] == pytest.approx(2.5) and out["b"].tolist() == pytest.approx([4.0, 1.0])
    assert fold(p(0, [0, 0]), p(10, [4, 8]), 0.25)["b"].tolist() == pytest.approx([1.0, 2.0])
    with pytest.raises(ValueError):
        fold(p(0, [0, 0]), p(1, [1, 1]), 1.5)


@pytest.mark.parametrize("overrides, message", [
    (["nodes=sentiment,speech"], "unknown task(s) ['speech']"),
    (["nodes=kd"], "kd_store= is empty"),
    (["nodes=kd", "kd_store=/nonexistent/store"], "does not exist"),
    (["nodes=sentiment", "aggregation=fedprox"], "aggregation must be one of"),
    (["nodes=sentiment", "d_model=30", "n_heads=4"], "divisible"),
    (["nodes=sentiment", "slowdown=kd:0.5"], "factor >= 1"),
])
def test_bad_config_is_a_clear_error_before_training(overrides, message, capsys):
    with pytest.raises(ValueError, match=None) as exc:
        load_config(None, overrides).validate()
    assert message in str(exc.value)
    assert main(overrides) == 2  # the CLI prints the message, no traceback
    assert message in capsys.readouterr().err


def test_mistyped_key_and_config_file(tmp_path, capsys):
    assert main(["max_update=3"]) == 2 and "did you mean max_updates" in capsys.readouterr().err
    f = tmp_path / "fed.json"
    f.write_text('{"nodes": "sentiment", "max_updates": 7, "progress": false}', encoding="utf-8")
    cfg = load_config(str(f), ["max_updates=9"])
    assert (cfg.nodes, cfg.max_updates, cfg.progress) == ("sentiment", 9, False)
    assert isinstance(cfg, FederatedConfig)
    (tmp_path / "bad.json").write_text("{nodes: 1", encoding="utf-8")
    assert main(["--config", str(tmp_path / "bad.json")]) == 2 and "not valid JSON" in capsys.readouterr().err
