"""SUN Attribute -> shards: GAAL's binary task (label `open area`, the other attributes as table).

CLI:
  python -m data_prep.sun_attribute --raw DIR --out DIR [--name sun_attribute]
      [--csv FILE] [--image-root DIR] [--label "open area"] [--threshold 0]
      [--expect-attributes 102] [--image-size 225] [--workers N] [--seed 2022]
      [--skip-missing-images] [--crop none|center] [--samples-per-shard N] [--block 512]
      [--overwrite]

Accepted raw layout (the SUN Attribute database ships MATLAB files; export them once to this CSV):
  <raw>/attributes.csv (or --csv): header `image`, then one column per attribute named as in
      attributes.mat (e.g. "open area", "far-away horizon"); one row per image. `image` is the
      image path relative to the image root (as in images.mat, e.g. "a/abbey/sun_aaalbzqrimafwbiv.jpg").
      Values: 0/1, or the fraction of annotator votes (0, 0.33, 0.67, 1, as in
      attributeLabels_continuous.mat); a value > --threshold (default 0: at least one vote)
      becomes 1, else 0. Values must be numbers in [0, 1]; anything else is an error naming the
      file, line and column. Exactly --expect-attributes attribute columns are required (102 in
      the database; 0 disables the check).
  <raw>/images/ (or --image-root): the image files.

Output <out>/<name>/ (default name sun_attribute):
  image  kind image    uint8 [3, S, S] (S = --image-size, default 225). ImageNet mean/std
         normalisation is the encoder's job (source.image.normalize = "imagenet" is the hint).
  table  kind tabular  float32 [101]: the other attributes in CSV column order as 0/1 values,
         listed as "continuous" (not standardised, no categorical columns)
  label  1 if the label attribute > threshold else 0 (class_names ["not open area", "open area"])
  samples.csv  sample_id, split, image

Choices the paper and the released loader leave open:
- No official split: stratified by label 70/10/20 (train/val/test). Test = 20% of all (ceil),
  then val = 12.5% of the rest (ceil) = 10% of all; per class floor(frac * n_c) topped up by
  largest remainder; class indices permuted with numpy default_rng([seed, 1]) (test) and
  default_rng([seed, 2]) (val); seed default 2022, recorded in meta.json source.split.
- sample_id = the row's position among the CSV data rows (0-based); a duplicated `image` is an
  error; a missing image file is an error naming it (--skip-missing-images: drop the row before
  splitting).
- Images: PIL decode, RGB, stretched to S x S with bilinear (antialiased) resampling
  (--crop center: centred square first); see data_prep.image_io.
"""
from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from data_prep import converter
from data_prep.image_io import add_image_table_args, csv_header, drop_missing, read_csv, resize_rule, to_float

CSV_NAME = "attributes.csv"
IMAGE_DIR = "images"
IMAGE_COLUMN = "image"
LABEL = "open area"
NUM_ATTRIBUTES = 102
SEED = 2022
TEST_FRAC = 0.2
VAL_FRAC = 0.1          # of all; 0.1 / 0.8 of what remains after the test split


def _attribute_columns(csv_path, label, expect_attributes):
    """The attribute columns of ``csv_path`` in file order, after checking its header."""
    header = [h for h in csv_header(csv_path) if h]
    attributes = [h for h in header if h != IMAGE_COLUMN]
    if label not in attributes:
        raise ValueError(f"{csv_path}: missing column '{label}' (the label attribute)")
    if IMAGE_COLUMN not in header:
        raise ValueError(f"{csv_path}: missing column '{IMAGE_COLUMN}'")
    if expect_attributes and len(attributes) != expect_attributes:
        raise ValueError(f"{csv_path}: {len(attributes)} attribute columns, expected "
                         f"{expect_attributes} (pass --expect-attributes 0 to accept any number)")
    return attributes


def _vote(csv_path, line, row, column):
    v = to_float(row[column])
    if v is None or not 0 <= v <= 1:
        raise ValueError(f"{csv_path}, line {line}: column '{column}' = {row[column]!r} is not a "
                         "number in [0, 1]")
    return v


def read_attributes(csv_path, label, threshold=0.0, expect_attributes=NUM_ATTRIBUTES):
    """-> (image relative paths, feature names, features (N, D) float32 0/1, labels (N,) int64)."""
    attributes = _attribute_columns(csv_path, label, expect_attributes)
    features = [a for a in attributes if a != label]
    images, values, seen = [], [], {}
    for line, row in read_csv(csv_path, [IMAGE_COLUMN, *attributes]):
        img = row[IMAGE_COLUMN]
        if not img:
            raise ValueError(f"{csv_path}, line {line}: column '{IMAGE_COLUMN}' is empty")
        if img in seen:
            raise ValueError(f"{csv_path}, line {line}: image {img!r} already listed on line {seen[img]}")
        seen[img] = line
        values.append([_vote(csv_path, line, row, a) for a in attributes])
        images.append(img)
    if not images:
        raise ValueError(f"{csv_path}: no data rows")
    binary = np.array(values, dtype=np.float64).reshape(len(images), len(attributes)) > threshold
    li = attributes.index(label)
    labels = binary[:, li].astype(np.int64)
    feats = np.delete(binary, li, axis=1).astype(np.float32)
    return images, features, feats, labels


