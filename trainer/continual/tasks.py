"""The pre-training tasks of ``kd train continual`` (ERNIE 2.0 on People's Daily 1998).

Each task owns its head (``ContinualModel.heads[name]``) and its loss (fp32, masked, divided by
its valid targets), builds batch ``k`` as a pure function of ``(seed, task, k)`` (examples are
drawn with replacement; so a resumed run sees exactly the batches of an uninterrupted one),
and evaluates on a fixed held-out set built from validation articles. Tensor shapes: ``B``
examples, ``T`` tokens, ``W`` words, ``V`` teacher vocabulary.

* ``knowledge_mask`` (word-aware): whole gold words and named entities (``nr`` runs, ``ns``,
  ``nt``, ``nz``) are masked until ``mask_rate`` of the tokens are; every token overlapping a
  chosen unit becomes ``[MASK]``; predict the original ids. ``token_mask`` is the plain
  baseline: single BPE tokens masked at random (the encoder's unit is a BPE token, so this is
  BERT's basic-level masking in this tokenization).
* ``token_doc`` (word-aware): for each gold word of >= 2 characters in a line, does it occur in
  at least ``tdr_min_docs`` *other* training articles (common vocabulary vs a topical word)?
  Binary, per word (hidden states of its tokens averaged).
* ``reorder`` (structure-aware): ``m`` consecutive sentences of an article, shuffled, joined
  with ``[SEP]``; classify the permutation (``m!`` classes).
* ``distance`` (structure-aware): two sentences; 0 adjacent in one article, 1 same article
  not adjacent, 2 different articles (classes drawn uniformly).
* ``kd`` (teacher): token-level distillation from a soft-label store of a causal teacher,
  streamed with :class:`kdstore.SoftLabelDataset`. The teacher predicts token ``t+1`` from
  tokens ``<= t``, so this task runs the shared encoder with a causal attention mask (as
  UniLM shares one encoder between bidirectional and left-to-right objectives); the loss is
  ``(1 - a) * CE + a * KL(teacher || encoder)`` from :mod:`trainer.core.losses`.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import xxhash

from trainer.continual.text import Corpus, EncodedLine, SpecialIds
from trainer.core.losses import IGNORE_INDEX, ce_and_sparse_kd_loss, mix

SENTENCE_TASKS = ("reorder", "distance")


def batch_rng(seed: int, task: str, k: int) -> random.Random:
    """The RNG of batch ``k`` of ``task`` (independent of every other batch and task)."""
    return random.Random(xxhash.xxh3_64_intdigest(f"{seed}:{task}:{k}".encode()))


def pad_rows(rows: list[list[int]], pad: int, fill: int | None = None) -> torch.Tensor:
    """Right-pad id lists to ``[B, T]`` with ``pad`` (or ``fill``)."""
    t = max(len(r) for r in rows)
    out = torch.full((len(rows), t), pad if fill is None else fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def word_pool(h: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """Mean hidden state of each word's tokens: ``h [B, T, D]``, ``spans [B, W, 2]`` (token
    ``[start, end)``, end > start for real words) -> ``[B, W, D]`` (prefix-sum difference)."""
    cs = F.pad(h.float().cumsum(1), (0, 0, 1, 0))  # [B, T+1, D]
    idx = spans.clamp(min=0, max=h.shape[1])  # spans of ignored words may point past the truncation
    lo = torch.gather(cs, 1, idx[..., 0:1].expand(-1, -1, h.shape[-1]))
    hi = torch.gather(cs, 1, idx[..., 1:2].expand(-1, -1, h.shape[-1]))
    n = (spans[..., 1] - spans[..., 0]).clamp(min=1).unsqueeze(-1).float()
    return (hi - lo) / n


@dataclass
class Result:
    """One evaluation: ``metric`` (higher is better, in [0, 1]: the stage x task matrix) and
    named extras."""

    metric: float
    extras: dict[str, float]


class Task:
    """Interface: ``head_size``, ``batch(k)``, ``loss(model, batch) -> (loss, correct, count)``,
    ``evaluate(model)``."""

    name: str
    head_size: int

    def __init__(self, *, name: str, cfg: Any, special: SpecialIds, train: Corpus, valid: Corpus) -> None:
        self.name, self.cfg, self.special, self.train_corpus, self.valid_corpus = name, cfg, special, train, valid
        self._eval: list[dict[str, Any]] | None = None

    def batch(self, k: int) -> dict[str, Any]:
        return self.make_batch(self.train_corpus, batch_rng(self.cfg.seed, self.name, k), self.cfg.batch_size)

    def eval_batches(self) -> list[dict[str, Any]]:
        if self._eval is None:
            rng = batch_rng(self.cfg.seed + 7919, self.name, -1)  # fixed held-out set
            n, bs = self.cfg.eval_examples, 64
            self._eval = [self.make_batch(self.valid_corpus, rng, min(bs, n - s)) for s in range(0, n, bs)]
        return self._eval

    def make_batch(self, corpus: Corpus, rng: random.Random, size: int) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model) -> Result:
        correct = count = 0
        loss_sum = 0.0
        for b in self.eval_batches():
            loss, c, n = self.loss(model, b)
            correct, count, loss_sum = correct + c, count + n, loss_sum + float(loss) * n
        return Result(metric=correct / max(count, 1), extras={"loss": loss_sum / max(count, 1), "count": count})


# -- word-aware -------------------------------------------------------------------------------
class MaskTask(Task):
    """``knowledge_mask`` (whole words / entities) or ``token_mask`` (single tokens)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.head_size = self.special.base
        self.knowledge = self.name == "knowledge_mask"
        self._pool = [ln for doc in self.train_corpus.lines for ln in doc if ln.units]
        self._valid_pool = [ln for doc in self.valid_corpus.lines for ln in doc if ln.units]

    def mask_line(self, ln: EncodedLine, rng: random.Random, *, knowledge: bool) -> tuple[list[int], list[int], list[bool]]:
        """(input ids with ``[CLS]`` first, targets with -100 where not masked, entity flag per
        position). Truncated to ``max_len``."""
        n = min(len(ln.ids), self.cfg.max_len - 1)
        budget = max(1, round(self.cfg.mask_rate * n))
        masked: set[int] = set()
        entity: set[int] = set()
        if knowledge:
            units = list(ln.units)
            rng.shuffle(units)
            for a, b, is_ent in units:
                if len(masked) >= budget:
                    break
                lo, hi = ln.word_spans[a][0], ln.word_spans[b - 1][1]
                if hi > n:
                    continue  # the unit is cut by truncation: never mask half of it
                toks = set(range(lo, hi))
                masked |= toks
                if is_ent:
                    entity |= toks
        if not masked:  # plain masking, or no whole unit fits before the truncation
            masked = set(rng.sample(range(n), budget))
        ids = [self.special.cls] + [self.special.mask if i in masked else t for i, t in enumerate(ln.ids[:n])]
        tgt = [IGNORE_INDEX] + [t if i in masked else IGNORE_INDEX for i, t in enumerate(ln.ids[:n])]
        ent = [False] + [i in entity for i in range(n)]
        return ids, tgt, ent

    def _batch(self, pool: list[EncodedLine], rng: random.Random, size: int, *, knowledge: bool) -> dict[str, Any]:
        rows = [self.mask_line(pool[rng.randrange(len(pool))], rng, knowledge=knowledge) for _ in range(size)]
        ids = pad_rows([r[0] for r in rows], self.special.pad)
        mask = pad_rows([[1] * len(r[0]) for r in rows], 0).bool()
        return {"input_ids": ids, "attention_mask": mask, "targets": pad_rows([r[1] for r in rows], IGNORE_INDEX),
                "entity": pad_rows([[int(e) for e in r[2]] for r in rows], 0).bool()}

    def make_batch(self, corpus: Corpus, rng: random.Random, size: int) -> dict[str, Any]:
        pool = self._pool if corpus is self.train_corpus else self._valid_pool
        return self._batch(pool, rng, size, knowledge=self.knowledge)

    def eval_batches(self) -> list[dict[str, Any]]:
        # Both masking tasks are scored on the same held-out whole-word/entity masking (the
        # knowledge test), so their numbers compare; their own style is scored in evaluate().
        if self._eval is None:
            rng = batch_rng(self.cfg.seed + 7919, "mask-eval", -1)
            n = self.cfg.eval_examples
            self._eval = [self._batch(self._valid_pool, rng, min(64, n - s), knowledge=True) for s in range(0, n, 64)]
            rng = batch_rng(self.cfg.seed + 7919, "mask-eval-token", -1)
            self._eval_token = [self._batch(self._valid_pool, rng, min(64, n - s), knowledge=False) for s in range(0, n, 64)]
        return self._eval

    def _logits(self, model, b: dict[str, Any]) -> torch.Tensor:
        h = model.hidden(b["input_ids"], b["attention_mask"])
        return model.head(self.name, h)  # [B, T, V]

    def loss(self, model, b: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
        dev = model.device
        logits = self._logits(model, {k: v.to(dev) for k, v in b.items()})
        tgt = b["targets"].to(dev)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE_INDEX)
        valid = tgt != IGNORE_INDEX
        correct = int(((logits.argmax(-1) == tgt) & valid).sum())
        return loss, correct, int(valid.sum())

    @torch.no_grad()
    def evaluate(self, model) -> Result:
        word_c = word_n = ent_c = ent_n = 0
        for b in self.eval_batches():
            logits = self._logits(model, {k: v.to(model.device) for k, v in b.items()})
            tgt, ent = b["targets"].to(model.device), b["entity"].to(model.device)
            hit = (logits.argmax(-1) == tgt) & (tgt != IGNORE_INDEX)
            word_c, word_n = word_c + int(hit.sum()), word_n + int((tgt != IGNORE_INDEX).sum())
            ent_c, ent_n = ent_c + int((hit & ent).sum()), ent_n + int(ent.sum())
        tok_c = tok_n = 0
        for b in self._eval_token:
            _, c, n = self.loss(model, b)
            tok_c, tok_n = tok_c + c, tok_n + n
        word_acc, tok_acc = word_c / max(word_n, 1), tok_c / max(tok_n, 1)
        return Result(metric=word_acc if self.knowledge else tok_acc,
                      extras={"word_acc": word_acc, "entity_acc": ent_c / max(ent_n, 1), "token_acc": tok_acc})


