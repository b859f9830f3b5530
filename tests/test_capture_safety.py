"""Capture hardening (issue 17): one writer, resume that checks what it keeps and refuses to
mix, samples whole or not at all, shards that close on time and size, flags checked up
front, and no tracebacks for a user's mistake. Tiny teachers on real People's Daily text."""

from __future__ import annotations

import gzip
import json
import shutil

import pyarrow.parquet as pq
import pytest

import kdstore
from fixtures import make_tiny_causal_lm
from kdstore.hashing import sample_id
from kdstore.lease import LEASE, WriterLease
from kdstore.store import read_dead_letters
from pipelines import capture
from pipelines.options import parse_args
from test_capture import INPROC, _one_torch_thread, corpus, rows_by_key, run_capture, teacher, texts, tokenizer_dir, topk_store  # noqa: F401
from test_capture import verify_store as verified

TOPK = ["--select", "topk", "--k", "8", "--max-length", "48", "--max-error-rate", "0.1"]


def _args(teacher, inp, out, *extra):
    return ["--teacher", str(teacher), "--input", str(inp), "--output", str(out), *extra]


# -- 1: one writer per store ------------------------------------------------------------------------
def test_second_writer_is_refused_and_a_stale_lock_needs_the_flag(tmp_path, teacher, corpus, topk_store, capsys):
    uri, _ = topk_store
    out = tmp_path / "s"
    shutil.copytree(uri, out)
    args = _args(teacher, corpus["glob"], out, *TOPK, "--resume") + INPROC
    first = WriterLease.acquire(str(out), command="kd cache (still running)", heartbeat_s=0)
    assert capture.main(args) == 1
    err = capsys.readouterr().err
    assert "another writer holds this store" in err and f"pid {first.info.pid}" in err and "Traceback" not in err
    # The first writer is killed: its lease stays behind, stale; --break-lock takes over.
    info = json.loads((out / LEASE).read_text())
    info["pid"] = 2 ** 22 + 12345  # no such process
    (out / LEASE).write_text(json.dumps(info))
    assert capture.main(args) == 1
    assert "--break-lock" in capsys.readouterr().err
    assert capture.main(args + ["--break-lock"]) == 0
    assert not (out / LEASE).exists()  # released at the end
    verified(str(out))


def test_finalize_refuses_when_the_lease_was_taken_over(tmp_path, teacher, corpus, monkeypatch, capsys):
    """Fencing: a writer whose lease was broken by another one does not write a manifest."""
    from pipelines import sinks

    out = tmp_path / "s"
    real = sinks.finalize_store

    def steal_then_finalize(uri, *a, **kw):
        (out / LEASE).unlink()
        WriterLease.acquire(uri, heartbeat_s=0, command="kd cache (intruder)")
        return real(uri, *a, **kw)

    monkeypatch.setattr(sinks, "finalize_store", steal_then_finalize)
    assert capture.main(_args(teacher, corpus["glob"], out, *TOPK) + INPROC) == 1
    assert "lost the store's lease" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


# -- 2: resume checks every finished shard -------------------------------------------------------------
def _crash_before_manifest(monkeypatch):
    """A capture that dies after its shards are closed, before the manifest is written."""
    from pipelines import sinks

    def die(*a, **kw):
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(sinks, "finalize_store", die)


