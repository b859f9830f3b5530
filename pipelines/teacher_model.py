"""A loaded teacher behind one small interface (:class:`TeacherModel`), and the split of a
causal LM into decoder and LM head that lets the capture run the head per chunk
(:func:`split_head`). Loading lives in :mod:`pipelines.teachers`."""

from __future__ import annotations

import logging
from typing import Any

_LOG = logging.getLogger(__name__)


class TeacherModel:
    """A loaded teacher on its device.

    ``logits(input_ids [B, T] long, attention_mask [B, T] long)`` -> ``[B, T, V]`` (token
    level) or ``[B, C]`` (sequence level). ``pad_id``: the id a sequence classifier can be
    padded with (None: it cannot batch, e.g. an HF classifier without ``pad_token_id``).
    ``max_positions``: the longest input the model accepts (absolute position embeddings),
    which bounds the padded length of a batch; None when unbounded or unknown.
    """

    def __init__(self, *, module: Any, forward: Any, pad_id: int | None, max_positions: int | None = None) -> None:
        self.module = module
        self._forward = forward
        self.pad_id = pad_id
        self.max_positions = max_positions
        self.split: tuple | None = None  # (decoder, LM head) of a causal LM: see split_head

    @property
    def device(self):
        return next(self.module.parameters()).device

    def logits(self, input_ids, attention_mask):
        return self._forward(self.module, input_ids, attention_mask)

    def position_rows(self, input_ids, attention_mask):
        """Token level: ``(rows [P, *], head)`` over the real positions (window by window):
        the decoder's hidden states ``[P, H]`` and the LM head when the model separates
        them (:func:`split_head`), else the logits ``[P, V]`` and None."""
        real = attention_mask.bool()
        if self.split is not None:
            decoder, head = self.split
            return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[real], head
        return self.logits(input_ids, attention_mask)[real], None

    @classmethod
    def of_hf(cls, model: Any, *, level: str = "token") -> "TeacherModel":
        """Wrap a loaded Hugging Face model (causal LM at ``level="token"``, sequence
        classifier at ``"sequence"``)."""
        pad = getattr(model.config, "pad_token_id", None)
        limit = getattr(model.config, "max_position_embeddings", None)
        out = cls(module=model, forward=_hf_logits, pad_id=None if pad is None else int(pad),
                  max_positions=int(limit) if limit else None)
        if level == "token":
            import torch  # noqa: PLC0415

            out.split = split_head(model, torch)
        return out


def split_head(model: Any, torch: Any) -> tuple | None:
    """``(decoder, head)`` of a causal LM when ``head(decoder(x).last_hidden_state)``
    reproduces ``model(x).logits``, else None (the capture then keeps full-logit forwards).

    Checked on a probe batch at load: models that post-process logits (Gemma 2's soft-
    capping, logit scales, remote code) fail the check and keep the exact full forward.
    """
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_dec is None or get_head is None:
        return None
    try:
        decoder, head = get_dec(), get_head()
        if decoder is None or head is None or decoder is model or getattr(head, "weight", None) is None:
            return None
        device = next(model.parameters()).device
        vocab = int(head.weight.shape[0])
        probe = torch.arange(16, device=device).remainder(max(1, vocab)).reshape(2, 8)
        with torch.inference_mode():
            want = model(input_ids=probe).logits.float()
            got = head(decoder(input_ids=probe).last_hidden_state).float()
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-3):
            return decoder, head
    except Exception as exc:  # noqa: BLE001 - any surprise means: use the exact full forward
        _LOG.info("teacher LM head not separable (%s); capture uses full-logit forwards", exc)
        return None
    _LOG.info("teacher logits are not head(hidden states); capture uses full-logit forwards")
    return None


def _hf_logits(module, input_ids, attention_mask):
    return module(input_ids=input_ids, attention_mask=attention_mask).logits


def _bundle_logits(module, input_ids, attention_mask):
    return module(input_ids, attention_mask)
