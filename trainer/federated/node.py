"""The node (a Flower ``ClientApp``): confirm the instruction, train locally, return updates.

A node's private head and data stay on it: the head lives in ``context.state`` (the node's
own record store, never sent), the data in this process. Replies carry only the shared
encoder's parameters and scalar metrics (tested by recording every message the master gets).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import torch

from trainer.federated import protocol as P
from trainer.federated import tasks as T
from trainer.federated.config import ENCODER_TYPE, TASKS, FederatedConfig, load_config


@dataclass(frozen=True)
class NodeSpec:
    """What one node holds and how it trains (its own settings; the master never sees them)."""

    task: str
    tokenizer: str
    limit: int
    eval_limit: int
    max_len: int
    store: str
    eval_store: str
    slowdown: float
    seed: int
    threads: int
    kd_weight: float

    def data(self, batch_size: int) -> T.NodeData:
        limit = {"sentiment": self.limit, "tagging": self.limit}.get(self.task, 0)
        return T.load_node_data(self.task, self.tokenizer, limit=limit, eval_limit=self.eval_limit,
                                max_len=self.max_len, seed=self.seed, store=self.store, eval_store=self.eval_store,
                                batch_size=batch_size)


def shared_tokenizer(cfg: FederatedConfig) -> str:
    """The shared tokenizer directory: ``tokenizer=`` or the KD store's teacher."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if cfg.kd_store:
        import kdstore  # noqa: PLC0415

        return kdstore.open(cfg.kd_store).manifest.teacher.name_or_path
    raise ValueError("no shared vocabulary: set tokenizer=DIR (an HF tokenizer directory) or kd_store=")


def vocab_identity(tokenizer_dir: str) -> str | None:
    """The vocabulary identity the master names: the same tokenizer hash a store's manifest
    records for its teacher (``teacher.tokenizer_hash``), so a KD node compares it directly."""
    from kdstore.tokenizer import tokenizer_files_hash  # noqa: PLC0415

    return tokenizer_files_hash(tokenizer_dir)


def node_spec(cfg: FederatedConfig, index: int) -> NodeSpec:
    tasks = cfg.tasks()
    if not 0 <= index < len(tasks):
        raise ValueError(f"node index {index} is outside nodes={cfg.nodes!r} ({len(tasks)} nodes)")
    task = tasks[index]
    limit = {"sentiment": cfg.sentiment_limit, "tagging": cfg.tagging_limit}.get(task, 0)
    return NodeSpec(task=task, tokenizer=shared_tokenizer(cfg), limit=limit, eval_limit=cfg.eval_limit,
                    max_len=cfg.max_len, store=cfg.kd_store, eval_store=cfg.kd_eval_store,
                    slowdown=cfg.slowdowns().get(task, 1.0), seed=cfg.seed + 1000 * (index + 1), threads=cfg.threads,
                    kd_weight=cfg.kd_weight)


def spec_from_context(context: Any, cfg: FederatedConfig | None) -> NodeSpec:
    """Simulation: node ``partition-id`` of the run's config. Deployment: the SuperNode's
    ``--node-config "config='FILE' node=I"`` (its own file; ``node`` indexes its ``nodes=``)."""
    nc = dict(context.node_config)
    if cfg is None:
        if "config" not in nc:
            raise ValueError("this SuperNode has no node config: start it with --node-config \"config='FILE' node=0\"")
        cfg = load_config(str(nc["config"]), [])
    return node_spec(cfg, int(nc.get("node", nc.get("partition-id", 0))))


def _confirm(spec: NodeSpec, ins: dict[str, Any]) -> dict[str, int]:
    """Seed step 2: accept when this node holds samples of the named type and vocabulary."""
    if ins.get("encoder_type") != ENCODER_TYPE:
        return {"accept": 0, "reason": 3}
    try:
        if spec.task == "kd":
            import kdstore  # noqa: PLC0415

            vocab_id = kdstore.open(spec.store).manifest.teacher.tokenizer_hash
        else:
            vocab_id = vocab_identity(spec.tokenizer)
        data = spec.data(32)
    except (OSError, ValueError, ImportError) as exc:
        print(f"[node {spec.task}] declining: private data unreadable ({exc})", flush=True)
        return {"accept": 0, "reason": 4}
    if vocab_id != ins.get("vocab_id"):
        return {"accept": 0, "reason": 2}
    if not data.train:
        return {"accept": 0, "reason": 1}
    return {"accept": 1, "task_id": TASKS.index(spec.task), "num_examples": data.num_train}


