"""tinydistill: offline soft-label distillation with replayable views and a Zarr logit store."""

__version__ = "0.1.0"

from .errors import TinydistillError  # noqa: E402
from .store import LogitStore, create_store, open_store  # noqa: E402
from .targets import dense_targets  # noqa: E402

__all__ = ["__version__", "open_store", "create_store", "LogitStore", "dense_targets", "TinydistillError"]