class TokenDocTask(Task):
    """``token_doc``: per word, does it occur in >= ``tdr_min_docs`` other training articles?"""

    head_size = 2

    def __init__(self, *, df: dict[str, int], own_docs: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.df = df  # article frequency over the whole training split
        self._pools = {}
        for corpus, in_train in ((self.train_corpus, own_docs), (self.valid_corpus, False)):
            pool = []
            for doc in corpus.lines:
                for ln in doc:
                    lab = self.labels(ln, in_train=in_train)
                    if any(y != IGNORE_INDEX for y in lab):
                        pool.append((ln, lab))
            self._pools[id(corpus)] = pool

    def labels(self, ln: EncodedLine, *, in_train: bool) -> list[int]:
        """Per word: 1/0, or -100 (punctuation, single characters, cut by truncation). A word of
        a training article counts its own article in ``df``; subtract it."""
        out = []
        for w, t, (lo, hi) in zip(ln.words, ln.tags, ln.word_spans):
            if t == "w" or len(w) < 2 or hi > self.cfg.max_len or hi <= lo:
                out.append(IGNORE_INDEX)
                continue
            others = self.df.get(w, 0) - (1 if in_train else 0)
            out.append(int(others >= self.cfg.tdr_min_docs))
        return out

    def make_batch(self, corpus: Corpus, rng: random.Random, size: int) -> dict[str, Any]:
        pool = self._pools[id(corpus)]
        rows = [pool[rng.randrange(len(pool))] for _ in range(size)]
        n = [min(len(ln.ids), self.cfg.max_len) for ln, _ in rows]
        ids = pad_rows([list(ln.ids[:k]) for (ln, _), k in zip(rows, n)], self.special.pad)
        mask = pad_rows([[1] * k for k in n], 0).bool()
        w = max(len(lab) for _, lab in rows)
        spans = torch.zeros((size, w, 2), dtype=torch.long)
        labels = torch.full((size, w), IGNORE_INDEX, dtype=torch.long)
        for i, (ln, lab) in enumerate(rows):
            spans[i, : len(lab)] = torch.tensor(ln.word_spans, dtype=torch.long)
            labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "spans": spans, "labels": labels}

    def loss(self, model, b: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
        dev = model.device
        h = model.hidden(b["input_ids"].to(dev), b["attention_mask"].to(dev))
        logits = model.head(self.name, word_pool(h, b["spans"].to(dev)))  # [B, W, 2]
        y = b["labels"].to(dev)
        loss = F.cross_entropy(logits.float().reshape(-1, 2), y.reshape(-1), ignore_index=IGNORE_INDEX)
        valid = y != IGNORE_INDEX
        return loss, int(((logits.argmax(-1) == y) & valid).sum()), int(valid.sum())


# -- structure-aware --------------------------------------------------------------------------
class SentenceTask(Task):
    """``reorder`` and ``distance``: sentence-level classification from the pooled encoder."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        m = self.cfg.reorder_segments
        self.perms = list(itertools.permutations(range(m)))
        self.head_size = len(self.perms) if self.name == "reorder" else 3
        need = m if self.name == "reorder" else 3
        for corpus, split in ((self.train_corpus, "train"), (self.valid_corpus, "validation")):
            if sum(len(s) >= need for s in corpus.sentences) < 2:
                raise ValueError(f"{self.name}: fewer than 2 {split} articles have {need} sentences; use more articles "
                                 f"(doc_limit)")
        self._docs = {id(c): [i for i, s in enumerate(c.sentences) if len(s) >= need]
                      for c in (self.train_corpus, self.valid_corpus)}

    def _join(self, parts: list[tuple[int, ...]]) -> list[int]:
        room = (self.cfg.max_len - len(parts)) // len(parts)  # [CLS] + (n - 1) [SEP]
        out = [self.special.cls]
        for j, p in enumerate(parts):
            if j:
                out.append(self.special.sep)
            out += list(p[:room])
        return out

    def example(self, corpus: Corpus, rng: random.Random) -> tuple[list[int], int]:
        docs = self._docs[id(corpus)]
        di = rng.randrange(len(docs))
        sents = corpus.sentences[docs[di]]
        if self.name == "reorder":
            m = self.cfg.reorder_segments
            i = rng.randrange(len(sents) - m + 1)
            label = rng.randrange(len(self.perms))
            return self._join([sents[i + j] for j in self.perms[label]]), label
        label = rng.randrange(3)
        n = len(sents)
        if label < 2:
            gap = 1 if label == 0 else rng.randrange(2, n)  # n >= 3 (pool)
            i = rng.randrange(n - gap)
            return self._join([sents[i], sents[i + gap]]), label
        i = rng.randrange(n)
        j = rng.randrange(len(docs) - 1)
        s2 = corpus.sentences[docs[j + (j >= di)]]  # any other article
        other = s2[rng.randrange(len(s2))]
        return self._join([sents[i], other]), label

    def make_batch(self, corpus: Corpus, rng: random.Random, size: int) -> dict[str, Any]:
        rows = [self.example(corpus, rng) for _ in range(size)]
        ids = pad_rows([r for r, _ in rows], self.special.pad)
        mask = pad_rows([[1] * len(r) for r, _ in rows], 0).bool()
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([y for _, y in rows])}

    def loss(self, model, b: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
        dev = model.device
        mask = b["attention_mask"].to(dev)
        h = model.hidden(b["input_ids"].to(dev), mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        logits = model.head(self.name, (h * m).sum(1) / m.sum(1))  # masked mean, as TransformerClassifier
        y = b["labels"].to(dev)
        return F.cross_entropy(logits.float(), y), int((logits.argmax(-1) == y).sum()), len(y)


# -- teacher ----------------------------------------------------------------------------------
class KDTask(Task):
    """``kd``: causal token-level distillation from ``kd_store`` (held-out: ``kd_eval_store``)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        from kdstore import SoftLabelDataset  # noqa: PLC0415

        self.head_size = self.special.base
        self.train_ds = SoftLabelDataset(self.cfg.kd_store, batch_size=self.cfg.batch_size, seed=self.cfg.seed)
        self.eval_ds = SoftLabelDataset(self.cfg.kd_eval_store, batch_size=64, shuffle=False)
        self._it = None
        self._next_k = 0

    def position(self, k: int) -> None:
        """Make the next :meth:`batch` call return batch ``k``: epoch ``k // n``, batch ``k % n``
        of that epoch's order (the store's own resumable order). The dataset is iterated
        directly, not through a ``DataLoader``, whose iterator draws a seed from torch's global
        RNG when created: that would shift every later dropout mask of a resumed run."""
        epoch, j = divmod(k, self.train_ds.num_batches(0))
        self.train_ds.set_epoch(epoch)
        self.train_ds.start_batch = j
        self._it, self._next_k = iter(self.train_ds), k

    def batch(self, k: int) -> dict[str, Any]:
        if self._it is None or k != self._next_k:
            self.position(k)
        b = next(self._it, None)
        if b is None:  # epoch finished
            self.position(k)
            b = next(self._it)
        self._next_k = k + 1
        return b

    def eval_batches(self) -> list[dict[str, Any]]:
        if self._eval is None:
            self._eval, n = [], 0
            for b in self.eval_ds:
                self._eval.append(b)
                n += len(b["sample_id"])
                if n >= self.cfg.eval_examples:
                    break
        return self._eval

    def _logits(self, model, b: dict[str, Any]) -> torch.Tensor:
        if b["input_ids"].shape[1] > self.cfg.max_len:
            raise ValueError(f"kd store windows have {b['input_ids'].shape[1]} tokens > max_len={self.cfg.max_len}: "
                             f"raise max_len or capture with shorter windows")
        h = model.hidden(b["input_ids"], b["attention_mask"], causal=True)
        return model.head(self.name, h)  # [B, T, V]

    def loss(self, model, b: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
        b = {k: (v.to(model.device) if torch.is_tensor(v) else v) for k, v in b.items()}
        logits = self._logits(model, b)
        ce, kd = ce_and_sparse_kd_loss(logits, b["labels"], b["kd_indices"], b["kd_probs"], b["kd_tail"], b["kd_mask"],
                                       temperature=self.cfg.kd_temperature)
        loss = mix(ce, kd, self.cfg.kd_alpha)
        top = torch.gather(b["kd_indices"], -1, b["kd_probs"].argmax(-1, keepdim=True)).squeeze(-1)
        m = b["kd_mask"]
        agree = int(((logits.argmax(-1) == top) & m).sum())
        self._last = (float(ce.detach()), float(kd.detach()), int(m.sum()))
        return loss, agree, int(m.sum())

    @torch.no_grad()
    def evaluate(self, model) -> Result:
        agree = n = 0
        ce_sum = kd_sum = 0.0
        for b in self.eval_batches():
            _, c, k = self.loss(model, b)
            ce, kd, _ = self._last
            agree, n, ce_sum, kd_sum = agree + c, n + k, ce_sum + ce * k, kd_sum + kd * k
        return Result(metric=agree / max(n, 1), extras={"ce": ce_sum / max(n, 1), "kl": kd_sum / max(n, 1), "count": n})
