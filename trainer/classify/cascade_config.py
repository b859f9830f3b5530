"""Settings of ``kd train cascade``: one flat dataclass and ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from typing import Any, Sequence

from trainer.classify.cascade_targets import SCORES
from trainer.classify.cascade_train import FitSpec
from trainer.classify.classifiers import ClassifierConfig

_MODEL_FIELDS = ("arch", "d_model", "n_layers", "n_heads", "d_ff", "dropout", "lstm_hidden", "cnn_channels", "cnn_kernels")


@dataclass
class CascadeConfig:
    """All settings of a cascade run (flat; ``key=value`` overrides on the command line).

    Per-model keys are prefixed ``a_`` / ``b_`` / ``c_``: architecture (see
    :class:`trainer.classify.classifiers.ClassifierConfig`) and training (steps, batch size, learning
    rate, validation interval, plateau patience in validations; 0 = run all steps).
    """

    run_dir: str = "runs/cascade"
    # data
    data: str = "sentiment"  # "sentiment" or a .jsonl/.parquet file with text + label
    eval_data: str = ""
    test_data: str = ""
    text_field: str = "text"
    label_field: str = "label"
    train_limit: int = 0  # 0 = all (a fixed subset by content hash otherwise)
    eval_limit: int = 0
    test_limit: int = 0
    segmentation: str = "char"  # char | word | jieba
    vocab_min_freq: int = 2
    vocab_max_size: int = 20000
    max_len: int = 128  # tokens per text (longer texts are truncated)
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    threads: int = 0  # torch intra-op threads; 0 = torch's default (1 is fastest on a busy shared CPU)
    weight_decay: float = 0.01
    warmup: float = 0.05
    min_delta: float = 1e-3
    # model A
    a_arch: str = "transformer"
    a_d_model: int = 128
    a_n_layers: int = 2
    a_n_heads: int = 4
    a_d_ff: int = 256
    a_dropout: float = 0.1
    a_lstm_hidden: int = 128
    a_cnn_channels: int = 100
    a_cnn_kernels: str = "3,4,5"
    a_max_steps: int = 3000
    a_batch_size: int = 32
    a_lr: float = 5e-4
    a_eval_every: int = 250
    a_patience: int = 3
    # capture and split
    capture_k: int = 0  # classes kept per sample; 0 = all (exact scores and targets)
    capture_bits: int = 16
    capture_batch_size: int = 256
    capture_beam_args: str = ""  # extra Beam options, e.g. "--runner=PortableRunner --job_endpoint=..."
    threshold: float = 0.5
    score: str = "gold_prob"  # gold_prob | hit
    # model B (substandard samples only)
    b_arch: str = "bilstm"
    b_d_model: int = 128
    b_n_layers: int = 1
    b_n_heads: int = 4
    b_d_ff: int = 256
    b_dropout: float = 0.1
    b_lstm_hidden: int = 128
    b_cnn_channels: int = 100
    b_cnn_kernels: str = "3,4,5"
    b_max_steps: int = 600
    b_batch_size: int = 32
    b_lr: float = 1e-3
    b_eval_every: int = 100
    b_patience: int = 0
    # student C
    c_arch: str = "textcnn"
    c_d_model: int = 64
    c_n_layers: int = 1
    c_n_heads: int = 4
    c_d_ff: int = 128
    c_dropout: float = 0.3
    c_lstm_hidden: int = 64
    c_cnn_channels: int = 64
    c_cnn_kernels: str = "2,3,4"
    c_max_steps: int = 4000
    c_batch_size: int = 64
    c_lr: float = 1e-3
    c_eval_every: int = 200
    c_patience: int = 4
    c_teachers: str = "cascade"  # cascade (A for target, B for substandard) | a (A for all) | gold (no KD)
    c_w_gold: float = 1.0
    c_w_target: float = 1.0
    c_w_optimized: float = 1.0
    c_temperature: float = 2.0
    c_out: str = "c"  # output sub-directory of stage C (several students can share A and B)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.c_teachers not in ("cascade", "a", "gold"):
            raise ValueError(f"c_teachers must be cascade, a or gold, got {self.c_teachers!r}")
        if self.capture_bits not in (8, 16):
            raise ValueError(f"capture_bits must be 8 or 16, got {self.capture_bits}")
        if self.segmentation not in ("char", "word", "jieba"):
            raise ValueError(f"segmentation must be char, word or jieba (deterministic), got {self.segmentation!r}")
        if self.c_temperature <= 0:
            raise ValueError(f"c_temperature must be > 0, got {self.c_temperature}")
        if not self.c_out or "/" in self.c_out or self.c_out in ("a", "b", "data"):
            raise ValueError(f"c_out must be a plain directory name other than a, b, data; got {self.c_out!r}")

    def model_config(self, stage: str, *, vocab_size: int, num_classes: int) -> ClassifierConfig:
        kw = {f: getattr(self, f"{stage}_{f}") for f in _MODEL_FIELDS}
        return ClassifierConfig(vocab_size=vocab_size, num_classes=num_classes, max_len=self.max_len, **kw)

    def fit_spec(self, stage: str, *, seed_offset: int) -> FitSpec:
        g = lambda k: getattr(self, f"{stage}_{k}")  # noqa: E731
        return FitSpec(max_steps=g("max_steps"), batch_size=g("batch_size"), lr=g("lr"), eval_every=g("eval_every"),
                       patience=g("patience"), min_delta=self.min_delta, weight_decay=self.weight_decay,
                       warmup=self.warmup, seed=self.seed + seed_offset)


def _coerce(ftype: Any, key: str, value: str) -> Any:
    name = ftype if isinstance(ftype, str) else getattr(ftype, "__name__", str(ftype))
    try:
        if name == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if name == "int":
            return int(value)
        if name == "float":
            return float(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: expected a {name}") from None
    return value


def apply_overrides(cfg: CascadeConfig, overrides: Sequence[str]) -> CascadeConfig:
    """``["key=value", ...]`` -> a new config; unknown keys raise with the closest names."""
    types = {f.name: f.type for f in fields(CascadeConfig)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        if key not in types:
            close = difflib.get_close_matches(key, types, n=3)
            raise ValueError(f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        changes[key] = _coerce(types[key], key, value.strip())
    return dataclasses.replace(cfg, **changes)
