"""CREMA-D -> shards: IGM's audio-visual emotion task (6 classes, audio spectrogram + video frames).

CLI:
  python -m data_prep.crema_d --raw DIR --out DIR [--name crema_d] [--split released|actor]
      [--val-frac 0.1] [--test-frac 0.1] [--seed 0] [--frames 1] [--image-size 224]
      [--crop none|center] [--skip-missing] [--workers N] [--block 64] [--samples-per-shard N]
      [--overwrite]

Raw layout (under --raw, as the released loaders read it):
  AudioWAV/<clip>.wav               any sample rate, int or float samples, mono or several channels
  Image-01-FPS/<clip>/*.jpg         extracted frames (1 fps)
  annotations/train.csv, test.csv   one row per clip: clip name, emotion code (ANG DIS FEA HAP NEU
                                    SAD); further columns are ignored
A missing wav file, frame directory, or a frame directory without *.jpg files is an error naming
the paths (--skip-missing: drop those clips and count them in meta.json source.counts.dropped).
The released loaders skip such clips silently.

CSV header rule: the released files have no header (the loader reads every row with csv.reader).
The first non-blank row is taken as a header, and skipped, exactly when its second field is not one
of the six emotion codes and its first field does not look like a clip name (third '_' field an
emotion code), e.g. "clip,emotion"; so a first data row with a bad code is an error, not a lost
row. The clip is always column 1 and the code column 2, whatever the header says. Every other row needs at least 2 fields and a valid code, else an error
names the file, the line and the column. Values are stripped; a UTF-8 BOM is ignored.

Output <out>/<name>/ (default name crema_d, or crema_d_actor with --split actor):
  audio  kind spectrogram float32 [257, 188]: 22,050 Hz, tiled to 3 s, clipped to [-1, 1], STFT
         n_fft 512 hop 353 (centred, reflect, periodic Hann), log(|S| + 1e-7); see data_prep.audio
  video  kind frames uint8 [k, 3, S, S] (k = --frames, default 1; S = --image-size, default 224):
         k frames evenly spaced over the clip's sorted frame files (segment centres; k=1: the
         middle frame). The released loader ignores its own frame sampling and takes the first
         files in directory order; this converter samples properly. ImageNet mean/std
         normalisation and the train-time RandomResizedCrop + flip are the training side's job.
  label  index in NEU HAP SAD FEA DIS ANG (class_names = the codes): the class order of the
         released CREMA-D loaders (class_dict in OGM-GE's CramedDataset), which the paper does not
         fix; source.class_descriptions names the emotions.
  samples.csv  sample_id, split, clip, emotion, actor
meta.json `source` records the options, the detected CSV headers, drop counts, the split rule,
fractions and seed (and the actors of each split with --split actor), and audio statistics.

Choices the paper and the released loader leave open:
- The emotion code of a row must equal the third '_'-separated field of its clip name
  (1001_DFA_ANG_XX -> ANG); a mismatch, a clip name with fewer than 3 fields, a clip listed twice
  (in one file or in both) is an error naming the clip, the file and the line.
- sample_id = the row's position among the data rows of train.csv followed by test.csv (0-based),
  so a clip keeps its id under both split modes and with --skip-missing.
- --split released (default): test = test.csv; val = --val-frac of train.csv carved out
  stratified per class (per class floor(frac*n_c), topped up by largest remainder to ceil(frac*N),
  at least 1 per class with >= 2 clips; class indices permuted by numpy default_rng([seed, 1]));
  train = the rest. The widely used lists put the same actors in train and test.
- --split actor: the released lists are pooled and re-split by actor (actor id = first field of
  the clip name, e.g. 1001). The actors, in numeric order, are permuted by default_rng([seed, 2]);
  test = the first ceil(test_frac * A) actors, val = the next ceil(val_frac * (A - n_test)),
  train = the rest: train, val and test are pairwise actor-disjoint (val too, so that model
  selection sees unseen speakers as test does). Needs >= 3 actors. Not stratified by emotion:
  every CREMA-D actor records all six emotions.
- Audio statistics (source sample rates, tiled clips) are recorded in source.counts.audio.
"""
from __future__ import annotations

