"""The shard format (version 1, described in docs/data.md): writer, validator, reader, sampler.

A prepared dataset is one directory holding ``meta.json`` and HDF5 shards named
``<split>-00000-of-000NN.h5``. Each shard holds, for its N samples, one dataset per modality
(shape ``(N, *shape)``, the declared dtype), ``label`` and ``sample_id``. Training code only ever
reads shards through :class:`ShardDataset` and orders them with :class:`ShardBatchSampler`.

Optional keys beyond the required ones of docs/data.md (written by :class:`ShardWriter`):
- ``splits[s]["shard_sizes"]``: samples per shard, so a reader can index without opening files.
- ``label_shape``: the mask shape of a segmentation task (written for segmentation only).

Validation beyond structure (:func:`validate`, run by every training script before any compute):
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
import re
import tempfile
import time

import h5py
import numpy as np
import torch
import torch.utils.data

FORMAT = "mmshards"
VERSION = 1
KINDS = ("image", "frames", "spectrogram", "sequence", "features", "tabular", "volume")
TASKS = ("classification", "regression", "segmentation")
DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")
RESERVED_KEYS = ("label", "sample_id", "index")
LABEL_DTYPES = {"classification": "int64", "regression": "float32", "segmentation": "uint8"}

CHUNK_TARGET_ROWS = 64            # at most about one batch of rows per chunk ...
CHUNK_TARGET_BYTES = 256 << 10    # ... and about 256 KiB: a random row read pulls in its whole chunk
CHUNK_MAX_BYTES = 1 << 20         # never more than HDF5's default 1 MiB per-dataset chunk cache
DEFAULT_SHARD_BYTES = 1 << 30     # samples_per_shard=None: about 1 GiB per shard
META_NAME = "meta.json"
FLOAT_DTYPES = ("float16", "float32", "float64")
SCAN_VERSION = 1                  # bump when the value checks change: old cache entries then miss
SCAN_BLOCK_BYTES = 64 << 20       # bytes read per block by the value scan (memory stays bounded)
CACHE_ENV = "MMSHARDS_CACHE_DIR"
CACHE_MAX_ENTRIES = 4096          # prune entries of vanished shards beyond this many cache files
CACHE_RACY_NS = 2_000_000_000     # no entry for a shard modified this recently (timestamp granularity)
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_TMP_PREFIX = ".tmp-"


class ShardFormatError(ValueError):
    """A shard directory, meta.json, shard file or appended batch breaks the contract."""


# ----------------------------------------------------------------------------------- meta.json


def _fail(path, field, message):
    raise ShardFormatError(f"{path}: field '{field}': {message}")


def _check_int(path, field, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(path, field, f"expected an integer >= {minimum}, got {value!r}")


def _check_shape(path, field, shape):
    if not isinstance(shape, list) or not shape or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        _fail(path, field, f"expected a non-empty list of positive integers, got {shape!r}")


def check_meta(meta, path="meta.json") -> dict:
    """Check a meta dict's keys and types against the contract; raise ShardFormatError naming
    ``path`` and the offending field. Returns ``meta`` unchanged."""
    if not isinstance(meta, dict):
        _fail(path, "<root>", f"expected a JSON object, got {type(meta).__name__}")
    for key in ("format", "version", "name", "task", "num_classes", "modalities", "splits"):
        if key not in meta:
            _fail(path, key, "missing required key")
    if meta["format"] != FORMAT:
        _fail(path, "format", f"expected {FORMAT!r}, got {meta['format']!r}")
    if meta["version"] != VERSION or isinstance(meta["version"], bool):
        _fail(path, "version", f"unsupported version {meta['version']!r} (this reader knows {VERSION})")
    if not isinstance(meta["name"], str) or not meta["name"]:
        _fail(path, "name", f"expected a non-empty string, got {meta['name']!r}")
    task = meta["task"]
    if task not in TASKS:
        _fail(path, "task", f"expected one of {TASKS}, got {task!r}")
    _check_int(path, "num_classes", meta["num_classes"], 1)
    if task == "regression" and meta["num_classes"] != 1:
        _fail(path, "num_classes", f"must be 1 for regression, got {meta['num_classes']!r}")
    if "class_names" in meta and meta["class_names"] is not None:
        names = meta["class_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) \
                or len(names) != meta["num_classes"]:
            _fail(path, "class_names", f"expected {meta['num_classes']} strings, got {names!r}")
    if "label_shape" in meta and meta["label_shape"] is not None:
        _check_shape(path, "label_shape", meta["label_shape"])
        if task != "segmentation":
            _fail(path, "label_shape", f"only meaningful for segmentation, task is {task!r}")

    modalities = meta["modalities"]
    if not isinstance(modalities, dict) or not modalities:
        _fail(path, "modalities", "expected a non-empty object")
    for name, spec in modalities.items():
        where = f"modalities.{name}"
        if name in RESERVED_KEYS or not name or "/" in name:
            _fail(path, where, f"modality name {name!r} is reserved or invalid")
        if not isinstance(spec, dict):
            _fail(path, where, "expected an object")
        for key in ("kind", "shape", "dtype"):
            if key not in spec:
                _fail(path, f"{where}.{key}", "missing required key")
        if spec["kind"] not in KINDS:
            _fail(path, f"{where}.kind", f"unknown kind {spec['kind']!r} (expected one of {KINDS})")
        _check_shape(path, f"{where}.shape", spec["shape"])
        if spec["dtype"] not in DTYPES:
            _fail(path, f"{where}.dtype", f"unsupported dtype {spec['dtype']!r} (expected one of {DTYPES})")
        if spec["kind"] == "tabular":
            cont = spec.get("continuous", [])
            cat = spec.get("categorical", {})
            if not isinstance(cont, list) or not all(isinstance(c, str) for c in cont):
                _fail(path, f"{where}.continuous", f"expected a list of column names, got {cont!r}")
            if not isinstance(cat, dict) or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cat.values()
            ):
                _fail(path, f"{where}.categorical", f"expected {{name: cardinality}}, got {cat!r}")
            if ("continuous" in spec or "categorical" in spec) and (
                len(spec["shape"]) != 1 or len(cont) + len(cat) != spec["shape"][0]
            ):
                _fail(path, f"{where}.shape", f"{spec['shape']} does not match {len(cont)} continuous "
                      f"+ {len(cat)} categorical columns")

    splits = meta["splits"]
    if not isinstance(splits, dict) or not splits:
        _fail(path, "splits", "expected a non-empty object")
    for split, info in splits.items():
        where = f"splits.{split}"
        if not isinstance(split, str) or not _SPLIT_RE.match(split):
            _fail(path, where, "split names are letters, digits and underscores")
        if not isinstance(info, dict):
            _fail(path, where, "expected an object")
        for key in ("shards", "num_samples"):
            if key not in info:
                _fail(path, f"{where}.{key}", "missing required key")
        shards = info["shards"]
        if not isinstance(shards, list) or not shards or not all(
            isinstance(s, str) and s.endswith(".h5") and os.path.basename(s) == s for s in shards
        ) or len(set(shards)) != len(shards):
            _fail(path, f"{where}.shards", f"expected a non-empty list of distinct .h5 file names, got {shards!r}")
        _check_int(path, f"{where}.num_samples", info["num_samples"], 0)
        if "shard_sizes" in info:
            sizes = info["shard_sizes"]
            if not isinstance(sizes, list) or len(sizes) != len(shards) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes
            ):
                _fail(path, f"{where}.shard_sizes", f"expected {len(shards)} counts, got {sizes!r}")
            if sum(sizes) != info["num_samples"]:
                _fail(path, f"{where}.shard_sizes", f"sum {sum(sizes)} != num_samples {info['num_samples']}")
    if "source" in meta and meta["source"] is not None and not isinstance(meta["source"], dict):
        _fail(path, "source", "expected an object")
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


def _label_spec(meta):
    """(dtype, per-sample shape or None when unknown) of the label dataset for this task."""
    shape = [] if meta["task"] != "segmentation" else meta.get("label_shape")
    return LABEL_DTYPES[meta["task"]], shape


def _open_shard(path):
    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as e:
        raise ShardFormatError(f"{path}: field '<file>': cannot open shard ({e})") from e


def _check_shard(path, f, meta):
    """Check one open shard against meta; return its sample count."""
    expected = {name: (spec["dtype"], spec["shape"]) for name, spec in meta["modalities"].items()}
    expected["label"] = _label_spec(meta)
    expected["sample_id"] = ("int64", [])
    present = set(f.keys())
    extra = sorted(present - set(expected))
    if extra:
        raise ShardFormatError(f"{path}: field '{extra[0]}': dataset not declared in meta.json")
    n = None
    for key, (dtype, shape) in expected.items():
        if key not in present:
            raise ShardFormatError(f"{path}: field '{key}': dataset missing from shard")
        ds = f[key]
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
    try:
        ids = f["sample_id"][()]
        labels = f["label"][()] if meta["task"] == "classification" else None
        for key, ds in f.items():   # touch the last row of every dataset: catches cut-off data
            if ds.shape[0]:
                ds[ds.shape[0] - 1]
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ShardFormatError(f"{path}: field '<data>': unreadable shard data ({e})") from e
    if labels is not None and labels.size and (labels.min() < 0 or labels.max() >= meta["num_classes"]):
        raise ShardFormatError(f"{path}: field 'label': values outside [0, {meta['num_classes']})")
    return n, ids


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
    if _label_spec(meta)[0] in FLOAT_DTYPES:
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


def _scan_shard(path, f, meta, split, ids, plan):
    """Run the value checks of ``plan`` over one open shard; raise ShardFormatError at the first
    offending row of a field, naming the shard, field (column), split, row and sample_id."""
    for field, finite, cats in plan:
        ds = f[field]
        for first, offset, block in _scan_blocks(ds):
            problems = []   # (row in block, message); the earliest row is reported
            if finite and _any_nonfinite(block):
                r = int(np.argmax(_nonfinite_rows(block)))
                row = block[r]
                bad = np.argwhere(~np.isfinite(row))[0]
                elem = tuple(bad) if offset is None else (int(bad[0]) + offset, *bad[1:])
                problems.append((r, f"{_where(meta, field, elem)} is {row[tuple(bad)].item()!r}: "
                                    "float data must be finite (no NaN/Inf)"))
            if cats:
                cols = [c for c, _, _ in cats]
                codes = block[:, cols]
                cards = np.array([card for _, _, card in cats])
                if codes.dtype.kind == "f":
                    with np.errstate(invalid="ignore"):
                        bad = ~np.isfinite(codes) | (codes != np.floor(codes)) | (codes < 0) | (codes >= cards)
                else:
                    codes = codes.astype(np.int64)
                    bad = (codes < 0) | (codes >= cards)
                if bad.any():
                    r, j = (int(i) for i in np.argwhere(bad)[0])
                    col, name, card = cats[j]
                    value = codes[r, j].item()
                    what = "not an integer code" if codes.dtype.kind == "f" and math.isfinite(value) \
                        and value != math.floor(value) else f"outside [0, {card})"
                    problems.append((r, f"column {col} '{name}': categorical code {value!r} is {what}"))
            if problems:
                r, message = min(problems, key=lambda p: p[0])
                row = first + r
                raise ShardFormatError(f"{path}: field '{field}': split '{split}', row {row} "
                                       f"(sample_id {int(ids[row])}): {message}")


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
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=_TMP_PREFIX, suffix=".json")
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
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _cache_prune(cache_dir) -> None:
    """Drop entries whose shard no longer exists (temporary datasets, re-converted ones), then, if
    still over CACHE_MAX_ENTRIES, the oldest half: an evicted entry costs one rescan."""
    entries = []
    for p in cache_dir.iterdir():
        try:
            if p.name.startswith(_TMP_PREFIX):
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
            try:
                p.unlink()
            except OSError:
                pass
    if len(entries) > CACHE_MAX_ENTRIES:
        for _, p in sorted(entries)[:len(entries) // 2]:
            try:
                p.unlink()
            except OSError:
                pass


def _check_values(path, meta, split, ids, plan, digest) -> None:
    """The value checks of one shard, skipped when the cache vouches for it unchanged."""
    real = pathlib.Path(os.path.realpath(path))   # the cache key: one entry however it is reached
    st = real.stat()
    if _cache_hit(real, st, digest):
        return
    started, t0 = time.time_ns(), time.perf_counter()
    with _open_shard(path) as f:
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


def validate(root, splits=None) -> dict:
    """load_meta, then open every shard of ``splits`` (default: all) and check datasets, shapes,
    dtypes, labels, per-split counts, that no split is empty and sample_id uniqueness; then the
    values (finite floats, categorical codes within their cardinality; see the module docstring),
    skipping shards whose clean scan is cached. Any problem -> ShardFormatError naming the file and
    field; a truncated or corrupt shard is an error, never skipped. The cheap structural checks
    of all splits run before the first value scan."""
    root = pathlib.Path(root)
    meta = load_meta(root)
    meta_path = root / META_NAME
    if splits is None:
        splits = list(meta["splits"])
    elif isinstance(splits, str):
        splits = [splits]
    seen_ids = []
    to_scan = []   # (shard path, split, its sample ids)
    for split in splits:
        if split not in meta["splits"]:
            _fail(meta_path, f"splits.{split}", f"no such split (have {list(meta['splits'])})")
        info = meta["splits"][split]
        total = 0
        for i, shard in enumerate(info["shards"]):
            path = root / shard
            if not path.is_file():
                raise ShardFormatError(f"{path}: field '<file>': shard listed in meta.json is missing")
            with _open_shard(path) as f:
                try:
                    n, ids = _check_shard(path, f, meta)
                except ShardFormatError:
                    raise
                except Exception as e:   # h5py raises assorted errors on corrupt metadata
                    raise ShardFormatError(f"{path}: field '<data>': corrupt shard ({e})") from e
            if "shard_sizes" in info and info["shard_sizes"][i] != n:
                raise ShardFormatError(f"{path}: field 'splits.{split}.shard_sizes[{i}]': meta.json "
                                       f"says {info['shard_sizes'][i]}, shard holds {n}")
            total += n
            seen_ids.append(ids)
            to_scan.append((path, split, ids))
        if total != info["num_samples"]:
            _fail(meta_path, f"splits.{split}.num_samples",
                  f"meta.json says {info['num_samples']}, shards hold {total}")
        if total == 0:
            _fail(meta_path, f"splits.{split}.num_samples",
                  f"split '{split}' is empty (0 samples in {len(info['shards'])} shard(s)); every split "
                  "a run reads needs samples: re-run the conversion or remove the split")
    if seen_ids:
        ids = np.concatenate(seen_ids)
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            _fail(root, "sample_id", f"not unique across splits {splits} (e.g. {int(uniq[counts > 1][0])})")
    plan = _value_plan(meta)
    if plan:
        digest = _plan_digest(plan)
        for path, split, ids in to_scan:
            _check_values(path, meta, split, ids, plan, digest)
    return meta


# ------------------------------------------------------------------------------------ writing


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
                         if p.name.startswith(_TMP_PREFIX) or p.name == f"{META_NAME}.tmp"]
            if leftovers and len(leftovers) == len(list(self.root.iterdir())):
                for p in leftovers:   # only the temporary files of a killed conversion: reuse
                    p.unlink()
            if any(self.root.iterdir()):
                if not overwrite:
                    raise FileExistsError(f"{self.root}: dataset directory exists and is not empty "
                                          "(pass overwrite=True to replace it)")
                (self.root / META_NAME).unlink(missing_ok=True)   # invalidate first
                for p in self.root.iterdir():
                    if p.is_file() and (p.suffix == ".h5" or p.name.startswith(_TMP_PREFIX)
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

    def _check_batch(self, split, batch):
        where = f"{self.root}: split '{split}'"
        if self._closed:
            raise RuntimeError(f"{where}: writer already closed")
        if not isinstance(split, str) or not _SPLIT_RE.match(split):
            raise ShardFormatError(f"{where}: field '<split>': split names are letters, digits, underscores")
        expected = self._expected()
        extra = sorted(set(batch) - set(expected))
        if extra:
            raise ShardFormatError(f"{where}: field '{extra[0]}': not a declared modality")
        out, n = {}, None
        for key, (dtype, shape) in expected.items():
            if key not in batch:
                raise ShardFormatError(f"{where}: field '{key}': missing from batch")
            arr = np.asarray(batch[key])
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
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ShardFormatError(f"{where}: field '{key}': {arr.shape[0]} rows, other fields have {n}")
            out[key] = arr
        if self.meta["task"] in ("classification", "segmentation") and n:
            lab = out["label"]
            if lab.min() < 0 or lab.max() >= self.meta["num_classes"]:
                raise ShardFormatError(f"{where}: field 'label': values outside [0, {self.meta['num_classes']})")
        ids = out["sample_id"]
        uniq, counts = np.unique(ids, return_counts=True)
        new = set(uniq.tolist())
        if len(uniq) != len(ids) or not self._ids.isdisjoint(new):
            dup = uniq[counts > 1][0] if len(uniq) != len(ids) else min(new & self._ids)
            raise ShardFormatError(f"{where}: field 'sample_id': duplicate sample_id {int(dup)}")
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
        path = self.root / f"{_TMP_PREFIX}{split}-{len(shards):05d}.h5"
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


# ------------------------------------------------------------------------------------ reading

#: Kinds whose float values the reader standardises on request, ``(x - mean) / std`` with the
#: statistics a converter stored in ``meta["modalities"][m]["standardize"] = {"mean": [...],
#: "std": [...]}`` (data_prep.from_arrays fits them on the training split), and the axis of a
#: sample the statistics run along: features and sequence per feature (the last axis),
#: spectrogram per frequency bin (axis 0), tabular per continuous column (the first
#: len(continuous) columns; the categorical codes are left alone). Images are never standardised.
STANDARDIZE_AXIS = {"features": -1, "sequence": -1, "spectrogram": 0, "tabular": 0}


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
        kind, shape = spec["kind"], spec["shape"]
        if kind not in STANDARDIZE_AXIS or spec["dtype"] not in FLOAT_DTYPES:
            continue
        field = f"modalities.{name}.standardize"
        stats = spec.get("standardize")
        if stats is None:
            _fail(path, field, f"missing: no standardisation statistics for modality {name!r} (kind {kind}); "
                  "data_prep.from_arrays writes them, fitted on the training split")
        axis = STANDARDIZE_AXIS[kind] % len(shape)
        size = len(spec.get("continuous", [])) if kind == "tabular" else shape[axis]
        if not isinstance(stats, dict) or any(
                not isinstance(stats.get(k), list) or len(stats[k]) != size
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in stats[k]) for k in ("mean", "std")) \
                or any(v <= 0 for v in stats["std"]):
            _fail(path, field, f"expected {{mean: [{size} finite numbers], std: [{size} positive numbers]}}")
        if size == 0:
            continue
        dtype = np.dtype(spec["dtype"])
        bshape = (size,) + (1,) * (len(shape) - axis - 1)
        index = (slice(None),) * (axis + 1) + (slice(0, size),)
        plan[name] = (index, np.asarray(stats["mean"], dtype=dtype).reshape(bshape),
                      np.asarray(stats["std"], dtype=dtype).reshape(bshape))
    if not plan and not any(meta["modalities"][n].get("standardize") for n in names):
        _fail(path, "modalities", f"none of {names} is a float modality of a kind "
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
                with _open_shard(p) as f:
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
            f = _open_shard(self.shard_paths[shard])
            self._handles[shard] = (f, {k: f[k] for k in self._fields})
        return self._handles[shard][1]

    def close(self):
        """Close this process's file handles (reopened lazily on the next read)."""
        if self._pid == os.getpid():
            for f, _ in self._handles.values():
                f.close()
        self._handles = {}

    def _read(self, indices):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + self._len, idx)
        bad = (idx < 0) | (idx >= self._len)
        if bad.any():
            raise IndexError(f"{self.root}: index {int(np.asarray(indices).reshape(-1)[bad][0])} out of "
                             f"range for split '{self.split}' of {self._len} samples")
        if not len(idx):   # an empty batch: empty arrays of the declared dtypes and shapes
            specs = {m: (self.meta["modalities"][m]["dtype"], self.meta["modalities"][m]["shape"])
                     for m in self.modalities}
            label_dtype, label_shape = _label_spec(self.meta)
            specs.update(label=(label_dtype, label_shape or []), sample_id=("int64", []))
            out = {k: np.empty((0, *shape), dtype=dtype) for k, (dtype, shape) in specs.items()}
            out["index"] = idx
            return {k: torch.from_numpy(v) for k, v in out.items()}
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        out = {}
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]          # batch positions served by this shard
            local = idx[where] - self.offsets[shard]
            datasets = self._datasets(int(shard))
            # the whole batch as one in-order run of this shard: a single slice read, no copy at all
            in_order = len(where) == len(idx) and local[-1] - local[0] == len(local) - 1 \
                and bool((np.diff(local) == 1).all())
            plan = None if in_order else self._read_plan(local, where)   # shared by every field
            for key in self._fields:
                ds = datasets[key]
                try:
                    if in_order:
                        out[key] = ds[int(local[0]):int(local[-1]) + 1]
                        continue
                    if key not in out:
                        out[key] = np.empty((len(idx), *ds.shape[1:]), dtype=ds.dtype)
                    self._read_into(ds, plan, out[key])
                except Exception as e:
                    raise ShardFormatError(f"{self.shard_paths[shard]}: field '{key}': read failed ({e})") from e
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


