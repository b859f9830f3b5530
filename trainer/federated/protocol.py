"""The messages of the seed-003 protocol on Flower's Message API.

Master -> node (``Message.content`` records):

* ``query.instruction`` -- ConfigRecord ``instruction``: ``encoder_type``, ``encoder`` (JSON of the
  architecture config), ``vocab_id`` (:func:`kdstore.tokenizer.tokenizer_hash` of the shared
  tokenizer), ``vocab_size``.
* ``train`` -- ArrayRecord ``encoder`` (global shared-encoder parameters) + ConfigRecord ``rule``
  (update rule ``kind`` = steps | seconds, ``steps``, ``seconds``, optimiser settings, ``version``
  of the global parameters, ``seed``).
* ``evaluate`` -- ArrayRecord ``encoder``: held-out metrics of the global encoder.

Node -> master (the only things a master ever receives):

* confirm/decline -- MetricRecord ``confirm``: ``accept`` (1/0), ``task_id`` (index into
  :data:`~trainer.federated.config.TASKS`), ``num_examples``, ``reason`` (a code of
  :data:`~trainer.federated.config.DECLINE_REASONS`).
* update -- ArrayRecord ``encoder`` (shared parameters only) + MetricRecord ``metrics``
  (``num_examples``, ``steps``, ``train_loss``, ``base_version``, ``task_id``, ``eval_*``).
"""

from __future__ import annotations

import numpy as np

INSTRUCTION = "query.instruction"
TRAIN = "train"
EVALUATE = "evaluate"


def to_record(params: dict[str, np.ndarray]):
    """``{name: ndarray}`` -> ``flwr.app.ArrayRecord`` (names kept)."""
    from flwr.app import Array, ArrayRecord  # noqa: PLC0415

    return ArrayRecord({k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in params.items()})


def from_record(record) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_record`."""
    return {k: a.numpy() for k, a in record.items()}
