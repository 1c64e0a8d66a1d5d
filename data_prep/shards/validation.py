"""Validation of a prepared dataset against the shard format: meta.json's keys and types
(:func:`check_meta`, :func:`load_meta`), then every shard's datasets, shapes, dtypes, counts and
values (:func:`validate`, run by every training script before any compute), with a per-user cache
of clean value scans.

Validation beyond structure:
- Every split validated must hold samples: an empty split (``num_samples`` 0 and no rows) is refused,
  since a loader over it yields no batches and its metrics come out as NaN or zero much later.
  check_meta still accepts ``num_samples`` 0 (it checks structure; ShardWriter checks its
  arguments with a placeholder split of 0 samples); the refusal is validate's, for the splits it
  is asked about (default: all of them, which is what the training scripts ask).
- Values: float datasets (float16/32/64 modalities, the float32 label of a regression task) must
  be finite, and each categorical column of a tabular modality (the columns after the continuous
  ones, in ``categorical`` order) must hold integer codes in [0, cardinality). The first offending
  row is reported with its ``sample_id`` and split. The scan reads each dataset in row blocks
  aligned with its HDF5 chunks (SCAN_BLOCK_BYTES, 64 MiB, per block; rows bigger than that are
  read in slices along their first inner axis), so memory stays bounded on shards of any size
  (measured: +180 MiB peak RSS while scanning a 1.6 GB float16 shard).

The value scan costs a full read of the float data (I/O bound: tens of seconds on tens of GB),
so a clean result is cached per shard. Choice: a small JSON file per shard in a per-user cache
directory (``$MMSHARDS_CACHE_DIR``; default ``$XDG_CACHE_HOME/mmshards/validated`` or
``~/.cache/mmshards/validated``; ``MMSHARDS_CACHE_DIR=off`` disables it), named by a hash of the
shard's resolved path and keyed by the shard's device, inode, size, mtime_ns and ctime_ns, the
scan version and a digest of the checks derived from meta.json (so editing a cardinality
rescans). Any write to a shard changes its mtime/ctime and so invalidates the entry; only clean
results are cached, only when the shard did not change during the scan, and only for a shard last
modified at least CACHE_RACY_NS (2 s) before the scan (a shard validated right after its
conversion is scanned again on the next run, then cached). Not next to the
shards: prepared dataset directories are often read-only (shared cluster storage), and a reader
must leave a dataset directory exactly as the converter wrote it (directory listings, byte-for-byte
comparisons and copies of it see no extra files). Not recorded in meta.json by the writer: its
key would need the shards' mtimes, making meta.json non-reproducible, and copies (which change
mtimes) would lose it anyway. A cache directory that cannot be created or written never fails
validation: the shard is simply scanned again next time. Entries are written atomically (temp
file + rename), so concurrent ranks validating the same dataset at once are safe; the directory
is pruned of entries for vanished shards when it exceeds CACHE_MAX_ENTRIES files.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import tempfile
import time

import h5py
import numpy as np

from .format import (
    DTYPES, FLOAT_DTYPES, FORMAT, KINDS, META_NAME, RESERVED_KEYS, SPLIT_RE, TASKS, TMP_PREFIX,
    VERSION, ShardFormatError, fail, label_spec, open_shard,
)

SCAN_VERSION = 1                  # bump when the value checks change: old cache entries then miss
SCAN_BLOCK_BYTES = 64 << 20       # bytes read per block by the value scan (memory stays bounded)
CACHE_ENV = "MMSHARDS_CACHE_DIR"
CACHE_MAX_ENTRIES = 4096          # prune entries of vanished shards beyond this many cache files
CACHE_RACY_NS = 2_000_000_000     # no entry for a shard modified this recently (timestamp granularity)
_REQUIRED_KEYS = ("format", "version", "name", "task", "num_classes", "modalities", "splits")


# ----------------------------------------------------------------------------------- meta.json


def _is_count(value, minimum):
    """An int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_int(path, field, value, minimum):
    if not _is_count(value, minimum):
        fail(path, field, f"expected an integer >= {minimum}, got {value!r}")


def _check_shape(path, field, shape):
    if not isinstance(shape, list) or not shape or not all(_is_count(d, 1) for d in shape):
        fail(path, field, f"expected a non-empty list of positive integers, got {shape!r}")


