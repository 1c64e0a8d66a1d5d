"""BraTS 2021 -> shards: CGGM's 4-modality MRI segmentation on tumour-bearing axial 2-D slices.

CLI:
  python -m data_prep.brats --raw DIR --out DIR [--name brats] [--crop 160] [--val-frac 0.1]
      [--test-frac 0.2] [--seed 0] [--norm zscore|none] [--dtype float32|float16]
      [--min-tumour-voxels 1] [--skip-incomplete] [--workers N] [--samples-per-shard N]
      [--overwrite]

Raw layout (under --raw; the BraTS 2021 training release, e.g. BraTS2021_Training_Data/):
  <case>/<case>_flair.nii.gz, _t1.nii.gz, _t1ce.nii.gz, _t2.nii.gz, _seg.nii.gz   (.nii also read)
  Every sub-directory of --raw whose name does not start with '.' is a case. A case missing one
  of the five files is an error naming the files (--skip-incomplete: drop the case and count
  it). All five volumes of a case must be 3-D of one shape (240 x 240 x 155 in BraTS), the
  segmentation must hold only the BraTS labels 0, 1, 2, 4 (an error names the file and the
  values), and every modality volume must have non-zero (brain) voxels.

Output <out>/<name>/ (default name brats):
  flair, t1ce, t1, t2   kind image float32 [1, C, C] (C = --crop, default 160), in the released
                        loader's channel order (image[0..3] = flair, t1ce, t1, t2)
  label  uint8 mask (C, C): BraTS labels remapped 0 -> 0, 1 -> 1 (necrotic / non-enhancing core),
         2 -> 2 (oedema), 4 -> 3 (enhancing tumour), as the released label[label == 4] = 3
  task segmentation, num_classes 4 (Dice WT = {1,2,3}, TC = {1,3}, ET = {3})
  splits train / val / test, by case (all slices of a case in one split)
  samples.csv  sample_id, split, case, slice (index along the volume's third axis), tumour_voxels
  cases.csv    case, split, slices, and per modality the brain-voxel count, mean and std used

Choices the paper and the released loader leave open:
- Slices: axial = the third array axis of the NIfTI data as stored (BraTS volumes are all in the
  same RAS-like orientation; the released loader slices label[:, :, idx]). A slice is kept when
  its FULL (uncropped) segmentation has at least --min-tumour-voxels (1) non-zero voxels, as the
  released sampler tests np.max(label[:, :, idx]) before cropping; kept slices whose tumour lies
  partly or wholly outside the crop are counted in source.counts (tumour_voxels_cropped_away,
  slices_empty_after_crop). The released loader draws one random tumour slice per case per
  epoch; here every tumour slice is a sample (fixed, epoch-independent data).
- Crop: the released CenterCrop: offset int(round((W - C) / 2)) on each of the first two axes
  (40 for 240 -> 160); a volume smaller than C on either axis is an error.
- Normalisation (--norm zscore, default): per volume and modality, z-score over the brain
  voxels (the non-zero voxels of that modality's volume, BraTS being skull-stripped with an
  exact-zero background), computed on the whole 3-D volume in float64; background voxels stay 0.
  The released h5 files came already normalised by an unreleased script; this is the usual
  BraTS recipe. The statistics per case are in cases.csv. --norm none stores raw intensities.
- dtype: float32 (default) or float16. Measured per slice: 4 x 160 x 160 values = 409,600 B
  float32 / 204,800 B float16 (+ 25,600 B mask); BraTS 2021 training (1,251 cases, ~60-90 tumour
  slices each, ~90k slices) is ~39 GB vs ~20 GB. float16 rounds z-scores (|z| < ~30) with a
  relative error <= 4.9e-4, far below the MRI noise, but models/encoders.ImageEncoder today
  passes float16 input unchanged into float32 convolutions, so float32 is the default.
- Split by case: cases sorted by name, permuted with numpy default_rng([seed, 3]); test = the
  first ceil(test_frac * n) cases, val = the next ceil(val_frac * n), train = the rest (>= 1
  case). A case with no tumour slice still belongs to its split (and adds no samples).
- sample_id = running number over cases in sorted order, then slices in increasing index
  (0-based), independent of the split fractions and seed.
"""
from __future__ import annotations

import math
import multiprocessing
import pathlib
import sys
import time

import numpy as np

from data_prep import converter, features
from data_prep.dvm import natural_key

MODALITIES = ("flair", "t1ce", "t1", "t2")        # released channel order
SEG = "seg"
RAW_LABELS = (0, 1, 2, 4)
REMAP = np.array([0, 1, 2, 255, 3], dtype=np.uint8)     # index = raw label (3 never occurs)
CLASS_NAMES = ["background", "necrotic/non-enhancing core", "oedema", "enhancing tumour"]
CROP = 160
SEED = 0
NORMS = ("zscore", "none")
DTYPES = ("float32", "float16")
SUFFIXES = (".nii.gz", ".nii")


