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

import csv
import math
import pathlib
import sys
import time
from typing import NamedTuple

import numpy as np

from data_prep import converter
from data_prep.audio import (add_av_args, av_batches, check_common, list_frames, missing_message,
                             modalities_spec, num_frames, pick_frames, recipe)
from data_prep.dvm import natural_key

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
RELEASED_RULE = ("test = annotations/test.csv; val = val_frac of annotations/train.csv, "
                 "stratified per class (floor(frac*n_c) topped up by largest remainder "
                 "to ceil(frac*N), >= 1 per class with >= 2 clips; class indices "
                 "permuted with numpy default_rng([seed, 1])); train = the rest")
ACTOR_RULE = ("train.csv and test.csv pooled; actors (first field of the clip name) "
              "in numeric order permuted with numpy default_rng([seed, 2]); test = "
              "first ceil(test_frac*A) actors, val = next ceil(val_frac*(A-n_test)), "
              "train = the rest; splits pairwise actor-disjoint")


class Clip(NamedTuple):
    """One annotation row: a sample, sample_id = its position among the rows."""
    name: str
    code: str        # emotion code
    actor: str
    listed: str      # the list it is in: train or test


def _looks_like_clip(text):
    parts = text.split("_")
    return len(parts) >= 3 and parts[2] in CLASSES


def _is_header(fields):
    """The first non-blank row is a header exactly when neither its code nor its clip fits."""
    code_ok = len(fields) >= 2 and fields[1] in CLASSES
    return not code_ok and not _looks_like_clip(fields[0])


def _annotation(path, line, fields):
    """One data row -> (line, clip, code); errors name the file, the line and the column."""
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
    return line, clip, code


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
                if not any(fields):
                    continue   # blank line
                if first and _is_header(fields):
                    header = fields
                else:
                    rows.append(_annotation(path, reader.line_num, fields))
                first = False
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


# ---------------------------------------------------------------------------------------- read


def _read_lists(raw):
    """Both annotation lists -> (their paths, the clips in row order, the detected CSV headers)."""
    csv_paths = {s: raw / ANNOTATIONS / f for s, f in SPLIT_FILES}
    clips, where, headers = [], {}, {}
    for s, path in csv_paths.items():
        rows, headers[s] = read_annotations(path)
        for line, clip, code in rows:
            actor = _check_clip(path, line, clip, code)
            if clip in where:
                raise ValueError(f"{path}, line {line}: clip {clip!r} already listed in {where[clip]}")
            where[clip] = f"{path}, line {line}"
            clips.append(Clip(clip, code, actor, s))
    return csv_paths, clips, headers


def _missing_text(raw, problems, wavs, dirs):
    what = {"missing_wav": ("wav file(s)", wavs), "missing_frame_dir": ("frame directory(ies)", dirs),
            "no_frames": ("*.jpg frames in directory(ies)", dirs)}
    parts = [missing_message(what[k][0], [what[k][1][i] for i in idx]) for k, idx in problems.items() if idx]
    return (f"{raw} (CREMA-D): " + "; ".join(parts)
            + "; pass --skip-missing to drop those clips instead")


def _find_files(raw, clips, skip_missing, log):
    """-> (wav paths, sorted frame files per clip (None: no directory), problems {reason: [clip
    indices]}, the clip indices kept). Without ``skip_missing`` any problem is an error naming
    the paths."""
    wavs = [raw / AUDIO_DIR / f"{c.name}.wav" for c in clips]
    dirs = [raw / FRAME_DIR / c.name for c in clips]
    frame_files, problems = [], {"missing_wav": [], "missing_frame_dir": [], "no_frames": []}
    for i in range(len(clips)):
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
        raise FileNotFoundError(_missing_text(raw, problems, wavs, dirs))
    for i in bad:
        log(f"skipping {clips[i].name}: wav or frames missing")
    kept = np.setdiff1d(np.arange(len(clips)), np.array(bad, dtype=np.int64))
    if not len(kept):
        raise ValueError(f"{raw}: no clip left after dropping missing files")
    return wavs, frame_files, problems, kept


# --------------------------------------------------------------------------------------- split


def _split(raw, clips, labels, kept, split, val_frac, test_frac, seed):
    """-> (split -> clip indices, sorted; meta.json's split entry) for --split released | actor."""
    info = {"mode": split, "seed": seed, "val_frac": val_frac}
    if split == "released":
        tr = kept[[clips[i].listed == "train" for i in kept]]
        te = kept[[clips[i].listed == "test" for i in kept]]
        if not len(tr) or not len(te):
            raise ValueError(f"{raw}: no {'train' if not len(tr) else 'test'} clip left")
        train, val = converter.carve_val(tr, labels, val_frac, seed)
        order = {"train": train, "val": val, "test": te}
        info["rule"] = RELEASED_RULE
    else:
        of_actor = _actor_split([clips[i].actor for i in kept], test_frac, val_frac, seed)
        order = {s: kept[[of_actor[clips[i].actor] == s for i in kept]] for s in ("train", "val", "test")}
        info.update(test_frac=test_frac, rule=ACTOR_RULE)
        info["actors"] = {s: sorted({clips[i].actor for i in order[s]}, key=natural_key)
                          for s in ("train", "val", "test")}
    return {s: np.sort(idx) for s, idx in order.items() if len(idx)}, info


