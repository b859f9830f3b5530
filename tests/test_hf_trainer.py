"""Stores inside Hugging Face ``Trainer``: the sample_id join (kdstore.collate) and the loss glue (trainer.hf).

A tiny Llama teacher (BPE tokenizer trained on People's Daily) is captured into a top-k store
with windows of 24 tokens; the "user's dataset" is tokenized independently, the way a
Trainer user would, and joined to the store by ``(sample_id, window)``. Reference targets
are read straight from ``Store.iter_decoded`` (not through the collator), so the tests also
check that the join picks the right rows and positions.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import kdstore
from fixtures import make_tiny_causal_lm, train_bpe_tokenizer
from kdstore.collate import StoreCollator, store_collator
from kdstore.format import Selection
from kdstore.hashing import sample_id
from trainer.core.losses import ce_loss, mix, sparse_jsd_loss, sparse_kd_loss
from trainer.data.corpora import peoples_daily
from pipelines.plain import cache_with_model

WINDOW = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("hf")
    texts = [s.text for s in peoples_daily("train")[:60]]
    tok_dir = train_bpe_tokenizer(texts, d / "tok", vocab_size=300)
    teacher = make_tiny_causal_lm(d / "teacher", tokenizer_dir=tok_dir, hidden=32, layers=1, heads=2, seed=1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    store = str(d / "store")
    cache_with_model(AutoModelForCausalLM.from_pretrained(str(teacher)), tok, texts, {store: Selection(mode="topk", k=6)},
                     max_length=WINDOW, name_or_path=str(teacher), shard_bytes=4096)
    # The user's dataset, built without kdstore's capture code: tokenize, cut into windows.
    rows = []
    for text in texts:
        ids = tok(text)["input_ids"]
        for w, s in enumerate(range(0, len(ids), WINDOW)):
            rows.append({"sample_id": sample_id(text), "window": w, "input_ids": ids[s : s + WINDOW], "text": text})
    return {"dir": d, "tok": tok, "teacher": teacher, "store": store, "rows": rows}


def _reference_targets(store_uri: str):
    """{(sample_id, window): (indices [P, K], probs [P, K], tail [P], context_len)} from the store itself."""
    out = {}
    st = kdstore.open(store_uri)
    for d in st.iter_decoded():
        for r in range(d.num_rows):
            a, b = d.positions[r], d.positions[r + 1]
            e0, e1 = d.entry_offsets[a], d.entry_offsets[b]
            k = int(d.counts[a])
            out[(d.sample_id[r], int(d.window[r]))] = (d.indices[e0:e1].reshape(-1, k), d.probs[e0:e1].reshape(-1, k),
                                                        d.tail[a:b], int(d.context_len[r]))
    return out


def _check_batch_against_store(batch, ref, padding_side="right"):
    B, L = batch["input_ids"].shape
    for r, sid in enumerate(batch["sample_id"]):
        n = int(batch["attention_mask"][r].sum())
        idx, p, tail, _ = ref[(sid, int(batch["_window"][r]))]
        assert n == len(tail)
        sl = slice(0, n) if padding_side == "right" else slice(L - n, L)
        np.testing.assert_array_equal(batch["kd_indices"][r, sl].numpy(), idx)
        np.testing.assert_array_equal(batch["kd_probs"][r, sl].numpy(), p)
        np.testing.assert_array_equal(batch["kd_tail"][r, sl].numpy(), tail)
        assert batch["kd_mask"][r, sl].all() and int(batch["kd_mask"][r].sum()) == n
        assert (batch["kd_probs"][r].sum(-1) > 0).sum() == n  # nothing outside the example's positions


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_join_survives_user_shuffling_and_filtering(world, padding_side):
    import datasets

    ref = _reference_targets(world["store"])
    ds = datasets.Dataset.from_list(world["rows"])
    ds = ds.shuffle(seed=3).filter(lambda ex: len(ex["text"]) % 3 != 0)  # what users do to their data
    assert 0 < len(ds) < len(world["rows"])
    coll = store_collator(world["store"], world["tok"], padding_side=padding_side)
    assert len(coll) == len(ref)
    feats = [{k: ex[k] for k in ("sample_id", "window", "input_ids")} for ex in ds]
    for s in range(0, len(feats), 7):
        chunk = feats[s : s + 7]
        batch = coll(chunk)
        batch["_window"] = [f["window"] for f in chunk]
        assert batch["sample_id"] == [f["sample_id"] for f in chunk]
        _check_batch_against_store(batch, ref, padding_side)
        # Labels: the user's ids, -100 in padding (HF convention, unshifted).
        assert ((batch["labels"] == -100) == (batch["attention_mask"] == 0)).all()


def test_join_errors_name_the_sample(world):
    coll = StoreCollator(world["store"])
    good = {k: world["rows"][0][k] for k in ("sample_id", "window", "input_ids")}
    with pytest.raises(KeyError, match="'0123456789abcdef' window 0 is not in the store"):
        coll([good, {**good, "sample_id": "0123456789abcdef"}])
    with pytest.raises(ValueError, match=rf"{good['sample_id']}' window 0: {len(good['input_ids']) + 1} tokens in the dataset"):
        coll([{**good, "input_ids": good["input_ids"] + [5]}])
    short = {**good, "input_ids": good["input_ids"][:-2]}
    with pytest.raises(ValueError, match="allow_prefix=True"):
        coll([short])
    other = list(good["input_ids"])
    other[3] = (other[3] + 1) % 300
    with pytest.raises(ValueError, match="token 3 is"):
        coll([{**good, "input_ids": other}])
    with pytest.raises(KeyError, match="no 'sample_id'"):
        coll([{"input_ids": good["input_ids"]}])
    # A prefix (shorter max_length) is exact for a causal teacher: accepted on request.
    b = StoreCollator(world["store"], allow_prefix=True)([short])
    full = coll([good])
    n = len(short["input_ids"])
    assert torch.equal(b["kd_probs"][0, :n], full["kd_probs"][0, :n]) and int(b["kd_mask"].sum()) == n


class _Recorder:
    """Wraps KDTrainer.compute_loss: records each training step's loss and recomputes it from
    the store's own targets with the project's separate (unfused) loss functions."""

    def __init__(self, ref, kd_weight, kd_loss, temperature, beta=0.5):
        self.ref, self.kd_weight, self.kd_loss, self.T, self.beta = ref, kd_weight, kd_loss, temperature, beta
        self.pairs = []

    def expected(self, model, inputs):
        ids, att, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        B, L = ids.shape
        K = max(self.ref[(s, w)][0].shape[1] for s, w in zip(inputs["sample_id"], inputs["_windows"]))
        idx = torch.zeros(B, L, K, dtype=torch.long)
        p = torch.zeros(B, L, K)
        tail = torch.zeros(B, L)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for r, key in enumerate(zip(inputs["sample_id"], inputs["_windows"])):
            i, q, t, _ = self.ref[key]
            n = len(t)
            idx[r, :n, : i.shape[1]] = torch.from_numpy(i)
            p[r, :n, : i.shape[1]] = torch.from_numpy(q)
            tail[r, :n] = torch.from_numpy(t)
            mask[r, :n] = True
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=att).logits
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        ce = ce_loss(logits, shifted)
        if self.kd_loss == "jsd":
            kd = sparse_jsd_loss(logits, idx, p, tail, mask, beta=self.beta, temperature=self.T)
        else:
            kd = sparse_kd_loss(logits, idx, p, tail, mask, kind=self.kd_loss, temperature=self.T)
        return float(mix(ce, kd, self.kd_weight))


def _trainer_classes(kind):
    """(trainer class, its arguments class): the stock Trainer, or TRL's SFTTrainer with the mixin."""
    from transformers import TrainingArguments

    from trainer.hf import KDLossMixin, KDTrainer

    if kind == "Trainer":
        return KDTrainer, TrainingArguments, {}
    from trl import SFTConfig, SFTTrainer

    class KDSFTTrainer(KDLossMixin, SFTTrainer):
        pass

    return KDSFTTrainer, SFTConfig, {"processing_class": None}


