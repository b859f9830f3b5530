"""The training loop end to end on real text with a tiny teacher and stores from its forward pass.

A byte-level BPE tokenizer and a small Llama teacher are trained on People's Daily lines;
their real distributions are captured into stores (top-k and sample mode) with
:func:`pipelines.plain.cache_with_model`, and the student loop runs on them.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.data.corpora import peoples_daily
from kdstore.format import Selection
from fixtures import make_tiny_causal_lm, train_bpe_tokenizer
from pipelines.plain import cache_with_model
from trainer.core.config import TrainConfig
from trainer.lm.student import lm_main, main, train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, teacher (trained a little), train stores (top-k 8, sample 16) and an eval store."""
    torch.set_num_threads(1)  # tiny models: threads only add overhead on shared cores
    d = tmp_path_factory.mktemp("world")
    train_texts = [s.text for s in peoples_daily("train")[:500]]
    val_texts = [s.text for s in peoples_daily("validation")[:40]]
    tok = train_bpe_tokenizer(train_texts, d / "tok", vocab_size=300)
    teacher = make_tiny_causal_lm(d / "teacher", tokenizer_dir=tok, hidden=48, layers=1, heads=2, init_std=0.02,
                                  train_texts=train_texts, train_steps=60, train_seq_len=48, train_batch=16, lr=5e-3)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(teacher))
    t = AutoTokenizer.from_pretrained(str(teacher))
    stores = {"topk": str(d / "topk8"), "sample": str(d / "sample16")}
    cache_with_model(model, t, train_texts[:300], {stores["topk"]: Selection(mode="topk", k=8),
                                                    stores["sample"]: Selection(mode="sample", samples=16, seed=1)},
                     max_length=48, name_or_path=str(teacher))
    cache_with_model(model, t, val_texts, {str(d / "eval"): Selection(mode="topk", k=8)}, max_length=48,
                     name_or_path=str(teacher))
    (d / "val.txt").write_text("\n".join(val_texts) + "\n", encoding="utf-8")
    (d / "train.txt").write_text("\n".join(train_texts) + "\n", encoding="utf-8")
    (d / "dropout.json").write_text(json.dumps({"preset": "micro", "dropout": 0.2}))
    return {"dir": d, "tok": tok, "teacher": teacher, "eval": str(d / "eval"), "val_text": str(d / "val.txt"),
            "train_text": str(d / "train.txt"), "dropout_model": str(d / "dropout.json"), **stores}


def _cfg(world, out, **kw) -> TrainConfig:
    base = dict(store=world["topk"], model="micro", out_dir=str(out), batch_size=8, max_steps=30, lr=1e-2,
                warmup_steps=3, log_every=5, progress=False, plots=False, threads=1, eval_batch_size=16)
    base.update(kw)
    return TrainConfig(**base)


