"""Resumable loading: a DataLoader over a :class:`~kdstore.dataset.SoftLabelDataset` whose
state is a tiny dict (epoch, batches consumed, the dataset's fingerprint).

Data order is a pure function of the seed, the epoch and the shard sizes (see
:mod:`kdstore.dataset`), so resuming needs no saved sampler or buffer state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from kdstore.dataset import SoftLabelDataset


class StoreLoader:
    """A DataLoader over a :class:`SoftLabelDataset` that knows where it is.

    ``state_dict()`` is ``{"epoch", "batches_done", "fingerprint"}``; loading it makes the
    next iteration start at the first batch not yet consumed, so an interrupted and resumed
    run sees exactly the batches of an uninterrupted one. Iterating runs one epoch (from the
    resume point); the next iteration runs the next epoch.
    """

    def __init__(self, dataset: SoftLabelDataset, *, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int | None = None) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self.batches_done = 0

    def __len__(self) -> int:
        return self.dataset.num_batches(self.epoch) - self.batches_done

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset.set_epoch(self.epoch)
        self.dataset.start_batch = self.batches_done
        kw: dict[str, Any] = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kw["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **kw)
        for batch in loader:
            self.batches_done += 1
            yield batch
        self.epoch += 1
        self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "fingerprint": self.dataset.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.dataset.fingerprint:
            raise ValueError(
                "data-loader state was saved for a different store or sharding (seed, batch size, world size, "
                "shard checksums differ); resume with the same store and settings, or start a fresh run"
            )
        self.epoch = int(state["epoch"])
        self.batches_done = int(state["batches_done"])
