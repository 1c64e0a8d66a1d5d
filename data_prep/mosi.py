"""CMU-MOSI -> shards: CGGM's sentiment regression in [-3, 3] from text, audio and vision sequences.

CLI:
  python -m data_prep.mosi --pickle FILE --out DIR [--name mosi] [--fix-nonfinite]
      [--label-range 3] [--block 1024] [--samples-per-shard N] [--overwrite]

Raw layout: one pickle in the MulT layout (mosi_data.pkl = word-aligned, mosi_data_noalign.pkl =
unaligned; the files CGGM's released CMUData reads):
  {"train" | "valid" | "test": {"text":   (N, T_t, d_t) numeric array (GloVe 300),
                                "audio":  (N, T_a, d_a) (COVAREP, 5 or 74 dims),
                                "vision": (N, T_v, d_v) (Facet, 20 or 35 dims),
                                "labels": (N, 1, 1) (any shape with exactly one value per sample),
                                "id":     optional, N identifiers (recorded in samples.csv)}}
  Word-aligned MOSI holds 50 x 300 / 50 x 5 / 50 x 20; unaligned 50 x 300 / 375 x 5 / 500 x 20.
  Whatever (T, d) the pickle holds is accepted, as long as it is the same in all three splits.
  A missing split or key, a non-3-D or non-numeric array, a row-count mismatch, labels with
  several values per sample, non-finite labels or labels outside [-R, R] (--label-range, default
  3) are errors naming the file, the split and the key.
  The pickle is trusted input (unpickling runs code): use files from the dataset's release only.

Output <out>/<name>/ (default name mosi):
  text, audio, vision   kind sequence float32 [T, d] (the pickle's shapes; this order is the
                        released CMUData order)
  label  float32 sentiment score (task regression, num_classes 1)
  splits train / val (the pickle's "valid") / test: MOSI 1,284 / 229 / 686
  samples.csv  sample_id, split, index (row in the pickle split), id

Choices the paper and the released loader leave open:
- Audio -inf -> 0, as the released loader does (COVAREP writes -inf for log-energies of silent
  frames); the count per split is recorded in source.counts.audio_neg_inf_zeroed. Any other
  non-finite value (NaN, +inf, or -inf in text/vision) is an error naming the split, the
  modality and the count; --fix-nonfinite sets those to 0 too and counts them instead.
- Arrays are cast to float32 (the released loader's astype(np.float32)); the pickle's dtypes and
  shapes are recorded in source.raw_arrays. No further normalisation (none in the released code).
- sample_id = running row number over train, valid, test in that order (0-based).
- Works unchanged for MOSEI's MulT pickles (--name mosei).
"""
from __future__ import annotations

import pathlib
import pickle
import sys
import time

import numpy as np

from data_prep import converter, features

SPLITS = {"train": "train", "valid": "val", "test": "test"}    # pickle key -> shard split
MODALITIES = ("text", "audio", "vision")
LABEL_KEY = "labels"
LABEL_RANGE = 3.0


def load_pickle(path):
    """The MulT pickle as a dict; errors name the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pickle file not found (--pickle)")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except Exception as e:   # noqa: BLE001 - any unpickling failure is a bad input file
        try:
            with open(path, "rb") as f:   # pickles written by Python 2 hold byte strings
                data = pickle.load(f, encoding="latin1")
        except Exception:
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with keys {list(SPLITS)}, got {type(data).__name__}")
    return data


def _id_text(value):
    """One 'id' entry -> a string (arrays / lists joined with '|', bytes decoded)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (np.ndarray, list, tuple)):
        return "|".join(_id_text(v) for v in np.asarray(value, dtype=object).ravel())
    return str(value)


def _array(where, split, m, n):
    """``split[m]`` as a numeric array of ``n`` rows (``n`` None: the first key's rows)."""
    if m not in split:
        raise ValueError(f"{where}: missing key '{m}' (has {sorted(map(str, split))})")
    try:
        a = np.asarray(split[m])
    except Exception as e:   # noqa: BLE001
        raise ValueError(f"{where}, key '{m}': not an array ({e})") from e
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{where}, key '{m}': dtype {a.dtype} is not numeric")
    if m != LABEL_KEY and a.ndim != 3:
        raise ValueError(f"{where}, key '{m}': expected (N, T, d), got shape {a.shape}")
    if a.ndim == 0:
        raise ValueError(f"{where}, key '{m}': expected N values, got a scalar")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{where}, key '{m}': {a.shape[0]} rows, key 'text' has {n}")
    return a


