"""Where a run's batches, student and teachers come from.

:class:`TrainData` wraps the training batches (a store through :class:`kdstore.StoreLoader`,
or packed text windows through :class:`trainer.lm.textdata.TextBatches`) as an endless,
resumable stream; :func:`build_student` builds the student for the data's (aligned)
vocabulary; :func:`eval_source` opens the held-out set (a store or text).
"""

from __future__ import annotations

import sys

from typing import Any

import torch

from trainer.core.config import TrainConfig
from trainer.lm.models import build_causal_lm, load_causal_lm, padded_vocab, resize_vocab, vocab_size_of
from trainer.core.runtime import Dist


class TrainData:
    """The training batches (a store or text windows), endlessly over epochs, resumable."""

    def __init__(self, *, loader: Any, kind: str, vocab_size: int, tokenizer: Any, remap: Any, store: Any, info: str) -> None:
        self.loader, self.kind, self.vocab_size, self.tokenizer, self.remap, self.store = loader, kind, vocab_size, tokenizer, remap, store
        self._info = info
        self._it = None
        self.sequence = None  # a kdstore.align.SequenceAligner when the student reads its own tokenization

    @classmethod
    def open(cls, cfg: TrainConfig, dist: Dist) -> "TrainData":
        if cfg.store:
            import kdstore  # noqa: PLC0415
            from kdstore.dataset import SoftLabelDataset, StoreLoader  # noqa: PLC0415

            store = kdstore.open(cfg.store)
            if store.manifest.level != "token":
                raise ValueError(f"{cfg.store}: a {store.manifest.level}-level store; 'kd train student' needs a token-level store")
            sel = store.manifest.selection
            if cfg.kd_weight > 0 and not cfg.online_teacher and abs(sel.temperature - cfg.temperature) > 1e-9 and dist.is_main:
                # Stored targets are never re-tempered (docs/format.md): the KL then compares the
                # teacher at the capture temperature with the student at another one.
                print(f"warning: targets were captured at temperature {sel.temperature} and are used as they are; the "
                      f"student uses temperature={cfg.temperature} (set temperature={sel.temperature} to match)",
                      file=sys.stderr)
            tok, remap, sequence, vocab, how = _store_tokenization(cfg, store, dist)
            ds = SoftLabelDataset(store, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=True, shuffle_block=cfg.shuffle_block,
                                  rank=dist.rank, world_size=dist.world_size, remap=remap, sequence=sequence,
                                  pack=cfg.pack and sequence is None)
            loader = StoreLoader(ds, num_workers=cfg.num_workers)
            mode = sel.mode + (f" k={sel.k}" if sel.mode == "topk" else f" p={sel.p}" if sel.mode == "top_p" else f" n={sel.samples}")
            info = f"store {cfg.store} ({store.num_rows} rows, {mode}; {how})"
            data = cls(loader=loader, kind="store", vocab_size=vocab, tokenizer=tok, remap=remap, store=store, info=info)
            data.sequence = sequence
            return data
        from trainer.lm.textdata import TextBatches, encode_texts, load_texts, packed_windows  # noqa: PLC0415

        if not cfg.tokenizer:
            raise ValueError("text training needs tokenizer=DIR (a Hugging Face tokenizer directory)")
        tok = load_tokenizer(cfg.tokenizer, required=True)
        texts = load_texts(cfg.train_text)
        windows = packed_windows(encode_texts(tok, texts), cfg.seq_len)
        loader = TextBatches(windows, batch_size=cfg.batch_size, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                             drop_last=True, pad_id=tok.pad_token_id or 0)
        info = f"text {cfg.train_text} ({len(texts)} docs, {len(windows)} windows of {cfg.seq_len})"
        return cls(loader=loader, kind="text", vocab_size=padded_vocab(len(tok), cfg.pad_vocab_multiple), tokenizer=tok, remap=None,
                   store=None, info=info)

    def describe(self) -> str:
        return self._info

    def next_batch(self) -> dict[str, Any]:
        """The next batch, starting the next epoch when one ends.

        Runs under ``fork_rng``: a DataLoader draws its base seed from the global torch RNG
        when an epoch's iterator starts, which would shift the dropout stream of a resumed
        run (its iterator starts at a different step) and break exact resume.
        """
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                with torch.random.fork_rng(devices=[]):
                    return next(self._it)
            except StopIteration:
                self._it = None
        raise ValueError(f"{self._info}: no batches for this rank (fewer rows than ranks, or fewer than batch_size with drop_last)")


