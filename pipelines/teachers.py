"""Teachers: the one loader interface of the capture (``kd cache``, the plain loop, the cascade).

Three kinds, detected from the directory contents or named with ``--teacher-kind``:

* ``hf-causal-lm``: a Hugging Face causal LM (``config.json``, weights, tokenizer files);
  token level, the store's vocabulary is the tokenizer's.
* ``hf-sequence-classifier``: a Hugging Face ``*ForSequenceClassification`` model; sequence
  level, the store's vocabulary is the class labels (``id2label``).
* ``classifier-bundle``: the project's own classifier bundle (``classifier.json`` +
  ``model.pt`` + ``vocab.json``, written by ``trainer.classify.classifiers.TextClassifier``);
  sequence level, its own segmentation and vocabulary.

:func:`open_teacher` (driver) resolves a kind into a :class:`Teacher`: identity for the
manifest, the store's vocabulary table, a picklable :class:`EncoderSpec` (how workers turn
text into ids) and the pad id. :class:`TeacherSpec` (workers) loads the model as a
:class:`TeacherModel`: ``logits(input_ids, attention_mask)``. Adding a teacher kind means
adding one branch to each of :func:`detect_kind`, :func:`open_teacher`,
:meth:`EncoderSpec.load` and :meth:`TeacherSpec.load_model`.

Everything here runs on the driver and on workers. Heavy imports (transformers, torch,
the bundle's model code) happen inside functions so that importing this module is cheap.
A remote URI (``gs://``...) is copied once into a local cache directory first, so workers
on Dataflow can read a model from a bucket.

Why the bundle kind imports ``trainer`` (lazily, inside :func:`_bundle_classifier`): the
bundle's model classes, segmentation and vocabulary are the trainer's own code
(``trainer/classify/classifiers.py``, ``segment.py``); a copy here would be a twin that can
drift from what the bundle was trained with. The import happens only when a bundle is
loaded, so ``pipelines`` still imports without ``trainer`` for Hugging Face teachers, and
``trainer`` imports ``pipelines`` only where it runs a capture (demo, cascade).
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

from kdstore.format import TeacherInfo
from kdstore.hashing import files_checksum
from kdstore.tokenizer import TOKENIZER_FILES, tokenizer_files_hash
from pipelines.teacher_model import TeacherModel, _bundle_logits, _hf_logits, split_head  # noqa: F401  (re-exported)

_LOG = logging.getLogger(__name__)

KINDS = ("hf-causal-lm", "hf-sequence-classifier", "classifier-bundle")
BUNDLE_META = "classifier.json"
BUNDLE_FORMAT = "kdstore.classifier.v1"  # trainer.classify.classifiers.BUNDLE_FORMAT
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


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
        if not _is_model_dir(p):
            raise TeacherError(
                f"{path}: not a teacher directory (no config.json of a Hugging Face model, no {BUNDLE_META} of a "
                f"classifier bundle); pass --teacher pointing at a directory saved with save_pretrained() or TextClassifier.save()"
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
    if not _is_model_dir(dest):
        raise TeacherError(f"{path}: no config.json or {BUNDLE_META} in the copied teacher directory {dest}")
    return dest


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() or (p / BUNDLE_META).is_file()


def _hash_files(files: list[Path]) -> str:
    return files_checksum(files)


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and "training_args" not in p.name)
    if not files:
        raise TeacherError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in the teacher directory")
    return files


def weights_hash(model_dir: Path) -> str:
    """xxh3-128 over the bytes of all weight files, in name order (identifies the weights)."""
    return _hash_files(weight_files(model_dir))


def tokenizer_hash(model_dir: Path) -> str | None:
    """The manifest's ``teacher.tokenizer_hash`` (:func:`kdstore.tokenizer.tokenizer_files_hash`)."""
    return tokenizer_files_hash(model_dir)


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

    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        # Without tokenizer files transformers may quietly build a 1-token tokenizer, and
        # every sample would then fail as "tokenizer produced no tokens".
        raise TeacherError(f"no fast tokenizer found in {model_dir} (none of {', '.join(TOKENIZER_FILES)}); save the "
                           f"teacher's tokenizer into it (tokenizer.save_pretrained(DIR))")
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
    from :func:`kdstore.tokenizer.vocab_table` (ids ``0 .. len(tokenizer) - 1``)."""
    from kdstore.tokenizer import vocab_table as tokenizer_vocab  # noqa: PLC0415
    from kdstore.writer import vocab_table  # noqa: PLC0415

    v = tokenizer_vocab(tok)
    return vocab_table(ids=[int(i) for i in v["id"]], tokens=v["token"], token_bytes=v["bytes"],
                       special=[bool(x) for x in v["is_special"]])


def label_vocabulary(config) -> pa.Table:
    """Vocabulary of a sequence-level store: class ids with their label names
    (``config.id2label``), so stored indices (class ids) have names."""
    n = int(config.num_labels)
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return _label_table([id2label.get(i, f"LABEL_{i}") for i in range(n)])


def _label_table(names: list[str]) -> pa.Table:
    """Class ids ``0..C-1`` named ``names`` (made unique as ``i:name`` when they repeat)."""
    from kdstore.writer import vocab_table  # noqa: PLC0415

    n = len(names)
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


# -- kinds -------------------------------------------------------------------------------------
def detect_kind(model_dir: Path, trust_remote_code: bool = False) -> str:
    """The teacher kind of a local directory, from its files (see the module docstring)."""
    if (model_dir / BUNDLE_META).is_file():
        return "classifier-bundle"
    if (model_dir / "config.json").is_file():
        return "hf-sequence-classifier" if detect_level(load_config(str(model_dir), trust_remote_code)) == "sequence" else "hf-causal-lm"
    raise TeacherError(f"{model_dir}: no config.json (Hugging Face model) or {BUNDLE_META} (classifier bundle)")


@dataclass(frozen=True)
class EncoderSpec:
    """How a worker turns texts into teacher ids (picklable; loaded in ``setup``).

    kind: ``tokenizers`` (``source`` = a ``tokenizers.Tokenizer`` JSON, no transformers
    import on workers) or ``classifier-bundle`` (``source`` = the bundle's ``--teacher``
    path or URI, resolved on the worker).
    """

    kind: str
    source: str

    def load(self) -> Any:
        """An object with ``encode(texts, offsets=bool) -> (ids per text, char spans [T, 2] or None)``."""
        if self.kind == "tokenizers":
            return _TokenizersEncoder(self.source)
        if self.kind == "classifier-bundle":
            return _BundleEncoder(self.source)
        raise TeacherError(f"unknown encoder kind {self.kind!r}")


class _TokenizersEncoder:
    def __init__(self, tokenizer_json: str) -> None:
        from pipelines.windows import tokenizer_from_json  # noqa: PLC0415

        self._tok = tokenizer_from_json(tokenizer_json)

    def encode(self, texts: list[str], *, offsets: bool):
        from pipelines.windows import tokenize_batch  # noqa: PLC0415

        return tokenize_batch(self._tok, texts, offsets=offsets)


class _BundleEncoder:
    """The bundle's own segmentation + vocabulary, truncated to its ``max_len``
    (``TextClassifier.encode_rows``, the code the bundle was trained with)."""

    def __init__(self, path: str) -> None:
        self._clf = _bundle_classifier(local_model_dir(path))  # a URI is copied once per worker

    def encode(self, texts: list[str], *, offsets: bool):
        ids = []
        for t in texts:
            try:
                ids.append(self._clf.encode_rows([t])[0])
            except ValueError:  # no tokens: make_windows turns it into a dead letter
                ids.append([])
        return ids, [None] * len(texts)


def _bundle_classifier(model_dir: str | Path):
    """``TextClassifier.load(model_dir)``: lazy import of trainer code (see the module docstring)."""
    from trainer.classify.classifiers import TextClassifier  # noqa: PLC0415

    return TextClassifier.load(model_dir)


@dataclass
class Teacher:
    """What the driver resolves about a teacher before the pipeline starts.

    vocab: the store's vocabulary table (tokenizer tokens at token level, class names at
    sequence level); pipeline: manifest ``pipeline`` extras of this kind (label names...).
    """

    kind: str
    level: str
    model_dir: Path
    info: TeacherInfo
    vocab: pa.Table
    encoder: EncoderSpec
    pad_id: int
    pipeline: dict[str, Any]


def open_teacher(path: str, *, kind: str = "auto", level: str = "auto", trust_remote_code: bool = False) -> Teacher:
    """Resolve ``path`` (local directory or URI) into a :class:`Teacher`.

    ``kind``: ``auto`` (from the files) or one of :data:`KINDS` (checked against the
    files); ``level``: ``auto`` or the level the kind serves (``token`` for causal LMs,
    ``sequence`` for classifiers). Raises :class:`TeacherError` naming the mismatch.
    """
    model_dir = local_model_dir(path)
    found = detect_kind(model_dir, trust_remote_code)
    if kind not in ("auto", *KINDS):
        raise TeacherError(f"--teacher-kind must be auto or one of {KINDS}, got {kind!r}")
    if kind != "auto" and kind != found:
        raise TeacherError(f"{path}: --teacher-kind {kind} but the directory holds a {found} "
                           f"({'classifier.json' if found == 'classifier-bundle' else 'config.json architectures'}); "
                           f"use --teacher-kind {found} or auto")
    served = "token" if found == "hf-causal-lm" else "sequence"
    if level not in ("auto", served):
        hint = "a sequence classifier" if level == "sequence" else "a causal LM"
        raise TeacherError(f"{path}: --level {level} needs {hint}, but this teacher is a {found} (level {served})")
    if found == "classifier-bundle":
        return _open_bundle(path, model_dir)
    cfg = load_config(str(model_dir), trust_remote_code)
    tok = load_tokenizer(str(model_dir), trust_remote_code)
    info = teacher_info(model_dir, name_or_path=path, level=served, trust_remote_code=trust_remote_code)
    vocab = vocabulary(tok) if served == "token" else label_vocabulary(cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    extra = {"label_names": vocab.column("token").to_pylist()} if served == "sequence" else {}
    return Teacher(kind=found, level=served, model_dir=model_dir, info=info, vocab=vocab, pad_id=int(pad), pipeline=extra,
                   encoder=EncoderSpec(kind="tokenizers", source=tok.backend_tokenizer.to_str()))


def _open_bundle(path: str, model_dir: Path) -> Teacher:
    """A classifier bundle: ``vocab_size`` = number of classes (the index space of a
    sequence-level store); hashes are checksums of ``model.pt`` and ``vocab.json``."""
    from kdstore.hashing import file_checksum  # noqa: PLC0415

    meta = json.loads((model_dir / BUNDLE_META).read_text(encoding="utf-8"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise TeacherError(f"{model_dir / BUNDLE_META}: unsupported bundle format {meta.get('format')!r}; this version reads {BUNDLE_FORMAT!r}")
    cfg, extra = meta["config"], meta.get("extra", {})
    for name in ("model.pt", "vocab.json"):
        if not (model_dir / name).is_file():
            raise TeacherError(f"{model_dir}: classifier bundle without {name}; save it with TextClassifier.save()")
    with open(model_dir / "model.pt", "rb") as f:
        weights = file_checksum(f)
    with open(model_dir / "vocab.json", "rb") as f:
        vocab_hash = file_checksum(f)
    vocab_doc = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
    n_cls = int(cfg["num_classes"])
    names = [str(x) for x in (extra.get("label_names") or range(n_cls))]
    if len(names) != n_cls:
        raise TeacherError(f"{model_dir / BUNDLE_META}: {len(names)} label names for {n_cls} classes")
    info = TeacherInfo(
        name_or_path=path, vocab_size=n_cls, weights_hash=weights, tokenizer_hash=vocab_hash,
        tokenizer_vocab_size=len(vocab_doc["tokens"]), architecture=f"kdstore.classifier/{cfg['arch']}",
        num_parameters=extra.get("num_parameters"),
    )
    pipeline = {"label_names": names, "segmentation": extra.get("segmentation"), "max_len": extra.get("max_len")}
    return Teacher(kind="classifier-bundle", level="sequence", model_dir=model_dir, info=info, vocab=_label_table(names),
                   encoder=EncoderSpec(kind="classifier-bundle", source=path), pad_id=int(cfg.get("pad_id", 0)),
                   pipeline=pipeline)


@dataclass(frozen=True)
class TeacherSpec:
    """How workers load the teacher (picklable).

    device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
    dtype:  ``auto`` (bfloat16 on CUDA with bf16 support, else float32), ``float32``,
            ``bfloat16``, ``float16``.
    """

    path: str
    level: str = "token"
    kind: str = "hf-causal-lm"
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

    def load_model(self) -> TeacherModel:
        """The model in eval mode on its device, behind the :class:`TeacherModel` interface."""
        import torch  # noqa: PLC0415

        if self.threads:
            torch.set_num_threads(self.threads)
        model_dir = str(local_model_dir(self.path))
        if self.kind == "classifier-bundle":
            clf = _bundle_classifier(model_dir)
            module = clf.model.to(self.resolved_device())
            if self.dtype != "auto":  # bundles are trained in fp32; cast only on request
                module = module.to(self.resolved_dtype())
            # The bundle's classifiers ignore padding (trainer tests), so they batch with its pad id.
            return TeacherModel(module=module.eval(), forward=_bundle_logits, pad_id=clf.vocab.pad_id,
                                max_positions=clf.config.max_len)
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: PLC0415

        cls = AutoModelForSequenceClassification if self.level == "sequence" else AutoModelForCausalLM
        model = cls.from_pretrained(model_dir, dtype=self.resolved_dtype(), trust_remote_code=self.trust_remote_code)
        return TeacherModel.of_hf(model.to(self.resolved_device()).eval(), level=self.level)
