"""Vocabulary alignment (seed 001 "third vocabulary"): reader throughput with remapping on
vs off, coverage per tokenizer pair and policy, and byte-offset sequence alignment.

Tokenizers: byte-level BPE, WordPiece and Unigram from :mod:`trainer.data.tokenizers`, trained
on People's Daily (training split). Stores: synthetic-but-valid soft labels over each tokenizer's
vocabulary for the validation + test texts (``kdstore.align._synth.synthetic_store``: the
true next token plus ids drawn by corpus frequency, Dirichlet probabilities, tail kept) —
no teacher model is needed to measure alignment.

    python bench/align_bench.py            # the documented run (a few minutes on 2 cores)
    python bench/align_bench.py --quick    # smoke run, nothing written to docs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # test fixtures (synthetic stores)

import numpy as np  # noqa: E402

from bench._report import markdown_table, write_section  # noqa: E402
from kdstore.align import POLICIES, SequenceAligner, VocabAlignment, coverage_report, scan_store  # noqa: E402
from align_synth import corpus_tokenizers, synthetic_store  # noqa: E402
from trainer.data.corpora import peoples_daily  # noqa: E402

KINDS = ("bpe", "wordpiece", "unigram")
IMG = Path(__file__).resolve().parent.parent / "docs" / "img" / "align_coverage.png"


def _throughput(store, remaps: dict, *, reps: int, batch_size: int) -> dict[str, list[float]]:
    """Positions/s through SoftLabelDataset for each remap (None = off), runs interleaved so
    machine noise hits all configurations alike."""
    from kdstore.dataset import SoftLabelDataset

    times: dict[str, list[float]] = {k: [] for k in remaps}
    positions = store.manifest.totals["tokens"]
    for _b in SoftLabelDataset(store, batch_size=batch_size, shuffle=False):
        pass  # warm the page cache and imports before timing
    for _ in range(reps):
        for name, remap in remaps.items():
            ds = SoftLabelDataset(store, batch_size=batch_size, shuffle=False, remap=remap)
            t0 = time.process_time()
            for _b in ds:
                pass
            times[name].append(positions / (time.process_time() - t0))
    return times


def _decode_remap(store, remaps: dict, *, reps: int) -> dict[str, list[float]]:
    """Positions/s of Store.decode alone vs decode + map_targets + map_inputs (batches
    pre-read, so only numpy work is timed)."""
    batches = list(store.iter_batches(batch_rows=64))
    positions = store.manifest.totals["tokens"]
    out: dict[str, list[float]] = {k: [] for k in remaps}
    for _ in range(reps):
        for name, remap in remaps.items():
            t0 = time.process_time()
            for b in batches:
                d = store.decode(b)
                if remap is not None:
                    remap.map_targets(d.indices, d.probs, d.counts)
                    remap.map_inputs(d.input_ids)
            out[name].append(positions / (time.process_time() - t0))
    return out


def _plot(cov_rows: list[list], path: Path) -> None:
    """Left: vocabulary rows matched per pair (policy-independent); right: kept mass mapped
    to an aligned id per pair and policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r[0] for r in cov_rows))
    x = np.arange(len(pairs))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2]})
    ax1.bar(x, [next(r[2] for r in cov_rows if r[0] == p) for p in pairs], color="tab:gray")
    ax1.set_ylabel("teacher vocabulary rows matched (%)")
    ax1.set_title("matched by exact/canonical/special/tokenizer")
    width = 0.8 / len(POLICIES)
    for j, pol in enumerate(POLICIES):
        vals = [next(r[4] for r in cov_rows if r[0] == p and r[1] == pol) for p in pairs]
        ax2.bar(x + (j - (len(POLICIES) - 1) / 2) * width, vals, width, label=pol)
    lo = min(r[4] for r in cov_rows)
    ax2.set_ylim(max(0.0, 10 * np.floor(lo / 10) - 10), 100.5)
    ax2.set_ylabel("stored kept mass on an aligned id (%)")
    ax2.set_title("mapped probability mass by policy")
    ax2.legend(fontsize=8, ncol=4, loc="lower left")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(pairs, rotation=35, ha="right", fontsize=8)
    fig.suptitle("Teacher -> student vocabulary alignment (People's Daily tokenizers)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _coverage_and_sequences(stores: dict, toks: dict) -> tuple[list[list], list[list]]:
    """Rows of the coverage table (teacher -> student, policy) and of the sequence-alignment table."""
    cov_rows: list[list] = []
    seq_rows: list[list] = []
    for t in KINDS:
        usage = scan_store(stores[t], progress=False)
        for s in KINDS:
            rep = coverage_report(stores[t], toks[s], usage=usage, sequence_rows=0, progress=False)
            for pol in POLICIES:
                q = rep["policies"][pol]
                r = q["rules"]
                rows_share = 1.0 - r["padding"]["vocab_share"]
                matched_v = sum(r[x]["vocab_share"] for x in ("exact", "canonical", "special", "tokenizer")) / rows_share
                cov_rows.append([f"{t} -> {s}", pol, 100 * matched_v, q["aligned_vocab_size"],
                                 100 * q["mapped_mass_share"], 100 * q["input_coverage"],
                                 100 * (r["canonical"]["mass_share"] + r["exact"]["mass_share"])])
            al = VocabAlignment.build(stores[t], toks[s], policy="first_piece")
            fr = {}
            t0 = time.perf_counter()
            n_tok = 0
            for mode in ("boundary", "one_to_one"):
                aligner = SequenceAligner(student=toks[s], alignment=al, mode=mode)
                tot = {"student_tokens": 0, "in_window": 0, "targets": 0, "in_1:1": 0, "in_1:n": 0, "in_n:1": 0, "in_n:m": 0}
                for b in stores[t].iter_batches(batch_rows=256):
                    st = aligner.align_batch(stores[t], b).stats
                    for key in tot:
                        tot[key] += st[key]
                fr[mode] = tot
                n_tok += tot["student_tokens"]
            dt = time.perf_counter() - t0
            b = fr["boundary"]
            n = max(1, b["in_window"])
            seq_rows.append([f"{t} -> {s}", b["in_window"], 100 * b["targets"] / n,
                             100 * fr["one_to_one"]["targets"] / n, *(100 * b[f"in_{g}"] / n for g in ("1:1", "1:n", "n:1", "n:m")),
                             n_tok / dt])
        print(f"coverage and sequence alignment done for teacher {t}", flush=True)
    return cov_rows, seq_rows


def _docs_body(*, toks: dict, n_train: int, eval_texts: list, positions: int, reps: int, tp_table: str, cov_table: str,
               seq_table: str, wall: float) -> str:
    sizes = ", ".join(f"{k} {len(tk)}" for k, tk in toks.items())
    body = f"""Tokenizers (`trainer.data.tokenizers`) trained on {n_train} People's Daily training lines (vocabulary
sizes: {sizes}; Unigram keeps every corpus character plus 256 byte pieces, so its size is at least that). Stores: synthetic soft
labels over each tokenizer's vocabulary for the {len(eval_texts)} validation + test texts (up to 256
tokens per text; the true next token plus ids drawn by corpus frequency; padded teacher vocabulary).
Vocabulary shares are exact properties of the tokenizer pair; mass shares depend on these synthetic
distributions (mass concentrates on frequent tokens, as a real teacher's does).

**Reader throughput, remapping on vs off** (byte-level BPE teacher store, top-32, {positions:,} positions;
median of {reps} interleaved runs). "dataset" = `SoftLabelDataset` (read, decode, remap, collate to padded
tensors, batch 32); "decode+remap" = `Store.decode` + `map_targets` + `map_inputs` on pre-read batches.
Throughput is positions per CPU-second of the benchmark process (`time.process_time`): the machine is
shared, and CPU time is what other jobs do not distort. Alignments use the default in-place layout
(`compact=False`: dropped entries become probability-0 padding slots). Target: ratio >= 0.7.

{tp_table}

`first_piece` and `extend` (the seed-001 policy) keep each position's entry layout and only gather,
merge duplicates (row-wise sorts of packed keys) and zero dropped entries. `split` is below the target:
it adds an entry per extra piece, so it goes through the general CSR expansion and compaction, and the
collated `[B, T, K]` tensors grow with the largest expanded position (K 32 -> ~44 here).

**Coverage per tokenizer pair and policy** (top-8 stores). vocab rows matched = teacher vocabulary
rows (padding excluded) matched by exact / canonical / special-role / single-piece-tokenizer rules; mass mapped = stored kept mass that
lands on an aligned id (not the tail); inputs mapped = input tokens with a matched or new id (others
get the student's first piece or unk).

{cov_table}

![mapped mass by pair and policy](img/align_coverage.png)

**Sequence alignment by byte offsets** (the student tokenizes the stored text itself; `boundary`
rule: the student token closing each group gets the teacher target; `1:1 only`: only 1:1 groups).
Student positions = student tokens inside the stored rows' byte spans (texts longer than 256 teacher
tokens are truncated; the rest of such a text belongs to another window). "in X %" = share of those
tokens in groups of that kind.

{seq_table}

Wall time of the whole benchmark: {wall / 60:.1f} min.
"""
    return body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run; nothing written to docs")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    quick = args.quick
    t_start = time.perf_counter()
    n_train, vocab = (600, 1500) if quick else (3000, 4000)
    print(f"training tokenizers on {n_train} People's Daily lines ...", flush=True)
    toks = corpus_tokenizers(n_train, vocab)
    eval_texts = [s.text for s in peoples_daily("validation") + peoples_daily("test")]
    if quick:
        eval_texts = eval_texts[:120]
    reps = 2 if quick else args.reps
    with tempfile.TemporaryDirectory() as tmp:
        # -- coverage stores: every tokenizer as the teacher --------------------------------
        stores = {}
        for k in KINDS:
            print(f"writing the {k} teacher store ...", flush=True)
            stores[k] = synthetic_store(Path(tmp) / f"cov-{k}", toks[k], eval_texts, k=8, max_tokens=256, seed=11)
        cov_rows, seq_rows = _coverage_and_sequences(stores, toks)
        # -- throughput: remap on vs off, one run ----------------------------------------------
        print("writing the throughput store (top-32) ...", flush=True)
        big = synthetic_store(Path(tmp) / "tp", toks["bpe"], eval_texts, k=32, max_tokens=256, seed=12)
        remaps = {"off": None}
        for s in ("wordpiece", "unigram"):
            for pol in ("first_piece", "split", "extend"):
                remaps[f"{s}/{pol}"] = VocabAlignment.build(big, toks[s], policy=pol)
        print("timing ...", flush=True)
        dec = _decode_remap(big, remaps, reps=reps)
        ds = _throughput(big, remaps, reps=reps, batch_size=32)
        positions = big.manifest.totals["tokens"]
    base_ds, base_dec = statistics.median(ds["off"]), statistics.median(dec["off"])
    tp_rows = []
    for name in remaps:
        m_ds, m_dec = statistics.median(ds[name]), statistics.median(dec[name])
        tp_rows.append([name, f"{m_ds:,.0f}", f"{m_ds / base_ds:.2f}", f"{m_dec:,.0f}", f"{m_dec / base_dec:.2f}"])
    cov_table = markdown_table(["teacher -> student", "policy", "vocab rows matched %", "aligned vocab", "mass mapped %",
                                "inputs mapped %", "mass exact+canonical %"], cov_rows)
    seq_table = markdown_table(["teacher -> student", "student positions", "targeted % (boundary)", "targeted % (1:1 only)",
                                "in 1:1 %", "in 1:n %", "in n:1 %", "in n:m %", "align tokens/s"], seq_rows)
    tp_table = markdown_table(["remap (student/policy)", "dataset positions/s", "ratio vs off", "decode+remap positions/s",
                               "ratio vs off"], tp_rows)
    print(tp_table, cov_table, seq_table, sep="\n\n")
    wall = time.perf_counter() - t_start
    if quick:
        print(f"\n(quick run, {wall:.0f} s; docs not written)")
        return 0
    _plot(cov_rows, IMG)
    body = _docs_body(toks=toks, n_train=n_train, eval_texts=eval_texts, positions=positions, reps=reps,
                      tp_table=tp_table, cov_table=cov_table, seq_table=seq_table, wall=wall)
    write_section("align", "Vocabulary alignment and cross-tokenizer remapping (seed 001)", body,
                  command="python bench/align_bench.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
