"""Vocabulary alignment and cross-tokenizer remapping (seed 001 "third vocabulary").

Public API::

    al = VocabAlignment.build(store, "student_tokenizer_dir", policy="first_piece")
    al.save("align.parquet"); al = VocabAlignment.load("align.parquet", store=store)
    SoftLabelDataset(store, batch_size=8, remap=al)      # batches in aligned index space
    SequenceAligner(student=..., alignment=al).align_batch(store, batch)  # by byte offsets

See ``docs/alignment.md`` for the rules, policies and the sequence-alignment rule.
"""

from kdstore.align.canonical import CONVENTIONS, Canonical, canonicalize, infer_convention, special_role
from kdstore.align.report import TeacherUsage, coverage_report, scan_store
from kdstore.align.sequence import KINDS, AlignedRows, SequenceAligner, align_offsets
from kdstore.align.student import StudentTokenizer, load_student
from kdstore.align.vocab import POLICIES, RULES, TeacherVocab, VocabAlignment

__all__ = [
    "VocabAlignment", "TeacherVocab", "POLICIES", "RULES",
    "SequenceAligner", "AlignedRows", "align_offsets", "KINDS",
    "StudentTokenizer", "load_student",
    "Canonical", "canonicalize", "infer_convention", "special_role", "CONVENTIONS",
    "scan_store", "coverage_report", "TeacherUsage",
]
