"""CelebA -> shards: GAAL's binary task (label `Attractive`, the other 39 attributes as table).

CLI:
  python -m data_prep.celeba --raw DIR --out DIR [--name celeba] [--attr-csv FILE]
      [--partition-csv FILE] [--image-root DIR] [--label Attractive] [--image-size 225]
      [--workers N] [--skip-missing-images] [--crop none|center] [--samples-per-shard N]
      [--block 512] [--overwrite]

Accepted raw layout (the Kaggle "CelebA dataset" CSVs):
  <raw>/list_attr_celeba.csv      image_id + the 40 attributes (5_o_Clock_Shadow ... Young), values
                                  -1 or 1 (anything else is an error naming file, line, column)
  <raw>/list_eval_partition.csv   image_id, partition (0 train, 1 val, 2 test)
  <raw>/img_align_celeba/         the aligned JPEGs; when <raw>/img_align_celeba/img_align_celeba/
                                  exists (the Kaggle archive nests it) that folder is used.
Every image_id of the attribute file needs a partition and vice versa (else an error naming one).
The original Google-Drive text files (list_attr_celeba.txt) are not read: use the CSVs.

Output <out>/<name>/ (default name celeba):
  image  kind image    uint8 [3, S, S] (S = --image-size, default 225). ImageNet mean/std
         normalisation is the encoder's job (source.image.normalize = "imagenet" is the hint).
  table  kind tabular  float32 [39]: the other attributes in CSV column order, 1 -> 1.0,
         -1 -> 0.0, listed as "continuous" (not standardised, no categorical columns)
  label  1 if Attractive == 1 else 0 (class_names ["not Attractive", "Attractive"])
  samples.csv  sample_id, split, image_id

Choices the paper and the released loader leave open:
- Splits: the official partition (162,770 / 19,867 / 19,962), nothing re-drawn.
- sample_id = the row's position in list_attr_celeba.csv (0-based; 000001.jpg -> 0). Within a
  split, samples are written in sample_id order. A missing image file is an error naming it
  (--skip-missing-images: drop it).
- Images: PIL decode, RGB, stretched to S x S with bilinear (antialiased) resampling — the
  178x218 aligned faces are not cropped unless --crop center; see data_prep.image_io.
"""
from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from data_prep import converter
from data_prep.image_io import add_image_table_args, csv_header, drop_missing, read_csv, resize_rule

ATTR_CSV = "list_attr_celeba.csv"
PARTITION_CSV = "list_eval_partition.csv"
IMAGE_DIR = "img_align_celeba"
LABEL = "Attractive"
ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup",
    "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns",
    "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
PARTITIONS = {"0": "train", "1": "val", "2": "test"}
_VALUES = {"1": 1.0, "-1": 0.0}


def default_image_root(raw):
    root = pathlib.Path(raw) / IMAGE_DIR
    nested = root / IMAGE_DIR
    return nested if nested.is_dir() else root


def _attribute_columns(attr_csv, label):
    """The attribute columns of ``attr_csv`` in file order, after checking its header."""
    header = [h for h in csv_header(attr_csv) if h]
    for col in ("image_id", *ATTRIBUTES):
        if col not in header:
            raise ValueError(f"{attr_csv}: missing column '{col}'")
    extra = [h for h in header if h != "image_id" and h not in ATTRIBUTES]
    if extra:
        raise ValueError(f"{attr_csv}: unexpected column '{extra[0]}' (expected image_id and the "
                         "40 CelebA attributes)")
    if label not in ATTRIBUTES:
        raise ValueError(f"label {label!r} is not a CelebA attribute")
    return [h for h in header if h != "image_id"]


def read_attributes(attr_csv, label=LABEL):
    """-> (image ids, feature names, features (N, 39) float32 0/1, labels (N,) int64)."""
    attributes = _attribute_columns(attr_csv, label)
    ids, values, seen = [], [], {}
    for line, row in read_csv(attr_csv, ["image_id", *attributes]):
        iid = row["image_id"]
        if not iid:
            raise ValueError(f"{attr_csv}, line {line}: column 'image_id' is empty")
        if iid in seen:
            raise ValueError(f"{attr_csv}, line {line}: image_id {iid!r} already listed on line {seen[iid]}")
        seen[iid] = line
        bad = [a for a in attributes if row[a] not in _VALUES]
        if bad:
            raise ValueError(f"{attr_csv}, line {line}: column '{bad[0]}' = {row[bad[0]]!r}, expected -1 or 1")
        ids.append(iid)
        values.append([_VALUES[row[a]] for a in attributes])
    if not ids:
        raise ValueError(f"{attr_csv}: no data rows")
    arr = np.array(values, dtype=np.float32).reshape(len(ids), len(attributes))
    li = attributes.index(label)
    labels = arr[:, li].astype(np.int64)
    features = [a for a in attributes if a != label]
    return ids, features, np.delete(arr, li, axis=1), labels


