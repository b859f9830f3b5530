"""Teacher identity and files: model directory, tokenizer, vocabulary table, hashes.

Everything here runs on the driver (to build the manifest and vocabulary before the
pipeline starts) and on workers (to load the tokenizer / model). Heavy imports
(transformers, torch) happen inside functions so that importing this module is cheap.

A teacher is a local Hugging Face model directory (``config.json``, weights, tokenizer
files). A remote URI (``gs://``...) is copied once into a local cache directory first,
so workers on Dataflow can read a model from a bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import xxhash

from kdstore.format import TeacherInfo
from kdstore.hashing import CHECKSUM

_LOG = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")


class TeacherError(ValueError):
    """The teacher directory cannot be used; the message says what is missing."""


def local_model_dir(path: str) -> Path:
    """A local directory holding the model: ``path`` itself, or a cached copy of a URI.

    Remote directories are copied with pyarrow's filesystem layer into
    ``$KDSTORE_CACHE`` (default ``~/.cache/kdstore/models``) under a name derived from
    the URI; a complete copy is marked by a ``.complete`` file and reused.
    """
    if "://" not in path or path.startswith("file://"):
        p = Path(path[len("file://"):] if path.startswith("file://") else path).expanduser()
        if not (p / "config.json").is_file():
            raise TeacherError(
                f"{path}: not a Hugging Face model directory (no config.json); pass --teacher pointing at a "
                f"directory saved with save_pretrained()"
            )
        return p
    import pyarrow.fs as pafs  # noqa: PLC0415

    from kdstore.fs import resolve  # noqa: PLC0415

    cache = Path(os.environ.get("KDSTORE_CACHE", Path.home() / ".cache" / "kdstore")) / "models"
    dest = cache / hashlib.sha256(path.encode()).hexdigest()[:16]
    if not (dest / ".complete").exists():
        dest.mkdir(parents=True, exist_ok=True)
        loc = resolve(path)
        _LOG.info("copying teacher %s to %s", path, dest)
        pafs.copy_files(loc.root, str(dest), source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem())
        (dest / ".complete").write_text(path)
    if not (dest / "config.json").is_file():
        raise TeacherError(f"{path}: no config.json in the copied teacher directory {dest}")
    return dest


def _hash_files(files: list[Path]) -> str:
    h = xxhash.xxh3_128()
    for f in files:
        with open(f, "rb") as fh:
            while True:
                b = fh.read(1 << 22)
                if not b:
                    break
                h.update(b)
    return f"{CHECKSUM}:{h.hexdigest()}"


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and "training_args" not in p.name)
    if not files:
        raise TeacherError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in the teacher directory")
    return files


def weights_hash(model_dir: Path) -> str:
    """xxh3-128 over the bytes of all weight files, in name order (identifies the weights)."""
    return _hash_files(weight_files(model_dir))


def tokenizer_hash(model_dir: Path) -> str | None:
    files = [model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
    if (model_dir / "tokenizer.json").is_file():
        files = [model_dir / "tokenizer.json"]
    return _hash_files(files) if files else None


def num_parameters(model_dir: Path) -> int | None:
    """Parameter count from safetensors headers (no weights loaded); None otherwise."""
    files = [f for f in weight_files(model_dir) if f.suffix == ".safetensors"]
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                total += int(np.prod(meta["shape"], dtype=np.int64))
    return total


@lru_cache(maxsize=8)
def load_config(model_dir: str, trust_remote_code: bool = False):
    from transformers import AutoConfig  # noqa: PLC0415

    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


@lru_cache(maxsize=8)
def load_tokenizer(model_dir: str, trust_remote_code: bool = False):
    """The teacher's tokenizer (a fast tokenizer: offsets are needed for byte spans)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise TeacherError(f"{model_dir}: cannot load the teacher's tokenizer ({exc}); save it into the model directory") from exc
    if not getattr(tok, "is_fast", False):
        raise TeacherError(f"{model_dir}: the tokenizer is not a fast (tokenizers) tokenizer; save tokenizer.json with the model")
    return tok


def detect_level(config) -> str:
    """``sequence`` for sequence classifiers (by architecture name), else ``token``."""
    archs = getattr(config, "architectures", None) or []
    return "sequence" if any(a.endswith("ForSequenceClassification") for a in archs) else "token"


