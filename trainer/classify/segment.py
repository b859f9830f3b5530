"""Segmenting Chinese text at several granularities, sampling pairs of different segmentations
for R-Drop (seed 000), and a vocabulary that covers words and characters.

A *segmentation* is a tuple of non-empty strings whose concatenation is exactly the input text
(whitespace and punctuation included), so any two segmentations of one sample carry the same
content at different granularities::

    南京市长江大桥 -> ('南京市', '长江', '大桥')          word   (jieba, or the gold words)
                  -> ('南京', '市', '长江', '大', '桥')   mixed  (words randomly split into chars)
                  -> ('南', '京', '市', '长', '江', '大', '桥')   char
                  -> ('南京市长', '江', '大桥')          random (random cut points)
                  -> ('南京市', '长江大桥')              bpe    (BPE with dropout, HF tokenizers)

:class:`SegmentationSampler` draws several segmentations per sample (one per configured
granularity, the stochastic ones re-drawn until they differ), de-duplicates them and picks two
different ones at random, as claims 1-3 of the seed describe. :class:`Vocab` maps tokens of any
granularity to ids: a word missing from the vocabulary backs off to its characters and an unknown
character becomes ``[UNK]``, so no text is ever dropped.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

Segmentation = tuple[str, ...]

#: Granularities the sampler knows. ``word`` uses the gold words of a sample when it has them
#: and jieba otherwise; ``jieba`` always uses jieba.
GRANULARITIES = ("char", "word", "jieba", "mixed", "random", "bpe")
#: Granularities whose output is random: re-drawn when they collide with another candidate.
STOCHASTIC = frozenset({"mixed", "random", "bpe"})

VOCAB_FORMAT = "kdstore.vocab.v1"


def char_segment(text: str) -> Segmentation:
    """One token per character (whitespace and punctuation included)."""
    return tuple(text)


def mixed_segment(words: Sequence[str], rng: random.Random, *, p_split: float = 0.5) -> Segmentation:
    """Mixed word/char granularity: each multi-character word is split into its characters with
    probability ``p_split``; single characters stay as they are."""
    out: list[str] = []
    for w in words:
        if len(w) > 1 and rng.random() < p_split:
            out.extend(w)
        else:
            out.append(w)
    return tuple(out)


def random_cut(text: str, rng: random.Random, *, p_cut: float = 0.3) -> Segmentation:
    """Cut between every two adjacent characters independently with probability ``p_cut``
    (0 gives the whole text as one token, 1 gives characters)."""
    if not text:
        return ()
    out: list[str] = []
    start = 0
    for i in range(1, len(text)):
        if rng.random() < p_cut:
            out.append(text[start:i])
            start = i
    out.append(text[start:])
    return tuple(out)


class JiebaSegmenter:
    """Word segmentation with jieba's dictionary (349k words) and HMM for unknown words.

    jieba is imported and its dictionary loaded on the first call (about 1 s; it writes a cache
    file to the temp directory), and its start-up chatter on stderr is silenced. Results are
    memoised per text because training segments the same texts every epoch.
    """

    def __init__(self, *, hmm: bool = True, cache_size: int = 500_000) -> None:
        self.hmm = hmm
        self.cache_size = cache_size
        self._tokenizer = None
        self._cache: dict[str, Segmentation] = {}

    def _load(self):
        import jieba  # noqa: PLC0415 - heavy, optional until used

        jieba.setLogLevel(logging.WARNING)
        tok = jieba.Tokenizer()
        tok.initialize()
        return tok

    def __call__(self, text: str) -> Segmentation:
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        if self._tokenizer is None:
            self._tokenizer = self._load()
        words = tuple(w for w in self._tokenizer.cut(text, HMM=self.hmm) if w)
        if len(self._cache) < self.cache_size:
            self._cache[text] = words
        return words


_DEFAULT_JIEBA: JiebaSegmenter | None = None


def default_word_segmenter() -> JiebaSegmenter:
    """One process-wide jieba segmenter, so its dictionary and memo are shared between runs."""
    global _DEFAULT_JIEBA
    if _DEFAULT_JIEBA is None:
        _DEFAULT_JIEBA = JiebaSegmenter()
    return _DEFAULT_JIEBA


class BPEDropoutSegmenter:
    """Subword segmentation with BPE-dropout (Provilkov et al. 2020) from HF ``tokenizers``.

    Trained here on raw characters (no byte-level mapping, so offsets are character offsets and
    segments are real substrings). With ``sample=True`` each merge is skipped with probability
    ``dropout``, which yields a different segmentation on most calls; ``sample=False`` gives the
    deterministic segmentation. The dropout RNG lives inside the Rust library and cannot be
    seeded, so runs that use it are not bit-reproducible.
    """

    def __init__(self, *, tokenizer_json: str, dropout: float = 0.1) -> None:
        from tokenizers import Tokenizer  # noqa: PLC0415

        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"bpe dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self._sampling = Tokenizer.from_str(tokenizer_json)
        self._sampling.model.dropout = dropout
        self._fixed = Tokenizer.from_str(tokenizer_json)
        self._fixed.model.dropout = 0.0

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 8000, dropout: float = 0.1) -> "BPEDropoutSegmenter":
        """Train a character-level BPE on ``texts`` (pre-split at whitespace and punctuation,
        which stay tokens of their own)."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: PLC0415

        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
        )
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"], show_progress=False)
        tok.train_from_iterator(texts, trainer)
        spec = tok.to_str()
        if not json.loads(spec)["model"]["merges"]:
            # Chinese has thousands of characters: a vocab_size below the alphabet learns nothing.
            raise ValueError(
                f"BPE vocab_size={vocab_size} leaves no room for merges (the alphabet alone has "
                f"{tok.get_vocab_size()} symbols): raise it above the number of distinct characters"
            )
        return cls(tokenizer_json=spec, dropout=dropout)

    def to_json(self) -> str:
        return self._fixed.to_str()

    def __call__(self, text: str, *, sample: bool = True) -> Segmentation:
        enc = (self._sampling if sample else self._fixed).encode(text, add_special_tokens=False)
        # Rebuild the segmentation from character offsets rather than token strings: unknown
        # characters come back as "[UNK]" and whitespace is dropped by the pre-tokenizer, but
        # offsets still say which characters each token covers. Gaps become tokens of their own.
        cuts = {0, len(text)}
        for start, end in enc.offsets:
            cuts.add(start)
            cuts.add(end)
        bounds = sorted(c for c in cuts if 0 <= c <= len(text))
        return tuple(text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a)


