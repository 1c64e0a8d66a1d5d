"""The shard format, version 1 (docs/data.md): the names, kinds, dtypes and file layout every other
module of the package agrees on, the error they raise, and the two primitives they share (the
label dataset's layout for a task, opening a shard for reading).

A prepared dataset is one directory holding ``meta.json`` and HDF5 shards named
``<split>-00000-of-000NN.h5``. Each shard holds, for its N samples, one dataset per modality
(shape ``(N, *shape)``, the declared dtype), ``label`` and ``sample_id``.

Optional keys beyond the required ones of docs/data.md (written by the writer):
- ``splits[s]["shard_sizes"]``: samples per shard, so a reader can index without opening files.
- ``label_shape``: the mask shape of a segmentation task (written for segmentation only).
"""
from __future__ import annotations

import re

import h5py

FORMAT = "mmshards"
VERSION = 1
KINDS = ("image", "frames", "spectrogram", "sequence", "features", "tabular", "volume")
TASKS = ("classification", "regression", "segmentation")
DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")
FLOAT_DTYPES = ("float16", "float32", "float64")
RESERVED_KEYS = ("label", "sample_id", "index")
LABEL_DTYPES = {"classification": "int64", "regression": "float32", "segmentation": "uint8"}
META_NAME = "meta.json"
SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")   # split names: letters, digits, underscores
TMP_PREFIX = ".tmp-"                          # the writer's files before their final rename


class ShardFormatError(ValueError):
    """A shard directory, meta.json, shard file or appended batch breaks the contract."""


def fail(path, field, message):
    """Raise the package's one error shape: ``<path>: field '<field>': <message>``."""
    raise ShardFormatError(f"{path}: field '{field}': {message}")


def label_spec(meta):
    """(dtype, per-sample shape or None when unknown) of the label dataset for this task."""
    shape = [] if meta["task"] != "segmentation" else meta.get("label_shape")
    return LABEL_DTYPES[meta["task"]], shape


def open_shard(path):
    """Open a shard read-only (no HDF5 file locking: shards on shared storage are read by many
    processes at once); a file that is not a readable HDF5 file is a ShardFormatError naming it."""
    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as e:
        raise ShardFormatError(f"{path}: field '<file>': cannot open shard ({e})") from e
