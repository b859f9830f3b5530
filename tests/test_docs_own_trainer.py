"""docs/own-trainer.md's code blocks, extracted from the page and run as written (so the page
and the test cannot drift), on a real store captured from a tiny teacher."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import make_tiny_causal_lm, train_bpe_tokenizer
from kdstore.format import Selection
from trainer.data.corpora import peoples_daily
from pipelines.plain import cache_with_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "own-trainer.md"


def doc_block(name: str) -> str:
    """The ```python block right after ``<!-- doc-test: name -->``."""
    m = re.search(rf"<!-- doc-test: {re.escape(name)} -->\s*```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    if m is None:
        raise AssertionError(f"{DOC}: no python block marked doc-test: {name}")
    return m.group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("own")
    texts = [s.text for s in peoples_daily("train")[:60]]
    tok = train_bpe_tokenizer(texts, d / "tok", vocab_size=300)
    teacher = make_tiny_causal_lm(d / "teacher", tokenizer_dir=tok, hidden=48, layers=1, heads=2, init_std=0.02,
                                  train_texts=texts, train_steps=40, train_seq_len=48, train_batch=16, lr=5e-3)
    make_tiny_causal_lm(d / "student", tokenizer_dir=tok, hidden=32, layers=1, heads=2, init_std=0.02, seed=7)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_with_model(AutoModelForCausalLM.from_pretrained(str(teacher)), AutoTokenizer.from_pretrained(str(teacher)),
                     texts, {str(d / "teacher-store"): Selection(mode="topk", k=8)}, max_length=64,
                     name_or_path=str(teacher))
    (d / "corpus.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    return d


def _run(code: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout


def test_plain_loop_block_is_short_and_distils(workdir):
    code = doc_block("plain-loop")
    assert len(code.strip().splitlines()) <= 40
    out = _run(code, workdir)
    print(out.strip().splitlines()[-1])
    m = re.search(r"done: (\d+) steps, KD ([\d.]+) -> ([\d.]+)", out)
    assert m, out
    steps, first, last = int(m.group(1)), float(m.group(2)), float(m.group(3))
    assert steps >= 30
    assert last < 0.7 * first  # the student really moves toward the stored teacher


def test_hf_trainer_block_runs_and_logs_ce_and_kd(workdir):
    out = _run(doc_block("hf-trainer"), workdir)
    logged = re.findall(r"'kd': ([\d.]+)", out)
    assert len(logged) == 4, out  # max_steps=20, logging_steps=5
    assert float(logged[-1]) < float(logged[0])