def load_tokenizer(path: str, *, required: bool) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable tokenizer here"
        if required:
            raise ValueError(f"cannot load a tokenizer from {path!r} ({exc}); pass tokenizer=DIR") from exc
        return None


def load_alignment(path: str, store: Any, student: Any = None) -> Any:
    """An alignment file, checked against the store's teacher vocabulary (and ``student``)."""
    from kdstore.align import VocabAlignment  # noqa: PLC0415

    return VocabAlignment.load(path, store=store, student=student)


def _store_tokenization(cfg: TrainConfig, store: Any, dist: Dist) -> tuple[Any, Any, Any, int, str]:
    """How the student reads a store: ``(tokenizer, remap, sequence aligner, vocab, description)``.

    * ``tokenizer=`` the teacher's (same strings by id) or none: the student reads the
      teacher's ids (same-tokenizer KD). Without ``tokenizer=`` this is said, never silent.
    * ``tokenizer=`` another tokenizer: the student reads **its own** tokenization of the
      stored text; targets come by byte-offset sequence alignment and the third vocabulary
      (``align=`` file, checked to belong to this store and tokenizer, or built here).
    * ``teacher_segmentation_align=``: the old path (teacher tokens mapped as input), with a warning.
    """
    from kdstore.align import SequenceAligner, VocabAlignment, load_student  # noqa: PLC0415
    from kdstore.align.match import TeacherVocab  # noqa: PLC0415

    V_t = store.manifest.teacher.vocab_size
    if cfg.teacher_segmentation_align:
        remap = load_alignment(cfg.teacher_segmentation_align, store, cfg.tokenizer or None)
        if remap.policy != "extend":
            raise ValueError(
                f"{cfg.teacher_segmentation_align}: policy {remap.policy!r} feeds a multi-piece teacher token to the student as "
                f"its first piece only (the other pieces' text is dropped from the input); the teacher-segmentation path "
                f"needs an 'extend' alignment (kd store align-build ... --policy extend), or use tokenizer=STUDENT_DIR"
            )
        if dist.is_main:
            print("WARNING: teacher_segmentation_align= trains the student on the TEACHER's token sequence mapped into its "
                  "vocabulary; it will expect that segmentation at inference, and on its own tokenization it is worse than "
                  "no distillation (docs/alignment.md). Use tokenizer=STUDENT_DIR to train on the student's own tokenization.",
                  flush=True)
        tok = load_tokenizer(cfg.tokenizer or store.manifest.teacher.name_or_path, required=bool(cfg.tokenizer))
        return tok, remap, None, remap.vocab_size, f"teacher segmentation mapped by {cfg.teacher_segmentation_align}"
    if not cfg.tokenizer:
        tok = load_tokenizer(store.manifest.teacher.name_or_path, required=False)
        if dist.is_main:
            found = "loaded" if tok is not None else "NOT loadable there: the saved model will have no tokenizer"
            print(f"note: no tokenizer= given: the student reads the teacher's tokens (same-tokenizer KD); the teacher "
                  f"tokenizer at {store.manifest.teacher.name_or_path!r} is {found}. Pass tokenizer=STUDENT_DIR for a "
                  f"student with its own tokenizer.", flush=True)
        return tok, None, None, V_t, "teacher tokenization"
    tok = load_tokenizer(cfg.tokenizer, required=True)
    student = load_student(tok, name=cfg.tokenizer)
    teacher_tokens = TeacherVocab.from_store(store).tokens
    if student.tokens[: len(teacher_tokens)] == teacher_tokens and student.vocab_size <= V_t:
        return tok, None, None, V_t, "same tokenizer as the teacher"
    if cfg.align:
        alignment = load_alignment(cfg.align, store, student)
    elif cfg.xtok_vocab == "continuation":
        from kdstore.align.continuation import build_continuation  # noqa: PLC0415

        alignment = build_continuation(store, student)
    else:
        alignment = VocabAlignment.build(store, student, policy="first_piece")
    if alignment.policy == "extend":
        raise ValueError(
            f"{cfg.align}: an 'extend' alignment adds classes the student never reads in its own tokenization; build "
            f"a first_piece alignment (kd store align-build URI --student-tokenizer DIR --out FILE)"
        )
    mode = "boundary" if cfg.kd_loss == "uld" else cfg.xtok_targets
    sequence = SequenceAligner(student=student, alignment=None if cfg.kd_loss == "uld" else alignment, mode=mode)
    sequence.pad_id = tok.pad_token_id or 0
    vocab = padded_vocab(len(tok), cfg.pad_vocab_multiple)
    third = "none (ULD)" if cfg.kd_loss == "uld" else alignment.policy
    return tok, None, sequence, vocab, f"student's own tokenization ({cfg.tokenizer}), targets: {mode}, third vocabulary: {third}"


