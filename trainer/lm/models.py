"""Causal LM builders from Hugging Face config classes, with named presets.

A model is described by a :class:`ModelSpec` (a named preset, a JSON file holding a
preset name plus overrides, or a plain Hugging Face ``config.json`` with ``model_type``)
and built with :func:`build_causal_lm` for a given vocabulary size. Presets:

================  ====  ======  =====  ======  =========================================
name              arch  hidden  layers  heads  use
================  ====  ======  =====  ======  =========================================
teacher-small     llama    256      4      4   reference teacher (2 CPU cores, minutes)
student-tiny      llama    128      2      4   ~1/4 of teacher-small's parameters
teacher-base      llama    512      8      8   larger teacher recipe for a GPU
student-small     llama    256      2      4   a mid-size student
micro             llama     32      1      2   tests
================  ====  ======  =====  ======  =========================================
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

ARCHS = ("llama", "gpt2")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a small causal transformer (vocabulary size comes at build time)."""

    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 0  # 0 = about 8/3 * hidden (SwiGLU) for llama, 4 * hidden for gpt2
    max_positions: int = 512
    dropout: float = 0.0  # attention dropout (llama) / all dropouts (gpt2)
    tie_embeddings: bool = True  # small vocab-heavy models: tying halves the embedding parameters
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model arch must be one of {ARCHS}, got {self.arch!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def ffn(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        return 4 * self.hidden_size if self.arch == "gpt2" else int(round(8 * self.hidden_size / 3 / 8)) * 8


PRESETS: dict[str, ModelSpec] = {
    "teacher-small": ModelSpec(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=688),
    "student-tiny": ModelSpec(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=344),
    "teacher-base": ModelSpec(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376, max_positions=1024),
    "student-small": ModelSpec(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=688),
    "micro": ModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=256),
}


def model_spec(spec: str | dict[str, Any] | ModelSpec) -> ModelSpec | dict[str, Any]:
    """Resolve a spec: a :class:`ModelSpec`, a preset name, a JSON file, or a dict.

    A dict/JSON may name a ``preset`` and override fields of it (``{"preset":
    "student-tiny", "num_layers": 3}``), or be a Hugging Face config with ``model_type``,
    which is returned as a dict for :func:`build_causal_lm` to pass to ``AutoConfig``.
    """
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        if spec in PRESETS:
            return PRESETS[spec]
        path = Path(spec)
        if path.is_dir() and (path / "config.json").exists():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: expected a JSON object")
    d = dict(spec)
    if "model_type" in d:
        return d
    base = PRESETS.get(d.pop("preset", ""), ModelSpec())
    names = {f.name for f in fields(ModelSpec)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown model spec keys {unknown}; known: {sorted(names)} (or give a HF config with model_type)")
    return replace(base, **d)


def hf_config(spec: ModelSpec | dict[str, Any], *, vocab_size: int, pad_token_id: int | None = None,
              bos_token_id: int | None = None, eos_token_id: int | None = None):
    """The ``transformers`` config object for ``spec`` with ``vocab_size`` rows."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig  # noqa: PLC0415

    special = dict(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    if isinstance(spec, dict):
        d = dict(spec)
        model_type = d.pop("model_type")
        d.update(vocab_size=vocab_size, **{k: v for k, v in special.items() if v is not None})
        return AutoConfig.for_model(model_type, **d)
    if spec.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_positions, attention_dropout=spec.dropout,
            tie_word_embeddings=spec.tie_embeddings, initializer_range=spec.init_std, **special,
        )
    return GPT2Config(
        vocab_size=vocab_size, n_embd=spec.hidden_size, n_layer=spec.num_layers, n_head=spec.num_heads,
        n_inner=spec.ffn, n_positions=spec.max_positions, resid_pdrop=spec.dropout, embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout, tie_word_embeddings=spec.tie_embeddings, initializer_range=spec.init_std, **special,
    )


def build_causal_lm(spec: str | dict[str, Any] | ModelSpec, *, vocab_size: int, seed: int | None = None, **special: int | None):
    """A freshly initialised ``AutoModelForCausalLM`` (fp32, train mode) with ``vocab_size``
    embedding rows; ``special`` = pad/bos/eos token ids for the config."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    cfg = hf_config(model_spec(spec), vocab_size=vocab_size, **special)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    return model


def load_causal_lm(path: str | Path):
    """Load a saved HF causal LM directory (fp32) with a clear error when it is not one."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    p = Path(path)
    if not (p / "config.json").exists():
        raise ValueError(f"{path}: not a Hugging Face model directory (no config.json); train one with 'kd train lm'")
    return AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    skip: set[int] = set()
    if exclude_embeddings and hasattr(model, "get_input_embeddings"):
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            if m is not None:
                skip.add(id(m.weight))
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already de-duplicates tied tensors
        if id(p) in seen or id(p) in skip or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def padded_vocab(n: int, multiple: int = 64) -> int:
    """``n`` rounded up to ``multiple`` (real checkpoints pad their embedding rows)."""
    multiple = max(1, multiple)
    return ((n + multiple - 1) // multiple) * multiple


def vocab_size_of(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def resize_vocab(model, vocab_size: int):
    """Resize input (and tied/untied output) embeddings to ``vocab_size`` rows, e.g. to an
    aligned vocabulary with new tokens; new rows get the mean of the old ones, so the
    new tokens start as an "average token" rather than noise. Returns the model."""
    old = vocab_size_of(model)
    if vocab_size == old:
        return model
    model.resize_token_embeddings(vocab_size, mean_resizing=True)
    return model


def spec_dict(spec: str | dict[str, Any] | ModelSpec) -> dict[str, Any]:
    """A JSON-able description of a spec (for cache keys and reports)."""
    s = model_spec(spec)
    return dict(s) if isinstance(s, dict) else asdict(s)