def _check_header(meta, path):
    """The object itself, its required keys, format, version and name."""
    if not isinstance(meta, dict):
        fail(path, "<root>", f"expected a JSON object, got {type(meta).__name__}")
    for key in _REQUIRED_KEYS:
        if key not in meta:
            fail(path, key, "missing required key")
    if meta["format"] != FORMAT:
        fail(path, "format", f"expected {FORMAT!r}, got {meta['format']!r}")
    if meta["version"] != VERSION or isinstance(meta["version"], bool):
        fail(path, "version", f"unsupported version {meta['version']!r} (this reader knows {VERSION})")
    if not isinstance(meta["name"], str) or not meta["name"]:
        fail(path, "name", f"expected a non-empty string, got {meta['name']!r}")


def _check_task(meta, path):
    """task, num_classes, and the optional class_names and label_shape that depend on them."""
    task = meta["task"]
    if task not in TASKS:
        fail(path, "task", f"expected one of {TASKS}, got {task!r}")
    _check_int(path, "num_classes", meta["num_classes"], 1)
    if task == "regression" and meta["num_classes"] != 1:
        fail(path, "num_classes", f"must be 1 for regression, got {meta['num_classes']!r}")
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                              or len(names) != meta["num_classes"]):
        fail(path, "class_names", f"expected {meta['num_classes']} strings, got {names!r}")
    if meta.get("label_shape") is not None:
        _check_shape(path, "label_shape", meta["label_shape"])
        if task != "segmentation":
            fail(path, "label_shape", f"only meaningful for segmentation, task is {task!r}")


def _check_tabular(path, where, spec):
    """A tabular modality's column names: continuous names and categorical cardinalities that,
    when given, account for every column of its shape."""
    cont = spec.get("continuous", [])
    cat = spec.get("categorical", {})
    if not isinstance(cont, list) or not all(isinstance(c, str) for c in cont):
        fail(path, f"{where}.continuous", f"expected a list of column names, got {cont!r}")
    if not isinstance(cat, dict) or not all(_is_count(c, 1) for c in cat.values()):
        fail(path, f"{where}.categorical", f"expected {{name: cardinality}}, got {cat!r}")
    if ("continuous" in spec or "categorical" in spec) and (
        len(spec["shape"]) != 1 or len(cont) + len(cat) != spec["shape"][0]
    ):
        fail(path, f"{where}.shape", f"{spec['shape']} does not match {len(cont)} continuous "
             f"+ {len(cat)} categorical columns")


def _check_modality(path, name, spec):
    """One entry of ``modalities``: its name, kind, shape and dtype."""
    where = f"modalities.{name}"
    if name in RESERVED_KEYS or not name or "/" in name:
        fail(path, where, f"modality name {name!r} is reserved or invalid")
    if not isinstance(spec, dict):
        fail(path, where, "expected an object")
    for key in ("kind", "shape", "dtype"):
        if key not in spec:
            fail(path, f"{where}.{key}", "missing required key")
    if spec["kind"] not in KINDS:
        fail(path, f"{where}.kind", f"unknown kind {spec['kind']!r} (expected one of {KINDS})")
    _check_shape(path, f"{where}.shape", spec["shape"])
    if spec["dtype"] not in DTYPES:
        fail(path, f"{where}.dtype", f"unsupported dtype {spec['dtype']!r} (expected one of {DTYPES})")
    if spec["kind"] == "tabular":
        _check_tabular(path, where, spec)


def _is_shard_list(shards):
    """A non-empty list of distinct bare ``.h5`` file names (no directories)."""
    return isinstance(shards, list) and bool(shards) and all(
        isinstance(s, str) and s.endswith(".h5") and os.path.basename(s) == s for s in shards
    ) and len(set(shards)) == len(shards)


def _check_split(path, split, info):
    """One entry of ``splits``: its name, shard file names, num_samples and optional shard_sizes."""
    where = f"splits.{split}"
    if not isinstance(split, str) or not SPLIT_RE.match(split):
        fail(path, where, "split names are letters, digits and underscores")
    if not isinstance(info, dict):
        fail(path, where, "expected an object")
    for key in ("shards", "num_samples"):
        if key not in info:
            fail(path, f"{where}.{key}", "missing required key")
    shards = info["shards"]
    if not _is_shard_list(shards):
        fail(path, f"{where}.shards", f"expected a non-empty list of distinct .h5 file names, got {shards!r}")
    _check_int(path, f"{where}.num_samples", info["num_samples"], 0)
    if "shard_sizes" in info:
        sizes = info["shard_sizes"]
        if not isinstance(sizes, list) or len(sizes) != len(shards) or not all(_is_count(n, 0) for n in sizes):
            fail(path, f"{where}.shard_sizes", f"expected {len(shards)} counts, got {sizes!r}")
        if sum(sizes) != info["num_samples"]:
            fail(path, f"{where}.shard_sizes", f"sum {sum(sizes)} != num_samples {info['num_samples']}")


