"""Kinetics-Sounds -> shards: IGM's audio-visual action task (31 classes, audio + 3 frames).

CLI:
  python -m data_prep.kinetics_sounds --raw DIR --out DIR [--name kinetics_sounds]
      [--clip-column COL] [--min-frames 4] [--val-frac 0.1] [--seed 0] [--frames 3]
      [--image-size 224] [--crop none|center] [--workers N] [--block 64] [--samples-per-shard N]
      [--overwrite]

Raw layout (under --raw, as the released loaders read it):
  annotations/train.csv, test.csv     a header row; `label` (the class name) and a clip column
  train_wav/<clip>.wav, test_wav/<clip>.wav
  train_img/Image-01-FPS/<clip>/*.jpg, test_img/Image-01-FPS/<clip>/*.jpg

Clip column: --clip-column (the same name in both files), else, per file, the first of `clip`,
`youtube_id`, `id` that its header has (the released loader reads the Kinetics CSV columns `label`
and `youtube_id`); a file without `label` or
without a clip column is an error naming the file and the column. A row's clip directory is found
by the first rule that names an existing frame directory or wav file:
  1. the column value itself (<clip>/, <clip>.wav);
  2. with `time_start` and `time_end` columns (Kinetics CSVs): <value>_<start:06d>_<end:06d>, the
     name the Kinetics downloaders give a clip;
  3. the one frame directory whose name minus its last two '_' fields is the value (the released
     loader maps directories to youtube ids by name.rsplit('_', 2)[0]); several such directories
     are an error naming the file, the line and the candidates.
The wav is <wav root>/<clip directory name>.wav, else <wav root>/<value>.wav.

Skipped clips (the released rule; counted in meta.json source.counts.skipped, split by reason): no
wav file ("missing_audio"), no frame directory ("missing_frames"), or fewer than --min-frames
*.jpg files (default 4, i.e. <= 3 frames: "too_few_frames"). A row repeating a clip with the same
label is dropped ("duplicate_rows"); with another label, or a clip in both files, it is an error
naming the files and lines. An empty label is an error naming the file and line.

Output <out>/<name>/ (default name kinetics_sounds):
  audio  kind spectrogram float32 [257, 1003]: 35,400 Hz, tiled to 10 s, clipped to [-1, 1], STFT
         n_fft 512 hop 353 (centred, reflect, periodic Hann), log(|S| + 1e-7); see data_prep.audio
  video  kind frames uint8 [3, 3, S, S] (k = --frames, default 3; S = --image-size, default 224):
         k frames evenly spaced over the clip's sorted frame files (segment centres). The released
         loader takes the first k files in directory order; this converter samples properly.
         ImageNet normalisation and train-time augmentation are the training side's job.
  label  index of the class name in class_names = the sorted distinct labels of both CSV files
         (Python string order; the released loader numbers classes in directory-listing order)
  samples.csv  sample_id, split, clip, label, value of the clip column
meta.json `source` records the options, the clip column, skip counts per split and reason, the
split rule, fraction and seed, and audio statistics.

Choices the paper and the released loader leave open:
- sample_id = the row's position among the data rows of train.csv followed by test.csv (0-based);
  skipped rows leave gaps, so ids do not depend on which files are present.
- test = test.csv (kept clips); val = --val-frac of the kept train.csv clips, stratified per class
  (floor(frac*n_c) topped up by largest remainder to ceil(frac*N), >= 1 per class with >= 2 clips;
  class indices permuted with numpy default_rng([seed, 1])); train = the rest.
"""
from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from data_prep import converter
from data_prep.audio import (add_av_args, av_batches, check_common, list_frames, modalities_spec,
                             num_frames, pick_frames, recipe)
from data_prep.image_io import CsvColumnError, csv_header, read_csv, to_float

