"""Filesystem layer: local paths and URIs (``file://``, ``gs://``, ``s3://``, ``hdfs://``, or
any fsspec protocol) resolved to a ``pyarrow.fs.FileSystem`` and a root path."""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A store root: a pyarrow filesystem and the path of the root inside it."""

    fs: pafs.FileSystem
    root: str
    uri: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.join(rel)).type != pafs.FileType.NotFound

    def size(self, rel: str) -> int:
        return self.fs.get_file_info(self.join(rel)).size

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.join(rel)) as f:
            return f.read()

    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self.join(rel) if rel else self.root, recursive=True)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Write a file so that readers see either nothing or the whole file.

        Local filesystems: write a temporary sibling, fsync, ``os.replace``. Object stores
        (GCS, S3) publish an object only when its upload completes, so a single write is
        already atomic there.
        """
        path = self.join(rel)
        if self.is_local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def list(self, rel: str) -> list[str]:
        """Relative paths of the files below ``rel`` (recursive); empty if it does not exist."""
        base = self.join(rel)
        info = self.fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            return []
        sel = pafs.FileSelector(base, recursive=True)
        out = []
        for fi in self.fs.get_file_info(sel):
            if fi.type == pafs.FileType.File:
                out.append(posixpath.relpath(fi.path, self.root))
        return sorted(out)


def resolve(uri: str | os.PathLike) -> Location:
    """Resolve a local path or URI to a :class:`Location`.

    pyarrow handles local paths, ``file://``, ``gs://``, ``s3://`` and ``hdfs://``
    natively; other schemes (``memory://``, ``az://``...) go through fsspec.
    """
    s = os.fspath(uri)
    if "://" not in s:
        return Location(pafs.LocalFileSystem(), os.path.abspath(s), s)
    try:
        fs, path = pafs.FileSystem.from_uri(s)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        try:
            import fsspec  # noqa: PLC0415
        except ImportError as exc:  # pragma: no cover
            raise ValueError(f"cannot open {s!r}: unsupported URI scheme and fsspec is not installed") from exc
        fsspec_fs, path = fsspec.core.url_to_fs(s)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs))
    return Location(fs, path.rstrip("/") or "/", s)
