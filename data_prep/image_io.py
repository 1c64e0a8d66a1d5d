"""Helpers shared by the converters that read CSVs, JSON and images (data_prep.dvm, .sun_attribute,
.celeba, the feature converters, data_prep.from_arrays).

- :func:`read_csv`: stream a CSV as dicts with stripped header names; a missing required column
  is an error naming the file and the column.
- :func:`load_image` / :class:`ImageLoader`: decode (PIL), convert to RGB, resize to a square
  ``size x size`` uint8 (3, size, size) array; the loader works in blocks, optionally on a
  multiprocessing pool that decodes the next block while the caller writes the current one, so a
  split is never held in memory. :func:`decoded_blocks` walks the splits through such a loader.
- :func:`allocate` / :func:`stratified_pick`: deterministic per-class stratified selection.
- :func:`find_missing` / :func:`drop_missing`: image files that are not there.
- :func:`add_image_table_args`, :func:`image_table_modalities`, :func:`image_table_batches`: what
  the image + table converters share.

Image resizing: ``crop="none"`` (default) stretches the whole image to size x size, as
``torchvision.transforms.Resize((size, size))`` does; ``crop="center"`` first cuts the largest
centred square. The filter is PIL's BILINEAR, which antialiases when shrinking (like torchvision's
Resize on tensors with antialias=True). A solid-colour image stays exactly that colour.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import pathlib

import numpy as np
from PIL import Image

CROPS = ("none", "center")
# What pandas.read_csv reads as missing by default (the released pipelines used pandas).
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                        "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                        "nan", "null"})


class CsvColumnError(ValueError):
    """A CSV lacks a required column (or has a malformed header)."""


class ImageLoadError(ValueError):
    """An image file exists but cannot be decoded."""


# ----------------------------------------------------------------------------------------- CSV


def _columns(path, header, required, optional):
    """(column, position) of the columns :func:`read_csv` returns; checks the header."""
    seen = set()
    for h in header:
        if h in seen and h:
            raise CsvColumnError(f"{path}: column '{h}' appears twice in the header")
        seen.add(h)
    for col in required:
        if col not in seen:
            raise CsvColumnError(f"{path}: missing column '{col}' (header has {header})")
    wanted = list(required) + [c for c in optional if c in seen]
    return [(c, header.index(c)) for c in wanted or [h for h in header if h]]


def read_csv(path, required=(), optional=()):
    """Yield ``(line_number, {column: stripped value})`` for every data row of ``path``.

    Header names and values are stripped of surrounding whitespace (DVM headers carry leading
    spaces). Only ``required`` + ``optional`` columns are returned (all columns when both are
    empty). Raises CsvColumnError naming the file and the first missing required column, or a
    duplicated column name after stripping."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found")
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                raise CsvColumnError(f"{path}: empty file (no header row)") from None
            idx = _columns(path, header, required, optional)
            width = len(header)
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue   # blank line
                if len(row) < width:
                    row = row + [""] * (width - len(row))
                yield reader.line_num, {c: row[i].strip() for c, i in idx}
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def read_json(path):
    """A raw annotation file's JSON; a missing file or invalid JSON is an error naming the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def annotation_files(root, names, overrides=None):
    """split -> annotation file: ``root / names[split]``, or the path ``overrides[split]`` gives;
    an unknown split in ``overrides`` or a file that is not there is an error naming it."""
    files = {s: pathlib.Path(root) / f for s, f in names.items()}
    for s, p in (overrides or {}).items():
        if s not in files:
            raise ValueError(f"unknown split {s!r} (expected {list(files)})")
        if p:
            files[s] = pathlib.Path(p)
    for s, p in files.items():
        if not p.is_file():
            raise FileNotFoundError(f"{p}: annotation file not found (the {s} split)")
    return files


def csv_header(path):
    """The stripped header names of a CSV file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CSV file not found")
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        try:
            return [h.strip() for h in next(csv.reader(f))]
        except StopIteration:
            raise CsvColumnError(f"{path}: empty file (no header row)") from None


def to_float(text):
    """Like ``pandas.to_numeric(errors="coerce")`` on one string: a finite float, else None."""
    if text in NA_STRINGS:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


# -------------------------------------------------------------------------------------- splits


