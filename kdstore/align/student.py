"""The student tokenizer as the aligner sees it (a Hugging Face ``tokenizers`` backend).

:func:`load_student` accepts a tokenizer directory or ``tokenizer.json`` path, a
``transformers`` fast tokenizer or a ``tokenizers.Tokenizer``, and returns a
:class:`StudentTokenizer` with the vocabulary by id, special-token roles, the convention
and two encoders:

* :meth:`StudentTokenizer.pieces` — how the student spells one *token's* text (used to
  derive mappings for unmatched teacher tokens). It runs a copy of the tokenizer with the
  "add a prefix space" behaviours switched off (Metaspace ``prepend_scheme``, ByteLevel
  ``add_prefix_space``, a ``Prepend`` normalizer) and no post-processor: otherwise a
  SentencePiece student spells the in-word piece "中国" as ``▁ 中国`` and the first piece
  would be the space.
* :meth:`StudentTokenizer.encode_offsets` — how the student tokenizes running *text*
  (unchanged tokenizer), with UTF-8 byte offsets, for sequence alignment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import xxhash

from kdstore.align.canonical import ROLES, infer_convention, special_role


@dataclass
class StudentTokenizer:
    """A student tokenizer (use :func:`load_student`).

    tokens: ``[V_s]`` token string by id ("" for ids the tokenizer does not define);
    special: ``[V_s]`` bool; roles: role -> id; convention: see :mod:`kdstore.align.canonical`.
    """

    tokenizer: Any  # tokenizers.Tokenizer
    tokens: list[str]
    special: np.ndarray
    roles: dict[str, int]
    convention: str
    name: str = ""
    _raw: Any = field(default=None, repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def unk_id(self) -> int | None:
        return self.roles.get("unk")

    @property
    def fingerprint(self) -> str:
        """xxh3-64 of the vocabulary (strings by id): identifies the student's id space."""
        return xxhash.xxh3_64_hexdigest("\x00".join(self.tokens).encode("utf-8"))

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Student ids spelling each text on its own (no prefix space, no special tokens)."""
        if not texts:
            return []
        return [e.ids for e in self._raw.encode_batch(list(texts), add_special_tokens=False)]

    def encode_ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The ids :meth:`encode_offsets` gives for running texts (no special tokens), without
        computing byte offsets (half the time: for token counts)."""
        if not texts:
            return []
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def encode_offsets(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Tokenize running texts as the student does: per text ``(ids [S] int64,
        byte_start [S] int64, byte_end [S] int64)``, offsets in UTF-8 bytes of the text."""
        out = []
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens) if texts else []
        lengths = self.token_lengths
        for text, e in zip(texts, encs):
            ids = np.asarray(e.ids, dtype=np.int64)
            off = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
            c2b = char_to_byte(text)
            bs, be = refine_byte_offsets(ids, c2b[off[:, 0]], c2b[off[:, 1]], lengths)
            out.append((ids, bs, be))
        return out

    @cached_property
    def token_lengths(self) -> np.ndarray:
        """``[V_s]`` int64: bytes of text each token stands for (a marked space included)."""
        from kdstore.align.canonical import canonicalize  # noqa: PLC0415

        out = np.zeros(len(self.tokens), dtype=np.int64)
        for i, t in enumerate(self.tokens):
            if t and not self.special[i]:
                c = canonicalize(t, self.convention)
                out[i] = len(c.data) + (c.boundary == "space")
        return out


def refine_byte_offsets(ids: np.ndarray, start: np.ndarray, end: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact byte spans for sub-character pieces.

    Tokenizers report *character* offsets, so byte-level (or ``<0xNN>``) pieces of one
    character all carry that character's span. Within each run of consecutive tokens with
    the same span, give each piece its own bytes (``lengths[id]`` bytes, in order, clamped
    to the span; the last piece ends at the span's end), so a piece boundary inside a
    character becomes a real byte boundary. A span that reaches into the next token's span
    is cut at its start. Other tokens are unchanged.
    """
    n = len(ids)
    if n < 2:
        return start, end
    same = np.zeros(n, dtype=bool)
    same[1:] = (start[1:] == start[:-1]) & (end[1:] == end[:-1])
    # A span reaching into the next token's (different) span is cut at that token's start:
    # a SentencePiece prefix "▁" reported as (0, 1) over a piece starting at 0 becomes the
    # zero-width marker it is, instead of looking like a piece of the next character.
    cut = np.minimum(end[:-1], np.maximum(start[1:], start[:-1]))
    end = np.concatenate([np.where(same[1:], end[:-1], cut), end[-1:]])
    if not same.any():
        return start, end
    run = np.cumsum(~same) - 1
    heads = np.flatnonzero(~same)
    L = lengths[ids]
    before = np.cumsum(L) - L
    within = before - before[heads][run]
    new_start = np.minimum(start + within, end)
    new_end = np.minimum(new_start + L, end)
    last = np.ones(n, dtype=bool)
    last[:-1] = ~same[1:]
    new_end = np.where(last, end, new_end)
    multi = same.copy()
    multi[:-1] |= same[1:]
    return np.where(multi, new_start, start), np.where(multi, new_end, end)


def char_to_byte(text: str) -> np.ndarray:
    """``[len(text)+1]`` int64: UTF-8 byte offset of each character offset (vectorised)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(width, out=out[1:])
    return out


def _no_prefix_space(node: Any) -> Any:
    """Copy of a tokenizer.json component with prefix-space insertion switched off."""
    if isinstance(node, list):
        return [_no_prefix_space(n) for n in node]
    if not isinstance(node, dict):
        return node
    t = node.get("type")
    if t == "Prepend":
        return None
    node = {k: _no_prefix_space(v) for k, v in node.items()}
    if t == "Metaspace":
        if "prepend_scheme" in node:
            node["prepend_scheme"] = "never"
        if "add_prefix_space" in node:
            node["add_prefix_space"] = False
    elif t == "ByteLevel":
        node["add_prefix_space"] = False
    for key in ("normalizers", "pretokenizers"):
        if isinstance(node.get(key), list):
            node[key] = [n for n in node[key] if n is not None]
    return node


def _raw_copy(tokenizer: Any) -> Any:
    from tokenizers import Tokenizer  # noqa: PLC0415

    spec = json.loads(tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer"):
        if spec.get(key) is not None:
            spec[key] = _no_prefix_space(spec[key])
    spec["post_processor"] = None
    spec["truncation"] = None
    spec["padding"] = None
    return Tokenizer.from_str(json.dumps(spec))


def _convention_of(tokenizer: Any, tokens: Sequence[str], special: Sequence[bool]) -> str:
    spec = json.loads(tokenizer.to_str())
    types: set[str] = set()

    def walk(n: Any) -> None:
        if isinstance(n, dict):
            if "type" in n:
                types.add(n["type"])
            for v in n.values():
                walk(v)
        elif isinstance(n, list):
            for v in n:
                walk(v)

    for key in ("pre_tokenizer", "decoder", "normalizer"):
        walk(spec.get(key))
    model = spec.get("model") or {}
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or model.get("byte_fallback"):
        return "sentencepiece"
    if model.get("type") == "WordPiece" or "WordPiece" in types:
        return "wordpiece"
    return infer_convention(tokens, special)


def load_student(source: Any, *, name: str | None = None) -> StudentTokenizer:
    """A :class:`StudentTokenizer` from a directory / ``tokenizer.json`` path, a
    ``transformers`` fast tokenizer or a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    if isinstance(source, StudentTokenizer):
        return source
    hf = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or str(source)
        if path.is_dir():
            try:
                from transformers import AutoTokenizer  # noqa: PLC0415

                hf = AutoTokenizer.from_pretrained(str(path))
            except Exception:  # noqa: BLE001 - fall back to the bare tokenizer.json below
                hf = None
            if hf is None or getattr(hf, "backend_tokenizer", None) is None:
                if not (path / "tokenizer.json").exists():
                    raise FileNotFoundError(
                        f"{path}: no tokenizer.json and transformers could not load a fast tokenizer from it; "
                        f"pass a Hugging Face tokenizer directory (save_pretrained) or a tokenizer.json file"
                    )
                hf = None
                backend = Tokenizer.from_file(str(path / "tokenizer.json"))
            else:
                backend = hf.backend_tokenizer
        elif path.is_file():
            backend = Tokenizer.from_file(str(path))
        else:
            raise FileNotFoundError(f"{path}: student tokenizer not found (expected a directory or a tokenizer.json file)")
    elif isinstance(source, Tokenizer):
        backend = source
    elif getattr(source, "backend_tokenizer", None) is not None:
        hf = source
        backend = source.backend_tokenizer
    else:
        raise TypeError(
            f"cannot use {type(source).__name__} as a student tokenizer: pass a tokenizer directory, a "
            f"tokenizer.json path, a transformers fast tokenizer or a tokenizers.Tokenizer"
        )
    if name is None:
        name = str(getattr(hf, "name_or_path", "") or "")
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    tokens = [""] * size
    for tok, i in vocab.items():
        tokens[i] = tok
    special = np.zeros(size, dtype=bool)
    for i, added in backend.get_added_tokens_decoder().items():
        if added.special and i < size:
            special[i] = True
    roles: dict[str, int] = {}
    for i in np.flatnonzero(special):
        role = special_role(tokens[i])
        if role is not None and role not in roles:
            roles[role] = int(i)
    if hf is not None:
        # The transformers tokenizer knows its roles; trust it over string patterns.
        for role in ROLES:
            tid = getattr(hf, f"{role}_token_id", None)
            if isinstance(tid, int) and 0 <= tid < size:
                roles[role] = tid
                special[tid] = True
    unk = (json.loads(backend.to_str()).get("model") or {}).get("unk_token")
    if "unk" not in roles and isinstance(unk, str) and unk in vocab:
        roles["unk"] = vocab[unk]
    convention = _convention_of(backend, tokens, special)
    return StudentTokenizer(
        tokenizer=backend, tokens=tokens, special=special, roles=roles, convention=convention,
        name=name, _raw=_raw_copy(backend),
    )