@pytest.mark.parametrize("kind,kd_loss,temperature", [("Trainer", "forward", 1.0), ("Trainer", "reverse", 2.0),
                                                      ("Trainer", "jsd", 1.0), ("SFTTrainer", "forward", 1.0)])
def test_real_trainer_loss_equals_the_project_loss(world, tmp_path, kind, kd_loss, temperature):
    import datasets
    from transformers import AutoModelForCausalLM

    base_cls, args_cls, extra = _trainer_classes(kind)
    if "processing_class" in extra:
        extra["processing_class"] = world["tok"]

    ref = _reference_targets(world["store"])
    student = AutoModelForCausalLM.from_pretrained(str(world["teacher"]))  # same vocab; weights are irrelevant here
    torch.manual_seed(0)
    for prm in student.parameters():  # a student that differs from the teacher
        prm.data.add_(0.05 * torch.randn_like(prm))
    ds = datasets.Dataset.from_list(world["rows"]).shuffle(seed=1)
    rec = _Recorder(ref, 0.7, kd_loss, temperature)
    base = store_collator(world["store"], world["tok"])

    def collator(features):
        batch = base(features)
        batch["_windows"] = [int(f.get("window", 0)) for f in features]
        return batch

    class Checked(base_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            windows = inputs.pop("_windows")
            want = rec.expected(model, {**inputs, "_windows": windows})
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            rec.pairs.append((float((out[0] if return_outputs else out).detach()), want))
            return out

    args = args_cls(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Checked(model=student, args=args, train_dataset=ds, data_collator=collator, kd_weight=0.7, kd_loss=kd_loss,
                      temperature=temperature, **extra)
    out = trainer.train()
    assert out.global_step == 3 and len(rec.pairs) == 3
    for got, want in rec.pairs:
        assert got == pytest.approx(want, rel=1e-5)
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert [h["loss"] for h in logged] == pytest.approx([g for g, _ in rec.pairs], rel=1e-4)
    assert all("ce" in h and "kd" in h for h in logged)
    # The weights moved: the Trainer really optimised this loss.
    assert rec.pairs[0][0] != rec.pairs[-1][0]
    n = len(rec.pairs)
    ev = trainer.evaluate(ds.select(range(8)))  # evaluation (one batch of 8) goes through the same loss
    assert len(rec.pairs) == n + 1
    assert ev["eval_loss"] == pytest.approx(rec.pairs[-1][0], rel=1e-5) and rec.pairs[-1][0] == pytest.approx(rec.pairs[-1][1], rel=1e-5)


def test_kd_trainer_rejects_a_batch_without_targets(world, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from trainer.hf import KDTrainer

    model = AutoModelForCausalLM.from_pretrained(str(world["teacher"]))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    tr = KDTrainer(model=model, args=args, kd_weight=0.5)
    ids = torch.tensor([world["rows"][0]["input_ids"]])
    with pytest.raises(KeyError, match="StoreCollator"):
        tr.compute_loss(model, {"input_ids": ids, "labels": ids})
    with pytest.raises(ValueError, match="kd_loss must be one of"):
        KDTrainer(model=model, args=args, kd_loss="kl")


def test_shuffle_order_does_not_change_targets(world):
    """Same examples in two orders: each example's targets are identical (no positional lookup)."""
    coll = StoreCollator(world["store"], cache_bytes=1)  # tiny cache: forces row-group reloads
    feats = [{k: r[k] for k in ("sample_id", "window", "input_ids")} for r in world["rows"][:12]]
    a = coll(feats)
    perm = list(range(len(feats)))
    random.Random(0).shuffle(perm)
    b = coll([feats[i] for i in perm])
    for j, i in enumerate(perm):
        n = len(feats[i]["input_ids"])
        assert torch.equal(a["kd_probs"][i, :n], b["kd_probs"][j, :n])
        assert torch.equal(a["kd_indices"][i, :n], b["kd_indices"][j, :n])


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A store of 60 rows in row groups of 6 (V = 64) and its rows as a user's dataset."""
    from _storeutil import make_rows, write_store

    rows, _ = make_rows(60, 64, "topk", seed=4)
    uri = str(write_store(tmp_path_factory.mktemp("grouped") / "s", rows, v=64, mode="topk", row_group_rows=6))
    feats = []
    for d in kdstore.open(uri).iter_decoded():
        for r in range(d.num_rows):
            a, b = d.positions[r], d.positions[r + 1]
            feats.append({"sample_id": d.sample_id[r], "window": int(d.window[r]), "input_ids": d.input_ids[a:b].tolist()})
    return uri, feats


def test_store_order_sampler_reads_each_row_group_once_per_epoch(grouped):
    from kdstore.collate import StoreOrderSampler

    uri, feats = grouped
    coll = StoreCollator(uri, cache_bytes=1)  # keeps only the newest row group
    sampler = StoreOrderSampler(coll, [f["sample_id"] for f in feats], [f["window"] for f in feats], seed=0, block_groups=1)
    groups = sampler.n_groups
    assert groups >= 4
    order = list(sampler)
    assert sorted(order) == list(range(len(feats)))
    for s in range(0, len(order), 5):
        coll([feats[i] for i in order[s : s + 5]])
    assert coll.row_group_reads == groups  # each group once per epoch
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == sorted(order)
    assert list(StoreOrderSampler(coll, [f["sample_id"] for f in feats], [f["window"] for f in feats], seed=0,
                                  block_groups=1)) == order  # a pure function of (seed, epoch)
    shuffled = list(range(len(feats)))
    random.Random(0).shuffle(shuffled)
    before = coll.row_group_reads
    for s in range(0, len(shuffled), 5):
        coll([feats[i] for i in shuffled[s : s + 5]])
    assert coll.row_group_reads - before > 2 * groups  # what uniform shuffling costs with a small cache
    with pytest.raises(KeyError, match="example 1: sample_id 'ffffffffffffffff'"):
        StoreOrderSampler(coll, [feats[0]["sample_id"], "ffffffffffffffff"])


def test_kd_trainer_store_order_uses_the_sampler(world, grouped, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, TrainingArguments

    from kdstore.collate import StoreOrderSampler
    from trainer.hf import KDTrainer

    uri, feats = grouped
    ds = datasets.Dataset.from_list(feats)
    coll = store_collator(uri, world["tok"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    tr = KDTrainer(model=AutoModelForCausalLM.from_pretrained(str(world["teacher"])), args=args, train_dataset=ds,
                   data_collator=coll, store_order=True)
    assert isinstance(tr._get_train_sampler(), StoreOrderSampler)
    tr.train()
    assert 0 < coll.row_group_reads <= 10  # 16 examples from at most 2 blocks of 8 groups, each read once


def test_sequence_level_store_joins_class_targets(tmp_path):
    from kdstore import Selection as Sel, SoftLabelRow, StoreWriter, TeacherInfo

    uri = str(tmp_path / "seq")
    with StoreWriter(uri, teacher=TeacherInfo(name_or_path="clf", vocab_size=3), selection=Sel(mode="topk", k=2),
                     level="sequence", columns={"label": True}) as w:
        w.write([SoftLabelRow(sample_id=sample_id(f"text {i}"), tokens=np.zeros(0, np.uint64), counts=np.array([2]),
                              indices=np.array([i % 3, (i + 1) % 3]), probs=np.array([0.6 + 0.01 * i, 0.3]), tail=np.array([0.1 - 0.01 * i]),
                              label=None if i == 2 else i % 3) for i in range(6)])
    coll = StoreCollator(uri)
    feats = [{"sample_id": sample_id(f"text {i}"), "input_ids": list(range(i + 2))} for i in (4, 2, 0)]
    feats[0]["label"] = 1  # the example's own label wins over the store's
    b = coll(feats)
    assert b["input_ids"].shape == (3, 6) and b["labels"].tolist() == [1, -100, 0]
    assert b["kd_indices"].tolist() == [sorted([1, 2]), sorted([2, 0]), [0, 1]]
    p4 = dict(zip(b["kd_indices"][0].tolist(), b["kd_probs"][0].tolist()))
    assert p4[1] == pytest.approx(0.64, abs=0.01) and b["kd_tail"][0].item() == pytest.approx(0.06, abs=0.01)
    assert b["kd_mask"].all()


def test_collator_pickles_for_spawned_dataloader_workers(grouped):
    import pickle

    uri, feats = grouped
    coll = StoreCollator(uri)
    a = coll(feats[:5])
    again = pickle.loads(pickle.dumps(coll))
    b = again(feats[:5])
    assert torch.equal(a["kd_probs"], b["kd_probs"]) and torch.equal(a["kd_indices"], b["kd_indices"])
