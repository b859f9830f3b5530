"""One flat training config (a dataclass) with ``key=value`` overrides.

Every knob of ``kd train student`` / ``kd train lm`` is a field of :class:`TrainConfig`;
the same flat dict is printed at start-up, written to ``config.json`` and saved in every
checkpoint, so a run can be reproduced from any of its checkpoints. Overrides are plain
``key=value`` strings coerced to the field's type (``bool`` accepts true/false/1/0/yes/no).

:func:`apply_overrides`, :func:`to_dict`, :func:`from_dict` and :func:`format_config` serve
every recipe's config (``kd train student|lm|rdrop|cascade``): one parser, one spelling rule.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, fields
from typing import Any, Iterable, TypeVar

C = TypeVar("C")

# Third vocabularies a student with its own tokenizer can build at start-up (docs/alignment.md §3).
XTOK_VOCABS = ("continuation", "first_piece")
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


@dataclass
class TrainConfig:
    """Flat config of one training run (student distillation or plain CE training).

    Data comes from ``store`` (a soft-label store: ``kd train student``) or from
    ``train_text`` (raw text, CE only or with an online teacher: ``kd train lm``).
    """

    # -- data ------------------------------------------------------------------------------
    store: str = ""  # soft-label store URI (token level)
    train_text: str = ""  # text source: peoples_daily:<split> | sentiment:<split> | file.txt | file.jsonl
    eval_data: str = ""  # held-out data: a store URI or a text source (as train_text)
    eval_teacher: str = ""  # HF model dir: full-vocabulary KL to it on text eval data ("" = online_teacher)
    tokenizer: str = ""  # student tokenizer dir; with a store: one different from the teacher's trains on its own tokenization
    align: str = ""  # third-vocabulary file for tokenizer= (kd store align-build); "" = built at start-up
    xtok_targets: str = "boundary"  # cross-tokenizer targets: boundary | groups (1:n group targets) | chain (GOLD merge) | path (n:1 realized path)
    xtok_vocab: str = "continuation"  # third vocabulary built at start (no align=): continuation | first_piece (docs/alignment.md §3)
    teacher_segmentation_align: str = ""  # OLD path: the student reads teacher tokens mapped by this alignment (extend)
    seq_len: int = 128  # tokens per training window for text sources (the store defines its own)
    shuffle_block: int = 4  # store shards shuffled together
    pack: bool = True  # store batches: pack each batch's rows into fewer sequences (document-masked; same rows, less padding)
    num_workers: int = 0  # DataLoader workers for the store
    record_samples: bool = False  # write sample_id:window of every batch row to samples-rank<r>.txt (audit)

    # -- model -----------------------------------------------------------------------------
    model: str = "student-tiny"  # preset name, JSON file (preset + overrides or a HF config), or HF model dir
    init_from: str = ""  # HF model dir to start from instead of a fresh init
    pad_vocab_multiple: int = 64  # round a fresh model's vocabulary up to this multiple

    # -- loss ------------------------------------------------------------------------------
    kd_weight: float = 0.5  # a in loss = (1 - a) * CE + a * KD
    kd_loss: str = "forward"  # forward | reverse | symmetric | jsd (generalized JSD, TRL GKD's; stores only)
    kd_beta: float = 0.5  # jsd: teacher weight of the mixture (0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0  # student (and online teacher) temperature; KD term scaled by T^2
    tail_bucket: bool = True  # sparse KL over kept entries + a (k+1)-th bucket for the tail mass
    loss_chunk: int = 0  # positions per loss chunk (bounds fp32 [N, V] memory); 0 = one chunk
    fused_head: bool = False  # store KD: LM head + CE + KD fused per chunk of loss_chunk (default 1024) positions, never [N, V] logits
    online_teacher: str = ""  # HF model dir run every step (full-vocabulary KL baseline)

    # -- optimisation ----------------------------------------------------------------------
    max_steps: int = 200  # optimizer steps (the schedule's length)
    batch_size: int = 32  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    lr_embed_mult: float = 1.0  # learning-rate multiplier of the (input/output) embeddings
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    clip_norm: float = 1.0  # 0 disables clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast; losses always in fp32) | auto (bf16 where native)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = default (split between local DDP ranks)

    # -- loop ------------------------------------------------------------------------------
    out_dir: str = "runs/student"
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 0  # 0 = the whole held-out set
    eval_batch_size: int = 32
    eval_kl: str = "every"  # every | final: evaluations that also run eval_teacher (final: one teacher pass per run)
    eval_bpc_docs: int = 500  # held-out text documents scored in bits per character at the end (0 = off)
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    stop_at: int = 0  # stop (with a checkpoint) after this step without finishing; 0 = run to max_steps
    resume: str = ""  # checkpoint file or run directory to continue from
    progress: bool = True  # tqdm bar on rank 0
    plots: bool = True  # PNG curves at the end
    tensorboard: bool = False  # also log every metrics.jsonl record to out_dir/tensorboard (pip install 'kdstore[tensorboard]')
    save_model: bool = True  # save the final model as a HF directory (out_dir/model)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad key and what to do."""
        if not self.store and not self.train_text:
            raise ValueError("no training data: set store=URI (distillation) or train_text=SOURCE (CE training)")
        if self.store and self.train_text:
            raise ValueError("set either store= or train_text=, not both")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.kd_loss not in ("forward", "reverse", "symmetric", "jsd", "uld"):
            raise ValueError(f"kd_loss must be forward, reverse, symmetric, jsd or uld, got {self.kd_loss!r}")
        if not 0.0 <= self.kd_beta <= 1.0:
            raise ValueError(f"kd_beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.kd_beta}")
        if self.kd_loss == "jsd" and self.online_teacher:
            raise ValueError("kd_loss=jsd is implemented over stored targets only; use forward/reverse/symmetric with online_teacher=")
        if self.xtok_vocab not in XTOK_VOCABS:
            raise ValueError(f"xtok_vocab must be one of {', '.join(XTOK_VOCABS)}, got {self.xtok_vocab!r}")
        if self.xtok_targets not in ("boundary", "groups", "chain", "path"):
            raise ValueError(f"xtok_targets must be boundary, groups, chain or path, got {self.xtok_targets!r}")
        if self.align and self.teacher_segmentation_align:
            raise ValueError("set align= (student reads its own tokenization) or teacher_segmentation_align=, not both")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.eval_kl not in ("every", "final"):
            raise ValueError(f"eval_kl must be every or final, got {self.eval_kl!r}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"precision must be fp32, bf16 or auto, got {self.precision!r}")
        for key in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.train_text and self.kd_weight > 0 and not self.online_teacher:
            raise ValueError(
                "text training has no stored teacher targets: set kd_weight=0 (CE only) or online_teacher=MODEL_DIR"
            )
        if self.online_teacher and (self.align or self.teacher_segmentation_align):
            raise ValueError("online_teacher needs the student to share the teacher's vocabulary; drop align=")
        if self.online_teacher and self.kd_loss == "uld":
            raise ValueError("kd_loss=uld works on stored targets; drop online_teacher=")
        if self.align and not self.tokenizer:
            raise ValueError(
                "align= is the third vocabulary of the cross-tokenizer path and needs tokenizer=STUDENT_DIR (the student "
                "then reads its own tokenization of the stored text); the old behaviour (the student reads the teacher's "
                "tokens mapped into its vocabulary, and expects that segmentation at inference) is "
                "teacher_segmentation_align=FILE"
            )


def _coerce(value: str, tp: Any, key: str) -> Any:
    """One spelling rule for every recipe: bool true/false/1/0/yes/no/on/off/y/n/t/f; int also
    as a float literal with no fraction (``1e3``, ``2.0``); float; anything else is a str."""
    if tp is bool:
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise ValueError(f"{key}={value!r}: expected a boolean (true/false/1/0/yes/no)")
    try:
        if tp is int:
            f = float(value)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if tp is float:
            return float(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: expected {tp.__name__}") from None
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _flat_types(cls: type) -> dict[str, tuple[str, str | None, Any]]:
    """``flat key -> (field, sub-field or None, type)``. A field whose type is itself a dataclass
    (a group, e.g. the cascade's per-model settings) is spelled ``<field>_<sub-field>``."""
    out: dict[str, tuple[str, str | None, Any]] = {}
    for name, tp in _field_types(cls).items():
        if dataclasses.is_dataclass(tp):
            for sub, stp in _field_types(tp).items():
                out[f"{name}_{sub}"] = (name, sub, stp)
        else:
            out[name] = (name, None, tp)
    return out


def _replace(cfg: C, changes: dict[str, Any]) -> C:
    types = _flat_types(type(cfg))
    top: dict[str, Any] = {}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        name, sub, _ = types[key]
        if sub is None:
            top[name] = value
        else:
            groups.setdefault(name, {})[sub] = value
    for name, kw in groups.items():
        top[name] = dataclasses.replace(getattr(cfg, name), **kw)
    return dataclasses.replace(cfg, **top)  # type: ignore[type-var]


def apply_overrides(cfg: C, overrides: Iterable[str]) -> C:
    """Return a copy of ``cfg`` with ``key=value`` strings applied (types coerced; ``-`` in a key
    reads as ``_``). The one override parser of every recipe's config.

    Unknown keys raise ``ValueError`` listing close matches.
    """
    types = _flat_types(type(cfg))
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        if key not in types:
            import difflib  # noqa: PLC0415

            close = difflib.get_close_matches(key, types, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint} (see the printed config for all keys)")
        changes[key] = _coerce(value.strip(), types[key][2], key)
    return _replace(cfg, changes)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The flat config as a plain dict (JSON- and ``torch.load(weights_only=True)``-safe);
    grouped fields are spelled ``<field>_<sub-field>``."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update({f"{f.name}_{k}": x for k, x in dataclasses.asdict(v).items()})
        else:
            out[f.name] = v
    return out


def from_dict(cls: type[C], d: dict[str, Any], *, strict: bool = False) -> C:
    """Rebuild a config from :func:`to_dict` output; unknown keys are ignored unless ``strict``
    (so checkpoints from an older version with a removed key still load)."""
    types = _flat_types(cls)
    unknown = sorted(set(d) - set(types))
    if unknown and strict:
        raise ValueError(f"unknown config keys {unknown}")
    kw = {}
    for k, v in d.items():
        if k in types:
            tp = types[k][2]
            kw[k] = _coerce(str(v), tp, k) if isinstance(v, str) and tp is not str else v
    return _replace(cls(), kw)


def format_config(cfg: Any, *, changed_only: bool = False) -> str:
    """``key = value`` lines, one per (flat) key; ``*`` marks values that differ from the default."""
    default = to_dict(type(cfg)())
    lines = []
    for k, v in to_dict(cfg).items():
        mark = "*" if v != default.get(k) else " "
        if changed_only and mark == " ":
            continue
        lines.append(f"{mark} {k:<20} = {json.dumps(v, ensure_ascii=False)}")
    return "\n".join(lines)


class FlatKeys:
    """Mixin for configs with grouped fields: ``cfg.a_lr`` reads ``cfg.a.lr`` (the flat spelling
    that overrides, ``config.json`` and step fingerprints use)."""

    def __getattr__(self, name: str) -> Any:
        group, sep, sub = name.partition("_")
        value = self.__dict__.get(group) if sep else None
        if value is not None and dataclasses.is_dataclass(value) and sub in {f.name for f in fields(value)}:
            return getattr(value, sub)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