import argparse
import csv
import math
import pathlib
import sys
import time

import numpy as np

from data_prep.audio import (ClipLoader, add_av_args, check_common, list_frames, missing_message,
                             modalities_spec, num_frames, pick_frames, recipe, write_av_splits)
from data_prep.dvm import natural_key
from data_prep.image_io import stratified_pick, write_index
from data_prep.shards import ShardWriter

AUDIO_DIR = "AudioWAV"
FRAME_DIR = "Image-01-FPS"
ANNOTATIONS = "annotations"
SPLIT_FILES = (("train", "train.csv"), ("test", "test.csv"))
CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")     # released class_dict order
DESCRIPTIONS = {"NEU": "neutral", "HAP": "happy", "SAD": "sad", "FEA": "fear", "DIS": "disgust",
                "ANG": "anger"}
SAMPLE_RATE = 22050
SECONDS = 3.0
SPLITS = ("released", "actor")
SEED = 0


def _looks_like_clip(text):
    parts = text.split("_")
    return len(parts) >= 3 and parts[2] in CLASSES


def read_annotations(path):
    """-> (rows [(line, clip, code)], header or None) of one CREMA-D split list (see module doc)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation CSV not found")
    rows, header, first = [], None, True
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                fields = [v.strip() for v in row]
                if not fields or not any(fields):
                    continue   # blank line
                line = reader.line_num
                if first:
                    first = False
                    code_ok = len(fields) >= 2 and fields[1] in CLASSES
                    if not code_ok and not _looks_like_clip(fields[0]):
                        header = fields
                        continue
                if len(fields) < 2 or not fields[1]:
                    raise ValueError(f"{path}, line {line}: column 2 (emotion code) is missing; "
                                     "expected rows 'clip,emotion' with a code in "
                                     f"{' '.join(CLASSES)}")
                clip, code = fields[0], fields[1]
                if not clip:
                    raise ValueError(f"{path}, line {line}: column 1 (clip) is empty")
                if code not in CLASSES:
                    raise ValueError(f"{path}, line {line}: column 2 (emotion code) = {code!r} is not "
                                     f"one of {' '.join(CLASSES)}")
                rows.append((line, clip, code))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows, header


def _check_clip(path, line, clip, code):
    """-> actor id; the clip name's emotion field must equal the annotated code."""
    fields = clip.split("_")
    if len(fields) < 3:
        raise ValueError(f"{path}, line {line}: clip {clip!r} is not a CREMA-D name "
                         "(<actor>_<sentence>_<emotion>_<level>)")
    if fields[2] != code:
        raise ValueError(f"{path}, line {line}: clip {clip!r}: emotion code {code!r} in column 2 "
                         f"does not match {fields[2]!r} in the file name")
    return fields[0]


def _actor_split(actors, test_frac, val_frac, seed):
    """actor -> split name (see module doc)."""
    uniq = sorted(set(actors), key=natural_key)
    a = len(uniq)
    if a < 3:
        raise ValueError(f"--split actor needs at least 3 actors, found {a}: {uniq}")
    n_test = min(a - 2, max(1, math.ceil(test_frac * a - 1e-9)))
    n_val = min(a - n_test - 1, max(1, math.ceil(val_frac * (a - n_test) - 1e-9))) if val_frac > 0 else 0
    perm = [uniq[i] for i in np.random.default_rng([seed, 2]).permutation(a)]
    split = dict.fromkeys(perm[:n_test], "test")
    split.update(dict.fromkeys(perm[n_test:n_test + n_val], "val"))
    split.update(dict.fromkeys(perm[n_test + n_val:], "train"))
    return split