def padded_vocab_size(config) -> int:
    """Rows of the output embedding: ``config.vocab_size`` (text config for composite models)."""
    v = getattr(config, "vocab_size", None)
    if v is None and hasattr(config, "get_text_config"):
        v = getattr(config.get_text_config(), "vocab_size", None)
    if not v:
        raise TeacherError("the teacher config has no vocab_size; cannot size the store's indices")
    return int(v)


def teacher_info(model_dir: Path, *, name_or_path: str, level: str, trust_remote_code: bool = False) -> TeacherInfo:
    """Manifest identity of the teacher (hashes computed from the files)."""
    cfg = load_config(str(model_dir), trust_remote_code)
    tok = load_tokenizer(str(model_dir), trust_remote_code)
    archs = getattr(cfg, "architectures", None) or [type(cfg).__name__]
    vocab = int(cfg.num_labels) if level == "sequence" else padded_vocab_size(cfg)
    if level == "token" and vocab < len(tok):
        _LOG.warning("teacher vocab_size %d < tokenizer size %d: ids >= %d will fail as model errors", vocab, len(tok), vocab)
    return TeacherInfo(
        name_or_path=name_or_path, vocab_size=vocab, weights_hash=weights_hash(model_dir),
        tokenizer_hash=tokenizer_hash(model_dir), tokenizer_vocab_size=len(tok),
        revision=getattr(cfg, "_commit_hash", None), architecture=archs[0], num_parameters=num_parameters(model_dir),
    )


# -- vocabulary --------------------------------------------------------------------------------
def vocabulary(tok) -> pa.Table:
    """The store's vocabulary table for a tokenizer (id, token, bytes, hash, special),
    from :func:`trainer.data.tokenizers.vocab_table` (ids ``0 .. len(tokenizer) - 1``)."""
    from kdstore.tokenizer import vocab_table as tokenizer_vocab  # noqa: PLC0415
    from kdstore.writer import vocab_table  # noqa: PLC0415

    v = tokenizer_vocab(tok)
    return vocab_table(ids=[int(i) for i in v["id"]], tokens=v["token"], token_bytes=v["bytes"],
                       special=[bool(x) for x in v["is_special"]])


def label_vocabulary(config) -> pa.Table:
    """Vocabulary of a sequence-level store: class ids with their label names
    (``config.id2label``), so stored indices (class ids) have names."""
    from kdstore.writer import vocab_table  # noqa: PLC0415

    n = int(config.num_labels)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(n)]
    if len(set(names)) != n:
        names = [f"{i}:{name}" for i, name in enumerate(names)]
    return vocab_table(ids=list(range(n)), tokens=names, token_bytes=[x.encode("utf-8") for x in names], special=[False] * n)


def hash_of_id(vocab: pa.Table) -> np.ndarray:
    """``[max_id + 1]`` uint64 token hash indexed by token id (from the vocabulary table)."""
    ids = vocab.column("id").to_numpy().astype(np.int64)
    out = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=np.uint64)
    out[ids] = vocab.column("hash").to_numpy()
    return out


def byte_len_of_id(vocab: pa.Table) -> np.ndarray:
    """``[max_id + 1]`` int64 byte length of each token's text (0 for specials)."""
    ids = vocab.column("id").to_numpy().astype(np.int64)
    lens = np.array([len(b) for b in vocab.column("bytes").to_pylist()], dtype=np.int64)
    out = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=np.int64)
    out[ids] = lens
    return out


@dataclass(frozen=True)
class TeacherSpec:
    """How workers load the teacher (picklable).

    device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
    dtype:  ``auto`` (bfloat16 on CUDA with bf16 support, else float32), ``float32``,
            ``bfloat16``, ``float16``.
    """

    path: str
    level: str = "token"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    threads: int | None = None

    def resolved_device(self) -> str:
        import torch  # noqa: PLC0415

        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self):
        import torch  # noqa: PLC0415

        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if self.dtype != "auto":
            if self.dtype not in names:
                raise TeacherError(f"unknown dtype {self.dtype!r}; use auto, float32, bfloat16 or float16")
            return names[self.dtype]
        dev = self.resolved_device()
        if dev.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32

    def load_model(self) -> Any:
        """The model in eval mode on its device (``AutoModelForCausalLM`` or a classifier)."""
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: PLC0415

        if self.threads:
            torch.set_num_threads(self.threads)
        model_dir = str(local_model_dir(self.path))
        cls = AutoModelForSequenceClassification if self.level == "sequence" else AutoModelForCausalLM
        model = cls.from_pretrained(model_dir, dtype=self.resolved_dtype(), trust_remote_code=self.trust_remote_code)
        return model.to(self.resolved_device()).eval()
