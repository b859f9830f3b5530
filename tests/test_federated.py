"""``kd train federated`` end to end on Flower's simulation runtime, on real data.

Three nodes (sentiment reviews, People's Daily POS tagging, token-level KD from a store that
a tiny teacher captured), with injected faults: the tagging node crashes on its 2nd local
round (then rejoins), the KD node sends a NaN update and the sentiment node a wrong-shape one.
Every message the master receives is recorded for the privacy check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures import make_tiny_causal_lm, train_bpe_tokenizer
from trainer.data.corpora import peoples_daily

pytest.importorskip("flwr")

from trainer.core.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from trainer.federated.config import DECLINE_REASONS, FederatedConfig  # noqa: E402
from trainer.federated.node import _confirm, node_spec  # noqa: E402
from trainer.federated.run import run_federated  # noqa: E402
from trainer.federated.tasks import build_encoder, capture_kd_store, encoder_arrays  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("fed")
    texts = [s.text for s in peoples_daily("train")[:300]]
    tok = train_bpe_tokenizer(texts, base / "tok", vocab_size=500)
    teacher = make_tiny_causal_lm(base / "teacher", tokenizer_dir=tok, hidden=32, layers=1, heads=2, seed=3)
    store = capture_kd_store(str(teacher), texts[:100], str(base / "store"), max_len=32, k=8)
    return {"base": base, "tok": str(tok), "teacher": str(teacher), "store": store}


def small_cfg(world, out, **kw) -> FederatedConfig:
    base = dict(nodes="sentiment,tagging,kd", kd_store=world["store"], sentiment_limit=160, tagging_limit=160,
                eval_limit=48, max_len=32, d_model=32, n_heads=2, d_ff=64, local_steps=2, batch_size=8,
                max_updates=24, out_dir=str(out), save_every=4, reply_timeout_s=15, join_timeout_s=300,
                # Re-instruct a lost node at once: on a fast machine the budget is spent within the
                # default 2 s back-off, and the test must see the crashed node rejoin.
                rejoin_after_s=0.0,
                progress=False)
    base.update(kw)
    return FederatedConfig(**base)


def make_fault_mod(marker_dir):
    """Flower mod on every node: crash / corrupt chosen local rounds. Train messages are counted
    in the node's state; the crash happens once (a marker file), so the node can rejoin."""

    def fault_mod(msg, context, call_next):
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        seen = int(context.state["faults"]["train"]) + 1 if "faults" in context.state else 1
        context.state["faults"] = MetricRecord({"train": seen})
        node = int(context.node_config["partition-id"])  # 0 sentiment, 1 tagging, 2 kd (one node in the
        # simulation runtime sometimes loses a message sent while another one crashes: the master's
        # reply timeout covers that, so the faults below sit on the busy KD node)
        marker = marker_dir / "crashed"
        if node == 1 and seen == 2 and not marker.exists():
            marker.write_text("1")
            raise RuntimeError("injected crash of the tagging node")
        reply = call_next(msg, context)
        if node != 2 or seen not in (2, 3):
            return reply
        arrays = {k: a.numpy().copy() for k, a in reply.content["encoder"].items()}
        name = next(iter(arrays))
        if seen == 2:  # a NaN in the update
            arrays[name].flat[0] = np.nan
        else:  # wrong shapes
            arrays[name] = np.zeros((3, 3), np.float32)
        bad = ArrayRecord({k: Array.from_numpy_ndarray(v) for k, v in arrays.items()})
        return Message(RecordDict({"encoder": bad, "metrics": reply.content["metrics"]}), reply_to=msg)

    return fault_mod


