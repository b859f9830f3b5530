"""Settings of ``kd train cascade``: one flat config with ``key=value`` overrides
(parsed by :func:`trainer.core.config.apply_overrides`, the one parser of every recipe)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from trainer.classify.cascade_targets import SCORES
from trainer.classify.classifiers import ClassifierArch, ClassifierConfig
from trainer.classify.loop import LoopSpec
from trainer.core.config import FlatKeys, apply_overrides

__all__ = ["CascadeConfig", "StageConfig", "apply_overrides"]


@dataclass
class StageConfig(ClassifierArch):
    """One cascade model: its architecture (:class:`ClassifierArch`) and training length, batch
    size, learning rate, validation interval and plateau patience in validations (0 = run all
    steps). Spelled ``a_<key>`` / ``b_<key>`` / ``c_<key>`` on the command line."""

    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    eval_every: int = 100
    patience: int = 0


@dataclass
class CascadeConfig(FlatKeys):
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
    # model A, trained on (x, y)
    a: StageConfig = field(default_factory=lambda: StageConfig(
        arch="transformer", d_model=128, n_layers=2, n_heads=4, d_ff=256, dropout=0.1, lstm_hidden=128,
        cnn_channels=100, cnn_kernels="3,4,5", max_steps=3000, batch_size=32, lr=5e-4, eval_every=250, patience=3))
    # capture and split
    capture_k: int = 0  # classes kept per sample; 0 = all (exact scores and targets)
    capture_bits: int = 16
    capture_batch_size: int = 256
    capture_beam_args: str = ""  # extra Beam options, e.g. "--runner=PortableRunner --job_endpoint=..."
    # Temperature of A's and B's stores. Stored targets are never re-tempered: the student is
    # tempered by the stores' temperature and its KD terms scaled by T^2 (docs/format.md).
    capture_temperature: float = 2.0
    threshold: float = 0.5  # on A's stored probability of the gold label (at capture_temperature)
    score: str = "gold_prob"  # gold_prob | hit
    # model B (substandard samples only)
    b: StageConfig = field(default_factory=lambda: StageConfig(
        arch="bilstm", d_model=128, n_layers=1, n_heads=4, d_ff=256, dropout=0.1, lstm_hidden=128,
        cnn_channels=100, cnn_kernels="3,4,5", max_steps=600, batch_size=32, lr=1e-3, eval_every=100, patience=0))
    # student C
    c: StageConfig = field(default_factory=lambda: StageConfig(
        arch="textcnn", d_model=64, n_layers=1, n_heads=4, d_ff=128, dropout=0.3, lstm_hidden=64,
        cnn_channels=64, cnn_kernels="2,3,4", max_steps=4000, batch_size=64, lr=1e-3, eval_every=200, patience=4))
    c_teachers: str = "cascade"  # cascade (A for target, B for substandard) | a (A for all) | gold (no KD)
    c_w_gold: float = 1.0
    c_w_target: float = 1.0
    c_w_optimized: float = 1.0
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
        if self.capture_temperature <= 0:
            raise ValueError(f"capture_temperature must be > 0, got {self.capture_temperature}")
        if not self.c_out or "/" in self.c_out or self.c_out in ("a", "b", "data"):
            raise ValueError(f"c_out must be a plain directory name other than a, b, data; got {self.c_out!r}")

    def model_config(self, stage: str, *, vocab_size: int, num_classes: int) -> ClassifierConfig:
        return ClassifierConfig.from_dict({**asdict(getattr(self, stage)), "vocab_size": vocab_size,
                                           "num_classes": num_classes, "max_len": self.max_len})

    def loop_spec(self, stage: str, *, seed_offset: int, device: str, progress: bool) -> LoopSpec:
        """The shared classifier loop's settings for one stage (validation doubles as the log interval)."""
        st: StageConfig = getattr(self, stage)
        return LoopSpec(steps=st.max_steps, batch_size=st.batch_size, lr=st.lr, weight_decay=self.weight_decay,
                        warmup_steps=max(1, int(self.warmup * st.max_steps)), seed=self.seed + seed_offset,
                        eval_every=st.eval_every, patience=st.patience, min_delta=self.min_delta, device=device,
                        progress=progress, desc=f"stage {stage}")
