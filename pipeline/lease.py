"""One writer per OUTPUT: a lease object in the output, renewed by the driver's heartbeat.

The lease (`_lease.json`: owner token, host, pid, since, heartbeat) is created exclusively:
a conditional put (`If-None-Match: *`) on S3, O_EXCL on local disks, create-then-read-back
elsewhere. A second driver on the same OUTPUT refuses at once, naming the holder. A lease
whose heartbeat is older than STALE_AFTER_SECONDS, or whose holder ran on this host and is
gone (a crash, then the same command again), or `--takeover`, is taken over. Write
tasks check the lease before each commit, so a dead driver's leftover workers cannot
commit over a job that took the output over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from pipeline.resume import ResumeError
from pipeline.storage import create_exclusive, filesystem, join, write_atomic

LEASE_FILE = "_lease.json"
HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 6 * HEARTBEAT_SECONDS


class LeaseHeld(ResumeError):
    """Another driver is writing this OUTPUT."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over: stop writing."""


@dataclass(frozen=True)
class Lease:
    owner: str
    host: str
    pid: int
    since: float
    heartbeat: float

    def describe(self) -> str:
        return f"{self.host}:{self.pid} since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.since))}"


def read_lease(output: str) -> Lease | None:
    fs, root = filesystem(output)
    try:
        return Lease(**json.loads(fs.cat_file(join(root, LEASE_FILE))))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # a torn or foreign file: nobody holds it
        return None


def this_host() -> str:
    """The name a lease (and a run's record in _runs/) gives this machine."""
    return socket.gethostname()


def _dead_here(lease: Lease) -> bool:
    """The holder ran on this host and its process is gone (a crash, then the same command again)."""
    if lease.host != this_host():
        return False
    try:
        os.kill(lease.pid, 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def alive(lease: Lease) -> bool:
    """Its holder beat recently and, when it ran on this host, its process still exists."""
    return time.time() - lease.heartbeat <= STALE_AFTER_SECONDS and not _dead_here(lease)


def acquire(output: str, *, takeover: bool = False) -> Lease:
    fs, root = filesystem(output)
    path = join(root, LEASE_FILE)
    held = read_lease(output)
    if held is not None:
        if alive(held) and not takeover:
            raise LeaseHeld(f"{output} is being written by {held.describe()}; use --takeover if that job is dead")
        fs.rm_file(path)
    now = time.time()
    mine = Lease(uuid.uuid4().hex, this_host(), os.getpid(), now, now)
    created = create_exclusive(fs, path, json.dumps(asdict(mine)).encode())
    winner = read_lease(output)
    if not created or winner is None or winner.owner != mine.owner:
        other = winner.describe() if winner else "another driver"
        raise LeaseHeld(f"{output} is being written by {other}; use --takeover if that job is dead")
    return mine


def check(output: str, owner: str) -> None:
    """Raise LeaseLost unless `owner` still holds the output's lease."""
    held = read_lease(output)
    if held is None or held.owner != owner:
        raise LeaseLost(f"{output}: the lease was taken over by {held.describe() if held else 'nobody'}; this run stops writing")


def release(output: str, lease: Lease) -> None:
    held = read_lease(output)
    if held is not None and held.owner == lease.owner:
        fs, root = filesystem(output)
        fs.rm_file(join(root, LEASE_FILE))


class Heartbeat:
    """Renews the lease every HEARTBEAT_SECONDS while a run goes on (a daemon thread)."""

    def __init__(self, output: str, lease: Lease):
        self.output, self.lease, self._stop = output, lease, threading.Event()
        self.lost: LeaseLost | None = None
        self._thread = threading.Thread(target=self._beat, daemon=True, name="genfleet-lease")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                check(self.output, self.lease.owner)
                fs, root = filesystem(self.output)
                renewed = Lease(**{**asdict(self.lease), "heartbeat": time.time()})
                write_atomic(fs, join(root, LEASE_FILE), json.dumps(asdict(renewed)).encode())
            except LeaseLost as e:
                self.lost = e
                return
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        release(self.output, self.lease)
