"""The master (a Flower ``ServerApp``): the seed-003 protocol over a ``Grid``.

1. Send every node the training instruction (encoder type, config, vocabulary identity).
2. Collect confirm / decline answers; decliners are logged and left out.
3. Initial parameters by the preset rule (fresh init from the config, ``init_from=`` a
   checkpoint, or ``resume=`` a previous master), sent with each node's update rule.
4.-5. The first updates are aggregated by the sample-weighted average and sent back.
6. Asynchronous: messages are pushed to nodes one by one and replies pulled as they come;
   each update is folded in on arrival with the count/staleness weight of
   :mod:`trainer.federated.aggregate` and the node gets the fresh global parameters at once.
   No barrier: a slow node never stalls the others. (``aggregation=sync``: FedAvg rounds.)

Faults: an error reply or a node silent for ``reply_timeout_s`` is counted lost; lost nodes
and SuperNodes that connect later are re-instructed (they rejoin with the current global
encoder). Updates with NaN/Inf or wrong shapes are rejected, counted and never folded in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from trainer.core.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from trainer.core.config import to_dict
from trainer.core.runlog import RunLog
from trainer.federated import protocol as P
from trainer.federated.aggregate import AsyncAggregator, RejectedUpdate, check_update, weighted_average
from trainer.federated.config import DECLINE_REASONS, ENCODER_TYPE, TASKS, FederatedConfig, load_config
from trainer.federated.tasks import build_encoder, encoder_arrays

Recorder = Callable[[Any], None]


class Master:
    """State of one master run; :meth:`run` is the ServerApp body."""

    def __init__(self, *, grid: Any, cfg: FederatedConfig, record: Recorder | None = None) -> None:
        from kdstore.tokenizer import load_tokenizer  # noqa: PLC0415
        from trainer.federated.node import shared_tokenizer, vocab_identity  # noqa: PLC0415

        self.grid, self.cfg, self.record = grid, cfg, record
        tok_dir = shared_tokenizer(cfg)
        tok = load_tokenizer(tok_dir)
        vocab = -(-len(tok) // 64) * 64
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.spec = cfg.encoder_spec(vocab_size=vocab, pad_id=pad)
        self.instruction = {"encoder_type": ENCODER_TYPE, "encoder": json.dumps(self.spec),
                            "vocab_id": vocab_identity(tok_dir), "vocab_size": vocab}
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[int, str] = {}  # confirmed node id -> task
        self.declined: set[int] = set()
        self.lost: dict[int, float] = {}  # node id -> time it was lost (re-instructed later)
        self.pending: dict[str, tuple[int, str, float, int]] = {}  # message id -> (node, kind, sent, version)
        self.latest: dict[int, dict[str, float]] = {}
        self.updates = 0
        self.t0 = time.perf_counter()
        self.elapsed0 = 0.0
        self.agg, resume_step = self._initial_parameters()
        self.log = RunLog(self.out / "metrics.jsonl", resume_step=resume_step,
                          tensorboard=getattr(cfg, "tensorboard", False))
        (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, ensure_ascii=False), encoding="utf-8")

    # -- parameters and checkpoints ------------------------------------------------------
    def _initial_parameters(self) -> tuple[AsyncAggregator, int | None]:
        c = self.cfg
        torch.manual_seed(c.seed)
        params = encoder_arrays(build_encoder(self.spec))
        agg = AsyncAggregator(params=params, alpha=c.async_alpha, count_power=c.count_power,
                              staleness_power=c.staleness_power, max_weight=c.max_weight)
        src = c.resume or c.init_from
        if not src:
            return agg, None
        ckpt = load_checkpoint(src)
        loaded = {k: v.numpy() for k, v in ckpt["params"].items()}
        try:
            check_update(loaded, params)
        except RejectedUpdate as exc:
            raise ValueError(f"{ckpt['path']}: saved for a different encoder config ({exc})") from None
        agg.params = loaded
        if not c.resume:  # init_from: only the parameters (a new run)
            return agg, None
        agg.load_state(ckpt["aggregator"])
        self.updates, self.elapsed0 = int(ckpt["updates"]), float(ckpt["elapsed_s"])
        print(f"resumed from {ckpt['path']}: global version {agg.version}, {self.updates} updates", flush=True)
        return agg, agg.version

    def save(self) -> Path:
        payload = {"params": {k: torch.from_numpy(v) for k, v in self.agg.params.items()},
                   "aggregator": self.agg.state(), "updates": self.updates, "elapsed_s": self.elapsed(),
                   "encoder_spec": json.dumps(self.spec), "config": to_dict(self.cfg)}
        return save_checkpoint(checkpoint_path(self.out, self.agg.version), payload, keep=self.cfg.keep_checkpoints)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t0

    # -- messaging ------------------------------------------------------------------------
    def _push(self, node: int, kind: str, content: Any) -> None:
        from flwr.app import Message  # noqa: PLC0415

        msg = Message(content=content, dst_node_id=node, message_type=kind, group_id=str(self.agg.version))
        (mid,) = list(self.grid.push_messages([msg]))
        self.pending[mid] = (node, kind, time.perf_counter(), self.agg.version)

    def _pull(self, wait: float) -> list[tuple[Any, int, str, int]]:
        """Replies that have arrived (waits up to ``wait`` s for the first); each is recorded."""
        end = time.perf_counter() + wait
        while True:
            got = list(self.grid.pull_messages(list(self.pending))) if self.pending else []
            if got or time.perf_counter() >= end:
                break
            time.sleep(0.05)
        out = []
        for msg in got:
            if self.record is not None:
                self.record(msg)
            node, kind, _, version = self.pending.pop(msg.metadata.reply_to_message_id)
            out.append((msg, node, kind, version))
        now = time.perf_counter()
        for mid, (node, kind, sent, _) in list(self.pending.items()):
            limit = self.cfg.join_timeout_s if kind == P.INSTRUCTION else self.cfg.reply_timeout_s
            if now - sent > limit:
                del self.pending[mid]
                self._lose(node, f"no reply to {kind} within {limit:.0f} s")
        return out

    def _lose(self, node: int, why: str) -> None:
        self.nodes.pop(node, None)
        self.lost[node] = time.perf_counter()
        self.log.write({"event": "node_lost", "step": self.agg.version, "node": node, "reason": why})
        print(f"node {node} lost ({why.splitlines()[0][:200]}); continuing with {len(self.nodes)} node(s)", flush=True)

    def _instruct(self, nodes: list[int]) -> None:
        from flwr.app import ConfigRecord, RecordDict  # noqa: PLC0415

        for n in nodes:
            self._push(n, P.INSTRUCTION, RecordDict({"instruction": ConfigRecord(dict(self.instruction))}))

    def _send_train(self, node: int) -> None:
        from flwr.app import ConfigRecord, RecordDict  # noqa: PLC0415

        c = self.cfg
        rule = {"kind": c.update_rule, "steps": c.local_steps, "seconds": c.local_seconds, "lr": c.lr,
                "weight_decay": c.weight_decay, "batch_size": c.batch_size, "version": self.agg.version, "seed": c.seed}
        self._push(node, P.TRAIN, RecordDict({"encoder": P.to_record(self.agg.params), "rule": ConfigRecord(rule)}))

    def _confirmed(self, msg: Any, node: int) -> bool:
        if msg.has_error():
            self._lose(node, f"error answering the instruction: {msg.error.reason}")
            return False
        ans = dict(msg.content["confirm"])
        if not ans.get("accept"):
            self.declined.add(node)
            why = DECLINE_REASONS.get(int(ans.get("reason", 0)), "unknown reason")
            self.log.write({"event": "decline", "step": self.agg.version, "node": node, "reason": why})
            print(f"node {node} declined: {why}", flush=True)
            return False
        self.nodes[node] = TASKS[int(ans["task_id"])]
        self.lost.pop(node, None)
        self.log.write({"event": "confirm", "step": self.agg.version, "node": node, "task": self.nodes[node],
                        "num_examples": ans.get("num_examples")})
        return True

    def _new_nodes(self, *, retry_after: float) -> list[int]:
        """SuperNodes not yet instructed, plus lost ones whose back-off has passed."""
        known = set(self.nodes) | self.declined | {n for n, _, _, _ in self.pending.values()}
        now = time.perf_counter()
        fresh = []
        for n in self.grid.get_node_ids():
            if n in known:
                continue
            if n in self.lost and now - self.lost[n] < retry_after:
                continue
            fresh.append(n)
        return fresh

    # -- updates --------------------------------------------------------------------------
    def _update(self, msg: Any, node: int) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
        """A valid update from a train reply, or None (error or rejected: counted and logged)."""
        if msg.has_error():
            self._lose(node, f"error while training: {msg.error.reason}")
            return None
        metrics = {k: float(v) for k, v in dict(msg.content["metrics"]).items()}
        arrays = P.from_record(msg.content["encoder"]) if "encoder" in msg.content else {}
        try:
            check_update(arrays, self.agg.params)
        except RejectedUpdate as exc:
            self.agg.rejected[node] = self.agg.rejected.get(node, 0) + 1
            self.log.write({"event": "rejected", "step": self.agg.version, "node": node, "reason": str(exc),
                            "rejected_total": sum(self.agg.rejected.values())})
            print(f"update from node {node} rejected: {exc}", flush=True)
            return None
        self.latest[node] = metrics
        return arrays, metrics

    def _log_update(self, node: int, metrics: dict[str, float], weight: float, staleness: int) -> None:
        self.log.write({"event": "update", "step": self.agg.version, "node": node, "task": self.nodes.get(node),
                        "weight": weight, "staleness": staleness, "count": self.agg.counts.get(node, 0),
                        "elapsed_s": self.elapsed(), **metrics})

    def _maybe_save(self) -> None:
        if self.cfg.save_every and self.agg.version % self.cfg.save_every == 0:
            self.save()

    def done(self) -> bool:
        budget = self.cfg.time_budget_s
        return self.updates >= self.cfg.max_updates or (budget > 0 and self.elapsed() >= budget)

    # -- the protocol ---------------------------------------------------------------------
    def handshake(self) -> None:
        """Steps 1-2: instruct every connected node and collect their answers."""
        deadline = time.perf_counter() + self.cfg.join_timeout_s
        ids: list[int] = []
        while time.perf_counter() < deadline:  # SuperNodes may still be connecting
            ids = list(self.grid.get_node_ids())
            if len(ids) >= self.cfg.min_nodes:
                break
            time.sleep(0.5)
        self._instruct(ids)
        while any(k == P.INSTRUCTION for _, k, _, _ in self.pending.values()):
            for msg, node, _, _ in self._pull(1.0):
                self._confirmed(msg, node)
        if not self.nodes:
            raise RuntimeError(
                f"no node can serve encoder {ENCODER_TYPE} with vocabulary {self.instruction['vocab_id']} "
                f"({len(self.declined)} declined, {len(self.lost)} failed): check the nodes' tasks, data and tokenizer")
        print(f"{len(self.nodes)} node(s) confirmed: {sorted(self.nodes.values())}; {len(self.declined)} declined", flush=True)

    def first_round(self) -> None:
        """Steps 3-5: initial parameters to every confirmed node; sample-weighted average of
        the first updates. Nodes lost here are re-instructed until ``join_timeout_s``."""
        for n in list(self.nodes):
            self._send_train(n)
        got: dict[int, tuple[dict, int]] = {}
        deadline = time.perf_counter() + self.cfg.join_timeout_s
        while self.pending or (not got and time.perf_counter() < deadline):
            for msg, node, kind, _ in self._pull(1.0):
                if kind == P.INSTRUCTION:
                    if self._confirmed(msg, node):
                        self._send_train(node)
                    continue
                upd = self._update(msg, node)
                if upd is not None:
                    got[node] = (upd[0], int(upd[1]["num_examples"]))
            if not got:
                self._rejoin()
        if not got:
            raise RuntimeError("no node returned a first update within join_timeout_s; see the node errors above")
        self.agg.initial(got)
        self.updates += len(got)
        for n in got:
            self._log_update(n, self.latest[n], got[n][1] / sum(v[1] for v in got.values()), 0)
        self._maybe_save()

    def _rejoin(self) -> None:
        """Re-instruct new or lost nodes; a node that confirms starts from the current global."""
        fresh = self._new_nodes(retry_after=self.cfg.rejoin_after_s)
        if fresh:
            self._instruct(fresh)

    def async_loop(self, bar) -> None:
        """Step 6: fold each update as it arrives; the node gets the new global at once."""
        for n in list(self.nodes):
            if not any(p[0] == n for p in self.pending.values()):
                self._send_train(n)
        while not self.done():
            if not self.pending and not self.nodes:
                self._rejoin()
                if not self.pending:
                    time.sleep(0.5)
                    continue
            for msg, node, kind, version in self._pull(1.0):
                if kind == P.INSTRUCTION:
                    if self._confirmed(msg, node):
                        self._send_train(node)
                    continue
                upd = self._update(msg, node)
                if upd is None:
                    if node in self.nodes:  # rejected, not lost: it keeps training from the global
                        self._send_train(node)
                    continue
                if self.done():
                    break
                staleness = self.agg.version - int(upd[1]["base_version"])
                w = self.agg.add(node, upd[0], base_version=int(upd[1]["base_version"]))
                self.updates += 1
                self._log_update(node, upd[1], w, staleness)
                bar.update(1)
                self._maybe_save()
                self._send_train(node)
            self._rejoin()

    def sync_loop(self, bar) -> None:
        """FedAvg rounds (the benchmark's barrier baseline): everyone, then the average."""
        while not self.done():
            self._rejoin()
            while any(k == P.INSTRUCTION for _, k, _, _ in self.pending.values()):
                for msg, node, _, _ in self._pull(1.0):
                    self._confirmed(msg, node)
            if not self.nodes:
                time.sleep(0.5)
                continue
            for n in list(self.nodes):
                self._send_train(n)
            got: dict[int, tuple[dict, int]] = {}
            while any(k == P.TRAIN for _, k, _, _ in self.pending.values()):
                for msg, node, kind, _ in self._pull(1.0):
                    if kind == P.INSTRUCTION:
                        self._confirmed(msg, node)
                        continue
                    upd = self._update(msg, node)
                    if upd is not None:
                        got[node] = (upd[0], int(upd[1]["num_examples"]))
            if not got:
                continue
            nodes = sorted(got)
            total = sum(got[n][1] for n in nodes)
            self.agg.params = weighted_average([got[n][0] for n in nodes], [float(got[n][1]) for n in nodes])
            self.agg.version += 1
            for n in nodes:
                self.agg.counts[n] = self.agg.counts.get(n, 0) + 1
                self._log_update(n, self.latest[n], got[n][1] / total, 0)
            self.updates += len(nodes)
            bar.update(len(nodes))
            self._maybe_save()

    def final_eval(self) -> dict[int, dict[str, float]]:
        """Held-out metrics of the final global encoder on every live node (with its head)."""
        from flwr.app import RecordDict  # noqa: PLC0415

        self.pending.clear()  # replies to older messages are not waited for
        for n in list(self.nodes):
            self._push(n, P.EVALUATE, RecordDict({"encoder": P.to_record(self.agg.params)}))
        out: dict[int, dict[str, float]] = {}
        while self.pending:
            for msg, node, _, _ in self._pull(1.0):
                if msg.has_error():
                    self._lose(node, f"error while evaluating: {msg.error.reason}")
                    continue
                out[node] = {k: float(v) for k, v in dict(msg.content["metrics"]).items()}
                self.log.write({"event": "final_eval", "step": self.agg.version, "node": node,
                                "task": TASKS[int(out[node]["task_id"])], **out[node]})
        return out

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm  # noqa: PLC0415

        self.handshake()
        if self.agg.version == 0:
            self.first_round()
        with tqdm(total=self.cfg.max_updates, initial=min(self.updates, self.cfg.max_updates), desc="updates",
                  unit="upd", disable=not self.cfg.progress) as bar:
            (self.async_loop if self.cfg.aggregation == "async" else self.sync_loop)(bar)
        final = self.final_eval()
        ckpt = self.save()
        summary = {"version": self.agg.version, "updates": self.updates, "rejected": sum(self.agg.rejected.values()),
                   "lost_events": sum(1 for r in self.log.history if r["event"] == "node_lost"),
                   "elapsed_s": self.elapsed(), "checkpoint": str(ckpt),
                   "final": {str(n): m for n, m in final.items()}}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        if self.cfg.plots:
            from trainer.federated.plots import plot_run  # noqa: PLC0415

            plot_run(self.log.history, self.out / "curves.png")
        return summary


def make_server_app(cfg: FederatedConfig | None = None, *, record: Recorder | None = None,
                    result: dict | None = None):
    """A ``ServerApp`` running :class:`Master` (``cfg=None``: read ``context.run_config["config"]``,
    a JSON config file, as in the deployment runtime). ``record`` sees every received message."""
    from flwr.serverapp import ServerApp  # noqa: PLC0415

    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        c = cfg
        if c is None:
            rc = dict(context.run_config)
            c = load_config(str(rc["config"]) if rc.get("config") else None,
                            [f"{k}={v}" for k, v in rc.items() if k != "config"])
            c.validate()
        summary = Master(grid=grid, cfg=c, record=record).run()
        if result is not None:
            result.update(summary)

    return app
