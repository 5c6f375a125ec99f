"""Stored targets of an object-storage store, downloaded once per node.

Read straight from object storage, a node would download the target objects its ranks need
once per local rank (a store's objects are shards of many chunks, and a node's ranks need
chunks from nearly every shard). Here the local ranks of a node split the epoch's target
objects (the store's own compressed shard files of every target array: ``logp``, the class
ids, the attention maps), each downloads its share into a node-local mirror directory, and
after a barrier every rank reads the epoch from local disk (:func:`node_local`). Each stored
byte crosses the network about once per node per epoch, and the next epoch's objects are
downloaded in the background while this one trains.

The mirror is a partial copy of the store: its metadata (every ``zarr.json``), the completion
markers and target arrays of the epochs in use (this one and the next); nothing else (keys,
labels and seeds are read from the store itself). Only those epochs are listed and fetched,
so requests per epoch do not grow with the store's epochs. An object is fetched again when
its size or ETag / modification time in the store's listing changed, so a rewritten store is
never read stale. Each rank deletes its own share of the epochs it no longer uses.

``TINYDISTILL_CACHE`` sets the cache directory (default ``~/.cache/tinydistill``; the mirror
is in its ``stores/`` folder); ``TINYDISTILL_NODE_CACHE=0`` turns the mirror off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from . import dist
from .errors import StoreError, one_line

MARKERS = "complete"  # (epoch, shard) completion markers: only the epoch's own are copied
_pending: dict[tuple[str, int], Future] = {}  # (store url, epoch) -> its download in the background
_threads: list[ThreadPoolExecutor] = []


def target_arrays(store) -> tuple[str, ...]:
    """The store's per-view target arrays, (epoch, row, ...): every array of its target kinds."""
    return tuple(a.name for kind in store.kinds for a in kind.arrays())


def cache_root() -> Path:
    return Path(os.environ.get("TINYDISTILL_CACHE") or Path.home() / ".cache" / "tinydistill") / "stores"


def enabled(store) -> bool:
    return "://" in str(store.path) and not str(store.path).startswith("file://") and \
        os.environ.get("TINYDISTILL_NODE_CACHE", "1") != "0"


def local_rank_world() -> tuple[int, int]:
    """This process's rank among the ranks of its node, and their number (torchrun's variables)."""
    return int(os.environ.get("LOCAL_RANK", 0)), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _epoch_of(rel: str, arrays: tuple[str, ...]) -> int | None:
    """The epoch of a per-epoch object (a target chunk or a completion marker), else None."""
    parts = rel.split("/")
    if parts[0] in arrays and len(parts) > 2 and parts[1] == "c" and parts[2].isdigit():
        return int(parts[2])
    return None


def _wanted(rel: str, epoch: int, arrays: tuple[str, ...]) -> bool:
    return rel.split("/")[-1] == "zarr.json" or _epoch_of(rel, arrays) == epoch


def _version(info: dict) -> str:
    """What identifies an object's bytes in a listing: size plus ETag or modification time."""
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{info.get('size')}:{tag}"


def fetch_epoch(store, epoch: int, local_rank: int = 0, local_world: int = 1, keep: tuple[int, ...] = ()) -> dict:
    """Download this local rank's share of epoch ``epoch``'s target objects and completion
    markers (and the metadata) into the mirror, and delete its share of the epochs neither
    ``epoch`` nor in ``keep``; returns ``{"root", "objects", "fetched_bytes", "epoch_bytes"}``.
    Lists only what the epoch needs: requests grow with the epoch, not with the store."""
    import fsspec

    url = str(store.path).rstrip("/")
    fs, root = fsspec.core.url_to_fs(url, **(store._storage_options or {}))
    root = root.rstrip("/")
    mirror = _mirror(url)
    targets = target_arrays(store)
    arrays = (*targets, MARKERS)
    listing: dict = {}
    try:  # the metadata and this epoch's markers and targets: never the other epochs' objects
        listing.update(fs.find(root, maxdepth=2, detail=True))
        for a in arrays:
            listing.update(fs.find(f"{root}/{a}/c/{epoch}", detail=True))
    except Exception as e:
        raise StoreError(f"{url}: cannot list the store for the node cache ({one_line(e)})") from e
    objects = sorted((p[len(root) + 1:], info) for p, info in listing.items()
                     if p.startswith(root + "/") and info.get("type", "file") == "file")
    wanted = [(rel, info) for rel, info in objects if _wanted(rel, epoch, arrays)]
    versions_f = mirror / f".versions.{local_rank}.json"
    versions = json.loads(versions_f.read_text()) if versions_f.exists() else {}
    fetched = 0
    for i, (rel, info) in enumerate(wanted):
        if i % local_world != local_rank:
            continue
        dest = mirror / rel
        ver = _version(info)
        if dest.exists() and versions.get(rel) == ver:
            continue
        try:
            data = fs.cat_file(f"{root}/{rel}")
        except Exception as e:
            raise StoreError(f"{url}: cannot download {rel} for the node cache ({one_line(e)})") from e
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)  # a reader sees the whole object or none
        versions[rel] = ver
        fetched += len(data)
    # this rank's share of the epochs no longer used
    for rel in [r for r in versions if _epoch_of(r, arrays) not in (None, epoch, *keep)]:
        (mirror / rel).unlink(missing_ok=True)
        del versions[rel]
    mirror.mkdir(parents=True, exist_ok=True)
    tmp = versions_f.with_name(versions_f.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(versions))
    os.replace(tmp, versions_f)
    epoch_bytes = sum(int(info.get("size") or 0) for rel, info in wanted if rel.split("/")[0] in targets)
    return {"root": str(mirror), "objects": [rel for rel, _ in wanted], "fetched_bytes": fetched,
            "epoch_bytes": epoch_bytes}


def _mirror(url: str) -> Path:
    return cache_root() / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]


def node_local(store, epoch: int, following: int | None = None):
    """``store`` itself for a local store; for one on object storage, a store opened on the
    node's mirror holding epoch ``epoch``'s targets. With ``following``, that epoch's targets
    start downloading in the background (one thread) while this one trains, so the next call
    finds them on disk. Every rank must call it, in step."""
    if not enabled(store):
        return store
    from .store import open_store

    url = str(store.path).rstrip("/")
    lr, lw = local_rank_world()
    got = None
    for key in [k for k in _pending if k[0] == url]:  # one download at a time per mirror
        fut = _pending.pop(key)
        try:
            res = fut.result()
        except Exception:  # tried again below, in the foreground, where its error is raised
            res = None
        if key[1] == epoch:
            got = res
    if got is None:
        got = fetch_epoch(store, epoch, lr, lw, keep=() if following is None else (following,))
    dist.barrier()  # every local rank has its share on disk
    missing = [rel for rel in got["objects"] if not (Path(got["root"]) / rel).exists()]
    if missing:
        raise StoreError(f"{store.path}: node cache {got['root']} lacks {len(missing)} object(s) of epoch {epoch} "
                         f"(e.g. {missing[0]}); is TINYDISTILL_CACHE shared by ranks of different nodes?")
    if following is not None and following != epoch:
        if not _threads:
            _threads.append(ThreadPoolExecutor(1, thread_name_prefix="node-cache"))
        _pending[(url, following)] = _threads[0].submit(fetch_epoch, store, following, lr, lw, (epoch,))
    return open_store(got["root"])


def clear(store) -> None:
    """Remove the node mirror of ``store`` (e.g. after training)."""
    shutil.rmtree(_mirror(str(store.path)), ignore_errors=True)