def check_meta(meta, path="meta.json") -> dict:
    """Check a meta dict's keys and types against the contract; raise ShardFormatError naming
    ``path`` and the offending field. Returns ``meta`` unchanged."""
    _check_header(meta, path)
    _check_task(meta, path)
    modalities = meta["modalities"]
    if not isinstance(modalities, dict) or not modalities:
        fail(path, "modalities", "expected a non-empty object")
    for name, spec in modalities.items():
        _check_modality(path, name, spec)
    splits = meta["splits"]
    if not isinstance(splits, dict) or not splits:
        fail(path, "splits", "expected a non-empty object")
    for split, info in splits.items():
        _check_split(path, split, info)
    if meta.get("source") is not None and not isinstance(meta["source"], dict):
        fail(path, "source", "expected an object")
    return meta


def load_meta(root) -> dict:
    """Read ``<root>/meta.json`` and check its keys and types (format, version, task, kinds,
    shapes, dtypes, splits). Raises ShardFormatError naming the file and the field at fault."""
    path = pathlib.Path(root) / META_NAME
    if not path.is_file():
        raise ShardFormatError(f"{path}: field '<file>': meta.json not found (dataset not prepared, "
                               "or its conversion did not finish)")
    try:
        with open(path, "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path}: field '<file>': unreadable JSON ({e})") from e
    return check_meta(meta, path)


# ------------------------------------------------------------------------------- shard structure


def _check_dataset(path, key, ds, dtype, shape, n):
    """One declared dataset ``ds`` (shard member ``key``): a dataset, the declared dtype, shape
    ``(n, *shape)``. ``n`` is the sample count of the datasets checked before (None for the first);
    returns it."""
    if not isinstance(ds, h5py.Dataset):
        raise ShardFormatError(f"{path}: field '{key}': expected a dataset, found a group")
    if ds.dtype != np.dtype(dtype):
        raise ShardFormatError(f"{path}: field '{key}': dtype {ds.dtype} != {dtype} in meta.json")
    if n is None:
        n = ds.shape[0] if ds.ndim else -1
    if shape is None:   # segmentation without label_shape: any mask shape, at least 2-D per sample
        ok = ds.ndim >= 3 and ds.shape[0] == n
    else:
        ok = tuple(ds.shape) == (n, *shape)
    if not ok:
        raise ShardFormatError(f"{path}: field '{key}': shape {tuple(ds.shape)} != (N={n}, *{shape})")
    return n


def _read_ids_and_labels(path, f, meta):
    """The shard's sample ids and (classification only, else None) labels, after touching the last
    row of every dataset: a shard cut off mid-write fails here, naming the shard."""
    try:
        ids = f["sample_id"][()]
        labels = f["label"][()] if meta["task"] == "classification" else None
        for ds in f.values():
            if ds.shape[0]:
                ds[ds.shape[0] - 1]
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ShardFormatError(f"{path}: field '<data>': unreadable shard data ({e})") from e
    return ids, labels


def _check_shard(path, f, meta):
    """Check one open shard against meta; return its sample count and sample ids."""
    expected = {name: (spec["dtype"], spec["shape"]) for name, spec in meta["modalities"].items()}
    expected["label"] = label_spec(meta)
    expected["sample_id"] = ("int64", [])
    present = set(f.keys())
    extra = sorted(present - set(expected))
    if extra:
        raise ShardFormatError(f"{path}: field '{extra[0]}': dataset not declared in meta.json")
    n = None
    for key, (dtype, shape) in expected.items():
        if key not in present:
            raise ShardFormatError(f"{path}: field '{key}': dataset missing from shard")
        n = _check_dataset(path, key, f[key], dtype, shape, n)
    ids, labels = _read_ids_and_labels(path, f, meta)
    if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
        raise ShardFormatError(f"{path}: field 'label': values outside [0, {meta['num_classes']})")
    return n, ids