ANNOTATIONS = "annotations"
SPLIT_FILES = (("train", "train.csv"), ("test", "test.csv"))
LABEL_COLUMN = "label"
CLIP_COLUMNS = ("clip", "youtube_id", "id")
FRAME_DIR = "Image-01-FPS"
SAMPLE_RATE = 35400
SECONDS = 10.0
MIN_FRAMES = 4            # the released loader keeps a clip only with > 3 frame files
SEED = 0


def clip_column(path, wanted=None):
    """The clip column of annotation CSV ``path`` (see module doc); CsvColumnError names the file."""
    header = csv_header(path)
    if LABEL_COLUMN not in header:
        raise CsvColumnError(f"{path}: missing column '{LABEL_COLUMN}' (header has {header})")
    if wanted:
        if wanted not in header:
            raise CsvColumnError(f"{path}: missing column '{wanted}' (--clip-column; header has {header})")
        return wanted, header
    for c in CLIP_COLUMNS:
        if c in header:
            return c, header
    raise CsvColumnError(f"{path}: no clip column: expected one of {', '.join(CLIP_COLUMNS)} "
                         f"(or pass --clip-column; header has {header})")


def _time(text):
    v = to_float(text)
    return int(v) if v is not None and v == int(v) and v >= 0 else None


class _Resolver:
    """Maps a CSV clip value to the clip's frame directory name in one split (see module doc)."""

    def __init__(self, img_root, wav_root):
        self.img_root, self.wav_root = pathlib.Path(img_root), pathlib.Path(wav_root)
        self._by_prefix = None

    def _prefix_index(self):
        if self._by_prefix is None:
            self._by_prefix = {}
            if self.img_root.is_dir():
                for entry in sorted(p.name for p in self.img_root.iterdir()):
                    parts = entry.rsplit("_", 2)
                    if len(parts) == 3:
                        self._by_prefix.setdefault(parts[0], []).append(entry)
        return self._by_prefix

    def _exists(self, name):
        return (self.img_root / name).is_dir() or (self.wav_root / f"{name}.wav").is_file()

    def resolve(self, value, start, end, where):
        if self._exists(value):
            return value
        if start is not None and end is not None:
            name = f"{value}_{start:06d}_{end:06d}"
            if self._exists(name):
                return name
        found = self._prefix_index().get(value, [])
        if len(found) > 1:
            raise ValueError(f"{where}: clip {value!r} matches several frame directories in "
                             f"{self.img_root}: {found[:5]}")
        return found[0] if found else value

    def wav(self, clip, value):
        path = self.wav_root / f"{clip}.wav"
        if not path.is_file() and clip != value and (self.wav_root / f"{value}.wav").is_file():
            path = self.wav_root / f"{value}.wav"
        return path


# ---------------------------------------------------------------------------------------- read


def _row_values(row, col, where):
    """-> (clip value, label) of one annotation row; both must be non-empty."""
    value, label = row[col], row[LABEL_COLUMN]
    if not value:
        raise ValueError(f"{where}: column '{col}' is empty")
    if not label:
        raise ValueError(f"{where}: column '{LABEL_COLUMN}' is empty")
    return value, label


def _listed_before(seen, clip, split, label, where):
    """True for a repeated row of ``clip`` (same split and label: skipped and counted); a clip in
    both files or with two labels is an error."""
    if clip not in seen:
        seen[clip] = (split, label, where)
        return False
    prev_split, prev_label, prev_where = seen[clip]
    if prev_split != split:
        raise ValueError(f"{where}: clip {clip!r} is also listed in {prev_where} "
                         "(train and test must not share clips)")
    if prev_label != label:
        raise ValueError(f"{where}: clip {clip!r} has label {label!r} but "
                         f"{prev_where} says {prev_label!r}")
    return True