def build_student(cfg: TrainConfig, data: TrainData, *, min_vocab: int = 0) -> torch.nn.Module:
    """A fresh student (or ``init_from``) with at least the data's (aligned) vocabulary."""
    tok = data.tokenizer
    vocab = max(data.vocab_size, min_vocab)
    special = {}
    if tok is not None:
        special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if cfg.init_from:
        model = load_causal_lm(cfg.init_from)
    else:
        model = build_causal_lm(cfg.model, vocab_size=vocab, seed=cfg.seed, **special)
    if vocab_size_of(model) < vocab:
        # An aligned vocabulary with new tokens ("extend" policy) or a larger teacher vocab.
        resize_vocab(model, vocab)
    init_new_tokens(model, data.remap)
    return model


@torch.no_grad()
def init_new_tokens(model: torch.nn.Module, remap: Any) -> None:
    """Start each token an alignment appended (``extend``) as the mean of the embeddings of
    its spelling in student pieces, so it begins near what the student already knows."""
    for entry in getattr(remap, "new_tokens", None) or []:
        pieces = [p for p in entry.get("pieces", []) if p < entry["aligned_id"]]
        if not pieces:
            continue
        for emb in {id(m.weight): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            emb.weight[entry["aligned_id"]] = emb.weight[pieces].mean(0)


def load_teacher(path: str, device: torch.device) -> torch.nn.Module:
    t = load_causal_lm(path).to(device).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def eval_source(cfg: TrainConfig, data: TrainData, dist: Dist) -> Any:
    """A re-iterable of held-out batches (a store, or text split into document windows)."""
    from kdstore.fs import resolve  # noqa: PLC0415

    try:
        is_store = resolve(cfg.eval_data).exists("manifest.json")
    except Exception:  # noqa: BLE001 - not a URI the filesystem layer knows: treat as text
        is_store = False
    if is_store:
        from kdstore.dataset import SoftLabelDataset  # noqa: PLC0415

        return SoftLabelDataset(cfg.eval_data, batch_size=cfg.eval_batch_size, shuffle=False, rank=dist.rank,
                                world_size=dist.world_size, remap=data.remap, sequence=data.sequence)
    from trainer.lm.textdata import TextBatches, document_windows, encode_texts, load_texts  # noqa: PLC0415

    if data.tokenizer is None:
        raise ValueError(f"eval_data={cfg.eval_data!r} is text: pass tokenizer=DIR (the student's tokenizer)")
    if (data.remap is not None or data.sequence is not None) and cfg.eval_teacher:
        raise ValueError("eval_teacher KL on text needs a shared vocabulary; with align= evaluate on a held-out store")
    windows = document_windows(encode_texts(data.tokenizer, load_texts(cfg.eval_data)), cfg.seq_len)
    # Sorted by length: batches of similar lengths waste little compute on padding.
    windows.sort(key=len)
    return _Reiterable(lambda: TextBatches(windows, batch_size=cfg.eval_batch_size, shuffle=False, rank=dist.rank,
                                           world_size=dist.world_size, pad_id=data.tokenizer.pad_token_id or 0))


class _Reiterable:
    def __init__(self, make) -> None:
        self._make = make

    def __iter__(self):
        return iter(self._make())
