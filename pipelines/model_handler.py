"""Beam ``ModelHandler`` for teacher soft labels (``RunInference``).

Beam's own Hugging Face handlers do not import with transformers 5, and they return full
outputs; this handler loads a :class:`~pipelines.inference.TeacherRunner` (model +
selection) and returns only sparse arrays per window.

* Token-budget batching: ``element_size_fn`` = window length and a fixed target
  ``min_batch_size = max_batch_size = batch_tokens`` (``max_batch_weight`` raises
  TypeError in Beam 2.77). Inside a batch the runner buckets by length.
* ``large_model=True`` shares one model across the SDK worker processes of a machine
  (Beam's ``MultiProcessShared``): the proxy receives token ids and returns sparse arrays,
  so nothing vocabulary-sized crosses process boundaries. ``model_copies=N`` loads N
  copies instead (e.g. one per GPU).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler

from kdstore.format import Selection
from pipelines.inference import BatchSpec, Output, TeacherRunner
from pipelines.teachers import TeacherSpec
from pipelines.windows import Window


def window_size(w: Window) -> int:
    """Batch weight of a window: its number of tokens."""
    return len(w.input_ids)


class SoftLabelModelHandler(ModelHandler[Window, tuple, TeacherRunner]):
    """``RunInference`` handler: ``Window`` -> ``(Window, SparseOutput | reason str)``."""

    def __init__(
        self,
        *,
        teacher: TeacherSpec,
        selection: Selection,
        batch: BatchSpec,
        batch_tokens: int = 16384,
        pad_id: int = 0,
        large_model: bool = True,
        model_copies: int | None = None,
        progress: bool = False,
        progress_total: int | None = None,
        progress_exact: bool = True,
    ) -> None:
        super().__init__(
            min_batch_size=batch_tokens, max_batch_size=batch_tokens, element_size_fn=window_size,
            large_model=large_model, model_copies=model_copies,
        )
        self._teacher = teacher
        self._selection = selection
        self._batch = batch
        self._pad_id = pad_id
        self._progress = progress
        self._progress_total = progress_total
        self._progress_exact = progress_exact

    def load_model(self) -> TeacherRunner:
        return TeacherRunner(teacher=self._teacher, selection=self._selection, batch=self._batch, pad_id=self._pad_id,
                             progress=self._progress, progress_total=self._progress_total,
                             progress_exact=self._progress_exact)

    def run_inference(self, batch: Sequence[Window], model: TeacherRunner, inference_args: Optional[dict[str, Any]] = None) -> Iterable[tuple[Window, Output]]:
        # Only ids and draw keys go to the (possibly proxied) model; the windows' text and
        # offsets stay in this process and are re-attached here.
        outs = model.infer([w.input_ids for w in batch], [w.key for w in batch])
        return list(zip(batch, outs))

    def get_num_bytes(self, batch: Sequence[Window]) -> int:
        return sum(w.input_ids.nbytes for w in batch)

    def get_metrics_namespace(self) -> str:
        return "kdstore_capture"

    def batch_elements_kwargs(self):
        return dict(self._batching_kwargs)
