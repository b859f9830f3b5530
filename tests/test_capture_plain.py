"""The Beam-free loop (pipelines/plain.py): in-memory teachers (``cache_with_model``) share the
windows, vocabulary and writer of ``kd cache``; teacher kinds and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdstore
from fixtures import make_tiny_causal_lm, train_bpe_tokenizer
from kdstore.format import Selection
from kdstore.hashing import sample_id, token_hash
from pipelines import capture
from pipelines.options import parse_args
from pipelines.plain import cache_with_model, capture_plain
from pipelines.teachers import TeacherError, open_teacher
from test_capture import _one_torch_thread  # noqa: F401 - autouse: one torch thread in this module

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a quick brown dog sleeps in the sun",
    "the lazy fox and the quick dog are friends",
    "over the hills and far away the fox runs",
] * 3 + ["the quick brown fox jumps over the lazy dog"]  # a duplicate


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    tok = train_bpe_tokenizer(TEXTS, d / "tok", vocab_size=300)
    return make_tiny_causal_lm(d / "teacher", tokenizer_dir=tok, hidden=32, layers=1, heads=2, seed=3)


def _rows(uri: str) -> dict[tuple[str, int], dict]:
    out = {}
    for b in kdstore.open(uri).iter_batches(columns=["sample_id", "window", "tokens", "indices", "probs", "tail", "token_start"]):
        d = b.to_pydict()
        for i in range(b.num_rows):
            out[(d["sample_id"][i], d["window"][i])] = {k: d[k][i] for k in d}
    return out


def test_cache_with_model_stores_byte_level_token_bytes(tmp_path, teacher):
    """Byte-level BPE writes a leading space as ``Ġ``: the store's vocabulary must hold the
    token's real bytes (b" quick"), which is what cross-tokenizer alignment and text
    reconstruction read. The deleted trainer/lm/cache_local.py fallback stored
    ``"Ġquick".encode("utf-8")``. (Hashes are of the token *string*, see kdstore.writer.vocab_table.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher))
    uri = str(tmp_path / "s")
    res = cache_with_model(model, tok, TEXTS, {uri: Selection(mode="topk", k=4)}, max_length=8)
    store = kdstore.open(uri)
    vocab = store.vocab.to_pydict()
    byte_of = dict(zip(vocab["token"], vocab["bytes"]))
    assert byte_of["Ġquick"] == b" quick" != "Ġquick".encode("utf-8")
    assert byte_of["Ġ"] == b" "
    assert all(h == token_hash(t.encode("utf-8")) for t, h in zip(vocab["token"], vocab["hash"]))
    # The stored input hashes of a window decode, through the vocabulary, to the window's text bytes.
    hash_to_bytes = {h: b for b, h in zip(vocab["bytes"], vocab["hash"])}
    rows = _rows(uri)
    windows = sorted((w, r) for (sid, w), r in rows.items() if sid == sample_id(TEXTS[1]))
    text = b"".join(hash_to_bytes[h] for _, r in windows for h in r["tokens"])
    assert text.endswith(TEXTS[1].encode())  # after the template's <s>
    # Windows of 8 tokens, no overlap; the duplicate text is stored once.
    assert {sid for sid, _ in rows} == {sample_id(t) for t in TEXTS}
    assert all(r["token_start"] == 8 * w for (_, w), r in rows.items())
    assert res[uri]["rows"] == len(rows) and res[uri]["tokens"] == store.manifest.totals["tokens"]


