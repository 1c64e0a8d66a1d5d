"""IEMOCAP -> shards: CGGM's 4-emotion task from text, audio and vision feature sequences.

CLI:
  python -m data_prep.iemocap --raw DIR --out DIR [--name iemocap] [--cv 1]
      [--text-feature bert_large] [--audio-feature comparE] [--vision-feature denseface]
      [--no-vision] [--text-len 22] [--audio-len 350] [--vision-len 50] [--truncate]
      [--audio-norm train|file|utt|none] [--block 512] [--samples-per-shard N] [--overwrite]

Raw layout (under --raw; the MMIN feature release that CGGM's released IEMOData reads):
  L/<text-feature>.h5        one dataset per utterance id: (T_l, 1024) BERT-large word features
  A/<audio-feature>.h5       (T_a, 130) ComParE frame features
  A/<audio-feature>_mean_std.h5   only for --audio-norm file: group "<cv>" with datasets mean, std
  V/<vision-feature>.h5      (T_v, 342) DenseFace frame features (absent: pass --no-vision)
  target/<cv>/{trn,val,tst}_label.npy     (N, 4) one-hot rows (argmax, as released) or (N,) ints
  target/<cv>/{trn,val,tst}_int2name.npy  (N,) or (N, 1) utterance ids (bytes or str), the
      order of the labels (the released loader reads int2name[i][0].decode())
  --cv picks the cross-validation fold (1-10 in the release; the released CGGM run uses 1).
  A missing file, an utterance absent from a feature file, a feature that is not 2-D or whose
  width differs from the other utterances', a label row that is not one-hot or out of 0..3, a
  label/id count mismatch, or an utterance in two splits is an error naming the file, the split
  and the utterance, before anything is written.

Output <out>/<name>/ (default name iemocap):
  text    kind sequence float32 [22, 1024]   zero-padded at the end
  audio   kind sequence float32 [350, 130]   normalised (--audio-norm), then zero-padded
  vision  kind sequence float32 [50, 342]    zero-padded (omitted with --no-vision)
  label   0 ang, 1 hap (happy + excited), 2 neu, 3 sad
  splits train (trn) / val (val) / test (tst) of fold --cv
  samples.csv  sample_id, split, utterance, text_len, audio_len, vision_len (lengths before
               padding: the padding mask is position >= length)

Choices the paper and the released loader leave open:
- Lengths: text 22, audio 350 and vision 50 are the released fixed shapes (IEMOData tshape /
  ashape / vshape); the released collate pads audio to 350 with zeros after normalisation and
  text / vision to the batch maximum. Here all three are padded to their fixed length, so a
  sample does not depend on its batch. A longer sequence is an error naming the utterance
  (the released collate fails on audio > 350) unless --truncate keeps the first frames (counted).
- --audio-norm train (default): per-dimension mean / std over every frame of every TRAIN
  utterance (float64, population std, a constant dimension gets std 1), applied to all splits;
  the statistics are written to meta.json source.audio_norm. The release ships precomputed
  per-fold statistics (A/comparE_mean_std.h5, --audio-norm file, the released default); its
  comparE_raw path computes them over all utterances of all splits (leakage), which is why they
  are refitted on train here. utt: per-utterance z-score (the released norm_method 'utt',
  unbiased std); none: raw features. Text and vision are not normalised (as released).
- Class order: the usual IEMOCAP 4-class mapping {ang: 0, hap: 1, exc: 1, neu: 2, sad: 3} that the
  MMIN features were labelled with (the one-hot files do not name their columns).
- sample_id = running row number over trn, val, tst of the fold (0-based).
"""
from __future__ import annotations

import contextlib
import pathlib
import sys
import time

import h5py
import numpy as np

from data_prep import converter, features

SPLITS = {"trn": "train", "val": "val", "tst": "test"}      # file prefix -> shard split
CLASS_NAMES = ["ang", "hap", "neu", "sad"]
CLASS_DESCRIPTIONS = {"ang": "anger", "hap": "happiness (hap + exc)", "neu": "neutral", "sad": "sadness"}
LENGTHS = {"text": 22, "audio": 350, "vision": 50}
FOLDERS = {"text": "L", "audio": "A", "vision": "V"}
DEFAULT_FEATURES = {"text": "bert_large", "audio": "comparE", "vision": "denseface"}
AUDIO_NORMS = ("train", "file", "utt", "none")


