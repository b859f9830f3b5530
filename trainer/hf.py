"""Distil from a store inside Hugging Face ``transformers.Trainer`` (and TRL trainers built on it).

Use with :class:`kdstore.collate.StoreCollator`, which joins the user's dataset to the store
by ``sample_id`` and adds ``kd_indices``/``kd_probs``/``kd_tail``/``kd_mask`` to each batch::

    trainer = KDTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                        data_collator=store_collator(store_uri, tokenizer), kd_weight=0.5)
    trainer.train()

The loss is ``(1 - a) * CE + a * KD`` from :mod:`trainer.core.losses` (the same functions as
``kd train student``): CE against the shifted ``labels`` (Hugging Face convention: the
collator's ``labels`` are unshifted; position t of the logits is scored against label t+1) and
the sparse KD term over ``kd_mask`` (the store's position t already targets the token after
t). Both are fp32 means over their valid positions of the micro-batch.

Why a subclass and not ``Trainer(compute_loss_func=...)``: the Trainer calls
``compute_loss_func(outputs, labels, num_items_in_batch)``, so the function never sees the
batch's KD targets, and ``model(**inputs)`` would receive the ``kd_*`` keys. The subclass pops
them before the forward pass; :func:`kd_loss_from_batch` is the loss for any other loop.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from kdstore.collate import StoreCollator, StoreOrderSampler
from trainer.core.losses import IGNORE_INDEX, ce_and_stored_kd_loss, mix

KD_LOSSES = ("forward", "reverse", "symmetric", "jsd")
# Batch keys the model must not receive (collator outputs that only the loss reads).
_LOSS_ONLY = ("kd_indices", "kd_probs", "kd_tail", "kd_mask", "kd_counts", "sample_id", "window", "labels")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face causal-LM labels ``[B, L]`` (unshifted) -> next-token labels ``[B, L]``:
    position t gets label t+1; the last position gets ``-100``."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def kd_loss_from_batch(
    logits: torch.Tensor,
    batch: dict[str, Any],
    *,
    kd_weight: float = 0.5,
    kd_loss: str = "forward",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail_bucket: bool = True,
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kd)`` for student ``logits [B, L, V]`` and a :class:`StoreCollator` batch.

    ``kd_loss``: ``forward`` / ``reverse`` / ``symmetric`` KL (:func:`sparse_kd_loss`) or
    ``jsd`` (:func:`sparse_jsd_loss` with ``beta``). ``temperature`` divides the student's
    logits only (stored targets are never re-tempered) and the KD term is scaled by ``T**2``.
    """
    if kd_loss not in KD_LOSSES:
        raise ValueError(f"kd_loss must be one of {KD_LOSSES}, got {kd_loss!r}")
    labels = batch.get("shift_labels")
    if labels is None:
        labels = shift_labels(batch["labels"])
    ce, kd = ce_and_stored_kd_loss(logits, labels, batch["kd_indices"], batch["kd_probs"], batch["kd_tail"], batch["kd_mask"],
                                   kind=kd_loss, beta=beta, temperature=temperature, tail_bucket=tail_bucket,
                                   chunk_size=chunk_size)
    return mix(ce, kd, kd_weight), ce, kd


class KDLossMixin:
    """``compute_loss`` for any ``transformers.Trainer`` subclass (``Trainer``, TRL's ``SFTTrainer``):
    mix CE and sparse KD from the batch's stored targets. Keyword arguments as
    :func:`kd_loss_from_batch`; ``ce`` and ``kd`` are logged next to ``loss``. ``store_order=True``
    shuffles with :class:`kdstore.collate.StoreOrderSampler` (blocks of 8 of the store's row
    groups; an int sets the block size) instead of uniformly: use it when the store is larger
    than the collator's cache, with ``cache_bytes`` holding one block."""

    # The loss is a mean over one micro-batch: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, kd_weight: float = 0.5, kd_loss: str = "forward", beta: float = 0.5,
                 temperature: float = 1.0, tail_bucket: bool = True, loss_chunk: int = 0, store_order: bool | int = False,
                 **kwargs: Any) -> None:
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
        if kd_loss not in KD_LOSSES:
            raise ValueError(f"kd_loss must be one of {KD_LOSSES}, got {kd_loss!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.kd_options = dict(kd_weight=kd_weight, kd_loss=kd_loss, beta=beta, temperature=temperature,
                               tail_bucket=tail_bucket, chunk_size=loss_chunk)
        self._kd_logged: dict[str, list[float]] = {"ce": [], "kd": []}
        self.store_order = store_order
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        # store_order=True: shuffle by blocks of the store's row groups (StoreOrderSampler), so a
        # store larger than the collator's cache is read about once per epoch, not once per example.
        if not self.store_order:
            return super()._get_train_sampler(train_dataset)
        ds = self.train_dataset if train_dataset is None else train_dataset
        if not isinstance(self.data_collator, StoreCollator):
            raise TypeError("store_order=True needs data_collator to be a kdstore.collate.StoreCollator")
        cols = getattr(ds, "column_names", None)
        if cols is not None:  # datasets.Dataset: read the key columns without decoding the rows
            sids, wins = ds["sample_id"], (ds["window"] if "window" in cols else None)
        else:
            sids, wins = [ex["sample_id"] for ex in ds], [int(ex.get("window", 0)) for ex in ds]
        blocks = 8 if self.store_order is True else int(self.store_order)
        return StoreOrderSampler(self.data_collator, sids, wins, seed=self.args.seed, block_groups=blocks)

    def _set_signature_columns_if_needed(self) -> None:
        # Keep the join keys: the default column removal would drop them before the collator.
        super()._set_signature_columns_if_needed()
        for col in ("sample_id", "window"):
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        missing = [k for k in ("kd_indices", "kd_probs", "kd_tail", "kd_mask", "labels") if k not in inputs]
        if missing:
            raise KeyError(f"batch has no {missing}: use kdstore.collate.StoreCollator as the data_collator")
        batch = {k: inputs[k] for k in _LOSS_ONLY + ("shift_labels",) if k in inputs}
        model_inputs = {k: v for k, v in inputs.items() if k not in _LOSS_ONLY and k != "shift_labels"}
        outputs = model(**model_inputs)
        loss, ce, kd = kd_loss_from_batch(outputs.logits, batch, **self.kd_options)
        if model.training:
            self._kd_logged["ce"].append(float(ce.detach()))
            self._kd_logged["kd"].append(float(kd.detach()))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:  # noqa: D102
        if "loss" in logs and self._kd_logged["ce"]:
            for k, v in self._kd_logged.items():
                logs[k] = sum(v) / len(v)
                v.clear()
        super().log(logs, *args, **kwargs)


class KDTrainer(KDLossMixin, Trainer):
    """``transformers.Trainer`` that distils from a store (see the module docstring)."""
