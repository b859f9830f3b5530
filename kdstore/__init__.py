"""kdstore: soft-label caching for knowledge distillation.

Public API (everything else is private)::

    store = kdstore.open(uri)            # read: manifest, shards, decode
    with kdstore.StoreWriter(uri, ...):  # write: rows, vocab, dead letters, manifest last
    kdstore.SoftLabelDataset(store, ...) # torch IterableDataset with resume
"""

from kdstore._version import __version__
from kdstore.errors import CorruptShardError, IncompleteStoreError, StoreError, StoreFormatError
from kdstore.format import FORMAT_VERSION, Manifest, Selection, ShardInfo, TeacherInfo
from kdstore.store import DecodedRows, Store, open
from kdstore.writer import SoftLabelRow, StoreWriter, vocab_table

__all__ = [
    "__version__", "FORMAT_VERSION", "open", "Store", "DecodedRows", "StoreWriter", "SoftLabelRow", "vocab_table",
    "Manifest", "Selection", "ShardInfo", "TeacherInfo",
    "StoreError", "StoreFormatError", "IncompleteStoreError", "CorruptShardError",
    "SoftLabelDataset", "StoreLoader",
]


def __getattr__(name: str):
    # The dataset pulls in torch; import it only when asked for.
    if name in ("SoftLabelDataset", "StoreLoader"):
        from kdstore import dataset

        return getattr(dataset, name)
    raise AttributeError(name)