def _decode(v):
    v = np.asarray(v, dtype=object).ravel()
    if v.size != 1:
        raise ValueError(f"expected one id, got {v.size} values")
    v = v[0]
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _labels(lab, lab_path):
    """(N, 4) one-hot rows or (N,) class indices -> int64 labels."""
    if lab.ndim == 2 and lab.shape[1] == len(CLASS_NAMES):
        one_hot = np.isin(lab, (0, 1)).all(1) & (lab.sum(1) == 1)
        if not one_hot.all():
            row = int(np.nonzero(~one_hot)[0][0])
            raise ValueError(f"{lab_path}: row {row} = {lab[row].tolist()} is not one-hot")
        return np.argmax(lab, axis=1).astype(np.int64)
    if lab.ndim == 1 and lab.dtype.kind in "iu":
        labels = lab.astype(np.int64)
        bad = np.nonzero((labels < 0) | (labels >= len(CLASS_NAMES)))[0]
        if len(bad):
            raise ValueError(f"{lab_path}: row {bad[0]} = {labels[bad[0]]} is outside 0..3")
        return labels
    raise ValueError(f"{lab_path}: expected (N, 4) one-hot rows or (N,) class indices, got "
                     f"{lab.dtype} {lab.shape}")


def read_targets(target_dir, prefix):
    """-> (utterance ids, labels int64) of one split of one fold."""
    lab_path = target_dir / f"{prefix}_label.npy"
    ids_path = target_dir / f"{prefix}_int2name.npy"
    for p in (lab_path, ids_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: target file not found (the {SPLITS[prefix]} split)")
    try:
        lab = np.load(lab_path, allow_pickle=True)
        names = np.load(ids_path, allow_pickle=True)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{target_dir}/{prefix}_*.npy: unreadable .npy ({e})") from e
    labels = _labels(lab, lab_path)
    if names.ndim == 0 or len(names) != len(labels):
        raise ValueError(f"{ids_path}: {names.size if names.ndim else 0} ids, {lab_path.name} has "
                         f"{len(labels)} labels")
    ids = []
    for i, v in enumerate(names):
        try:
            ids.append(_decode(v))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{ids_path}: row {i}: {e}") from e
    if not ids:
        raise ValueError(f"{ids_path}: no utterances")
    return ids, labels


class FeatureFile:
    """One per-utterance feature h5 (utterance id -> (T, d)); checks presence, rank and width."""

    def __init__(self, path, modality):
        self.path, self.modality = pathlib.Path(path), modality
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: {modality} feature file not found")
        try:
            self.f = h5py.File(self.path, "r", locking=False)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot open HDF5 ({e})") from e
        self.dim = None

    def check(self, utt, split):
        """Shape check without reading the data; -> T."""
        if utt not in self.f:
            raise ValueError(f"{self.path}: utterance {utt!r} (the {split} split) has no {self.modality} "
                             "features")
        ds = self.f[utt]
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.dtype.kind not in "fiu":
            what = f"{ds.dtype} {ds.shape}" if isinstance(ds, h5py.Dataset) else "a group"
            raise ValueError(f"{self.path}: utterance {utt!r}: expected a numeric (T, d) array, got {what}")
        if self.dim is None:
            self.dim = int(ds.shape[1])
        elif ds.shape[1] != self.dim:
            raise ValueError(f"{self.path}: utterance {utt!r}: width {ds.shape[1]}, other utterances "
                             f"have {self.dim}")
        return int(ds.shape[0])

    def read(self, utt):
        return np.asarray(self.f[utt][()], dtype=np.float64)

    def close(self):
        self.f.close()


def _fit_train_audio(audio, utts):
    """Per-dimension mean / population std over all frames of ``utts`` (float64; utterance
    moments merged with Chan et al.'s pairwise update, no sum-of-squares cancellation)."""
    n, mean, m2 = 0, 0.0, 0.0
    for u in utts:
        x = audio.read(u)
        k = len(x)
        if not k:
            continue
        mu = x.mean(0)
        d = mu - mean
        tot = n + k
        mean = mean + d * (k / tot)
        m2 = m2 + ((x - mu) ** 2).sum(0) + d * d * (n * k / tot)
        n = tot
    if n == 0:
        raise ValueError(f"{audio.path}: the train utterances have no audio frames")
    std = np.sqrt(m2 / n)
    return mean, np.where(std > 0, std, 1.0), n


def _file_stats(path, cv, dim):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: statistics file not found (--audio-norm file)")
    with h5py.File(path, "r", locking=False) as f:
        key = str(cv)
        if key not in f or "mean" not in f[key] or "std" not in f[key]:
            raise ValueError(f"{path}: no group '{key}' with datasets mean and std (--cv {cv})")
        mean = np.asarray(f[key]["mean"][()], dtype=np.float64).ravel()
        std = np.asarray(f[key]["std"][()], dtype=np.float64).ravel()
    if mean.shape != (dim,) or std.shape != (dim,):
        raise ValueError(f"{path}: group '{key}': mean/std of shapes {mean.shape}/{std.shape}, the "
                         f"audio features have width {dim}")
    return mean, std


def _fit(x, length, truncate, counts, name):
    """(T, d) float64 -> (length, d) float32, zero-padded (or truncated when allowed)."""
    out = np.zeros((length, x.shape[1]), dtype=np.float32)
    t = min(len(x), length)
    if len(x) > length:
        if not truncate:
            raise AssertionError("length checked before writing")
        counts[name] += 1
    out[:t] = x[:t]
    return out


# ---------------------------------------------------------------------------------------- read


def _check_options(audio_norm, block, lengths):
    if audio_norm not in AUDIO_NORMS:
        raise ValueError(f"--audio-norm must be one of {AUDIO_NORMS}, got {audio_norm!r}")
    if block < 1:
        raise ValueError(f"--block must be >= 1, got {block}")
    for m, n in lengths.items():
        if n < 1:
            raise ValueError(f"--{m}-len must be >= 1, got {n}")


def _feature_paths(raw, names, mods):
    paths = {m: raw / FOLDERS[m] / f"{names[m]}.h5" for m in mods}
    for m, p in paths.items():
        if not p.is_file():
            hint = "; pass --no-vision to convert text and audio only" if m == "vision" else ""
            raise FileNotFoundError(f"{p}: {m} feature file not found{hint}")
    return paths


def _read_targets(target_dir, cv):
    """The fold's three splits -> {prefix: (utterance ids, labels)}; an utterance in two splits
    is an error."""
    if not target_dir.is_dir():
        raise FileNotFoundError(f"{target_dir}: target folder of fold --cv {cv} not found")
    targets = {p: read_targets(target_dir, p) for p in SPLITS}
    seen = {}
    for p, (ids, _) in targets.items():
        for u in ids:
            if u in seen:
                raise ValueError(f"{target_dir / (p + '_int2name.npy')}: utterance {u!r} already listed "
                                 f"in the {seen[u]} split")
            seen[u] = SPLITS[p]
    return targets


def _check_lengths(files, paths, targets, lengths, truncate):
    """Every utterance's shape in every feature file, checked without reading the data ->
    {modality: {utterance: frames}}; a sequence longer than its length is an error unless
    ``truncate``."""
    lens = {m: {} for m in files}
    too_long = {m: [] for m in files}
    for p, (ids, _) in targets.items():
        for u in ids:
            for m, f in files.items():
                lens[m][u] = f.check(u, SPLITS[p])
                if lens[m][u] > lengths[m]:
                    too_long[m].append(u)
    for m in files:
        if too_long[m] and not truncate:
            u = too_long[m][0]
            raise ValueError(f"{paths[m]}: utterance {u!r} has {lens[m][u]} {m} frames, more than "
                             f"--{m}-len {lengths[m]} ({len(too_long[m])} utterance(s) in all); "
                             "pass --truncate to keep the first frames")
    return lens


def _audio_norm(audio_norm, audio, train_utts, stats_path, cv):
    """-> (mean, std or None, None; meta.json's audio_norm entry) for --audio-norm (module doc)."""
    norm = {"method": audio_norm}
    mean = std = None
    if audio_norm == "train":
        mean, std, frames = _fit_train_audio(audio, train_utts)
        norm.update(rule="per-dimension mean / population std over every frame of every train "
                         "utterance (float64); std 0 -> 1", frames=frames)
    elif audio_norm == "file":
        mean, std = _file_stats(stats_path, cv, audio.dim)
        if (std <= 0).any() or not (np.isfinite(mean).all() and np.isfinite(std).all()):
            raise ValueError(f"{stats_path}: group '{cv}': std must be finite and > 0")
        norm.update(rule=f"the release's precomputed statistics of fold {cv}",
                    file=features.abspath(stats_path))
    elif audio_norm == "utt":
        norm["rule"] = "per utterance: (x - mean_t) / std_t (unbiased, std 0 -> 1), the released 'utt'"
    else:
        norm["rule"] = "none: raw features"
    if mean is not None:
        norm["mean"] = [float(v) for v in mean]
        norm["std"] = [float(v) for v in std]
    return mean, std, norm


# --------------------------------------------------------------------------------------- write


def _source(raw, paths, target_dir, options, norm, counts):
    cv = options["cv"]
    return {
        "converter": "data_prep.iemocap", "raw": features.abspath(raw), "cv": cv,
        "files": {m: features.abspath(p) for m, p in paths.items()},
        "targets": features.abspath(target_dir),
        "options": options,
        "audio_norm": norm,
        "padding": "zeros after the last frame (after normalisation); lengths in samples.csv",
        "label": {"rule": "argmax of the one-hot row of {split}_label.npy",
                  "class_order": "ang 0, hap+exc 1, neu 2, sad 3"},
        "class_descriptions": CLASS_DESCRIPTIONS,
        "split": {"rule": f"fold {cv}: trn -> train, val -> val, tst -> test (the release's "
                          "speaker-independent folds)"},
        "counts": counts,
        "sample_id": "running row number over trn, val, tst (0-based)",
    }


def _counts(targets, lens):
    """meta.json source.counts; ``truncated`` is filled while writing."""
    return {"splits": {SPLITS[p]: len(ids) for p, (ids, _) in targets.items()},
            "per_class": {SPLITS[p]: np.bincount(lab, minlength=4).tolist() for p, (_, lab) in targets.items()},
            "truncated": dict.fromkeys(lens, 0),
            "empty": {m: int(sum(1 for t in lens[m].values() if t == 0)) for m in lens},
            "length_max": {m: int(max(lens[m].values())) for m in lens}}


def _normalise_audio(x, mean, std, audio_norm):
    """One utterance's audio (T, d) float64, normalised by --audio-norm."""
    if mean is not None:
        return (x - mean) / std
    if audio_norm == "utt" and len(x):
        mu = x.mean(0)
        sd = x.std(0, ddof=1) if len(x) > 1 else np.zeros_like(mu)
        return (x - mu) / np.where(sd > 0, sd, 1.0)
    return x


def _batches(targets, files, lengths, truncate, norm, block, truncated, log):
    """Each split in blocks of ``block`` utterances: features read, audio normalised
    (``norm`` = (mean, std, method)), every sequence zero-padded (or truncated, counted in
    ``truncated``) to its length."""
    next_id = 0
    for p, (ids, labels) in targets.items():
        split = SPLITS[p]
        for a in range(0, len(ids), block):
            chunk = ids[a:a + block]
            batch = {m: [] for m in files}
            for u in chunk:
                for m, f in files.items():
                    x = _normalise_audio(f.read(u), *norm) if m == "audio" else f.read(u)
                    batch[m].append(_fit(x, lengths[m], truncate, truncated, m))
            arrays = {m: np.stack(v) for m, v in batch.items()}
            arrays["label"] = labels[a:a + block]
            arrays["sample_id"] = np.arange(next_id + a, next_id + a + len(chunk), dtype=np.int64)
            yield split, arrays
        next_id += len(ids)
        log(f"{split}: {len(ids)} samples written")


def _index(targets, lens):
    rows, next_id = [], 0
    for p, (ids, _) in targets.items():
        rows += [[next_id + i, SPLITS[p], u] + [lens[m][u] if m in lens else "" for m in LENGTHS]
                 for i, u in enumerate(ids)]
        next_id += len(ids)
    return {"samples.csv": (["sample_id", "split", "utterance", "text_len", "audio_len", "vision_len"], rows)}


def convert(raw, out, name="iemocap", cv=1, feature_names=None, vision=True, lengths=None,
            truncate=False, audio_norm="train", block=512, samples_per_shard=None, overwrite=False,
            log=None) -> pathlib.Path:
    """Convert IEMOCAP features (layout of the module docstring) into ``<out>/<name>/``."""
    log = log or converter.no_log
    lengths = {**LENGTHS, **(lengths or {})}
    _check_options(audio_norm, block, lengths)
    names = {**DEFAULT_FEATURES, **(feature_names or {})}
    mods = ["text", "audio"] + (["vision"] if vision else [])
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    t0 = time.perf_counter()
    paths = _feature_paths(raw, names, mods)
    target_dir = raw / "target" / str(cv)
    targets = _read_targets(target_dir, cv)
    with contextlib.ExitStack() as stack:
        files = {m: stack.enter_context(contextlib.closing(FeatureFile(paths[m], m))) for m in mods}
        lens = _check_lengths(files, paths, targets, lengths, truncate)   # before anything is written
        mean, std, norm = _audio_norm(audio_norm, files["audio"], targets["trn"][0],
                                      raw / FOLDERS["audio"] / f"{names['audio']}_mean_std.h5", cv)
        dims = {m: files[m].dim for m in mods}
        log(f"checked {sum(len(ids) for ids, _ in targets.values())} utterances; widths {dims}; "
            f"audio norm {audio_norm} ({time.perf_counter() - t0:.1f}s)")

        options = {"cv": cv, "features": {m: names[m] for m in mods}, "vision": vision,
                   "lengths": {m: lengths[m] for m in mods}, "truncate": truncate, "audio_norm": audio_norm}
        counts = _counts(targets, lens)
        meta = converter.Meta("classification", len(CLASS_NAMES),
                              {m: {"kind": "sequence", "shape": [lengths[m], dims[m]], "dtype": "float32"}
                               for m in mods},
                              _source(raw, paths, target_dir, options, norm, counts), class_names=CLASS_NAMES)
        batches = _batches(targets, files, lengths, truncate, (mean, std, audio_norm), block,
                           counts["truncated"], log)
        return converter.write(out, name, meta, batches, lambda: _index(targets, lens),
                               samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0)


# ---------------------------------------------------------------------------------------- CLI


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="feature root (L/, A/, V/, target/)")
    parser.add_argument("--cv", type=int, default=1, help="cross-validation fold (target/<cv>/)")
    for m in ("text", "audio", "vision"):
        parser.add_argument(f"--{m}-feature", default=DEFAULT_FEATURES[m],
                            help=f"{FOLDERS[m]}/<name>.h5 (default {DEFAULT_FEATURES[m]})")
        parser.add_argument(f"--{m}-len", type=int, default=LENGTHS[m],
                            help=f"{m} frames after padding (default {LENGTHS[m]})")
    parser.add_argument("--no-vision", action="store_true", help="text and audio only")
    parser.add_argument("--truncate", action="store_true",
                        help="cut sequences longer than their length (default: error)")
    parser.add_argument("--audio-norm", choices=AUDIO_NORMS, default="train",
                        help="train: fit mean/std on train (default); file: the release's "
                             "<audio>_mean_std.h5; utt: per utterance; none")
    parser.add_argument("--block", type=int, default=512, help="utterances written per batch")


def _options(args):
    """The parsed options as convert's keywords: per-modality feature names and lengths as dicts."""
    options = vars(args)
    options["feature_names"] = {m: options.pop(f"{m}_feature") for m in ("text", "audio", "vision")}
    options["lengths"] = {m: options.pop(f"{m}_len") for m in ("text", "audio", "vision")}
    options["vision"] = not options.pop("no_vision")
    return options


def main(argv=None):
    return converter.main(argv, prog="iemocap", doc=__doc__, arguments=_arguments, convert=convert,
                          options=_options, name_default="iemocap", name_help="dataset name (default iemocap)")


if __name__ == "__main__":
    sys.exit(main())