def read_partition(partition_csv, ids):
    """-> array of split names aligned with ``ids``."""
    part = {}
    for line, row in read_csv(partition_csv, ["image_id", "partition"]):
        if row["partition"] not in PARTITIONS:
            raise ValueError(f"{partition_csv}, line {line}: column 'partition' = "
                             f"{row['partition']!r}, expected 0, 1 or 2")
        if row["image_id"] in part:
            raise ValueError(f"{partition_csv}, line {line}: image_id {row['image_id']!r} listed twice")
        part[row["image_id"]] = PARTITIONS[row["partition"]]
    missing = [i for i in ids if i not in part]
    if missing:
        raise ValueError(f"{partition_csv}: image_id {missing[0]!r} (of {len(missing)}) from the "
                         "attribute file has no partition")
    if len(part) != len(ids):
        known = set(ids)
        stray = next(i for i in part if i not in known)
        raise ValueError(f"{partition_csv}: image_id {stray!r} is not in the attribute file")
    return np.array([part[i] for i in ids])


def _source(raw, attr_csv, partition_csv, image_root, options, counts):
    label = options["label"]
    return {
        "converter": "data_prep.celeba", "raw": str(raw), "attr_csv": str(attr_csv),
        "partition_csv": str(partition_csv), "image_root": str(image_root),
        "options": options,
        "label": {"attribute": label, "rule": "1 -> 1, -1 -> 0"},
        "features": "the other 39 attributes in CSV order, 1 -> 1.0, -1 -> 0.0; not standardised",
        "image": {"size": options["image_size"], "resize": resize_rule(options["crop"]), "normalize": "imagenet"},
        "split": {"rule": "official list_eval_partition (0 train, 1 val, 2 test)"},
        "counts": counts,
        "sample_id": "position of the row in list_attr_celeba.csv (0-based)",
    }


def _index(ids, order):
    return {"samples.csv": (["sample_id", "split", "image_id"],
                            [[int(i), s, ids[i]] for s, idx in order.items() for i in idx])}


def convert(raw, out, name="celeba", attr_csv=None, partition_csv=None, image_root=None,
            label=LABEL, image_size=225, workers=0, skip_missing_images=False, crop="none",
            samples_per_shard=None, block=512, overwrite=False, log=None) -> pathlib.Path:
    """Convert CelebA (Kaggle CSV layout of the module docstring) into ``<out>/<name>/``."""
    log = log or converter.no_log
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    attr_csv = pathlib.Path(attr_csv) if attr_csv else raw / ATTR_CSV
    partition_csv = pathlib.Path(partition_csv) if partition_csv else raw / PARTITION_CSV
    image_root = pathlib.Path(image_root) if image_root else default_image_root(raw)
    t0 = time.perf_counter()
    ids, feature_names, feats, labels = read_attributes(attr_csv, label)
    split_of = read_partition(partition_csv, ids)
    paths = [image_root / i for i in ids]
    missing = drop_missing(paths, skip_missing_images, f"{attr_csv} (CelebA)", lambda i: ids[i], log)

    keep = np.ones(len(ids), dtype=bool)
    keep[missing] = False
    order = {s: np.nonzero(keep & (split_of == s))[0] for s in ("train", "val", "test")}
    order = {s: idx for s, idx in order.items() if len(idx)}
    log(f"{int(keep.sum())} images; splits { {s: len(i) for s, i in order.items()} }")

    options = {"label": label, "image_size": image_size, "skip_missing_images": skip_missing_images,
               "crop": crop}
    return converter.write_binary_image_table(
        out, name, label, (paths, feats, labels, order), feature_names, missing,
        lambda counts: _source(raw, attr_csv, partition_csv, image_root, options, counts), lambda: _index(ids, order),
        image_size=image_size, crop=crop, workers=workers, block=block, samples_per_shard=samples_per_shard,
        overwrite=overwrite, log=log, started=t0)


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="root holding the two CSVs and img_align_celeba/")
    add_image_table_args(parser, image_size=225)
    parser.add_argument("--attr-csv", help=f"default <raw>/{ATTR_CSV}")
    parser.add_argument("--partition-csv", help=f"default <raw>/{PARTITION_CSV}")
    parser.add_argument("--image-root", help=f"default <raw>/{IMAGE_DIR} (or its nested {IMAGE_DIR}/)")
    parser.add_argument("--label", default=LABEL)


def main(argv=None):
    return converter.main(argv, prog="celeba", doc=__doc__, arguments=_arguments, convert=convert,
                          name_default="celeba", name_help="dataset name (default celeba)")


if __name__ == "__main__":
    sys.exit(main())