def test_one_pass_several_stores_equal_kd_cache_rows(tmp_path, teacher):
    """``cache_with_model`` (in-memory model, two selections from one forward) stores exactly
    the rows ``kd cache``'s plain loop stores from a file of the same texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher))
    sels = {str(tmp_path / "topk"): Selection(mode="topk", k=6), str(tmp_path / "sample"): Selection(mode="sample", samples=12, seed=5)}
    cache_with_model(model, tok, TEXTS, sels, max_length=16, batch_size=3)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    base = ["--teacher", str(teacher), "--input", str(corpus), "--max-length", "16", "--no-store-text", "--no-progress",
            "--device", "cpu", "--dtype", "float32"]
    for name, extra in (("topk", ["--select", "topk", "--k", "6"]), ("sample", ["--select", "sample", "--samples", "12", "--seed", "5"])):
        out = str(tmp_path / f"kd-{name}")
        counts = capture_plain(parse_args(base + extra + ["--output", out])[0])
        assert counts["duplicates"] == len(TEXTS) - len(set(TEXTS))
        a, b = _rows(str(tmp_path / name)), _rows(out)
        assert a.keys() == b.keys() and len(a) >= len(set(TEXTS))
        for key in a:
            assert a[key] == b[key], key


def test_teacher_kind_is_detected_and_checked(tmp_path, teacher):
    assert open_teacher(str(teacher)).kind == "hf-causal-lm"
    with pytest.raises(TeacherError, match="--teacher-kind classifier-bundle but the directory holds a hf-causal-lm"):
        open_teacher(str(teacher), kind="classifier-bundle")
    with pytest.raises(TeacherError, match="--level sequence needs a sequence classifier"):
        open_teacher(str(teacher), level="sequence")
    with pytest.raises(TeacherError, match="not a teacher directory"):
        open_teacher(str(tmp_path))
    # kd cache reports the mismatch as a user error (exit 1, no traceback).
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c\n", encoding="utf-8")
    rc = capture.main(["--teacher", str(teacher), "--teacher-kind", "hf-sequence-classifier", "--input", str(corpus),
                       "--output", str(tmp_path / "o")])
    assert rc == 1


def test_classifier_bundle_plain_loop_equals_pipeline(tmp_path):
    """Both loops serve the bundle kind with the same rows (and the same dedupe rule)."""
    from trainer.classify.classifiers import ClassifierConfig, TextClassifier, build_classifier
    from trainer.classify.segment import Vocab

    texts = ["这个手机很好用", "质量太差了", "物流很快", "一般般吧"]
    torch.manual_seed(0)
    vocab = Vocab.build([tuple(t) for t in texts], min_freq=1)
    cfg = ClassifierConfig(arch="bilstm", vocab_size=len(vocab), num_classes=2, d_model=8, lstm_hidden=8, n_layers=1)
    clf = TextClassifier(model=build_classifier(cfg).eval(), config=cfg, vocab=vocab, segmentation="char", max_len=6,
                         label_names=("neg", "pos"))
    model_dir = clf.save(tmp_path / "bundle")
    lines = [json.dumps({"text": t, "label": i % 2}, ensure_ascii=False) for i, t in enumerate(texts)]
    lines += [lines[1], json.dumps({"text": texts[2], "label": 1}, ensure_ascii=False)]  # a copy; a conflicting copy
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    base = ["--teacher", str(model_dir), "--input", str(src), "--label-field", "label", "--quant-bits", "16",
            "--no-progress", "--max-error-rate", "1"]
    capture.run(base + ["--output", str(tmp_path / "beam")], save_main_session=False)
    counts = capture_plain(parse_args(base + ["--output", str(tmp_path / "plain")])[0])
    a, b = _rows(str(tmp_path / "beam")), _rows(str(tmp_path / "plain"))
    assert a == b and {sid for sid, _ in a} == {sample_id(t) for t in texts if t != texts[2]}
    assert counts["duplicates"] == 1 and kdstore.open(str(tmp_path / "plain")).manifest.totals["dead_letters"] == 2
    m = kdstore.open(str(tmp_path / "beam")).manifest
    assert m.pipeline["teacher_kind"] == "classifier-bundle" and m.totals["duplicates"] == 1
    # Truncated to the bundle's max_len, like TextClassifier.predict_proba.
    want = clf.predict_proba([texts[0]])[0].numpy()
    probs = np.zeros(2)
    r = a[(sample_id(texts[0]), 0)]
    store = kdstore.open(str(tmp_path / "beam"))
    import pyarrow as pa

    row = next(iter(store.iter_batches())).to_pylist()
    row = [x for x in row if x["sample_id"] == sample_id(texts[0])]
    dec = store.decode(pa.Table.from_pylist(row, schema=store.schema))
    probs[dec.indices] = dec.probs
    np.testing.assert_allclose(probs, want, rtol=1e-3)
    assert r["tokens"] == []
