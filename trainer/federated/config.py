"""The flat config of ``kd train federated`` and the protocol's fixed vocabulary.

One :class:`FederatedConfig` (a dataclass, ``key=value`` overrides through
:func:`trainer.core.config.apply_overrides`) describes the master, the aggregation rule, the
update rule sent to every node and, for the one-machine simulation, the nodes themselves
(``nodes=sentiment,tagging,kd``: one node per entry, its task and private data from the
``<task>_*`` keys). On separate machines each node reads the same kind of file of its own
(only its task's keys matter there); see ``docs/federated.md``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.core.config import apply_overrides

TASKS = ("sentiment", "tagging", "kd")  # task ids on the wire are indices into this tuple
AGGREGATIONS = ("async", "sync")
UPDATE_RULES = ("steps", "seconds")
ENCODER_TYPE = "bert-encoder"  # trainer.classify.classifiers.transformer_encoder
# Decline reasons travel as integer codes (messages to the master carry no text).
DECLINE_REASONS = {
    1: "no private samples for this encoder type / task",
    2: "vocabulary identity differs from the instruction's",
    3: "encoder type not supported by this node",
    4: "private data missing or unreadable",
}


@dataclass
class FederatedConfig:
    """Flat config of one federated run (master + simulated nodes)."""

    # -- nodes (simulation: one node per entry; deployment: one entry per machine) -------
    nodes: str = "sentiment,tagging,kd"  # comma-separated tasks, one node each
    tokenizer: str = ""  # HF tokenizer dir: the shared vocabulary ("" = the KD store's teacher)
    sentiment_limit: int = 2000  # training reviews the sentiment node holds (0 = all)
    tagging_limit: int = 2000  # training sentences the tagging node holds (0 = all)
    eval_limit: int = 500  # held-out examples each node evaluates on (0 = all)
    kd_store: str = ""  # the KD node's private soft-label store (token level)
    kd_eval_store: str = ""  # its held-out store ("" = hold out by sample id from kd_store)
    kd_weight: float = 0.5  # KD node loss: (1 - a) * CE + a * sparse KD
    max_len: int = 64  # tokens per example (positions of the encoder)
    slowdown: str = ""  # simulated slow machines, e.g. "kd:3" (that node takes 3x as long per step)

    # -- shared encoder (named in the master's training instruction) ---------------------
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.1
    init_from: str = ""  # preset rule for the initial parameters: "" = fresh init, or a checkpoint

    # -- update rule sent to each node ---------------------------------------------------
    update_rule: str = "steps"  # steps: after local_steps; seconds: after local_seconds
    local_steps: int = 20
    local_seconds: float = 5.0
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01

    # -- aggregation (docs/federated.md has the formula) ---------------------------------
    aggregation: str = "async"  # async: fold each update as it arrives; sync: FedAvg rounds
    async_alpha: float = 0.6  # base mixing weight alpha
    count_power: float = 0.5  # beta: weight ~ n_i^-beta (n_i = updates node i returned)
    staleness_power: float = 0.5  # gamma: weight ~ (1 + staleness)^-gamma
    max_weight: float = 1.0  # cap on one fold's weight

    # -- budget and loop -----------------------------------------------------------------
    min_nodes: int = 1  # the master waits (up to join_timeout_s) until this many nodes are connected
    max_updates: int = 30  # folds after which the master stops (sync: rounds x nodes)
    time_budget_s: float = 0.0  # stop after this many seconds (0 = no limit)
    reply_timeout_s: float = 300.0  # a node silent this long after a train message is counted lost (it may rejoin)
    join_timeout_s: float = 300.0  # how long a node may take to answer the instruction (it loads its data)
    rejoin_after_s: float = 2.0  # a lost node is re-instructed (may rejoin) once this long has passed
    seed: int = 0
    threads: int = 1  # torch threads per node
    out_dir: str = "runs/federated"
    save_every: int = 10  # checkpoint the global encoder every N folds (0 = only at the end)
    keep_checkpoints: int = 2
    resume: str = ""  # run dir or checkpoint of a previous master: continue from it
    progress: bool = True
    plots: bool = True

    def tasks(self) -> list[str]:
        return [t.strip() for t in self.nodes.split(",") if t.strip()]

    def slowdowns(self) -> dict[str, float]:
        """``"kd:3,tagging:2"`` -> ``{"kd": 3.0, "tagging": 2.0}``."""
        out: dict[str, float] = {}
        for item in filter(None, (x.strip() for x in self.slowdown.split(","))):
            task, sep, factor = item.partition(":")
            try:
                out[task] = float(factor)
            except ValueError:
                raise ValueError(f"slowdown={self.slowdown!r}: expected task:factor, e.g. kd:3") from None
            if not sep or task not in TASKS or out[task] < 1:
                raise ValueError(f"slowdown={self.slowdown!r}: expected task:factor with a task of {TASKS} and factor >= 1")
        return out

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad key, before anything trains."""
        tasks = self.tasks()
        if not tasks:
            raise ValueError("nodes= names no node: set e.g. nodes=sentiment,tagging,kd")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"nodes= names unknown task(s) {unknown}: known tasks are {', '.join(TASKS)}")
        if "kd" in tasks and not self.kd_store:
            raise ValueError("nodes= has a kd node but kd_store= is empty: point it at a token-level soft-label store")
        for key in ("kd_store", "kd_eval_store", "tokenizer", "init_from"):
            v = getattr(self, key)
            if v and "://" not in v and not Path(v).exists():
                raise ValueError(f"{key}={v!r} does not exist")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")
        for key in ("min_nodes", "local_steps", "batch_size", "max_updates", "d_model", "n_layers", "n_heads", "max_len", "threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 < self.async_alpha <= 1.0 or not 0.0 < self.max_weight <= 1.0:
            raise ValueError("async_alpha and max_weight must be in (0, 1]")
        if self.staleness_power < 0:
            raise ValueError(f"staleness_power must be >= 0, got {self.staleness_power}")
        if self.local_seconds <= 0 or self.reply_timeout_s <= 0 or self.join_timeout_s <= 0:
            raise ValueError("local_seconds, reply_timeout_s and join_timeout_s must be > 0")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        self.slowdowns()

    def encoder_spec(self, *, vocab_size: int, pad_id: int) -> dict[str, Any]:
        """The shared-encoder part of the training instruction (architecture + config)."""
        return {"arch": "transformer", "vocab_size": vocab_size, "pad_id": pad_id, "d_model": self.d_model,
                "n_layers": self.n_layers, "n_heads": self.n_heads, "d_ff": self.d_ff,
                "max_len": self.max_len + 1, "dropout": self.dropout, "num_classes": 2}


def load_config(path: str | None, overrides: list[str]) -> FederatedConfig:
    """A JSON file of flat settings (optional), then ``key=value`` overrides on top."""
    cfg = FederatedConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"--config {path}: no such file")
        try:
            base = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(base, dict):
            raise ValueError(f"--config {path}: expected a JSON object of key: value settings")
        cfg = apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])
    return apply_overrides(cfg, overrides)

