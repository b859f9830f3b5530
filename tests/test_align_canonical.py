"""Token canonicalisation across conventions, convention inference, the student adapter."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align_synth import corpus_tokenizers
from kdstore.align.canonical import Canonical, byte_decoder, canonicalize, infer_convention, special_role
from kdstore.align.student import char_to_byte, load_student, refine_byte_offsets

B2U = {b: c for c, b in byte_decoder().items()}


def bl(text: str) -> str:
    """Byte-level (GPT-2) spelling of a text."""
    return "".join(B2U[b] for b in text.encode("utf-8"))


@pytest.mark.parametrize(
    "token, convention, expected",
    [
        ("Ġthe", "byte_level", Canonical(b"the", "space")),
        ("the", "byte_level", Canonical(b"the", "any")),
        ("Ġ", "byte_level", Canonical(b" ", "any")),  # whitespace-only token keeps its space
        ("ĠĠ", "byte_level", Canonical(b" ", "space")),  # a run of two spaces
        ("Ċ", "byte_level", Canonical(b"\n", "any")),
        (bl("中国"), "byte_level", Canonical("中国".encode(), "any")),
        (bl(" 北京"), "byte_level", Canonical("北京".encode(), "space")),
        ("ä¸", "byte_level", Canonical(b"\xe4\xb8", "any")),  # fragment of 中 (e4 b8 ad)
        ("▁the", "sentencepiece", Canonical(b"the", "space")),
        ("▁", "sentencepiece", Canonical(b" ", "any")),
        ("中国", "sentencepiece", Canonical("中国".encode(), "any")),
        ("<0xE4>", "sentencepiece", Canonical(b"\xe4", "any")),
        ("##ing", "wordpiece", Canonical(b"ing", "cont")),
        ("##", "wordpiece", Canonical(b"##", "initial")),  # the literal text "##"
        ("中", "wordpiece", Canonical("中".encode(), "initial")),
        ("１９９８", "plain", Canonical("１９９８".encode(), "any")),
    ],
)
def test_canonicalize_golden(token, convention, expected):
    assert canonicalize(token, convention) == expected


@given(st.text(min_size=1, max_size=12).filter(lambda s: not s.startswith(" ")))
@settings(max_examples=200, deadline=None)
def test_same_text_is_canonically_equal_across_conventions(text):
    # The same text after a space: Ġ-spelled, ▁-spelled; inside a word: bare BPE, WordPiece ##.
    assert canonicalize(bl(" " + text), "byte_level") == canonicalize("▁" + text.replace(" ", "▁"), "sentencepiece")
    assert canonicalize(bl(text), "byte_level").data == canonicalize("##" + text, "wordpiece").data == text.encode()
    assert canonicalize(bl(" " + text), "byte_level").text == " " + text


@pytest.mark.parametrize(
    "token, role",
    [("<s>", "bos"), ("</s>", "eos"), ("<|endoftext|>", "eos"), ("<|begin_of_text|>", "bos"), ("[CLS]", "cls"),
     ("[SEP]", "sep"), ("<pad>", "pad"), ("[PAD]", "pad"), ("<unk>", "unk"), ("[MASK]", "mask"), ("<|im_start|>", None),
     ("hello", None)],
)
def test_special_roles(token, role):
    assert special_role(token) == role
    assert canonicalize(token, "plain", special=True).role == (role or "special")


def test_infer_convention_on_lists():
    assert infer_convention(["Ġthe", "the", "Ġa", "ä¸Ń", "x"] * 10) == "byte_level"
    assert infer_convention(["▁the", "the", "a", "b"] * 10) == "sentencepiece"
    assert infer_convention(["the", "##s", "a", "##ing"] * 10) == "wordpiece"
    assert infer_convention(["中", "国", "人"] * 10) == "plain"
    # Special tokens do not count as evidence.
    assert infer_convention(["[CLS]", "中", "国"], special=[True, False, False]) == "plain"


@pytest.mark.parametrize("kind, convention", [("bpe", "byte_level"), ("wordpiece", "wordpiece"), ("unigram", "sentencepiece")])
def test_real_tokenizers_conventions(kind, convention):
    tk = corpus_tokenizers()[kind]
    s = load_student(tk)
    assert s.convention == convention
    # The string heuristic agrees with the tokenizer's own configuration.
    assert infer_convention(s.tokens, s.special) == convention
    assert s.vocab_size == len(tk)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_student_roles_come_from_transformers(kind):
    tk = corpus_tokenizers()[kind]
    from_dir = load_student(tk.name_or_path)
    for s in (load_student(tk), from_dir):
        for role in ("bos", "eos", "pad", "unk"):
            assert s.roles[role] == getattr(tk, f"{role}_token_id"), role
    assert from_dir.fingerprint == load_student(tk).fingerprint


def test_student_roles_from_strings_without_transformers():
    # A bare tokenizers.Tokenizer has no roles: they are read off the special strings.
    s = load_student(corpus_tokenizers()["wordpiece"].backend_tokenizer)
    assert {r: s.tokens[i] for r, i in s.roles.items()} == {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
    u = load_student(corpus_tokenizers()["unigram"].backend_tokenizer)
    assert {r: u.tokens[i] for r, i in u.roles.items()} == {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}


def test_load_student_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="student tokenizer not found"):
        load_student(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_student(tmp_path / "empty")
    with pytest.raises(TypeError, match="cannot use int"):
        load_student(3)


def test_pieces_do_not_add_a_prefix_space():
    uni = load_student(corpus_tokenizers()["unigram"])
    # The running-text tokenizer prepends ▁ (a separate piece in a Chinese vocabulary) ...
    assert uni.tokenizer.encode("中国", add_special_tokens=False).tokens[0] == "▁"
    # ... the spelling of a token's text does not, so the first piece is real text.
    pcs = uni.pieces(["中国", " 中国"])
    assert "▁" not in uni.tokens[pcs[0][0]]
    assert uni.tokens[pcs[1][0]].startswith("▁")


def test_char_to_byte_and_refined_offsets():
    text = "a中😀b"
    assert char_to_byte(text).tolist() == [0, 1, 4, 8, 9]
    bpe = load_student(corpus_tokenizers()["bpe"])
    for text in ["北京市长江大桥", "１９９８年，中国  ABC ok", "😀😀 x"]:
        ids, bs, be = bpe.encode_offsets([text])[0]
        raw = text.encode("utf-8")
        # Byte-level pieces tile the text exactly: each piece's bytes are the text's bytes.
        tok_bytes = [(b" " if c.boundary == "space" else b"") + c.data
                     for c in (canonicalize(bpe.tokens[i], "byte_level") for i in ids)]
        assert b"".join(tok_bytes) == raw
        assert [raw[s:e] for s, e in zip(bs, be)] == tok_bytes


def test_refine_leaves_whole_characters_alone():
    ids = np.array([0, 1, 2])
    lengths = np.array([3, 1, 2])
    start, end = np.array([0, 3, 3]), np.array([3, 6, 6])
    s, e = refine_byte_offsets(ids, start, end, lengths)
    assert s.tolist() == [0, 3, 4] and e.tolist() == [3, 4, 6]
    s, e = refine_byte_offsets(ids, np.array([0, 3, 4]), np.array([3, 4, 6]), lengths)
    assert s.tolist() == [0, 3, 4] and e.tolist() == [3, 4, 6]


def test_refine_makes_a_prefix_marker_zero_width():
    # SentencePiece "▁" prepended to "19" (byte-fallback pieces share the span (0, 2)) is
    # reported as (0, 1): it becomes zero-width, and the pieces get one byte each.
    s, e = refine_byte_offsets(np.array([0, 1, 2]), np.array([0, 0, 0]), np.array([1, 2, 2]), np.array([1, 1, 1]))
    assert s.tolist() == [0, 0, 1] and e.tolist() == [0, 1, 2]
