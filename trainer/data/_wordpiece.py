"""Deterministic WordPiece training for text without spaces (Chinese), used by
:func:`trainer.data.tokenizers.train_tokenizer`.

Why not ``WordPieceTrainer``: it gives the ``##x`` tokens ids in hash-map order, and those
ids break merge ties, so two runs on the same text learn different vocabularies
(huggingface/tokenizers#1794; measured here: 64 of 16,000 tokens differ on People's Daily).
It runs the BPE trainer internally; so do we, on words whose non-initial characters are
replaced by private-use stand-ins, which puts every ``##x`` in the sorted base alphabet.

The pre-tokenizer: ``BertPreTokenizer`` (whitespace and punctuation; CJK runs stay whole,
so multi-character words are learned), then every character without a ``##`` form is
isolated (so an unknown character becomes one ``[UNK]``, not its whole clause), then words
are cut into chunks of 100 characters (BERT's ``max_input_chars_per_word``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Iterator, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

_WP_PREFIX = "##"
_WP_MAX_WORD = 100  # BERT's max_input_chars_per_word; longer words are cut into chunks
_WP_ALPHABET_SHARE = 0.75  # default cap: alphabet (both forms) <= this share of the vocabulary
_PUA_START = 0xF0000  # Supplementary Private Use Area-A/B: stand-ins for "##x" during training
_PUA_END = 0x10FFFD


def train_wordpiece(texts: Iterable[str], *, vocab_size: int, specials: Sequence[str], limit_alphabet: int | None,
                    min_frequency: int, show_progress: bool) -> tuple[Tokenizer, dict[str, Any]]:
    """A WordPiece tokenizer (``##`` continuations, Chinese words kept whole) and training facts.

    ``specials`` take ids ``0..len-1``, ``specials[1]`` is the unknown token. Returns the
    tokenizer and a dict with the alphabet sizes and its character coverage of ``texts``.
    """
    specials = list(specials)
    bert = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in bert.pre_tokenize_str(text))
    char_count: Counter[str] = Counter()
    inner: set[str] = set()  # characters seen after the first position of a word
    for w, c in words.items():
        for i, ch in enumerate(w):
            char_count[ch] += c
            if i:
                inner.add(ch)
    by_freq = sorted(char_count, key=lambda ch: (-char_count[ch], ch))
    if limit_alphabet is None:
        budget, n, used = int(vocab_size * _WP_ALPHABET_SHARE) - len(specials), 0, 0
        for ch in by_freq:
            cost = 1 + (ch in inner)
            if used + cost > budget:
                break
            used, n = used + cost, n + 1
    else:
        if limit_alphabet < 1:
            raise ValueError(f"limit_alphabet must be >= 1, got {limit_alphabet}")
        n = limit_alphabet
    alphabet = sorted(by_freq[:n])
    continuing = sorted(ch for ch in alphabet if ch in inner)
    needed = len(specials) + len(alphabet) + len(continuing)
    if needed > vocab_size:
        raise ValueError(f"WordPiece alphabet needs {needed} tokens ({len(alphabet)} characters, {len(continuing)} "
                         f"'##' forms, {len(specials)} specials) > vocab_size={vocab_size}: lower limit_alphabet "
                         "or raise vocab_size")

    steps = _wordpiece_pre_tokenizers(continuing)
    rest = pre_tokenizers.Sequence(steps[1:])  # what follows BertPreTokenizer
    to_pua, from_pua = _pua_table(continuing, set(char_count))
    known = set(alphabet)
    train_words: Counter[str] = Counter()
    for w, c in words.items():
        for piece, _ in rest.pre_tokenize_str(w):
            if len(piece) == 1 and piece not in known:
                continue  # an [UNK] at encode time: nothing to learn
            train_words[piece[0] + piece[1:].translate(to_pua)] += c

    # The BPE trainer is what WordPieceTrainer runs; with every "##x" present as its own
    # base character (sorted alphabet) its ids, hence merge tie-breaks, are deterministic.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=min_frequency,
        initial_alphabet=alphabet + [to_pua[ord(ch)] for ch in continuing], show_progress=show_progress)
    bpe.train_from_iterator(_repeat_words(train_words), trainer)

    vocab: dict[str, int] = {}
    for token, tid in bpe.get_vocab(with_added_tokens=True).items():
        if token not in specials and token[0] in from_pua:
            token = _WP_PREFIX + "".join(from_pua.get(ch, ch) for ch in token)
        elif token not in specials:
            token = token[0] + "".join(from_pua.get(ch, ch) for ch in token[1:])
        vocab[token] = tid
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=specials[1], continuing_subword_prefix=_WP_PREFIX,
                                     max_input_chars_per_word=_WP_MAX_WORD))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.WordPiece(prefix=_WP_PREFIX, cleanup=False)
    covered = sum(char_count[ch] for ch in alphabet) / max(1, sum(char_count.values()))
    return tok, {"alphabet": len(alphabet), "continuing_alphabet": len(continuing),
                 "corpus_characters": len(char_count), "alphabet_char_coverage": round(covered, 6)}


def _wordpiece_pre_tokenizers(continuing: list[str]) -> list[pre_tokenizers.PreTokenizer]:
    """Bert split (whitespace, punctuation), then isolate chars without a ``##`` form, then chunk."""
    steps = [pre_tokenizers.BertPreTokenizer()]
    cls = _char_class(continuing)
    if cls:
        steps.append(pre_tokenizers.Split(Regex(f"[^{cls}]"), behavior="isolated"))
    else:  # no character can continue a word: every character is a word
        steps.append(pre_tokenizers.Split(Regex("."), behavior="isolated"))
    steps.append(pre_tokenizers.Split(Regex(f".{{{_WP_MAX_WORD}}}"), behavior="isolated"))
    return steps


def _char_class(chars: list[str]) -> str:
    """An Oniguruma character-class body for ``chars`` (sorted), as ``\\x{..}`` ranges."""
    parts: list[str] = []
    codes = sorted(ord(c) for c in chars)
    i = 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        parts.append(f"\\x{{{codes[i]:X}}}" if i == j else f"\\x{{{codes[i]:X}}}-\\x{{{codes[j]:X}}}")
        i = j + 1
    return "".join(parts)


def _pua_table(chars: list[str], used: set[str]) -> tuple[dict[int, str], dict[str, str]]:
    """Map each continuing character to a private-use stand-in the corpus does not use."""
    to_pua: dict[int, str] = {}
    code = _PUA_START
    for ch in chars:
        while chr(code) in used:
            code += 1
        if code > _PUA_END:
            raise ValueError(f"too many distinct characters ({len(chars)}) for WordPiece training; "
                             "pass limit_alphabet")
        to_pua[ord(ch)] = chr(code)
        code += 1
    return to_pua, {v: chr(k) for k, v in to_pua.items()}


def _repeat_words(counts: Counter[str], per_line: int = 256) -> Iterator[str]:
    """Lines of space-joined words, each word repeated by its count (sorted: reproducible)."""
    line: list[str] = []
    for word in sorted(counts):
        for _ in range(counts[word]):
            line.append(word)
            if len(line) == per_line:
                yield " ".join(line)
                line = []
    if line:
        yield " ".join(line)
