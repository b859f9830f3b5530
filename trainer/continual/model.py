"""The shared encoder with one head per task.

The encoder is the project's transformer classifier (:class:`~trainer.classify.classifiers.
TransformerClassifier`, a BERT encoder): its ``encoder`` is shared by every task; its own
classification ``head`` is not trained here (fine-tuning replaces it), so it stays out of the
optimizer. Heads are linear layers on dropout of the hidden states: token-level heads read
``[B, T, D]``, word-level heads the word-pooled ``[B, W, D]``, sentence heads the masked mean
``[B, D]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.classify.classifiers import ClassifierConfig, TransformerClassifier, load_classifier, save_classifier


class ContinualModel(nn.Module):
    def __init__(self, *, config: ClassifierConfig, heads: dict[str, int]) -> None:
        super().__init__()
        if config.arch != "transformer":
            raise ValueError("the continual encoder is the transformer classifier (arch=transformer)")
        self.config = config
        self.backbone = TransformerClassifier(config=config)
        self.heads = nn.ModuleDict({name: nn.Linear(config.d_model, size) for name, size in heads.items()})

    @property
    def device(self) -> torch.device:
        return self.backbone.head.weight.device

    def trained_parameters(self) -> list[nn.Parameter]:
        """Encoder + task heads (the backbone's placeholder classification head is left out)."""
        return list(self.backbone.encoder.parameters()) + list(self.heads.parameters())

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, causal: bool = False) -> torch.Tensor:
        """Hidden states ``[B, T, D]``; ``causal`` restricts position t to positions <= t."""
        mask = attention_mask.bool()
        if causal:
            t = input_ids.shape[1]
            tri = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
            mask = (tri[None] & mask[:, None, :])[:, None]  # [B, 1, T, T], True = attend
        out = self.backbone.encoder(input_ids=input_ids, attention_mask=mask if causal else mask.long())
        return self.backbone.dropout(out.last_hidden_state)

    def head(self, name: str, h: torch.Tensor) -> torch.Tensor:
        return self.heads[name](h)


def save_encoder(directory: str | Path, model: ContinualModel, *, extra: dict[str, Any]) -> Path:
    """The encoder as a classifier bundle (``load_classifier`` reads it; its head is an
    untrained placeholder that :func:`load_encoder` replaces)."""
    return save_classifier(directory, model.backbone, model.config, extra={"pretrained": "kd train continual", **extra})


def load_encoder(directory: str | Path, *, num_classes: int, seed: int = 0) -> tuple[TransformerClassifier, dict[str, Any]]:
    """A :class:`TransformerClassifier` with the pre-trained encoder and a fresh ``num_classes``
    head (initialised from ``seed``), in train mode; and the bundle's ``extra``."""
    model, config, extra = load_classifier(directory)
    if "special_ids" not in extra:
        raise ValueError(f"{directory}: not an encoder saved by kd train continual (no special_ids in classifier.json)")
    torch.manual_seed(seed)
    model.head = nn.Linear(config.d_model, num_classes)
    model.config = ClassifierConfig.from_dict({**config.__dict__, "num_classes": num_classes})
    return model.train(), extra
