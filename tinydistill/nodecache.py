"""Stored targets of an object-storage store, downloaded once per node.

With a fresh random order every epoch, every rank needs nearly every chunk of the epoch's
targets. Read straight from object storage, a node would download each epoch's targets once
per local rank. Here the local ranks of a node split the epoch's target objects (the store's
own compressed shard files of every target array: ``logp``, the class ids, the attention
maps), each downloads its share into a
node-local mirror directory, and after a barrier every rank reads the epoch from local disk
(:func:`node_local`). Each stored byte crosses the network about once per node per epoch.

The mirror is a partial copy of the store: its metadata (every ``zarr.json``), the small
``complete`` array, and the target arrays of the epochs in use; nothing else (keys, labels and
seeds are read from the store itself). An object is fetched again when its size or ETag /
modification time in the store's listing changed, so a rewritten store is never read stale.
Each rank deletes its own share of the epochs it no longer uses.

``TINYDISTILL_CACHE`` sets the cache directory (default ``~/.cache/tinydistill``; the mirror
is in its ``stores/`` folder); ``TINYDISTILL_NODE_CACHE=0`` turns the mirror off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from . import dist
from .errors import StoreError, one_line

SMALL_ARRAYS = ("complete",)  # copied whole: what reading targets checks


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


def _wanted(rel: str, epoch: int, targets: tuple[str, ...]) -> bool:
    parts = rel.split("/")
    if parts[-1] == "zarr.json":
        return True
    if parts[0] in SMALL_ARRAYS:
        return True
    return parts[0] in targets and len(parts) > 2 and parts[1] == "c" and parts[2] == str(epoch)


def _version(info: dict) -> str:
    """What identifies an object's bytes in a listing: size plus ETag or modification time."""
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime") or ""
    return f"{info.get('size')}:{tag}"


def fetch_epoch(store, epoch: int, local_rank: int = 0, local_world: int = 1) -> dict:
    """Download this local rank's share of epoch ``epoch``'s target objects (and the metadata)
    into the mirror; returns ``{"root", "objects", "fetched_bytes", "epoch_bytes"}``."""
    import fsspec

    url = str(store.path).rstrip("/")
    fs, root = fsspec.core.url_to_fs(url, **(store._storage_options or {}))
    root = root.rstrip("/")
    mirror = cache_root() / hashlib.sha256(url.encode()).hexdigest()[:24]
    targets = target_arrays(store)
    listing: dict = {}
    try:  # the metadata, the small arrays and this epoch's targets: never the other epochs' objects
        listing.update(fs.find(root, maxdepth=2, detail=True))
        for prefix in [*SMALL_ARRAYS, *(f"{a}/c/{epoch}" for a in targets)]:
            listing.update(fs.find(f"{root}/{prefix}", detail=True))
    except Exception as e:
        raise StoreError(f"{url}: cannot list the store for the node cache ({one_line(e)})") from e
    objects = sorted((p[len(root) + 1:], info) for p, info in listing.items()
                     if p.startswith(root + "/") and info.get("type", "file") == "file")
    wanted = [(rel, info) for rel, info in objects if _wanted(rel, epoch, targets)]
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
        data = fs.cat_file(f"{root}/{rel}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)  # a reader sees the whole object or none
        versions[rel] = ver
        fetched += len(data)
    # this rank's share of other epochs' targets is no longer needed
    for rel in [r for r in versions if r.split("/")[0] in targets and not _wanted(r, epoch, targets)]:
        (mirror / rel).unlink(missing_ok=True)
        del versions[rel]
    mirror.mkdir(parents=True, exist_ok=True)
    tmp = versions_f.with_name(versions_f.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(versions))
    os.replace(tmp, versions_f)
    epoch_bytes = sum(int(info.get("size") or 0) for rel, info in wanted if rel.split("/")[0] in targets)
    return {"root": str(mirror), "objects": [rel for rel, _ in wanted], "fetched_bytes": fetched,
            "epoch_bytes": epoch_bytes}


def node_local(store, epoch: int):
    """``store`` itself for a local store; for one on object storage, a store opened on the
    node's mirror holding epoch ``epoch``'s targets. Every rank must call it, in step."""
    if not enabled(store):
        return store
    from .store import open_store

    lr, lw = local_rank_world()
    got = fetch_epoch(store, epoch, lr, lw)
    dist.barrier()  # every local rank has its share on disk
    missing = [rel for rel in got["objects"] if not (Path(got["root"]) / rel).exists()]
    if missing:
        raise StoreError(f"{store.path}: node cache {got['root']} lacks {len(missing)} object(s) of epoch {epoch} "
                         f"(e.g. {missing[0]}); is TINYDISTILL_CACHE shared by ranks of different nodes?")
    return open_store(got["root"])


def clear(store) -> None:
    """Remove the node mirror of ``store`` (e.g. after training)."""
    shutil.rmtree(cache_root() / hashlib.sha256(str(store.path).rstrip("/").encode()).hexdigest()[:24],
                  ignore_errors=True)
