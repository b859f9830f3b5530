"""Cross-tokenizer losses (ULD over stored top-k, chain-rule merged KD) and bits per
character, against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from trainer.core.losses import chain_merged_kd_loss, sparse_kd_loss, uld_loss
from trainer.lm.evaluate import bits_per_char


def test_uld_hand_computed_and_vocabulary_free():
    logits = torch.tensor([[[2.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]])
    probs = torch.tensor([[[0.3, 0.5, 0.0], [0.9, 0.0, 0.0]]])
    tail = torch.tensor([[0.2, 0.1]])
    mask = torch.tensor([[True, False]])
    q = torch.softmax(logits[0, 0], -1).sort(descending=True).values
    want = abs(0.5 - q[0]) + abs(0.3 - q[1]) + abs(0.2 - (1 - q[0] - q[1]))
    got = uld_loss(logits, probs, tail, mask)
    assert float(got) == float(want) or abs(float(got) - float(want)) < 1e-6
    # Ids play no role (the loss sorts probabilities), and masked positions add nothing.
    assert abs(float(uld_loss(logits, probs.flip(-1), tail, mask)) - float(want)) < 1e-6
    both = uld_loss(logits, probs, tail, torch.tensor([[True, True]]), reduction="sum")
    q2 = 0.25
    want2 = abs(0.9 - q2) + abs(0.1 - (1 - q2))
    assert abs(float(both) - float(want + want2)) < 1e-6
    # Zero when the student's sorted distribution equals the teacher's.
    z = torch.log(torch.tensor([[[0.5, 0.3, 0.1, 0.1]]]))
    assert float(uld_loss(z, torch.tensor([[[0.3, 0.5]]]), torch.tensor([[0.2]]), torch.tensor([[True]]))) < 1e-6


def _batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 5, generator=g, requires_grad=True)
    idx = torch.tensor([[[1, 3], [0, 2], [4, 0]]])
    probs = torch.tensor([[[0.6, 0.3], [0.5, 0.2], [0.7, 0.0]]])
    tail = 1 - probs.sum(-1)
    labels = torch.tensor([[2, 4, -100]])
    return logits, labels, idx, probs, tail


def test_chain_loss_without_groups_is_the_sparse_kl():
    logits, labels, idx, probs, tail = _batch()
    mask = torch.tensor([[True, True, True]])
    none = torch.full((1, 3), -1)
    got = chain_merged_kd_loss(logits, labels, idx, probs, tail, mask, torch.zeros(1, 3), none)
    want = sparse_kd_loss(logits, idx, probs, tail, mask)
    assert abs(float(got.detach()) - float(want.detach())) < 1e-5


def test_chain_loss_hand_computed_generalised_kl():
    logits, labels, idx, probs, tail = _batch()
    # Position 0 starts a group whose second student token is predicted at position 1
    # (label 4); the teacher's chain product over the group is 0.5.
    mask = torch.tensor([[True, False, False]])
    start = torch.tensor([[-1, 0, -1]])
    logc = torch.tensor([[math.log(0.5), 0.0, 0.0]])
    got = chain_merged_kd_loss(logits, labels, idx, probs, tail, mask, logc, start)
    lsm = torch.log_softmax(logits[0].float(), -1)
    p = torch.tensor([0.6, 0.3, 0.1])
    lq = torch.stack([lsm[0, 1], lsm[0, 3], torch.log1p(-(lsm[0, 1].exp() + lsm[0, 3].exp()))])
    kl = float((p * (p.log() - lq)).sum())
    log_cs = float(lsm[1, 4])
    want = 0.5 * (kl + math.log(0.5) - log_cs) - 0.5 + math.exp(log_cs)
    assert abs(float(got) - want) < 1e-5
    got.backward()
    assert logits.grad[0, 1].abs().sum() > 0  # the in-group position learns through C_s


class _Uniform(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.w)


def test_bits_per_char_of_a_uniform_model():
    from align_synth import corpus_tokenizers

    tok = corpus_tokenizers()["unigram"]
    texts = ["人民日报社论：新年献词。", "北京市长江大桥", "一"]
    V = len(tok) + 3  # logits over every id the tokenizer can produce
    got = bits_per_char(_Uniform(V), tok, texts, seq_len=4)
    scored, chars = 0, 0
    for t in texts:
        e = tok(t, add_special_tokens=False, return_offsets_mapping=True)
        offs = e["offset_mapping"]
        for s in range(0, len(offs), 4):
            w = offs[s : s + 4]
            if len(w) >= 2:
                scored += len(w) - 1
                chars += w[-1][1] - w[0][1]
    assert chars > 0
    assert got == pytest.approx(scored * math.log2(V) / chars, rel=1e-6)  # fp32 log-softmax
