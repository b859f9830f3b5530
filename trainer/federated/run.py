"""``kd train federated``: run the master and the nodes on Flower's simulation runtime.

``kd train federated --config fed.json [key=value ...]`` checks the config (tasks, data,
tokenizer) before anything trains, then runs :func:`trainer.federated.master.make_server_app`
and :func:`trainer.federated.node.make_client_app` with ``flwr.simulation.run_simulation``,
one virtual SuperNode per entry of ``nodes=``. Outputs in ``out_dir``: ``metrics.jsonl``
(per-node updates and held-out metrics, declines, rejections, lost nodes, final
evaluation), ``checkpoints/`` (the global encoder; ``resume=out_dir`` continues a master),
``curves.png``, ``summary.json``. On separate machines the same apps run on the deployment
runtime (``docs/federated.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from trainer.core.config import format_config
from trainer.federated.config import FederatedConfig, load_config


def preflight(cfg: FederatedConfig) -> None:
    """Errors a user can fix, before any training: config values, tokenizer, each node's data."""
    cfg.validate()
    from kdstore.tokenizer import load_tokenizer  # noqa: PLC0415
    from trainer.federated.node import node_spec, shared_tokenizer  # noqa: PLC0415

    tok = shared_tokenizer(cfg)
    try:
        load_tokenizer(tok)
    except (OSError, ValueError) as exc:
        raise ValueError(f"shared tokenizer {tok!r} cannot be loaded ({exc}); set tokenizer=DIR") from None
    for i in range(len(cfg.tasks())):
        spec = node_spec(cfg, i)
        try:
            data = spec.data(cfg.batch_size)
        except (OSError, ValueError, ImportError) as exc:
            raise ValueError(f"node {i} ({spec.task}): private data cannot be read: {exc}") from None
        if not data.train or not data.held:
            raise ValueError(f"node {i} ({spec.task}): no training or held-out examples; raise its *_limit")


def run_federated(cfg: FederatedConfig, *, mods: list | None = None, record=None, check: bool = True) -> dict[str, Any]:
    """Run one federated training on the simulation runtime; returns the master's summary."""
    if check:
        preflight(cfg)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation  # noqa: PLC0415

    from trainer.federated.master import Master  # noqa: PLC0415
    from trainer.federated.node import make_client_app  # noqa: PLC0415
    from flwr.serverapp import ServerApp  # noqa: PLC0415

    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def _main(grid, context) -> None:
        try:
            result.update(Master(grid=grid, cfg=cfg, record=record).run())
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            result["error"] = exc

    n = len(cfg.tasks())
    backend = {"init_args": {"num_cpus": n, "include_dashboard": False},
               "client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    run_simulation(server_app=server, client_app=make_client_app(cfg, mods=mods), num_supernodes=n,
                   backend_config=backend)
    if "error" in result:
        raise result["error"]
    if not result:
        raise RuntimeError("the simulation ended without a result from the master; see the log above")
    return result


def main(argv: list[str] | None = None, prog: str = "kd train federated") -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description="Train a shared encoder across nodes that keep their data private (seed 003, Flower).",
        epilog="Settings are key=value pairs (--print-config lists them), e.g. nodes=sentiment,tagging,kd "
               "kd_store=runs/store aggregation=async max_updates=60.")
    ap.add_argument("--config", help="JSON file of settings (key=value overrides apply on top)")
    ap.add_argument("overrides", nargs="*", help="key=value settings")
    ap.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    ns = ap.parse_args(argv)
    try:
        cfg = load_config(ns.config, ns.overrides)
        if ns.print_config:
            print(format_config(cfg))
            return 0
        print(format_config(cfg, changed_only=True), flush=True)
        preflight(cfg)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_federated(cfg, check=False)
    except (RuntimeError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0