def _head_state(context: Any, head: torch.nn.Module, *, save: bool) -> None:
    """Keep the private head in the node's own ``context.state`` between messages."""
    if save:
        context.state["private_head"] = P.to_record({k: v.detach().numpy() for k, v in head.state_dict().items()})
    elif "private_head" in context.state:
        arrays = P.from_record(context.state["private_head"])
        head.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})


def _models(spec: NodeSpec, context: Any, arrays: dict, batch_size: int):
    ins = json.loads(str(context.state["instruction"]["encoder"]))
    torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    encoder = T.build_encoder(ins)
    T.load_encoder_arrays(encoder, arrays)
    data = spec.data(batch_size)
    head = T.make_head(data, int(ins["d_model"]), float(ins["dropout"]))
    _head_state(context, head, save=False)
    return encoder, head, data, int(ins["pad_id"])


def local_train(spec: NodeSpec, encoder, head, data: T.NodeData, rule: dict[str, Any], *, pad_id: int,
                round_index: int) -> dict[str, float]:
    """Seed step 4: train shared encoder + private head until the update rule fires."""
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=float(rule["lr"]), weight_decay=float(rule["weight_decay"]))
    stream = T.batch_stream(data, batch_size=int(rule["batch_size"]), seed=spec.seed * 7919 + round_index, pad_id=pad_id)
    t0, steps, examples, loss_sum = time.perf_counter(), 0, 0, 0.0
    encoder.train()
    head.train()
    while True:
        if rule["kind"] == "steps" and steps >= int(rule["steps"]):
            break
        if rule["kind"] == "seconds" and time.perf_counter() - t0 >= float(rule["seconds"]) and steps > 0:
            break
        ts = time.perf_counter()
        batch, _ = next(stream)
        loss = T.train_step(data.task, encoder, head, batch, opt, params, kd_weight=spec.kd_weight)
        steps += 1
        examples += int(batch["input_ids"].shape[0])
        loss_sum += float(loss.detach())
        if spec.slowdown > 1:  # a simulated slower machine: the step takes `slowdown` times as long
            time.sleep((spec.slowdown - 1.0) * (time.perf_counter() - ts))
    return {"steps": float(steps), "num_examples": float(examples), "train_loss": loss_sum / max(steps, 1),
            "train_s": time.perf_counter() - t0}


def handle(message: Any, context: Any, cfg: FederatedConfig | None) -> Any:
    """One message to this node -> its reply (the body of the ClientApp)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: PLC0415

    spec = spec_from_context(context, cfg)
    kind = message.metadata.message_type
    if kind == P.INSTRUCTION:
        ins = dict(message.content["instruction"])
        answer = _confirm(spec, ins)
        if answer["accept"]:
            context.state["instruction"] = ConfigRecord(ins)
        return Message(RecordDict({"confirm": MetricRecord(answer)}), reply_to=message)
    if "instruction" not in context.state:
        raise RuntimeError("received parameters before a confirmed training instruction")
    arrays = P.from_record(message.content["encoder"])
    rule = dict(message.content["rule"]) if "rule" in message.content else {"batch_size": 32}
    encoder, head, data, pad_id = _models(spec, context, arrays, int(rule["batch_size"]))
    task_id = float(TASKS.index(spec.task))
    if kind == P.EVALUATE:
        ev = T.evaluate(data, encoder, head, pad_id=pad_id)
        return Message(RecordDict({"metrics": MetricRecord({"task_id": task_id, **{f"eval_{k}": v for k, v in ev.items()}})}),
                       reply_to=message)
    rounds = int(context.state["rounds"]["n"]) if "rounds" in context.state else 0
    stats = local_train(spec, encoder, head, data, rule, pad_id=pad_id, round_index=rounds)
    ev = T.evaluate(data, encoder, head, pad_id=pad_id)
    _head_state(context, head, save=True)
    context.state["rounds"] = MetricRecord({"n": rounds + 1})
    metrics = {**stats, "base_version": float(rule["version"]), "task_id": task_id,
               **{f"eval_{k}": v for k, v in ev.items()}}
    return Message(RecordDict({"encoder": P.to_record(T.encoder_arrays(encoder)),
                                            "metrics": MetricRecord(metrics)}), reply_to=message)


def make_client_app(cfg: FederatedConfig | None = None, *, mods: list | None = None):
    """A ``ClientApp`` running :func:`handle` (``cfg=None``: read the SuperNode's node config)."""
    from flwr.clientapp import ClientApp  # noqa: PLC0415

    app = ClientApp(mods=mods or [])

    @app.query("instruction")
    def _instruction(message, context):
        return handle(message, context, cfg)

    @app.train()
    def _train(message, context):
        return handle(message, context, cfg)

    @app.evaluate()
    def _evaluate(message, context):
        return handle(message, context, cfg)

    return app
