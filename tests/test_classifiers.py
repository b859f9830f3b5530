"""Classifier models (trainer/classifiers.py) and the cached reference teacher
(trainer/reference_classifier.py)."""

from __future__ import annotations

import json

import pytest
import torch

from trainer.classify.classifiers import (
    ClassifierConfig,
    TextClassifier,
    build_classifier,
    load_classifier,
    pad_batch,
    save_classifier,
)
from trainer.classify.data import sentiment_data, take

ARCHS = ("transformer", "bilstm", "textcnn")


def tiny(arch: str, **kw) -> ClassifierConfig:
    base = dict(arch=arch, vocab_size=50, num_classes=3, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=24,
                dropout=0.3, lstm_hidden=8, cnn_kernels="2,3", cnn_channels=6)
    return ClassifierConfig(**{**base, **kw})


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(2, 50, (n,), generator=g).tolist() for n in (5, 1, 12, 3)]
    return pad_batch(rows, pad_id=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_padding_invariance(arch):
    torch.manual_seed(0)
    model = build_classifier(tiny(arch)).eval()
    ids, mask = batch()
    logits = model(ids, mask)
    assert logits.shape == (4, 3) and logits.dtype == torch.float32
    # Appending more padding must not change any row's logits.
    pad = torch.zeros(4, 7, dtype=torch.long)
    logits_padded = model(torch.cat([ids, pad], 1), torch.cat([mask, pad.bool()], 1))
    torch.testing.assert_close(logits_padded, logits, atol=1e-5, rtol=1e-5)
    # A row's logits do not depend on the other rows in the batch (its own padding differs).
    alone = model(ids[1:2, :1], mask[1:2, :1])
    torch.testing.assert_close(alone, logits[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_passes_differ_in_training_and_agree_in_eval(arch):
    torch.manual_seed(0)
    model = build_classifier(tiny(arch))
    ids, mask = batch()
    model.train()
    assert not torch.allclose(model(ids, mask), model(ids, mask))
    model.eval()
    torch.testing.assert_close(model(ids, mask), model(ids, mask), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_with_weights_only(tmp_path, arch):
    torch.manual_seed(0)
    cfg = tiny(arch)
    model = build_classifier(cfg).eval()
    save_classifier(tmp_path / arch, model, cfg, extra={"note": "x"})
    # The weights file is a plain state_dict that the safe loader accepts.
    state = torch.load(tmp_path / arch / "model.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    loaded, cfg2, extra = load_classifier(tmp_path / arch)
    assert cfg2 == cfg and extra == {"note": "x"} and not loaded.training
    ids, mask = batch(1)
    torch.testing.assert_close(loaded(ids, mask), model(ids, mask), atol=0, rtol=0)


def test_config_and_input_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        ClassifierConfig(arch="gru")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ClassifierConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="cnn_kernels"):
        ClassifierConfig(arch="textcnn", cnn_kernels="3,x")
    model = build_classifier(tiny("transformer")).eval()
    with pytest.raises(ValueError, match="at least one valid position"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.ones(1, 30, dtype=torch.long), torch.ones(1, 30))
    with pytest.raises(FileNotFoundError, match="classifier.json"):
        load_classifier(tmp_path)
    (tmp_path / "classifier.json").write_text(json.dumps({"format": "v0"}))
    with pytest.raises(ValueError, match="unsupported format"):
        load_classifier(tmp_path)


def test_text_classifier_round_trip(tmp_path):
    from trainer.classify.segment import Vocab

    vocab = Vocab(tokens=["[PAD]", "[UNK]", *"好不错差质量"])
    torch.manual_seed(0)
    cfg = tiny("textcnn", vocab_size=len(vocab), num_classes=2)
    clf = TextClassifier(model=build_classifier(cfg), config=cfg, vocab=vocab, segmentation="char", max_len=24,
                         label_names=("neg", "pos"))
    texts = ["质量好", "差", "不错不错不错", "质量差质量差"]
    p = clf.predict_proba(texts)
    assert p.shape == (4, 2)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    clf.save(tmp_path / "clf")
    back = TextClassifier.load(tmp_path / "clf")
    assert back.label_names == ("neg", "pos") and back.vocab.itos == vocab.itos
    torch.testing.assert_close(back.predict_proba(texts), p)
    with pytest.raises(ValueError, match="empty"):
        back.predict_proba(["好", ""])


@pytest.mark.slow
def test_reference_classifier_trains_once_caches_and_reloads(tmp_path):
    from trainer.classify.data import ClassificationData
    from trainer.classify.reference import (
        load_reference_classifier,
        reference_report,
        train_reference_classifier,
        write_teacher_probs,
    )

    full = sentiment_data()
    data = ClassificationData(train=take(full.train, 1500), validation=take(full.validation, 200),
                              test=take(full.test, 300), label_names=full.label_names, source="sentiment-subset")
    tiny_recipe = {"steps": 60, "d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1, "max_len": 64,
                   "warmup_steps": 10, "lr": 3e-3, "arch": "transformer", "train_segs": "word,char"}
    path = train_reference_classifier(cache_dir=tmp_path, overrides=tiny_recipe, data=data, progress=False)
    stamp = (path / "model.pt").stat().st_mtime_ns
    # Same inputs: the cached directory comes back untouched.
    again = train_reference_classifier(cache_dir=tmp_path, overrides=tiny_recipe, data=data, progress=False)
    assert again == path and (path / "model.pt").stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".tmp-*"))
    # The recorded held-out accuracy is what the reloaded model really scores on the test split.
    report = reference_report(path)
    clf = load_reference_classifier(path)
    probs = clf.predict_proba([ex.text for ex in data.test])
    labels = torch.tensor([ex.label for ex in data.test])
    acc = float((probs.argmax(1) == labels).float().mean())
    assert acc == pytest.approx(report["test"]["acc"], abs=1e-6)
    assert acc > 0.6  # well above the ~0.53 majority class after 60 small steps
    # The teacher file for --teacher-probs: one line per distinct text, rows sum to 1.
    texts = [ex.text for ex in data.test[:20]]
    out = write_teacher_probs(path, texts * 2, tmp_path / "t.jsonl")
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in lines] == list(dict.fromkeys(texts))
    torch.testing.assert_close(torch.tensor([r["probs"] for r in lines]), clf.predict_proba([r["text"] for r in lines]))
    # A different recipe is a different cache entry.
    other = train_reference_classifier(cache_dir=tmp_path, overrides={**tiny_recipe, "steps": 5}, data=data, progress=False)
    assert other != path