def _events(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def test_kd_run_lowers_held_out_loss_and_tracks_the_teacher_better_than_ce(world, tmp_path):
    kd = train(_cfg(world, tmp_path / "kd", kd_weight=0.7, eval_data=world["eval"], eval_every=30, plots=True))
    ce = train(_cfg(world, tmp_path / "ce", kd_weight=0.0, eval_data=world["eval"], eval_every=30))
    ev = _events(tmp_path / "kd", "eval")
    assert [e["step"] for e in ev] == [0, 30]
    assert ev[-1]["eval_ce"] < ev[0]["eval_ce"] - 0.5  # held-out CE drops well below the init's
    assert ev[-1]["eval_kl"] < ev[0]["eval_kl"]
    assert ev[-1]["eval_kl_kind"] == "sparse"
    # Same data, steps and seed: the distilled student is closer to the teacher.
    assert kd["eval_kl"] < ce["eval_kl"]
    assert all(r["kd"] is None for r in _events(tmp_path / "ce", "train"))  # CE-only computes no KD term
    out = tmp_path / "kd"
    assert (out / "curves.png").stat().st_size > 1000 and json.loads((out / "result.json").read_text())["finished"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert AutoTokenizer.from_pretrained(str(out / "model")) is not None  # the teacher's tokenizer travels along
    assert m.get_input_embeddings().weight.shape[0] == AutoModelForCausalLM.from_pretrained(
        str(world["teacher"])).get_input_embeddings().weight.shape[0]


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(world, tmp_path):
    # Dropout (RNG), mid-run evaluation, mid-epoch interruption and grad accumulation all in play.
    kw = dict(model=world["dropout_model"], max_steps=8, eval_data=world["eval"], eval_every=4, eval_batches=1,
              grad_accum=2, kd_weight=0.5, save_every=0, log_every=1)
    train(_cfg(world, tmp_path / "full", **kw))
    train(_cfg(world, tmp_path / "part", stop_at=4, **kw))
    ck_part = torch.load(tmp_path / "part" / "checkpoints" / "ckpt-0000004.pt", weights_only=True)
    assert ck_part["step"] == 4 and ck_part["loader"][0]["batches_done"] == 8
    assert not (tmp_path / "part" / "model").exists()  # not finished yet
    assert main(["--resume", str(tmp_path / "part")]) == 0
    a = torch.load(tmp_path / "full" / "checkpoints" / "ckpt-0000008.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "ckpt-0000008.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["loader"] == b["loader"] and a["scheduler"] == b["scheduler"]
    la = [(r["step"], r["loss"]) for r in _events(tmp_path / "full", "train")]
    lb = [(r["step"], r["loss"]) for r in _events(tmp_path / "part", "train")]
    assert la == lb
    ea = [(r["step"], r["eval_ce"]) for r in _events(tmp_path / "full", "eval")]
    assert ea == [(r["step"], r["eval_ce"]) for r in _events(tmp_path / "part", "eval")]


def test_online_teacher_sample_mode_and_chunked_loss_runs(world, tmp_path):
    on = train(_cfg(world, tmp_path / "online", online_teacher=str(world["teacher"]), kd_weight=1.0, max_steps=6,
                    eval_data=world["val_text"], tokenizer=str(world["tok"]), loss_chunk=64))
    kd_online = [r["kd"] for r in _events(tmp_path / "online", "train")]
    assert all(v is not None and v > 0 for v in kd_online)
    assert on["eval_kl_kind"] == "full" and on["eval_kl"] > 0  # full KL to the online teacher on text
    sm = train(_cfg(world, tmp_path / "sample", store=world["sample"], max_steps=6, kd_weight=1.0, precision="bf16"))
    assert sm["finished"] and all(r["kd"] > 0 for r in _events(tmp_path / "sample", "train"))


def test_jsd_kd_and_tensorboard_log(world, tmp_path):
    out = tmp_path / "jsd"
    res = train(_cfg(world, out, kd_loss="jsd", kd_beta=0.5, kd_weight=1.0, max_steps=10, log_every=2, tensorboard=True))
    assert res["finished"]
    kd = [r["kd"] for r in _events(out, "train")]
    assert len(kd) == 5 and all(0 < v <= math.log(2) for v in kd)  # JSD(beta=0.5) is bounded by ln 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/kd")] == [
        (r["step"], pytest.approx(r["kd"], rel=1e-6)) for r in _events(out, "train")]
    with pytest.raises(ValueError, match="kd_loss=jsd is implemented over stored targets only"):
        train(_cfg(world, tmp_path / "x", store="", train_text=world["train_text"], online_teacher=str(world["teacher"]),
                   kd_loss="jsd", tokenizer=str(world["tok"])))


def test_fused_head_trains_like_the_logits_path(world, tmp_path):
    # Same seed, data and steps: the fused LM head + loss only reorders fp32 sums.
    kw = dict(kd_weight=0.7, max_steps=6, log_every=1, loss_chunk=37)
    train(_cfg(world, tmp_path / "plain", **kw))
    train(_cfg(world, tmp_path / "fused", fused_head=True, **kw))
    a = [(r["step"], r["loss"], r["ce"], r["kd"]) for r in _events(tmp_path / "plain", "train")]
    b = [(r["step"], r["loss"], r["ce"], r["kd"]) for r in _events(tmp_path / "fused", "train")]
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        assert ra[0] == rb[0] and ra[1:] == pytest.approx(rb[1:], rel=2e-4)
    from transformers import AutoModelForCausalLM

    ma = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain" / "model")).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fused" / "model")).state_dict()
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-3, atol=1e-4)


