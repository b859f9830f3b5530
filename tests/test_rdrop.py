"""R-Drop loss, trainer and CLI (trainer/rdrop.py) and text+label data (trainer/classify_data.py)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from trainer.classify.classifiers import TextClassifier
from trainer.classify.data import (
    DataError,
    TeacherProbs,
    load_classification_data,
    load_teacher_probs_jsonl,
    read_labeled_file,
)
from kdstore.hashing import sample_id
from trainer.core.config import apply_overrides
from trainer.classify.rdrop import RDropConfig, main, rdrop_loss, train


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# --------------------------------------------------------------------------- loss, by hand
def test_loss_matches_hand_computed_values():
    # p1 = softmax([0, ln 3]) = [1/4, 3/4]; p2 = softmax([0, 0]) = [1/2, 1/2]; label 1.
    l1 = torch.tensor([[0.0, math.log(3.0)]])
    l2 = torch.tensor([[0.0, 0.0]])
    y = torch.tensor([1])
    ce = 0.5 * (-math.log(0.75) - math.log(0.5))  # 0.4904146
    sym_kl = 0.5 * (kl([0.25, 0.75], [0.5, 0.5]) + kl([0.5, 0.5], [0.25, 0.75]))  # 0.5 * (0.1308120 + 0.1438410)
    assert sym_kl == pytest.approx(0.1373265, abs=1e-6)
    out = rdrop_loss(l1, l2, y, w_ce=0.5, w_kl=2.0)
    assert float(out.ce) == pytest.approx(ce, abs=1e-6)
    assert float(out.kl) == pytest.approx(sym_kl, abs=1e-6)
    assert float(out.total) == pytest.approx(0.5 * ce + 2.0 * sym_kl, abs=1e-6)
    assert float(out.teacher) == 0.0


def test_loss_averages_over_valid_rows_and_single_pass_is_plain_ce():
    l1 = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0], [0.0, 0.0]])
    l2 = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0]])
    y = torch.tensor([1, -100, 0])  # the middle row has no label
    out = rdrop_loss(l1, l2, y, w_ce=1.0, w_kl=0.0)
    expected_ce = 0.5 * ((-math.log(0.75) + math.log(2)) / 2 + (math.log(2) + math.log(2)) / 2)
    assert float(out.ce) == pytest.approx(expected_ce, abs=1e-6)
    # KL needs no label: all three rows count.
    p_mid = torch.softmax(torch.tensor([2.0, -1.0]), 0).tolist()
    expected_kl = (
        0.5 * (kl([0.25, 0.75], [0.5, 0.5]) + kl([0.5, 0.5], [0.25, 0.75]))
        + 0.5 * (kl(p_mid, [0.5, 0.5]) + kl([0.5, 0.5], p_mid))
    ) / 3
    assert float(out.kl) == pytest.approx(expected_kl, abs=1e-6)
    single = rdrop_loss(l1, None, y, w_ce=1.0, w_kl=1.0)
    ref = torch.nn.functional.cross_entropy(l1, y, ignore_index=-100)
    assert float(single.total) == pytest.approx(float(ref), abs=1e-6) and float(single.kl) == 0.0
    none = rdrop_loss(l1, l2, torch.full((3,), -100))
    assert float(none.ce) == 0.0 and math.isfinite(float(none.total))


def test_teacher_term_with_temperature_by_hand():
    T = 2.0
    l1 = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])
    l2 = torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    y = torch.tensor([1, 0])
    teacher = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    mask = torch.tensor([True, False])  # the second row has no teacher: it must not count
    out = rdrop_loss(l1, l2, y, w_ce=0.0, w_kl=0.0, teacher_probs=teacher, teacher_mask=mask, w_teacher=1.0,
                     temperature=T)
    t = [2 / 3, 1 / 3]  # [0.8, 0.2] ** (1/2), renormalised
    s1 = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]  # softmax([0, ln 3] / 2)
    s2 = [0.5, 0.5]
    expected = T**2 * 0.5 * (kl(t, s1) + kl(t, s2))
    assert float(out.teacher) == pytest.approx(expected, abs=1e-6)
    assert float(out.total) == pytest.approx(expected, abs=1e-6)
    empty = rdrop_loss(l1, l2, y, teacher_probs=teacher, teacher_mask=torch.tensor([False, False]), w_teacher=1.0)
    assert float(empty.teacher) == 0.0


def test_loss_gradients_pull_the_two_passes_together():
    l1 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    l2 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    rdrop_loss(l1, l2, torch.tensor([0]), w_ce=0.0, w_kl=1.0).total.backward()
    # Pass 1 favours class 1, pass 2 class 0: the KL gradient lowers each one's favourite.
    assert l1.grad[0, 1] > 0 > l1.grad[0, 0]
    assert l2.grad[0, 0] > 0 > l2.grad[0, 1]
    same = torch.tensor([[0.3, -0.2]], requires_grad=True)
    rdrop_loss(same, same.detach().clone(), torch.tensor([0]), w_ce=0.0, w_kl=1.0).total.backward()
    torch.testing.assert_close(same.grad, torch.zeros_like(same.grad))


# --------------------------------------------------------------------------- config
def test_overrides_and_config_validation():
    cfg = apply_overrides(RDropConfig(), ["steps=7", "lr=0.01", "progress=false", "train_segs=char"])
    assert (cfg.steps, cfg.lr, cfg.progress, cfg.train_segs) == (7, 0.01, False, "char")
    with pytest.raises(ValueError, match="unknown config key 'stepz'"):
        apply_overrides(RDropConfig(), ["stepz=1"])
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(RDropConfig(), ["steps=many"])
    with pytest.raises(ValueError, match="w_kl needs two passes"):
        RDropConfig(passes=1)
    with pytest.raises(ValueError, match="eval_segs must be deterministic"):
        RDropConfig(eval_segs="mixed")
    with pytest.raises(ValueError, match="--teacher-probs"):
        RDropConfig(w_teacher=1.0)


def test_cli_print_config_and_usage_errors(capsys):
    assert main(["--print-config", "steps=3"], prog="kd train rdrop") == 0
    assert "* steps                = 3" in capsys.readouterr().out
    assert main(["--print-config", "--teacher-probs", "t.jsonl"]) == 0
    printed = capsys.readouterr().out
    assert '* teacher_probs        = "t.jsonl"' in printed and "* w_teacher            = 1.0" in printed
    assert main(["bogus=1"], prog="kd train rdrop") == 2
    assert "kd train rdrop: error: unknown config key 'bogus'" in capsys.readouterr().err
    assert main(["passes=1"], prog="kd train rdrop") == 2
    assert "w_kl needs two passes" in capsys.readouterr().err


# --------------------------------------------------------------------------- data
def _toy_records(n: int = 500, seed: int = 0) -> list[dict]:
    """Reviews whose label is carried by one marker character among filler characters."""
    rng = random.Random(seed)
    filler = list("这个东西用了几天感觉还行吧就是物流有点慢包装一般价格")
    out = []
    for i in range(n):
        pos = i % 2 == 0
        chars = rng.choices(filler, k=rng.randint(4, 14))
        chars.insert(rng.randrange(len(chars) + 1), "好" if pos else "差")
        out.append({"text": "".join(chars) + str(i), "label": "pos" if pos else "neg"})
    return out


def _write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_user_jsonl_errors_name_file_and_line_and_skip_keeps_counts(tmp_path):
    recs = _toy_records(20)
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    lines[3] = '{"text": "好", "label": "pos"'  # truncated JSON
    lines[7] = json.dumps({"text": "", "label": "neg"})
    lines[11] = json.dumps({"text": "不错", "label": 1.5})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:4: malformed JSON"):
        read_labeled_file(path)
    examples, rejects, read, names = read_labeled_file(path, on_error="skip")
    assert names == ("neg", "pos")
    assert read == 20 and len(examples) == 17 and len(examples) + len(rejects) == read
    assert [r.source for r in rejects] == [f"{path}:4", f"{path}:8", f"{path}:12"]
    assert rejects[1].reason == "empty text" and "not an integer class id or a class name: 1.5" in rejects[2].reason
    assert examples[0].label == 1 and examples[0].sample_id == sample_id(recs[0]["text"])


def test_gold_words_field_is_checked_against_the_text(tmp_path):
    path = tmp_path / "g.jsonl"
    _write_jsonl(path, [{"text": "南京市长江大桥", "label": 1, "words": ["南京", "市", "长江", "大桥"]},
                        {"text": "好书", "label": 0, "words": ["好", "书本"]}])
    with pytest.raises(DataError, match=r"g\.jsonl:2: field 'words' must be a list of non-empty strings"):
        read_labeled_file(path, words_field="words")
    examples, rejects, _, names = read_labeled_file(path, words_field="words", on_error="skip")
    assert examples[0].words == ("南京", "市", "长江", "大桥") and names == ("0", "1") and len(rejects) == 1


def test_user_parquet_and_held_out_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"review": ["好的", "差评", "还行"], "y": ["pos", "neg", "meh"]}), tmp_path / "t.parquet")
    _write_jsonl(tmp_path / "v.jsonl", [{"review": "好", "y": "pos"}, {"review": "怪", "y": "weird"}])
    with pytest.raises(DataError, match=r"v\.jsonl:2: label 'weird' is not one of the training labels"):
        load_classification_data(str(tmp_path / "t.parquet"), eval_source=str(tmp_path / "v.jsonl"),
                                 text_field="review", label_field="y")
    pq.write_table(pa.table({"review": ["好的", None], "y": ["pos", "neg"]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:2: field 'review' is missing or null"):
        read_labeled_file(tmp_path / "bad.parquet", text_field="review", label_field="y")
    data = load_classification_data(str(tmp_path / "t.parquet"), text_field="review", label_field="y")
    assert data.label_names == ("meh", "neg", "pos")
    assert len(data.train) + len(data.validation) + len(data.test) == 3


def test_teacher_probs_jsonl_adapter(tmp_path):
    path = tmp_path / "t.jsonl"
    _write_jsonl(path, [{"text": "好", "probs": [0.1, 0.9]}, {"text": "差", "probs": [0.7, 0.3]}])
    tp = load_teacher_probs_jsonl(path, num_classes=2)
    probs, mask = tp.lookup([sample_id("差"), sample_id("无"), sample_id("好")])
    torch.testing.assert_close(probs, torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]]))
    assert mask.tolist() == [True, False, True]
    _write_jsonl(path, [{"text": "好", "probs": [0.1, 0.9]}, {"text": "差", "probs": [0.7, 0.7]}])
    with pytest.raises(DataError, match=r"t\.jsonl:2"):
        load_teacher_probs_jsonl(path, num_classes=2)
    with pytest.raises(ValueError, match="need 3 non-negative values"):
        TeacherProbs(probs={"a": [0.5, 0.5]}, num_classes=3)


# --------------------------------------------------------------------------- end to end
def test_cli_trains_on_user_jsonl_and_writes_all_outputs(tmp_path, capsys):
    _write_jsonl(tmp_path / "d.jsonl", _toy_records(500))
    out = tmp_path / "run"
    rc = main([f"data={tmp_path / 'd.jsonl'}", "arch=textcnn", "d_model=16", "cnn_channels=8", "steps=60",
               "batch_size=16", "lr=1e-2", "warmup_steps=5", "eval_every=30", "log_every=15", "save_every=30",
               "train_segs=word,mixed,char", "eval_segs=char,word", "progress=false", "threads=1", f"out_dir={out}"],
              prog="kd train rdrop")
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test"]["acc"] > 0.9  # the marker character is learnable in 60 steps
    assert {"acc_char", "acc_word", "acc_ens", "f1_ens"} <= set(summary["test"])
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "train"] == [15, 30, 45, 60]
    assert [(r["step"], r["split"]) for r in recs if r["event"] == "eval"] == [(30, "validation"), (60, "validation"),
                                                                             (60, "test")]
    assert all(r["kl"] > 0 and r["distinct_pairs"] > 0.9 for r in recs if r["event"] == "train")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "config.json").read_text())["steps"] == 60
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    assert [p.name for p in ckpts] == ["ckpt-0000030.pt", "ckpt-0000060.pt"]
    ckpt = torch.load(ckpts[-1], weights_only=True)
    assert ckpt["config"]["arch"] == "textcnn" and ckpt["step"] == 60 and "optimizer" in ckpt
    # The final model reproduces the reported test accuracy from raw text.
    clf = TextClassifier.load(out / "model")
    data = load_classification_data(str(tmp_path / "d.jsonl"))
    pred = clf.predict_proba([ex.text for ex in data.test]).argmax(1)
    acc = float((pred == torch.tensor([ex.label for ex in data.test])).float().mean())
    assert acc == pytest.approx(summary["test"]["acc_char"], abs=1e-6)


def test_cli_reports_bad_data_with_file_and_line(tmp_path, capsys):
    recs = _toy_records(30)
    _write_jsonl(tmp_path / "d.jsonl", recs[:5] + [{"txt": "x", "label": "pos"}] + recs[5:])
    rc = main([f"data={tmp_path / 'd.jsonl'}", "steps=1", f"out_dir={tmp_path / 'run'}", "progress=false"])
    assert rc == 2
    assert "d.jsonl:6: missing field 'text'" in capsys.readouterr().err


def test_teacher_soft_labels_drive_training(tmp_path):
    """With only the teacher term, the student follows the teacher even against the labels."""
    recs = _toy_records(500)
    _write_jsonl(tmp_path / "d.jsonl", recs)
    # A deliberately wrong teacher: confident in the opposite class of every label.
    _write_jsonl(tmp_path / "t.jsonl", [{"text": r["text"], "probs": [0.95, 0.05] if r["label"] == "pos" else [0.05, 0.95]}
                                        for r in recs])
    common = [f"data={tmp_path / 'd.jsonl'}", "arch=textcnn", "d_model=16", "cnn_channels=8", "steps=40",
              "batch_size=16", "lr=1e-2", "warmup_steps=5", "eval_every=0", "train_segs=char", "passes=1", "w_kl=0",
              "progress=false", "threads=1"]
    taught = train(apply_overrides(RDropConfig(), common + ["w_ce=0", "w_teacher=1", "teacher_temperature=2",
                                                            f"teacher_probs={tmp_path / 't.jsonl'}",
                                                            f"out_dir={tmp_path / 'a'}"]))
    assert taught.test["acc"] < 0.1
    logged = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["teacher"] > 0 and r["ce"] > 0 for r in logged if r["event"] == "train")


@pytest.mark.slow
def test_short_run_on_sentiment_beats_chance(tmp_path):
    cfg = apply_overrides(RDropConfig(), [
        "train_limit=2000", "eval_limit=400", "steps=80", "d_model=32", "n_heads=2", "d_ff=64", "n_layers=1",
        "max_len=64", "lr=3e-3", "warmup_steps=10", "eval_every=0", "log_every=20", "progress=false", "threads=1",
        "train_segs=word,mixed,char", f"out_dir={tmp_path}"])
    r = train(cfg)
    from trainer.classify.data import sentiment_data, take

    test = take(sentiment_data().test, 400)
    positive = sum(ex.label for ex in test) / len(test)
    majority = max(positive, 1 - positive)  # what always answering the larger class scores (0.52)
    assert r.test["acc"] > majority + 0.1  # 0.69 with seed 0; seeds 1 and 2 give 0.64 and 0.68
    assert r.distinct_pair_rate > 0.95


def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", _toy_records(200))
    common = [f"data={tmp_path / 'd.jsonl'}", "arch=textcnn", "d_model=16", "cnn_channels=8", "steps=16",
              "batch_size=16", "warmup_steps=4", "eval_every=0", "log_every=4", "train_segs=word,mixed,char",
              "progress=false", "threads=1"]
    straight = train(apply_overrides(RDropConfig(), common + [f"out_dir={tmp_path / 'a'}"]))
    part = train(apply_overrides(RDropConfig(), common + [f"out_dir={tmp_path / 'b'}", "stop_at=8"]))
    assert part.steps == 8 and part.test == {}
    # The CLI way: --resume takes the run directory and reuses the saved config.
    assert main(["--resume", str(tmp_path / "b")]) == 0
    a = torch.load(tmp_path / "a" / "model" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rec = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    drop = ("train_seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rec(tmp_path / "a")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rec(tmp_path / "b")]
    assert straight.test["acc"] == pytest.approx(json.loads((tmp_path / "b" / "result.json").read_text())["test"]["acc"])


def test_teacher_with_zero_probabilities_gives_finite_loss_and_gradients():
    logits = torch.tensor([[0.5, -0.5, 0.0]], requires_grad=True)
    out = rdrop_loss(logits, None, torch.tensor([0]), teacher_probs=torch.tensor([[0.0, 1.0, 0.0]]), w_teacher=1.0,
                     temperature=2.0)
    out.total.backward()
    assert math.isfinite(float(out.total.detach())) and torch.isfinite(logits.grad).all()
    # A one-hot teacher at any temperature is KL to the tempered student: T^2 * -log p_T(class 1).
    expected = 4.0 * -torch.log_softmax(torch.tensor([0.25, -0.25, 0.0]), 0)[1]
    assert float(out.teacher) == pytest.approx(float(expected), abs=1e-6)


def test_bpe_dropout_views_train_end_to_end(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", _toy_records(200))
    r = train(apply_overrides(RDropConfig(), [
        f"data={tmp_path / 'd.jsonl'}", "arch=textcnn", "d_model=16", "cnn_channels=8", "steps=10", "batch_size=16",
        "warmup_steps=2", "eval_every=0", "train_segs=bpe,char", "bpe_vocab=300", "bpe_dropout=0.2", "progress=false",
        "threads=1", f"out_dir={tmp_path / 'run'}"]))
    assert r.distinct_pair_rate > 0.9  # BPE pieces (with dropout) vs characters
    vocab = json.loads((tmp_path / "run" / "vocab.json").read_text(encoding="utf-8"))["tokens"]
    assert any(len(t) > 1 and not t.startswith("[") for t in vocab)  # merged BPE pieces got ids