def _check_shard_file(path, meta):
    """Open one shard listed in meta.json and check its structure; returns (count, sample ids)."""
    if not path.is_file():
        raise ShardFormatError(f"{path}: field '<file>': shard listed in meta.json is missing")
    with open_shard(path) as f:
        try:
            return _check_shard(path, f, meta)
        except ShardFormatError:
            raise
        except Exception as e:   # h5py raises assorted errors on corrupt metadata
            raise ShardFormatError(f"{path}: field '<data>': corrupt shard ({e})") from e


def _check_split_shards(root, meta, split):
    """The structural checks of every shard of one split and of its counts (which must agree with
    meta.json and not be 0); returns ``[(shard path, split, its sample ids)]``."""
    meta_path = root / META_NAME
    if split not in meta["splits"]:
        fail(meta_path, f"splits.{split}", f"no such split (have {list(meta['splits'])})")
    info = meta["splits"][split]
    shards, total = [], 0
    for i, shard in enumerate(info["shards"]):
        path = root / shard
        n, ids = _check_shard_file(path, meta)
        if "shard_sizes" in info and info["shard_sizes"][i] != n:
            raise ShardFormatError(f"{path}: field 'splits.{split}.shard_sizes[{i}]': meta.json "
                                   f"says {info['shard_sizes'][i]}, shard holds {n}")
        total += n
        shards.append((path, split, ids))
    if total != info["num_samples"]:
        fail(meta_path, f"splits.{split}.num_samples", f"meta.json says {info['num_samples']}, shards hold {total}")
    if total == 0:
        fail(meta_path, f"splits.{split}.num_samples",
             f"split '{split}' is empty (0 samples in {len(info['shards'])} shard(s)); every split "
             "a run reads needs samples: re-run the conversion or remove the split")
    return shards


# ------------------------------------------------------------------------------ value checks


def _value_plan(meta):
    """The value checks meta.json implies: ``[(field, finite, categorical columns)]`` where
    ``finite`` asks for no NaN/Inf (float dtypes) and categorical columns are
    ``[(column index, column name, cardinality)]`` (tabular modalities: after the continuous
    columns, in ``categorical`` order, as models/encoders.py's tabular encoder reads them)."""
    plan = []
    for name, spec in meta["modalities"].items():
        finite = spec["dtype"] in FLOAT_DTYPES
        cats = []
        if spec["kind"] == "tabular" and spec.get("categorical"):
            first = len(spec.get("continuous", []))
            cats = [(first + j, col, int(card)) for j, (col, card) in enumerate(spec["categorical"].items())]
        if finite or cats:
            plan.append((name, finite, cats))
    if label_spec(meta)[0] in FLOAT_DTYPES:
        plan.append(("label", True, []))
    return plan


