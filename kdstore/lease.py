"""One writer per store: a lease object ``_writer.lease`` at the store root.

A capture takes the lease before it touches the store and gives it back when it ends. The
lease is a small JSON object naming its holder (``host``, ``pid``, process ``started``
time, a random ``token``) and a ``heartbeat`` time that a background thread refreshes every
``heartbeat_s`` seconds while the holder runs.

How the lease is created (what is guaranteed where, also in ``docs/format.md``):

* Local disk and POSIX shared filesystems: ``open(O_CREAT | O_EXCL)``, an atomic
  create-if-absent. Two writers can never both hold the lease.
* Object stores (``gs://``, ``s3://``) through pyarrow have no create-if-absent write.
  The lease is written only if absent, then read back after ``settle_s``: a writer whose
  token is not the one read back lost the race and fails. Both GCS and S3 give
  read-after-write consistency, so the window for two winners is the time between the
  existence check and the upload (milliseconds). The manifest commit then *fences*: a
  writer re-reads the lease right before it writes ``manifest.json`` and refuses to write
  it unless the lease still carries its own token, so a writer that lost its lease never
  publishes a manifest.

A lease is **stale** when its holder is on this host and its pid is gone (or has another
start time), or when its heartbeat is older than ``stale_after_s`` (another host: the
holder stopped refreshing it). A stale lease is broken only when asked to
(``break_stale=True``, ``kd cache --break-lock``); a live one never is.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from kdstore.errors import StoreError
from kdstore.fs import Location, resolve

LEASE = "_writer.lease"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class StoreLockedError(StoreError, RuntimeError):
    """Another writer holds the store's lease (the message names it and what to do)."""


