"""Trainer components: flat config, text windows/batches, model builders, checkpoints, schedule."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from trainer.core import checkpoint as ck
from trainer.core.config import TrainConfig, apply_overrides, format_config, from_dict, to_dict
from trainer.lm.models import PRESETS, build_causal_lm, count_parameters, model_spec, padded_vocab, resize_vocab, vocab_size_of
from trainer.core.schedule import lr_schedule
from trainer.lm.textdata import TextBatches, collate_windows, document_windows, load_texts, packed_windows


# -- config ---------------------------------------------------------------------------------
def test_overrides_coerce_types_and_roundtrip():
    cfg = apply_overrides(TrainConfig(), ["lr=3e-4", "max_steps=50", "tail_bucket=false", "kd-loss=reverse",
                                          "store=gs://b/s", "max_steps=1e2"])
    assert cfg.lr == 3e-4 and cfg.max_steps == 100 and cfg.tail_bucket is False
    assert cfg.kd_loss == "reverse" and cfg.store == "gs://b/s"
    d = to_dict(cfg)
    assert json.loads(json.dumps(d)) == d  # flat and JSON-safe
    assert from_dict(TrainConfig, d) == cfg
    assert from_dict(TrainConfig, {**d, "removed_key": 1}) == cfg  # old checkpoints still load
    text = format_config(cfg)
    assert "* lr" in text and "  seed" in text  # changed keys are marked


@pytest.mark.parametrize("item, msg", [
    ("lrr=1", "did you mean lr"), ("max_steps=1.5", "expected int"), ("tail_bucket=maybe", "boolean"),
    ("lr", "not key=value"),
])
def test_bad_overrides_are_rejected_with_a_hint(item, msg):
    with pytest.raises(ValueError, match=msg):
        apply_overrides(TrainConfig(), [item])


def test_validate_names_the_problem():
    with pytest.raises(ValueError, match="no training data"):
        TrainConfig().validate()
    with pytest.raises(ValueError, match="kd_weight=0"):
        TrainConfig(train_text="x.txt", kd_weight=0.5).validate()
    TrainConfig(train_text="x.txt", kd_weight=0.0).validate()


# -- text data ------------------------------------------------------------------------------
def test_packed_windows_make_every_token_a_target_exactly_once():
    docs = [np.arange(10, 17), np.arange(20, 25), np.arange(30, 42)]  # 24 tokens
    wins = packed_windows(docs, 5)
    stream = np.concatenate(docs)
    assert all(len(w) == 6 for w in wins) and len(wins) == (len(stream) - 1) // 5
    targets = np.concatenate([w[1:] for w in wins])
    assert np.array_equal(targets, stream[1 : 1 + len(targets)])


def test_document_windows_keep_documents_apart():
    docs = [np.arange(7), np.arange(100, 103), np.array([5])]
    wins = document_windows(docs, 4)
    assert [w.tolist() for w in wins] == [[0, 1, 2, 3, 4], [4, 5, 6], [100, 101, 102]]


def test_collate_shifts_labels_and_masks_padding():
    b = collate_windows([np.array([1, 2, 3, 4]), np.array([7, 8])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [7, 0, 0]]
    assert b["labels"].tolist() == [[2, 3, 4], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[True, True, True], [True, False, False]]


def test_text_batches_are_deterministic_rank_disjoint_and_resume_exactly():
    wins = [np.array([i, i + 1, i + 2]) for i in range(23)]
    full = TextBatches(wins, batch_size=4, seed=5)
    first = [b["sample_id"] for b in full] + [b["sample_id"] for b in full]  # two epochs
    again = TextBatches(wins, batch_size=4, seed=5)
    assert first == [b["sample_id"] for b in again] + [b["sample_id"] for b in again]
    assert first[:6] != first[6:]  # a new permutation per epoch
    # Interrupt after 3 batches of epoch 0, restore into a fresh object, continue.
    part = TextBatches(wins, batch_size=4, seed=5)
    it = iter(part)
    seen = [next(it)["sample_id"] for _ in range(3)]
    state = part.state_dict()
    resumed = TextBatches(wins, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    seen += [b["sample_id"] for b in resumed] + [b["sample_id"] for b in resumed]
    assert seen == first
    r0 = {s for b in TextBatches(wins, batch_size=4, rank=0, world_size=2) for s in b["sample_id"]}
    r1 = {s for b in TextBatches(wins, batch_size=4, rank=1, world_size=2) for s in b["sample_id"]}
    assert not r0 & r1 and len(r0 | r1) == 23
    with pytest.raises(ValueError, match="different data or settings"):
        TextBatches(wins, batch_size=3, seed=5).load_state_dict(state)


def test_load_texts_sources(tmp_path):
    (tmp_path / "a.txt").write_text("第一行\n\n第二行\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "一"}\n{"text": "二"}\n', encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n', encoding="utf-8")
    assert load_texts(str(tmp_path / "a.txt")) == ["第一行", "第二行"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["一", "二"]
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="not a file"):
        load_texts("nope:train")


# -- models ---------------------------------------------------------------------------------
def test_presets_teacher_is_about_four_times_the_student():
    vocab = padded_vocab(4000)
    assert vocab == 4032
    with torch.device("meta"):  # shapes only: no memory, no init
        t = count_parameters(build_causal_lm("teacher-small", vocab_size=vocab))
        s = count_parameters(build_causal_lm("student-tiny", vocab_size=vocab))
    assert 4.0 <= t / s <= 5.0, (t, s)
    m = build_causal_lm("micro", vocab_size=100, seed=0)
    # Tied embeddings are counted once.
    assert count_parameters(m) == sum(p.numel() for p in m.parameters())
    assert count_parameters(m, exclude_embeddings=True) == count_parameters(m) - 100 * PRESETS["micro"].hidden_size


def test_model_spec_from_json_with_preset_overrides_and_hf_config(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"preset": "micro", "num_layers": 2, "dropout": 0.1}))
    spec = model_spec(str(f))
    assert spec.num_layers == 2 and spec.hidden_size == PRESETS["micro"].hidden_size
    m = build_causal_lm(str(f), vocab_size=64)
    assert m.config.num_hidden_layers == 2 and m.config.attention_dropout == 0.1
    g = tmp_path / "hf.json"
    g.write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}))
    m2 = build_causal_lm(str(g), vocab_size=50)
    assert type(m2).__name__ == "GPT2LMHeadModel" and vocab_size_of(m2) == 50
    with pytest.raises(ValueError, match="unknown model spec keys"):
        model_spec({"preset": "micro", "hiden": 3})
    with pytest.raises(ValueError, match="neither a preset"):
        model_spec("no-such-preset")


def test_resize_vocab_keeps_old_rows_and_adds_mean_rows():
    m = build_causal_lm("micro", vocab_size=40, seed=0)
    old = m.get_input_embeddings().weight.detach().clone()
    resize_vocab(m, 48)
    new = m.get_input_embeddings().weight.detach()
    assert new.shape == (48, old.shape[1]) and torch.equal(new[:40], old)
    assert torch.allclose(new[40:], old.mean(0).expand(8, -1), atol=0.05)
    assert m(input_ids=torch.tensor([[1, 47]])).logits.shape[-1] == 48


# -- checkpoints, schedule -------------------------------------------------------------------
def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ck.save_checkpoint(ck.checkpoint_path(tmp_path, 7), {"rng": ck.rng_state(), "step": 7})
    want = (random.random(), np.random.rand(), torch.rand(2))
    ck.set_rng_state(ck.load_checkpoint(path)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


def test_checkpoint_keep_latest_resume_and_corrupt_file(tmp_path):
    for step in (1, 2, 3):
        ck.save_checkpoint(ck.checkpoint_path(tmp_path, step), {"step": step}, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["ckpt-0000002.pt", "ckpt-0000003.pt"]
    assert ck.load_checkpoint(tmp_path)["step"] == 3  # a run directory resolves to its latest
    bad = ck.checkpoint_path(tmp_path, 4)
    bad.write_bytes(ck.checkpoint_path(tmp_path, 3).read_bytes()[:50])
    with pytest.raises(ValueError, match="truncated"):
        ck.load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        ck.load_checkpoint(tmp_path / "empty")


def _lr_lambda(cfg: TrainConfig):
    """The LM loop's schedule (trainer.core.schedule, transformers' cosine with a floor) as f(step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedule(opt, shape="cosine", warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps,
                        min_lr_ratio=cfg.min_lr_ratio)
    return sched.lr_lambdas[0]


def test_warmup_cosine_schedule():
    f = _lr_lambda(TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1))
    # The warm-up counts the step being taken: step s gets (s + 1) / warmup (transformers: s / warmup).
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) - 1e-12 for s in range(10, 110))
    assert math.isclose(_lr_lambda(TrainConfig(max_steps=5, warmup_steps=0))(0), 1.0)


def test_optimizer_groups_embedding_lr_and_no_decay_on_gains():
    from trainer.lm.student import _optimizer

    m = build_causal_lm("micro", vocab_size=64, seed=0)
    opt = _optimizer(TrainConfig(lr=1e-3, lr_embed_mult=10, weight_decay=0.1), m)
    emb = m.get_input_embeddings().weight
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(emb)]["lr"] == pytest.approx(1e-2) and by_param[id(emb)]["weight_decay"] == 0.1
    norm = m.model.norm.weight
    assert by_param[id(norm)]["lr"] == pytest.approx(1e-3) and by_param[id(norm)]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_recipe_overrides_apply_to_the_flat_config():
    from trainer.lm.reference import RECIPES, recipe_overrides

    cfg = apply_overrides(TrainConfig(), recipe_overrides("cpu-student"))
    r = RECIPES["cpu-student"]
    assert (cfg.batch_size, cfg.lr, cfg.lr_embed_mult, cfg.precision) == (r.batch_size, r.lr, r.lr_embed_mult, r.precision)
