"""The same master and node apps on Flower's deployment runtime: a local SuperLink and three
SuperNode processes on 127.0.0.1 (insecure, free ports), ``flwr run`` of the app in
``trainer/federated/flower_app``; every process is stopped afterwards.

This is the path to separate machines: each SuperNode reads its own config file through
``--node-config``, and each message runs in a fresh ``flwr-clientapp`` process (the node's
private head persists in the SuperNode's state between them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import make_tiny_causal_lm, train_bpe_tokenizer
from trainer.data.corpora import peoples_daily

pytest.importorskip("flwr")

from trainer.federated.tasks import capture_kd_store  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants_of_run(ports: list[int]) -> list[int]:
    """Processes Flower detached for this run (they name one of our ports on their command line)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(f"127.0.0.1:{p}" in cmd for p in ports) and int(d.name) != os.getpid():
            out.append(int(d.name))
    return out


def _wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not listen on {port} within {timeout:.0f} s")


@pytest.fixture()
def deployment(tmp_path):
    """SuperLink + 3 SuperNodes; yields what a test needs; always stops them."""
    texts = [s.text for s in peoples_daily("train")[:300]]
    tok = train_bpe_tokenizer(texts, tmp_path / "tok", vocab_size=500)
    teacher = make_tiny_causal_lm(tmp_path / "teacher", tokenizer_dir=tok, hidden=32, layers=1, heads=2, seed=3)
    store = capture_kd_store(str(teacher), texts[:60], str(tmp_path / "store"), max_len=32, k=8)
    cfg = {"nodes": "sentiment,tagging,kd", "kd_store": store, "sentiment_limit": 64, "tagging_limit": 64,
           "eval_limit": 32, "max_len": 32, "d_model": 32, "n_heads": 2, "d_ff": 64, "local_steps": 2, "batch_size": 8,
           "max_updates": 4, "out_dir": str(tmp_path / "run"), "progress": False, "reply_timeout_s": 240,
           "join_timeout_s": 240, "min_nodes": 3}
    (tmp_path / "fed.json").write_text(json.dumps(cfg), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PATH": str(BIN) + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(tmp_path / "flwr"),
           "OMP_NUM_THREADS": "1"}
    link = free_port()
    ports = [link] + [free_port() for _ in range(3)]
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args: list[str], name: str) -> None:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed in finally
        logs.append(log)
        procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                      cwd=tmp_path))  # Flower writes its state files into the cwd

    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
               "--database", ":flwr-in-memory-state:", "--disable-runtime-dependency-installation"], "superlink")
        for i in range(3):
            start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--host",
                   "127.0.0.1", "--port", str(ports[1 + i]),
                   "--node-config", f"config='{tmp_path / 'fed.json'}' node={i}"], f"supernode{i}")
        _wait_for_port(link, procs[0], tmp_path / "superlink.log")
        (tmp_path / "flwr").mkdir(exist_ok=True)
        (tmp_path / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n',
            encoding="utf-8")
        app = tmp_path / "app"
        shutil.copytree(ROOT / "trainer" / "federated" / "flower_app", app)
        yield {"tmp": tmp_path, "env": env, "app": app, "cfg": cfg}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in _descendants_of_run(ports):  # serverapp/clientapp processes Flower detached
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for log in logs:
            log.close()


def test_deployment_runtime_superlink_and_three_supernodes(deployment):
    d = deployment
    cfg_file = d["tmp"] / "fed.json"
    res = subprocess.run([str(BIN / "flwr"), "run", str(d["app"]), "test", "--run-config", f"config='{cfg_file}'",
                          "--stream"], env=d["env"], cwd=d["tmp"], capture_output=True, text=True, timeout=900)
    out = Path(d["cfg"]["out_dir"])
    deadline = time.time() + 60
    while not (out / "summary.json").exists() and time.time() < deadline:  # the stream may end first
        time.sleep(1)
    logs = res.stdout[-3000:] + res.stderr[-2000:]
    assert (out / "summary.json").exists(), logs
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    confirmed = {e["task"] for e in events if e["event"] == "confirm"}
    assert confirmed == {"sentiment", "tagging", "kd"}, logs  # three separate SuperNode processes
    assert summary["updates"] == 4 and summary["rejected"] == 0
    assert {e["task"] for e in events if e["event"] == "final_eval"} == {"sentiment", "tagging", "kd"}
    # The second update of a node starts from its own private head (kept in the SuperNode's
    # state across clientapp processes): at least one node reported twice.
    ups = [e for e in events if e["event"] == "update"]
    assert len(ups) == 4 and max(e["count"] for e in ups) >= 2
