"""Aggregation rules of the shared encoder (pure functions over ``{name: ndarray}``).

* First updates (seed step 5): the sample-weighted average
  ``theta = sum_i m_i theta_i / sum_i m_i`` (``m_i`` = examples node i trained on).
* Afterwards (seed step 6), each update is folded in as it arrives::

      w     = min(max_weight, alpha * n_i ** -beta * (1 + s) ** -gamma)
      theta = (1 - w) * theta + w * theta_i

  ``n_i`` is the number of updates node i has returned so far, this one included;
  ``s`` (staleness) is the number of folds applied to the global encoder since node i
  received the parameters it trained from. ``docs/federated.md`` argues for both terms.
* Synchronous FedAvg rounds use the sample-weighted average every round.

Updates are checked before they are used (:func:`check_update`): the same names, shapes and
float dtype as the global encoder, and only finite values; anything else is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

Params = dict[str, np.ndarray]


class RejectedUpdate(ValueError):
    """An update that must not be folded in (wrong names/shapes, NaN/Inf)."""


def check_update(update: Params, reference: Params) -> None:
    """Raise :class:`RejectedUpdate` unless ``update`` matches ``reference`` exactly in names
    and shapes and holds only finite floats."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise RejectedUpdate(f"parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise RejectedUpdate(f"{name}: shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise RejectedUpdate(f"{name}: dtype {arr.dtype}, expected a float array")
        if not np.isfinite(arr).all():
            raise RejectedUpdate(f"{name}: holds NaN or Inf values")


def weighted_average(updates: list[Params], weights: list[float]) -> Params:
    """``sum_i w_i theta_i / sum_i w_i`` per array (float64 accumulation, float32 result)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("weighted_average needs one weight per update and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {weights}")
    out = {}
    for name in updates[0]:
        acc = np.zeros(updates[0][name].shape, dtype=np.float64)
        for u, w in zip(updates, weights):
            acc += (w / total) * u[name].astype(np.float64)
        out[name] = acc.astype(np.float32)
    return out


def fold_weight(*, count: int, staleness: int, alpha: float, count_power: float, staleness_power: float,
                max_weight: float = 1.0) -> float:
    """``min(max_weight, alpha * count**-count_power * (1 + staleness)**-staleness_power)``."""
    if count < 1 or staleness < 0:
        raise ValueError(f"count must be >= 1 and staleness >= 0, got {count}, {staleness}")
    return min(max_weight, alpha * count ** (-count_power) * (1.0 + staleness) ** (-staleness_power))


def fold(global_params: Params, update: Params, weight: float) -> Params:
    """``(1 - w) * theta + w * theta_i`` per array."""
    if not 0.0 <= weight <= 1.0 or not math.isfinite(weight):
        raise ValueError(f"fold weight must be in [0, 1], got {weight}")
    return {k: ((1.0 - weight) * v.astype(np.float64) + weight * update[k].astype(np.float64)).astype(np.float32)
            for k, v in global_params.items()}


@dataclass
class AsyncAggregator:
    """The global encoder and the bookkeeping of the asynchronous rule.

    ``version`` counts folds into the global parameters (the first, sample-weighted
    aggregation is version 1); ``counts[node]`` counts updates each node has returned
    (accepted ones); ``rejected`` counts refused updates per node.
    """

    params: Params
    alpha: float = 0.6
    count_power: float = 0.5
    staleness_power: float = 0.5
    max_weight: float = 1.0
    version: int = 0
    counts: dict[int, int] = field(default_factory=dict)
    rejected: dict[int, int] = field(default_factory=dict)

    def initial(self, updates: dict[int, tuple[Params, int]]) -> Params:
        """Seed step 5: replace the global parameters by the sample-weighted average of the
        first updates ``{node: (params, num_examples)}``; each counts as that node's first."""
        nodes = sorted(updates)
        for n in nodes:
            check_update(updates[n][0], self.params)
        self.params = weighted_average([updates[n][0] for n in nodes], [float(updates[n][1]) for n in nodes])
        for n in nodes:
            self.counts[n] = self.counts.get(n, 0) + 1
        self.version += 1
        return self.params

    def add(self, node: int, update: Params, *, base_version: int) -> float:
        """Seed step 6: fold one update trained from global version ``base_version``;
        returns the weight used. Raises :class:`RejectedUpdate` (and counts it) for a bad one."""
        try:
            check_update(update, self.params)
        except RejectedUpdate:
            self.rejected[node] = self.rejected.get(node, 0) + 1
            raise
        count = self.counts.get(node, 0) + 1
        staleness = max(0, self.version - base_version)
        w = fold_weight(count=count, staleness=staleness, alpha=self.alpha, count_power=self.count_power,
                        staleness_power=self.staleness_power, max_weight=self.max_weight)
        self.params = fold(self.params, update, w)
        self.counts[node] = count
        self.version += 1
        return w

    def state(self) -> dict:
        """Checkpointable bookkeeping (plain types)."""
        return {"version": self.version, "counts": {str(k): v for k, v in self.counts.items()},
                "rejected": {str(k): v for k, v in self.rejected.items()}}

    def load_state(self, state: dict) -> None:
        self.version = int(state["version"])
        self.counts = {int(k): int(v) for k, v in state["counts"].items()}
        self.rejected = {int(k): int(v) for k, v in state["rejected"].items()}