def test_federated_run_faults_privacy_resume(world, tmp_path):
    received = []
    out = tmp_path / "run"
    cfg = small_cfg(world, out)
    summary = run_federated(cfg, mods=[make_fault_mod(tmp_path)], record=received.append)

    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    ups = [e for e in events if e["event"] == "update"]
    # The budget was spent in spite of the crash; both bad updates were rejected and counted.
    assert summary["updates"] == 24 and summary["rejected"] == 2
    reasons = sorted(e["reason"] for e in events if e["event"] == "rejected")
    assert len(reasons) == 2 and "NaN or Inf" in " ".join(reasons) and "shape (3, 3)" in " ".join(reasons)
    lost = [e for e in events if e["event"] == "node_lost" and "injected crash" in e["reason"]]
    assert len(lost) == 1
    tag = lost[0]["node"]
    # It rejoined: confirmed again and contributed accepted updates after the crash.
    confirms = [i for i, e in enumerate(events) if e["event"] == "confirm" and e["node"] == tag]
    assert len(confirms) >= 2
    assert any(e["node"] == tag and e["step"] > lost[0]["step"] for e in ups)
    # Asynchronous folding: versions advance one per accepted update after the first round.
    assert sorted({e["task"] for e in ups}) == ["kd", "sentiment", "tagging"]
    assert all(0 < e["weight"] <= 1 for e in ups)
    # Every node evaluated the final global encoder on its held-out split.
    final = {e["task"]: e for e in events if e["event"] == "final_eval"}
    assert set(final) == {"sentiment", "tagging", "kd"}
    assert 0 <= final["sentiment"]["eval_acc"] <= 1 and final["kd"]["eval_kl"] > 0
    ckpt = load_checkpoint(out)
    assert all(torch.isfinite(v).all() for v in ckpt["params"].values())
    assert (out / "curves.png").stat().st_size > 1000

    # Privacy: every message the master received holds only shared-encoder arrays and scalars.
    names = set(encoder_arrays(build_encoder(_spec(cfg))))
    assert len(received) >= 3 + 24 + 3
    for msg in received:
        if msg.has_error():
            assert "injected crash" in msg.error.reason  # the crash report (Flower's error reply)
            continue
        rd = msg.content
        assert set(rd.config_records) == set()  # no strings of any kind
        for key, rec in rd.array_records.items():
            assert key == "encoder" and set(rec.keys()) == names
            assert not any(k.startswith(("private", "head")) for k in rec.keys())
        for rec in rd.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in rec.values())
        good = [r for r in rd.array_records.values() if set(r.keys()) == names]
        for r in good:  # shapes are the encoder's: no token-id or text payload hides in them
            assert all(r[k].numpy().dtype == np.float32 for k in r.keys())

    # A restarted master resumes from its last checkpoint and continues the version count.
    version = summary["version"]
    cfg2 = small_cfg(world, out, max_updates=27, resume=str(out))
    summary2 = run_federated(cfg2)
    assert summary2["updates"] == 27 and summary2["version"] == version + 3
    events2 = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["step"] for e in events2 if e["event"] == "update"][: len(ups)] == [e["step"] for e in ups]
    assert len(list_checkpoints(out)) <= cfg.keep_checkpoints


def _spec(cfg):
    from trainer.federated.node import shared_tokenizer
    from kdstore.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_tokenizer(cfg))
    return cfg.encoder_spec(vocab_size=-(-len(tok) // 64) * 64, pad_id=tok.pad_token_id or 0)


def test_nodes_decline_what_they_cannot_serve(world, tmp_path):
    """Seed step 2: a node answers decline (with a reason code) for a foreign vocabulary, an
    unknown encoder type or unreadable data, and confirms a matching instruction."""
    from trainer.federated.node import vocab_identity

    cfg = small_cfg(world, tmp_path)
    good = {"encoder_type": "bert-encoder", "vocab_id": vocab_identity(world["tok"])}
    for i in range(3):
        assert _confirm(node_spec(cfg, i), good)["accept"] == 1
    other = train_bpe_tokenizer([s.text for s in peoples_daily("train")[300:500]], tmp_path / "tok2", vocab_size=400)
    wrong_vocab = {**good, "vocab_id": vocab_identity(str(other))}
    assert {_confirm(node_spec(cfg, i), wrong_vocab)["reason"] for i in range(3)} == {2}
    assert _confirm(node_spec(cfg, 0), {**good, "encoder_type": "lstm"})["reason"] == 3
    broken = FederatedConfig(**{**cfg.__dict__, "kd_eval_store": str(tmp_path / "missing")})
    assert _confirm(node_spec(broken, 2), good)["reason"] == 4
    assert set(DECLINE_REASONS) >= {2, 3, 4}
