"""Twitter2015 -> shards: IGM's 3-class multimodal sentiment task (BERT text + ResNet-50 image features).

CLI:
  python -m data_prep.twitter2015 --raw DIR --out DIR --bert DIR --resnet FILE [--name twitter2015]
      [--annotations DIR] [--image-root DIR] [--max-words 50] [--resnet-arch resnet50]
      [--resnet-width 64] [--device cpu|cuda] [--batch-size 64] [--max-tokens N]
      [--image-size 224] [--crop center|none] [--workers N] [--block 256]
      [--skip-missing-images] [--samples-per-shard N] [--overwrite]

Raw layout (under --raw):
  annotations/{train,dev,test}.tsv   tab-separated, one header line, then one row per sample.
      Required columns (header names compared after stripping spaces and a leading "#<n> "
      prefix): Label (0, 1, 2 = negative, neutral, positive), String (the tweet), ImageID (the
      image file name). The released files (TomBERT layout) have the header
      `index  #1 Label  #2 ImageID  #3 String  #3 String`: the tweet with the aspect target
      replaced by "$T$", then the target; "$T$" is replaced by the target before cleaning.
      Fields are split on tabs only (no quoting: tweets contain quote characters). A row with a
      different number of fields than the header, a Label outside 0-2 or an empty ImageID is an
      error naming the file, line and column.
  twitter2015_images/<ImageID>       (or --image-root); a missing file is an error naming it
      (--skip-missing-images: drop the sample and count it).

Output <out>/<name>/ (default name twitter2015):
  text   kind features float32 [768]   [CLS] of BERT's last hidden state (hidden of --bert)
  image  kind features float32 [2048]  globally pooled ResNet-50 features (out_dim of --resnet)
  label  0 negative, 1 neutral, 2 positive
  splits train (train.tsv), val (dev.tsv), test (test.tsv): the released 3,179 / 1,122 / 1,037
  samples.csv  sample_id, split, line, ImageID, text (the cleaned text fed to BERT)

Choices the paper and the released loader leave open:
- Text cleaning: every character that is not an ASCII letter becomes a space; the first
  --max-words (50) of the remaining words are joined by single spaces. Case is KEPT: an uncased
  BERT lowercases in its own tokenizer (recorded: source.text.model.lowercases). Hashtags keep
  their word ("#love" -> "love"), mentions their name, URLs become letter fragments
  ("http t co ..."), digits and emoji disappear. A tweet left empty is encoded as "[CLS] [SEP]".
- Images: PIL decode, RGB, centred square, resized to 224 x 224 with bilinear (antialiased)
  resampling (= Resize(224) + CenterCrop(224); torchvision's eval transform Resize(256) +
  CenterCrop(224) would drop a further 12.5% border), /255, ImageNet mean/std. --crop none
  stretches the whole image instead.
- sample_id = running row number over train.tsv, dev.tsv, test.tsv in that order (0-based).
- Features are float32 from frozen models in eval mode; meta.json source records both weights
  paths, architectures, preprocessing and counts.
"""
from __future__ import annotations

import functools
import pathlib
import re
import sys
import time

from data_prep import converter, features
from data_prep.image_io import annotation_files

ANNOTATIONS = "annotations"
IMAGE_DIR = "twitter2015_images"
SPLIT_FILES = {"train": "train.tsv", "val": "dev.tsv", "test": "test.tsv"}
CLASS_NAMES = ["negative", "neutral", "positive"]
MAX_WORDS = 50
TARGET = "$T$"
_NON_ALPHA = re.compile(r"[^A-Za-z]+")
_PREFIX = re.compile(r"^#\d+\s+")


def clean_text(text, max_words=MAX_WORDS):
    """Non-letters -> spaces; the first ``max_words`` words (0: all) joined by single spaces."""
    words = _NON_ALPHA.sub(" ", text).split()
    return " ".join(words[:max_words] if max_words else words)


def _column(name):
    return _PREFIX.sub("", name.strip()).strip()


def _tsv_columns(path, header_line):
    """-> (position of Label, of ImageID, of the String columns) from the header line."""
    header = [_column(h) for h in header_line.split("\t")]
    for col in ("Label", "String", "ImageID"):
        if col not in header:
            raise ValueError(f"{path}: missing column '{col}' (header has {header_line.split(chr(9))})")
    return header.index("Label"), header.index("ImageID"), [i for i, h in enumerate(header) if h == "String"]


