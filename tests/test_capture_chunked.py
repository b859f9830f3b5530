"""The capture's LM head runs per selection chunk from hidden states: same soft labels as the
full-logit forward, and models whose logits are not ``head(hidden)`` keep the full forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures import make_tiny_causal_lm, train_bpe_tokenizer
from kdstore.format import Selection
from pipelines.inference import BatchSpec, TeacherRunner
from pipelines.teacher_model import split_head
from pipelines.teachers import TeacherSpec
from trainer.data.corpora import peoples_daily


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("chunked")
    texts = [s.text for s in peoples_daily("train")[:200]]
    tok = train_bpe_tokenizer(texts, d / "tok", vocab_size=300)
    return make_tiny_causal_lm(d / "lm", tokenizer_dir=tok, hidden=32, layers=1, heads=2, init_std=0.3), texts


def _runner(path, selection, *, chunked: bool, select_rows: int):
    r = TeacherRunner(teacher=TeacherSpec(path=str(path), device="cpu", dtype="float32"), selection=selection,
                      batch=BatchSpec(micro_batch_tokens=256, pad_multiple=16, select_rows=select_rows))
    if not chunked:
        r.model.split = None  # the full-logit forward, as for a model that fails the probe
    return r


@pytest.mark.parametrize("selection", [Selection(mode="topk", k=8), Selection(mode="top_p", p=0.9, max_k=32),
                                       Selection(mode="sample", samples=16, seed=3)], ids=lambda s: s.mode)
def test_chunked_head_gives_the_full_forwards_soft_labels(teacher, selection):
    path, texts = teacher
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 300, int(n)) for n in rng.integers(3, 60, 12)]
    keys = list(range(len(ids)))
    a = _runner(path, selection, chunked=True, select_rows=7).infer(ids, keys)
    assert _runner(path, selection, chunked=True, select_rows=7).model.split is not None  # the tiny Llama is separable
    b = _runner(path, selection, chunked=False, select_rows=4096).infer(ids, keys)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.counts, y.counts)
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_allclose(x.probs, y.probs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(x.tail, y.tail, rtol=1e-4, atol=1e-6)


def test_soft_capped_logits_keep_the_full_forward():
    # Gemma 2 post-processes logits (tanh soft-capping): head(hidden) is not the model's output.
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, initializer_range=0.5)
    model = Gemma2ForCausalLM(cfg).eval()
    assert split_head(model, torch) is None
    cfg.final_logit_softcapping = None
    decoder, head = split_head(Gemma2ForCausalLM(cfg).eval(), torch)
    assert decoder is not None and head is not None
