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

import argparse
import pathlib
import sys
import time

import numpy as np

from data_prep.audio import (ClipLoader, add_av_args, check_common, list_frames, modalities_spec,
                             num_frames, pick_frames, recipe, write_av_splits)
from data_prep.image_io import CsvColumnError, csv_header, read_csv, stratified_pick, to_float, write_index
from data_prep.shards import ShardWriter

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


def convert(raw, out, name="kinetics_sounds", clip_col=None, min_frames=MIN_FRAMES, val_frac=0.1,
            seed=SEED, frames=3, image_size=224, crop="none", workers=0, block=64,
            samples_per_shard=None, overwrite=False, log=None) -> pathlib.Path:
    """Convert a Kinetics-Sounds directory into ``<out>/<name>/`` (see the module docstring)."""
    log = log or (lambda msg: None)
    check_common(frames, image_size, val_frac, block, workers)
    if min_frames < 1:
        raise ValueError(f"--min-frames must be >= 1, got {min_frames}")
    raw = pathlib.Path(raw)
    t0 = time.perf_counter()
    csv_paths = {s: raw / ANNOTATIONS / f for s, f in SPLIT_FILES}
    columns = {s: clip_column(p, clip_col) for s, p in csv_paths.items()}   # both headers first

    # 1. annotation rows -> clips
    rows = []          # (sample_id, split, value, clip, label, line)
    seen, dup_rows, skipped = {}, 0, {}
    sid = -1
    for s, path in csv_paths.items():
        col, header = columns[s]
        timed = "time_start" in header and "time_end" in header
        resolver = _Resolver(raw / f"{s}_img" / FRAME_DIR, raw / f"{s}_wav")
        skipped[s] = {"missing_audio": 0, "missing_frames": 0, "too_few_frames": 0}
        optional = ("time_start", "time_end") if timed else ()
        for line, row in read_csv(path, (col, LABEL_COLUMN), optional):
            sid += 1
            value, label = row[col], row[LABEL_COLUMN]
            where = f"{path}, line {line}"
            if not value:
                raise ValueError(f"{where}: column '{col}' is empty")
            if not label:
                raise ValueError(f"{where}: column '{LABEL_COLUMN}' is empty")
            start = _time(row["time_start"]) if timed else None
            end = _time(row["time_end"]) if timed else None
            clip = resolver.resolve(value, start, end, where)
            if clip in seen:
                prev_split, prev_label, prev_where = seen[clip]
                if prev_split != s:
                    raise ValueError(f"{where}: clip {clip!r} is also listed in {prev_where} "
                                     "(train and test must not share clips)")
                if prev_label != label:
                    raise ValueError(f"{where}: clip {clip!r} has label {label!r} but "
                                     f"{prev_where} says {prev_label!r}")
                dup_rows += 1
                continue
            seen[clip] = (s, label, where)
            rows.append([sid, s, value, clip, label, resolver])
    n_rows = sid + 1
    if not rows:
        raise ValueError(f"{raw}: the annotation files list no clips")
    classes = sorted({r[4] for r in rows})
    class_index = {c: i for i, c in enumerate(classes)}

    # 2. files and skip rules
    kept = []          # (sample_id, split, value, clip, label, wav, chosen frames)
    for sid_, s, value, clip, label, resolver in rows:
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
        kept.append((sid_, s, value, clip, label, wav, pick_frames(files, frames)))
    log(f"{n_rows} rows, {len(kept)} clips kept; skipped {skipped}, duplicate rows {dup_rows}")
    labels_all = np.full(n_rows, -1, dtype=np.int64)
    clips_all = [None] * n_rows
    for k in kept:
        labels_all[k[0]] = class_index[k[4]]
        clips_all[k[0]] = (k[5], k[6])
    tr = np.array([k[0] for k in kept if k[1] == "train"], dtype=np.int64)
    te = np.array([k[0] for k in kept if k[1] == "test"], dtype=np.int64)
    if not len(tr) or not len(te):
        raise ValueError(f"{raw}: no {'train' if not len(tr) else 'test'} clip left after the skip "
                         f"rules (skipped: {skipped})")

    # 3. split
    val_mask = stratified_pick(labels_all[tr], val_frac, np.random.default_rng([seed, 1]),
                               min_picked=1 if val_frac > 0 else 0, min_left=1)
    order = {"train": tr[~val_mask], "val": tr[val_mask], "test": te}
    order = {s: np.sort(idx) for s, idx in order.items() if len(idx)}
    missing_in_train = [c for c in classes if class_index[c] not in set(labels_all[order["train"]].tolist())]
    if missing_in_train:
        log(f"warning: classes without a train clip: {missing_in_train}")
    log(f"{len(classes)} classes; splits { {s: len(i) for s, i in order.items()} }")

    n = int(round(SAMPLE_RATE * SECONDS))
    modalities = modalities_spec(num_frames(n), frames, image_size)
    source = {
        "converter": "data_prep.kinetics_sounds", "raw": str(raw),
        "annotations": {s: str(p) for s, p in csv_paths.items()},
        "clip_column": {s: c for s, (c, _) in columns.items()},
        "options": {"clip_column": clip_col, "min_frames": min_frames, "val_frac": val_frac,
                    "seed": seed, "frames": frames, "image_size": image_size, "crop": crop},
        "label": {"column": LABEL_COLUMN, "class_order": "sorted distinct labels of both CSV files"},
        **recipe(SAMPLE_RATE, SECONDS, frames, image_size, crop),
        "skip_rule": f"no wav, no frame directory, or fewer than {min_frames} *.jpg frames",
        "split": {"rule": "test = annotations/test.csv; val = val_frac of the kept train.csv clips, "
                          "stratified per class (floor(frac*n_c) topped up by largest remainder to "
                          "ceil(frac*N), >= 1 per class with >= 2 clips; class indices permuted "
                          "with numpy default_rng([seed, 1])); train = the rest",
                  "seed": seed, "val_frac": val_frac},
        "counts": {"rows": n_rows, "duplicate_rows": dup_rows, "skipped": skipped,
                   "kept": len(kept), "splits": {s: int(len(i)) for s, i in order.items()},
                   "classes_without_train_clips": missing_in_train,
                   "per_class": {s: np.bincount(labels_all[i], minlength=len(classes)).tolist()
                                 for s, i in order.items()}},
        "sample_id": "position of the row among the data rows of train.csv then test.csv (0-based)",
    }
    sample_ids = np.arange(n_rows, dtype=np.int64)
    with ShardWriter(out, name, "classification", len(classes), modalities,
                     samples_per_shard=samples_per_shard, class_names=classes, source=source,
                     overwrite=overwrite) as writer:
        with ClipLoader(SAMPLE_RATE, SECONDS, image_size, crop, workers, block) as loader:
            stats = write_av_splits(writer, loader, order, clips_all, labels_all, sample_ids, log=log)
        writer.meta["source"]["counts"]["audio"] = stats.as_dict()
    split_of = {int(i): s for s, idx in order.items() for i in idx}
    write_index(writer.root, ["sample_id", "split", "clip", "label", "annotation_value"],
                [[k[0], split_of[k[0]], k[3], k[4], k[2]] for k in sorted(kept, key=lambda k: k[0])])
    log(f"wrote {writer.root} in {time.perf_counter() - t0:.1f}s")
    return writer.root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True,
                        help="Kinetics-Sounds root (annotations/, {train,test}_wav/, {train,test}_img/)")
    add_av_args(parser, "dataset name (default kinetics_sounds)", frames=3, image_size=224, seed=SEED)
    parser.add_argument("--clip-column", help=f"clip column of the CSVs (default: first of {CLIP_COLUMNS})")
    parser.add_argument("--min-frames", type=int, default=MIN_FRAMES,
                        help="skip clips with fewer frame files (released rule: > 3 frames)")
    args = parser.parse_args(argv)
    convert(args.raw, args.out, name=args.name or "kinetics_sounds", clip_col=args.clip_column,
            min_frames=args.min_frames, val_frac=args.val_frac, seed=args.seed, frames=args.frames,
            image_size=args.image_size, crop=args.crop, workers=args.workers, block=args.block,
            samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
            log=lambda msg: print(f"[kinetics_sounds] {msg}", file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