def _tsv_row(path, n, fields, columns, max_words):
    """One data line -> (line, label, ImageID, cleaned text)."""
    i_label, i_image, strings = columns
    raw_label = fields[i_label].strip()
    if raw_label not in ("0", "1", "2"):
        raise ValueError(f"{path}, line {n}: column 'Label' = {raw_label!r} is not 0, 1 or 2")
    image = fields[i_image].strip()
    if not image:
        raise ValueError(f"{path}, line {n}: column 'ImageID' is empty")
    tweet = fields[strings[0]]
    if len(strings) > 1 and TARGET in tweet:
        tweet = tweet.replace(TARGET, fields[strings[1]].strip())
    return n, int(raw_label), image, clean_text(tweet, max_words)


def read_tsv(path, max_words=MAX_WORDS):
    """-> list of (line, label, ImageID, cleaned text) for every data row of ``path``."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    if not lines:
        raise ValueError(f"{path}: empty file (no header row)")
    columns = _tsv_columns(path, lines[0])
    width = len(lines[0].split("\t"))
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise ValueError(f"{path}, line {n}: {len(fields)} tab-separated fields, the header "
                             f"has {width}")
        rows.append(_tsv_row(path, n, fields, columns, max_words))
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def _source(raw, files, image_root, options, bert_x, resnet_x, counts):
    max_words = options["max_words"]
    return {
        "converter": "data_prep.twitter2015", "raw": features.abspath(raw),
        "annotations": {s: features.abspath(p) for s, p in files.items()},
        "image_root": features.abspath(image_root),
        "options": options,
        **features.weights_source(bert_x, resnet_x, options["image_size"], options["crop"]),
        "text_cleaning": f"non-ASCII-letters -> spaces, first {max_words or 'all'} words joined by "
                         "single spaces, case kept; '$T$' replaced by the target column first",
        "split": {"rule": "official files: train.tsv -> train, dev.tsv -> val, test.tsv -> test"},
        "counts": counts,
        "sample_id": "running row number over train.tsv, dev.tsv, test.tsv (0-based), after "
                     "dropping skipped rows; samples.csv maps it to the file line",
    }


def _index(kept):
    return {"samples.csv": (["sample_id", "split", "line", "ImageID", "text"],
                            [[i, split, row[0], row[2], row[3]] for i, (split, row) in enumerate(kept)])}


def convert(raw, out, bert, resnet, name="twitter2015", annotations=None, image_root=None,
            max_words=MAX_WORDS, resnet_arch="resnet50", resnet_width=64, device="cpu",
            batch_size=64, max_tokens=None, image_size=224, crop="center", workers=0, block=256,
            skip_missing_images=False, samples_per_shard=None, overwrite=False, log=None) -> pathlib.Path:
    """Convert Twitter2015 (layout of the module docstring) into ``<out>/<name>/``."""
    log = log or converter.no_log
    if max_words < 0:
        raise ValueError(f"--max-words must be >= 0, got {max_words}")
    features.check_feature_weights(bert, resnet, device)
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    image_root = pathlib.Path(image_root) if image_root else raw / IMAGE_DIR
    t0 = time.perf_counter()
    files = annotation_files(pathlib.Path(annotations) if annotations else raw / ANNOTATIONS, SPLIT_FILES)
    return features.convert_text_image(
        out, name, CLASS_NAMES, {s: read_tsv(p, max_words) for s, p in files.items()}, files, image_root,
        ("Twitter2015", "line", "rows"), _index, functools.partial(_source, raw, files, image_root), bert, resnet,
        workers=workers, block=block, samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0,
        options={"max_words": max_words, "resnet_arch": resnet_arch, "resnet_width": resnet_width, "device": device,
                 "batch_size": batch_size, "max_tokens": max_tokens, "image_size": image_size, "crop": crop,
                 "skip_missing_images": skip_missing_images})


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="root holding annotations/ and twitter2015_images/")
    features.add_feature_args(parser)
    parser.add_argument("--annotations", help=f"folder of the TSVs (default <raw>/{ANNOTATIONS})")
    parser.add_argument("--image-root", help=f"image folder (default <raw>/{IMAGE_DIR})")
    parser.add_argument("--max-words", type=int, default=MAX_WORDS, help="words kept after cleaning (0: all)")


def main(argv=None):
    return converter.main(argv, prog="twitter2015", doc=__doc__, arguments=_arguments, convert=convert,
                          name_default="twitter2015", name_help="dataset name (default twitter2015)")


if __name__ == "__main__":
    sys.exit(main())