def allocate(counts, frac, lo=None, hi=None):
    """How many of each class to select so that the total is ``ceil(frac * sum(counts))``.

    Each class gets ``floor(frac * n_c)`` clipped to [lo_c, hi_c] (defaults 0 and n_c); the
    difference to the total is then handed out one sample at a time, to the classes with the
    largest remainders first (ties: lower class index), never leaving the bounds. The bounds win
    over the total when both cannot hold."""
    counts = np.asarray(counts, dtype=np.int64)
    lo = np.zeros_like(counts) if lo is None else np.asarray(lo, dtype=np.int64)
    hi = counts.copy() if hi is None else np.asarray(hi, dtype=np.int64)
    if np.any(lo > hi) or np.any(lo < 0) or np.any(hi > counts):
        raise ValueError(f"inconsistent bounds lo={lo.tolist()} hi={hi.tolist()} counts={counts.tolist()}")
    quota = frac * counts.astype(np.float64)
    alloc = np.clip(np.floor(quota + 1e-9).astype(np.int64), lo, hi)
    target = int(min(counts.sum(), math.ceil(frac * counts.sum() - 1e-9)))
    classes = np.arange(len(counts))
    for step, order in ((1, np.lexsort((classes, -(quota - alloc)))),      # largest shortfall first
                        (-1, np.lexsort((classes, -(alloc - quota))))):   # largest excess first
        while (alloc.sum() - target) * step < 0:
            moved = False
            for c in order:
                if alloc.sum() == target:
                    break
                if (step > 0 and alloc[c] < hi[c]) or (step < 0 and alloc[c] > lo[c]):
                    alloc[c] += step
                    moved = True
            if not moved:
                break
    return alloc


def stratified_pick(labels, frac, rng, min_picked=0, min_left=0):
    """Boolean mask picking about ``frac`` of each class of ``labels`` (totals: :func:`allocate`).

    Per class: ``min(n_c, min_left)`` samples always stay unpicked (so ``min_left=2`` keeps a class
    with >= 2 samples in both later splits, train first), then at least ``min_picked`` are picked
    when enough remain. The class's indices, in increasing order, are permuted with ``rng``
    (classes in increasing label order) and the first ``alloc_c`` are picked: deterministic given
    the rng state."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    members = [np.nonzero(labels == c)[0] for c in classes]
    counts = np.array([len(m) for m in members], dtype=np.int64)
    hi = counts - np.minimum(counts, min_left)
    lo = np.minimum(min_picked, hi)
    alloc = allocate(counts, frac, lo, hi)
    mask = np.zeros(len(labels), dtype=bool)
    for m, k in zip(members, alloc):
        mask[rng.permutation(m)[:k]] = True
    return mask


def zscore_stats(x):
    """(mean, std) per column in float64, fitted on ``x``; a constant column gets std 1."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std > 0, std, 1.0)
    return mean, std


# -------------------------------------------------------------------------------------- images