def _read_rows(raw, csv_paths, columns):
    """Every data row of both CSV files -> (clips [sample_id, split, value, clip, label, resolver]
    in row order, number of rows, duplicate rows); sample_id = the row's position."""
    rows, seen, dup_rows, sid = [], {}, 0, -1
    for s, path in csv_paths.items():
        col, header = columns[s]
        timed = "time_start" in header and "time_end" in header
        resolver = _Resolver(raw / f"{s}_img" / FRAME_DIR, raw / f"{s}_wav")
        for line, row in read_csv(path, (col, LABEL_COLUMN), ("time_start", "time_end") if timed else ()):
            sid += 1
            where = f"{path}, line {line}"
            value, label = _row_values(row, col, where)
            times = (_time(row["time_start"]), _time(row["time_end"])) if timed else (None, None)
            clip = resolver.resolve(value, *times, where)
            if _listed_before(seen, clip, s, label, where):
                dup_rows += 1
                continue
            rows.append([sid, s, value, clip, label, resolver])
    if not rows:
        raise ValueError(f"{raw}: the annotation files list no clips")
    return rows, sid + 1, dup_rows


def _keep_clips(rows, splits, min_frames, frames):
    """The clips with a wav and >= min_frames frame files -> (kept [(sample_id, split, value, clip,
    label, wav, chosen frames)], skipped counts per split and reason)."""
    skipped = {s: {"missing_audio": 0, "missing_frames": 0, "too_few_frames": 0} for s in splits}
    kept = []
    for sid, s, value, clip, label, resolver in rows:
        wav = resolver.wav(clip, value)
        if not wav.is_file():
            skipped[s]["missing_audio"] += 1
            continue
        try:
            files = list_frames(resolver.img_root / clip)
        except FileNotFoundError:
            skipped[s]["missing_frames"] += 1
            continue
        if len(files) < min_frames:
            skipped[s]["too_few_frames"] += 1
            continue
        kept.append((sid, s, value, clip, label, wav, pick_frames(files, frames)))
    return kept, skipped


# --------------------------------------------------------------------------------------- split


def _split(raw, kept, labels, classes, skipped, val_frac, seed, log):
    """-> (split -> sample ids, sorted; the classes without a train clip)."""
    tr = np.array([k[0] for k in kept if k[1] == "train"], dtype=np.int64)
    te = np.array([k[0] for k in kept if k[1] == "test"], dtype=np.int64)
    if not len(tr) or not len(te):
        raise ValueError(f"{raw}: no {'train' if not len(tr) else 'test'} clip left after the skip "
                         f"rules (skipped: {skipped})")
    train, val = converter.carve_val(tr, labels, val_frac, seed)
    order = {s: np.sort(idx) for s, idx in {"train": train, "val": val, "test": te}.items() if len(idx)}
    in_train = set(labels[order["train"]].tolist())
    missing_in_train = [c for i, c in enumerate(classes) if i not in in_train]
    if missing_in_train:
        log(f"warning: classes without a train clip: {missing_in_train}")
    return order, missing_in_train


# --------------------------------------------------------------------------------------- write


def _source(raw, csv_paths, columns, options, counts):
    min_frames, seed, val_frac = options["min_frames"], options["seed"], options["val_frac"]
    return {
        "converter": "data_prep.kinetics_sounds", "raw": str(raw),
        "annotations": {s: str(p) for s, p in csv_paths.items()},
        "clip_column": {s: c for s, (c, _) in columns.items()},
        "options": options,
        "label": {"column": LABEL_COLUMN, "class_order": "sorted distinct labels of both CSV files"},
        **recipe(SAMPLE_RATE, SECONDS, options["frames"], options["image_size"], options["crop"]),
        "skip_rule": f"no wav, no frame directory, or fewer than {min_frames} *.jpg frames",
        "split": {"rule": "test = annotations/test.csv; val = val_frac of the kept train.csv clips, "
                          "stratified per class (floor(frac*n_c) topped up by largest remainder to "
                          "ceil(frac*N), >= 1 per class with >= 2 clips; class indices permuted "
                          "with numpy default_rng([seed, 1])); train = the rest",
                  "seed": seed, "val_frac": val_frac},
        "counts": counts,
        "sample_id": "position of the row among the data rows of train.csv then test.csv (0-based)",
    }


