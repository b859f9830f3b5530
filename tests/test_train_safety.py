"""``kd train`` safety (issue 17): a run folder is not silently mixed with an earlier run,
a student tokenizer whose vocabulary differs from the store's needs an alignment, and
evaluation on text prints no ``KL nan``. Tiny store written from a real BPE tokenizer."""

from __future__ import annotations

import pytest
import torch

from fixtures import train_bpe_tokenizer
from kdstore import Selection, SoftLabelRow, StoreWriter, TeacherInfo
from pipelines.selection import select
from pipelines.teachers import vocabulary
from trainer.data.corpora import peoples_daily
from trainer.lm.student import lm_main, main

FAST = ["--student-config", "micro", "--max-steps", "2", "batch_size=4", "seq_len=32", "progress=false", "plots=false",
        "threads=1", "save_model=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("trainsafe")
    texts = [s.text for s in peoples_daily("train")[:200]]
    tok_dir = train_bpe_tokenizer(texts, d / "tok", vocab_size=300)
    other_dir = train_bpe_tokenizer(texts[::-1], d / "other", vocab_size=280)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    vocab = vocabulary(tok)
    hashes = vocab.column("hash").to_numpy()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, t in enumerate(texts[:40]):
        ids = tok(t)["input_ids"][:32]
        idx, p, c, tail = select(torch.randn(len(ids), 320, generator=g) * 3, mode="topk", k=4).flat()
        rows.append(SoftLabelRow(sample_id=f"{i:016x}", tokens=hashes[ids], counts=c, indices=idx, probs=p, tail=tail))
    store = d / "store"
    with StoreWriter(str(store), teacher=TeacherInfo(name_or_path=str(tok_dir), vocab_size=320),
                     selection=Selection(mode="topk", k=4)) as w:
        w.write_vocab(vocab)
        w.write(rows)
    (d / "train.txt").write_text("\n".join(texts[:150]) + "\n", encoding="utf-8")
    (d / "val.txt").write_text("\n".join(texts[150:170]) + "\n", encoding="utf-8")
    return {"store": str(store), "tok": str(tok_dir), "other": str(other_dir), "train": str(d / "train.txt"),
            "val": str(d / "val.txt")}


# -- item 10 ------------------------------------------------------------------------------------
def test_out_over_an_earlier_run_needs_resume_or_overwrite(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--store", world["store"], "--out", str(out), *FAST]) == 0
    first = sorted(p.name for p in (out / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["--store", world["store"], "--out", str(out), *FAST, "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "earlier run" in err and "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == first  # untouched
    assert main(["--store", world["store"], "--out", str(out), *FAST, "--max-steps", "3", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-0000003.pt"]  # nothing old kept
    assert main(["--out", str(out), "--resume", str(out), "--max-steps", "4", "progress=false"]) == 0
    assert "ckpt-0000004.pt" in {p.name for p in (out / "checkpoints").iterdir()}


def test_overwrite_refuses_a_folder_that_is_not_a_run(world, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["--store", world["store"], "--out", str(out), *FAST, "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()


# -- item 11 ------------------------------------------------------------------------------------
def test_tokenizer_with_another_vocabulary_needs_alignment(world, tmp_path, capsys):
    # Another tokenizer means the student reads its own tokenization of the stored text
    # (issue 13), aligned by byte offsets: a store without text cannot serve it, and the run
    # is refused before anything is written (never a model whose vocabulary is not its tokenizer's).
    rc = main(["--store", world["store"], "--tokenizer", world["other"], "--out", str(tmp_path / "a"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "student's own tokenization" in err and "text" in err and "Traceback" not in err
    assert not (tmp_path / "a" / "checkpoints").exists()
    # The store teacher's own tokenizer is fine.
    assert main(["--store", world["store"], "--tokenizer", world["tok"], "--out", str(tmp_path / "b"), *FAST]) == 0


# -- item 13: no "KL nan" when evaluating on text without a teacher ------------------------------------
def test_text_evaluation_prints_no_nan_kl(world, tmp_path, capsys):
    rc = lm_main(["--train-text", world["train"], "--tokenizer", world["tok"], "--model", "micro", "--eval-data", world["val"],
                  "--out", str(tmp_path / "lm"), "--max-steps", "2", "batch_size=4", "seq_len=32", "eval_every=1",
                  "progress=false", "plots=false", "threads=1", "save_model=false"])
    out = capsys.readouterr().out
    assert rc == 0 and "held-out CE" in out and "eval @ 1: CE" in out
    assert "nan" not in out.lower()
