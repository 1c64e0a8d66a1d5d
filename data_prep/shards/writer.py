"""Writing a prepared dataset: :class:`ShardWriter` streams batches of any size into shards and
writes meta.json last, atomically; :func:`write_dataset` writes whole in-memory splits through it."""
from __future__ import annotations

import json
import math
import os
import pathlib

import h5py
import numpy as np

from .format import FORMAT, LABEL_DTYPES, META_NAME, SPLIT_RE, TMP_PREFIX, VERSION, ShardFormatError
from .validation import check_meta

CHUNK_TARGET_ROWS = 64            # at most about one batch of rows per chunk ...
CHUNK_TARGET_BYTES = 256 << 10    # ... and about 256 KiB: a random row read pulls in its whole chunk
CHUNK_MAX_BYTES = 1 << 20         # never more than HDF5's default 1 MiB per-dataset chunk cache
DEFAULT_SHARD_BYTES = 1 << 30     # samples_per_shard=None: about 1 GiB per shard


def _chunk_shape(shape, itemsize, rows):
    """Chunk along the sample axis: ``rows`` rows (default: up to 64 rows and ~256 KiB), always
    under CHUNK_MAX_BYTES; a single row larger than that is split along its largest inner axis.
    (Measured on 12 KB + 6 KB rows, random batches of 64: 5.6 ms with 16-row chunks, 10.3 ms with
    64-row chunks; sequential reads are equal.)"""
    row_bytes = max(1, itemsize * math.prod(shape))
    target = min(CHUNK_TARGET_ROWS, CHUNK_TARGET_BYTES // row_bytes) if rows is None else rows
    n = max(1, min(target, (CHUNK_MAX_BYTES - 1) // row_bytes))
    chunk = [n, *shape]
    while itemsize * math.prod(chunk) >= CHUNK_MAX_BYTES and max(chunk[1:], default=1) > 1:
        axis = 1 + int(np.argmax(chunk[1:]))
        chunk[axis] = (chunk[axis] + 1) // 2
    return tuple(chunk)


def _normalise_modalities(modalities):
    out = {}
    for name, spec in modalities.items():
        spec = dict(spec)
        spec["shape"] = [int(d) for d in spec.get("shape", [])]
        if "dtype" in spec:
            spec["dtype"] = np.dtype(spec["dtype"]).name
        out[name] = spec
    return out


class ShardWriter:
    """Streaming writer of one prepared dataset directory ``<out_dir>/<name>/``.

        with ShardWriter(out_dir, name, task, num_classes, modalities, samples_per_shard=...) as w:
            w.append("train", {"image": arr, "table": arr, "label": arr, "sample_id": arr})

    Batches of any size, splits in any order. Each split streams into shards of
    ``samples_per_shard`` rows, written under temporary names and renamed to
    ``<split>-00000-of-000NN.h5`` at close; meta.json is written last and atomically, so an
    interrupted conversion never leaves a meta.json that points to incomplete shards (leaving the
    ``with`` block by an exception removes the temporary shards). Every batch is checked against
    ``modalities`` (exact dtype and shape; integer labels/ids are cast when lossless), and
    sample_id must be unique across all splits.

    samples_per_shard: None -> about 1 GiB of data per shard. chunk_rows: rows per HDF5 chunk
    (None -> up to 64 rows and ~256 KiB; never 1 MiB or more). lzf_uint8: lzf-compress uint8
    modalities (off by default: on the embedded frames it saved <1% of space and made random
    batch reads ~1.8x slower; worth it only for images that compress, e.g. with flat
    backgrounds). label_shape: segmentation mask shape (None -> first batch).
    """

    def __init__(self, out_dir, name, task, num_classes, modalities, samples_per_shard=None,
                 class_names=None, source=None, chunk_rows=None, label_shape=None,
                 lzf_uint8=False, overwrite=False):
        self.root = pathlib.Path(out_dir) / name
        self.meta = {
            "format": FORMAT, "version": VERSION, "name": name, "task": task,
            "num_classes": int(num_classes),
            "modalities": _normalise_modalities(modalities),
            "splits": {"_": {"shards": ["_.h5"], "num_samples": 0}},   # placeholder for the check
        }
        if class_names is not None:
            self.meta["class_names"] = list(class_names)
        if task == "segmentation" and label_shape is not None:
            self.meta["label_shape"] = [int(d) for d in label_shape]
        if source is not None:
            self.meta["source"] = source
        check_meta(self.meta, f"{self.root} (writer arguments)")
        del self.meta["splits"]["_"]
        if chunk_rows is not None and chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = chunk_rows
        self.lzf_uint8 = bool(lzf_uint8)
        if samples_per_shard is None:
            row = sum(np.dtype(s["dtype"]).itemsize * math.prod(s["shape"])
                      for s in self.meta["modalities"].values()) + 16
            samples_per_shard = max(1, DEFAULT_SHARD_BYTES // row)
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.samples_per_shard = int(samples_per_shard)
        self._open = {}        # split -> (h5py.File, rows written to it)
        self._shards = {}      # split -> [(tmp path, rows)]
        self._ids = set()
        self._closed = False
        self._created_dir = False
        self._prepare_dir(overwrite)

    # -- directory handling
    def _prepare_dir(self, overwrite):
        if self.root.exists():
            if not self.root.is_dir():
                raise FileExistsError(f"{self.root}: exists and is not a directory")
            leftovers = [p for p in self.root.iterdir()
                         if p.name.startswith(TMP_PREFIX) or p.name == f"{META_NAME}.tmp"]
            if leftovers and len(leftovers) == len(list(self.root.iterdir())):
                for p in leftovers:   # only the temporary files of a killed conversion: reuse
                    p.unlink()
            if any(self.root.iterdir()):
                if not overwrite:
                    raise FileExistsError(f"{self.root}: dataset directory exists and is not empty "
                                          "(pass overwrite=True to replace it)")
                (self.root / META_NAME).unlink(missing_ok=True)   # invalidate first
                for p in self.root.iterdir():
                    if p.is_file() and (p.suffix == ".h5" or p.name.startswith(TMP_PREFIX)
                                        or p.name.startswith(META_NAME)):
                        p.unlink()
        else:
            self.root.mkdir(parents=True)
            self._created_dir = True

    # -- appending
    def _expected(self):
        exp = {n: (np.dtype(s["dtype"]), tuple(s["shape"])) for n, s in self.meta["modalities"].items()}
        label_dtype = np.dtype(LABEL_DTYPES[self.meta["task"]])
        label_shape = tuple(self.meta.get("label_shape", ())) if self.meta["task"] == "segmentation" else ()
        exp["label"] = (label_dtype, label_shape)
        exp["sample_id"] = (np.dtype("int64"), ())
        return exp

    def _field_array(self, where, key, value, dtype, shape):
        """One field of an appended batch as an array of the declared dtype (integer labels and ids
        cast when lossless) and per-sample shape (a segmentation mask's from the first batch when
        label_shape was not given)."""
        arr = np.asarray(value)
        if arr.dtype != dtype:
            lossless_int = key in ("label", "sample_id") and arr.dtype.kind in "iu" \
                and dtype.kind in "iu" and np.can_cast(arr.dtype, dtype, "safe")
            if not lossless_int:
                raise ShardFormatError(f"{where}: field '{key}': dtype {arr.dtype}, expected {dtype}")
            arr = arr.astype(dtype)
        if key == "label" and self.meta["task"] == "segmentation" and "label_shape" not in self.meta:
            if arr.ndim < 3:
                raise ShardFormatError(f"{where}: field 'label': segmentation masks need shape "
                                       f"(N, H, W, ...), got {arr.shape}")
            shape = arr.shape[1:]
        if arr.ndim == 0 or tuple(arr.shape[1:]) != shape:
            raise ShardFormatError(f"{where}: field '{key}': shape {arr.shape}, expected (N, *{list(shape)})")
        return arr

    def _check_class_labels(self, where, labels):
        """Class indices (and mask values) must lie in [0, num_classes)."""
        if labels.min() < 0 or labels.max() >= self.meta["num_classes"]:
            raise ShardFormatError(f"{where}: field 'label': values outside [0, {self.meta['num_classes']})")

    def _new_ids(self, where, ids):
        """The batch's sample ids as a set, refused when one repeats within the batch or was
        appended before (to any split)."""
        uniq, counts = np.unique(ids, return_counts=True)
        new = set(uniq.tolist())
        if len(uniq) != len(ids) or not self._ids.isdisjoint(new):
            dup = uniq[counts > 1][0] if len(uniq) != len(ids) else min(new & self._ids)
            raise ShardFormatError(f"{where}: field 'sample_id': duplicate sample_id {int(dup)}")
        return new

    def _check_batch(self, split, batch):
        """Check an appended batch against the declared fields; returns (arrays, rows, new ids)."""
        where = f"{self.root}: split '{split}'"
        if self._closed:
            raise RuntimeError(f"{where}: writer already closed")
        if not isinstance(split, str) or not SPLIT_RE.match(split):
            raise ShardFormatError(f"{where}: field '<split>': split names are letters, digits, underscores")
        expected = self._expected()
        extra = sorted(set(batch) - set(expected))
        if extra:
            raise ShardFormatError(f"{where}: field '{extra[0]}': not a declared modality")
        out, n = {}, None
        for key, (dtype, shape) in expected.items():
            if key not in batch:
                raise ShardFormatError(f"{where}: field '{key}': missing from batch")
            arr = self._field_array(where, key, batch[key], dtype, shape)
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ShardFormatError(f"{where}: field '{key}': {arr.shape[0]} rows, other fields have {n}")
            out[key] = arr
        if self.meta["task"] in ("classification", "segmentation") and n:
            self._check_class_labels(where, out["label"])
        new = self._new_ids(where, out["sample_id"])
        if self.meta["task"] == "segmentation" and "label_shape" not in self.meta:
            self.meta["label_shape"] = [int(d) for d in out["label"].shape[1:]]
        return out, n, new

    def append(self, split, batch) -> None:
        """Append a batch {modality..., "label", "sample_id"} of any size to ``split``."""
        arrays, n, ids = self._check_batch(split, batch)
        self._ids |= ids
        start = 0
        while start < n:
            f, rows = self._current(split)
            take = min(n - start, self.samples_per_shard - rows)
            for key, arr in arrays.items():
                ds = f[key]
                ds.resize(rows + take, axis=0)
                ds[rows:rows + take] = arr[start:start + take]
            rows += take
            start += take
            if rows == self.samples_per_shard:
                self._finish_shard(split, f, rows)
            else:
                self._open[split] = (f, rows)

    def _current(self, split):
        if split in self._open:
            return self._open[split]
        shards = self._shards.setdefault(split, [])
        path = self.root / f"{TMP_PREFIX}{split}-{len(shards):05d}.h5"
        f = h5py.File(path, "w", locking=False)
        shards.append((path, 0))
        for key, (dtype, shape) in self._expected().items():
            if key == "label" and "label_shape" in self.meta:
                shape = tuple(self.meta["label_shape"])
            lzf = self.lzf_uint8 and dtype == np.uint8 and key in self.meta["modalities"]
            f.create_dataset(key, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype,
                             chunks=_chunk_shape(shape, dtype.itemsize, self.chunk_rows),
                             compression="lzf" if lzf else None)
        self._open[split] = (f, 0)
        return f, 0

    def _finish_shard(self, split, f, rows):
        f.close()
        path, _ = self._shards[split][-1]
        self._shards[split][-1] = (path, rows)
        self._open.pop(split, None)

    # -- closing
    def close(self) -> pathlib.Path:
        """Finish open shards, rename them to their final names, then write meta.json atomically."""
        if self._closed:
            return self.root
        for split, (f, rows) in list(self._open.items()):
            self._finish_shard(split, f, rows)
        if not self._shards:
            self.abort()
            raise ShardFormatError(f"{self.root}: field 'splits': no samples were appended")
        splits = {}
        for split, shards in self._shards.items():
            names = [f"{split}-{i:05d}-of-{len(shards):05d}.h5" for i in range(len(shards))]
            for (tmp, _), final in zip(shards, names):
                os.replace(tmp, self.root / final)
            sizes = [rows for _, rows in shards]
            splits[split] = {"shards": names, "num_samples": sum(sizes), "shard_sizes": sizes}
        self.meta["splits"] = splits
        check_meta(self.meta, self.root / META_NAME)
        tmp = self.root / f"{META_NAME}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.meta, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / META_NAME)
        self._closed = True
        return self.root

    def abort(self) -> None:
        """Drop everything written so far (temporary shards; the directory if this writer made it)."""
        for f, _ in self._open.values():
            try:
                f.close()
            except Exception:
                pass
        self._open.clear()
        for shards in self._shards.values():
            for path, _ in shards:
                pathlib.Path(path).unlink(missing_ok=True)
        self._shards.clear()
        self._closed = True
        if self._created_dir and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def write_dataset(out_dir, name, task, num_classes, modalities, splits: dict, **kw) -> pathlib.Path:
    """Write whole in-memory splits ``{"train": {field: array}, ...}`` through a ShardWriter."""
    with ShardWriter(out_dir, name, task, num_classes, modalities, **kw) as w:
        for split, arrays in splits.items():
            w.append(split, arrays)
    return w.root
