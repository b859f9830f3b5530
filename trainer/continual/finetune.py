"""Downstream fine-tuning of a continual encoder, against the same encoder from random init.

* ``sentiment``: product-review polarity (:func:`trainer.data.corpora.sentiment`), the
  encoder's masked-mean pooling + a linear head (:class:`TransformerClassifier` as is);
  metric: test accuracy.
* ``pos``: People's Daily POS tagging with the gold tags; each gold word is the mean of its
  tokens' hidden states (words and BPE tokens do not nest) + a linear head over the tag set
  of the training articles; metric: word accuracy on the test articles (tags never seen in
  training are counted as errors).

Text is tokenized with the encoder's tokenizer (the one the pre-training used); a
from-scratch run uses the same tokenizer, architecture and steps (``encoder`` empty +
``model_from`` naming an encoder directory for its config, or the dims below).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.classify.classifiers import ClassifierConfig, TransformerClassifier, load_classifier
from trainer.continual.model import load_encoder
from trainer.continual.tasks import batch_rng, pad_rows, word_pool
from trainer.continual.text import encode_lines, load_tokenizer
from trainer.core.losses import IGNORE_INDEX


@dataclass
class FinetuneConfig:
    """Flat; ``key=value`` overrides."""

    task: str = "sentiment"  # sentiment | pos
    encoder: str = ""  # pre-trained encoder directory ("" = random init: the baseline)
    model_from: str = ""  # random init: copy the architecture and tokenizer from this encoder directory
    tokenizer: str = ""  # random init without model_from
    steps: int = 300
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    train_limit: int = 4000  # training examples (sentences for pos)
    eval_limit: int = 2000
    seed: int = 0
    device: str = "cpu"


def _model(cfg: FinetuneConfig, num_classes: int) -> tuple[TransformerClassifier, dict[str, Any]]:
    if cfg.encoder:
        return load_encoder(cfg.encoder, num_classes=num_classes, seed=cfg.seed)
    if not cfg.model_from:
        raise ValueError("from-scratch fine-tuning needs model_from=ENCODER_DIR (architecture and tokenizer to match)")
    _, config, extra = load_classifier(cfg.model_from)
    torch.manual_seed(cfg.seed)
    config = ClassifierConfig.from_dict({**config.__dict__, "num_classes": num_classes})
    return TransformerClassifier(config=config).train(), extra


def _sentiment_rows(tok, cls_id: int, max_len: int, split: str, limit: int, seed: int):
    from trainer.data.corpora import sentiment  # noqa: PLC0415

    rows = sentiment(split)
    random.Random(seed).shuffle(rows)  # the file lists all negatives first
    rows = rows[:limit]
    ids = tok([r.text for r in rows], add_special_tokens=False)["input_ids"]
    return [[cls_id] + x[: max_len - 1] for x in ids], [r.label for r in rows]


def _pos_rows(tok, max_len: int, split: str, limit: int, seed: int):
    from trainer.data.corpora import peoples_daily_documents  # noqa: PLC0415

    sents = [s for d in peoples_daily_documents(split) for s in d.lines]
    random.Random(seed).shuffle(sents)
    lines = encode_lines(tok, sents[:limit])
    out = []
    for ln in lines:
        keep = [(sp, t) for sp, t in zip(ln.word_spans, ln.tags) if sp[1] <= max_len and sp[1] > sp[0]]
        if keep:
            out.append((list(ln.ids[:max_len]), [sp for sp, _ in keep], [t for _, t in keep]))
    return out


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train ``cfg.steps`` steps; returns ``{"task", "metric", "pretrained", ...}`` (test split)."""
    if cfg.task not in ("sentiment", "pos"):
        raise ValueError(f"unknown downstream task {cfg.task!r}: sentiment or pos")
    src = cfg.encoder or cfg.model_from
    if src:
        _, _, extra0 = load_classifier(src)
        tok_path = extra0.get("tokenizer") or cfg.tokenizer
        special = extra0.get("special_ids")
    else:
        raise ValueError("set encoder=DIR (pre-trained) or model_from=DIR (random init with that architecture)")
    tok = load_tokenizer(tok_path)
    max_len = int(extra0.get("max_len", 128))
    cls_id = int(special["base"]) + 1
    pad = int(special["pad"])
    if cfg.task == "sentiment":
        tr_x, tr_y = _sentiment_rows(tok, cls_id, max_len, "train", cfg.train_limit, cfg.seed)
        te_x, te_y = _sentiment_rows(tok, cls_id, max_len, "test", cfg.eval_limit, 0)
        model, _ = _model(cfg, 2)
    else:
        tr = _pos_rows(tok, max_len, "train", cfg.train_limit, cfg.seed)
        te = _pos_rows(tok, max_len, "test", cfg.eval_limit, 0)
        tags = sorted({t for _, _, ts in tr for t in ts})
        index = {t: i for i, t in enumerate(tags)}
        model, _ = _model(cfg, len(tags))
    model = model.to(cfg.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    from transformers import get_linear_schedule_with_warmup  # noqa: PLC0415

    sched = get_linear_schedule_with_warmup(opt, min(30, cfg.steps // 10), cfg.steps)

    def pos_batch(rows):
        ids = pad_rows([r[0] for r in rows], pad)
        mask = pad_rows([[1] * len(r[0]) for r in rows], 0).bool()
        w = max(len(r[1]) for r in rows)
        spans = torch.zeros((len(rows), w, 2), dtype=torch.long)
        y = torch.full((len(rows), w), IGNORE_INDEX, dtype=torch.long)
        for i, (_, sp, ts) in enumerate(rows):
            spans[i, : len(sp)] = torch.tensor(sp)
            y[i, : len(ts)] = torch.tensor([index.get(t, len(tags)) for t in ts])  # unseen tag: never predicted
        return ids, mask, spans, y

    def pos_logits(ids, mask, spans):
        h = model.encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return model.head(model.dropout(word_pool(h, spans)))

    for k in range(cfg.steps):
        rng = batch_rng(cfg.seed, f"finetune-{cfg.task}", k)
        if cfg.task == "sentiment":
            idx = [rng.randrange(len(tr_x)) for _ in range(cfg.batch_size)]
            ids = pad_rows([tr_x[i] for i in idx], pad).to(cfg.device)
            mask = pad_rows([[1] * len(tr_x[i]) for i in idx], 0).bool().to(cfg.device)
            loss = F.cross_entropy(model(ids, mask).float(), torch.tensor([tr_y[i] for i in idx], device=cfg.device))
        else:
            ids, mask, spans, y = (t.to(cfg.device) for t in pos_batch([tr[rng.randrange(len(tr))] for _ in range(cfg.batch_size)]))
            logits = pos_logits(ids, mask, spans)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        if cfg.task == "sentiment":
            for s in range(0, len(te_x), 128):
                xs = te_x[s : s + 128]
                ids = pad_rows(xs, pad).to(cfg.device)
                mask = pad_rows([[1] * len(x) for x in xs], 0).bool().to(cfg.device)
                pred = model(ids, mask).argmax(-1).cpu()
                correct += int((pred == torch.tensor(te_y[s : s + 128])).sum())
                total += len(xs)
        else:
            for s in range(0, len(te), 64):
                ids, mask, spans, y = (t.to(cfg.device) for t in pos_batch(te[s : s + 64]))
                pred = pos_logits(ids, mask, spans).argmax(-1)
                valid = y != IGNORE_INDEX
                correct += int(((pred == y) & valid).sum())
                total += int(valid.sum())
    return {"task": cfg.task, "metric": correct / max(total, 1), "count": total, "pretrained": bool(cfg.encoder),
            "encoder": cfg.encoder or None, "steps": cfg.steps, "seed": cfg.seed}
