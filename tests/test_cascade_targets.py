"""Cascade (seed 002) building blocks: scoring and split, per-sample teacher selection by sample
id, the student loss (hand-computed), config overrides and data accounting."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdstore
from kdstore.format import Selection, TeacherInfo
from kdstore.hashing import sample_id
from kdstore.writer import SoftLabelRow, StoreWriter
from trainer.classify import cascade_targets as T
from trainer.classify.cascade import CascadeConfig, apply_overrides, dedupe_by_id
from trainer.classify.data import Example


def _targets(ids, probs, labels) -> T.StoreTargets:
    p = torch.tensor(probs, dtype=torch.float32)
    return T.StoreTargets(sample_ids=list(ids), probs=p, kept=torch.ones_like(p, dtype=torch.bool),
                          tail=torch.zeros(len(ids)), labels=torch.tensor(labels, dtype=torch.long))


def _write_store(path, ids, probs, labels, *, bits=16):
    with StoreWriter(str(path), teacher=TeacherInfo(name_or_path="toy", vocab_size=len(probs[0])),
                     selection=Selection(mode="topk", k=len(probs[0])), bits=bits, level="sequence",
                     columns={"label": True}) as w:
        for sid, p, y in zip(ids, probs, labels):
            order = np.argsort(-np.asarray(p), kind="stable")
            w.write([SoftLabelRow(sample_id=sid, tokens=np.zeros(0, np.uint64), counts=np.array([len(p)]),
                                  indices=order, probs=np.asarray(p)[order], tail=np.array([0.0]), label=y)])
    return str(path)


# -- split -------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 1)), min_size=1, max_size=40), st.floats(0.0, 1.0))
def test_split_obeys_threshold_exactly(rows, threshold):
    probs = [[1 - p, p] for p, _ in rows]
    labels = [y for _, y in rows]
    ids = [f"{i:016x}" for i in range(len(rows))]
    s = T.split_by_threshold(_targets(ids, probs, labels), threshold=threshold)
    for i, (p, y) in enumerate(rows):
        gold = np.float32(p if y == 1 else 1 - p)
        assert s.scores[i] == pytest.approx(float(gold), abs=0)
        assert bool(s.target[i]) == (s.scores[i] >= threshold)
    assert sorted(s.target_ids + s.substandard_ids) == ids
    assert s.counts()["target"] + s.counts()["substandard"] == len(rows)


def test_split_at_the_boundary_and_hit_metric(tmp_path):
    probs = [[0.25, 0.75], [0.75, 0.25], [0.5, 0.5], [0.9, 0.1]]
    labels = [1, 1, 0, 0]
    ids = [sample_id(f"t{i}") for i in range(4)]
    t = T.read_store_targets(_write_store(tmp_path / "s", ids, probs, labels))
    by_id = dict(zip(t.sample_ids, range(4)))
    thr = float(t.probs[by_id[ids[2]], 0])  # exactly the decoded score of sample 2: >= keeps it
    s = T.split_by_threshold(t, threshold=thr)
    got = dict(zip(s.sample_ids, s.target))
    assert got == {ids[0]: True, ids[1]: False, ids[2]: True, ids[3]: True}
    hit = T.split_by_threshold(t, threshold=0.5, metric="hit")
    assert dict(zip(hit.sample_ids, hit.scores)) == {ids[0]: 1.0, ids[1]: 0.0, ids[2]: 1.0, ids[3]: 1.0}  # tie -> class 0
    s.write(tmp_path / "split.parquet")
    back = T.Split.read(tmp_path / "split.parquet")
    assert back.sample_ids == s.sample_ids and (back.target == s.target).all() and back.threshold == thr


def test_store_targets_round_trip_and_dataset(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=20)
    labels = rng.integers(0, 3, size=20).tolist()
    ids = [sample_id(f"text {i}") for i in range(20)]
    t = T.read_store_targets(_write_store(tmp_path / "s", ids, probs, labels))
    idx = t.index()
    for sid, p, y in zip(ids, probs, labels):
        np.testing.assert_allclose(t.probs[idx[sid]].numpy(), p, rtol=1e-3)  # 16-bit log code: 0.04 % relative
        assert int(t.labels[idx[sid]]) == y
    assert bool(t.kept.all()) and float(t.tail.abs().max()) < 1e-6
    batch = next(iter(kdstore.SoftLabelDataset(kdstore.open(str(tmp_path / "s")), batch_size=8, shuffle=False)))
    assert batch["kd_indices"].shape == (8, 3) and batch["labels"].shape == (8,)


def test_read_store_targets_rejects_token_level(tmp_path):
    with StoreWriter(str(tmp_path / "tok"), teacher=TeacherInfo(name_or_path="lm", vocab_size=5),
                     selection=Selection(mode="topk", k=1)) as w:
        from kdstore.writer import vocab_table

        w.write_vocab(vocab_table(ids=range(5), tokens=list("abcde"), token_bytes=[c.encode() for c in "abcde"], special=[False] * 5))
        w.write([SoftLabelRow(sample_id="0" * 16, tokens=np.array([0], np.uint64), counts=np.array([1]),
                              indices=np.array([1]), probs=np.array([1.0]), tail=np.array([0.0]))])
    with pytest.raises(ValueError, match="sequence-level"):
        T.read_store_targets(str(tmp_path / "tok"))


# -- teacher selection ---------------------------------------------------------------------------------
def _cascade_fixture():
    ids = [sample_id(f"review {i}") for i in range(10)]
    labels = [i % 2 for i in range(10)]
    target = np.array([i % 3 != 0 for i in range(10)])
    split = T.Split(sample_ids=ids, labels=np.array(labels), preds=np.zeros(10, np.int64), scores=target.astype(float),
                    target=target, threshold=0.5, metric="gold_prob")
    # A says 0.9 for the gold class, B says 0.6: distinguishable per sample. Stores list rows in
    # another order than the data, so a positional lookup would pick the wrong row.
    a_rows = [(sid, [0.1, 0.9] if y else [0.9, 0.1], y) for sid, y in zip(ids, labels)][::-1]
    sub = [i for i in range(10) if not target[i]]
    b_rows = [(ids[i], [0.4, 0.6] if labels[i] else [0.6, 0.4], labels[i]) for i in sub]
    random.Random(1).shuffle(b_rows)
    a = _targets(*zip(*[(s, p, y) for s, p, y in a_rows]))
    b = _targets(*zip(*[(s, p, y) for s, p, y in b_rows]))
    return ids, labels, split, a, b


def test_teacher_table_picks_the_right_teacher_by_sample_id():
    ids, labels, split, a, b = _cascade_fixture()
    table = T.build_teacher_table(sample_ids=ids, labels=labels, num_classes=2, teachers="cascade", split=split, a=a, b=b)
    shuffled = ids[::-1]
    src, probs, kept, tail = table.lookup(shuffled)
    for j, sid in enumerate(shuffled):
        i = ids.index(sid)
        gold = labels[i]
        if split.target[i]:
            assert int(src[j]) == T.SOURCE_A and float(probs[j, gold]) == pytest.approx(0.9)
        else:
            assert int(src[j]) == T.SOURCE_B and float(probs[j, gold]) == pytest.approx(0.6)
    assert table.counts() == {"gold": 0, "a": int(split.target.sum()), "b": int((~split.target).sum())}
    only_a = T.build_teacher_table(sample_ids=ids, labels=labels, num_classes=2, teachers="a", a=a)
    assert set(only_a.source.tolist()) == {T.SOURCE_A}
    gold = T.build_teacher_table(sample_ids=ids, labels=labels, num_classes=2, teachers="gold")
    assert set(gold.source.tolist()) == {T.SOURCE_GOLD}


def test_teacher_table_errors_name_the_sample():
    ids, labels, split, a, b = _cascade_fixture()
    target_id = split.target_ids[0]
    b_bad = _targets(b.sample_ids + [target_id], torch.cat([b.probs, torch.tensor([[0.5, 0.5]])]).tolist(),
                     b.labels.tolist() + [labels[ids.index(target_id)]])
    with pytest.raises(ValueError, match=f"{target_id}.*not substandard"):
        T.build_teacher_table(sample_ids=ids, labels=labels, num_classes=2, teachers="cascade", split=split, a=a, b=b_bad)
    sub_id = split.substandard_ids[0]
    keep = [i for i, s in enumerate(b.sample_ids) if s != sub_id]
    b_missing = _targets([b.sample_ids[i] for i in keep], b.probs[keep].tolist(), b.labels[keep].tolist())
    with pytest.raises(ValueError, match=f"{sub_id} has no row in teacher B"):
        T.build_teacher_table(sample_ids=ids, labels=labels, num_classes=2, teachers="cascade", split=split, a=a, b=b_missing)
    wrong = [1 - y for y in labels]
    with pytest.raises(ValueError, match="store says label"):
        T.build_teacher_table(sample_ids=ids, labels=wrong, num_classes=2, teachers="a", a=a)
    with pytest.raises(KeyError, match="ffff"):
        T.build_teacher_table(sample_ids=ids, labels=labels, num_classes=2, teachers="gold").lookup(["ffff"])


# -- loss ------------------------------------------------------------------------------------------------
def test_sparse_kl_full_distribution_matches_softmax_kl_with_stored_targets_as_they_are():
    # Stored targets carry the capture temperature and are never re-tempered; only the student is.
    torch.manual_seed(0)
    zt, zs = torch.randn(4, 5), torch.randn(4, 5)
    temp = 2.5
    q = torch.softmax(zt / temp, -1)  # what a capture at T = 2.5 stores
    got = T.sparse_kl(zs, q, torch.ones(4, 5, dtype=torch.bool), torch.zeros(4), temperature=temp)
    logps = torch.log_softmax(zs / temp, -1)
    want = (q * (q.log() - logps)).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cascade_kd_term_is_the_core_sparse_kd_loss():
    from trainer.core.losses import sparse_kd_loss

    torch.manual_seed(1)
    logits = torch.randn(6, 4)
    probs = torch.softmax(torch.randn(6, 4), -1)
    kept = torch.tensor([[True, True, False, True]] * 3 + [[True] * 4] * 3)
    tail = torch.where(kept.all(-1), 0.0, (probs * ~kept).sum(-1))
    probs = probs * kept
    source = torch.tensor([T.SOURCE_A, T.SOURCE_B, T.SOURCE_GOLD, T.SOURCE_A, T.SOURCE_B, T.SOURCE_A])
    w = T.LossWeights(gold=0.0, target=1.0, optimized=1.0, temperature=3.0)
    loss, parts = T.cascade_loss(logits, torch.full((6,), -100), source, probs, kept, tail, weights=w)
    idx = torch.arange(4).expand(6, 4)
    core = sparse_kd_loss(logits, idx, probs, tail, source != T.SOURCE_GOLD, temperature=3.0, reduction="sum")
    assert float(loss) == pytest.approx(float(core) / 6, rel=1e-6)
    mean_kl = sparse_kd_loss(logits, idx, probs, tail, source != T.SOURCE_GOLD, temperature=3.0) / 9.0
    assert parts["kl"] == pytest.approx(float(mean_kl), rel=1e-6)


def test_sparse_kl_tail_bucket_hand_computed():
    # Teacher keeps classes 0 and 2 (0.5, 0.3) with tail 0.2; student probs (0.2, 0.3, 0.1, 0.4).
    p = torch.tensor([[0.2, 0.3, 0.1, 0.4]])
    kept = torch.tensor([[True, False, True, False]])
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.0]])
    got = float(T.sparse_kl(p.log(), probs, kept, torch.tensor([0.2])))
    want = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.7)
    assert got == pytest.approx(want, rel=1e-5)
    # The student loss passes the tail through: KD-only weight 1.5 at T = 1.
    loss, _ = T.cascade_loss(p.log(), torch.tensor([0]), torch.tensor([T.SOURCE_A]), probs, kept, torch.tensor([0.2]),
                             weights=T.LossWeights(gold=0.0, target=1.5, optimized=0.0, temperature=1.0))
    assert float(loss) == pytest.approx(1.5 * want, rel=1e-5)


def test_cascade_loss_hand_computed_per_source_weights():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    labels = torch.tensor([0, 0, 1])
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.0, 0.0]])
    kept = torch.tensor([[True, True], [True, True], [False, False]])
    source = torch.tensor([T.SOURCE_A, T.SOURCE_B, T.SOURCE_GOLD])
    w = T.LossWeights(gold=0.5, target=2.0, optimized=3.0, temperature=1.0)
    loss, parts = T.cascade_loss(logits, labels, source, probs, kept, torch.zeros(3), weights=w)

    def ce(z, y):
        return -z[y] + math.log(sum(math.exp(v) for v in z))

    def kl(q, z):
        lse = math.log(sum(math.exp(v) for v in z))
        return sum(qi * (math.log(qi) - (zi - lse)) for qi, zi in zip(q, z) if qi > 0)

    rows = logits.tolist()
    want = (0.5 * ce(rows[0], 0) + 2.0 * kl([0.8, 0.2], rows[0])
            + 0.5 * ce(rows[1], 0) + 3.0 * kl([0.3, 0.7], rows[1])
            + 0.5 * ce(rows[2], 1)) / 3
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert parts["kl"] == pytest.approx((kl([0.8, 0.2], rows[0]) + kl([0.3, 0.7], rows[1])) / 2, rel=1e-5)
    # Temperature scales KD terms by T^2 and softens the student only: the stored [0.8, 0.2]
    # already carries the capture temperature.
    w2 = T.LossWeights(gold=0.0, target=1.0, optimized=1.0, temperature=2.0)
    loss2, _ = T.cascade_loss(logits[:1], labels[:1], source[:1], probs[:1], kept[:1], torch.zeros(1), weights=w2)
    assert float(loss2) == pytest.approx(4 * kl([0.8, 0.2], [v / 2 for v in rows[0]]), rel=1e-5)
    # Unlabelled samples (-100) get no CE term.
    loss3, _ = T.cascade_loss(logits[2:], torch.tensor([-100]), source[2:], probs[2:], kept[2:], torch.zeros(1), weights=w)
    assert float(loss3) == 0.0


# -- config and data ---------------------------------------------------------------------------------------
def test_overrides_types_and_unknown_keys():
    cfg = apply_overrides(CascadeConfig(), ["threshold=0.8", "a_max_steps=12", "c_teachers=gold", "c-cnn-kernels=2,3"])
    assert (cfg.threshold, cfg.a_max_steps, cfg.c_teachers, cfg.c_cnn_kernels) == (0.8, 12, "gold", "2,3")
    with pytest.raises(ValueError, match="did you mean threshold"):
        apply_overrides(CascadeConfig(), ["treshold=0.3"])
    with pytest.raises(ValueError, match="a_max_steps='x': expected int"):
        apply_overrides(CascadeConfig(), ["a_max_steps=x"])
    with pytest.raises(ValueError, match="c_teachers"):
        apply_overrides(CascadeConfig(), ["c_teachers=b"])


def test_dedupe_accounts_for_every_example():
    exs = [Example("好", 1), Example("好", 1), Example("差", 0), Example("一般", 0), Example("一般", 1), Example("不错", 1)]
    rows, merged, rejected = dedupe_by_id(exs)
    assert sorted(r["text"] for r in rows) == ["不错", "好", "差"]
    assert merged == 1 and [r["copies"] for r in rejected] == [2]
    assert len(rows) + merged + sum(r["copies"] for r in rejected) == len(exs)
    assert {r["sample_id"] for r in rows} == {sample_id(t) for t in ("好", "差", "不错")}
