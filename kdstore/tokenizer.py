"""Tokenizer identity and token bytes: what a store's vocabulary table records.

A store names its teacher tokenizer by :func:`tokenizer_hash` and carries, for every id,
the token string, the bytes it stands for in text and a special flag
(:func:`vocab_table`). Both sides use this: the capture writes the table, the reader and
the vocabulary alignment read it. Training tokenizers is demo material and lives in
:mod:`trainer.data.tokenizers`.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import xxhash
from tokenizers import Tokenizer

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds to import
    from transformers import PreTrainedTokenizerBase

# Files that define a tokenizer in a model directory (``tokenizer.json`` alone when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")

ROLE_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

TokenizerLike = Union[str, Path, "PreTrainedTokenizerBase", Tokenizer]


# ---------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------
def load_tokenizer(tokenizer: TokenizerLike) -> PreTrainedTokenizerBase:
    """A transformers fast tokenizer from a directory (or the object itself)."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer  # noqa: PLC0415

        path = Path(tokenizer)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json; expected a saved fast-tokenizer directory")
        return AutoTokenizer.from_pretrained(str(path))
    if hasattr(tokenizer, "backend_tokenizer"):
        return tokenizer
    raise TypeError(f"expected a tokenizer directory or a transformers fast tokenizer, got {type(tokenizer).__name__}")


def tokenizer_hash(tokenizer: str | Path | PreTrainedTokenizerBase) -> str:
    """Hex xxh3-64 identity of a tokenizer: its canonical ``tokenizer.json`` plus its roles.

    Canonical: keys sorted, compact separators; the runtime ``padding``/``truncation``
    settings and the format ``version`` are left out. The roles (``bos_token`` ... as
    strings) are part of the identity because downstream code finds tokens by role.
    A directory and the tokenizer loaded from it hash the same.
    """
    tok = load_tokenizer(tokenizer)
    spec = json.loads(tok.backend_tokenizer.to_str())
    for key in ("padding", "truncation", "version"):
        spec.pop(key, None)
    roles = {name: _role(tok, name) for name in ROLE_NAMES}
    payload = json.dumps({"tokenizer": spec, "roles": roles}, sort_keys=True, ensure_ascii=False,
                         separators=(",", ":"))
    return xxhash.xxh3_64_hexdigest(payload.encode("utf-8"))


def _role(tok: Any, name: str) -> str | None:
    value = getattr(tok, name, None)
    return None if value is None else str(value)


# ---------------------------------------------------------------------------------------
# token bytes
# ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: PLC0415

    return {ch: b for b, ch in bytes_to_unicode().items()}


class _ByteMap:
    """How a tokenizer's vocabulary strings map to text bytes, read off its decoder.

    The decoder defines what a token stands for: ``ByteLevel`` (GPT-2 alphabet),
    ``WordPiece`` (continuation prefix), ``Metaspace`` / ``Replace(▁ -> " ")``
    (SentencePiece space marker) and ``ByteFallback`` (``<0xNN>`` pieces). Added tokens
    (special or not) are not run through the model: they stand for their literal text.
    """

    def __init__(self, backend: Tokenizer) -> None:
        steps = _flatten(backend.decoder) + _flatten(backend.pre_tokenizer)
        types = {s.get("type") for s in steps}
        model = type(backend.model).__name__
        self.byte_level = "ByteLevel" in types
        self.prefix: str | None = None
        if model == "WordPiece":
            self.prefix = backend.model.continuing_subword_prefix
        for s in steps:
            if s.get("type") == "WordPiece" and s.get("prefix"):
                self.prefix = s["prefix"]
        self.space: str | None = None
        for s in steps:
            if s.get("type") == "Metaspace":
                self.space = s.get("replacement", "▁")
            elif s.get("type") == "Replace" and s.get("content") == " " and "String" in (s.get("pattern") or {}):
                self.space = s["pattern"]["String"]
        self.byte_fallback = "ByteFallback" in types
        if model == "BPE" and not self.byte_level and (backend.model.end_of_word_suffix
                                                        or backend.model.continuing_subword_prefix):
            raise NotImplementedError("BPE with an end-of-word suffix or a continuation prefix is not supported "
                                      "by token_bytes (only byte-level BPE, WordPiece and SentencePiece)")
        self.added = {i: (t.content, bool(t.special)) for i, t in backend.get_added_tokens_decoder().items()}

    def __call__(self, token_id: int, token: str | None) -> tuple[bytes, bool]:
        if token_id in self.added:
            content, special = self.added[token_id]
            return content.encode("utf-8"), special
        if token is None:
            raise ValueError(f"token id {token_id} has no vocabulary entry (a hole in the id range)")
        if self.byte_level:
            dec = _byte_decoder()
            try:
                return bytes(dec[ch] for ch in token), False
            except KeyError as exc:
                raise ValueError(f"token {token!r} (id {token_id}) has a character outside the byte-level "
                                 f"alphabet: {exc}") from None
        if self.byte_fallback:
            m = _BYTE_PIECE.fullmatch(token)
            if m:
                return bytes([int(m.group(1), 16)]), False
        if self.prefix and token.startswith(self.prefix):
            token = token[len(self.prefix):]
        if self.space:
            token = token.replace(self.space, " ")
        return token.encode("utf-8"), False