def case_files(case_dir):
    """-> ({modality|'seg': path}, [missing file names]) for one case directory."""
    case = case_dir.name
    found, missing = {}, []
    for m in (*MODALITIES, SEG):
        for suf in SUFFIXES:
            p = case_dir / f"{case}_{m}{suf}"
            if p.is_file():
                found[m] = p
                break
        else:
            missing.append(str(case_dir / f"{case}_{m}.nii.gz"))
    return found, missing


def list_cases(raw):
    raw = pathlib.Path(raw)
    if not raw.is_dir():
        raise FileNotFoundError(f"{raw}: BraTS folder not found (--raw)")
    cases = sorted((p for p in raw.iterdir() if p.is_dir() and not p.name.startswith(".")),
                   key=lambda p: natural_key(p.name))
    if not cases:
        raise ValueError(f"{raw}: no case directories (expected <case>/<case>_flair.nii.gz, ...)")
    return cases


def center_offsets(shape, crop):
    """The released CenterCrop offsets on the first two axes."""
    return tuple(int(round((s - crop) / 2.0)) for s in shape[:2])


def _load(path):
    import nibabel as nib
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:   # noqa: BLE001 - nibabel raises assorted errors on bad files
        raise ValueError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data


def _segmentation(path, crop):
    """The case's segmentation volume -> labels remapped to 0..3 (uint8), checked."""
    seg_raw = _load(path)
    if seg_raw.dtype.kind == "f":
        if not np.isfinite(seg_raw).all() or (seg_raw != np.round(seg_raw)).any():
            raise ValueError(f"{path}: segmentation values are not integers")
    bad = [v for v in np.unique(seg_raw).tolist() if v not in RAW_LABELS]
    if bad:
        raise ValueError(f"{path}: label values {bad[:10]} are not BraTS labels {list(RAW_LABELS)}")
    seg = REMAP[seg_raw.astype(np.int64)]
    if seg.shape[0] < crop or seg.shape[1] < crop:
        raise ValueError(f"{path}: volume {seg.shape} is smaller than --crop {crop}")
    return seg


def _modality(path, shape, norm):
    """One modality volume -> (float64 volume, normalised by ``norm``; (brain voxels, mean, std))."""
    v = _load(path)
    if v.shape != shape:
        raise ValueError(f"{path}: shape {v.shape} differs from the segmentation's {shape}")
    v = v.astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"{path}: non-finite intensities")
    brain = v != 0
    nb = int(brain.sum())
    if nb == 0:
        raise ValueError(f"{path}: no non-zero (brain) voxel")
    mean = float(v[brain].mean())
    std = float(v[brain].std())
    if norm == "zscore":
        v = np.where(brain, (v - mean) / (std if std > 0 else 1.0), 0.0)
    return v, (nb, mean, std)


def process_case(args):
    """Read, check, normalise and slice one case -> dict (see convert). Raises ValueError naming
    the file at fault."""
    case, files, crop, norm, dtype, min_voxels = args
    seg = _segmentation(files[SEG], crop)
    per_slice = (seg > 0).sum(axis=(0, 1))
    keep = np.nonzero(per_slice >= min_voxels)[0]
    oy, ox = center_offsets(seg.shape, crop)
    vols, stats = {}, {}
    for m in MODALITIES:
        v, stats[m] = _modality(files[m], seg.shape, norm)
        vols[m] = v[oy:oy + crop, ox:ox + crop][:, :, keep].transpose(2, 0, 1).astype(dtype)
        if not np.isfinite(vols[m]).all():
            raise ValueError(f"{files[m]}: intensities overflow {np.dtype(dtype).name} (use --dtype "
                             "float32 or --norm zscore)")
    label = seg[oy:oy + crop, ox:ox + crop][:, :, keep].transpose(2, 0, 1).copy()
    in_crop = (label > 0).sum(axis=(1, 2))
    return {"case": case, "slices": keep, "images": vols, "label": np.ascontiguousarray(label),
            "tumour_voxels": per_slice[keep], "cropped_away": int((per_slice[keep] - in_crop).sum()),
            "empty_after_crop": int((in_crop == 0).sum()), "stats": stats, "depth": int(seg.shape[2])}


