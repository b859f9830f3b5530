"""Distillation losses as small functions over the dataset's batch tensors.

Shapes (token level; any leading shape works, ``[B, T]`` below):

* student ``logits`` ``[B, T, V]`` (any float dtype; every loss is computed in fp32)
* ``labels`` ``[B, T]`` long: the next token, ``-100`` ignored (already shifted: position t
  is compared with ``logits[:, t]``)
* ``kd_indices`` ``[B, T, K]`` long, ``kd_probs`` ``[B, T, K]`` float (0 in padding slots),
  ``kd_tail`` ``[B, T]`` float (teacher mass outside the kept entries), ``kd_mask`` ``[B, T]``
* ``teacher_logits`` ``[B, T, V']`` for the dense (online teacher) baseline

Conventions (all losses): fp32 math; positions outside the mask contribute nothing; the
``"mean"`` reduction divides by the number of valid positions and returns an exact 0 (with
a gradient path, never NaN) when there are none; ``chunk_size`` processes positions in
chunks under activation checkpointing, so the fp32 ``[N, V]`` intermediates of only one
chunk are alive at a time, forward and backward (results equal the unchunked ones).

The sparse KL treats the kept entries plus one *tail bucket* as a (K+1)-class
distribution: the teacher's tail mass against the student's mass on every class that is
not kept. With all classes kept (K = V) it is the dense KL. A slot is a kept entry when
its probability is > 0 (padding slots hold probability 0); kept indices are unique within
a position (the store guarantees it). In ``sample`` mode the stored
draw frequencies (tail 0) are the target: forward KL is then the RS-KD estimator, an
unbiased estimate of the full cross-entropy up to a constant.

:func:`sparse_jsd_loss` is TRL GKD's generalized Jensen-Shannon divergence (beta) over the
same (K+1)-class targets; :func:`ce_and_stored_kd_loss` picks the loss by name for recipes.
:func:`uld_loss` (sorted-probability Wasserstein-1) and :func:`chain_merged_kd_loss` (GOLD's
chain-rule group merge) serve cross-tokenizer students (``trainer.core.losses.xtok``).

The trainer calls :func:`ce_and_sparse_kd_loss` / :func:`ce_and_dense_kd_loss`: the same
two numbers as the separate losses (tested values and gradients), but from one fp32
log-softmax over ``[N, V]`` -- for a small student that tensor is the largest of the step,
so sharing it is what keeps a cached-KD step close to a CE-only step.
"""

from trainer.core.losses._kd import (  # noqa: F401 - the public names of trainer.core.losses
    IGNORE_INDEX, KINDS, ce_and_dense_kd_loss, ce_and_sparse_kd_loss, ce_loss, dense_kd_loss, mix, sparse_kd_loss,
)
from trainer.core.losses.jsd import ce_and_stored_kd_loss, sparse_jsd_loss  # noqa: F401
from trainer.core.losses.rdrop import RDropLoss, rdrop_loss  # noqa: F401
from trainer.core.losses.xtok import chain_merged_kd_loss, uld_loss  # noqa: F401
