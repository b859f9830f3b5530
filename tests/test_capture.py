"""End-to-end capture (Beam) on a tiny locally built teacher and real People's Daily text.

Stored soft labels are compared with a direct computation (the HF model run on each
window alone, softmax in float64, numpy selection) within the quantization bound.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

import kdstore
from trainer.data.corpora import peoples_daily, sentiment
from kdstore.hashing import file_checksum, sample_id
from kdstore.quant import quantizer
from pipelines.selection import sample_uniforms
from kdstore.store import read_dead_letters
from fixtures import make_tiny_causal_lm, make_tiny_classifier, train_bpe_tokenizer
from pipelines import capture
from pipelines.options import parse_args
from pipelines.plain import capture_plain

# In-process runner, one torch thread: on a shared 2-core machine, OpenMP threads that wait
# for each other under load make tiny matmuls 100x slower.
INPROC = ["--direct_num_workers", "1", "--direct_running_mode", "in_memory", "--no-large-model", "--no-progress",
          "--threads", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [s.text for s in peoples_daily("train")[:400]]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, texts):
    return train_bpe_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=600)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tokenizer_dir):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("teacher"), tokenizer_dir=tokenizer_dir, hidden=48, layers=2, heads=4, seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texts):
    """Two text files: 60 real lines, a duplicate, a blank line (skipped) and an undecodable line."""
    d = tmp_path_factory.mktemp("corpus")
    lines = texts[:60]
    (d / "a.txt").write_text("\n".join(lines[:30]) + "\n\n", encoding="utf-8")
    (d / "b.txt").write_bytes(("\n".join(lines[30:]) + "\n").encode() + b"\xc3\x28 broken\n" + lines[0].encode() + b"\n")
    return {"glob": str(d / "*.txt"), "lines": lines, "bad": {f"{d / 'b.txt'}:31": "undecodable"}}


def run_capture(args: list[str]) -> dict:
    return capture.run(args + INPROC, save_main_session=False)


def model_of(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()


def rows_by_key(uri: str) -> dict[tuple[str, int], dict]:
    store = kdstore.open(uri)
    out = {}
    for b in store.iter_batches():
        d = b.to_pydict()
        for i in range(b.num_rows):
            key = (d["sample_id"][i], d["window"][i])
            assert key not in out, f"duplicate row {key}"
            out[key] = {k: d[k][i] for k in d}
    return out


def verify_store(uri: str) -> kdstore.Store:
    """Checksums, sizes and row counts match the manifest; every shard decodes."""
    store = kdstore.open(uri)
    for i, s in enumerate(store.shards):
        data = store.location.read_bytes(s.file)
        assert len(data) == s.bytes and file_checksum(data) == s.checksum
        t = store.read_shard(i)
        assert t.num_rows == s.rows
        assert store.decode(t).num_rows == s.rows
    assert store.manifest.totals["rows"] == sum(s.rows for s in store.shards)
    try:
        from kdstore import tools
    except ImportError:
        tools = None
    if tools is not None and hasattr(tools, "verify_main"):
        assert tools.verify_main([uri], prog="kd store verify") == 0
    return store


def direct_check(uri: str, teacher_dir, *, temperature: float = 1.0) -> int:
    """Compare every stored position with the model run directly on the window alone
    (float64 softmax, numpy selection); returns the number of positions checked."""
    store = kdstore.open(uri)
    m = store.manifest
    sel = m.selection
    model = model_of(teacher_dir)
    q = None if m.quantization.probs == "count" else quantizer(m.quantization.probs, m.quantization.bits)
    tq = quantizer(m.quantization.tail_scheme, m.quantization.bits)
    assert m.quantization.tail_scheme == "sqrt"
    half = 0.5 / tq.max_code + 1e-5  # sqrt code: |sqrt(p^) - sqrt(p)| <= 1/(2M); slack for fp32 batch effects
    checked = ambiguous = ambiguous_draws = 0
    for batch in store.iter_batches(batch_rows=64):
        dec = store.decode(batch)
        codes = np.concatenate([np.asarray(x, dtype=np.int64) for x in batch.column("probs").to_pylist()])
        tail_codes = np.concatenate([np.asarray(x, dtype=np.int64) for x in batch.column("tail").to_pylist()])
        for r in range(dec.num_rows):
            p0, p1 = dec.positions[r], dec.positions[r + 1]
            n = p1 - p0
            with torch.inference_mode():
                logits = model(input_ids=torch.from_numpy(dec.input_ids[p0:p1])[None]).logits[0].double()
            probs = torch.softmax(logits / temperature, -1).numpy()  # [n, V]
            order = np.argsort(-probs, axis=1, kind="stable")
            ps = np.take_along_axis(probs, order, axis=1)
            counts = dec.counts[p0:p1]
            e0, e1 = dec.entry_offsets[p0], dec.entry_offsets[p1]
            rowpos = np.repeat(np.arange(n), counts)
            idx = dec.indices[e0:e1]
            p_kept = probs[rowpos, idx]
            if sel.mode == "topk":
                clear = ps[:, sel.k - 1] - ps[:, sel.k] > 1e-6
                want = np.zeros_like(probs, dtype=bool)
                np.put_along_axis(want, order[:, : sel.k], True, axis=1)
                got = np.zeros_like(want)
                got[rowpos, idx] = True
                assert (counts == sel.k).all()
                assert (want == got)[clear].all(), "stored ids are not the top-k"
            elif sel.mode == "top_p":
                cum = np.cumsum(ps, axis=1)
                want_n = np.minimum(((cum - ps) < sel.p).sum(1), sel.max_k)
                clear = np.abs(cum[:, : sel.max_k + 1] - sel.p).min(1) > 1e-6
                assert (counts == want_n)[clear].all(), "top-p counts differ"
                rank = np.empty_like(order)
                np.put_along_axis(rank, order, np.arange(probs.shape[1])[None, :].repeat(n, 0), axis=1)
                assert (rank[rowpos, idx] < want_n[rowpos])[clear[rowpos]].all(), "top-p keeps a non-top entry"
            else:
                u = sample_uniforms([int(dec.sample_id[r], 16) ^ int(dec.window[r])], [n], sel.samples, sel.seed or 0)
                cdf = np.cumsum(probs, axis=1)
                cdf /= cdf[:, -1:]
                clear = np.ones(n, dtype=bool)  # draws are checked one by one below
                tol = 1e-5  # CDF noise of fp32 logits from padded batches vs this unpadded run
                for j in range(n):
                    lo = np.searchsorted(cdf[j], u[j] - tol, side="right")
                    hi = np.searchsorted(cdf[j], u[j] + tol, side="right")
                    sl = slice(dec.entry_offsets[p0 + j] - e0, dec.entry_offsets[p0 + j + 1] - e0)
                    got = Counter(dict(zip(idx[sl].tolist(), np.rint(dec.probs[e0:e1][sl] * sel.samples).astype(int).tolist())))
                    sure = Counter(lo[lo == hi].tolist())
                    maybe = Counter(i for a, b in zip(lo[lo != hi], hi[lo != hi]) for i in range(a, b + 1))
                    assert sum(got.values()) == sel.samples
                    assert all(got[i] >= c for i, c in sure.items()), "a certain draw is missing"
                    assert all(got[i] <= sure[i] + maybe[i] for i in got), "draw counts differ"
                    ambiguous_draws += int((lo != hi).sum())
            if q is not None:
                assert np.all(np.abs(np.sqrt(q.decode(codes[e0:e1])) - np.sqrt(p_kept)) <= half), "probs off by more than the code bound"
            tail_true = np.clip(1.0 - np.bincount(rowpos, weights=p_kept, minlength=n), 0.0, 1.0)
            assert np.all(np.abs(np.sqrt(tq.decode(tail_codes[p0:p1])) - np.sqrt(tail_true)) <= half), "tail off"
            checked += n
            ambiguous += int((~clear).sum())
    assert ambiguous <= 0.01 * checked  # positions whose selection sits on a numerical tie
    assert ambiguous_draws <= 0.05 * checked * (sel.samples or 0)  # draws within 1e-5 of a CDF step
    return checked


# -- token level: top-k end to end --------------------------------------------------------------------
@pytest.fixture(scope="module")
def topk_store(tmp_path_factory, teacher, corpus):
    out = str(tmp_path_factory.mktemp("stores") / "topk")
    res = run_capture(["--teacher", str(teacher), "--input", corpus["glob"], "--output", out, "--select", "topk", "--k", "8",
                       "--max-length", "48", "--max-error-rate", "0.1", "--shard-bytes", "20000",
                       "--row-group-rows", "16"])
    return out, res


def test_topk_store_verifies_and_matches_direct_computation(topk_store, teacher, corpus):
    uri, res = topk_store
    store = verify_store(uri)
    m = store.manifest
    assert m.teacher.vocab_size == 640 and m.teacher.tokenizer_vocab_size == 600  # padded embedding rows
    assert m.teacher.weights_hash.startswith("xxh3_128:") and m.teacher.num_parameters > 0
    assert m.selection.mode == "topk" and m.selection.k == 8 and m.level == "token"
    assert len(store.shards) > 1  # --shard-bytes rolled shards
    assert direct_check(uri, teacher) == m.totals["tokens"]


def test_every_sample_once_or_dead_lettered(topk_store, corpus, tokenizer_dir):
    from transformers import AutoTokenizer

    uri, res = topk_store
    store = kdstore.open(uri)
    rows = rows_by_key(uri)
    lines = corpus["lines"]
    stored_ids = {sid for sid, _ in rows}
    assert stored_ids == {sample_id(t) for t in lines}  # the duplicate line is stored once
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    for t in lines:  # every window present, covering every token exactly once outside the context
        ids = tok(t)["input_ids"]
        n_win = max(1, -(-len(ids) // 48))
        got = [rows[(sample_id(t), w)] for w in range(n_win)]
        assert [len(g["tokens"]) for g in got] == [min(48, len(ids) - 48 * w) for w in range(n_win)]
        assert [g["token_start"] for g in got] == [48 * w for w in range(n_win)]
        assert all(g["context_len"] == 0 for g in got)
        assert (sample_id(t), n_win) not in rows
    dead = read_dead_letters(store)
    assert {d["source"]: d["reason"].split(":")[0] for d in dead} == corpus["bad"]
    t = store.manifest.totals
    assert t["input_records"] == 63 and t["dead_letters"] == 1 and t["duplicates"] == 1 and t["samples"] == 60
    assert t["blank_lines"] == 1
    assert t["input_records"] == t["samples"] + t["duplicates"] + t["dead_letters"] + t["blank_lines"]
    assert res["metrics"]["records_read"] == 61 and res["metrics"]["windows"] == len(rows)


def test_text_and_byte_offsets_point_at_token_bytes(topk_store, corpus):
    uri, _ = topk_store
    store = kdstore.open(uri)
    vocab = store.vocab.to_pydict()
    tok_bytes = dict(zip(vocab["hash"], vocab["bytes"]))
    special = dict(zip(vocab["hash"], vocab["special"]))
    texts = {sample_id(t): t for t in corpus["lines"]}
    rebuilt: dict[str, dict[int, bytes]] = {}
    for key, row in rows_by_key(uri).items():
        raw = row["text"].encode("utf-8")
        assert raw in texts[key[0]].encode("utf-8")
        for h, bs, be in zip(row["tokens"], row["byte_start"], row["byte_end"]):
            if not special[h]:
                assert raw[bs:be] == tok_bytes[h], f"{key}: offsets do not frame the token's bytes"
        rebuilt.setdefault(key[0], {})[key[1]] = raw
    for sid, parts in rebuilt.items():
        # Non-overlapping windows tile the sample; a character split between two windows'
        # tokens appears in both texts (texts are whole characters), so overlaps are < 4 bytes.
        sample, pos = texts[sid].encode("utf-8"), 0
        for w in sorted(parts):
            at = sample.find(parts[w], max(0, pos - 3))
            assert 0 <= pos - at <= 3, f"{sid} window {w} text is not where the previous window ended"
            pos = at + len(parts[w])
        assert pos == len(sample) and len(parts) > 1 or parts[0] == sample


# -- other modes, overlap, temperature ----------------------------------------------------------------
@pytest.mark.parametrize("mode_args,temperature", [
    (["--select", "top_p", "--p", "0.8", "--max-k", "24"], 1.5),
    (["--select", "sample", "--samples", "24", "--seed", "7"], 1.0),
])
def test_other_modes_match_direct_computation(tmp_path, teacher, corpus, mode_args, temperature):
    out = str(tmp_path / "store")
    run_capture(["--teacher", str(teacher), "--input", corpus["glob"], "--output", out, "--max-length", "40", "--stride", "24",
                 "--temperature", str(temperature), "--max-error-rate", "0.1", *mode_args])
    store = verify_store(out)
    assert store.manifest.selection.temperature == temperature
    assert direct_check(out, teacher, temperature=temperature) == store.manifest.totals["tokens"]
    rows = rows_by_key(out)
    later = [r for (sid, w), r in rows.items() if w > 0]
    assert later and all(r["context_len"] == 16 and r["token_start"] % 24 == 0 for r in later)
    for (sid, w), r in rows.items():  # overlap = previous window's end - this start
        if w > 0:
            prev = rows[(sid, w - 1)]
            assert r["context_len"] == prev["token_start"] + len(prev["tokens"]) - r["token_start"] > 0


def test_pipeline_rows_equal_plain_loop_rows(tmp_path, teacher, corpus, topk_store):
    """Different batching (Beam bundles vs one sequential loop), identical stored rows."""
    uri, _ = topk_store
    cfg, _ = parse_args(["--teacher", str(teacher), "--input", corpus["glob"], "--output", str(tmp_path / "plain"),
                         "--select", "topk", "--k", "8", "--max-length", "48", "--no-progress", "--batch-tokens", "600"])
    counts = capture_plain(cfg)
    a, b = rows_by_key(uri), rows_by_key(str(tmp_path / "plain"))
    assert counts["windows"] == len(b) and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)


# -- resume ---------------------------------------------------------------------------------------------
def test_resume_after_crash_completes_without_duplicates(tmp_path, teacher, corpus, topk_store, monkeypatch):
    from pipelines import sinks

    uri, _ = topk_store
    out = tmp_path / "crashed"
    args = ["--teacher", str(teacher), "--input", corpus["glob"], "--output", str(out), "--select", "topk", "--k", "8",
            "--max-length", "48", "--max-error-rate", "0.1", "--shard-bytes", "20000", "--row-group-rows", "16"]

    def crash(*a, **kw):
        raise RuntimeError("crash before the manifest")

    with monkeypatch.context() as m:  # a crash after the shards were written, before the manifest
        m.setattr(sinks, "finalize_store", crash)
        with pytest.raises(Exception, match="crash before the manifest"):
            run_capture(args)
    shards = sorted(p for p in (out / "shards").iterdir() if p.suffix == ".parquet")
    assert len(shards) >= 3
    rows = [pq_rows(p) for p in shards]
    # Worse: one finished shard lost, one truncated (as if mid-write), dead letters lost.
    shards[0].unlink()
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    for f in (out / "errors").iterdir():
        f.unlink()
    with pytest.raises(kdstore.IncompleteStoreError):
        kdstore.open(str(out))
    assert capture.main(args + INPROC) == 1  # existing output without --resume is refused
    res = run_capture(args + ["--resume"])
    verify_store(str(out))
    assert rows_by_key(str(out)) == rows_by_key(uri)  # same rows as the uninterrupted run: nothing lost or doubled
    kept = sum(rows[2:])
    assert res["metrics"]["windows_skipped_resume"] == kept
    assert res["metrics"]["windows"] == rows[0] + rows[1]
    t = kdstore.open(str(out)).manifest.totals
    assert t["resumed_rows"] == kept and t["dead_letters"] == 1 and t["samples"] == 60 and t["quarantined_shards"] == 1
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(s.file.split("/")[1] for s in kdstore.open(str(out)).shards)


def pq_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def test_resume_refuses_other_selection(tmp_path, teacher, corpus, topk_store):
    import shutil

    uri, _ = topk_store
    shutil.copytree(uri, tmp_path / "s")
    args = ["--teacher", str(teacher), "--input", corpus["glob"], "--output", str(tmp_path / "s"), "--select", "topk",
            "--k", "4", "--max-length", "48", "--resume"]
    with pytest.raises(kdstore.StoreFormatError, match="selection"):
        capture.plan_capture(parse_args(args)[0])


# -- faults ----------------------------------------------------------------------------------------------
def test_error_rate_limit_fails_without_manifest(tmp_path, teacher, texts, capsys):
    src = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": t}, ensure_ascii=False) for t in texts[100:106]]
    src.write_text("\n".join(good + ["{oops", json.dumps({"txt": "x"}), json.dumps({"text": 3})]) + "\n", encoding="utf-8")
    out = tmp_path / "store"
    rc = capture.main(["--teacher", str(teacher), "--input", str(src), "--output", str(out), "--max-error-rate", "0.2"] + INPROC)
    err = capsys.readouterr().err
    assert rc == 1 and "3 of 9 input samples" in err and "malformed JSON" in err and "errors/" in err
    assert not (out / "manifest.json").exists()
    dead = [json.loads(line) for f in (out / "errors").iterdir() for line in f.read_text().splitlines()]
    assert sorted(d["source"].rsplit(":", 1)[1] for d in dead) == ["7", "8", "9"]


def test_model_errors_become_window_dead_letters(tmp_path, tokenizer_dir, texts):
    """A teacher whose embedding is smaller than its tokenizer fails on high ids: exactly
    those windows are dead-lettered (stage inference), the other windows of their samples
    too (stage sample), the rest is stored."""
    from transformers import AutoTokenizer

    broken = make_tiny_causal_lm(tmp_path / "broken", tokenizer_dir=tokenizer_dir, hidden=32, layers=1, heads=2, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = texts[200:230]
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    out = str(tmp_path / "store")
    run_capture(["--teacher", str(broken), "--input", str(tmp_path / "c.txt"), "--output", out, "--max-length", "32",
                 "--max-error-rate", "1.0", "--k", "4"])
    want_bad, want_ok, dropped = set(), set(), set()
    for t in lines:
        ids = tok(t)["input_ids"]
        wins = [(sample_id(t), w) for w in range(max(1, -(-len(ids) // 32)))]
        bad = {k for k in wins if max(ids[k[1] * 32 : (k[1] + 1) * 32]) >= 400}
        want_bad |= bad
        (dropped if bad else want_ok).update(set(wins) - bad)  # a sample is stored whole or not at all
    assert want_bad and want_ok and dropped
    dead = read_dead_letters(kdstore.open(out))
    assert {(d["sample_id"], d["window"]) for d in dead if d["stage"] == "inference"} == want_bad
    assert all(d["reason"].startswith("model error") for d in dead if d["stage"] == "inference")
    assert {(d["sample_id"], d["window"]) for d in dead if d["stage"] == "sample"} == dropped
    assert set(rows_by_key(out)) == want_ok


# -- sequence level -----------------------------------------------------------------------------------------
def test_sequence_level_classifier_with_gold_labels(tmp_path, tokenizer_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reviews = sentiment("validation")[:40]
    clf = make_tiny_classifier(tmp_path / "clf", tokenizer_dir=tokenizer_dir, num_labels=3, hidden=32, layers=1, heads=2)
    src = tmp_path / "reviews.jsonl"
    src.write_text("\n".join(json.dumps({"id": i, "review": r.text, "y": r.label}, ensure_ascii=False)
                             for i, r in enumerate(reviews)), encoding="utf-8")
    out = str(tmp_path / "seq")
    run_capture(["--teacher", str(clf), "--input", str(src), "--output", out, "--text-field", "review", "--id-field", "id",
                 "--label-field", "y", "--max-length", "64", "--quant-bits", "16", "--prob-code", "log"])
    store = verify_store(out)
    m = store.manifest
    assert m.level == "sequence" and m.teacher.vocab_size == 3 and m.selection.k == 3 and m.columns["label"]
    model = AutoModelForSequenceClassification.from_pretrained(str(clf)).eval()
    tok = AutoTokenizer.from_pretrained(str(clf))
    assert (m.quantization.probs, m.quantization.bits) == ("log", 16)
    q = quantizer("log", 16)
    rows = rows_by_key(out)
    assert len(rows) == len(reviews)
    for i, r in enumerate(reviews):
        row = rows[(sample_id(r.text, str(i)), 0)]
        assert row["label"] == r.label and row["text"] == r.text and row["tokens"] == []
        ids = tok(r.text, truncation=True, max_length=64)["input_ids"]
        with torch.inference_mode():
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
        dec = store.decode(_table_of(row, store))
        assert sorted(dec.indices.tolist()) == [0, 1, 2]
        got = q.decode(np.asarray(row["probs"]))
        assert np.all(np.abs(np.log(got) - np.log(p[dec.indices])) <= q.max_log_error + 1e-5)  # log code bound


def _table_of(row: dict, store):
    import pyarrow as pa

    return pa.Table.from_pylist([row], schema=store.schema)
