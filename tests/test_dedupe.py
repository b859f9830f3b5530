"""The one dedupe rule (kdstore.textio.resolve_duplicates / dedupe), used by the Beam capture,
the plain loop and the cascade's data step; and the one sample id."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kdstore.hashing import sample_id
from kdstore.textio import Record, dedupe, resolve_duplicates


def rec(text: str, line: int, label: int | None = None, path: str = "f.jsonl") -> Record:
    return Record(text=text, sample_id=sample_id(text), source=f"{path}:{line}", label=label)


def test_first_copy_is_the_first_line_not_the_smallest_string():
    kept, dead = resolve_duplicates([rec("a", 10, 1), rec("a", 9, 1), rec("a", 100, 1)])
    assert kept.source == "f.jsonl:9" and dead == []  # "f.jsonl:10" < "f.jsonl:9" as strings


def test_conflicting_labels_reject_every_copy():
    kept, dead = resolve_duplicates([rec("a", 1, 0), rec("a", 2, 1), rec("a", 3, 0)])
    assert kept is None and [d.source for d in dead] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"]
    assert all(d.stage == "dedupe" and d.reason.startswith("conflicting labels") and d.sample_id == sample_id("a") for d in dead)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["x", "y", "z", "好", "差"]), st.sampled_from([None, 0, 1])), max_size=30))
def test_dedupe_accounts_for_every_record(items):
    records = [rec(t, i + 1, lab) for i, (t, lab) in enumerate(items)]
    kept, dead, merged = dedupe(records)
    assert len(kept) + len(dead) + merged == len(records)
    assert len({r.sample_id for r in kept}) == len(kept)
    # First-occurrence order; a text is kept iff all its copies agree on the label.
    texts = list(dict.fromkeys(t for t, _ in items))
    agree = [t for t in texts if len({lab for u, lab in items if u == t}) == 1]
    assert [r.text for r in kept] == agree
    assert {d.sample_id for d in dead} == {sample_id(t) for t in texts if t not in agree}


def test_one_sample_id_for_store_rows_and_training_examples():
    """Classification examples carry the store's id (they used to hash the text without the
    source separator, so the same text had two ids)."""
    from trainer.classify.data import Example

    assert Example(text="这个手机很好用", label=1).sample_id == sample_id("这个手机很好用") == "%016x" % _xxh("\x00这个手机很好用")


def _xxh(s: str) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(s.encode("utf-8"))
