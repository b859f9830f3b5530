"""Small text classifiers built from one flat config, with one interface:

    ``model(input_ids [B, T] long, attention_mask [B, T] bool/long) -> logits [B, C] float``

* ``transformer``: a BERT encoder from ``transformers.BertConfig`` (absolute positions, so
  ``max_len`` bounds T), masked mean pooling over valid positions, dropout, linear head.
* ``bilstm``: embedding, bidirectional LSTM over packed sequences, masked max pooling, head.
* ``textcnn``: Kim (2014): embedding, parallel 1-D convolutions of several widths, ReLU,
  max over time, dropout, head.

All three ignore padding: the logits of a sequence do not change when more ``[PAD]`` positions
are appended (tested). Models are saved as a ``state_dict`` plus a JSON config and loaded back
with ``torch.load(weights_only=True)``; :class:`TextClassifier` bundles a model with its
vocabulary and segmentation for inference on raw text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("transformer", "bilstm", "textcnn")
BUNDLE_FORMAT = "kdstore.classifier.v1"


@dataclass
class ClassifierArch:
    """Architecture hyper-parameters: the one copy of the classifier fields that every
    classifier recipe's config has (R-Drop's flat keys, each cascade model's ``a_``/``b_``/``c_``
    keys). Unused fields are ignored by the other archs."""

    arch: str = "transformer"
    d_model: int = 128  # embedding / hidden width
    n_layers: int = 2  # transformer blocks or LSTM layers
    n_heads: int = 4  # transformer
    d_ff: int = 256  # transformer feed-forward width
    dropout: float = 0.1  # hidden dropout everywhere; attention dropout in the transformer
    lstm_hidden: int = 128  # per direction
    cnn_kernels: str = "3,4,5"  # TextCNN widths, comma-separated
    cnn_channels: int = 100  # TextCNN feature maps per width


@dataclass
class ClassifierConfig(ClassifierArch):
    """A model's full config: its architecture plus the data-given sizes."""

    vocab_size: int = 8000
    num_classes: int = 2
    pad_id: int = 0
    max_len: int = 128  # transformer positions (longest input in tokens)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}: choose from {ARCHS}")
        for name in ("vocab_size", "num_classes", "d_model", "n_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.arch == "transformer" and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.kernel_sizes()  # validate early

    def kernel_sizes(self) -> tuple[int, ...]:
        try:
            ks = tuple(int(k) for k in str(self.cnn_kernels).split(",") if k.strip())
        except ValueError:
            raise ValueError(f"cnn_kernels must be comma-separated ints, got {self.cnn_kernels!r}") from None
        if not ks or min(ks) < 1:
            raise ValueError(f"cnn_kernels must name at least one width >= 1, got {self.cnn_kernels!r}")
        return ks

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClassifierConfig":
        """Build from a mapping, ignoring keys that are not fields (e.g. a trainer config)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _valid_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int) -> torch.Tensor:
    """[B, T] bool mask of real tokens; rejects rows without any."""
    mask = (input_ids != pad_id) if attention_mask is None else attention_mask.bool()
    if input_ids.dim() != 2 or mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, T]; got {tuple(input_ids.shape)}, {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every sequence needs at least one valid position (empty text?)")
    return mask


def transformer_encoder(config: ClassifierConfig) -> nn.Module:
    """The project's transformer encoder: a ``transformers.BertModel`` (no pooler) sized by
    ``config`` (``d_model``, ``n_layers``, ``n_heads``, ``d_ff``, ``max_len``, ``dropout``).
    ``encoder(input_ids [B, T], attention_mask [B, T] or [B, 1, T, T] bool).last_hidden_state``
    is ``[B, T, d_model]``; the 4-D mask form gives e.g. causal attention."""
    from transformers import BertConfig, BertModel  # noqa: PLC0415 - import cost

    bert_cfg = BertConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.d_ff,
        max_position_embeddings=config.max_len,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        pad_token_id=config.pad_id,
        type_vocab_size=1,
    )
    return BertModel(bert_cfg, add_pooling_layer=False)


class TransformerClassifier(nn.Module):
    """BERT-style encoder (:func:`transformer_encoder`) + masked mean pooling + head."""

    def __init__(self, *, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = transformer_encoder(config)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.d_model, config.num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _valid_mask(input_ids, attention_mask, self.config.pad_id)
        if input_ids.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_len={self.config.max_len}: truncate inputs")
        h = self.encoder(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # [B, T, D]
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)  # mean over valid positions, [B, D]
        return self.head(self.dropout(pooled))


class BiLSTMClassifier(nn.Module):
    """Embedding -> BiLSTM (packed, so padding is never read) -> masked max pooling -> head."""

    def __init__(self, *, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.lstm = nn.LSTM(
            config.d_model,
            config.lstm_hidden,
            num_layers=config.n_layers,
            batch_first=True,
            bidirectional=True,
            dropout=config.dropout if config.n_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(2 * config.lstm_hidden, config.num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _valid_mask(input_ids, attention_mask, self.config.pad_id)
        lengths = mask.sum(1)
        x = self.dropout(self.embed(input_ids))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        out = out.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        pooled = out.max(dim=1).values  # [B, 2H]
        return self.head(self.dropout(pooled))


class TextCNNClassifier(nn.Module):
    """Kim (2014) TextCNN: convolutions of several widths, ReLU, max over time, dropout, head.

    Padding invariance: embeddings of pad positions are zeroed and the input is right-padded
    with ``max(width) - 1`` zeros, so the window starting at each real position sees the same
    values however much padding follows; windows starting on padding are masked out of the max.
    """

    def __init__(self, *, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.kernels = config.kernel_sizes()
        self.embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=config.pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(config.d_model, config.cnn_channels, k) for k in self.kernels)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.cnn_channels * len(self.kernels), config.num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _valid_mask(input_ids, attention_mask, self.config.pad_id)
        x = self.embed(input_ids) * mask.unsqueeze(-1).to(torch.float32)  # [B, T, D]
        x = F.pad(x.transpose(1, 2), (0, max(self.kernels) - 1))  # [B, D, T + kmax - 1]
        t = input_ids.shape[1]
        feats = []
        for conv in self.convs:
            h = F.relu(conv(x))[:, :, :t]  # window starting at each position, [B, C, T]
            h = h.masked_fill(~mask.unsqueeze(1), float("-inf"))
            feats.append(h.max(dim=2).values)
        return self.head(self.dropout(torch.cat(feats, dim=1)))


_MODELS = {"transformer": TransformerClassifier, "bilstm": BiLSTMClassifier, "textcnn": TextCNNClassifier}


def build_classifier(config: ClassifierConfig) -> nn.Module:
    """The classifier named by ``config.arch``."""
    return _MODELS[config.arch](config=config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_classifier(
    directory: str | Path, model: nn.Module, config: ClassifierConfig, *, extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model.pt`` (state_dict) and ``classifier.json`` (config + ``extra``) into
    ``directory``; returns the directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / "model.pt")
    meta = {"format": BUNDLE_FORMAT, "config": asdict(config), "extra": extra or {}}
    (d / "classifier.json").write_text(json.dumps(meta, ensure_ascii=False, indent=2), encoding="utf-8")
    return d


def load_classifier(
    directory: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ClassifierConfig, dict[str, Any]]:
    """Inverse of :func:`save_classifier`: (model in eval mode, config, extra)."""
    d = Path(directory)
    meta_path = d / "classifier.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{d}: no classifier.json here; expected a directory written by save_classifier")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{meta_path}: unsupported format {meta.get('format')!r}; this version reads {BUNDLE_FORMAT!r}")
    config = ClassifierConfig(**meta["config"])
    model = build_classifier(config)
    state = torch.load(d / "model.pt", map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, config, meta.get("extra", {})


class TextClassifier:
    """A trained classifier with its vocabulary and segmentation: raw text in, probabilities out.

    Saved as a directory: ``model.pt`` + ``classifier.json`` (see :func:`save_classifier`) +
    ``vocab.json``; ``classifier.json``'s ``extra`` holds ``segmentation`` (``char``, ``word``
    or ``jieba``), ``max_len`` and ``label_names``.
    """

    def __init__(self, *, model: nn.Module, config: ClassifierConfig, vocab, segmentation: str, max_len: int,
                 label_names: tuple[str, ...]) -> None:
        from trainer.classify.segment import SegmentationSampler  # noqa: PLC0415

        if segmentation not in {"char", "word", "jieba"}:
            raise ValueError(f"inference segmentation must be deterministic (char/word/jieba), got {segmentation!r}")
        self.model = model.eval()
        self.config = config
        self.vocab = vocab
        self.segmentation = segmentation
        self.max_len = max_len
        self.label_names = tuple(label_names)
        self._sampler = SegmentationSampler(granularities=(segmentation,))

    @classmethod
    def load(cls, directory: str | Path) -> "TextClassifier":
        from trainer.classify.segment import Vocab  # noqa: PLC0415

        model, config, extra = load_classifier(directory)
        return cls(
            model=model,
            config=config,
            vocab=Vocab.load(Path(directory) / "vocab.json"),
            segmentation=extra.get("segmentation", "char"),
            max_len=int(extra.get("max_len", config.max_len)),
            label_names=tuple(extra.get("label_names", [str(i) for i in range(config.num_classes)])),
        )

    def save(self, directory: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        info = {"segmentation": self.segmentation, "max_len": self.max_len, "label_names": list(self.label_names)}
        d = save_classifier(directory, self.model, self.config, extra={**info, **(extra or {})})
        self.vocab.save(d / "vocab.json")
        return d

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids and mask, both [B, T]."""
        return pad_batch(self.encode_rows(texts), pad_id=self.vocab.pad_id)

    def predict_proba(self, texts: list[str], *, batch_size: int = 128) -> torch.Tensor:
        """Class probabilities, float32 [N, C] on CPU."""
        rows = self.encode_rows(texts)
        return predict_proba_ids(self.model, rows, num_classes=self.config.num_classes, batch_size=batch_size,
                                 pad_id=self.vocab.pad_id)

    def encode_rows(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text (segmented, backed off, truncated to ``max_len``)."""
        import random  # noqa: PLC0415

        rng = random.Random(0)  # deterministic granularities ignore it
        rows = []
        for i, text in enumerate(texts):
            if not text:
                raise ValueError(f"text #{i} is empty: a classifier needs at least one character")
            rows.append(self.vocab.encode(self._sampler.segment(text, self.segmentation, rng=rng), max_len=self.max_len))
        return rows


@torch.no_grad()
def predict_proba_ids(
    model: nn.Module, rows: list[list[int]], *, num_classes: int, batch_size: int = 128, pad_id: int = 0
) -> torch.Tensor:
    """Class probabilities [N, C] (float32, CPU) for pre-encoded id lists, in eval mode.

    Rows are batched in length order (less padding) and returned in input order; the model's
    training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = torch.empty(len(rows), num_classes)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = pad_batch([rows[i] for i in idx], pad_id=pad_id)
        logits = model(ids.to(device), mask.to(device))
        probs[torch.tensor(idx, dtype=torch.long)] = torch.softmax(logits.float(), dim=-1).cpu()
    model.train(was_training)
    return probs


def classification_metrics(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class ids [N] against labels [N] (F1 averaged over
    the classes that occur in labels or predictions)."""
    acc = float((pred == labels).float().mean())
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (labels == c)).sum())
        fp = int(((pred == c) & (labels != c)).sum())
        fn = int(((pred != c) & (labels == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"acc": acc, "f1": sum(f1s) / max(len(f1s), 1)}


def pad_batch(rows: list[list[int]], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest: (input_ids [B, T] long, attention_mask [B, T] bool)."""
    if not rows or min(len(r) for r in rows) == 0:
        raise ValueError("pad_batch needs a non-empty batch of non-empty sequences")
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    mask = torch.arange(t).unsqueeze(0) < torch.tensor([len(r) for r in rows]).unsqueeze(1)
    return ids, mask
