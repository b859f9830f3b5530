"""Train, cache, identify and byte-map tokenizers built with Hugging Face ``tokenizers``.

Three conventions, each saved as a standard directory that
``transformers.AutoTokenizer.from_pretrained(dir)`` loads (``tokenizer.json`` +
``tokenizer_config.json``), with the special tokens registered by role:

============  ==========================================  ================================
kind          convention                                  roles (bos / eos / unk / pad)
============  ==========================================  ================================
``bpe``       GPT-2 byte-level BPE: ByteLevel regex       ``<|endoftext|>`` ×3 (as GPT-2:
              pre-tokenizer and decoder, ``Ġ`` = space,   byte-level never needs unk) /
              all 256 bytes in the base alphabet          ``<|pad|>``
``wordpiece`` BERT WordPiece: ``##`` continuation pieces  ``[CLS]`` / ``[SEP]`` / ``[UNK]``
              (see *Chinese WordPiece* below)             / ``[PAD]``; also cls, sep, mask
``unigram``   SentencePiece-style Unigram: Metaspace      ``<s>`` / ``</s>`` / ``<unk>`` /
              ``▁`` (prepended to the text's first        ``<pad>``
              piece), byte fallback ``<0x00>``…``<0xFF>``
============  ==========================================  ================================

No kind normalizes text (no lowercasing, no NFKC: full-width ``１`` stays ``１``) and no
kind inserts special tokens on ``encode``: callers add bos/eos/cls by role
(``tok.bos_token_id`` ...), so an encoding holds exactly the text's content.

What ``decode(encode(x))`` and the token bytes (:func:`token_bytes`) give back:

* ``bpe``: exactly ``x``; the concatenated token bytes are ``x.encode()`` exactly.
* ``unigram``: ``x`` when ``x`` does not start with a space; the token bytes concatenate
  to ``b" " + x.encode()`` (SentencePiece's prepended ``▁``; nothing is prepended when ``x``
  already starts with a space). Characters never seen in training come back exactly via
  byte fallback. Two literal inputs are ambiguous by the convention itself: ``▁`` (U+2581)
  reads back as a space, and the text ``<0xNN>`` may be encoded as the byte piece.
* ``wordpiece``: whitespace (Unicode White_Space) is not kept: the decoder joins words with
  one space, and the token bytes concatenate to ``x`` with all whitespace removed. A
  character outside the learned alphabet becomes one ``[UNK]`` (token bytes ``b"[UNK]"``;
  its offsets span exactly that character), never a whole word.

Vocabulary at 8,000 trained on People's Daily train, on its validation split (tokens per
character): bpe 0.674, unigram 0.690, wordpiece 0.767 (0.35% of characters ``[UNK]``: the
alphabet is capped at 3,011 characters; at 16,000 all 4,627 fit: 0.673, 0.04% ``[UNK]``).

*Chinese WordPiece.* BERT's recipe (``BertNormalizer(handle_chinese_chars=True)``) isolates
every CJK character, so its vocabulary has no multi-character Chinese words. Here only
whitespace and punctuation split words (``BertPreTokenizer``), so Han runs are words and the
vocabulary learns pieces like ``中国`` ``##人民`` ``##银行``. Every character then needs a
``##`` form too; for a large alphabet (People's Daily: 4,627 characters) the alphabet is
capped by frequency to at most 3/4 of the vocabulary (both forms counted) unless
``limit_alphabet`` says otherwise. Characters without a ``##`` form are isolated by the
pre-tokenizer, so ``[UNK]`` replaces one character, never a clause. Details in
:mod:`trainer.data._wordpiece`.

*Determinism.* Same inputs, same ``tokenizer.json``. Byte-level BPE training is
deterministic as is. ``WordPieceTrainer`` is not (huggingface/tokenizers#1794), see
:mod:`trainer.data._wordpiece`. ``UnigramTrainer`` EM sums differ between runs in the last
bits (parallel reductions) and pruned characters are re-added with scores stepped in
hash-set order: those characters all get the minimum score, scores are rounded to 1e-4 and
pieces are ordered by (score, piece).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Union

import numpy as np
import tokenizers as _hf_tokenizers
import xxhash
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kdstore.tokenizer import (  # noqa: F401  (re-exported: the tokenizer identity lives in kdstore)
    ROLE_NAMES, TokenizerLike, load_tokenizer, token_bytes, tokenizer_hash, vocab_table,
)
from trainer.data._wordpiece import train_wordpiece

if TYPE_CHECKING:  # transformers is imported lazily: it costs seconds to import
    from transformers import PreTrainedTokenizerBase

_LOG = logging.getLogger(__name__)

Kind = Literal["bpe", "wordpiece", "unigram"]
KINDS: tuple[str, ...] = ("bpe", "wordpiece", "unigram")
CORPORA: tuple[str, ...] = ("peoples_daily", "sentiment")
# Bump when a change in this file changes what training produces (part of the cache key).
CODE_VERSION = 1
TRAINING_INFO = "kdstore_training.json"

# Special tokens of each kind, in id order (ids 0..n-1), and their transformers roles.
_SPECIALS: dict[str, tuple[str, ...]] = {
    "bpe": ("<|endoftext|>", "<|pad|>"),
    "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "unigram": ("<unk>", "<s>", "</s>", "<pad>"),
}
_ROLES: dict[str, dict[str, str]] = {
    "bpe": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|pad|>"},
    "wordpiece": {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"},
    "unigram": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
}

_MIN_FREQUENCY = 2  # BPE/WordPiece: no merge learned from a single occurrence
_UNIGRAM_BYTES = 256
_UNIGRAM_SCORE_DECIMALS = 4
_HF_UNIGRAM_PENALTY_STEP = 1e-4  # tokenizers' UnigramTrainer::finalize min_score_penalty_delta
# Unigram trainer settings. The defaults (1M seed pieces, shrink 0.75, 2 EM sub-iterations)
# took 146 CPU-s on People's Daily train at vocab 8000; 3x-vocab seeds halved per round take
# 12 CPU-s for the same validation tokens/char (0.6894 vs 0.6895).
_UNIGRAM_TRAINER = {"shrinking_factor": 0.5, "n_sub_iterations": 1, "max_piece_length": 16}
_UNIGRAM_SEEDS_PER_PIECE = 3
_UNIGRAM_MIN_SEEDS = 20_000


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def train_tokenizer(
    *,
    kind: Kind,
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    limit_alphabet: int | None = None,
    show_progress: bool = False,
) -> Path:
    """Train a tokenizer of ``kind`` on ``texts`` and save it as a transformers directory.

    Args:
        kind: ``"bpe"`` (byte-level, GPT-2), ``"wordpiece"`` (BERT ``##``) or ``"unigram"``
            (SentencePiece ``▁`` with byte fallback); see the module docstring.
        texts: training texts (one document or line each; empty strings are skipped).
        vocab_size: upper bound on ``len(tokenizer)``, special tokens (and Unigram's 256
            byte pieces) included; reached unless the corpus offers too few merges.
        out_dir: a new or empty directory; receives ``tokenizer.json``,
            ``tokenizer_config.json`` and ``kdstore_training.json`` (counts, seconds).
        limit_alphabet: WordPiece only: keep this many most frequent characters (the rest
            become ``[UNK]``); default: all that fit in 3/4 of ``vocab_size``.
        show_progress: show the ``tokenizers`` trainer's progress bars.

    Returns:
        ``Path(out_dir)``, loadable with ``AutoTokenizer.from_pretrained``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {KINDS}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    minimum = {"bpe": 256 + len(_SPECIALS["bpe"]), "wordpiece": len(_SPECIALS["wordpiece"]) + 2,
               "unigram": _UNIGRAM_BYTES + len(_SPECIALS["unigram"]) + 2}[kind]
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small for {kind!r}: at least {minimum} "
                         "(special tokens and the base alphabet)")
    if limit_alphabet is not None and kind != "wordpiece":
        raise ValueError(f"limit_alphabet applies to 'wordpiece' only, not {kind!r} "
                         "(byte-level BPE has 256 bytes; Unigram falls back to bytes)")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: output directory exists and is not empty; pass a new directory")

    stats = _TextStats()
    stream = stats.iterate(texts)
    first = next(stream, None)
    if first is None:
        raise ValueError("no training text: texts is empty or every text is an empty string")
    stream = itertools.chain([first], stream)
    start = time.perf_counter()
    if kind == "bpe":
        tok, extra = _train_bpe(stream, vocab_size, show_progress), {}
    elif kind == "wordpiece":
        tok, extra = train_wordpiece(stream, vocab_size=vocab_size, specials=_SPECIALS["wordpiece"],
                                     limit_alphabet=limit_alphabet, min_frequency=_MIN_FREQUENCY,
                                     show_progress=show_progress)
    else:
        tok, extra = _train_unigram(stream, vocab_size, show_progress), {}
    seconds = time.perf_counter() - start
    size = tok.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:  # the trainers keep every base character even past vocab_size
        raise ValueError(
            f"{kind} tokenizer came out with {size} tokens > vocab_size={vocab_size}: the corpus has more "
            f"distinct characters than fit; raise vocab_size"
            + (" or lower limit_alphabet" if kind == "wordpiece" else ""))

    out.mkdir(parents=True, exist_ok=True)
    _wrap(tok, kind).save_pretrained(str(out))
    info = {"kind": kind, "vocab_size_requested": vocab_size, "vocab_size": size, "texts": stats.texts,
            "chars": stats.chars, "train_seconds": round(seconds, 3), "tokenizers_version": _hf_tokenizers.__version__,
            "code_version": CODE_VERSION, **extra}
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _LOG.info("trained %s tokenizer: %d tokens from %d texts (%d chars) in %.1fs -> %s",
              kind, size, stats.texts, stats.chars, seconds, out)
    return out


