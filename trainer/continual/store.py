"""A small soft-label store of the reference teacher over People's Daily articles (kd task).

``kd cache`` (Beam) is the production capture; for a benchmark-sized slice the in-process
capture (:func:`pipelines.plain.cache_with_model`, the same windows, selection and
store format) is enough. Windows are ``max_length`` teacher tokens, so they fit an encoder
with ``max_len >= max_length``.
"""

from __future__ import annotations

from pathlib import Path

from kdstore.format import Selection


def capture_articles(out: str | Path, *, split: str, doc_limit: int = 0, line_limit: int = 0, max_length: int = 64,
                     k: int = 16, teacher_dir: str | Path | None = None, overwrite: bool = True,
                     progress: bool = False) -> dict:
    """Capture the lines of People's Daily ``split`` articles (first ``doc_limit`` articles,
    first ``line_limit`` lines; 0 = all) with the reference teacher (or ``teacher_dir``),
    top-``k``; returns ``{"rows", "tokens", "seconds", "teacher"}``."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from trainer.data.corpora import peoples_daily_documents  # noqa: PLC0415
    from pipelines.plain import cache_with_model  # noqa: PLC0415
    from trainer.lm.reference import reference_teacher  # noqa: PLC0415

    tdir = Path(teacher_dir) if teacher_dir else reference_teacher(progress=progress)
    docs = peoples_daily_documents(split)
    docs = docs[:doc_limit] if doc_limit else docs
    texts = [s.text for d in docs for s in d.lines]
    texts = texts[:line_limit] if line_limit else texts
    model = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(tdir))
    res = cache_with_model(model, tok, texts, {str(out): Selection(mode="topk", k=k)}, max_length=max_length,
                           name_or_path=str(tdir), overwrite=overwrite, progress=progress)
    return {**res[str(out)], "teacher": str(tdir)}