def _labels(where, lab, shape, label_range):
    """(N, ...) labels -> float32 (N,): one finite value in [-R, R] per sample."""
    n = len(lab)
    lab = lab.reshape(n, -1)
    if lab.shape[1] != 1:
        raise ValueError(f"{where}, key '{LABEL_KEY}': {lab.shape[1]} values per sample "
                         f"(shape {shape}); a sentiment score needs exactly 1")
    lab = lab[:, 0].astype(np.float64)
    bad = np.nonzero(~np.isfinite(lab) | (np.abs(lab) > label_range))[0]
    if len(bad):
        raise ValueError(f"{where}, key '{LABEL_KEY}': {len(bad)} value(s) not finite or outside "
                         f"[-{label_range:g}, {label_range:g}], e.g. row {bad[0]} = {float(lab[bad[0]])!r}")
    return lab.astype(np.float32)


def check_split(path, key, split, label_range):
    """-> ({modality: float32 array}, labels float32 (N,), ids list or None, raw description)."""
    where = f"{path}: split '{key}'"
    if not isinstance(split, dict):
        raise ValueError(f"{where}: expected a dict of arrays, got {type(split).__name__}")
    arrays, desc, n = {}, {}, None
    for m in (*MODALITIES, LABEL_KEY):
        arrays[m] = _array(where, split, m, n)
        n = arrays[m].shape[0]
        desc[m] = {"shape": list(arrays[m].shape), "dtype": str(arrays[m].dtype)}
    if n == 0:
        raise ValueError(f"{where}: no samples")
    labels = _labels(where, arrays.pop(LABEL_KEY), desc[LABEL_KEY]["shape"], label_range)
    ids = None
    if "id" in split:
        if len(split["id"]) != n:
            raise ValueError(f"{where}, key 'id': {len(split['id'])} entries, the arrays have {n} rows")
        ids = [_id_text(v) for v in split["id"]]
    return arrays, labels, ids, desc


def _scan(x, name, block):
    """-> (audio -inf count, other non-finite count) of ``x`` after the cast to float32."""
    neg = other = 0
    for a in range(0, len(x), block):
        v = np.asarray(x[a:a + block], dtype=np.float32)
        fin = np.isfinite(v)
        if fin.all():
            continue
        k = int(np.isneginf(v).sum()) if name == "audio" else 0
        neg += k
        other += int((~fin).sum()) - k
    return neg, other


def _clean(x, name, fix):
    """float32 copy of ``x``: audio -inf -> 0; other non-finite values -> 0 when ``fix``."""
    x = np.array(x, dtype=np.float32)
    if name == "audio":
        x[np.isneginf(x)] = 0.0
    if fix:
        x[~np.isfinite(x)] = 0.0
    return x


def _read(path, label_range):
    """The pickle's three splits, checked -> ({key: (arrays, labels, ids)}, raw descriptions,
    the modalities' per-sample shapes, equal in every split)."""
    data = load_pickle(path)
    missing = [k for k in SPLITS if k not in data]
    if missing:
        raise ValueError(f"{path}: missing split(s) {missing} (has {sorted(map(str, data))})")
    splits, raw_desc, shapes = {}, {}, {}
    for key in SPLITS:
        arrays, labels, ids, desc = check_split(path, key, data[key], label_range)
        for m in MODALITIES:
            shape = list(arrays[m].shape[1:])
            first = shapes.setdefault(m, (shape, key))
            if first[0] != shape:
                raise ValueError(f"{path}: split '{key}', key '{m}': per-sample shape {shape} differs "
                                 f"from {first[0]} in split '{first[1]}'")
        splits[key] = (arrays, labels, ids)
        raw_desc[key] = desc
    return splits, raw_desc, {m: shape for m, (shape, _) in shapes.items()}


def _count_nonfinite(path, splits, block, fix_nonfinite):
    """Every value checked before anything is written -> the counts of meta.json source: audio
    -inf set to 0, and other non-finite values (an error unless ``fix_nonfinite``)."""
    counts = {"audio_neg_inf_zeroed": {}, "nonfinite_zeroed": {}}
    for key, split in SPLITS.items():
        counts["nonfinite_zeroed"][split] = {}
        for m in MODALITIES:
            neg, other = _scan(splits[key][0][m], m, block)
            if m == "audio":
                counts["audio_neg_inf_zeroed"][split] = neg
            if other and not fix_nonfinite:
                raise ValueError(f"{path}: split '{key}', key '{m}': {other} non-finite value(s) "
                                 f"(NaN / inf{'' if m == 'audio' else ' / -inf'}) after the cast to "
                                 "float32; pass --fix-nonfinite to set them to 0")
            counts["nonfinite_zeroed"][split][m] = other
    return counts