def load_image(path, size, crop="none"):
    """``path`` -> uint8 array (3, size, size): decoded with PIL, RGB, resized (see module doc).
    Raises FileNotFoundError or ImageLoadError naming the path."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if crop == "center":
                w, h = im.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{path}: cannot decode image ({e})") from e
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _load_safe(args):
    """Pool worker: never raises (exceptions do not always pickle); returns (ok, array|message)."""
    path, size, crop = args
    try:
        return True, load_image(path, size, crop)
    except FileNotFoundError as e:
        return False, ("missing", str(e))
    except Exception as e:   # noqa: BLE001 - re-raised in the parent with the path
        return False, ("decode", f"{path}: cannot decode image ({type(e).__name__}: {e})")


def _unwrap(results):
    arrays = []
    for ok, value in results:
        if not ok:
            what, message = value
            raise (FileNotFoundError if what == "missing" else ImageLoadError)(message)
        arrays.append(value)
    return arrays


class ImageLoader:
    """Decode images in blocks: ``for start, arr in loader.blocks(paths): ...`` yields
    ``arr`` uint8 (n, 3, size, size) for ``paths[start:start + n]``.

    ``workers`` = 0 decodes in this process; > 0 uses a multiprocessing pool that works on the
    next block while the caller consumes the current one (at most two blocks in memory)."""

    def __init__(self, size, crop="none", workers=0, block=512):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if size < 1 or block < 1 or workers < 0:
            raise ValueError(f"need size >= 1, block >= 1, workers >= 0 (got {size}, {block}, {workers})")
        self.size, self.crop, self.workers, self.block = int(size), crop, int(workers), int(block)
        self._pool = None

    def __enter__(self):
        if self.workers > 0:
            self._pool = multiprocessing.get_context().Pool(self.workers)
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        return False

    def _stack(self, arrays):
        if not arrays:
            return np.zeros((0, 3, self.size, self.size), dtype=np.uint8)
        return np.stack(arrays)

    def blocks(self, paths):
        paths = [str(p) for p in paths]
        starts = list(range(0, len(paths), self.block))
        if self._pool is None:
            for s in starts:
                yield s, self._stack([load_image(p, self.size, self.crop)
                                      for p in paths[s:s + self.block]])
            return
        chunk = max(1, self.block // (4 * self.workers))

        def submit(s):
            args = [(p, self.size, self.crop) for p in paths[s:s + self.block]]
            return self._pool.map_async(_load_safe, args, chunksize=chunk)

        pending = submit(starts[0]) if starts else None
        for i, s in enumerate(starts):
            results = pending.get()
            pending = submit(starts[i + 1]) if i + 1 < len(starts) else None
            yield s, self._stack(_unwrap(results))


def find_missing(paths):
    """Indices of ``paths`` that are not existing files (one stat per path)."""
    return [i for i, p in enumerate(paths) if not os.path.isfile(p)]


def missing_message(what, paths, missing, flag="--skip-missing-images"):
    shown = ", ".join(str(paths[i]) for i in missing[:5])
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    return (f"{what}: {len(missing)} image file(s) not found: {shown}{more}; "
            f"pass {flag} to drop those samples instead")


def resize_rule(crop):
    """meta.json's words for :func:`load_image`'s resizing with ``crop``."""
    return ("PIL bilinear (antialiased), stretched to a square" if crop == "none"
            else "centre square crop, then PIL bilinear (antialiased)")


def decoded_blocks(order, loader, inputs, log, what="samples", every=20):
    """Walk the splits through ``loader`` (an :class:`ImageLoader`, or anything whose
    ``blocks(items)`` yields ``(start, *arrays)`` per ``loader.block`` items): for each split of
    ``order`` (split -> sample indices, in writing order) the loader decodes ``inputs[i]`` of the
    split's samples; yields ``(split, rows, *arrays)`` with ``rows`` the sample indices of the
    block. Logs progress every ``every`` blocks and at the end of each split."""
    for split, idx in order.items():
        idx = np.asarray(idx, dtype=np.int64)
        done = 0
        for start, *arrays in loader.blocks([inputs[i] for i in idx]):
            rows = idx[start:start + len(arrays[0])]
            yield (split, rows, *arrays)
            done += len(rows)
            if done == len(idx) or (start // loader.block) % every == every - 1:
                log(f"{split}: {done}/{len(idx)} {what} written")


def drop_missing(paths, skip, where, name_of, log):
    """Indices of ``paths`` that are not files. Without ``skip`` any is an error naming ``where``
    and the paths (:func:`missing_message`); with it each is logged as
    ``skipping <name_of(i)>: image not found: <path>``, for the caller to drop."""
    missing = find_missing(paths)
    if missing and not skip:
        raise FileNotFoundError(missing_message(where, paths, missing))
    for i in missing:
        log(f"skipping {name_of(i)}: image not found: {paths[i]}")
    return missing


# ------------------------------------------------------------------------- image + table converters


def image_table_modalities(size, continuous, categorical=None):
    """Shard modalities: image uint8 (3, size, size), then the table (continuous columns first,
    then the categorical codes, ``categorical`` = {column: cardinality})."""
    categorical = categorical or {}
    return {"image": {"kind": "image", "shape": [3, size, size], "dtype": "uint8"},
            "table": {"kind": "tabular", "shape": [len(continuous) + len(categorical)], "dtype": "float32",
                      "continuous": list(continuous), "categorical": dict(categorical)}}


def image_table_batches(order, paths, table, labels, sample_ids, size, crop, workers, block, log):
    """The batches of every split (``order``: split -> sample indices, in writing order): images
    decoded block by block (:class:`ImageLoader`); ``table`` (N, D) float32, ``labels`` (N,) int64
    and ``sample_ids`` (N,) int64 indexed by sample."""
    with ImageLoader(size, crop, workers, block) as loader:
        for split, rows, images in decoded_blocks(order, loader, paths, log):
            yield split, {"image": images, "table": table[rows], "label": labels[rows],
                          "sample_id": sample_ids[rows]}


def add_image_table_args(parser, image_size):
    """The command-line options every image + table converter shares (one definition for all)."""
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (0: in-process)")
    parser.add_argument("--skip-missing-images", action="store_true",
                        help="drop samples whose image file is missing (default: error)")
    parser.add_argument("--crop", choices=CROPS, default="none")
    parser.add_argument("--block", type=int, default=512, help="images decoded per block")