def test_packing_cuts_padding_on_real_text_and_trains_like_padded_batches(world, tmp_path):
    from kdstore.dataset import SoftLabelDataset

    def padding(pack: bool) -> float:
        real = total = 0
        for b in SoftLabelDataset(world["topk"], batch_size=8, seed=0, pack=pack):
            m = b["valid_mask"] if pack else b["attention_mask"]
            real, total = real + int(m.sum()), total + m.numel()
        return 1 - real / total

    plain, packed = padding(False), padding(True)
    assert packed <= 0.10 and packed < 0.6 * plain  # 48-token windows: most rows are full here
    kw = dict(kd_weight=0.7, max_steps=5, log_every=1)
    train(_cfg(world, tmp_path / "pad", pack=False, **kw))
    train(_cfg(world, tmp_path / "pack", pack=True, **kw))
    a = [(r["loss"], r["ce"], r["kd"]) for r in _events(tmp_path / "pad", "train")]
    b = [(r["loss"], r["ce"], r["kd"]) for r in _events(tmp_path / "pack", "train")]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=2e-4)


def test_student_with_an_aligned_vocabulary(world, tmp_path):
    from kdstore import open as open_store
    from kdstore.align import VocabAlignment

    texts = [s.text for s in peoples_daily("train")[:300]]
    student_tok = train_bpe_tokenizer(texts, tmp_path / "stok", vocab_size=200)
    al = VocabAlignment.build(open_store(world["topk"]), str(student_tok), policy="extend")
    path = al.save(tmp_path / "align.parquet")
    # The old input-mapping path, under its explicit name (the student reads mapped teacher tokens).
    res = train(_cfg(world, tmp_path / "aligned", teacher_segmentation_align=str(path), tokenizer=str(student_tok),
                     max_steps=4, eval_data=world["val_text"]))
    assert res["vocab_size"] == al.vocab_size > 200  # resized to the aligned vocabulary (extend adds tokens)
    assert res["eval_kl_kind"] == "none" and res["eval_ce"] > 0


def test_eval_kl_final_runs_the_eval_teacher_only_at_the_end(world, tmp_path):
    # Text eval data with an eval teacher: eval_kl=every gives a KL at every evaluation,
    # final only at the last one; the held-out CE curve is the same either way.
    kw = dict(kd_weight=0.0, max_steps=8, eval_every=4, eval_data=world["val_text"], tokenizer=str(world["tok"]),
              eval_teacher=str(world["teacher"]))
    every = train(_cfg(world, tmp_path / "every", **kw))
    final = train(_cfg(world, tmp_path / "final", eval_kl="final", **kw))
    ev_every, ev_final = _events(tmp_path / "every", "eval"), _events(tmp_path / "final", "eval")
    assert [e["step"] for e in ev_final] == [e["step"] for e in ev_every] == [0, 4, 8]
    assert all(e["eval_kl"] is not None for e in ev_every)
    assert [e["eval_kl"] is None for e in ev_final] == [True, True, False]
    assert [e["eval_ce"] for e in ev_final] == [e["eval_ce"] for e in ev_every]
    assert final["eval_kl"] == every["eval_kl"] > 0
    with pytest.raises(ValueError, match="eval_kl must be every or final"):
        _cfg(world, tmp_path / "bad", eval_kl="last", **{k: v for k, v in kw.items()}).validate()


def test_lm_main_trains_on_text(world, tmp_path):
    rc = lm_main(["--train-text", world["train_text"], "--tokenizer", str(world["tok"]), "--model", "micro",
                  "--eval-data", world["val_text"], "--out", str(tmp_path / "lm"), "--max-steps", "12",
                  "batch_size=8", "seq_len=32", "eval_every=12", "progress=false", "threads=1", "lr=1e-2"])
    assert rc == 0
    ev = _events(tmp_path / "lm", "eval")
    assert ev[-1]["eval_ce"] < ev[0]["eval_ce"]
    cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert cfg["kd_weight"] == 0.0 and cfg["model"] == "micro" and cfg["seq_len"] == 32


