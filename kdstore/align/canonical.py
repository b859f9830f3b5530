"""Token canonicalisation across tokenizer conventions.

Different tokenizer families write the same piece of text differently:

===============  ==================  ===========================  ======================
convention       word after a space  inside a word / no marker    raw byte
===============  ==================  ===========================  ======================
``byte_level``   ``Ġthe``            ``the``                      ``ä`` (byte table)
``sentencepiece````▁the``            ``the``                      ``<0xE4>``
``wordpiece``    ``the`` (initial)   ``##the`` (continuation)     (none)
``plain``        (none)              ``the``                      (none)
===============  ==================  ===========================  ======================

:func:`canonicalize` maps a token string to a :class:`Canonical` — the UTF-8 *bytes* the
token stands for, without its word-boundary marker, plus a *boundary* class:

* ``"space"``   — the token starts with a space that is part of the token (``Ġthe``, ``▁the``);
* ``"initial"`` — WordPiece word start (the tokenizer dropped the preceding whitespace);
* ``"cont"``    — WordPiece continuation (``##the``);
* ``"any"``     — no marker (BPE/SentencePiece pieces inside a word or after punctuation,
  raw bytes, whitespace-only tokens).

Two tokens of different conventions match canonically when their bytes are equal and their
boundaries are compatible (:data:`COMPATIBLE`, in order of preference). Special tokens get
a *role* (``bos``, ``eos``, ``pad``, ``unk``, ``cls``, ``sep``, ``mask``) and are matched by
role, never by their strings' bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

CONVENTIONS = ("byte_level", "sentencepiece", "wordpiece", "plain")
BOUNDARIES = ("space", "initial", "cont", "any")

# Teacher boundary -> student boundaries to try, best first. Why this order:
# - "space" tokens carry their space; WordPiece has no space tokens but drops the space
#   before a word start, so a WordPiece word start is the closest thing.
# - a WordPiece word start follows whitespace *or* punctuation / start of text. CJK text
#   (this project's corpora) has no spaces and BERT's normalizer makes every CJK character a
#   word, so an unmarked piece is the usual equivalent; a space-marked one comes last.
# - an unmarked BPE/SentencePiece piece is most often inside a word (word starts carry the
#   space marker), hence WordPiece continuation before word start.
COMPATIBLE: dict[str, tuple[str, ...]] = {
    "space": ("space", "initial"),
    "initial": ("initial", "any", "space"),
    "cont": ("cont", "any"),
    "any": ("any", "cont", "initial"),
}

ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask")
# Role -> roles that can stand in for it when the other side lacks it (BERT has no bos/eos).
ROLE_FALLBACK: dict[str, tuple[str, ...]] = {
    "bos": ("bos", "cls"), "cls": ("cls", "bos"), "eos": ("eos", "sep"), "sep": ("sep", "eos"),
    "pad": ("pad",), "unk": ("unk",), "mask": ("mask",),
}

_ROLE_NAMES = {
    "s": "bos", "bos": "bos", "begin_of_text": "bos", "startoftext": "bos", "start": "bos", "begin": "bos",
    "/s": "eos", "eos": "eos", "endoftext": "eos", "end_of_text": "eos", "end": "eos", "eot": "eos",
    "pad": "pad", "padding": "pad", "unk": "unk", "unknown": "unk",
    "cls": "cls", "sep": "sep", "mask": "mask",
}
_SPECIAL_RE = re.compile(r"^(?:<\|(?P<a>[^|<>]+)\|>|<(?P<b>/?[A-Za-z_]+)>|\[(?P<c>[A-Za-z_]+)\])$")
_BYTE_FALLBACK_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

SP_MARKER = "\u2581"  # ▁
WP_PREFIX = "##"


@dataclass(frozen=True)
class Canonical:
    """What a token stands for, independent of its tokenizer's spelling.

    data: the text bytes (UTF-8; may be a partial character for byte-level tokens) without
    the boundary marker; boundary: one of :data:`BOUNDARIES`; role: special-token role or
    ``"special"`` for a special token without a known role, None for ordinary tokens.
    """

    data: bytes
    boundary: str = "any"
    role: str | None = None

    @property
    def text(self) -> str | None:
        """The token's text to feed a tokenizer (a leading space for ``space``), or None if
        its bytes are not valid UTF-8 (a byte-level fragment of a character)."""
        try:
            s = self.data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return " " + s if self.boundary == "space" else s


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level table, unicode char -> byte (from ``transformers``)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: PLC0415

    return {c: b for b, c in bytes_to_unicode().items()}


def special_role(token: str) -> str | None:
    """Role of a special-token string (``"</s>"`` -> ``"eos"``, ``"[CLS]"`` -> ``"cls"``), or None."""
    m = _SPECIAL_RE.match(token.strip())
    if not m:
        return None
    name = (m.group("a") or m.group("b") or m.group("c") or "").lower()
    return _ROLE_NAMES.get(name)


def _split_space(data: bytes) -> tuple[bytes, str]:
    # One leading space is the word-boundary marker; a token that is only whitespace keeps
    # it as its content ("Ġ" and "▁" both stand for b" ").
    if data.startswith(b" ") and len(data) > 1:
        return data[1:], "space"
    return data, "any"


def canonicalize(token: str, convention: str, *, special: bool = False, role: str | None = None) -> Canonical:
    """Canonical form of one vocabulary string under ``convention`` (see the module doc).

    ``special`` marks a special/control token: its role comes from ``role`` or its string
    (:func:`special_role`), falling back to ``"special"``; its data is the raw string.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown tokenizer convention {convention!r}; expected one of {CONVENTIONS}")
    if special:
        return Canonical(token.encode("utf-8"), "any", role or special_role(token) or "special")
    if convention == "byte_level":
        table = byte_decoder()
        try:
            data = bytes(table[c] for c in token)
        except KeyError:
            # Not a byte-table string (e.g. an added token): it stands for its own text.
            data = token.encode("utf-8")
        data, boundary = _split_space(data)
        return Canonical(data, boundary)
    if convention == "sentencepiece":
        m = _BYTE_FALLBACK_RE.match(token)
        if m:
            return Canonical(bytes([int(m.group(1), 16)]), "any")
        data, boundary = _split_space(token.replace(SP_MARKER, " ").encode("utf-8"))
        return Canonical(data, boundary)
    if convention == "wordpiece":
        if token.startswith(WP_PREFIX) and len(token) > len(WP_PREFIX):
            return Canonical(token[len(WP_PREFIX):].encode("utf-8"), "cont")
        return Canonical(token.encode("utf-8"), "initial")
    return Canonical(token.encode("utf-8"), "any")