def convert(raw, out, name=None, split="released", val_frac=0.1, test_frac=0.1, seed=SEED, frames=1,
            image_size=224, crop="none", skip_missing=False, workers=0, block=64,
            samples_per_shard=None, overwrite=False, log=None) -> pathlib.Path:
    """Convert a CREMA-D directory into ``<out>/<name>/`` (see the module docstring)."""
    log = log or (lambda msg: None)
    check_common(frames, image_size, val_frac, block, workers)
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if not 0 < test_frac < 1:
        raise ValueError(f"--test-frac must be in (0, 1), got {test_frac}")
    raw = pathlib.Path(raw)
    name = name or ("crema_d" if split == "released" else "crema_d_actor")
    t0 = time.perf_counter()

    # 1. annotations (all errors before any file is touched)
    csv_paths = {s: raw / ANNOTATIONS / f for s, f in SPLIT_FILES}
    clips, codes, actors, listed, where, headers = [], [], [], [], {}, {}
    for s, path in csv_paths.items():
        rows, headers[s] = read_annotations(path)
        for line, clip, code in rows:
            actor = _check_clip(path, line, clip, code)
            if clip in where:
                raise ValueError(f"{path}, line {line}: clip {clip!r} already listed in {where[clip]}")
            where[clip] = f"{path}, line {line}"
            clips.append(clip)
            codes.append(code)
            actors.append(actor)
            listed.append(s)
    n_rows = len(clips)

    # 2. files
    wavs = [raw / AUDIO_DIR / f"{c}.wav" for c in clips]
    dirs = [raw / FRAME_DIR / c for c in clips]
    frame_files, problems = [], {"missing_wav": [], "missing_frame_dir": [], "no_frames": []}
    for i in range(n_rows):
        if not wavs[i].is_file():
            problems["missing_wav"].append(i)
        try:
            files = list_frames(dirs[i])
        except FileNotFoundError:
            files = None
            problems["missing_frame_dir"].append(i)
        if files is not None and not files:
            problems["no_frames"].append(i)
        frame_files.append(files)
    bad = sorted(set().union(*problems.values()))
    if bad and not skip_missing:
        parts = []
        if problems["missing_wav"]:
            parts.append(missing_message("wav file(s)", [wavs[i] for i in problems["missing_wav"]]))
        if problems["missing_frame_dir"]:
            parts.append(missing_message("frame directory(ies)",
                                         [dirs[i] for i in problems["missing_frame_dir"]]))
        if problems["no_frames"]:
            parts.append(missing_message("*.jpg frames in directory(ies)",
                                         [dirs[i] for i in problems["no_frames"]]))
        raise FileNotFoundError(f"{raw} (CREMA-D): " + "; ".join(parts)
                                + "; pass --skip-missing to drop those clips instead")
    for i in bad:
        log(f"skipping {clips[i]}: wav or frames missing")
    keep = np.ones(n_rows, dtype=bool)
    keep[bad] = False
    kept = np.nonzero(keep)[0]
    if not len(kept):
        raise ValueError(f"{raw}: no clip left after dropping missing files")

    # 3. split
    class_index = {c: i for i, c in enumerate(CLASSES)}
    labels = np.array([class_index[c] for c in codes], dtype=np.int64)
    split_info = {"mode": split, "seed": seed, "val_frac": val_frac}
    if split == "released":
        tr = kept[[listed[i] == "train" for i in kept]]
        te = kept[[listed[i] == "test" for i in kept]]
        if not len(tr) or not len(te):
            raise ValueError(f"{raw}: no {'train' if not len(tr) else 'test'} clip left")
        val_mask = stratified_pick(labels[tr], val_frac, np.random.default_rng([seed, 1]),
                                   min_picked=1 if val_frac > 0 else 0, min_left=1)
        order = {"train": tr[~val_mask], "val": tr[val_mask], "test": te}
        split_info["rule"] = ("test = annotations/test.csv; val = val_frac of annotations/train.csv, "
                              "stratified per class (floor(frac*n_c) topped up by largest remainder "
                              "to ceil(frac*N), >= 1 per class with >= 2 clips; class indices "
                              "permuted with numpy default_rng([seed, 1])); train = the rest")
    else:
        of_actor = _actor_split([actors[i] for i in kept], test_frac, val_frac, seed)
        order = {s: kept[[of_actor[actors[i]] == s for i in kept]] for s in ("train", "val", "test")}
        split_info["test_frac"] = test_frac
        split_info["rule"] = ("train.csv and test.csv pooled; actors (first field of the clip name) "
                              "in numeric order permuted with numpy default_rng([seed, 2]); test = "
                              "first ceil(test_frac*A) actors, val = next ceil(val_frac*(A-n_test)), "
                              "train = the rest; splits pairwise actor-disjoint")
        split_info["actors"] = {s: sorted({actors[i] for i in order[s]}, key=natural_key)
                                for s in ("train", "val", "test")}
    order = {s: np.sort(idx) for s, idx in order.items() if len(idx)}
    log(f"{len(kept)} clips; splits { {s: len(i) for s, i in order.items()} }")

    n = int(round(SAMPLE_RATE * SECONDS))
    modalities = modalities_spec(num_frames(n), frames, image_size)
    source = {
        "converter": "data_prep.crema_d", "raw": str(raw),
        "annotations": {s: str(p) for s, p in csv_paths.items()},
        "options": {"split": split, "val_frac": val_frac, "test_frac": test_frac, "seed": seed,
                    "frames": frames, "image_size": image_size, "crop": crop,
                    "skip_missing": skip_missing},
        "csv": {"rule": "no header expected; the first row is a header (skipped) iff its second "
                        "field is not an emotion code and its first is not a clip name; column 1 "
                        "clip, column 2 emotion code",
                "headers": headers},
        "label": {"rule": "emotion code (column 2), checked against the clip name's third field",
                  "class_order": "NEU HAP SAD FEA DIS ANG (released CREMA-D loaders)"},
        "class_descriptions": DESCRIPTIONS,
        **recipe(SAMPLE_RATE, SECONDS, frames, image_size, crop),
        "split": split_info,
        "counts": {"rows": {s: listed.count(s) for s, _ in SPLIT_FILES},
                   "dropped": {k: len(v) for k, v in problems.items()}, "kept": int(len(kept)),
                   "splits": {s: int(len(i)) for s, i in order.items()},
                   "per_class": {s: np.bincount(labels[i], minlength=len(CLASSES)).tolist()
                                 for s, i in order.items()}},
        "sample_id": "position of the row among the data rows of train.csv then test.csv (0-based)",
    }
    chosen = [(wavs[i], pick_frames(frame_files[i], frames)) if keep[i] else None for i in range(n_rows)]
    sample_ids = np.arange(n_rows, dtype=np.int64)
    with ShardWriter(out, name, "classification", len(CLASSES), modalities,
                     samples_per_shard=samples_per_shard, class_names=list(CLASSES), source=source,
                     overwrite=overwrite) as writer:
        with ClipLoader(SAMPLE_RATE, SECONDS, image_size, crop, workers, block) as loader:
            stats = write_av_splits(writer, loader, order, chosen, labels, sample_ids, log=log)
        writer.meta["source"]["counts"]["audio"] = stats.as_dict()
    write_index(writer.root, ["sample_id", "split", "clip", "emotion", "actor"],
                [[int(i), s, clips[i], codes[i], actors[i]] for s, idx in order.items() for i in idx])
    log(f"wrote {writer.root} in {time.perf_counter() - t0:.1f}s")
    return writer.root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="CREMA-D root (AudioWAV/, Image-01-FPS/, annotations/)")
    add_av_args(parser, "dataset name (default crema_d, or crema_d_actor with --split actor)",
                frames=1, image_size=224, seed=SEED)
    parser.add_argument("--split", choices=SPLITS, default="released",
                        help="released: the train/test lists; actor: actor-disjoint re-split")
    parser.add_argument("--test-frac", type=float, default=0.1,
                        help="fraction of actors in test (--split actor only)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="drop clips whose wav or frames are missing (default: error)")
    args = parser.parse_args(argv)
    convert(args.raw, args.out, name=args.name, split=args.split, val_frac=args.val_frac,
            test_frac=args.test_frac, seed=args.seed, frames=args.frames, image_size=args.image_size,
            crop=args.crop, skip_missing=args.skip_missing, workers=args.workers, block=args.block,
            samples_per_shard=args.samples_per_shard, overwrite=args.overwrite,
            log=lambda msg: print(f"[crema_d] {msg}", file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