def _process_start(pid: int) -> float | None:
    """Start time of a local process (seconds since the epoch), None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError, StopIteration):  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return -1.0  # alive, start time unknown


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class LeaseInfo:
    """Who holds a lease: ``host``, ``pid``, ``started`` (process start, epoch s), ``token``,
    ``acquired`` and ``heartbeat`` (epoch s), ``command`` (what runs)."""

    host: str
    pid: int
    started: float
    token: str
    acquired: float
    heartbeat: float
    command: str = ""

    @classmethod
    def mine(cls, command: str) -> "LeaseInfo":
        pid = os.getpid()
        now = _now()
        return cls(host=socket.gethostname(), pid=pid, started=_process_start(pid) or now, token=uuid.uuid4().hex,
                   acquired=now, heartbeat=now, command=command)

    def describe(self) -> str:
        return (f"host {self.host} pid {self.pid} (process started {_iso(self.started)}, {self.command or 'a writer'}), "
                f"last heartbeat {max(0.0, _now() - self.heartbeat):.0f}s ago")

    def stale_reason(self, stale_after_s: float) -> str | None:
        """Why this lease is stale, or None if its holder may still be running."""
        if self.host == socket.gethostname():
            started = _process_start(self.pid)
            if started is None:
                return f"process {self.pid} on this host is not running"
            if started > 0 and self.started > 0 and abs(started - self.started) > 2.0:
                return f"pid {self.pid} on this host now belongs to another process"
            return None
        age = _now() - self.heartbeat
        if age > stale_after_s:
            return f"no heartbeat for {age:.0f}s (more than {stale_after_s:.0f}s)"
        return None


def read_lease(loc: Location) -> LeaseInfo | None:
    """The current lease of a store, or None. An unreadable lease is reported as held by
    an unknown writer (heartbeat 0: stale after ``stale_after_s``)."""
    if not loc.exists(LEASE):
        return None
    try:
        d = json.loads(loc.read_bytes(LEASE))
        return LeaseInfo(**{k: d[k] for k in LeaseInfo.__dataclass_fields__ if k in d})
    except (OSError, ValueError, TypeError, KeyError):
        return LeaseInfo(host="?", pid=-1, started=0.0, token="?", acquired=0.0, heartbeat=0.0, command="unreadable lease")


class WriterLease:
    """The lease of one writer on one store (a context manager).

    >>> with WriterLease.acquire("out/store", command="kd cache"):
    ...     ...  # write shards; lease.check() before publishing the manifest
    """

    def __init__(self, loc: Location, info: LeaseInfo, *, heartbeat_s: float) -> None:
        self.loc = loc
        self.info = info
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.released = False

    @classmethod
    def acquire(cls, uri: str, *, command: str = "", break_stale: bool = False, heartbeat_s: float = HEARTBEAT_S,
                stale_after_s: float = STALE_AFTER_S, settle_s: float = 1.0) -> "WriterLease":
        """Take the store's lease or raise :class:`StoreLockedError` naming the holder."""
        loc = resolve(uri)
        loc.makedirs()
        info = LeaseInfo.mine(command)
        for _ in range(2):  # second round: after breaking a stale lease
            held = read_lease(loc)
            if held is not None:
                reason = held.stale_reason(stale_after_s)
                if reason is None:
                    raise StoreLockedError(
                        f"{uri}: another writer holds this store: {held.describe()}. Wait for it to finish; "
                        f"if it is dead on another host, --break-lock takes over once its heartbeat is older than "
                        f"{stale_after_s:.0f}s"
                    )
                if not break_stale:
                    raise StoreLockedError(
                        f"{uri}: the store is locked by a writer that is gone ({reason}): {held.describe()}. "
                        f"If no other capture writes to it, re-run with --break-lock"
                    )
                loc.fs.delete_file(loc.join(LEASE))
            if _create_exclusive(loc, json.dumps(asdict(info)).encode(), settle_s=settle_s, token=info.token):
                lease = cls(loc, info, heartbeat_s=heartbeat_s)
                lease._start_heartbeat()
                return lease
        held = read_lease(loc)
        raise StoreLockedError(f"{uri}: another writer took the store's lease first: {held.describe() if held else 'unknown'}")

    def check(self) -> None:
        """Raise :class:`StoreLockedError` unless this writer still holds the lease (fencing)."""
        check_lease(self.loc.uri, self.info.token)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        if self.released:
            return
        self.released = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = read_lease(self.loc)
        if held is not None and held.token == self.info.token:
            self.loc.fs.delete_file(self.loc.join(LEASE))

    def __enter__(self) -> "WriterLease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _start_heartbeat(self) -> None:
        if self._heartbeat_s <= 0:
            return
        self._thread = threading.Thread(target=self._beat, name="kdstore-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            held = read_lease(self.loc)
            if held is None or held.token != self.info.token:
                return  # lost (broken by someone): check() reports it at commit
            self.info.heartbeat = _now()
            try:
                self.loc.write_bytes_atomic(LEASE, json.dumps(asdict(self.info)).encode())
            except OSError:
                pass  # a transient error: the next beat retries; staleness needs many missed beats


def _create_exclusive(loc: Location, data: bytes, *, settle_s: float, token: str) -> bool:
    """Create the lease object only if absent; True if this writer owns it afterwards."""
    path = loc.join(LEASE)
    if loc.is_local:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    if loc.exists(LEASE):
        return False
    with loc.fs.open_output_stream(path) as f:
        f.write(data)
    time.sleep(settle_s)  # let a racing writer's upload land, then see whose token survived
    held = read_lease(loc)
    return held is not None and held.token == token


def check_lease(uri: str, token: str | None) -> None:
    """Fencing for code that runs elsewhere (a pipeline's finalize step): raise
    :class:`StoreLockedError` unless the store's lease carries ``token``."""
    if token is None:
        return
    loc = resolve(uri)
    held = read_lease(loc)
    if held is None or held.token != token:
        who = held.describe() if held else "nobody (the lease was removed)"
        raise StoreLockedError(
            f"{uri}: this capture lost the store's lease (now held by {who}); its manifest is not written. "
            f"Re-run with --resume when the other writer is done"
        )
