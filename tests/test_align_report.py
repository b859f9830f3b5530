"""``kd store align-report``: coverage per rule and policy, against direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdstore.align import RULES, SequenceAligner, VocabAlignment
from align_synth import corpus_tokenizers, synthetic_store
from kdstore.align.report import main
from trainer.data.corpora import peoples_daily


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    toks = corpus_tokenizers()
    texts = [s.text for s in peoples_daily("test")[:30]]
    store = synthetic_store(root / "store", toks["bpe"], texts, k=6, mode="top_p", seed=5)
    plain = synthetic_store(root / "plain", toks["bpe"], texts[:5], k=6, offsets=False)
    toks["wordpiece"].save_pretrained(str(root / "wp"))
    return root, store, plain


def test_report_numbers_match_direct_computation(setup, capsys):
    root, store, _ = setup
    out = root / "report.json"
    assert main([str(root / "store"), "--student-tokenizer", str(root / "wp"), "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert set(rep["policies"]) == {"extend", "first_piece", "split", "tail"}
    assert rep["teacher_convention"] == "byte_level" and rep["student_convention"] == "wordpiece"
    # Direct computation over the whole store.
    mass_by_rule = {}
    kept = inputs = 0.0
    al = VocabAlignment.build(store, root / "wp", policy="first_piece")
    rules = al.rules
    n_inputs = mapped_inputs = 0
    for batch in store.iter_batches():
        d = store.decode(batch)
        kept += float(d.probs.sum(dtype=np.float64))
        for r in RULES:
            sel = rules[d.indices] == r
            mass_by_rule[r] = mass_by_rule.get(r, 0.0) + float(d.probs[sel].sum(dtype=np.float64))
        n_inputs += len(d.input_ids)
        mapped_inputs += int(np.isin(rules[d.input_ids], ["exact", "canonical", "special", "tokenizer"]).sum())
    fp = rep["policies"]["first_piece"]
    assert rep["kept_mass"] == pytest.approx(kept, rel=1e-6)
    for r in RULES:
        assert fp["rules"][r]["mass_share"] == pytest.approx(mass_by_rule[r] / kept, abs=1e-9), r
        assert fp["rules"][r]["count"] == int((rules == r).sum())
    assert fp["input_coverage"] == pytest.approx(mapped_inputs / n_inputs)
    for p, q in rep["policies"].items():
        assert sum(v["vocab_share"] for v in q["rules"].values()) == pytest.approx(1.0)
        assert sum(v["mass_share"] for v in q["rules"].values()) == pytest.approx(1.0)
    ext = rep["policies"]["extend"]
    assert ext["aligned_vocab_size"] == rep["student_vocab_size"] + ext["new_tokens"] > rep["student_vocab_size"]
    assert ext["mapped_mass_share"] == pytest.approx(1.0 - ext["rules"]["padding"]["mass_share"])
    assert ext["input_coverage"] == 1.0
    assert rep["policies"]["tail"]["mapped_mass_share"] < fp["mapped_mass_share"] < ext["mapped_mass_share"]
    # Sequence alignment statistics are those of the aligner on the same rows.
    s = SequenceAligner(student=root / "wp", alignment=al).align_batch(store, next(store.iter_batches())).stats
    seq = rep["sequence"]["boundary"]
    assert seq["student_tokens"] == s["student_tokens"] and seq["target_fraction"] == pytest.approx(s["targets"] / s["in_window"])
    assert rep["sequence"]["one_to_one"]["target_fraction"] == pytest.approx(seq["share_1:1"])
    assert "first_piece mass%" in printed and "sequence alignment (boundary" in printed


def test_report_json_to_stdout_and_one_policy(setup, capsys):
    root, _, _ = setup
    assert main([str(root / "plain"), "--student-tokenizer", str(root / "wp"), "--policy", "split", "--json", "-", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert list(rep["policies"]) == ["split"] and rep["sequence"] is None


def test_report_errors(setup, capsys):
    root, _, _ = setup
    assert main([str(root / "store"), "--student-tokenizer", str(root / "missing"), "--quiet"]) == 2
    assert "student tokenizer not found" in capsys.readouterr().err
    assert main([str(root / "nostore"), "--student-tokenizer", str(root / "wp"), "--quiet"]) == 2
    assert "no such store" in capsys.readouterr().err
