"""Reading one split of a prepared dataset: :class:`ShardDataset` (validated at construction,
shards opened lazily per process, batched reads), and the optional standardisation of float
modalities with the training-split statistics a converter stored (:func:`standardize_plan`)."""
from __future__ import annotations

import math
import os
import pathlib

import numpy as np
import torch
import torch.utils.data

from .format import FLOAT_DTYPES, META_NAME, ShardFormatError, fail, label_spec, open_shard
from .validation import validate

#: Kinds whose float values the reader standardises on request, ``(x - mean) / std`` with the
#: statistics a converter stored in ``meta["modalities"][m]["standardize"] = {"mean": [...],
#: "std": [...]}`` (data_prep.from_arrays fits them on the training split), and the axis of a
#: sample the statistics run along: features and sequence per feature (the last axis),
#: spectrogram per frequency bin (axis 0), tabular per continuous column (the first
#: len(continuous) columns; the categorical codes are left alone). Images are never standardised.
STANDARDIZE_AXIS = {"features": -1, "sequence": -1, "spectrogram": 0, "tabular": 0}


def _valid_stats(stats, size):
    """``{mean: [size finite numbers], std: [size positive finite numbers]}``?"""
    return isinstance(stats, dict) and all(
        isinstance(stats.get(k), list) and len(stats[k]) == size
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in stats[k])
        for k in ("mean", "std")) and all(v > 0 for v in stats["std"])


def _standardize_entry(path, name, spec):
    """``(index, mean, std)`` of one float modality of a kind in STANDARDIZE_AXIS, or None when it
    has nothing to standardise (a tabular modality without continuous columns)."""
    kind, shape = spec["kind"], spec["shape"]
    field = f"modalities.{name}.standardize"
    stats = spec.get("standardize")
    if stats is None:
        fail(path, field, f"missing: no standardisation statistics for modality {name!r} (kind {kind}); "
             "data_prep.from_arrays writes them, fitted on the training split")
    axis = STANDARDIZE_AXIS[kind] % len(shape)
    size = len(spec.get("continuous", [])) if kind == "tabular" else shape[axis]
    if not _valid_stats(stats, size):
        fail(path, field, f"expected {{mean: [{size} finite numbers], std: [{size} positive numbers]}}")
    if size == 0:
        return None
    dtype = np.dtype(spec["dtype"])
    bshape = (size,) + (1,) * (len(shape) - axis - 1)
    index = (slice(None),) * (axis + 1) + (slice(0, size),)
    return (index, np.asarray(stats["mean"], dtype=dtype).reshape(bshape),
            np.asarray(stats["std"], dtype=dtype).reshape(bshape))


def standardize_plan(meta, modalities=None, root=".") -> dict:
    """``{modality: (index, mean, std)}`` to apply ``x[index] = (x[index] - mean) / std`` to a
    batch ``x`` (N, *shape) of each of ``modalities`` (default: all) of a kind in STANDARDIZE_AXIS
    and a float dtype; ``mean`` / ``std`` are in the stored dtype, shaped to broadcast.
    ShardFormatError naming ``<root>/meta.json`` and the field when such a modality has no
    statistics or malformed ones (a length that does not fit the shape, a non-finite value, a
    std <= 0), or when none of ``modalities`` is of such a kind (nothing would be standardised)."""
    path = pathlib.Path(root) / META_NAME
    names = list(meta["modalities"]) if modalities is None else list(modalities)
    plan = {}
    for name in names:
        spec = meta["modalities"][name]
        if spec["kind"] not in STANDARDIZE_AXIS or spec["dtype"] not in FLOAT_DTYPES:
            continue
        entry = _standardize_entry(path, name, spec)
        if entry is not None:
            plan[name] = entry
    if not plan and not any(meta["modalities"][n].get("standardize") for n in names):
        fail(path, "modalities", f"none of {names} is a float modality of a kind "
             f"standardisation applies to ({', '.join(STANDARDIZE_AXIS)})")
    return plan


