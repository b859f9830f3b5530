"""Teacher distributions for bench/store_bench.py: a synthetic heavy-tailed generator and a
real causal LM's distributions on People's Daily validation text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

KS = (8, 16, 32, 64, 128)


# -- teacher distributions ------------------------------------------------------------------------
@dataclass
class Teacher:
    """Top-``kmax`` of N teacher distributions, sorted by probability (descending).

    idx ``[N, kmax]`` int64, p ``[N, kmax]`` float64, tail ``{k: [N]}`` exact mass outside
    the top k (float64, from the full distribution), tokens ``[N]`` int64 input ids,
    entropy ``[N]`` nats of the full distribution, vocab (padded) size, label.
    """

    idx: np.ndarray
    p: np.ndarray
    tail: dict[int, np.ndarray]
    tokens: np.ndarray
    entropy: np.ndarray
    vocab: int
    label: str


def synthetic_teacher(n: int, vocab: int, *, kmax: int = 128, seed: int = 0, progress: bool = True) -> Teacher:
    """SYNTHETIC heavy-tailed next-token distributions (no trained model involved).

    Per position, logits = β · (prior + 2.0·ε + boosts), where prior_r = -0.9·ln(1 + r) is a
    Zipf prior over frequency rank r, ε ~ N(0, 1) per token, 16 "context" tokens drawn from
    the prior flattened to 0.4·prior get +U(3, 12), and β ~ U(0.7, 1.5) sets the peakedness.
    Token ids follow frequency rank with noise (argsort of ln(1+r) + N(0,1)), as BPE ids
    roughly follow merge order. The statistics of a run are printed with the results
    (:func:`describe`; about: entropy median 2.1 nats, top-1 mass median 0.5, top-32 mass
    median 0.93). The input token at position t+1 is drawn from the distribution at t.
    """
    g = torch.Generator().manual_seed(seed)
    rank = torch.arange(vocab, dtype=torch.float32)
    prior = -0.9 * torch.log1p(rank)
    id_of_rank = torch.argsort(torch.log1p(rank) + torch.randn(vocab, generator=g))
    cand_p = torch.softmax(prior * 0.4, -1)
    idx, p, tails, ent, toks = [], [], {k: [] for k in KS}, [], []
    chunk = 1024
    for s in tqdm(range(0, n, chunk), desc="synthetic teacher", disable=not progress):
        m = min(chunk, n - s)
        z = prior[None, :] + 2.0 * torch.randn(m, vocab, generator=g)
        cand = torch.multinomial(cand_p, m * 16, replacement=True, generator=g).view(m, 16)
        z.scatter_add_(1, cand, torch.rand(m, 16, generator=g) * 9 + 3)
        z = z * (torch.rand(m, 1, generator=g) * 0.8 + 0.7)
        logits = torch.empty_like(z)
        logits[:, id_of_rank] = z
        _collect(logits, kmax, g, idx, p, tails, ent, toks)
    return _teacher(idx, p, tails, ent, toks, vocab, f"synthetic heavy-tailed generator (V={vocab:,})")


def _collect(logits, kmax, g, idx, p, tails, ent, toks) -> None:
    """Top-kmax (float64 softmax), exact tails per k, entropy, and a token drawn per position."""
    probs = torch.softmax(logits.double(), -1)
    v, i = torch.topk(probs, kmax, dim=-1)
    cum = torch.cumsum(v, -1)
    for k in KS:
        tails[k].append((1.0 - cum[:, k - 1]).clamp_min(0).numpy())
    idx.append(i.numpy())
    p.append(v.numpy())
    ent.append(torch.special.entr(probs).sum(-1).numpy())
    u = torch.rand(probs.shape[0], 1, generator=g, dtype=torch.float64)
    cdf = torch.cumsum(probs, -1)
    toks.append(torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(probs.shape[1] - 1).squeeze(1).numpy())


def _teacher(idx, p, tails, ent, toks, vocab, label) -> Teacher:
    t = np.concatenate(toks)
    tokens = np.concatenate([[1], t[:-1]])  # token t+1 is drawn from the distribution at t
    return Teacher(np.concatenate(idx), np.concatenate(p), {k: np.concatenate(v) for k, v in tails.items()},
                   tokens, np.concatenate(ent), vocab, label)


def describe(t: Teacher) -> str:
    q = lambda x: "median {:.2f} (p10 {:.2f}, p90 {:.2f})".format(*np.quantile(x, [0.5, 0.1, 0.9]))  # noqa: E731
    return (f"{len(t.tokens):,} positions; entropy {q(t.entropy)} nats; top-1 mass {q(t.p[:, 0])}; "
            f"top-32 mass {q(1 - t.tail[32])}; {np.mean(t.idx[:, :32] < 256):.0%} of top-32 ids < 256")


def real_teacher(n: int, *, train: bool, model_dir: str | None = None, kmax: int = 128, progress: bool = True) -> Teacher | None:
    """Distributions of a real causal LM on People's Daily validation text: ``model_dir``, or
    the cached reference teacher (``trainer/reference.py``, trained first when ``train``);
    None when neither exists."""
    if model_dir is None:
        try:
            from trainer.lm.reference import default_cache_dir, reference_teacher  # noqa: PLC0415
        except ImportError:
            return None
        cached = sorted((default_cache_dir() / "reference").glob("teacher-small-*/reference.json"))
        if not cached and not train:
            return None
        model_dir = reference_teacher(progress=progress) if train else cached[-1].parent
    model_dir = Path(model_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from trainer.data.corpora import peoples_daily  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = []
    for s in peoples_daily("validation"):
        ids += tok(s.text)["input_ids"]
        if len(ids) >= n + 1:
            break
    ids = torch.tensor(ids[: n + 1])
    g = torch.Generator().manual_seed(0)
    idx, p, tails, ent, toks = [], [], {k: [] for k in KS}, [], []
    seq = 128
    with torch.inference_mode():
        for s in tqdm(range(0, n, seq), desc="reference teacher", disable=not progress):
            x = ids[s : min(s + seq, n)][None]
            logits = model(input_ids=x).logits[0]
            _collect(logits, min(kmax, vocab), g, idx, p, tails, ent, toks)
    t = _teacher(idx, p, tails, ent, toks, vocab, f"real teacher {model_dir.name} (V={vocab:,}, People's Daily validation)")
    t.tokens = ids[:n].numpy().astype(np.int64)  # real inputs
    return t


def spread_teacher(t: Teacher, vocab: int, *, seed: int = 0) -> Teacher:
    """``t``'s distributions in a ``vocab``-row vocabulary: each of its ids sent to a distinct
    row by a fixed random permutation (``seed``), kept indices and input tokens alike. Real
    distributions at a vocabulary no trained model here has (issue #16's 151,936): the hard
    case for ids stored as they are (no locality left for the gaps)."""
    if vocab < t.vocab:
        raise ValueError(f"spread_teacher: vocab {vocab} is smaller than the teacher's {t.vocab}")
    idmap = np.random.default_rng(seed).permutation(vocab)[: t.vocab]  # teacher id -> one of vocab rows, injective
    return Teacher(idmap[t.idx], t.p, t.tail, idmap[t.tokens], t.entropy, vocab,
                   f"{t.label}, ids spread over V = {vocab:,}")