def split_cases(names, val_frac, test_frac, seed):
    """case name -> split (see module doc)."""
    n = len(names)
    n_test = math.ceil(test_frac * n - 1e-9)
    n_val = math.ceil(val_frac * n - 1e-9)
    if n - n_test - n_val < 1:
        raise ValueError(f"{n} case(s) leave no train case with --val-frac {val_frac} and --test-frac "
                         f"{test_frac} ({n_val} val, {n_test} test)")
    perm = [names[i] for i in np.random.default_rng([seed, 3]).permutation(n)]
    split = dict.fromkeys(perm[:n_test], "test")
    split.update(dict.fromkeys(perm[n_test:n_test + n_val], "val"))
    split.update(dict.fromkeys(perm[n_test + n_val:], "train"))
    return split


def _check_options(norm, dtype, crop, min_tumour_voxels, workers, val_frac, test_frac):
    if norm not in NORMS:
        raise ValueError(f"--norm must be one of {NORMS}, got {norm!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if crop < 1 or min_tumour_voxels < 1 or workers < 0:
        raise ValueError(f"need --crop >= 1, --min-tumour-voxels >= 1, --workers >= 0 (got {crop}, "
                         f"{min_tumour_voxels}, {workers})")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1):
        raise ValueError(f"--val-frac and --test-frac must be in [0, 1), got {val_frac}, {test_frac}")


def _complete_cases(raw, skip_incomplete, log):
    """-> ([(case, {modality|'seg': path})] of the complete cases, number of incomplete ones);
    an incomplete case is an error naming its missing files unless ``skip_incomplete``."""
    cases, incomplete = [], []
    for d in list_cases(raw):
        files, missing = case_files(d)
        if missing:
            incomplete.append((d.name, missing))
        else:
            cases.append((d.name, files))
    if incomplete and not skip_incomplete:
        shown = "; ".join(f"{c}: {', '.join(m)}" for c, m in incomplete[:3])
        more = f" (and {len(incomplete) - 3} more cases)" if len(incomplete) > 3 else ""
        raise FileNotFoundError(f"{raw} (BraTS): {len(incomplete)} case(s) with missing files: "
                                f"{shown}{more}; pass --skip-incomplete to drop those cases")
    for c, _ in incomplete:
        log(f"skipping case {c}: files missing")
    if not cases:
        raise ValueError(f"{raw}: no complete case left")
    return cases, len(incomplete)


def _source(raw, options, of_case, counts):
    min_tumour_voxels, seed = options["min_tumour_voxels"], options["seed"]
    return {
        "converter": "data_prep.brats", "raw": features.abspath(raw),
        "options": options,
        "slices": {"axis": "third array axis of the NIfTI data (axial)",
                   "rule": f"kept when the full slice's segmentation has >= {min_tumour_voxels} "
                           "non-zero voxel(s) (tested before the crop, as released)"},
        "crop": {"size": options["crop"], "rule": "offset int(round((W - C) / 2)) on the first two axes "
                                                  "(the released CenterCrop)"},
        "normalisation": ({"method": "zscore", "rule": "per volume and modality over the non-zero "
                                                       "(brain) voxels, float64, background stays 0; "
                                                       "statistics per case in cases.csv"}
                          if options["norm"] == "zscore" else {"method": "none", "rule": "raw intensities"}),
        "label": {"rule": "BraTS labels 0, 1, 2, 4 -> 0, 1, 2, 3 (4 -> 3 as released)",
                  "raw_labels": list(RAW_LABELS)},
        "split": {"rule": "by case: names sorted, permuted with numpy default_rng([seed, 3]); test = "
                          "first ceil(test_frac*n), val = next ceil(val_frac*n), train = the rest",
                  "seed": seed, "val_frac": options["val_frac"], "test_frac": options["test_frac"],
                  "cases": {s: sorted((c for c, v in of_case.items() if v == s), key=natural_key)
                            for s in ("train", "val", "test")}},
        "counts": counts,
        "sample_id": "running number over cases (sorted by name) then slices (increasing index)",
    }


def _tally(counts, voxels, split, r):
    """Add one processed case to meta.json's counts (and the voxels per class of its split)."""
    counts["slices_seen"] += r["depth"]
    counts["tumour_voxels_cropped_away"] += r["cropped_away"]
    counts["slices_empty_after_crop"] += r["empty_after_crop"]
    n = len(r["slices"])
    if n:
        counts["splits"][split] = counts["splits"].get(split, 0) + n
        v = voxels.setdefault(split, np.zeros(4, dtype=np.int64))
        v += np.bincount(r["label"].ravel(), minlength=4)
    else:
        counts["cases_without_tumour_slices"] += 1