class SegmentationSampler:
    """Draws segmentations of one text at the configured granularities and picks pairs.

    Args:
        granularities: names from :data:`GRANULARITIES`, e.g. ``("word", "mixed", "char")``.
        p_split: probability that ``mixed`` splits a multi-character word into characters.
        p_cut: cut probability per character boundary for ``random``.
        word_segmenter: callable text -> words (default: a lazily loaded :class:`JiebaSegmenter`).
        bpe: a trained :class:`BPEDropoutSegmenter`; required when ``"bpe"`` is requested.
        max_tries: redraws of a stochastic granularity that collides with an earlier candidate.
    """

    def __init__(
        self,
        *,
        granularities: Sequence[str],
        p_split: float = 0.5,
        p_cut: float = 0.3,
        word_segmenter=None,
        bpe: BPEDropoutSegmenter | None = None,
        max_tries: int = 4,
    ) -> None:
        grans = tuple(granularities)
        if not grans:
            raise ValueError("at least one granularity is needed")
        unknown = [g for g in grans if g not in GRANULARITIES]
        if unknown:
            raise ValueError(f"unknown granularity {unknown}: choose from {GRANULARITIES}")
        if "bpe" in grans and bpe is None:
            raise ValueError("granularity 'bpe' needs a trained BPEDropoutSegmenter (bpe=...)")
        for name, p in (("p_split", p_split), ("p_cut", p_cut)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self.granularities = grans
        self.p_split = p_split
        self.p_cut = p_cut
        self.word_segmenter = word_segmenter if word_segmenter is not None else default_word_segmenter()
        self.bpe = bpe
        self.max_tries = max_tries

    def words(self, text: str, gold: Sequence[str] | None = None) -> Segmentation:
        """Word granularity: the gold words when given (checked against the text), else jieba."""
        if gold:
            if "".join(gold) != text:
                raise ValueError(f"gold words do not concatenate to the text: {text[:40]!r}")
            return tuple(gold)
        return self.word_segmenter(text)

    def segment(
        self, text: str, granularity: str, *, rng: random.Random, words: Sequence[str] | None = None
    ) -> Segmentation:
        """One segmentation of ``text`` at ``granularity``; ``words`` are gold words if known."""
        if granularity == "char":
            return char_segment(text)
        if granularity == "word":
            return self.words(text, words)
        if granularity == "jieba":
            return self.word_segmenter(text)
        if granularity == "mixed":
            return mixed_segment(self.words(text, words), rng, p_split=self.p_split)
        if granularity == "random":
            return random_cut(text, rng, p_cut=self.p_cut)
        if granularity == "bpe":
            if self.bpe is None:
                raise ValueError("granularity 'bpe' needs a trained BPEDropoutSegmenter (bpe=...)")
            return self.bpe(text, sample=True)
        raise ValueError(f"unknown granularity {granularity!r}: choose from {GRANULARITIES}")

    def candidates(
        self, text: str, *, rng: random.Random, words: Sequence[str] | None = None
    ) -> list[Segmentation]:
        """Distinct segmentations, at most one per configured granularity, in that order.

        A stochastic granularity whose draw equals an earlier candidate is redrawn up to
        ``max_tries`` times; if it still collides (e.g. a one-character text) it is left out.
        """
        out: list[Segmentation] = []
        seen: set[Segmentation] = set()
        for g in self.granularities:
            tries = self.max_tries if g in STOCHASTIC else 1
            for _ in range(tries):
                seg = self.segment(text, g, rng=rng, words=words)
                if seg not in seen:
                    seen.add(seg)
                    out.append(seg)
                    break
        return out

    def distinct(
        self, text: str, n: int, *, rng: random.Random, words: Sequence[str] | None = None
    ) -> list[Segmentation]:
        """Up to ``n`` pairwise different segmentations: the candidates first, then more draws of
        the stochastic granularities. Fewer than ``n`` only when the text does not allow more."""
        out = self.candidates(text, rng=rng, words=words)[:n]
        seen = set(out)
        stochastic = [g for g in self.granularities if g in STOCHASTIC]
        misses = 0
        while len(out) < n and stochastic and misses < self.max_tries * n:
            seg = self.segment(text, rng.choice(stochastic), rng=rng, words=words)
            if seg in seen:
                misses += 1
                continue
            seen.add(seg)
            out.append(seg)
        return out

    def sample_pair(
        self, text: str, *, rng: random.Random, words: Sequence[str] | None = None
    ) -> tuple[Segmentation, Segmentation]:
        """Two different segmentations picked at random among the candidates.

        When only one segmentation exists (a single configured deterministic granularity, or a
        text too short to cut differently) both elements are that one: the two passes then
        differ only by their dropout masks, which is plain R-Drop.
        """
        cands = self.candidates(text, rng=rng, words=words)
        if len(cands) == 1:
            return cands[0], cands[0]
        a, b = rng.sample(range(len(cands)), 2)
        return cands[a], cands[b]

    def sample_one(self, text: str, *, rng: random.Random, words: Sequence[str] | None = None) -> Segmentation:
        """One segmentation at a granularity drawn uniformly (single-pass training)."""
        return self.segment(text, rng.choice(self.granularities), rng=rng, words=words)


class Vocab:
    """Token <-> id table over words and characters; id 0 is ``[PAD]``, id 1 is ``[UNK]``.

    :meth:`encode` never loses text: a token missing from the table that has several characters
    backs off to its characters, and only a character missing from the table becomes ``[UNK]``.
    """

    PAD = "[PAD]"
    UNK = "[UNK]"

    def __init__(self, *, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tokens[:2] != [self.PAD, self.UNK]:
            raise ValueError(f"a vocabulary starts with {self.PAD!r}, {self.UNK!r}; got {tokens[:2]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary tokens must be unique")
        self.itos = tokens
        self.stoi = {t: i for i, t in enumerate(tokens)}

    pad_id = 0
    unk_id = 1

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    @classmethod
    def build(
        cls,
        segmentations: Iterable[Sequence[str]],
        *,
        min_freq: int = 2,
        min_char_freq: int = 1,
        max_size: int | None = None,
    ) -> "Vocab":
        """Count tokens over training segmentations (of any granularities) and keep characters
        seen ``min_char_freq`` times and multi-character tokens seen ``min_freq`` times, most
        frequent first (ties by token, for determinism). ``max_size`` caps the number of
        multi-character tokens after all kept characters, so character coverage never shrinks."""
        counts: Counter[str] = Counter()
        for seg in segmentations:
            counts.update(seg)
        # Characters are counted wherever they occur, inside words too: a character seen only
        # inside words still needs an id for the back-off path of an unknown word.
        chars: Counter[str] = Counter()
        for tok, c in counts.items():
            for ch in tok:
                chars[ch] += c
        char_list = [ch for ch, c in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_char_freq]
        words = [t for t, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if len(t) > 1 and c >= min_freq]
        if max_size is not None:
            room = max(0, max_size - 2 - len(char_list))
            words = words[:room]
        specials = {cls.PAD, cls.UNK}
        body = [t for t in char_list + words if t not in specials]
        return cls(tokens=[cls.PAD, cls.UNK, *body])

    def encode(self, tokens: Sequence[str], *, max_len: int | None = None) -> list[int]:
        """Token ids; out-of-vocabulary words back off to characters, unknown characters map to
        ``[UNK]``; truncated to ``max_len`` ids (after back-off)."""
        ids: list[int] = []
        stoi = self.stoi
        for tok in tokens:
            i = stoi.get(tok)
            if i is not None:
                ids.append(i)
            elif len(tok) == 1:
                ids.append(self.unk_id)
            else:
                ids.extend(stoi.get(ch, self.unk_id) for ch in tok)
            if max_len is not None and len(ids) >= max_len:
                return ids[:max_len]
        return ids

    def coverage(self, segmentations: Iterable[Sequence[str]]) -> dict[str, float]:
        """Share of tokens found as-is, backed off to characters, and characters that are
        ``[UNK]`` (for logs and the benchmark)."""
        n = hit = backoff = unk = 0
        for seg in segmentations:
            for tok in seg:
                n += 1
                if tok in self.stoi:
                    hit += 1
                elif len(tok) > 1:
                    backoff += 1
                    unk += sum(ch not in self.stoi for ch in tok)
                else:
                    unk += 1
        n = max(n, 1)
        return {"in_vocab": hit / n, "backoff": backoff / n, "unk_chars_per_token": unk / n}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(
            json.dumps({"format": VOCAB_FORMAT, "tokens": self.itos}, ensure_ascii=False), encoding="utf-8"
        )

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != VOCAB_FORMAT:
            raise ValueError(f"{path}: not a {VOCAB_FORMAT} vocabulary (format={data.get('format')!r})")
        return cls(tokens=data["tokens"])