# ------------------------------------------------------------------------------------ sampling


class ShardBatchSampler:
    """Batches of dataset indices for one rank, identical in every process given (seed, epoch).

    Order: ``np.random.default_rng([seed, epoch]).permutation(num_samples)`` (identity when
    ``shuffle=False``), cut into global batches of ``global_batch_size``; rank r of N takes the
    contiguous slice [r*G/N, (r+1)*G/N) of each. So world_size=1 yields, in order, the union of
    what N ranks yield. drop_last=True drops a final partial global batch; drop_last=False splits
    it into N contiguous near-equal parts (a rank whose part is empty yields nothing for it).

    Use as ``DataLoader(ds, sampler=ShardBatchSampler(...), batch_size=None, ...)``.
    ``set_epoch(epoch, start_batch)`` skips the first ``start_batch`` global batches (resume inside
    an epoch). ``state_dict`` records the settings, not progress: with prefetching workers the
    sampler runs ahead of training, so the training loop counts consumed batches itself.
    """

    def __init__(self, num_samples, global_batch_size, rank=0, world_size=1, seed=0,
                 shuffle=True, drop_last=True):
        if global_batch_size < 1 or world_size < 1 or global_batch_size % world_size:
            raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                             f"world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside [0, world_size={world_size})")
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed, self.shuffle, self.drop_last = int(seed), bool(shuffle), bool(drop_last)
        self.local_batch_size = self.global_batch_size // self.world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        if start_batch < 0:
            raise ValueError(f"start_batch={start_batch} must be >= 0")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _partial_part(self):
        """(start, size) of this rank's part of the final partial global batch."""
        rem = self.num_samples % self.global_batch_size
        base, extra = divmod(rem, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, base + (1 if self.rank < extra else 0)

    def __len__(self):
        full = self.num_samples // self.global_batch_size
        n = max(0, full - self.start_batch)
        if not self.drop_last and self.start_batch <= full and self._partial_part()[1] > 0:
            n += 1
        return n

    def __iter__(self):
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        G, L = self.global_batch_size, self.local_batch_size
        full = self.num_samples // G
        lo = self.rank * L
        for b in range(self.start_batch, full):
            yield order[b * G + lo: b * G + lo + L].tolist()
        if not self.drop_last and self.start_batch <= full:
            start, size = self._partial_part()
            if size:
                yield order[full * G + start: full * G + start + size].tolist()

    def state_dict(self):
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, d):
        self.seed = int(d["seed"])
        self.set_epoch(d["epoch"], d.get("start_batch", 0))