def _batches(raw, jobs, of_case, workers, counts, index, log):
    """The tumour slices of every case, case by case (``workers`` > 0: read in a pool, in order);
    fills ``counts`` and ``index`` (samples.csv and cases.csv rows) as it goes."""
    voxels, next_id = {}, 0
    pool = multiprocessing.get_context().Pool(workers) if workers > 0 else None
    try:
        results = pool.imap(process_case, jobs) if pool is not None else map(process_case, jobs)
        for k, r in enumerate(results):
            split, n = of_case[r["case"]], len(r["slices"])
            if n:
                yield split, {**{m: r["images"][m][:, None] for m in MODALITIES}, "label": r["label"],
                              "sample_id": np.arange(next_id, next_id + n, dtype=np.int64)}
            _tally(counts, voxels, split, r)
            index["samples.csv"][1].extend([next_id + j, split, r["case"], int(s), int(t)]
                                           for j, (s, t) in enumerate(zip(r["slices"], r["tumour_voxels"])))
            index["cases.csv"][1].append([r["case"], split, n] + [f"{x:.6g}" if isinstance(x, float) else x
                                                                  for m in MODALITIES for x in r["stats"][m]])
            next_id += n
            if (k + 1) % 25 == 0 or k + 1 == len(jobs):
                log(f"{k + 1}/{len(jobs)} cases, {next_id} slices written")
        counts["per_class_voxels"] = {s: v.tolist() for s, v in voxels.items()}
        if not next_id:
            min_voxels = jobs[0][-1]
            raise ValueError(f"{raw}: no slice with >= {min_voxels} tumour voxel(s) in any case")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def convert(raw, out, name="brats", crop=CROP, val_frac=0.1, test_frac=0.2, seed=SEED, norm="zscore",
            dtype="float32", min_tumour_voxels=1, skip_incomplete=False, workers=0,
            samples_per_shard=None, overwrite=False, log=None) -> pathlib.Path:
    """Convert a BraTS 2021 folder into ``<out>/<name>/`` (see the module docstring)."""
    log = log or converter.no_log
    _check_options(norm, dtype, crop, min_tumour_voxels, workers, val_frac, test_frac)
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    t0 = time.perf_counter()
    cases, incomplete = _complete_cases(raw, skip_incomplete, log)
    of_case = split_cases([c for c, _ in cases], val_frac, test_frac, seed)
    per_split = {s: sum(v == s for v in of_case.values()) for s in ("train", "val", "test")}
    log(f"{len(cases)} cases: " + ", ".join(f"{s} {n}" for s, n in per_split.items()))

    options = {"crop": crop, "val_frac": val_frac, "test_frac": test_frac, "seed": seed, "norm": norm,
               "dtype": dtype, "min_tumour_voxels": min_tumour_voxels, "skip_incomplete": skip_incomplete}
    counts = {"cases": len(cases), "incomplete_cases_skipped": incomplete, "cases_per_split": per_split,
              "cases_without_tumour_slices": 0, "slices_seen": 0, "splits": {},
              "tumour_voxels_cropped_away": 0, "slices_empty_after_crop": 0,
              "per_class_voxels": {}}     # filled while writing
    meta = converter.Meta("segmentation", 4, {m: {"kind": "image", "shape": [1, crop, crop], "dtype": dtype}
                                              for m in MODALITIES},
                          _source(raw, options, of_case, counts), class_names=CLASS_NAMES,
                          label_shape=[crop, crop])
    index = {"samples.csv": (["sample_id", "split", "case", "slice", "tumour_voxels"], []),
             "cases.csv": (["case", "split", "slices"]
                           + [f"{m}_{k}" for m in MODALITIES for k in ("brain_voxels", "mean", "std")], [])}
    jobs = [(c, f, crop, norm, np.dtype(dtype), min_tumour_voxels) for c, f in cases]
    batches = _batches(raw, jobs, of_case, workers, counts, index, log)
    return converter.write(out, name, meta, batches, lambda: index,
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0)


def _arguments(parser):
    parser.add_argument("--raw", required=True,
                        help="folder of case directories (<case>/<case>_flair.nii.gz ...)")
    parser.add_argument("--crop", type=int, default=CROP, help="centre crop size (default 160)")
    parser.add_argument("--val-frac", type=float, default=0.1, help="fraction of cases in val")
    parser.add_argument("--test-frac", type=float, default=0.2, help="fraction of cases in test")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the case split")
    parser.add_argument("--norm", choices=NORMS, default="zscore",
                        help="zscore: per volume over brain voxels (default); none: raw intensities")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored image dtype")
    parser.add_argument("--min-tumour-voxels", type=int, default=1,
                        help="tumour voxels a slice needs to be kept (default 1)")
    parser.add_argument("--skip-incomplete", action="store_true",
                        help="drop cases missing a file (default: error)")
    parser.add_argument("--workers", type=int, default=0, help="case-reading processes (0: in-process)")


def main(argv=None):
    return converter.main(argv, prog="brats", doc=__doc__, arguments=_arguments, convert=convert,
                          name_default="brats", name_help="dataset name (default brats)")


if __name__ == "__main__":
    sys.exit(main())
