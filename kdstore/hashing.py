"""Hashes used by the store: token hashes, sample ids and file checksums (all xxHash)."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import xxhash

TOKEN_HASH = "xxh3_64"
SAMPLE_ID_HASH = "xxh3_64(source_id + '\\x00' + text, utf-8), 16 hex digits"
CHECKSUM = "xxh3_128"


def token_hash(token: bytes) -> int:
    """xxh3-64 of a token's bytes, as an unsigned 64-bit integer."""
    return xxhash.xxh3_64_intdigest(token)


def token_hashes(tokens: Iterable[bytes]) -> np.ndarray:
    """xxh3-64 of each token's bytes -> uint64 array."""
    return np.fromiter((xxhash.xxh3_64_intdigest(t) for t in tokens), dtype=np.uint64)


def sample_id(text: str, source_id: str | None = None) -> str:
    """Stable content id of a sample: 16 hex digits of xxh3-64 over (source id, text).

    The id depends on content only, so soft labels are looked up by sample, never by step
    or position in a file: reordering, re-sharding or re-running a corpus keeps ids.
    """
    key = ("" if source_id is None else str(source_id)) + "\x00" + text
    return xxhash.xxh3_64_hexdigest(key.encode("utf-8"))


def file_checksum(stream_or_bytes, *, chunk: int = 1 << 22) -> str:
    """``xxh3_128:<hex>`` of a readable binary stream (read to the end) or of bytes."""
    h = xxhash.xxh3_128()
    if isinstance(stream_or_bytes, (bytes, bytearray, memoryview)):
        h.update(stream_or_bytes)
    else:
        while True:
            b = stream_or_bytes.read(chunk)
            if not b:
                break
            h.update(b)
    return f"{CHECKSUM}:{h.hexdigest()}"


def files_checksum(paths) -> str:
    """``xxh3_128:<hex>`` of the concatenated contents of ``paths`` (in order), streamed."""
    h = xxhash.xxh3_128()
    for path in paths:
        with open(path, "rb") as f:
            while True:
                b = f.read(1 << 22)
                if not b:
                    break
                h.update(b)
    return f"{CHECKSUM}:{h.hexdigest()}"
