"""Writers' leases: two gen-logits runs never fill the same epochs of one store at once.

Object storage has no locks, so a lease is a small JSON object per run,
``complete/lease/<run id>.json`` (beside the completion markers, where zarr readers never
look), holding the run's epochs, host, pid and expiry. To take one: list the leases and refuse
on a live one whose epochs overlap ours; write ours; list again and back off if an overlapping
lease appeared meanwhile (of two runs that race, at least one sees the other: a write always
precedes its writer's second listing). The holder rewrites its lease every ``ttl / 4`` seconds,
so a killed run's lease goes stale after ``ttl`` seconds (at once when its pid is dead on this
host), and before each unit every rank checks that its run still holds it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ..errors import StoreError, one_line

PREFIX = "complete/lease/"
TTL_S = 120.0  # TINYDISTILL_LEASE_S overrides it

log = logging.getLogger("tinydistill")


class LeaseError(StoreError):
    """Another run holds (or took over) the epochs this run would write."""


def ttl() -> float:
    return float(os.environ.get("TINYDISTILL_LEASE_S", TTL_S))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _machine() -> str:
    """Which pids a pid names: host name, kernel boot and pid namespace (containers differ)."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, ns = "", ""
    return f"{socket.gethostname()}/{boot}/{ns}"


def stale(rec: dict, now: float | None = None) -> str | None:
    """Why a lease no longer counts ("expired", "its process is dead"), or None while it does."""
    if rec.get("machine") == _machine() and not _pid_alive(int(rec.get("pid", -1))):
        return f"its process {rec.get('pid')} on this host is dead"
    if float(rec.get("expires", 0)) < (time.time() if now is None else now):
        return "it expired"
    return None


def _overlap(a: tuple[int, int], b) -> bool:
    return a[0] < int(b[1]) and int(b[0]) < a[1]


async def _list(store) -> list[str]:
    return [k async for k in store.list_prefix(PREFIX)]


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


def describe(rec: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    a, b = rec.get("epochs", ("?", "?"))
    return (f"run {rec.get('run')} on host {rec.get('host')}, pid {rec.get('pid')}, epochs {a}:{b}, "
            f"lease renewed {max(0, now - float(rec.get('renewed', now))):.0f} s ago")


class Lease:
    """This run's lease on epochs [a, b) of the store at ``path`` (``store``: its zarr Store).
    Rank 0 :meth:`take`s it and keeps it fresh; every rank :meth:`check`s it before a unit."""

    def __init__(self, store, path: str, epochs: tuple[int, int], run: str | None = None,
                 ttl_s: float | None = None):
        self.store, self.path, self.epochs = store, path, (int(epochs[0]), int(epochs[1]))
        self.run = run or uuid.uuid4().hex[:12]
        self.key = f"{PREFIX}{self.run}.json"
        self.ttl = ttl() if ttl_s is None else float(ttl_s)
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the objects ----

    def _read(self, key: str) -> dict | None:
        buf = sync(self.store.get(key, default_buffer_prototype()))
        if buf is None:
            return None
        try:
            return json.loads(buf.to_bytes())
        except ValueError:
            return {"run": key.rsplit("/", 1)[-1][:-5], "expires": 0}  # not one of ours (writes are whole)

    def _write(self) -> None:
        now = time.time()
        rec = {"run": self.run, "host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(),
               "epochs": list(self.epochs),
               "renewed": now, "expires": now + self.ttl, "ttl_s": self.ttl,
               "renewed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))}
        sync(self.store.set(self.key, default_buffer_prototype().buffer.from_bytes(json.dumps(rec).encode())))

    def others(self, epochs: tuple[int, int] | None = None) -> list[dict]:
        """Live leases of other runs whose epochs overlap ``epochs`` (default: this lease's);
        stale ones are removed on the way."""
        epochs = epochs or self.epochs
        out = []
        for key in sync(_list(self.store)):
            if key == self.key or not key.endswith(".json"):
                continue
            rec = self._read(key)
            if rec is None:
                continue
            why = stale(rec)
            if why:
                log.info("%s: ignoring the lease of %s: %s", self.path, describe(rec), why)
                sync(self.store.delete(key))
            elif _overlap(epochs, rec.get("epochs", (0, 1 << 62))):
                out.append(rec)
        return out

    def refusal(self, rec: dict, what: str) -> LeaseError:
        now = time.time()
        exp = float(rec.get("expires", now))
        return LeaseError(
            f"{self.path}: {what} another gen-logits run is writing epochs that overlap {self.epochs[0]}:"
            f"{self.epochs[1]} ({describe(rec, now)}); wait for it to end, or if it was killed, re-run after "
            f"its lease expires at {_clock(exp)} (in {max(0, exp - now):.0f} s; a lease lasts {self.ttl:.0f} s "
            f"after its last renewal)")

    # ---- rank 0 ----

    def take(self) -> "Lease":
        """Take the lease and keep it fresh from a thread, or a one-line :class:`LeaseError`."""
        try:
            held = self.others()
            if held:
                raise self.refusal(held[0], "refused:")
            self._write()
            raced = self.others()
            if raced:
                sync(self.store.delete(self.key))
                raise self.refusal(raced[0], "refused, started at the same moment as")
        except LeaseError:
            raise
        except Exception as e:
            raise StoreError(f"{self.path}: cannot take the writer's lease ({one_line(e)})") from None
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="tinydistill-lease")
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Rewrite the lease with a fresh expiry; False (and ``lost`` says why) once it is not ours."""
        rec = self._read(self.key)
        if rec is None or rec.get("run") != self.run:
            self.lost = "it was removed (another run found it stale and took over)"
            return False
        self._write()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                if not self.renew():
                    return
            except Exception as e:  # a blip: the next beat tries again, well before expiry
                log.warning("%s: cannot renew the writer's lease (%s)", self.path, one_line(e))

    def release(self) -> None:
        """Stop renewing and remove the lease (the run is over, whatever its outcome); only
        the process that took it does anything."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            if self.lost is None and (self._read(self.key) or {}).get("run") == self.run:
                sync(self.store.delete(self.key))
        except Exception as e:
            log.warning("%s: cannot remove the writer's lease %s (%s); it expires by itself",
                        self.path, self.key, one_line(e))

    # ---- every rank ----

    def check(self, where: str = "") -> None:
        """Refuse to write a unit once this run no longer holds its lease."""
        try:
            rec = self._read(self.key)
        except Exception as e:  # the store is unreachable: so would the unit be
            raise StoreError(f"{self.path}: {where or 'next unit'}: cannot read the writer's lease, unit left "
                             f"incomplete ({one_line(e)})") from None
        if self.lost or rec is None or rec.get("run") != self.run:
            raise LeaseError(
                f"{self.path}: this run's lease on epochs {self.epochs[0]}:{self.epochs[1]} was lost "
                f"({self.lost or 'it was removed: another run found it stale and took over'}); stopped before "
                f"{where or 'the next unit'}; the units written are kept: re-run the same command once the "
                "other run is over")


def lease_at(path: str, epochs: tuple[int, int], run: str | None = None, storage_options: dict | None = None):
    """A :class:`Lease` on the group at ``path`` (a store, or one whose creation did not
    finish), or None when no group opens there."""
    from .core import _open_group

    try:
        group = _open_group(path, "r+", storage_options)
    except Exception:
        return None
    return Lease(group.store, path, epochs, run)
