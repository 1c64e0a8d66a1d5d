"""The shard format (version 1, described in docs/data.md): format, validation, writer, reader,
sampler, one module each.

- :mod:`.format`: the names, kinds, dtypes and file layout of the format, ShardFormatError.
- :mod:`.validation`: meta.json checks (:func:`check_meta`, :func:`load_meta`) and the full check of
  a prepared dataset (:func:`validate`: structure, counts, values), with its cache of clean scans.
- :mod:`.writer`: :class:`ShardWriter` and :func:`write_dataset`, what the converters write with.
- :mod:`.reader`: :class:`ShardDataset` and :func:`standardize_plan`.
- :mod:`.sampler`: :class:`ShardBatchSampler`.

Training code only ever reads shards through :class:`ShardDataset` and orders them with
:class:`ShardBatchSampler`. Every public name is importable from here (``from data_prep.shards
import ShardWriter``); module-level settings are read where they are defined, so a test that
changes one (``SCAN_BLOCK_BYTES``, ``CACHE_MAX_ENTRIES``) patches that module, not this one.
"""
from .format import (
    DTYPES, FLOAT_DTYPES, FORMAT, KINDS, LABEL_DTYPES, META_NAME, RESERVED_KEYS, TASKS, VERSION,
    ShardFormatError,
)
from .reader import STANDARDIZE_AXIS, ShardDataset, standardize_plan
from .sampler import ShardBatchSampler
from .validation import (
    CACHE_ENV, CACHE_MAX_ENTRIES, CACHE_RACY_NS, SCAN_BLOCK_BYTES, SCAN_VERSION, check_meta,
    load_meta, validate,
)
from .writer import (
    CHUNK_MAX_BYTES, CHUNK_TARGET_BYTES, CHUNK_TARGET_ROWS, DEFAULT_SHARD_BYTES, ShardWriter,
    write_dataset,
)

__all__ = [
    "DTYPES", "FLOAT_DTYPES", "FORMAT", "KINDS", "LABEL_DTYPES", "META_NAME", "RESERVED_KEYS",
    "TASKS", "VERSION", "ShardFormatError",
    "CACHE_ENV", "CACHE_MAX_ENTRIES", "CACHE_RACY_NS", "SCAN_BLOCK_BYTES", "SCAN_VERSION",
    "check_meta", "load_meta", "validate",
    "CHUNK_MAX_BYTES", "CHUNK_TARGET_BYTES", "CHUNK_TARGET_ROWS", "DEFAULT_SHARD_BYTES",
    "ShardWriter", "write_dataset",
    "STANDARDIZE_AXIS", "ShardDataset", "standardize_plan",
    "ShardBatchSampler",
]
