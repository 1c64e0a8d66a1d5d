"""Sarcasm (multimodal sarcasm detection tweets) -> shards: IGM's 2-class task (BERT text + ResNet-50 image).

CLI:
  python -m data_prep.sarcasm --raw DIR --out DIR --bert DIR --resnet FILE [--name sarcasm]
      [--train-json FILE] [--val-json FILE] [--test-json FILE] [--image-root DIR]
      [--resnet-arch resnet50] [--resnet-width 64] [--device cpu|cuda] [--batch-size 64]
      [--max-tokens N] [--image-size 224] [--crop center|none] [--workers N] [--block 256]
      [--skip-missing-images] [--samples-per-shard N] [--overwrite]

Accepted raw layout (under --raw):
  train.json, valid.json, test.json   (or --train-json / --val-json / --test-json): each a JSON
      list of objects {"image": ..., "text": ..., "label": ...}. `image` is a path or file name;
      only its last component (split on '/' and '\\') is used. `text` a string. `label` 0 or 1
      (1 = sarcastic; the integers, booleans or the strings "0"/"1"). Anything else -- not a
      list, an item that is not an object, a missing key, a wrong type or value -- is an error
      naming the file, the item index and the key.
  images/<file>   (or --image-root): a missing file is an error naming it
      (--skip-missing-images: drop the sample and count it).

Output <out>/<name>/ (default name sarcasm):
  text   kind features float32 [768]   [CLS] of BERT's last hidden state (hidden of --bert)
  image  kind features float32 [2048]  globally pooled ResNet-50 features (out_dim of --resnet)
  label  0 not sarcastic, 1 sarcastic
  splits train / val (valid.json) / test: the released 19,816 / 2,410 / 2,409
  samples.csv  sample_id, split, item (index in its JSON list), image (file name)

Choices the paper and the released loader leave open:
- Text: fed to BERT as given, only surrounding whitespace stripped and inner runs of whitespace
  collapsed (the released texts are already tokenised, with "<user>" for mentions); BERT
  truncates at --max-tokens (default the model's 512). No word limit (Twitter2015's 50-word
  cleaning is specific to that dataset).
- Images: PIL decode, RGB, centred square, resized to 224 x 224 with bilinear (antialiased)
  resampling, /255, ImageNet mean/std (--crop none stretches instead); see data_prep.features.
- sample_id = running item number over train, valid, test in that order (0-based).
"""
from __future__ import annotations

import functools
import pathlib
import re
import sys
import time

from data_prep import converter, features, image_io
from data_prep.image_io import annotation_files

SPLIT_FILES = {"train": "train.json", "val": "valid.json", "test": "test.json"}
IMAGE_DIR = "images"
CLASS_NAMES = ["not sarcastic", "sarcastic"]
_LABELS = {0: 0, 1: 1, "0": 0, "1": 1, False: 0, True: 1}
_SPACE = re.compile(r"\s+")


def image_name(value):
    """Last path component of ``value`` ('/' or '\\' separated)."""
    return re.split(r"[\\/]", value.strip())[-1]


def read_json(path):
    """-> list of (item index, label, image file name, text) of one split file."""
    path = pathlib.Path(path)
    data = image_io.read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{image, text, label}} objects, got "
                         f"{type(data).__name__}")
    rows = []
    for i, item in enumerate(data):
        where = f"{path}, item {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        for key in ("image", "text", "label"):
            if key not in item:
                raise ValueError(f"{where}: missing key '{key}'")
        if not isinstance(item["image"], str) or not image_name(item["image"]):
            raise ValueError(f"{where}: key 'image' = {item['image']!r} is not a file name")
        if not isinstance(item["text"], str):
            raise ValueError(f"{where}: key 'text' = {item['text']!r} is not a string")
        label = item["label"]
        if isinstance(label, str):
            label = label.strip()
        if isinstance(label, float) and label in (0.0, 1.0):
            label = int(label)
        if not isinstance(label, (int, str)) or label not in _LABELS:
            raise ValueError(f"{where}: key 'label' = {item['label']!r} is not 0 or 1")
        rows.append((i, _LABELS[label], image_name(item["image"]),
                     _SPACE.sub(" ", item["text"]).strip()))
    if not rows:
        raise ValueError(f"{path}: empty list")
    return rows


def _source(raw, files, image_root, options, bert_x, resnet_x, counts):
    return {
        "converter": "data_prep.sarcasm", "raw": features.abspath(raw),
        "annotations": {s: features.abspath(p) for s, p in files.items()},
        "image_root": features.abspath(image_root),
        "options": options,
        **features.weights_source(bert_x, resnet_x, options["image_size"], options["crop"]),
        "text_cleaning": "none: whitespace runs collapsed and stripped; BERT truncates at max_tokens",
        "image_rule": "last path component of `image` under the image root",
        "split": {"rule": "official files: train.json -> train, valid.json -> val, test.json -> test"},
        "counts": counts,
        "sample_id": "running item number over train, valid, test (0-based), after dropping "
                     "skipped items; samples.csv maps it to the item index",
    }


def _index(kept):
    return {"samples.csv": (["sample_id", "split", "item", "image"],
                            [[i, split, row[0], row[2]] for i, (split, row) in enumerate(kept)])}


def convert(raw, out, bert, resnet, name="sarcasm", split_files=None, image_root=None,
            resnet_arch="resnet50", resnet_width=64, device="cpu", batch_size=64, max_tokens=None,
            image_size=224, crop="center", workers=0, block=256, skip_missing_images=False,
            samples_per_shard=None, overwrite=False, log=None) -> pathlib.Path:
    """Convert Sarcasm (layout of the module docstring) into ``<out>/<name>/``.
    ``split_files``: {"train"|"val"|"test": path} overriding the default file names."""
    log = log or converter.no_log
    features.check_feature_weights(bert, resnet, device)
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    image_root = pathlib.Path(image_root) if image_root else raw / IMAGE_DIR
    t0 = time.perf_counter()
    files = annotation_files(raw, SPLIT_FILES, split_files)
    return features.convert_text_image(
        out, name, CLASS_NAMES, {s: read_json(p) for s, p in files.items()}, files, image_root,
        ("Sarcasm", "item", "items"), _index, functools.partial(_source, raw, files, image_root), bert, resnet,
        workers=workers, block=block, samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0,
        options={"resnet_arch": resnet_arch, "resnet_width": resnet_width, "device": device,
                 "batch_size": batch_size, "max_tokens": max_tokens, "image_size": image_size, "crop": crop,
                 "skip_missing_images": skip_missing_images})


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="root holding the split JSON files and images/")
    features.add_feature_args(parser)
    parser.add_argument("--train-json", help="default <raw>/train.json")
    parser.add_argument("--val-json", help="default <raw>/valid.json")
    parser.add_argument("--test-json", help="default <raw>/test.json")
    parser.add_argument("--image-root", help=f"image folder (default <raw>/{IMAGE_DIR})")


def _options(args):
    """The parsed options as convert's keywords: the three split files become ``split_files``."""
    options = vars(args)
    options["split_files"] = {s: options.pop(f"{s}_json") for s in ("train", "val", "test")}
    return options


def main(argv=None):
    return converter.main(argv, prog="sarcasm", doc=__doc__, arguments=_arguments, convert=convert,
                          options=_options, name_default="sarcasm", name_help="dataset name (default sarcasm)")


if __name__ == "__main__":
    sys.exit(main())
