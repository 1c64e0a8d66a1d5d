"""Data path throughput: the shard reader against raw h5py, the writer's chunking, the DataLoader.

    python benchmarks/data_path.py                       # dvm and crema_d shapes, default sizes
    python benchmarks/data_path.py --shape dvm --samples 1024 --workers 0,2
    python benchmarks/data_path.py --quick               # tiny sizes, seconds (what the test runs)

Synthetic shards (random content, numpy default_rng(0)) are written with ShardWriter into a
temporary directory (kept only when --dir is given), one shard per dataset, for two shapes:
  dvm      image uint8 [3,128,128] + table float32 [17] (13 continuous + 4 categorical), 286 classes, batch 256
  crema_d  audio float32 [257,188] + video uint8 [1,3,224,224], 6 classes, batch 64

1. Reader against raw h5py, on the same bytes, page cache warm (every shard file is read once,
   then one untimed pass of each reader, before any timing). One pass = every batch of one epoch.
   sequential: ShardDataset[batch] for ShardBatchSampler(shuffle=False) batches against raw
     h5py ``ds[a:b]`` of every dataset (modalities, label, sample_id) for the same rows.
   shuffled: ShardDataset[batch] for ShardBatchSampler(shuffle=True, seed 0) batches (the order
     training reads) against the faster of two raw h5py ways of reading exactly those rows, in
     batch order: "sorted runs" (sort the indices, one ``ds[a:b]`` per run of consecutive indices
     into one buffer, then reorder) and "per row" (``buf[i] = ds[j]``, straight into its place).
     In both, the 1-D label and sample_id are one sorted fancy read. (``read_direct`` and the
     low-level ``id.read`` into place were tried too: slower per call here, so not used.)
   Passes alternate ours / raw, so drift in machine speed hits both; the median pass is reported
   as MB/s (10^6 bytes of every field read) and samples/s, and ours/raw = raw time / our time.
   Target: ours >= 0.90 of raw. A reference row times one numpy copy of every batch (what one
   extra in-memory copy costs, next to the reads).
2. Chunking: the same data written again with chunk_rows in {1, 4, 16, 64, default} (values whose
   chunk of the largest modality would be >= 1 MiB are skipped: _chunk_shape caps those anyway)
   and lzf on uint8 modalities off/on. Per variant: chunk shapes as stored (h5py ``.chunks``),
   shard file size, and ShardDataset samples/s for shuffled and sequential epochs (median of the
   passes; the variants are timed round-robin). Random bytes do not compress, so the lzf rows
   show its cost on incompressible data, not its benefit on real images.
3. Loader: train/data.py make_loader itself, given a stand-in accelerator (rank 0 of 1, CUDA
   when available), so the loader is the training one (ShardDataset + ShardBatchSampler(shuffle=
   True, seed 0, drop_last) + batch_size=None, persistent_workers when workers > 0, pin_memory on
   CUDA), for each --workers value: samples/s over one epoch after one warm-up batch (which pays
   for worker start-up), and whether uint8 stays uint8.

Every measuring function returns rows (dicts of numbers and strings) for other scripts to print;
``loader_samples_per_s(root, split, batch, workers, max_batches)`` is the loader figure alone.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import types
import warnings
from pathlib import Path

import h5py
import numpy as np
import torch

from benchmarks import tables
from data_prep import shards
from train import data

DVM_CATEGORICAL = {"Color": 22, "Bodytype": 13, "Gearbox": 3, "Fuel_type": 12}
SHAPES = {
    "dvm": {
        "modalities": {
            "image": {"kind": "image", "shape": [3, 128, 128], "dtype": "uint8"},
            "table": {"kind": "tabular", "shape": [17], "dtype": "float32",
                      "continuous": [f"c{i}" for i in range(13)], "categorical": DVM_CATEGORICAL},
        },
        "classes": 286, "batch": 256, "samples": 4096, "quick_samples": 96, "quick_batch": 16,
    },
    "crema_d": {
        "modalities": {
            "audio": {"kind": "spectrogram", "shape": [257, 188], "dtype": "float32"},
            "video": {"kind": "frames", "shape": [1, 3, 224, 224], "dtype": "uint8"},
        },
        "classes": 6, "batch": 64, "samples": 1024, "quick_samples": 24, "quick_batch": 4,
    },
}
SWEEP_CHUNK_ROWS = [1, 4, 16, 64, None]
SPLIT = "train"


# ------------------------------------------------------------------------------ synthetic shards

def synthetic_arrays(shape, samples):
    """Random arrays {modality..., label, sample_id} of ``samples`` rows (default_rng(0))."""
    spec = SHAPES[shape]
    rng = np.random.default_rng(0)
    out = {}
    for name, m in spec["modalities"].items():
        size = (samples, *m["shape"])
        if m["dtype"] == "uint8":
            out[name] = rng.integers(0, 256, size, dtype=np.uint8)
        elif m["kind"] == "tabular":
            cont = rng.standard_normal((samples, len(m["continuous"])), dtype=np.float32)
            codes = [rng.integers(0, c, (samples, 1)).astype(np.float32) for c in m["categorical"].values()]
            out[name] = np.concatenate([cont, *codes], axis=1)
        else:
            out[name] = rng.standard_normal(size, dtype=np.float32)
    out["label"] = rng.integers(0, spec["classes"], samples, dtype=np.int64)
    out["sample_id"] = np.arange(samples, dtype=np.int64)
    return out


def write_synthetic(out_dir, name, shape, arrays, chunk_rows=None, lzf_uint8=False):
    """Write ``arrays`` as split "train" of dataset ``<out_dir>/<name>`` (one shard); return its root."""
    spec = SHAPES[shape]
    samples = len(arrays["label"])
    with shards.ShardWriter(out_dir, name, "classification", spec["classes"], spec["modalities"],
                            samples_per_shard=samples, chunk_rows=chunk_rows, lzf_uint8=lzf_uint8,
                            overwrite=True) as w:
        for start in range(0, samples, 256):
            w.append(SPLIT, {k: v[start:start + 256] for k, v in arrays.items()})
    return w.root


def warm_page_cache(root):
    """Read every file under ``root`` once; return the bytes read."""
    total = 0
    for path in sorted(Path(root).iterdir()):
        with open(path, "rb") as f:
            while True:
                block = f.read(16 << 20)
                if not block:
                    break
                total += len(block)
    return total


def bytes_per_sample(meta):
    """Bytes of every field ShardDataset reads for one sample (modalities, label, sample_id)."""
    n = sum(np.dtype(m["dtype"]).itemsize * math.prod(m["shape"]) for m in meta["modalities"].values())
    return n + 8 + 8


def chunk_shapes(root):
    """{dataset name: chunk shape} as stored in the (first) shard file."""
    meta = shards.load_meta(root)
    with h5py.File(Path(root) / meta["splits"][SPLIT]["shards"][0], "r", locking=False) as f:
        return {k: f[k].chunks for k in f}


# --------------------------------------------------------------------------------- raw h5py reader

class RawReader:
    """Plain h5py reads of one single-shard split, fields in ShardDataset's order."""

    def __init__(self, root, split=SPLIT):
        meta = shards.load_meta(root)
        names = meta["splits"][split]["shards"]
        if len(names) != 1:
            raise ValueError(f"{root}: RawReader reads single-shard splits, this one has {len(names)}")
        self.file = h5py.File(Path(root) / names[0], "r", locking=False)
        self.datasets = {k: self.file[k] for k in [*meta["modalities"], "label", "sample_id"]}

    def close(self):
        self.file.close()

    def slice(self, batch):
        """Rows batch[0] .. batch[-1] (consecutive): ``ds[a:b]`` of every dataset."""
        a, b = int(batch[0]), int(batch[-1]) + 1
        return {k: ds[a:b] for k, ds in self.datasets.items()}

    def sorted_runs(self, batch):
        """Sort, one slice read per run of consecutive indices into one buffer, then reorder."""
        idx = np.asarray(batch, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        starts = np.flatnonzero(np.diff(uniq, prepend=-2) != 1)
        runs = list(zip(starts.tolist(), [*starts[1:].tolist(), len(uniq)]))
        out = {}
        for key, ds in self.datasets.items():
            if ds.ndim == 1:
                out[key] = ds[uniq][inverse]
                continue
            buf = np.empty((len(uniq), *ds.shape[1:]), dtype=ds.dtype)
            for b, e in runs:
                first = int(uniq[b])
                buf[b:e] = ds[first:first + e - b]
            out[key] = buf[inverse]
        return out

    def per_row(self, batch):
        """One read per row, copied straight into its place in batch order."""
        idx = np.asarray(batch, dtype=np.int64)
        uniq, inverse = np.unique(idx, return_inverse=True)
        out = {}
        for key, ds in self.datasets.items():
            if ds.ndim == 1:
                out[key] = ds[uniq][inverse]
                continue
            buf = np.empty((len(idx), *ds.shape[1:]), dtype=ds.dtype)
            for i, j in enumerate(idx.tolist()):
                buf[i] = ds[j]
            out[key] = buf
        return out


# ---------------------------------------------------------------------------------------- timing

def epoch_batches(num_samples, batch, shuffle):
    """The batches of epoch 0 in the order training reads them (seed 0, drop_last)."""
    return list(shards.ShardBatchSampler(num_samples, batch, seed=0, shuffle=shuffle, drop_last=True))


def time_pass(read, batches):
    start = time.perf_counter()
    for b in batches:
        read(b)
    return time.perf_counter() - start


def reader_rows(root, batch, passes=5):
    """Ours against raw h5py, sequential and shuffled; one row per (order, reader).

    Row keys: order, reader, seconds (median pass), samples_per_s, mb_per_s, raw (True on the
    reader used as raw), ratio (ours/raw, on the ShardDataset row; None elsewhere)."""
    dataset = shards.ShardDataset(root, SPLIT)
    raw = RawReader(root)
    ours = dataset.__getitem__
    per_sample = bytes_per_sample(dataset.meta)
    rows = []
    try:
        for order, candidates in (("sequential", {"raw ds[a:b]": raw.slice}),
                                  ("shuffled", {"raw sorted runs": raw.sorted_runs, "raw per row": raw.per_row})):
            batches = epoch_batches(len(dataset), batch, shuffle=order == "shuffled")
            samples = sum(len(b) for b in batches)
            readers = {"ShardDataset": ours, **candidates}
            for read in readers.values():      # untimed pass: opens files, faults in the cache
                time_pass(read, batches)
            times = {name: [] for name in readers}
            for _ in range(passes):             # alternate: ours, raw..., ours, raw...
                for name, read in readers.items():
                    times[name].append(time_pass(read, batches))
            median = {name: statistics.median(t) for name, t in times.items()}
            raw_name = min(candidates, key=median.get)
            for name in readers:
                t = median[name]
                rows.append({"order": order, "reader": name, "seconds": t, "samples_per_s": samples / t,
                             "mb_per_s": samples * per_sample / t / 1e6, "raw": name == raw_name,
                             "ratio": median[raw_name] / t if name == "ShardDataset" else None})
        # reference: one in-memory copy per batch (into fresh memory, like any extra copy a reader makes)
        first = raw.slice(epoch_batches(len(dataset), batch, shuffle=False)[0])
        copy_batch = lambda _: {k: v.copy() for k, v in first.items()}  # noqa: E731
        copy = statistics.median(time_pass(copy_batch, batches) for _ in range(passes))
        rows.append({"order": "reference", "reader": "numpy copy of each batch", "seconds": copy,
                     "samples_per_s": samples / copy, "mb_per_s": samples * per_sample / copy / 1e6,
                     "raw": False, "ratio": None})
    finally:
        raw.close()
        dataset.close()
    return rows


def chunk_sweep_rows(out_dir, shape, arrays, batch, passes=3, default_root=None, keep=False):
    """Write ``arrays`` with each chunk_rows x lzf_uint8 variant, time ShardDataset on each.

    Row keys: chunk_rows (None = writer default), lzf, default (bool), root (the variant's dataset
    directory), chunks ({dataset: chunk shape read from the file}), size_mb (shard file, 10^6
    bytes), shuffled_samples_per_s, sequential_samples_per_s. ``default_root``: an already written
    (None, off) variant to reuse. Variants written here are deleted once measured unless ``keep``.
    Also returns the chunk_rows values skipped (chunk of the largest modality >= 1 MiB)."""
    row_bytes = max(np.dtype(m["dtype"]).itemsize * math.prod(m["shape"])
                    for m in SHAPES[shape]["modalities"].values())
    chunk_rows_list = [r for r in SWEEP_CHUNK_ROWS if r is None or r * row_bytes < shards.CHUNK_MAX_BYTES]
    skipped = [r for r in SWEEP_CHUNK_ROWS if r not in chunk_rows_list]
    variants = []
    for chunk_rows in chunk_rows_list:
        for lzf in (False, True):
            if chunk_rows is None and not lzf and default_root is not None:
                root = Path(default_root)
            else:
                name = f"{shape}-sweep-c{chunk_rows or 'default'}-{'lzf' if lzf else 'raw'}"
                root = write_synthetic(out_dir, name, shape, arrays, chunk_rows=chunk_rows, lzf_uint8=lzf)
            warm_page_cache(root)
            variants.append({"chunk_rows": chunk_rows, "lzf": lzf, "root": root,
                             "dataset": shards.ShardDataset(root, SPLIT)})
    n = len(arrays["label"])
    orders = {"shuffled": epoch_batches(n, batch, True), "sequential": epoch_batches(n, batch, False)}
    times = {(i, o): [] for i in range(len(variants)) for o in orders}
    for i, v in enumerate(variants):            # untimed pass of each
        for batches in orders.values():
            time_pass(v["dataset"].__getitem__, batches)
    for _ in range(passes):                     # round-robin over the variants
        for i, v in enumerate(variants):
            for order, batches in orders.items():
                times[(i, order)].append(time_pass(v["dataset"].__getitem__, batches))
    rows = []
    for i, v in enumerate(variants):
        v["dataset"].close()
        shard = v["root"] / shards.load_meta(v["root"])["splits"][SPLIT]["shards"][0]
        row = {"chunk_rows": v["chunk_rows"], "lzf": v["lzf"], "default": v["chunk_rows"] is None and not v["lzf"],
               "root": v["root"], "chunks": chunk_shapes(v["root"]), "size_mb": shard.stat().st_size / 1e6}
        for order, batches in orders.items():
            row[f"{order}_samples_per_s"] = sum(len(b) for b in batches) / statistics.median(times[(i, order)])
        rows.append(row)
        if not keep and v["root"] != Path(default_root or ""):
            shutil.rmtree(v["root"])
    return rows, skipped


# ---------------------------------------------------------------------------------------- loader

def _time_loader(root, split, batch, workers, max_batches=None):
    """(samples/s after the first batch, timed batches, {field: dtype}) of make_loader's loader."""
    meta = shards.validate(root, [split])
    cfg = {"data": str(root), "batch_size": batch, "eval_batch_size": batch, "seed": 0, "num_workers": workers}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accelerator = types.SimpleNamespace(process_index=0, num_processes=1, device=device)
    with warnings.catch_warnings():             # more workers than CPUs is part of what is measured
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader, sampler = data.make_loader(cfg, meta, split, accelerator, train=True)
        sampler.set_epoch(0)
        it = iter(loader)
    first = next(it)                            # warm-up: worker start-up, first file opens
    dtypes = {k: v.dtype for k, v in first.items()}
    samples, batches = 0, 0
    start = time.perf_counter()
    for b in it:
        samples += len(b["label"])
        batches += 1
        if max_batches is not None and batches >= max_batches:
            break
    elapsed = time.perf_counter() - start
    del it, loader                              # shuts the persistent workers down
    if not batches:
        raise ValueError(f"{root}: one epoch of batch {batch} gives no batch after the warm-up one")
    return samples / elapsed, batches, dtypes


def loader_samples_per_s(root, split, batch, workers, max_batches=None):
    """Samples/s of make_loader's training DataLoader over ``split`` (one epoch, or
    ``max_batches`` batches, after one warm-up batch) with ``workers`` worker processes."""
    return _time_loader(root, split, batch, workers, max_batches)[0]


def loader_rows(root, batch, workers_list, max_batches=None):
    """Row keys: workers, samples_per_s, batches (timed), uint8_kept (every uint8 modality arrived as uint8)."""
    meta = shards.load_meta(root)
    uint8 = [m for m, s in meta["modalities"].items() if s["dtype"] == "uint8"]
    rows = []
    for workers in workers_list:
        rate, batches, dtypes = _time_loader(root, SPLIT, batch, workers, max_batches)
        rows.append({"workers": workers, "samples_per_s": rate, "batches": batches,
                     "uint8_kept": all(dtypes[m] == torch.uint8 for m in uint8)})
    return rows


# -------------------------------------------------------------------------------------- printing

def machine_facts():
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {platform.machine()}, "
            f"os.cpu_count() {os.cpu_count()}, usable CPUs {len(os.sched_getaffinity(0))}, "
            f"load average {load}\n"
            f"h5py {h5py.version.version}, HDF5 {h5py.version.hdf5_version}, numpy {np.__version__}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"CUDA {'yes' if torch.cuda.is_available() else 'no'}, python {platform.python_version()}")


def fmt_shape(shape):
    return "(" + ",".join(str(d) for d in shape) + ")" if shape is not None else "contiguous"


def describe(shape, samples, batch):
    spec = SHAPES[shape]
    mods = " + ".join(f"{n} {m['dtype']} {m['shape']}" for n, m in spec["modalities"].items())
    return f"{shape}: {mods}, {spec['classes']} classes, batch {batch}, {samples} samples"


def run_shape(shape, samples, batch, workers, out_dir, passes, sweep_passes):
    print(f"\n== {describe(shape, samples, batch)}")
    arrays = synthetic_arrays(shape, samples)
    start = time.perf_counter()
    root = write_synthetic(out_dir, shape, shape, arrays)
    write_s = time.perf_counter() - start
    meta = shards.load_meta(root)
    per_sample = bytes_per_sample(meta)
    warmed = warm_page_cache(root)
    chunks = chunk_shapes(root)
    print(f"written in {write_s:.1f} s: 1 shard, {warmed / 1e6:.1f} MB on disk, {per_sample / 1e3:.1f} kB/sample; "
          f"default chunks " + ", ".join(f"{k} {fmt_shape(c)}" for k, c in chunks.items()))
    print(f"page cache warm: every file read once ({warmed / 1e6:.1f} MB) and one untimed pass of each "
          "reader before timing")

    rows = reader_rows(root, batch, passes)
    print(f"\nreader vs raw h5py: median of {passes} passes of one epoch, ours/raw blocks alternated; "
          "MB = 10^6 bytes of every field read")
    out = []
    for r in rows:
        used = " (raw)" if r["raw"] else ""
        ratio = f"{r['ratio']:.3f}" if r["ratio"] is not None else ""
        out.append([r["order"], r["reader"] + used, f"{r['mb_per_s']:.0f}", f"{r['samples_per_s']:.0f}",
                    f"{r['seconds'] * 1e3:.1f}", ratio])
    print(tables.text(["order", "reader", "MB/s", "samples/s", "ms/epoch", "ours/raw"], out))
    for r in rows:
        if r["ratio"] is not None:
            print(f"{r['order']}: ours/raw {r['ratio']:.3f}, target >= 0.90: "
                  f"{'met' if r['ratio'] >= 0.90 else 'NOT met'}")

    sweep, skipped = chunk_sweep_rows(out_dir, shape, arrays, batch, sweep_passes, default_root=root)
    del arrays
    names = list(SHAPES[shape]["modalities"])
    print(f"\nchunking: the same {samples} samples per variant, ShardDataset samples/s, median of "
          f"{sweep_passes} round-robin passes; * = writer default"
          + (f"; chunk_rows {skipped} skipped (chunk >= 1 MiB)" if skipped else ""))
    out = []
    for r in sweep:
        out.append([("default*" if r["default"] else "default") if r["chunk_rows"] is None else str(r["chunk_rows"]),
                    "on" if r["lzf"] else "off",
                    *[fmt_shape(r["chunks"][n]) for n in names], fmt_shape(r["chunks"]["label"]),
                    f"{r['size_mb']:.1f}", f"{r['shuffled_samples_per_s']:.0f}", f"{r['sequential_samples_per_s']:.0f}"])
    print(tables.text(["chunk_rows", "lzf", *[f"{n} chunks" for n in names], "label chunks", "file MB",
                       "shuffled/s", "sequential/s"], out))
    best = max(sweep, key=lambda r: r["shuffled_samples_per_s"])
    default = next(r for r in sweep if r["default"])
    print(f"fastest shuffled: chunk_rows {best['chunk_rows'] or 'default'}, lzf {'on' if best['lzf'] else 'off'} "
          f"({best['shuffled_samples_per_s'] / default['shuffled_samples_per_s']:.2f}x the default)")

    lrows = loader_rows(root, batch, workers)
    print(f"\nloader (make_loader: ShardDataset + ShardBatchSampler(shuffle=True, seed 0), batch_size=None, "
          f"persistent workers): one epoch after a warm-up batch")
    print(tables.text(["workers", "samples/s", "timed batches", "uint8 stays uint8"],
                      [[str(r["workers"]), f"{r['samples_per_s']:.0f}", str(r["batches"]),
                        "yes" if r["uint8_kept"] else "NO"] for r in lrows]))
    return {"reader": rows, "sweep": sweep, "loader": lrows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per dataset (default: dvm 4096, crema_d 1024; --quick: tiny)")
    parser.add_argument("--workers", default="0,1,2,4", help="comma-separated DataLoader num_workers values")
    parser.add_argument("--dir", default=None, help="write the shards here and keep them (the chunk-sweep variants are deleted once "
                        "measured); default: a temporary directory, removed at the end")
    parser.add_argument("--passes", type=int, default=None, help="timed passes per reader (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and batches, for the test")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    passes = args.passes or (2 if args.quick else 5)
    sweep_passes = args.passes or (2 if args.quick else 3)
    out_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="data_path-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    print("data path benchmark" + (" (--quick: tiny sizes, figures not meaningful)" if args.quick else ""))
    print(machine_facts())
    print(f"shards in {out_dir} ({'kept' if args.dir else 'removed at the end'})")
    results = {}
    try:
        for shape in (SHAPES if args.shape == "all" else [args.shape]):
            spec = SHAPES[shape]
            samples = args.samples or (spec["quick_samples"] if args.quick else spec["samples"])
            batch = spec["quick_batch"] if args.quick else spec["batch"]
            if samples < 2 * batch:
                parser.error(f"--samples {samples} gives fewer than 2 batches of {batch} for {shape}")
            results[shape] = run_shape(shape, samples, batch, workers, out_dir, passes, sweep_passes)
    finally:
        if not args.dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