class ShardDataset(torch.utils.data.Dataset):
    """One split of a prepared dataset. ``ds[i]`` -> dict of tensors of one sample; ``ds[list]``
    -> dict of batched tensors (use with ShardBatchSampler and ``batch_size=None``).

    Keys: each modality read, "label", "sample_id", "index" (the dataset index). Stored dtypes
    are kept (uint8 stays uint8; models convert on device). Shards are opened lazily, one
    h5py.File per shard per process, so each DataLoader worker gets its own handles; nothing is
    opened at construction when meta.json records shard sizes, and the dataset pickles without
    h5py state. ``meta``: an already validated meta dict (skips validating the split's shards).
    ``standardize``: apply the training-split statistics of meta.json to the float modalities
    (:func:`standardize_plan`, which refuses data without them); the stored dtype is kept.
    """

    def __init__(self, root, split, modalities=None, meta=None, standardize=False):
        self.root = pathlib.Path(root)
        self.meta = validate(self.root, [split]) if meta is None else meta
        if split not in self.meta["splits"]:
            raise KeyError(f"{self.root}: no split {split!r} (have {list(self.meta['splits'])})")
        self.split = split
        all_names = list(self.meta["modalities"])
        if modalities is None:
            modalities = all_names
        unknown = [m for m in modalities if m not in all_names]
        if unknown:
            raise KeyError(f"{self.root}: unknown modalities {unknown} (have {all_names})")
        self.modalities = [m for m in all_names if m in modalities]   # canonical order
        self.standardize = standardize_plan(self.meta, self.modalities, self.root) if standardize else {}
        info = self.meta["splits"][split]
        self.shard_paths = [str(self.root / s) for s in info["shards"]]
        sizes = info.get("shard_sizes")
        if sizes is None:
            sizes = []
            for p in self.shard_paths:
                with open_shard(p) as f:
                    sizes.append(int(f["sample_id"].shape[0]))
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._len = int(self.offsets[-1])
        self._fields = [*self.modalities, "label", "sample_id"]
        self._pid = None
        self._handles = {}

    def __len__(self):
        return self._len

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def _datasets(self, shard):
        pid = os.getpid()
        if self._pid != pid:    # first use in this process, or inherited through fork: reopen
            self._handles, self._pid = {}, pid
        if shard not in self._handles:
            f = open_shard(self.shard_paths[shard])
            self._handles[shard] = (f, {k: f[k] for k in self._fields})
        return self._handles[shard][1]

    def close(self):
        """Close this process's file handles (reopened lazily on the next read)."""
        if self._pid == os.getpid():
            for f, _ in self._handles.values():
                f.close()
        self._handles = {}

    def _positions(self, indices):
        """``indices`` as an int64 array of positions in [0, len) (negative ones count from the end);
        IndexError naming the first one out of range."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + self._len, idx)
        bad = (idx < 0) | (idx >= self._len)
        if bad.any():
            raise IndexError(f"{self.root}: index {int(np.asarray(indices).reshape(-1)[bad][0])} out of "
                             f"range for split '{self.split}' of {self._len} samples")
        return idx

    def _empty_batch(self):
        """An empty batch: empty arrays of the declared dtypes and shapes."""
        specs = {m: (self.meta["modalities"][m]["dtype"], self.meta["modalities"][m]["shape"])
                 for m in self.modalities}
        label_dtype, label_shape = label_spec(self.meta)
        specs.update(label=(label_dtype, label_shape or []), sample_id=("int64", []))
        return {k: np.empty((0, *shape), dtype=dtype) for k, (dtype, shape) in specs.items()}

    def _read_shard(self, shard, local, where, batch_size, out):
        """Fill batch positions ``where`` of every field of ``out`` (a batch of ``batch_size``) from
        rows ``local`` of ``shard``."""
        datasets = self._datasets(shard)
        # the whole batch as one in-order run of this shard: a single slice read, no copy at all
        in_order = len(where) == batch_size and local[-1] - local[0] == len(local) - 1 \
            and bool((np.diff(local) == 1).all())
        plan = None if in_order else self._read_plan(local, where)   # shared by every field
        for key in self._fields:
            ds = datasets[key]
            try:
                if in_order:
                    out[key] = ds[int(local[0]):int(local[-1]) + 1]
                    continue
                if key not in out:
                    out[key] = np.empty((batch_size, *ds.shape[1:]), dtype=ds.dtype)
                self._read_into(ds, plan, out[key])
            except Exception as e:
                raise ShardFormatError(f"{self.shard_paths[shard]}: field '{key}': read failed ({e})") from e

    def _read(self, indices):
        idx = self._positions(indices)
        if not len(idx):
            out = self._empty_batch()
        else:
            out = {}
            shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
            for shard in np.unique(shard_of):
                where = np.nonzero(shard_of == shard)[0]          # batch positions served by this shard
                self._read_shard(int(shard), idx[where] - self.offsets[shard], where, len(idx), out)
            for key, (where, mean, std) in self.standardize.items():   # in place: `out` owns its arrays
                x = out[key]
                x[where] -= mean
                x[where] /= std
        out["index"] = idx
        return {k: torch.from_numpy(v) for k, v in out.items()}

    @staticmethod
    def _read_plan(local, where):
        """How to serve batch positions ``where`` from shard rows ``local``, computed once per shard
        and batch for all fields: the rows sorted (distinct, with their counts and first positions),
        the runs of consecutive rows, and the batch position of each sorted request."""
        order = np.argsort(local, kind="stable")
        uniq, first_of, counts = np.unique(local[order], return_index=True, return_counts=True)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        return {"uniq": uniq, "first_of": first_of, "counts": counts, "dest_pos": where[order],
                "runs": list(zip(np.concatenate([[0], breaks]).tolist(), np.concatenate([breaks, [len(uniq)]]).tolist())),
                "duplicated": len(uniq) != len(local), "uniq_list": uniq.tolist(),
                "pos_list": where[order].tolist()}

    @staticmethod
    def _read_into(ds, plan, dest):
        """dest[where[j]] = ds[local[j]] for all j (``plan`` from _read_plan), each row read once and
        written once. 1-D datasets: one fancy read of the sorted distinct rows. Otherwise one slice
        read per run of consecutive rows, written straight into its batch positions: HDF5
        point/hyperslab-union selections on multi-dimensional datasets cost ~0.5 ms per row here
        (h5py 3.16, HDF5 2.0), 15-60x more than slice reads, and reading into a sorted buffer then
        reordering it costs a second full copy (benchmarks/data_path.py measures this reader against
        raw h5py)."""
        uniq, dest_pos, duplicated = plan["uniq"], plan["dest_pos"], plan["duplicated"]
        if ds.ndim == 1:
            dest[dest_pos] = np.repeat(ds[uniq], plan["counts"])
            return
        uniq_list, pos_list = plan["uniq_list"], plan["pos_list"]
        for b, e in plan["runs"]:
            if e - b == 1 and not duplicated:   # a lone row (most rows of a shuffled batch)
                dest[pos_list[b]] = ds[uniq_list[b]]
                continue
            block = ds[uniq_list[b]:uniq_list[e - 1] + 1]
            if not duplicated:
                targets = dest_pos[b:e]
                if targets[-1] - targets[0] == e - b - 1 and (np.diff(targets) == 1).all():
                    dest[targets[0]:targets[-1] + 1] = block
                else:
                    dest[targets] = block
            else:   # a row asked for more than once: every copy of it
                first_of, counts = plan["first_of"], plan["counts"]
                for k, u in enumerate(range(b, e)):
                    dest[dest_pos[first_of[u]:first_of[u] + counts[u]]] = block[k]

    def __getitem__(self, index):
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        if np.ndim(index) == 0:
            batch = self._read([int(index)])
            return {k: v[0] for k, v in batch.items()}
        return self._read(index)
