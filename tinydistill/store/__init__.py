"""The logit store: a Zarr v3 group with each view's sparse top-K teacher outputs and seed.

One job a module: :mod:`.format` (layout constants, codecs, key and class-id encodings, fp16
numerics, URL and backend errors), :mod:`.core` (:func:`create_store`, :func:`open_store`,
:class:`LogitStore`: opening, metadata, completeness, info), :mod:`.read` (rows -> top-K
targets and seeds, integrity check), :mod:`.write` (whole (epoch, shard) units, durably) and
:mod:`.notebook` (pandas and xarray tables, views as the teacher saw them). Its public names are importable from here.
"""

from .core import LogitStore, create_store, open_store
from .format import (DEFAULT_CHUNK_ROWS, DEFAULT_SHARD_CHUNKS, FORMAT_KEY, FORMAT_VERSION, FP16_MIN, ID_LAYOUTS,
                     READABLE_FORMATS, SEED_SKIPPED, SEED_UNSET, decode_keys, encode_keys, gaps_to_ids, ids_to_gaps,
                     stored_logp)

__all__ = [
    "DEFAULT_CHUNK_ROWS", "DEFAULT_SHARD_CHUNKS", "FORMAT_KEY", "FORMAT_VERSION", "FP16_MIN", "ID_LAYOUTS",
    "READABLE_FORMATS", "SEED_SKIPPED", "SEED_UNSET", "LogitStore", "create_store", "decode_keys",
    "encode_keys", "gaps_to_ids", "ids_to_gaps", "open_store", "stored_logp",
]