def _flatten(component: Any) -> list[dict[str, Any]]:
    """The steps of a decoder or pre-tokenizer (nested ``Sequence`` expanded) as JSON dicts."""
    if component is None:
        return []
    return _flatten_state(json.loads(component.__getstate__()))


def _flatten_state(state: dict[str, Any]) -> list[dict[str, Any]]:
    if state.get("type") == "Sequence":
        subs = state.get("decoders") or state.get("pretokenizers") or []
        return [s for sub in subs for s in _flatten_state(sub)]
    return [state]


def _backend(tokenizer: TokenizerLike) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    return load_tokenizer(tokenizer).backend_tokenizer


def token_bytes(tokenizer: TokenizerLike, token_id: int) -> bytes:
    """The bytes token ``token_id`` stands for in text.

    Byte-level BPE: the GPT-2 alphabet inverted (``Ġ`` -> ``b" "``); SentencePiece:
    ``▁`` -> ``b" "``, ``<0xNN>`` -> that byte; WordPiece: the piece without ``##``;
    special and other added tokens: their literal text in UTF-8 (``b"<|endoftext|>"``).
    Not unique per id: WordPiece ``a`` and ``##a`` are both ``b"a"``.
    """
    backend = _backend(tokenizer)
    return _ByteMap(backend)(int(token_id), backend.id_to_token(int(token_id)))[0]


def vocab_table(tokenizer: TokenizerLike) -> dict[str, Any]:
    """Every id ``0..len(tokenizer)-1`` with its token string, bytes and special flag.

    Returns:
        ``{"id": int64[V], "token": list[str] (V), "bytes": list[bytes] (V),
        "is_special": bool[V]}`` with V the tokenizer length (added tokens included;
        not the model's padded embedding size).
    """
    backend = _backend(tokenizer)
    size = backend.get_vocab_size(with_added_tokens=True)
    byte_map = _ByteMap(backend)
    tokens: list[str] = []
    data: list[bytes] = []
    special = np.zeros(size, dtype=bool)
    for i in range(size):
        token = backend.id_to_token(i)
        b, special[i] = byte_map(i, token)
        tokens.append(token if token is not None else byte_map.added[i][0])
        data.append(b)
    return {"id": np.arange(size, dtype=np.int64), "token": tokens, "bytes": data, "is_special": special}


def tokenizer_files_hash(model_dir: str | Path) -> str | None:
    """``xxh3_128:<hex>`` of a model directory's tokenizer files (``tokenizer.json`` alone
    when present), or None without any: the identity a store's manifest records as
    ``teacher.tokenizer_hash`` (stores are compared by it on resume and merge). It names the
    files as shipped; :func:`tokenizer_hash` names the tokenizer's behaviour (canonical JSON
    plus roles) and keys caches of tokenizers the project trains itself."""
    from kdstore.hashing import files_checksum  # noqa: PLC0415

    d = Path(model_dir)
    files = [d / "tokenizer.json"] if (d / "tokenizer.json").is_file() else [d / f for f in TOKENIZER_FILES if (d / f).is_file()]
    return files_checksum(files) if files else None