def infer_convention(tokens: Sequence[str], special: Sequence[bool] | None = None) -> str:
    """Guess the convention of a vocabulary from its (non-special) token strings.

    Markers are counted, not required to dominate: a Chinese SentencePiece vocabulary has
    ``▁`` only on the few pieces that start a text, a Chinese WordPiece vocabulary ``##``
    only on non-CJK continuations (BERT's normalizer makes each CJK character a word).

    SentencePiece if ``▁`` is a token, or >= 0.2 % of tokens carry ``▁`` or are ``<0xNN>``;
    else WordPiece if >= 0.5 % are ``##`` + something; else byte-level if >= 99 % of tokens
    are spelled in the GPT-2 byte table's alphabet and its non-ASCII stand-ins occur (Ġ, Ċ,
    ä...); else plain. Pass the convention explicitly when a vocabulary defeats this.
    """
    normal = [t for i, t in enumerate(tokens) if t and not (special is not None and special[i])]
    if not normal:
        return "plain"
    n = len(normal)
    sp = sum(1 for t in normal if SP_MARKER in t or _BYTE_FALLBACK_RE.match(t))
    if SP_MARKER in normal or sp >= max(2, 0.002 * n):
        return "sentencepiece"
    wp = sum(1 for t in normal if t.startswith(WP_PREFIX) and len(t) > 2 and t[2] != "#")
    if wp >= max(2, 0.005 * n):
        return "wordpiece"
    alphabet = byte_decoder()
    in_table = sum(1 for t in normal if all(c in alphabet for c in t)) / n
    # Stand-ins for bytes that are not printable ASCII (Ġ for space, Ċ for newline, ä...):
    # plain ASCII vocabularies are in the table too but never use them.
    stand_ins = any(ord(c) > 0x7E for t in normal for c in t if c in alphabet)
    if in_table > 0.99 and stand_ins:
        return "byte_level"
    return "plain"