def test_cli_reports_user_errors(world, tmp_path, capsys):
    assert main(["--store", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such store" in capsys.readouterr().err
    assert main(["--store", world["topk"], "--align", "a.parquet", "--online-teacher", "t"]) == 2
    assert "online_teacher needs" in capsys.readouterr().err
    assert main(["--store", world["topk"], "--print-config", "lr=5e-4"]) == 0
    assert '* lr                   = 0.0005' in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_with_gloo(world, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "kdstore.cli", "train", "student", "--store", world["topk"],
           "--student-config", "micro", "--out", str(out), "--max-steps", "4", "batch_size=4", "record_samples=true",
           "progress=false", "plots=false", "eval_data=" + world["eval"], "eval_batch_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = []
    for r in (0, 1):
        lines = (out / f"samples-rank{r}.txt").read_text().splitlines()
        assert [int(x.split("\t")[0]) for x in lines] == [1, 2, 3, 4]
        seen.append({sid for x in lines for sid in x.split("\t")[1].split()})
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank reads its own rows
    digests = [json.loads((out / f"rank-{r}.json").read_text())["param_digest"] for r in (0, 1)]
    assert digests[0] == digests[1]  # gradients were averaged: replicas stay identical
    ck = torch.load(out / "checkpoints" / "ckpt-0000004.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["loader"]) == 2 and len(ck["rng"]) == 2
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["eval_tokens"] > 0


def test_reference_lm_is_trained_once_and_reused_by_key(world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.lm.reference import Recipe, reference_info, reference_lm

    r = Recipe(name="ref-micro", model="micro", max_steps=4, batch_size=4, seq_len=32, warmup_steps=1, precision="fp32",
               train_text=world["train_text"], eval_text=world["val_text"])
    path = reference_lm(cache_dir=tmp_path, recipe=r, tokenizer_dir=world["tok"], progress=False, threads=1)
    info = reference_info(path)
    assert info["steps"] == 4 and info["eval_ppl"] > 1 and info["parameters"] > 0
    stamp = (path / "reference.json").stat().st_mtime_ns
    assert reference_lm(cache_dir=tmp_path, recipe=r, tokenizer_dir=world["tok"], progress=False) == path
    assert (path / "reference.json").stat().st_mtime_ns == stamp  # reused, not retrained
    other = reference_lm(cache_dir=tmp_path, recipe=Recipe(**{**r.__dict__, "max_steps": 5}), tokenizer_dir=world["tok"],
                         progress=False, threads=1)
    assert other != path  # the key covers the recipe
    assert AutoModelForCausalLM.from_pretrained(str(path)).config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(str(path))("人民")["input_ids"]
    assert not list(tmp_path.glob("reference/.*"))  # no temporary directories left behind


def test_cache_with_model_stores_the_teachers_distributions(world):
    """The store holds the teacher's own top-k: decoding reproduces its probabilities."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    import kdstore

    store = kdstore.open(world["topk"])
    rows = store.decode(store.read_shard(0).slice(0, 2))
    model = AutoModelForCausalLM.from_pretrained(str(world["teacher"])).eval()
    n = int(rows.positions[1])
    ids = torch.from_numpy(rows.input_ids[:n]).view(1, -1)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ids).logits[0].float(), -1)
    top = torch.topk(p, 8, -1)
    order = torch.argsort(top.indices, -1)
    # entries come in storage order (ascending rank in the default rank_delta coding): compare by id
    got = rows.indices[: n * 8].reshape(n, 8)
    by_id = np.argsort(got, axis=1)
    assert np.array_equal(np.take_along_axis(got, by_id, 1), torch.gather(top.indices, 1, order).numpy())
    kept = np.take_along_axis(rows.probs[: n * 8].reshape(n, 8), by_id, 1)
    want = torch.gather(top.values, 1, order).numpy()
    assert np.allclose(kept, want, rtol=0.05, atol=1e-3)  # 8-bit code, renormalised with the tail
    assert store.manifest.teacher.vocab_size == model.get_input_embeddings().weight.shape[0]