def _flip_in_column(path, column: str) -> None:
    md = pq.ParquetFile(path).metadata
    col = next(md.row_group(0).column(i) for i in range(md.num_columns) if md.row_group(0).column(i).path_in_schema.startswith(column))
    data = bytearray(path.read_bytes())
    data[col.data_page_offset + col.total_compressed_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_resume_quarantines_a_corrupt_shard_and_redoes_its_samples(tmp_path, teacher, corpus, topk_store, monkeypatch):
    uri, _ = topk_store
    out = tmp_path / "crashed"
    args = _args(teacher, corpus["glob"], out, *TOPK, "--shard-bytes", "20000", "--row-group-rows", "16") + INPROC
    with monkeypatch.context() as m:
        _crash_before_manifest(m)
        with pytest.raises(Exception, match="killed before the manifest"):
            capture.run(args, save_main_session=False)
    shards = sorted(p for p in (out / "shards").iterdir() if p.suffix == ".parquet")
    assert len(shards) >= 3 and not (out / "manifest.json").exists()
    _flip_in_column(shards[1], "text")  # still opens and reads 'window'/'tail': only the checksum tells
    res = capture.run(args + ["--resume"], save_main_session=False)
    assert verified(str(out)).manifest.totals["quarantined_shards"] == 1
    assert (out / "quarantine" / shards[1].name).exists()
    assert rows_by_key(str(out)) == rows_by_key(uri)  # its samples were redone: nothing lost, nothing doubled
    assert res["metrics"]["windows"] == pq.read_metadata(out / "quarantine" / shards[1].name).num_rows


# -- 3: resume refuses to mix ----------------------------------------------------------------------------
@pytest.mark.parametrize("change,named", [
    (lambda a, c: a + ["--input", c["glob"].replace("*.txt", "a.txt")], "input"),
    (lambda a, c: a + ["--input", c["glob"], "--max-length", "40"], "windowing.max_length"),
    (lambda a, c: a + ["--input", c["glob"], "--quant-bits", "16"], "quantization.bits"),
    (lambda a, c: a + ["--input", c["glob"], "--select", "top_p"], "selection.mode"),
    (lambda a, c: a + ["--input", c["glob"], "--index-order", "id"], "index.coding"),
])
def test_resume_refuses_a_changed_input_or_setting(tmp_path, teacher, corpus, topk_store, change, named):
    uri, _ = topk_store
    shutil.copytree(uri, tmp_path / "s")
    base = ["--teacher", str(teacher), "--output", str(tmp_path / "s"), "--resume", "--select", "topk", "--k", "8", "--max-length", "48"]
    argv = change(base, corpus)
    with pytest.raises(kdstore.StoreFormatError, match=named.replace(".", r"\.")) as e:
        capture.plan_capture(parse_args(argv)[0])
    if named == "input":
        assert "b.txt" in str(e.value)  # names the file that is no longer in the input


def test_resume_refuses_another_teacher(tmp_path, tokenizer_dir, corpus, topk_store):
    uri, _ = topk_store
    shutil.copytree(uri, tmp_path / "s")
    other = make_tiny_causal_lm(tmp_path / "t2", tokenizer_dir=tokenizer_dir, hidden=48, layers=2, heads=4, seed=2)
    argv = _args(other, corpus["glob"], tmp_path / "s", "--resume", "--select", "topk", "--k", "8", "--max-length", "48")
    with pytest.raises(kdstore.StoreFormatError, match=r"teacher\.weights_hash"):
        capture.plan_capture(parse_args(argv)[0])


# -- 4: a sample is stored whole or not at all ---------------------------------------------------------------
def test_a_failed_window_drops_its_whole_sample(tmp_path, tokenizer_dir, texts):
    from transformers import AutoTokenizer

    broken = make_tiny_causal_lm(tmp_path / "broken", tokenizer_dir=tokenizer_dir, hidden=32, layers=1, heads=2, vocab_size=400)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = texts[200:230]
    (tmp_path / "c.txt").write_text("\n".join(lines), encoding="utf-8")
    out = str(tmp_path / "store")
    run_capture(_args(broken, tmp_path / "c.txt", out, "--max-length", "32", "--max-error-rate", "1.0", "--k", "4"))
    bad_windows, n_windows = {}, {}
    for t in lines:
        ids = tok(t)["input_ids"]
        n_windows[sample_id(t)] = n = max(1, -(-len(ids) // 32))
        bad_windows[sample_id(t)] = {w for w in range(n) if max(ids[w * 32 : (w + 1) * 32]) >= 400}
    partly = [s for s, b in bad_windows.items() if b and len(b) < n_windows[s]]
    assert partly, "the corpus must have samples where only some windows fail"
    stored = {sid for sid, _ in rows_by_key(out)}
    assert stored == {s for s, b in bad_windows.items() if not b}
    dead = read_dead_letters(kdstore.open(out))
    by_sample: dict[str, dict[int, str]] = {}
    for d in dead:
        by_sample.setdefault(d["sample_id"], {})[d["window"]] = d["reason"]
    for s in partly:  # every window has a dead letter saying why
        assert set(by_sample[s]) == set(range(n_windows[s]))
        for w, reason in by_sample[s].items():
            if w in bad_windows[s]:
                assert reason.startswith("model error")
            else:
                assert reason.startswith(f"sample dropped: window {min(bad_windows[s])} failed")
    totals = kdstore.open(out).manifest.totals
    assert totals["failed_samples"] == sum(1 for b in bad_windows.values() if b)
    assert totals["samples"] == len(stored)


# -- 5: shards close at their size target and at a time bound -------------------------------------------------
def test_shards_close_near_their_size_target(tmp_path, teacher, corpus):
    out = tmp_path / "s"
    run_capture(_args(teacher, corpus["glob"], out, *TOPK, "--shard-bytes", "15000"))  # default --row-group-rows
    store = verified(str(out))
    sizes = [s.bytes for s in store.shards]
    assert len(sizes) >= 3 and max(sizes) <= 1.5 * 15000, sizes


def test_shards_close_at_the_time_bound(tmp_path, teacher, corpus, monkeypatch):
    from pipelines import transforms

    clock = iter(range(0, 10 ** 9, 100))  # every look at the clock: 100 s later
    monkeypatch.setattr(transforms, "_clock", lambda: next(clock))
    out = tmp_path / "s"
    run_capture(_args(teacher, corpus["glob"], out, *TOPK, "--shard-seconds", "60"))
    store = verified(str(out))
    per_shard = [len(set(store.read_shard(i, columns=["sample_id"]).column("sample_id").to_pylist())) for i in range(len(store.shards))]
    assert per_shard == [1] * store.manifest.totals["samples"]  # the clock closed each sample's shard


# -- 6, 7, 8: flags and teacher checked up front ----------------------------------------------------------------
@pytest.fixture(scope="module")
def short_teacher(tmp_path_factory, tokenizer_dir):
    """A GPT-2 teacher with 40 learned positions (longer inputs raise IndexError)."""
    return make_tiny_causal_lm(tmp_path_factory.mktemp("short"), tokenizer_dir=tokenizer_dir, arch="gpt2", hidden=32,
                               layers=1, heads=2, max_positions=40)


def test_max_length_defaults_to_the_teachers_context(tmp_path, short_teacher, corpus):
    out = tmp_path / "s"
    run_capture(_args(short_teacher, corpus["glob"], out, "--max-error-rate", "0.1"))
    store = verified(str(out))
    assert store.manifest.pipeline["max_length"] == 40
    assert [d["reason"].split(":")[0] for d in read_dead_letters(store)] == ["undecodable"]  # no model errors
    assert max(len(r["tokens"]) for r in rows_by_key(str(out)).values()) == 40


def test_max_length_beyond_the_context_is_refused_up_front(tmp_path, short_teacher, corpus, capsys):
    out = tmp_path / "s"
    assert capture.main(_args(short_teacher, corpus["glob"], out, "--max-length", "64") + INPROC) == 1
    err = capsys.readouterr().err
    assert "--max-length 64" in err and "40" in err and "max_position_embeddings" in err or "n_positions" in err
    assert not out.exists()


@pytest.mark.parametrize("typo,meant", [("--maxlength", "--max-length"), ("--temprature", "--temperature")])
def test_mistyped_flags_are_errors(tmp_path, teacher, corpus, capsys, typo, meant):
    out = tmp_path / "s"
    assert capture.main(_args(teacher, corpus["glob"], out, typo, "2") + INPROC) == 2
    err = capsys.readouterr().err
    assert typo in err and meant in err
    assert not out.exists()


def test_real_beam_options_still_pass(tmp_path):
    from pipelines.options import check_beam_args

    check_beam_args(["--direct_num_workers", "2", "--runner=DataflowRunner", "--project", "p", "--temp_location",
                     "gs://b/t", "--experiments", "use_runner_v2", "--max_num_workers=4"])
    with pytest.raises(SystemExit):
        check_beam_args(["--num_worker", "3"], prog="kd cache")


def test_teacher_without_tokenizer_is_refused_up_front(tmp_path, teacher, corpus, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in teacher.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, bare / f.name)
    assert capture.main(_args(bare, corpus["glob"], tmp_path / "s") + INPROC) == 1
    err = capsys.readouterr().err
    assert f"no fast tokenizer found in {bare}" in err and "Traceback" not in err


# -- 9, 12: input that must not crash; blank lines ------------------------------------------------------------------
def test_lone_surrogate_and_invisible_lines_are_dead_letters_blank_lines_skipped(tmp_path, teacher, texts):
    src = tmp_path / "c.jsonl"
    good = [json.dumps({"text": t}, ensure_ascii=False) for t in texts[300:310]]
    lines = good[:3] + ['{"text": "bad \\ud800 here"}', "", "   ", good[3]] + good[4:] + ["\t"]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    txt = tmp_path / "c.txt"
    txt.write_text("\n".join(texts[310:315] + ["", "  ", "\x00\x00", "\u200b\u200d\ufeff", texts[315]]) + "\n", encoding="utf-8")
    out = tmp_path / "s"
    res = run_capture(_args(teacher, f"{src},{txt}", out, "--max-error-rate", "0.2"))
    store = verified(str(out))
    dead = {d["source"]: d["reason"] for d in read_dead_letters(store)}
    assert set(dead) == {f"{src}:4", f"{txt}:8", f"{txt}:9"}
    assert "lone surrogate" in dead[f"{src}:4"] and "U+D800" in dead[f"{src}:4"]
    assert all("no visible characters" in dead[f"{txt}:{n}"] for n in (8, 9))
    t = store.manifest.totals
    assert t["blank_lines"] == 5 and t["samples"] == 16 and t["dead_letters"] == 3
    assert t["input_records"] == t["samples"] + t["duplicates"] + t["dead_letters"] + t["blank_lines"]
    assert res["totals"]["failed_samples"] == 3


def test_blank_lines_do_not_count_against_the_error_rate(tmp_path, teacher, texts):
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(texts[320:330]) + "\n\n", encoding="utf-8")  # paragraph-separated text
    out = tmp_path / "s"
    run_capture(_args(teacher, txt, out, "--max-error-rate", "0"))
    assert kdstore.open(str(out)).manifest.totals["blank_lines"] == 10


def test_truncated_gzip_input_is_a_clear_error(tmp_path, teacher, texts, capsys):
    gz = tmp_path / "c.txt.gz"
    data = gzip.compress(("\n".join(texts[:200]) + "\n").encode())
    gz.write_bytes(data[: len(data) // 2])
    assert capture.main(_args(teacher, gz, tmp_path / "s", "--max-error-rate", "1") + INPROC) == 1
    err = capsys.readouterr().err
    assert f"{gz}" in err and "truncated" in err and "Traceback" not in err


# -- 13: help, quiet Beam, progress with a total ------------------------------------------------------------------
def test_cache_help_shows_defaults(capsys):
    assert capture.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-error-rate MAX_ERROR_RATE fail when dead letters / input samples exceed this (default: 0.01)" in out
    assert "(default: text)" in out and "the teacher's context length" in out


@pytest.mark.parametrize("group", ["store", "train"])
def test_group_help(capsys, group):
    from kdstore.cli import main

    assert main([group, "--help"]) == 0
    out = capsys.readouterr().out
    words = {"store": ["inspect", "verify", "stats", "align-report"], "train": ["student", "lm", "rdrop", "cascade"]}[group]
    assert all(f"kd {group} {w}" in out for w in words)
    assert main([group]) == 0


def test_user_error_output_has_no_beam_noise(tmp_path, teacher, texts, capfd):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(["{oops"] * 3 + [json.dumps({"text": texts[0]}, ensure_ascii=False)]) + "\n", encoding="utf-8")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pipelines.capture", *_args(teacher, src, tmp_path / "s"), *INPROC],
                       capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert r.returncode == 1
    assert "went to dead letters" in r.stderr
    for noise in ("Traceback", "apitools", "Resource module", "ERROR:apache_beam"):
        assert noise not in r.stderr, r.stderr


def test_progress_total_is_the_exact_token_count_for_a_small_corpus(tmp_path, teacher, corpus, topk_store):
    uri, _ = topk_store
    plan = capture.plan_capture(parse_args(_args(teacher, corpus["glob"], tmp_path / "s", *TOPK))[0])
    assert plan.token_total == kdstore.open(uri).manifest.totals["tokens"]
    plan.lease.release()


def test_teacher_progress_bar_has_a_total(teacher):
    import numpy as np

    from kdstore import Selection
    from pipelines.inference import TeacherRunner, close_progress_bars
    from pipelines.teachers import TeacherSpec

    runner = TeacherRunner(teacher=TeacherSpec(path=str(teacher), threads=1), selection=Selection(mode="topk", k=4),
                           progress=True, progress_total=100)
    runner.infer([np.arange(4, 14)], [1])
    assert runner._bar.total == 100 and runner._bar.n == 10  # a percentage and an ETA
    close_progress_bars()


def test_writer_stores_an_incomplete_sample_at_bundle_end(tmp_path):
    """Fallback: windows of a sample that did not all reach the bundle are still written
    (not lost), as windowed values from finish_bundle."""
    import numpy as np

    from _storeutil import vocab
    from kdstore import Selection, TeacherInfo
    from kdstore.fs import resolve
    from kdstore.writer import new_manifest, write_vocab
    from pipelines.inference import SparseOutput
    from pipelines.transforms import _WriteShardsDoFn
    from pipelines.windows import Window

    loc = resolve(str(tmp_path / "s"))
    loc.makedirs()
    write_vocab(loc, vocab(16))
    m = new_manifest(teacher=TeacherInfo(name_or_path="t", vocab_size=16), selection=Selection(mode="topk", k=2),
                     columns={"text": False, "offsets": False, "label": False})
    fn = _WriteShardsDoFn(store_uri=str(tmp_path / "s"), manifest_json=m.to_json(), row_group_rows=16, shard_bytes=1 << 20)
    fn.setup()
    fn.start_bundle()
    w = Window(sample_id="00000000000000ab", window=0, token_start=0, context_len=0, input_ids=np.array([3, 4], np.int32),
               source="x:1", siblings=2)
    out = SparseOutput(indices=np.array([1, 2, 5, 6], np.int32), probs=np.array([.5, .3, .4, .4], np.float32),
                       counts=np.array([2, 2], np.int32), tail=np.array([.2, .2], np.float32))
    assert list(fn.process((w, out))) == []  # waits for window 1
    emitted = list(fn.finish_bundle())
    assert len(emitted) == 1 and emitted[0].value["shard"]["rows"] == 1  # a WindowedValue with the shard info