def _index(kept, order):
    split_of = {int(i): s for s, idx in order.items() for i in idx}
    return {"samples.csv": (["sample_id", "split", "clip", "label", "annotation_value"],
                            [[k[0], split_of[k[0]], k[3], k[4], k[2]] for k in sorted(kept, key=lambda k: k[0])])}


def convert(raw, out, name="kinetics_sounds", clip_col=None, min_frames=MIN_FRAMES, val_frac=0.1,
            seed=SEED, frames=3, image_size=224, crop="none", workers=0, block=64,
            samples_per_shard=None, overwrite=False, log=None) -> pathlib.Path:
    """Convert a Kinetics-Sounds directory into ``<out>/<name>/`` (see the module docstring)."""
    log = log or converter.no_log
    check_common(frames, image_size, val_frac, block, workers)
    if min_frames < 1:
        raise ValueError(f"--min-frames must be >= 1, got {min_frames}")
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    t0 = time.perf_counter()
    csv_paths = {s: raw / ANNOTATIONS / f for s, f in SPLIT_FILES}
    columns = {s: clip_column(p, clip_col) for s, p in csv_paths.items()}   # both headers first
    rows, n_rows, dup_rows = _read_rows(raw, csv_paths, columns)
    classes = sorted({r[4] for r in rows})
    kept, skipped = _keep_clips(rows, csv_paths, min_frames, frames)
    log(f"{n_rows} rows, {len(kept)} clips kept; skipped {skipped}, duplicate rows {dup_rows}")

    class_index = {c: i for i, c in enumerate(classes)}
    labels = np.full(n_rows, -1, dtype=np.int64)
    labels[[k[0] for k in kept]] = [class_index[k[4]] for k in kept]
    order, missing_in_train = _split(raw, kept, labels, classes, skipped, val_frac, seed, log)
    log(f"{len(classes)} classes; splits { {s: len(i) for s, i in order.items()} }")

    options = {"clip_column": clip_col, "min_frames": min_frames, "val_frac": val_frac,
               "seed": seed, "frames": frames, "image_size": image_size, "crop": crop}
    counts = {"rows": n_rows, "duplicate_rows": dup_rows, "skipped": skipped,
              "kept": len(kept), "splits": {s: int(len(i)) for s, i in order.items()},
              "classes_without_train_clips": missing_in_train,
              "per_class": {s: np.bincount(labels[i], minlength=len(classes)).tolist()
                            for s, i in order.items()}}
    meta = converter.Meta("classification", len(classes),
                          modalities_spec(num_frames(int(round(SAMPLE_RATE * SECONDS))), frames, image_size),
                          _source(raw, csv_paths, columns, options, counts), class_names=classes)
    clips = {k[0]: (k[5], k[6]) for k in kept}
    batches = av_batches(order, clips, labels, np.arange(n_rows, dtype=np.int64), counts,
                         SAMPLE_RATE, SECONDS, image_size, crop, workers, block, log)
    return converter.write(out, name, meta, batches, lambda: _index(kept, order),
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0)


# ---------------------------------------------------------------------------------------- CLI


def _arguments(parser):
    parser.add_argument("--raw", required=True,
                        help="Kinetics-Sounds root (annotations/, {train,test}_wav/, {train,test}_img/)")
    add_av_args(parser, frames=3, image_size=224, seed=SEED)
    parser.add_argument("--clip-column", dest="clip_col", metavar="CLIP_COLUMN",
                        help=f"clip column of the CSVs (default: first of {CLIP_COLUMNS})")
    parser.add_argument("--min-frames", type=int, default=MIN_FRAMES,
                        help="skip clips with fewer frame files (released rule: > 3 frames)")


def main(argv=None):
    return converter.main(argv, prog="kinetics_sounds", doc=__doc__, arguments=_arguments, convert=convert,
                          name_default="kinetics_sounds", name_help="dataset name (default kinetics_sounds)")


if __name__ == "__main__":
    sys.exit(main())
