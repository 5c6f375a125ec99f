"""tinydistill: offline soft-label distillation with replayable views and a Zarr logit store.

``import tinydistill`` and :func:`open_store` load numpy and zarr only: torch is imported when
something needs it (dense targets, views), so opening a store and reading targets stays fast.
"""

__version__ = "0.1.0"

from .errors import TinydistillError  # noqa: E402
from .store import LogitStore, create_store, open_store  # noqa: E402

__all__ = ["__version__", "open_store", "create_store", "LogitStore", "dense_targets", "TinydistillError"]


def __getattr__(name):  # lazy: dense_targets needs torch
    if name == "dense_targets":
        from .targets import dense_targets

        return dense_targets
    raise AttributeError(f"module 'tinydistill' has no attribute {name!r}")