# --------------------------------------------------------------------------------------- write


def _source(raw, csv_paths, options, headers, split_info, counts):
    return {
        "converter": "data_prep.crema_d", "raw": str(raw),
        "annotations": {s: str(p) for s, p in csv_paths.items()},
        "options": options,
        "csv": {"rule": "no header expected; the first row is a header (skipped) iff its second "
                        "field is not an emotion code and its first is not a clip name; column 1 "
                        "clip, column 2 emotion code",
                "headers": headers},
        "label": {"rule": "emotion code (column 2), checked against the clip name's third field",
                  "class_order": "NEU HAP SAD FEA DIS ANG (released CREMA-D loaders)"},
        "class_descriptions": DESCRIPTIONS,
        **recipe(SAMPLE_RATE, SECONDS, options["frames"], options["image_size"], options["crop"]),
        "split": split_info,
        "counts": counts,
        "sample_id": "position of the row among the data rows of train.csv then test.csv (0-based)",
    }


def _index(clips, order):
    return {"samples.csv": (["sample_id", "split", "clip", "emotion", "actor"],
                            [[int(i), s, clips[i].name, clips[i].code, clips[i].actor]
                             for s, idx in order.items() for i in idx])}


def convert(raw, out, name=None, split="released", val_frac=0.1, test_frac=0.1, seed=SEED, frames=1,
            image_size=224, crop="none", skip_missing=False, workers=0, block=64,
            samples_per_shard=None, overwrite=False, log=None) -> pathlib.Path:
    """Convert a CREMA-D directory into ``<out>/<name>/`` (see the module docstring)."""
    log = log or converter.no_log
    check_common(frames, image_size, val_frac, block, workers)
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if not 0 < test_frac < 1:
        raise ValueError(f"--test-frac must be in (0, 1), got {test_frac}")
    name = name or ("crema_d" if split == "released" else "crema_d_actor")
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    t0 = time.perf_counter()
    csv_paths, clips, headers = _read_lists(raw)      # every annotation error before any file is touched
    wavs, frame_files, problems, kept = _find_files(raw, clips, skip_missing, log)

    class_index = {c: i for i, c in enumerate(CLASSES)}
    labels = np.array([class_index[c.code] for c in clips], dtype=np.int64)
    order, split_info = _split(raw, clips, labels, kept, split, val_frac, test_frac, seed)
    log(f"{len(kept)} clips; splits { {s: len(i) for s, i in order.items()} }")

    options = {"split": split, "val_frac": val_frac, "test_frac": test_frac, "seed": seed,
               "frames": frames, "image_size": image_size, "crop": crop, "skip_missing": skip_missing}
    counts = {"rows": {s: sum(c.listed == s for c in clips) for s, _ in SPLIT_FILES},
              "dropped": {k: len(v) for k, v in problems.items()}, "kept": int(len(kept)),
              "splits": {s: int(len(i)) for s, i in order.items()},
              "per_class": {s: np.bincount(labels[i], minlength=len(CLASSES)).tolist()
                            for s, i in order.items()}}
    meta = converter.Meta("classification", len(CLASSES),
                          modalities_spec(num_frames(int(round(SAMPLE_RATE * SECONDS))), frames, image_size),
                          _source(raw, csv_paths, options, headers, split_info, counts),
                          class_names=list(CLASSES))
    chosen = {int(i): (wavs[i], pick_frames(frame_files[i], frames)) for i in kept}
    batches = av_batches(order, chosen, labels, np.arange(len(clips), dtype=np.int64), counts,
                         SAMPLE_RATE, SECONDS, image_size, crop, workers, block, log)
    return converter.write(out, name, meta, batches, lambda: _index(clips, order),
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0)


# ---------------------------------------------------------------------------------------- CLI


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="CREMA-D root (AudioWAV/, Image-01-FPS/, annotations/)")
    add_av_args(parser, frames=1, image_size=224, seed=SEED)
    parser.add_argument("--split", choices=SPLITS, default="released",
                        help="released: the train/test lists; actor: actor-disjoint re-split")
    parser.add_argument("--test-frac", type=float, default=0.1,
                        help="fraction of actors in test (--split actor only)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="drop clips whose wav or frames are missing (default: error)")


def main(argv=None):
    return converter.main(argv, prog="crema_d", doc=__doc__, arguments=_arguments, convert=convert,
                          name_help="dataset name (default crema_d, or crema_d_actor with --split actor)")


if __name__ == "__main__":
    sys.exit(main())
