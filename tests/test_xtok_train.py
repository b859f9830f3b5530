"""The student reads its own tokenization: the dataset hook (deterministic, resumable, in
DataLoader workers), ``kd train student --tokenizer``, its refusals, the renamed old path,
and the alignment-file commands. A tiny real teacher is captured with text and offsets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from align_synth import corpus_tokenizers, synthetic_store
from kdstore.align import SequenceAligner, VocabAlignment
from trainer.data.corpora import peoples_daily


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import kdstore
    from fixtures import make_tiny_causal_lm
    from kdstore.format import Selection
    from pipelines.plain import cache_with_model
    from trainer.lm.models import load_causal_lm

    root = tmp_path_factory.mktemp("xtok")
    toks = corpus_tokenizers()
    teacher = make_tiny_causal_lm(root / "teacher", tokenizer_dir=toks["bpe"].name_or_path, hidden=32, layers=1, heads=2)
    texts = [s.text for s in peoples_daily("train")[:48]]
    uri = root / "store"
    cache_with_model(load_causal_lm(teacher), toks["bpe"], texts, {str(uri): Selection(mode="topk", k=8)},
                     max_length=48, store_text=True)
    held = root / "held.txt"
    held.write_text("\n".join(s.text for s in peoples_daily("validation")[:20]) + "\n", encoding="utf-8")
    return {"store": kdstore.open(str(uri)), "uri": str(uri), "teacher": teacher, "toks": toks, "root": root, "held": str(held)}


def _aligner(setup, mode="groups"):
    uni = setup["toks"]["unigram"]
    al = VocabAlignment.build(setup["store"], uni, policy="first_piece")
    return SequenceAligner(student=uni, alignment=al, mode=mode), uni


def test_batches_are_the_students_own_tokenization(setup):
    from kdstore.dataset import SoftLabelDataset

    store = setup["store"]
    aligner, uni = _aligner(setup)
    texts = {}
    for b in store.iter_batches(columns=["sample_id", "window", "text"]):
        for sid, w, t in zip(b.column("sample_id").to_pylist(), b.column("window").to_pylist(), b.column("text").to_pylist()):
            texts[(sid, w)] = t
    n_target = n_tok = 0
    for batch in SoftLabelDataset(store, batch_size=5, seed=1, sequence=aligner):
        for r, (sid, w) in enumerate(zip(batch["sample_id"], batch["window"].tolist())):
            m = batch["attention_mask"][r]
            ids = batch["input_ids"][r][m].tolist()
            if (sid, 1) not in texts:  # a one-window sample: the row is the student's whole tokenization of its text
                assert ids == uni(texts[(sid, w)], add_special_tokens=False)["input_ids"]
            lab = batch["labels"][r][m].tolist()
            assert lab[:-1] == ids[1:] and lab[-1] == -100
        assert int(batch["kd_indices"].max()) < len(uni)
        n_target += int(batch["kd_mask"].sum())
        n_tok += int(batch["attention_mask"].sum())
    assert n_target > 0.8 * n_tok


def test_student_batches_deterministic_across_workers_and_resume(setup):
    from kdstore.dataset import SoftLabelDataset, StoreLoader

    aligner, _ = _aligner(setup)

    def run(workers, skip=0):
        loader = StoreLoader(SoftLabelDataset(setup["store"], batch_size=4, seed=3, sequence=aligner), num_workers=workers)
        if skip:
            it = iter(loader)
            for _ in range(skip):
                next(it)
            state = loader.state_dict()
            loader = StoreLoader(SoftLabelDataset(setup["store"], batch_size=4, seed=3, sequence=aligner), num_workers=workers)
            loader.load_state_dict(state)
        return [(b["input_ids"].tolist(), b["kd_probs"].sum().item(), b["kd_mask"].tolist()) for b in loader]

    base = run(0)
    assert run(2) == base
    assert run(0, skip=3) == base[3:]
    # Another student tokenizer (or target mode) is another data stream: resuming must refuse it.
    other = SoftLabelDataset(setup["store"], batch_size=4, seed=3, sequence=_aligner(setup, mode="boundary")[0])
    assert other.fingerprint != SoftLabelDataset(setup["store"], batch_size=4, seed=3, sequence=aligner).fingerprint


def test_store_without_text_is_refused(setup, tmp_path):
    from kdstore.dataset import SoftLabelDataset

    store = synthetic_store(tmp_path / "s", setup["toks"]["bpe"], ["一二三", "四五"], offsets=False)
    aligner, _ = _aligner(setup)
    with pytest.raises(ValueError, match="needs the stored text and byte offsets"):
        SoftLabelDataset(store, batch_size=2, sequence=aligner)


def _train(args, capsys):
    from trainer.lm.student import main

    flags = [a for a in args if "=" not in a or a.startswith("--")]
    rc = main(flags + [a for a in args if "=" in a and not a.startswith("--")])  # key=value overrides last
    return rc, capsys.readouterr()


def _common(setup, out):
    return ["--max-steps", "3", "--out", str(out), "batch_size=4", "progress=false", "plots=false", "save_model=false",
            "eval_data=" + setup["held"], "eval_batches=1", "eval_bpc_docs=10", "threads=1", "model=micro"]


@pytest.mark.parametrize("targets", ["groups", "chain"])
def test_train_student_on_its_own_tokenization(setup, tmp_path, capsys, targets):
    uni = setup["toks"]["unigram"].name_or_path
    rc, cap = _train(["--store", setup["uri"], "--tokenizer", uni, "xtok_targets=" + targets] + _common(setup, tmp_path), capsys)
    assert rc == 0, cap.err
    res = json.loads((tmp_path / "result.json").read_text())
    assert "student's own tokenization" in res["data"] and targets in res["data"]
    assert res["vocab_size"] >= len(setup["toks"]["unigram"]) and np.isfinite(res["eval_bpc"])


def test_third_vocabulary_default_and_choice(setup, tmp_path, capsys):
    uni = setup["toks"]["unigram"].name_or_path
    rc, cap = _train(["--store", setup["uri"], "--tokenizer", uni] + _common(setup, tmp_path / "a"), capsys)
    assert rc == 0, cap.err
    assert "third vocabulary: continuation" in json.loads((tmp_path / "a" / "result.json").read_text())["data"]
    rc, cap = _train(["--store", setup["uri"], "--tokenizer", uni, "--xtok-vocab", "first_piece"] + _common(setup, tmp_path / "b"), capsys)
    assert rc == 0, cap.err
    assert "third vocabulary: first_piece" in json.loads((tmp_path / "b" / "result.json").read_text())["data"]
    rc, cap = _train(["--store", setup["uri"], "--tokenizer", uni, "xtok_vocab=first_peice"] + _common(setup, tmp_path / "c"), capsys)
    assert rc == 2 and "first_peice" in cap.err and "continuation" in cap.err and "Traceback" not in cap.err


def test_uld_arm_runs_vocabulary_free(setup, tmp_path, capsys):
    uni = setup["toks"]["unigram"].name_or_path
    rc, cap = _train(["--store", setup["uri"], "--tokenizer", uni, "kd_loss=uld"] + _common(setup, tmp_path), capsys)
    assert rc == 0, cap.err
    assert "targets: boundary" in json.loads((tmp_path / "result.json").read_text())["data"]


def test_refusals_and_the_renamed_old_path(setup, tmp_path, capsys):
    uni = setup["toks"]["unigram"].name_or_path
    # A store without text: a clear error, not a traceback.
    bare = synthetic_store(tmp_path / "bare", setup["toks"]["bpe"], ["一二三四", "五六七"], offsets=False)
    rc, cap = _train(["--store", bare.uri, "--tokenizer", uni] + _common(setup, tmp_path / "a"), capsys)
    assert rc == 2 and "text and byte offsets" in cap.err
    # align= alone no longer means "feed mapped teacher tokens".
    rc, cap = _train(["--store", setup["uri"], "--align", "x.parquet"] + _common(setup, tmp_path / "b"), capsys)
    assert rc == 2 and "teacher_segmentation_align" in cap.err
    # An alignment file built for another student tokenizer is refused.
    wp = VocabAlignment.build(setup["store"], setup["toks"]["wordpiece"], policy="first_piece").save(tmp_path / "wp.parquet")
    rc, cap = _train(["--store", setup["uri"], "--tokenizer", uni, "--align", str(wp)] + _common(setup, tmp_path / "c"), capsys)
    assert rc == 2 and "another student tokenizer" in cap.err
    # The old path only under its explicit name, only with extend (first_piece drops input text), warned.
    fp = VocabAlignment.build(setup["store"], uni, policy="first_piece").save(tmp_path / "fp.parquet")
    rc, cap = _train(["--store", setup["uri"], "--tokenizer", uni, "--teacher-segmentation-align", str(fp)]
                     + _common(setup, tmp_path / "d"), capsys)
    assert rc == 2 and "extend" in cap.err
    ext = VocabAlignment.build(setup["store"], uni, policy="extend").save(tmp_path / "ext.parquet")
    rc, cap = _train(["--store", setup["uri"], "--tokenizer", uni, "--teacher-segmentation-align", str(ext)]
                     + _common(setup, tmp_path / "e"), capsys)
    assert rc == 0 and "WARNING" in cap.out and "expect that segmentation" in cap.out
    # Without --tokenizer the fallback to the teacher's tokenizer is said out loud.
    rc, cap = _train(["--store", setup["uri"]] + _common(setup, tmp_path / "f"), capsys)
    assert rc == 0 and "no tokenizer= given" in cap.out


def test_align_build_writes_and_checks(setup, tmp_path, capsys):
    from kdstore.align.report import build_main

    uni, wp = setup["toks"]["unigram"].name_or_path, setup["toks"]["wordpiece"].name_or_path
    out = tmp_path / "al.parquet"
    assert build_main([setup["uri"], "--student-tokenizer", uni, "--out", str(out), "--quiet"]) == 0
    al = VocabAlignment.load(out, store=setup["store"], student=uni)
    assert al.policy == "first_piece" and al.spell_ptr is not None
    assert build_main([setup["uri"], "--student-tokenizer", uni, "--check", str(out)]) == 0
    assert build_main([setup["uri"], "--student-tokenizer", wp, "--check", str(out)]) == 2
    assert "another student tokenizer" in capsys.readouterr().err


def test_align_report_honours_the_used_mask(setup):
    from kdstore.align import coverage_report, scan_store

    store, uni = setup["store"], setup["toks"]["unigram"]
    usage = scan_store(store, progress=False)
    rep = coverage_report(store, uni, policies=("extend", "first_piece"), usage=usage, progress=False, sequence_rows=16)
    everything = VocabAlignment.build(store, uni, policy="extend")
    used_only = VocabAlignment.build(store, uni, policy="extend", used=usage.used)
    assert rep["policies"]["extend"]["new_tokens"] == len(used_only.new_tokens) < len(everything.new_tokens)
    # Inputs fed as their first piece only are reported, not counted as mapped.
    fp = rep["policies"]["first_piece"]
    assert fp["input_coverage"] + fp["input_first_piece_only"] <= 1.0 + 1e-9
    assert rep["sequence"]["groups"]["target_fraction"] >= rep["sequence"]["boundary"]["target_fraction"]
