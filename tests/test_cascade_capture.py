"""Capture of a cascade classifier bundle into a sequence-level store, through the one capture
path (``kd cache``, teacher kind ``classifier-bundle``), as the cascade runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdstore
from kdstore.hashing import sample_id
from kdstore.store import read_dead_letters
from trainer.classify import cascade_targets as T
from pipelines import capture
from trainer.classify.classifiers import ClassifierConfig, TextClassifier, build_classifier
from trainer.classify.segment import Vocab

TEXTS = ["这个手机很好用", "质量太差了，退货", "物流很快", "一般般吧", "还会再来买的"]


def capture_classifier(*, model_dir: str, inputs: str, output: str, bits: int = 8) -> dict:
    """``kd cache`` with the flags the cascade passes (gold labels, sample ids checked)."""
    argv = ["--teacher", model_dir, "--input", inputs, "--output", output, "--label-field", "label",
            "--sample-id-field", "sample_id", "--quant-bits", str(bits), "--no-store-text", "--no-progress",
            "--max-error-rate", "1"]
    return capture.run(argv, save_main_session=False)["totals"]


@pytest.fixture()
def bundle(tmp_path):
    torch.manual_seed(0)
    vocab = Vocab.build([tuple(t) for t in TEXTS], min_freq=1)
    cfg = ClassifierConfig(arch="textcnn", vocab_size=len(vocab), num_classes=3, d_model=8, cnn_channels=4, cnn_kernels="1,2")
    clf = TextClassifier(model=build_classifier(cfg).eval(), config=cfg, vocab=vocab, segmentation="char", max_len=16,
                         label_names=("neg", "neu", "pos"))
    return clf, clf.save(tmp_path / "model")


def test_capture_writes_a_valid_sequence_store_and_accounts_for_every_line(tmp_path, bundle):
    clf, model_dir = bundle
    lines = [json.dumps({"text": t, "label": i % 3}, ensure_ascii=False) for i, t in enumerate(TEXTS)]
    lines += [
        lines[0],  # exact duplicate: merged
        "{not json",  # malformed
        json.dumps({"text": "  ", "label": 0}),  # empty text
        json.dumps({"text": "冲突", "label": 0}, ensure_ascii=False), json.dumps({"text": "冲突", "label": 2}, ensure_ascii=False),
        json.dumps({"text": "错的编号", "label": 1, "sample_id": "0123456789abcdef"}, ensure_ascii=False),
        json.dumps({"text": "标签越界", "label": 7}, ensure_ascii=False),
    ]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    totals = capture_classifier(model_dir=str(model_dir), inputs=str(inputs), output=str(tmp_path / "store"), bits=16)

    store = kdstore.open(str(tmp_path / "store"))
    m = store.manifest
    assert m.level == "sequence" and m.teacher.vocab_size == 3 and m.selection.k == 3 and m.columns["label"]
    assert m.pipeline["label_names"] == ["neg", "neu", "pos"]
    assert store.vocab.column("token").to_pylist() == ["neg", "neu", "pos"]  # stored indices are class ids
    assert totals["rows"] == 5 and totals["duplicates"] == 1 and totals["dead_letters"] == 6
    assert totals["input_records"] == len(lines) == totals["rows"] + totals["dead_letters"] + totals["duplicates"]
    reasons = sorted(d["reason"].split(":")[0] for d in read_dead_letters(store))
    assert reasons == ["bad label", "conflicting labels", "conflicting labels", "empty text", "malformed JSON", "sample id mismatch"]

    t = T.read_store_targets(store)
    want = clf.predict_proba(TEXTS)
    idx = t.index()
    for i, text in enumerate(TEXTS):
        row = idx[sample_id(text)]
        np.testing.assert_allclose(t.probs[row].numpy(), want[i].numpy(), rtol=1e-3)
        assert int(t.labels[row]) == i % 3
    batch = next(iter(kdstore.SoftLabelDataset(store, batch_size=5, shuffle=False)))
    assert batch["kd_indices"].shape == (5, 3) and sorted(batch["sample_id"]) == sorted(sample_id(x) for x in TEXTS)

    with pytest.raises(FileExistsError, match="already here"):
        capture_classifier(model_dir=str(model_dir), inputs=str(inputs), output=str(tmp_path / "store"))