def _source(raw, csv_path, image_root, options, counts):
    threshold = options["threshold"]
    return {
        "converter": "data_prep.sun_attribute", "raw": str(raw), "csv": str(csv_path),
        "image_root": str(image_root),
        "options": options,
        "label": {"attribute": options["label"], "rule": f"value > {threshold} -> 1"},
        "features": f"the other attributes in CSV order, value > {threshold} -> 1.0 else 0.0; "
                    "not standardised",
        "image": {"size": options["image_size"], "resize": resize_rule(options["crop"]), "normalize": "imagenet"},
        "split": {"rule": "stratified by label: test = 20% of all (ceil), then val = 12.5% of the "
                          "rest (ceil), train = remainder; per class floor(frac*n_c) topped up by "
                          "largest remainder; class indices permuted with numpy "
                          "default_rng([seed, 1]) (test) and default_rng([seed, 2]) (val)",
                  "fractions": {"train": 0.7, "val": 0.1, "test": 0.2}, "seed": options["seed"]},
        "counts": counts,
        "sample_id": "position of the row among the CSV data rows (0-based)",
    }


def _index(images, order):
    return {"samples.csv": (["sample_id", "split", "image"],
                            [[int(i), s, images[i]] for s, idx in order.items() for i in idx])}


def convert(raw, out, name="sun_attribute", csv_path=None, image_root=None, label=LABEL,
            threshold=0.0, expect_attributes=NUM_ATTRIBUTES, image_size=225, workers=0, seed=SEED,
            skip_missing_images=False, crop="none", samples_per_shard=None, block=512,
            overwrite=False, log=None) -> pathlib.Path:
    """Convert SUN Attribute (CSV layout of the module docstring) into ``<out>/<name>/``."""
    log = log or converter.no_log
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    csv_path = pathlib.Path(csv_path) if csv_path else raw / CSV_NAME
    image_root = pathlib.Path(image_root) if image_root else raw / IMAGE_DIR
    t0 = time.perf_counter()
    images, feature_names, feats, labels = read_attributes(csv_path, label, threshold, expect_attributes)
    paths = [image_root / p for p in images]
    missing = drop_missing(paths, skip_missing_images, f"{csv_path} (SUN Attribute)", lambda i: images[i], log)
    keep = np.ones(len(images), dtype=bool)
    keep[missing] = False
    kept = np.nonzero(keep)[0]

    split = converter.stratified_split(labels[kept], TEST_FRAC, VAL_FRAC / (1 - TEST_FRAC), seed)
    order = {s: kept[idx] for s, idx in split.items()}
    log(f"{len(kept)} images ({int(labels[kept].sum())} '{label}'); splits "
        f"{ {s: len(i) for s, i in order.items()} }")

    options = {"label": label, "threshold": threshold, "image_size": image_size, "seed": seed,
               "skip_missing_images": skip_missing_images, "crop": crop}
    return converter.write_binary_image_table(
        out, name, label, (paths, feats, labels, order), feature_names, missing,
        lambda counts: _source(raw, csv_path, image_root, options, counts), lambda: _index(images, order),
        image_size=image_size, crop=crop, workers=workers, block=block, samples_per_shard=samples_per_shard,
        overwrite=overwrite, log=log, started=t0)


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="root holding attributes.csv and images/")
    add_image_table_args(parser, image_size=225)
    parser.add_argument("--csv", dest="csv_path", metavar="CSV", help=f"attribute CSV (default <raw>/{CSV_NAME})")
    parser.add_argument("--image-root", help=f"image root (default <raw>/{IMAGE_DIR})")
    parser.add_argument("--label", default=LABEL)
    parser.add_argument("--threshold", type=float, default=0.0, help="value > threshold -> 1")
    parser.add_argument("--expect-attributes", type=int, default=NUM_ATTRIBUTES,
                        help="required number of attribute columns (0: any)")
    parser.add_argument("--seed", type=int, default=SEED)


def main(argv=None):
    return converter.main(argv, prog="sun_attribute", doc=__doc__, arguments=_arguments, convert=convert,
                          name_default="sun_attribute", name_help="dataset name (default sun_attribute)")


if __name__ == "__main__":
    sys.exit(main())