class _TextStats:
    """Counts texts and characters while streaming them into a trainer; checks types."""

    def __init__(self) -> None:
        self.texts = 0
        self.chars = 0

    def iterate(self, texts: Iterable[str]) -> Iterator[str]:
        if isinstance(texts, (str, bytes)):
            raise TypeError("texts must be an iterable of strings, not a single string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
            if text:
                self.texts += 1
                self.chars += len(text)
                yield text


def _train_bpe(texts: Iterator[str], vocab_size: int, show_progress: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk token: every input is a byte sequence
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets cover the exact bytes (spaces included) for alignment.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(_SPECIALS["bpe"]), min_frequency=_MIN_FREQUENCY,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer)
    return tok


def _train_unigram(texts: Iterator[str], vocab_size: int, show_progress: bool) -> Tokenizer:
    tok = Tokenizer(models.Unigram())
    # "first": only the text's first piece gets the ▁ (not the text after a special token).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = list(_SPECIALS["unigram"])
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - _UNIGRAM_BYTES, special_tokens=specials, unk_token=specials[0],
        seed_size=max(_UNIGRAM_MIN_SEEDS, _UNIGRAM_SEEDS_PER_PIECE * vocab_size), show_progress=show_progress,
        **_UNIGRAM_TRAINER)
    try:
        tok.train_from_iterator(texts, trainer)
    except Exception as exc:  # the trainer raises a bare Exception
        if "not large enough to contain all chars" not in str(exc):
            raise
        raise ValueError(f"vocab_size={vocab_size} is too small for a Unigram vocabulary of this corpus: every "
                         f"distinct character is kept as a piece, plus {_UNIGRAM_BYTES} byte pieces and "
                         f"{len(specials)} specials; raise vocab_size") from None

    spec = json.loads(tok.to_str())
    trained = spec["model"]["vocab"]
    if [p for p, _ in trained[: len(specials)]] != specials:
        raise RuntimeError(f"unexpected Unigram trainer output: specials not first ({trained[:len(specials)]})")
    byte_pieces = [f"<0x{b:02X}>" for b in range(_UNIGRAM_BYTES)]
    taken = set(specials) | set(byte_pieces)
    pieces = _flatten_required_char_tail([(p, s) for p, s in trained[len(specials):] if p not in taken])
    # Canonical order and rounded scores: EM sums differ in the last bits between runs.
    pieces = sorted(((p, round(s, _UNIGRAM_SCORE_DECIMALS)) for p, s in pieces), key=lambda ps: (-ps[1], ps[0]))
    # Byte pieces score below every learned piece: they serve the fallback, which does not
    # look at scores, and should not win the Viterbi search for literal "<0xNN>" text.
    byte_score = round(min((s for _, s in pieces), default=0.0) - 10.0, _UNIGRAM_SCORE_DECIMALS)
    spec["model"]["vocab"] = ([[p, 0.0] for p in specials] + [[p, byte_score] for p in byte_pieces]
                              + [[p, s] for p, s in pieces])
    spec["model"]["unk_id"] = 0
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    # Llama's SentencePiece decoder: ▁ -> space, <0xNN> -> bytes, drop the prepended space.
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def _flatten_required_char_tail(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Give every pruned-but-required character the minimum score.

    ``UnigramTrainer`` re-adds each training character that EM pruned with the score
    ``min_score + k * 1e-4``, k counting in hash-set order, which differs between runs.
    These characters are the contiguous run k = 0, 1, ... of single-character pieces above
    the minimum; the 1e-4 steps carry no information, so they all get the minimum.
    """
    if not pieces:
        return pieces
    low = min(s for _, s in pieces)
    steps: dict[str, int] = {}
    for piece, score in pieces:
        if len(piece) == 1:
            k = (score - low) / _HF_UNIGRAM_PENALTY_STEP
            if abs(k - round(k)) < 1e-6:
                steps[piece] = round(k)
    present, run = set(steps.values()), 0
    while run in present:
        run += 1
    return [(p, low if steps.get(p, run) < run else s) for p, s in pieces]


def _wrap(tok: Tokenizer, kind: str) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **_ROLES[kind])


# ---------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------
def _corpus_texts(corpus: str) -> list[str]:
    from trainer.data import corpora  # noqa: PLC0415

    if corpus == "peoples_daily":
        return [s.text for s in corpora.peoples_daily("train")]
    if corpus == "sentiment":
        return [r.text for r in corpora.sentiment("train")]
    raise ValueError(f"unknown corpus {corpus!r}: expected one of {CORPORA}")


def cache_key(*, kind: str, vocab_size: int, corpus: str) -> str:
    """Hex xxh3-64 of what determines a prepared tokenizer (inputs, code and library version)."""
    payload = {"kind": kind, "vocab_size": vocab_size, "corpus": corpus, "split": "train",
               "code_version": CODE_VERSION, "tokenizers": _hf_tokenizers.__version__}
    return xxhash.xxh3_64_hexdigest(json.dumps(payload, sort_keys=True).encode("utf-8"))


def prepare_tokenizer(*, kind: Kind, vocab_size: int, cache_dir: str | Path, corpus: str = "peoples_daily",
                      show_progress: bool = False) -> Path:
    """Train a tokenizer on a corpus' train split once; later calls return the cached directory.

    The directory is ``cache_dir/<corpus>-<kind>-<vocab_size>-<cache_key>``. It is written
    under a temporary name and renamed into place, so a crash never leaves a half-written
    cache and concurrent callers end up sharing one copy.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {KINDS}")
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}: expected one of {CORPORA}")
    cache = Path(cache_dir)
    final = cache / f"{corpus}-{kind}-{vocab_size}-{cache_key(kind=kind, vocab_size=vocab_size, corpus=corpus)}"
    if (final / "tokenizer.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{final.name}.tmp-"))
    try:
        train_tokenizer(kind=kind, texts=_corpus_texts(corpus), vocab_size=vocab_size, out_dir=tmp,
                        show_progress=show_progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").is_file():
                raise
            _LOG.info("%s was prepared concurrently; using that copy", final)  # ours is discarded below
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


