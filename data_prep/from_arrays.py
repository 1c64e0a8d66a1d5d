"""Your own data -> shards: NumPy arrays, CSV tables and image folders, one modality each.

CLI:
  python -m data_prep.from_arrays --out DIR --name NAME --modality NAME=SPEC [--modality ...]
      [--labels SPEC] [--task classification|regression]
      [--split-column SPEC | --split TRAIN,VAL,TEST --seed N]
      [--samples-per-shard N] [--workers N] [--block N] [--overwrite]

One ``--modality NAME=SPEC`` per modality, in the dataset's modality order (the default update
order of the alternating methods). NAME: letters, digits, underscores. SPEC is a path, then
``:KEY=VALUE`` options:
  FILE.npy[:kind=K]                 an array (N, ...), row i = sample i
  FILE.npz[:key=ARRAY][:kind=K]     the array ARRAY (default: the modality's name) of an .npz
      kind guessed from the shape per sample (printed): (d,) or a 1-D array -> features,
      (T, d) -> sequence, uint8 (C, H, W) -> image, uint8 (T, C, H, W) -> frames;
      :kind= sets it (features, sequence, spectrogram, image, frames). Float kinds are stored
      float32 (integer and bool arrays are converted); image and frames need uint8 pixels.
  FILE.csv[:cont=A,B][:cat=C,D]     a table, row i = sample i: continuous columns (numbers) and
      categorical columns (any values; codes = the position of the value among the sorted
      distinct values of the column, over all rows; numbers sort as numbers). Declared columns
      are the table; without cont= and cat= every column not used by --labels / --split-column
      is taken and its kind guessed (printed, with the options that reproduce it): a column
      holding a non-number, or only integers with at most 10 distinct values, is categorical;
      the others are continuous. An empty or NA cell is refused (fill or drop it first).
  FILE.csv:path=COLUMN[:size=S][:crop=none|center]   images listed in a CSV, one per row
      (paths relative to the CSV's folder, or absolute); labels usually from the same CSV
      (--labels FILE.csv:column=NAME)
  DIR[:size=S][:crop=none|center]   a folder of images per class, DIR/<class>/<image>: the samples
      are the images in the order (class folder name, file name), sorted; the labels are the
      class folders (class_names = their names, sorted); --labels must then be left out. Other
      modalities must list their rows in that same order (printed, and in samples.csv).
      Image files: .jpg .jpeg .png .bmp .gif .tif .tiff .webp (any case); hidden files skipped.
  Images are decoded with PIL, converted to RGB and stretched to S x S (default 64; crop=center
  cuts the largest centred square first): kind image, uint8 (3, S, S) (data_prep.image_io).

Per-sample SPEC (--labels, --split-column): FILE.npy | FILE.npz:key=ARRAY | FILE.csv:column=NAME,
holding N values.
  --labels: numbers or strings; NaN, Inf or an empty cell is refused. --task is guessed
      (printed): regression when a value is a non-integer number, else classification, whose
      classes are the sorted distinct values (class_names = their text).
  --split-column: the values train, val and test, each present. Without it, --split gives the
      fractions of train, val and test (default 0.7,0.15,0.15) and --seed (default 0): for
      classification stratified per class as data_prep.dvm does (test first with
      numpy default_rng([seed, 1]), then val out of the rest with default_rng([seed, 2]);
      per class floor(frac * n_c) topped up by largest remainder, a class of >= 3 samples in
      every split); for regression the same on one stratum. Deterministic given the seed.

All inputs must hold the same number of rows N; sample_id = the row index (0 .. N-1).

Output <out>/<name>/ (ShardWriter: meta.json last, atomically), then validated (data_prep.shards):
  one dataset per modality (float kinds float32 as given: NOT standardised in the shards),
  label (int64 codes, or float32 for regression), sample_id;
  samples.csv: sample_id, split, and the image path of each image modality.
meta.json: class_names (classification), modalities[m].continuous / .categorical (tables), and
for every modality of a float kind the standardisation statistics fitted on the TRAINING split
only, modalities[m].standardize = {"mean": [...], "std": [...]} (ddof 0; a zero std becomes 1):
per feature for features and sequence (the last axis, over samples and steps), per frequency bin
for spectrogram (axis 0), per continuous column for tabular (categorical codes untouched), none
for images (their encoders normalise). The loader applies (x - mean) / std when the run config
says `standardize: true` (train/loop.py). meta.json source records the inputs, what was guessed,
the categories of each categorical column, the split rule and seed, and the counts.

Bad input is refused in one line, ``error: <file or flag>: <what>``, exit status 2, before
anything is written: files that are missing or unreadable, an unknown option, column or array,
rows that differ between inputs, a NaN in a label or a float modality, an empty split, and an
output directory <out>/<name> that exists and is not empty (nothing already there is touched;
--overwrite replaces the shards of an earlier conversion there).
A file that fails to decode while the shards are written removes what this run wrote.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import sys
import time
from contextlib import ExitStack

import numpy as np

from data_prep import converter, shards
from data_prep.converter import InputError
from data_prep.image_io import (NA_STRINGS, CsvColumnError, ImageLoader, ImageLoadError, csv_header, read_csv,
                                to_float, zscore_stats)

CONVERTER = "data_prep.from_arrays"
ARRAY_KINDS = ("features", "sequence", "spectrogram", "image", "frames")
SAMPLE_RANK = {"features": 1, "sequence": 2, "spectrogram": 2, "image": 3, "frames": 4}
FLOAT_KINDS = ("features", "sequence", "spectrogram", "tabular")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = (0.7, 0.15, 0.15)
DEFAULT_IMAGE_SIZE = 64
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_GUESSED_CODES = 10   # an integer column with at most this many distinct values is categorical
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
_DATASET_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------ specs


@dataclasses.dataclass
class Spec:
    """One parsed SPEC: the flag it came from, its path, its options."""
    flag: str
    path: pathlib.Path
    options: dict

    @property
    def form(self) -> str:
        if self.path.is_dir():
            return "dir"
        return self.path.suffix.lower().lstrip(".")


def parse_spec(flag, text, allowed):
    """``PATH[:KEY=VALUE]...`` -> Spec; ``allowed``: {form: option names} (form: npy, npz, csv, dir).
    The path must exist and be of an allowed form; every option must be allowed for it."""
    path, *opts = text.split(":")
    if not path:
        raise InputError(flag, "no path given")
    options = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise InputError(flag, f"option {opt!r} is not KEY=VALUE")
        if key in options:
            raise InputError(flag, f"option {key!r} given twice")
        options[key] = value
    spec = Spec(flag, pathlib.Path(path), options)
    if not spec.path.exists():
        raise InputError(path, "no such file or directory")
    if spec.form not in allowed:
        kinds = ", ".join("a folder of class folders" if f == "dir" else f".{f}" for f in allowed)
        raise InputError(path, f"unsupported input for {flag} (expected {kinds})")
    unknown = [k for k in options if k not in allowed[spec.form]]
    if unknown:
        what = "an image folder" if spec.form == "dir" else f"a .{spec.form} input"
        raise InputError(flag, f"unknown option {unknown[0]!r} for {what} "
                               f"(options: {', '.join(allowed[spec.form]) or 'none'})")
    return spec


def parse_modality(text):
    """``NAME=SPEC`` -> (name, Spec)."""
    name, eq, rest = text.partition("=")
    if not eq:
        raise InputError("--modality", f"{text!r} is not NAME=SPEC")
    flag = f"--modality {name}"
    if not _NAME_RE.match(name) or name in shards.RESERVED_KEYS:
        raise InputError(flag, f"modality name {name!r} must be letters, digits and underscores "
                               f"and not one of {', '.join(shards.RESERVED_KEYS)}")
    allowed = {"npy": ("kind",), "npz": ("key", "kind"), "csv": ("cont", "cat", "path", "size", "crop"),
               "dir": ("size", "crop")}
    spec = parse_spec(flag, rest, allowed)
    if spec.form == "csv" and "path" not in spec.options:
        bad = [k for k in ("size", "crop") if k in spec.options]
        if bad:
            raise InputError(flag, f"option {bad[0]!r} is for images (add :path=COLUMN for a CSV of image paths)")
    if spec.form == "csv" and "path" in spec.options:
        bad = [k for k in ("cont", "cat") if k in spec.options]
        if bad:
            raise InputError(flag, f"option {bad[0]!r} is for tables, not a CSV of image paths")
    return name, spec


def parse_column_spec(flag, text):
    spec = parse_spec(flag, text, {"npy": (), "npz": ("key",), "csv": ("column",)})
    if spec.form == "csv" and not spec.options.get("column"):
        raise InputError(flag, f"name the column: {text}:column=NAME")
    if spec.form == "npz" and not spec.options.get("key"):
        raise InputError(flag, f"name the array: {text}:key=NAME")
    return spec


def _names(flag, text, what):
    names = [c.strip() for c in text.split(",")]
    if not text or any(not c for c in names):
        raise InputError(flag, f"{what}= needs comma-separated column names, got {text!r}")
    dup = [c for c in names if names.count(c) > 1]
    if dup:
        raise InputError(flag, f"column {dup[0]!r} listed twice in {what}=")
    return names


# ------------------------------------------------------------------------------------ reading


class Tables:
    """Every CSV read once: ``table(path)`` -> (header, line numbers, {column: [values]})."""

    def __init__(self):
        self._cache = {}

    def table(self, path):
        key = path.resolve()
        if key not in self._cache:
            try:
                header = csv_header(path)
                lines, columns = [], {h: [] for h in header if h}
                for line, row in read_csv(path):
                    lines.append(line)
                    for h in columns:
                        columns[h].append(row[h])
            except (CsvColumnError, ValueError, OSError) as e:
                raise InputError(path, str(e).removeprefix(f"{path}: ")) from None
            if not lines:
                raise InputError(path, "no data rows")
            self._cache[key] = (header, lines, columns)
        return self._cache[key]

    def column(self, path, name):
        header, lines, columns = self.table(path)
        if name not in columns:
            raise InputError(path, f"no column {name!r} (it has {', '.join(h for h in header if h)})")
        return lines, columns[name]


def load_array(spec, key):
    """The array of an .npy, or array ``key`` of an .npz."""
    try:
        with open(spec.path, "rb"):
            pass
        if spec.form == "npy":
            return np.load(spec.path, allow_pickle=False)
        with np.load(spec.path, allow_pickle=False) as z:
            if key not in z.files:
                raise InputError(spec.path, f"no array {key!r} (it has {', '.join(z.files)}); name one with :key=")
            return z[key]
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise InputError(spec.path, f"cannot read ({e})") from None


def read_column(spec, tables):
    """A per-sample SPEC -> (values: numpy array (N,), where: text naming the file and column,
    row names: a function row -> 'line 7' / 'row 6')."""
    if spec.form == "csv":
        col = spec.options["column"]
        lines, values = tables.column(spec.path, col)
        return np.array(values, dtype=object), f"{spec.path}, column {col!r}", lambda i: f"line {lines[i]}"
    arr = load_array(spec, spec.options.get("key"))
    where = str(spec.path) + (f", array {spec.options['key']!r}" if spec.form == "npz" else "")
    if arr.ndim != 1:
        raise InputError(where, f"expected one value per sample, shape (N,); got {arr.shape}")
    return arr, where, lambda i: f"row {i}"


# ------------------------------------------------------------------------------------- labels


def _label_values(spec, tables):
    """--labels -> (values: float64, int64 or str array, where, row namer); NaN, Inf or an empty
    cell is refused."""
    values, where, row = read_column(spec, tables)
    if values.dtype == object:   # CSV text: numbers where every cell is one
        for i, v in enumerate(values):
            if v in NA_STRINGS:
                raise InputError(where, f"{row(i)}: missing label {v!r}")
        nums = [to_float(v) for v in values]
        values = np.array(nums, dtype=np.float64) if all(n is not None for n in nums) else values.astype(str)
    if values.dtype.kind in "US":
        return values.astype(str), where
    if values.dtype.kind not in "biuf":
        raise InputError(where, f"labels must be numbers or strings, got dtype {values.dtype}")
    if values.dtype.kind != "f":
        return values.astype(np.int64), where
    values = values.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise InputError(where, f"{row(int(bad[0]))}: label is {values[bad[0]].item()!r} (NaN and Inf are refused)")
    return values, where


def make_labels(spec, tables, task):
    """(labels array, task, class names or None, description) from --labels."""
    values, where = _label_values(spec, tables)
    numeric = values.dtype.kind in "if"
    integral = numeric and bool(np.all(values == np.round(values)))
    guessed = " (guessed)" if task is None else ""
    if task is None:
        task = "regression" if numeric and not integral else "classification"
    if task == "regression":
        if not numeric:
            raise InputError("--task", f"regression needs numeric labels; {where} holds text (e.g. {values[0]!r})")
        return values.astype(np.float32), task, None, f"{task}{guessed}"
    if numeric and not integral:
        first = values[np.flatnonzero(values != np.round(values))[0]]
        raise InputError("--task", f"classification needs integer or text labels; {where} holds {first!r}")
    classes, codes = np.unique(values.astype(np.int64) if numeric else values, return_inverse=True)
    if len(classes) < 2:
        raise InputError(where, f"only one class ({classes[0]!r}): classification needs two or more")
    names = [str(c) for c in classes.tolist()]
    return codes.astype(np.int64), task, names, f"{task}{guessed}, {len(names)} classes"


def make_split(labels, task, split_spec, fractions, seed, tables, n):
    """{split: sample indices (increasing)} and its description for meta.json source."""
    if split_spec is not None:
        values, where, row = read_column(split_spec, tables)
        values = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()])
        bad = np.flatnonzero(~np.isin(values, SPLITS))
        if len(bad):
            raise InputError(where, f"{row(int(bad[0]))}: split {values[bad[0]]!r} is not one of "
                                    f"{', '.join(SPLITS)}")
        if len(values) != n:
            raise InputError(where, f"{len(values)} rows, but the modalities have {n}")
        order = {s: np.flatnonzero(values == s) for s in SPLITS}
        rule = {"rule": "given", "column": where}
    else:
        frac_train, frac_val, frac_test = fractions
        strata = labels if task == "classification" else np.zeros(n, dtype=np.int64)
        order = converter.stratified_split(strata, frac_test, frac_val / (frac_val + frac_train), seed)
        rule = {"rule": ("stratified per class" if task == "classification" else "random") +
                ": test = frac_test of all (ceil), then val = frac_val / (frac_val + frac_train) of the "
                "rest (ceil); per class floor(frac * n_c) topped up by largest remainder; indices "
                "permuted with numpy default_rng([seed, 1]) (test) and default_rng([seed, 2]) (val)",
                "fractions": {"train": frac_train, "val": frac_val, "test": frac_test}, "seed": seed}
    empty = [s for s in SPLITS if not len(order[s])]
    if empty:
        flag = "--split-column" if split_spec is not None else "--split"
        raise InputError(flag, f"the {empty[0]} split is empty ({n} samples); every split needs samples")
    return order, rule


def parse_fractions(text):
    try:
        parts = [float(p) for p in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or not all(math.isfinite(p) and p > 0 for p in parts) or abs(sum(parts) - 1) > 1e-6:
        raise InputError("--split", f"expected three positive fractions TRAIN,VAL,TEST summing to 1, got {text!r}")
    return tuple(parts)


# --------------------------------------------------------------------------------- modalities


@dataclasses.dataclass
class Modality:
    name: str
    spec: dict                   # meta.json modalities[name]
    source: dict                 # meta.json source.inputs[name]
    data: np.ndarray | None = None           # (N, *shape) arrays and tables
    paths: list | None = None                # image files
    size: int = DEFAULT_IMAGE_SIZE
    crop: str = "none"
    labels: np.ndarray | None = None         # an image folder's class codes
    class_names: list | None = None
    summary: str = ""

    @property
    def rows(self) -> int:
        return len(self.paths) if self.paths is not None else len(self.data)


def _image_options(flag, options):
    size = options.get("size", str(DEFAULT_IMAGE_SIZE))
    if not size.isdigit() or int(size) < 1:
        raise InputError(flag, f"size= must be a positive integer, got {size!r}")
    crop = options.get("crop", "none")
    if crop not in ("none", "center"):
        raise InputError(flag, f"crop= must be none or center, got {crop!r}")
    return int(size), crop


def _check_finite(where, x):
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise InputError(where, f"row {int(np.argmax(bad))} holds NaN or Inf (float data must be finite)")


def _array_kind(spec, arr, inner):
    """The kind of an array modality: ``:kind=``, else guessed from its rows -> (kind, guessed)."""
    kind = spec.options.get("kind")
    if kind is not None:
        if kind not in ARRAY_KINDS:
            raise InputError(spec.flag, f"kind={kind!r}: expected one of {', '.join(ARRAY_KINDS)}")
        return kind, False
    if len(inner) in (1, 2):
        return ("features", "sequence")[len(inner) - 1], True
    if len(inner) in (3, 4) and arr.dtype == np.uint8:
        return ("image" if len(inner) == 3 else "frames"), True
    raise InputError(spec.flag, f"cannot guess the kind of {arr.dtype} rows of shape {inner}: "
                                f"add :kind= ({', '.join(ARRAY_KINDS)})")


def array_modality(name, spec):
    key = spec.options.get("key", name)
    arr = load_array(spec, key)
    where = str(spec.path) + (f", array {key!r}" if spec.form == "npz" else "")
    if arr.ndim == 0:
        raise InputError(where, "a scalar, not one row per sample")
    if arr.dtype.kind not in "biuf":
        raise InputError(where, f"dtype {arr.dtype} is not numeric")
    if arr.ndim == 1:
        arr = arr[:, None]
    inner = arr.shape[1:]
    kind, guessed = _array_kind(spec, arr, inner)
    if len(inner) != SAMPLE_RANK[kind]:
        raise InputError(where, f"kind {kind} needs rows of {SAMPLE_RANK[kind]} dims, got shape {inner}")
    if kind in ("image", "frames"):
        if arr.dtype != np.uint8:
            raise InputError(where, f"kind {kind} needs uint8 pixels (0-255), got {arr.dtype} "
                                    "(e.g. (x * 255).round().astype(np.uint8))")
    else:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        _check_finite(where, arr)
    shape = [int(d) for d in inner]
    summary = f"{kind}{' (guessed)' if guessed else ''} {'x'.join(map(str, shape))} {arr.dtype} from {where}"
    return Modality(name, {"kind": kind, "shape": shape, "dtype": arr.dtype.name},
                    {"file": str(spec.path), **({"key": key} if spec.form == "npz" else {}),
                     "kind": kind, "kind_guessed": guessed}, data=arr, summary=summary)


def _is_number(v):
    return to_float(v) is not None


def _declared_columns(spec, header, columns, used):
    """cont= and cat= of a table SPEC -> (continuous, categorical); each column must exist and be
    no label, split or image-path column."""
    flag, path = spec.flag, spec.path
    cont = _names(flag, spec.options["cont"], "cont") if "cont" in spec.options else []
    cat = _names(flag, spec.options["cat"], "cat") if "cat" in spec.options else []
    for col in cont + cat:
        if col not in columns:
            raise InputError(path, f"no column {col!r} (it has {', '.join(h for h in header if h)})")
        if col in used:
            raise InputError(flag, f"column {col!r} is {used[col]}; it cannot also be a feature")
    both = [c for c in cont if c in cat]
    if both:
        raise InputError(flag, f"column {both[0]!r} is in both cont= and cat=")
    return cont, cat


def _guessed_columns(path, columns, used):
    """Every column not used by --labels / --split-column -> (continuous, categorical): a column
    holding a non-number, or only integers with at most MAX_GUESSED_CODES values, is categorical."""
    cont, cat = [], []
    for col in (h for h in columns if h not in used):
        vals = columns[col]
        numbers = [to_float(v) for v in vals] if all(_is_number(v) for v in vals) else None
        if numbers is None or (all(x == round(x) for x in numbers) and len(set(numbers)) <= MAX_GUESSED_CODES):
            cat.append(col)
        else:
            cont.append(col)
    if not cont and not cat:
        raise InputError(path, "no columns left for the table (all are used by --labels / --split-column)")
    return cont, cat


def _table_values(path, lines, columns, cont, cat):
    """-> (table (N, len(cont) + len(cat)) float32: continuous values, then category codes;
    {categorical column: its sorted distinct values})."""
    table = np.zeros((len(lines), len(cont) + len(cat)), dtype=np.float32)
    for j, col in enumerate(cont):
        for i, v in enumerate(columns[col]):
            x = to_float(v)
            if x is None or abs(x) > FLOAT32_MAX:
                raise InputError(path, f"line {lines[i]}, column {col!r}: {v!r} is not a finite float32 "
                                       "number (continuous column)")
            table[i, j] = x
    categories = {}
    for j, col in enumerate(cat):
        vals = columns[col]
        distinct = sorted(set(vals), key=lambda v: (0, to_float(v), v) if _is_number(v) else (1, 0.0, v))
        code = {v: k for k, v in enumerate(distinct)}
        table[:, len(cont) + j] = [code[v] for v in vals]
        categories[col] = distinct
    return table, categories


def table_modality(name, spec, tables, used):
    """A CSV table; ``used``: columns of this file taken by --labels / --split-column / image paths."""
    path = spec.path
    header, lines, columns = tables.table(path)
    guessed = "cont" not in spec.options and "cat" not in spec.options
    cont, cat = _declared_columns(spec, header, columns, used)
    for col in (cont + cat) if not guessed else [h for h in columns if h not in used]:
        for i, v in enumerate(columns[col]):
            if v in NA_STRINGS:
                raise InputError(path, f"line {lines[i]}, column {col!r}: missing value {v!r} "
                                       "(fill or drop the row first)")
    if guessed:
        cont, cat = _guessed_columns(path, columns, used)
    table, categories = _table_values(path, lines, columns, cont, cat)
    spec_meta = {"kind": "tabular", "shape": [len(cont) + len(cat)], "dtype": "float32", "continuous": cont,
                 "categorical": {c: len(categories[c]) for c in cat}}
    source = {"file": str(path), "columns_guessed": guessed, "continuous": cont, "categorical": cat,
              "categories": categories}
    return Modality(name, spec_meta, source, data=table,
                    summary=_table_summary(name, path, cont, cat, categories, guessed))


def _table_summary(name, path, cont, cat, categories, guessed):
    """The printed line of a table; guessed columns add the --modality that reproduces them."""
    reuse = ":".join([str(path)] + ([f"cont={','.join(cont)}"] if cont else []) + ([f"cat={','.join(cat)}"] if cat else []))
    summary = (f"tabular from {path}: continuous{' (guessed)' if guessed else ''} "
               f"{', '.join(cont) or '-'}; categorical{' (guessed)' if guessed else ''} "
               + (", ".join(f"{c} ({len(categories[c])})" for c in cat) or "-"))
    return summary + (f"\n    to fix these: --modality {name}={reuse}" if guessed else "")


def _image_files(folder):
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_modality(name, spec):
    size, crop = _image_options(spec.flag, spec.options)
    root = spec.path
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(root, "no class folders (expected DIR/<class>/<image files>)")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = _image_files(root / c)
        if not files:
            raise InputError(root / c, f"no image files ({', '.join(IMAGE_SUFFIXES)})")
        paths += [str(p) for p in files]
        labels += [k] * len(files)
    summary = f"image 3x{size}x{size} uint8 from {len(paths)} images in {len(classes)} class folders of {root}"
    return Modality(name, {"kind": "image", "shape": [3, size, size], "dtype": "uint8"},
                    {"folder": str(root), "size": size, "crop": crop, "classes": classes},
                    paths=paths, size=size, crop=crop, labels=np.array(labels, dtype=np.int64),
                    class_names=classes, summary=summary)


def paths_modality(name, spec, tables):
    size, crop = _image_options(spec.flag, spec.options)
    col = spec.options["path"]
    lines, values = tables.column(spec.path, col)
    base = spec.path.parent
    paths = []
    for i, v in enumerate(values):
        if not v:
            raise InputError(spec.path, f"line {lines[i]}, column {col!r}: empty image path")
        p = pathlib.Path(v)
        paths.append(str(p if p.is_absolute() else base / p))
    summary = f"image 3x{size}x{size} uint8 from {len(paths)} paths in {spec.path}, column {col!r}"
    return Modality(name, {"kind": "image", "shape": [3, size, size], "dtype": "uint8"},
                    {"file": str(spec.path), "path_column": col, "size": size, "crop": crop},
                    paths=paths, size=size, crop=crop, summary=summary)


# ----------------------------------------------------------------------------- standardisation


def standardize_stats(mod, train_idx):
    """{"mean", "std"} of a float-kind modality over the training rows (see the module docstring);
    None for images."""
    kind = mod.spec["kind"]
    if kind not in FLOAT_KINDS:
        return None
    x = mod.data[train_idx]
    if kind == "tabular":
        x = x[:, :len(mod.spec["continuous"])]
    elif kind == "spectrogram":   # (N, F, T): per frequency bin
        x = np.moveaxis(x, 1, -1)
    x = x.reshape(-1, x.shape[-1])
    mean, std = zscore_stats(x)
    return {"mean": mean.tolist(), "std": std.tolist()}


# ---------------------------------------------------------------------------------- converting


def _check_arguments(out, name, modalities, task, split_column, split, overwrite):
    """The refusals that need no input file -> the split fractions."""
    if not name or not _DATASET_RE.match(name):
        raise InputError("--name", f"{name!r} must be letters, digits, '_', '-' and '.'")
    converter.check_output(out, name, overwrite)
    if not modalities:
        raise InputError("--modality", "give at least one modality (--modality NAME=SPEC)")
    if task not in (None, "classification", "regression"):
        raise InputError("--task", f"expected classification or regression, got {task!r}")
    if split_column is not None and split is not None:
        raise InputError("--split", "give either --split-column or --split, not both")
    return parse_fractions(split) if split is not None else DEFAULT_SPLIT


def _parse_specs(modalities, labels, split_column):
    """-> ([(name, Spec)] of the modalities, the --labels Spec or None, the --split-column Spec or None)."""
    parsed = [parse_modality(m) for m in modalities]
    names = [n for n, _ in parsed]
    dup = [n for n in names if names.count(n) > 1]
    if dup:
        raise InputError(f"--modality {dup[0]}", "modality named twice")
    label_spec = parse_column_spec("--labels", labels) if labels is not None else None
    split_spec = parse_column_spec("--split-column", split_column) if split_column is not None else None
    return parsed, label_spec, split_spec


def _used_columns(parsed, label_spec, split_spec):
    """{CSV file: {column: what uses it}} of the columns that are not features."""
    used = {}
    for what, s in (("the label column", label_spec), ("the split column", split_spec)):
        if s is not None and s.form == "csv":
            used.setdefault(s.path.resolve(), {})[s.options["column"]] = what
    for n, s in parsed:
        if s.form == "csv" and "path" in s.options:
            used.setdefault(s.path.resolve(), {})[s.options["path"]] = f"the image paths of {n}"
    return used


def _read_modalities(parsed, used, tables):
    """Every modality read and checked: the same number of rows, every image file there."""
    mods = []
    for n, s in parsed:
        if s.form == "dir":
            mods.append(folder_modality(n, s))
        elif s.form == "csv" and "path" in s.options:
            mods.append(paths_modality(n, s, tables))
        elif s.form == "csv":
            mods.append(table_modality(n, s, tables, used.get(s.path.resolve(), {})))
        else:
            mods.append(array_modality(n, s))
    for m in mods[1:]:
        if m.rows != mods[0].rows:
            raise InputError(f"--modality {m.name}", f"{m.rows} rows, but {mods[0].name} has {mods[0].rows}")
    for m in (m for m in mods if m.paths is not None):
        missing = [p for p in m.paths if not pathlib.Path(p).is_file()]
        if missing:
            where = m.source.get("folder") or m.source["file"]
            shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
            raise InputError(where, f"{len(missing)} image file(s) not found: {shown}")
    return mods


def _folder_labels(folders, label_spec, task):
    """The labels of the class folders of an image folder (all such modalities must agree)."""
    first = folders[0]
    if label_spec is not None:
        raise InputError("--labels", f"the labels come from the class folders of {first.source['folder']}; "
                                     "leave --labels out")
    for m in folders[1:]:
        if m.class_names != first.class_names or not np.array_equal(m.labels, first.labels):
            raise InputError(f"--modality {m.name}", f"its class folders do not match those of "
                                                     f"{first.name} (same classes and counts needed)")
    if task == "regression":
        raise InputError("--task", "the class folders of an image folder make a classification task")
    if len(first.class_names) < 2:
        raise InputError(first.source["folder"], "only one class folder: classification needs two or more")
    text = f"classification, {len(first.class_names)} classes from the class folders of {first.source['folder']}"
    return (first.labels, "classification", first.class_names, text,
            {"from": "class folders", "folder": first.source["folder"]})


def _labels(mods, label_spec, task, tables):
    """-> (labels, task, class names or None, printed description, meta.json source.labels)."""
    folders = [m for m in mods if m.labels is not None]
    if folders:
        return _folder_labels(folders, label_spec, task)
    if label_spec is None:
        raise InputError("--labels", "required (a per-sample SPEC), unless a modality is a folder of class folders")
    task_guessed = task is None
    y, task, class_names, label_text = make_labels(label_spec, tables, task)
    if len(y) != mods[0].rows:
        raise InputError("--labels", f"{len(y)} labels, but the modalities have {mods[0].rows} rows")
    if class_names:
        label_text += f": {', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}"
    return y, task, class_names, label_text, {"file": str(label_spec.path), **label_spec.options,
                                              "task_guessed": task_guessed}


def _source(mods, label_source, split_rule, counts):
    return {
        "converter": CONVERTER,
        "inputs": {m.name: m.source for m in mods},
        "labels": label_source,
        "split": {**split_rule, "counts": counts},
        "standardize": {"fitted_on": "train", "ddof": 0, "zero_std": 1.0,
                        "modalities": [m.name for m in mods if "standardize" in m.spec],
                        "note": "stored in modalities[m].standardize; the shards hold the raw values, "
                                "the loader standardises when the run config says standardize: true"},
        "sample_id": "the row index of the inputs",
    }


def _batches(order, mods, y, workers, block):
    """Every split in blocks of ``block`` rows; image modalities decoded block by block, each by
    its ImageLoader."""
    with ExitStack() as stack:
        loaders = {m.name: stack.enter_context(ImageLoader(m.size, m.crop, workers, block))
                   for m in mods if m.paths is not None}
        for split in SPLITS:
            idx = order[split]
            images = {m.name: loaders[m.name].blocks([m.paths[i] for i in idx])
                      for m in mods if m.paths is not None}
            for start in range(0, len(idx), block):
                rows = idx[start:start + block]
                batch = {"label": y[rows], "sample_id": rows.astype(np.int64)}
                for m in mods:
                    batch[m.name] = next(images[m.name])[1] if m.paths is not None else m.data[rows]
                yield split, batch


def _index(mods, order):
    images = [m for m in mods if m.paths is not None]
    split_of = np.empty(mods[0].rows, dtype=object)
    for s in SPLITS:
        split_of[order[s]] = s
    return {"samples.csv": (["sample_id", "split", *[f"{m.name}_path" for m in images]],
                            [[i, split_of[i], *[m.paths[i] for m in images]] for i in range(mods[0].rows)])}


def convert(out, name, modalities, labels=None, task=None, split_column=None, split=None, seed=0,
            samples_per_shard=None, workers=0, block=512, overwrite=False, log=print) -> pathlib.Path:
    """Convert the inputs into ``<out>/<name>/`` (see the module docstring).

    ``modalities``: ``["NAME=SPEC", ...]``; ``labels`` / ``split_column``: per-sample SPECs;
    ``split``: "TRAIN,VAL,TEST" fractions (default 0.7,0.15,0.15); ``task``: None = guessed.
    Raises InputError (``<file or flag>: <what>``), or FileExistsError for an output directory
    that is not empty (``--out: ...``; ``overwrite`` replaces its shards), before anything is written."""
    t0 = time.perf_counter()
    fractions = _check_arguments(out, name, modalities, task, split_column, split, overwrite)
    parsed, label_spec, split_spec = _parse_specs(modalities, labels, split_column)
    tables = Tables()
    mods = _read_modalities(parsed, _used_columns(parsed, label_spec, split_spec), tables)
    y, task, class_names, label_text, label_source = _labels(mods, label_spec, task, tables)
    rows = mods[0].rows

    order, split_rule = make_split(y, task, split_spec, fractions, seed, tables, rows)
    for m in mods:
        stats = standardize_stats(m, order["train"])
        if stats is not None:
            m.spec["standardize"] = stats
    for m in mods:
        log(f"{m.name}: {m.summary}")
    log(f"labels: {label_text}")
    counts = {s: int(len(order[s])) for s in SPLITS}
    how = (f"from {split_rule['column']}" if split_rule["rule"] == "given" else
           f"fractions {','.join(f'{f:g}' for f in fractions)}, seed {seed}"
           + (" (stratified)" if task == "classification" else ""))
    log(f"split: {how}: train {counts['train']}, val {counts['val']}, test {counts['test']}")

    meta = converter.Meta(task, len(class_names) if class_names else 1, {m.name: m.spec for m in mods},
                          _source(mods, label_source, split_rule, counts), class_names=class_names)
    return converter.write(out, name, meta, _batches(order, mods, y, workers, block), lambda: _index(mods, order),
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0,
                           validate=True, what=f"{rows} samples, {len(mods)} modalities, task {task}")


# ---------------------------------------------------------------------------------------- CLI


def _arguments(parser):
    parser.add_argument("--modality", dest="modalities", action="append", default=[], metavar="NAME=SPEC",
                        help="one modality: a .npy/.npz array, a CSV table, a CSV of image paths, "
                             "or a folder of images per class (repeat, in modality order)")
    parser.add_argument("--labels", metavar="SPEC", help="FILE.npy | FILE.npz:key=K | FILE.csv:column=C "
                        "(not with a folder of class folders)")
    parser.add_argument("--task", choices=("classification", "regression"), help="default: guessed from the labels")
    parser.add_argument("--split-column", metavar="SPEC", help="per-sample train/val/test (same SPEC forms as --labels)")
    parser.add_argument("--split", metavar="TRAIN,VAL,TEST", help="fractions (default 0.7,0.15,0.15)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --split fractions")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (0: in-process)")
    parser.add_argument("--block", type=int, default=512, help="samples written (and images decoded) per block")


def main(argv=None):
    return converter.main(argv, prog="from_arrays", doc=__doc__, arguments=_arguments, convert=convert,
                          name_required=True, name_help="dataset name (letters, digits, _ - .)", log_to="stdout",
                          refusals=(InputError, ImageLoadError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    sys.exit(main())