def _plan_digest(plan):
    text = json.dumps({"scan_version": SCAN_VERSION, "plan": plan}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _scan_blocks(ds, budget=None):
    """Yield ``(first row, index into the row's inner axes or None, block)`` covering ``ds`` once.

    Row blocks are a multiple of the dataset's chunk rows and about ``budget`` bytes (default
    SCAN_BLOCK_BYTES), so every HDF5 chunk is read (and decompressed) exactly once, into one reused
    buffer. A chunk's rows larger than ``budget`` (datasets of >= 2 inner axes only; the writer
    never makes such chunks) are read one row at a time in slices along the first inner axis,
    aligned with the chunking there."""
    budget = SCAN_BLOCK_BYTES if budget is None else budget
    n = ds.shape[0]
    if n == 0:
        return
    inner = tuple(ds.shape[1:])
    row_bytes = max(1, ds.dtype.itemsize * math.prod(inner))
    chunks = ds.chunks or (1, *inner)
    if row_bytes * chunks[0] <= budget or len(inner) < 2:
        rows = max(chunks[0], budget // row_bytes // chunks[0] * chunks[0])
        buf = np.empty((min(rows, n), *inner), dtype=ds.dtype)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            out = buf[:b - a]
            ds.read_direct(out, np.s_[a:b], np.s_[0:b - a])
            yield a, None, out
        return
    step = max(chunks[1], budget // (row_bytes // inner[0]) // chunks[1] * chunks[1])
    buf = np.empty((1, min(step, inner[0]), *inner[1:]), dtype=ds.dtype)
    for r in range(n):
        for a in range(0, inner[0], step):
            b = min(inner[0], a + step)
            out = buf[:, :b - a]
            ds.read_direct(out, np.s_[r:r + 1, a:b], np.s_[0:1, 0:b - a])
            yield r, a, out


def _nonfinite_rows(block):
    """Boolean per row of ``block``: does it hold a NaN or Inf? float16 is tested on its exponent
    bits (all ones = Inf/NaN), 3x faster than np.isfinite on float16; float32/64 use np.isfinite."""
    flat = block.reshape(len(block), -1)
    if block.dtype == np.float16:
        exp = np.uint16(0x7C00)
        return ((flat.view(np.uint16) & exp) == exp).any(axis=1)
    return ~np.isfinite(flat).all(axis=1)


def _any_nonfinite(block):
    if block.dtype == np.float16:
        exp = np.uint16(0x7C00)
        return bool(((block.view(np.uint16) & exp) == exp).any())
    return not bool(np.isfinite(block).all())


def _where(meta, field, row_elem):
    """Human name of one element position inside a sample: a tabular column name, else its index."""
    spec = meta["modalities"].get(field)
    if spec is not None and spec["kind"] == "tabular" and len(row_elem) == 1:
        cols = [*spec.get("continuous", []), *spec.get("categorical", {})]
        if row_elem[0] < len(cols):
            return f"column {row_elem[0]} '{cols[row_elem[0]]}'"
    return f"element {tuple(int(i) for i in row_elem)}" if row_elem else "value"


def _nonfinite_problem(meta, field, block, offset):
    """(row in block, message) of the first row of ``block`` holding a NaN or Inf. ``offset``: where
    the block starts along the row's first inner axis (None: blocks of whole rows)."""
    r = int(np.argmax(_nonfinite_rows(block)))
    row = block[r]
    bad = np.argwhere(~np.isfinite(row))[0]
    elem = tuple(bad) if offset is None else (int(bad[0]) + offset, *bad[1:])
    return r, (f"{_where(meta, field, elem)} is {row[tuple(bad)].item()!r}: "
               "float data must be finite (no NaN/Inf)")


def _categorical_problem(block, cats):
    """(row in block, message) of the first categorical code of ``block`` that is not an integer
    in [0, cardinality) (``cats`` as in _value_plan), or None when all are."""
    codes = block[:, [c for c, _, _ in cats]]
    cards = np.array([card for _, _, card in cats])
    if codes.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(codes) | (codes != np.floor(codes)) | (codes < 0) | (codes >= cards)
    else:
        codes = codes.astype(np.int64)
        bad = (codes < 0) | (codes >= cards)
    if not bad.any():
        return None
    r, j = (int(i) for i in np.argwhere(bad)[0])
    col, name, card = cats[j]
    value = codes[r, j].item()
    what = "not an integer code" if codes.dtype.kind == "f" and math.isfinite(value) \
        and value != math.floor(value) else f"outside [0, {card})"
    return r, f"column {col} '{name}': categorical code {value!r} is {what}"


def _scan_shard(path, f, meta, split, ids, plan):
    """Run the value checks of ``plan`` over one open shard; raise ShardFormatError at the first
    offending row of a field, naming the shard, field (column), split, row and sample_id."""
    for field, finite, cats in plan:
        for first, offset, block in _scan_blocks(f[field]):
            problems = []   # (row in block, message); the earliest row is reported
            if finite and _any_nonfinite(block):
                problems.append(_nonfinite_problem(meta, field, block, offset))
            problem = _categorical_problem(block, cats) if cats else None
            if problem is not None:
                problems.append(problem)
            if problems:
                r, message = min(problems, key=lambda p: p[0])
                row = first + r
                raise ShardFormatError(f"{path}: field '{field}': split '{split}', row {row} "
                                       f"(sample_id {int(ids[row])}): {message}")


# ---------------------------------------------------------------------------- value-scan cache


def _cache_dir():
    """The per-user directory of value-scan results, or None when disabled (``MMSHARDS_CACHE_DIR=off``)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0") else pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "mmshards" / "validated"


def _cache_record(path, st, digest):
    """What a cache entry must hold to vouch for the shard at ``path`` in state ``st``."""
    return {"shard": str(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "checks": digest,
            "scan_version": SCAN_VERSION}


def _cache_file(cache_dir, path):
    return cache_dir / (hashlib.sha256(str(path).encode()).hexdigest()[:40] + ".json")


def _cache_hit(path, st, digest) -> bool:
    """Does the cache hold a clean scan of this shard, unchanged since (same inode, size, times)?"""
    cache_dir = _cache_dir()
    if cache_dir is None:
        return False
    try:
        with open(_cache_file(cache_dir, path), "r", encoding="utf-8") as fh:
            entry = json.load(fh)
    except (OSError, ValueError):
        return False
    want = _cache_record(path, st, digest)
    return isinstance(entry, dict) and all(entry.get(k) == v for k, v in want.items())


def _cache_store(path, st, digest, seconds) -> None:
    """Record a clean scan; any failure (read-only or missing home, full disk) is ignored: the
    shard is then scanned again next time."""
    cache_dir = _cache_dir()
    if cache_dir is None:
        return
    tmp = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=TMP_PREFIX, suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**_cache_record(path, st, digest), "scan_seconds": round(seconds, 3)}, fh)
        os.replace(tmp, _cache_file(cache_dir, path))
        tmp = None
        if len(os.listdir(cache_dir)) > CACHE_MAX_ENTRIES:
            _cache_prune(cache_dir)
    except OSError:
        pass
    finally:
        if tmp is not None:
            _unlink_quietly(tmp)


def _unlink_quietly(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _cache_prune(cache_dir) -> None:
    """Drop entries whose shard no longer exists (temporary datasets, re-converted ones), then, if
    still over CACHE_MAX_ENTRIES, the oldest half: an evicted entry costs one rescan."""
    entries = []
    for p in cache_dir.iterdir():
        try:
            if p.name.startswith(TMP_PREFIX):
                if time.time() - p.stat().st_mtime > 3600:   # a writer killed mid-write
                    p.unlink()
                continue
            with open(p, "r", encoding="utf-8") as fh:
                shard = json.load(fh).get("shard")
            if not isinstance(shard, str) or not os.path.exists(shard):
                p.unlink()
            else:
                entries.append((p.stat().st_mtime, p))
        except (OSError, ValueError, AttributeError):
            _unlink_quietly(p)
    if len(entries) > CACHE_MAX_ENTRIES:
        for _, p in sorted(entries)[:len(entries) // 2]:
            _unlink_quietly(p)


def _check_values(path, meta, split, ids, plan, digest) -> None:
    """The value checks of one shard, skipped when the cache vouches for it unchanged."""
    real = pathlib.Path(os.path.realpath(path))   # the cache key: one entry however it is reached
    st = real.stat()
    if _cache_hit(real, st, digest):
        return
    started, t0 = time.time_ns(), time.perf_counter()
    with open_shard(path) as f:
        try:
            _scan_shard(path, f, meta, split, ids, plan)
        except ShardFormatError:
            raise
        except Exception as e:   # a chunk that cannot be read or decompressed
            raise ShardFormatError(f"{path}: field '<data>': unreadable shard data ({e})") from e
    # Cache only a shard unchanged during the scan and last modified well before it: a write in the
    # same timestamp tick as the one recorded (coarse clocks: ms on local disks, 1 s on Lustre or
    # FAT) could keep size, mtime and ctime, and so an entry for a "racily clean" shard could
    # vouch for data it never saw (git's index has the same rule). Such a shard is rescanned once.
    unchanged = _cache_record(real, real.stat(), digest) == _cache_record(real, st, digest)
    if unchanged and started - st.st_mtime_ns >= CACHE_RACY_NS:
        _cache_store(real, st, digest, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ validate


def validate(root, splits=None) -> dict:
    """load_meta, then open every shard of ``splits`` (default: all) and check datasets, shapes,
    dtypes, labels, per-split counts, that no split is empty and sample_id uniqueness; then the
    values (finite floats, categorical codes within their cardinality; see the module docstring),
    skipping shards whose clean scan is cached. Any problem -> ShardFormatError naming the file and
    field; a truncated or corrupt shard is an error, never skipped. The cheap structural checks
    of all splits run before the first value scan."""
    root = pathlib.Path(root)
    meta = load_meta(root)
    if splits is None:
        splits = list(meta["splits"])
    elif isinstance(splits, str):
        splits = [splits]
    to_scan = []   # (shard path, split, its sample ids)
    for split in splits:
        to_scan += _check_split_shards(root, meta, split)
    if to_scan:
        ids = np.concatenate([shard_ids for _, _, shard_ids in to_scan])
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            fail(root, "sample_id", f"not unique across splits {splits} (e.g. {int(uniq[counts > 1][0])})")
    plan = _value_plan(meta)
    if plan:
        digest = _plan_digest(plan)
        for path, split, ids in to_scan:
            _check_values(path, meta, split, ids, plan, digest)
    return meta