def _source(path, options, raw_desc, counts):
    fix_nonfinite = options["fix_nonfinite"]
    return {
        "converter": "data_prep.mosi", "raw": features.abspath(path),
        "options": options,
        "layout": "MulT pickle: {train, valid, test} x {text, audio, vision, labels[, id]}",
        "raw_arrays": raw_desc,
        "preprocessing": "cast to float32; audio -inf -> 0 (released CMUData); "
                         + ("every other non-finite value -> 0 (--fix-nonfinite)" if fix_nonfinite
                            else "any other non-finite value is an error"),
        "label": {"rule": "labels reshaped to (N, 1), the one value per sample as float32",
                  "range": {}},
        "split": {"rule": "the pickle's splits: train -> train, valid -> val, test -> test"},
        "counts": counts,
        "sample_id": "running row number over train, valid, test (0-based)",
    }


def _batches(splits, fix_nonfinite, block, source, log):
    """Each split in blocks of ``block`` rows, cleaned (_clean); the label range of each split
    and the split sizes go to ``source`` as they are written."""
    next_id = 0
    for key, split in SPLITS.items():
        arrays, labels, _ = splits[key]
        n = len(labels)
        for a in range(0, n, block):
            b = min(n, a + block)
            batch = {m: _clean(arrays[m][a:b], m, fix_nonfinite) for m in MODALITIES}
            batch["label"] = labels[a:b]
            batch["sample_id"] = np.arange(next_id + a, next_id + b, dtype=np.int64)
            yield split, batch
        source["label"]["range"][split] = [float(labels.min()), float(labels.max())]
        next_id += n
        log(f"{split}: {n} samples written ({source['counts']['audio_neg_inf_zeroed'][split]} audio "
            "-inf -> 0)")
    source["counts"]["splits"] = {s: len(splits[k][1]) for k, s in SPLITS.items()}


def _index(splits):
    rows, next_id = [], 0
    for key, split in SPLITS.items():
        _, labels, ids = splits[key]
        rows += [[next_id + i, split, i, ids[i] if ids is not None else ""] for i in range(len(labels))]
        next_id += len(labels)
    return {"samples.csv": (["sample_id", "split", "index", "id"], rows)}


def convert(pickle_path, out, name="mosi", fix_nonfinite=False, label_range=LABEL_RANGE, block=1024,
            samples_per_shard=None, overwrite=False, log=None) -> pathlib.Path:
    """Convert a MulT-layout CMU-MOSI pickle into ``<out>/<name>/`` (see the module docstring)."""
    log = log or converter.no_log
    if block < 1:
        raise ValueError(f"--block must be >= 1, got {block}")
    if not label_range > 0:
        raise ValueError(f"--label-range must be > 0, got {label_range}")
    converter.check_output(out, name, overwrite)
    path = pathlib.Path(pickle_path)
    t0 = time.perf_counter()
    splits, raw_desc, shapes = _read(path, label_range)
    modalities = {m: {"kind": "sequence", "shape": shapes[m], "dtype": "float32"} for m in MODALITIES}
    log(f"read {path}: " + ", ".join(f"{k} {len(splits[k][1])}" for k in SPLITS)
        + "; shapes " + ", ".join(f"{m} {shapes[m]}" for m in MODALITIES))
    counts = _count_nonfinite(path, splits, block, fix_nonfinite)
    source = _source(path, {"fix_nonfinite": fix_nonfinite, "label_range": label_range}, raw_desc, counts)
    return converter.write(out, name, converter.Meta("regression", 1, modalities, source),
                           _batches(splits, fix_nonfinite, block, source, log), lambda: _index(splits),
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0)


def _arguments(parser):
    parser.add_argument("--pickle", dest="pickle_path", metavar="PICKLE", required=True,
                        help="MulT-layout pickle (e.g. mosi_data.pkl)")
    parser.add_argument("--fix-nonfinite", action="store_true",
                        help="set NaN/inf values other than audio -inf to 0 (default: error)")
    parser.add_argument("--label-range", type=float, default=LABEL_RANGE,
                        help="labels must lie in [-R, R] (default 3)")
    parser.add_argument("--block", type=int, default=1024, help="rows written per batch")


def main(argv=None):
    return converter.main(argv, prog="mosi", doc=__doc__, arguments=_arguments, convert=convert,
                          name_default="mosi", name_help="dataset name (default mosi)")


if __name__ == "__main__":
    sys.exit(main())
