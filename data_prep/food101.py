"""UPMC Food-101 -> shards: CGGM's 101-class image + recipe-text task (frozen ViT and BERT tokens).

CLI:
  python -m data_prep.food101 --raw DIR --out DIR --bert DIR --vit DIR [--name food101]
      [--train-json FILE] [--test-json FILE] [--image-root DIR] [--max-tokens 50]
      [--val-frac 0.1] [--seed 0] [--dtype float32|float16] [--vit-normalize pretrained|none]
      [--crop none|center] [--device cpu|cuda] [--batch-size 64] [--workers N] [--block 256]
      [--skip-missing-images] [--samples-per-shard N] [--overwrite]

Raw layout (under --raw, as the released CGGM loader reads it):
  train.json, test.json   (or --train-json / --test-json). Either a JSON list of objects, each
      with a key "id" (the released loader builds {x["id"]: x}), or a JSON object mapping sample
      id -> object. Each object has
        "text_tokens"  a list of strings (the recipe text, already tokenised into words)
        "img_path"     the image path relative to the dataset root (--image-root, default --raw),
                       e.g. "images/train/apple_pie/apple_pie_12.jpg"
        "label"        the class name, one of the 101 Food-101 class names (CLASS_NAMES; the
                       released loader's CLASS_NAME.index(label)). Optional here: when absent,
                       the class is the name of the image's parent directory (the UPMC images
                       lie in <split>/<class>/<file>.jpg); when present it wins, and images
                       whose directory names another class are counted in
                       source.counts.label_dir_mismatch.
      Anything else -- not a list/object, a missing "id"/"text_tokens"/"img_path", a wrong type,
      an unknown class, an id listed twice in one file -- is an error naming the file, the item
      and the key, before any model is loaded. A missing image file is an error naming it
      (--skip-missing-images: drop the sample and count it).
  There is no validation split (the released run even selects on test): --val-frac of train.json
  is carved out, stratified per class (data_prep.image_io.stratified_pick: floor(frac*n_c) per
  class topped up by largest remainder to ceil(frac*N), >= 1 per class with >= 2 samples, class
  members permuted with numpy default_rng([seed, 1])); train = the rest; test = test.json.

Output <out>/<name>/ (default name food101):
  image  kind sequence [197, 768]: the ViT's last hidden state ([CLS] first, no pooler) for
         ViT-B/16 at 224 (in general [1 + (S/P)^2, hidden] of --vit), data_prep.features.ViTExtractor.
  text   kind sequence [50, 768]: BERT's last hidden state of the first --max-tokens (50) tokens,
         [CLS] ... [SEP], data_prep.features.BertExtractor.tokens: padding rows are exactly zero.
  label  class index in CLASS_NAMES (the released CLASS_NAME order = alphabetical)
  splits train / val (carved from train.json) / test (test.json)
  samples.csv  sample_id, split, file, id, img_path, n_tokens

Choices the paper and the released loader leave open:
- Text: the released loader's ' '.join(text_tokens), BERT-tokenised with truncation to 50 tokens
  including [CLS]/[SEP] (BertTokenizer(max_length=50, truncation=True)).
- Padding mask: not stored as a dataset (the shard contract allows only modalities, label and
  sample_id, and a mask modality would be taken for a third modality). It is implicit: padding
  rows are exactly 0, while a real token's row is a LayerNorm output (never the zero vector), so
  mask = text.abs().sum(-1) > 0. The token count per sample is in samples.csv (n_tokens) and
  its distribution in source.counts.tokens. The released model ran over all 50 positions
  including padding (whose BERT states there were non-zero); zero rows make the mask implicit.
- Images: PIL decode, RGB, stretched to the ViT's input size (224) with PIL bilinear, as the
  released eval transform Resize([224, 224]) does (--crop center cuts the centred square first).
  Pixels /255, then the ViT's own normalisation from its preprocessor_config.json (0.5 / 0.5 for
  google/vit-base-patch16-224) = --vit-normalize pretrained. The released code fed the ViT plain
  ToTensor() pixels in [0, 1] with no normalisation: --vit-normalize none reproduces that.
  The released TRAINING transform (flip, colour jitter, grayscale, blur) is random per epoch and
  cannot survive extraction once into fixed features: train features come from the eval
  transform, like val and test (recorded).
- dtype: --dtype float32 (default) or float16. Measured per sample: image 197*768 values =
  605,184 B float32 / 302,592 B float16, text 50*768 = 153,600 / 76,800 B; for the 90,704 UPMC
  samples 68.8 GB vs 34.4 GB. float16 keeps a relative error <= 2^-11 (4.9e-4) on these
  LayerNorm outputs (|x| << 65504; checked in tests/test_converters_cggm.py), so it is the
  better storage format, but models/encoders.SequenceEncoder today feeds a float16 input
  unchanged into a float32 Linear (a dtype error), so float32 stays the default until the
  encoders cast every float input to float32.
- sample_id = running item number over train.json then test.json, in file order (0-based).
- Extraction is batched (--batch-size per forward, --block images decoded at a time), once, in
  eval mode under inference_mode; meta.json source records both weights paths, the
  normalisation, the label rule, the split rule and seed, and counts.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys
import time

import numpy as np

from data_prep import converter, features, image_io
from data_prep.image_io import ImageLoader, annotation_files, decoded_blocks

CLASS_NAMES = [
    "apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad",
    "beignets", "bibimbap", "bread_pudding", "breakfast_burrito", "bruschetta", "caesar_salad",
    "cannoli", "caprese_salad", "carrot_cake", "ceviche", "cheese_plate", "cheesecake",
    "chicken_curry", "chicken_quesadilla", "chicken_wings", "chocolate_cake", "chocolate_mousse",
    "churros", "clam_chowder", "club_sandwich", "crab_cakes", "creme_brulee", "croque_madame",
    "cup_cakes", "deviled_eggs", "donuts", "dumplings", "edamame", "eggs_benedict", "escargots",
    "falafel", "filet_mignon", "fish_and_chips", "foie_gras", "french_fries", "french_onion_soup",
    "french_toast", "fried_calamari", "fried_rice", "frozen_yogurt", "garlic_bread", "gnocchi",
    "greek_salad", "grilled_cheese_sandwich", "grilled_salmon", "guacamole", "gyoza", "hamburger",
    "hot_and_sour_soup", "hot_dog", "huevos_rancheros", "hummus", "ice_cream", "lasagna",
    "lobster_bisque", "lobster_roll_sandwich", "macaroni_and_cheese", "macarons", "miso_soup",
    "mussels", "nachos", "omelette", "onion_rings", "oysters", "pad_thai", "paella", "pancakes",
    "panna_cotta", "peking_duck", "pho", "pizza", "pork_chop", "poutine", "prime_rib",
    "pulled_pork_sandwich", "ramen", "ravioli", "red_velvet_cake", "risotto", "samosa", "sashimi",
    "scallops", "seaweed_salad", "shrimp_and_grits", "spaghetti_bolognese", "spaghetti_carbonara",
    "spring_rolls", "steak", "strawberry_shortcake", "sushi", "tacos", "takoyaki", "tiramisu",
    "tuna_tartare", "waffles"]
CLASS_INDEX = {c: i for i, c in enumerate(CLASS_NAMES)}
SPLIT_FILES = {"train": "train.json", "test": "test.json"}
MAX_TOKENS = 50
SEED = 0
DTYPES = ("float32", "float16")
VIT_NORMS = ("pretrained", "none")


def class_dir(img_path):
    """Name of the image's parent directory ('/' or '\\' separated), '' when there is none."""
    parts = [p for p in re.split(r"[\\/]", img_path) if p]
    return parts[-2] if len(parts) >= 2 else ""


def _items(path, data):
    """The samples of one split file -> [(where, id, item)]: a list of objects with key 'id', or
    an object id -> sample."""
    if isinstance(data, list):
        items = []
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise ValueError(f"{path}, item {i}: expected an object, got {type(item).__name__}")
            if "id" not in item:
                raise ValueError(f"{path}, item {i}: missing key 'id'")
            items.append((f"item {i} (id {item['id']!r})", item["id"], item))
        return items
    if isinstance(data, dict):
        return [(f"id {k!r}", k, v) for k, v in data.items()]
    raise ValueError(f"{path}: expected a JSON list of objects or an object id -> sample, got "
                     f"{type(data).__name__}")


def _label(where, item, img):
    """-> (class name, where it came from: 'label' or 'directory')."""
    if "label" in item:
        label = item["label"]
        if not isinstance(label, str) or label not in CLASS_INDEX:
            raise ValueError(f"{where}: key 'label' = {label!r} is not one of the 101 Food-101 "
                             "class names")
        return label, "label"
    label = class_dir(img)
    if label not in CLASS_INDEX:
        raise ValueError(f"{where}: no key 'label', and the image directory {label!r} of "
                         f"img_path {img!r} is not a Food-101 class name")
    return label, "directory"


def _sample(where, sid, item):
    """One sample (an object) -> (id, words, img_path, label, label_from)."""
    for k in ("text_tokens", "img_path"):
        if k not in item:
            raise ValueError(f"{where}: missing key '{k}'")
    words = item["text_tokens"]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ValueError(f"{where}: key 'text_tokens' is not a list of strings "
                         f"(got {type(words).__name__})")
    img = item["img_path"]
    if not isinstance(img, str) or not img.strip():
        raise ValueError(f"{where}: key 'img_path' = {img!r} is not a relative file path")
    label, source = _label(where, item, img)
    return str(sid), words, img.strip(), CLASS_INDEX[label], source


def read_split(path):
    """-> list of (item id, words, img_path, label, label_from) of one split file (module doc)."""
    path = pathlib.Path(path)
    rows, seen = [], {}
    for where, sid, item in _items(path, image_io.read_json(path)):
        where = f"{path}, {where}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object, got {type(item).__name__}")
        key = json.dumps(sid)
        if key in seen:
            raise ValueError(f"{where}: id listed twice (first as {seen[key]})")
        seen[key] = where
        rows.append(_sample(where, sid, item))
    if not rows:
        raise ValueError(f"{path}: no samples")
    return rows


def _token_stats(n_tokens, limit):
    n = np.asarray(n_tokens)
    return {"min": int(n.min()), "mean": round(float(n.mean()), 3), "max": int(n.max()),
            "at_limit": int((n >= limit).sum())}


def _check_options(dtype, vit_normalize, val_frac, max_tokens, block, workers):
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if vit_normalize not in VIT_NORMS:
        raise ValueError(f"--vit-normalize must be one of {VIT_NORMS}, got {vit_normalize!r}")
    if not 0 <= val_frac < 1:
        raise ValueError(f"--val-frac must be in [0, 1), got {val_frac}")
    if max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
    if block < 1 or workers < 0:
        raise ValueError(f"--block must be >= 1 and --workers >= 0, got {block}, {workers}")


def _collect(rows, files, image_root, skip_missing_images, log):
    """The samples of both splits (features.collect_text_image_rows) -> (texts, paths, labels,
    split -> sample indices, skipped per split, label-source tallies, index rows)."""
    texts, paths, labels, kept, listed, skipped = features.collect_text_image_rows(
        {s: [(sid, label, img, words, from_) for sid, words, img, label, from_ in split_rows]
         for s, split_rows in rows.items()}, files, image_root, skip_missing_images, "Food-101", "id", log)
    tallies = {"label_dir_mismatch": 0, "label_from_directory": 0}
    index = []
    for split, (sid, label, img, _, from_) in kept:
        if from_ == "directory":
            tallies["label_from_directory"] += 1
        elif class_dir(img) in CLASS_INDEX and CLASS_INDEX[class_dir(img)] != label:
            tallies["label_dir_mismatch"] += 1
        index.append([files[split].name, sid, img])
    return texts, paths, labels, listed, skipped, tallies, index


def _extractors(bert, vit, device, batch_size, max_tokens, vit_normalize):
    bert_x = features.BertExtractor(bert, device, batch_size, max_length=max_tokens)
    vit_x = features.ViTExtractor(vit, device, batch_size)
    if vit_normalize == "none":     # the released run: ToTensor() pixels in [0, 1] straight in
        vit_x.mean, vit_x.std, vit_x.norm_source = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "none ([0, 1] pixels)"
    return bert_x, vit_x


def _source(raw, files, image_root, options, bert_x, vit_x, counts):
    max_tokens, crop = options["max_tokens"], options["crop"]
    return {
        "converter": "data_prep.food101", "raw": features.abspath(raw),
        "annotations": {s: features.abspath(p) for s, p in files.items()},
        "image_root": features.abspath(image_root),
        "options": options,
        "text": {"model": bert_x.describe(),
                 "feature": f"last hidden state of the first {max_tokens} tokens ([CLS] ... [SEP], "
                            "truncated), padding rows exactly 0",
                 "input": "' '.join(text_tokens) (the released loader's text)",
                 "mask": "implicit: a row is padding iff it is all zeros; n_tokens in samples.csv"},
        "image": {"model": vit_x.describe(), "size": vit_x.image_size,
                  "resize": ("whole image stretched to size x size, PIL bilinear (antialiased) = "
                             "the released Resize([224, 224])" if crop == "none" else
                             "centred square crop, then PIL bilinear (antialiased) to size x size"),
                  "input": ("uint8 RGB / 255, then the ViT's mean/std" if options["vit_normalize"] == "pretrained"
                            else "uint8 RGB / 255, no normalisation (the released ToTensor() input)"),
                  "augmentation": "none: the released train-time augmentation is random per epoch "
                                  "and cannot be baked into features extracted once"},
        "label": {"rule": "key 'label' (a class name) when present, else the image's parent "
                          "directory name; index in the released CLASS_NAME order (alphabetical)"},
        "split": {"rule": "test = test.json; val = val_frac of train.json, stratified per class "
                          "(floor(frac*n_c) topped up by largest remainder to ceil(frac*N), >= 1 per "
                          "class with >= 2 samples; class members permuted with numpy "
                          "default_rng([seed, 1])); train = the rest",
                  "seed": options["seed"], "val_frac": options["val_frac"]},
        "counts": counts,
        "sample_id": "running item number over train.json then test.json (0-based), file order",
    }


def _batches(order, texts, paths, labels, extractors, options, n_tokens, counts, log):
    """The batches of every split: per block the images decoded and passed through the ViT, the
    texts through BERT; token counts go to ``n_tokens`` and, at the end, ``counts["tokens"]``."""
    bert_x, vit_x = extractors
    max_tokens, dtype = options["max_tokens"], np.dtype(options["dtype"])
    crop, workers, block = options["crop"], options["workers"], options["block"]
    with ImageLoader(vit_x.image_size, crop, workers, block) as loader:
        for split, rows, images in decoded_blocks(order, loader, paths, log, every=10):
            feats, mask = bert_x.tokens([texts[i] for i in rows], max_tokens)
            n_tokens[rows] = mask.sum(1)
            yield split, {"image": vit_x(images).astype(dtype), "text": feats.astype(dtype),
                          "label": labels[rows], "sample_id": rows}
    counts["tokens"] = {s: _token_stats(n_tokens[i], max_tokens) for s, i in order.items()}


def _index(index, order, n_tokens):
    return {"samples.csv": (["sample_id", "split", "file", "id", "img_path", "n_tokens"],
                            [[int(i), s, *index[i], int(n_tokens[i])] for s, idx in order.items() for i in idx])}


def convert(raw, out, bert, vit, name="food101", split_files=None, image_root=None,
            max_tokens=MAX_TOKENS, val_frac=0.1, seed=SEED, dtype="float32",
            vit_normalize="pretrained", crop="none", device="cpu", batch_size=64, workers=0,
            block=256, skip_missing_images=False, samples_per_shard=None, overwrite=False,
            log=None) -> pathlib.Path:
    """Convert UPMC Food-101 (layout of the module docstring) into ``<out>/<name>/``.
    ``split_files``: {"train"|"test": path} overriding the default file names."""
    log = log or converter.no_log
    _check_options(dtype, vit_normalize, val_frac, max_tokens, block, workers)
    features.check_hf_dir(bert, "--bert", tokenizer=True)
    features.check_hf_dir(vit, "--vit")
    features.resolve_device(device)
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    image_root = pathlib.Path(image_root) if image_root else raw
    t0 = time.perf_counter()
    files = annotation_files(raw, SPLIT_FILES, split_files)
    rows = {s: read_split(p) for s, p in files.items()}
    texts, paths, labels, listed, skipped, tallies, index = _collect(rows, files, image_root,
                                                                     skip_missing_images, log)
    train, val = converter.carve_val(listed["train"], labels, val_frac, seed)
    order = {s: i for s, i in {"train": train, "val": val, "test": listed["test"]}.items() if len(i)}
    counts = {"items": {s: len(r) for s, r in rows.items()}, "missing_images_skipped": skipped,
              **tallies, "splits": {s: int(len(i)) for s, i in order.items()},
              "per_class": {s: np.bincount(labels[i], minlength=len(CLASS_NAMES)).tolist()
                            for s, i in order.items()}}
    log(f"read annotations: {counts['splits']} samples ({time.perf_counter() - t0:.1f}s)")

    bert_x, vit_x = _extractors(bert, vit, device, batch_size, max_tokens, vit_normalize)
    modalities = {"image": {"kind": "sequence", "shape": [vit_x.num_tokens, vit_x.hidden], "dtype": dtype},
                  "text": {"kind": "sequence", "shape": [max_tokens, bert_x.hidden], "dtype": dtype}}
    options = {"max_tokens": max_tokens, "val_frac": val_frac, "seed": seed, "dtype": dtype,
               "vit_normalize": vit_normalize, "crop": crop, "device": device,
               "batch_size": batch_size, "skip_missing_images": skip_missing_images}
    meta = converter.Meta("classification", len(CLASS_NAMES), modalities,
                          _source(raw, files, image_root, options, bert_x, vit_x, counts),
                          class_names=CLASS_NAMES)
    n_tokens = np.zeros(len(texts), dtype=np.int64)
    batches = _batches(order, texts, paths, labels, (bert_x, vit_x),
                       {**options, "workers": workers, "block": block}, n_tokens, counts, log)
    return converter.write(out, name, meta, batches, lambda: _index(index, order, n_tokens),
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0)


# ---------------------------------------------------------------------------------------- CLI


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="dataset root (train.json, test.json, images)")
    parser.add_argument("--bert", required=True,
                        help="local Hugging Face BERT directory (config.json, weights, vocab.txt)")
    parser.add_argument("--vit", required=True,
                        help="local Hugging Face ViT directory (config.json, weights, "
                             "preprocessor_config.json)")
    parser.add_argument("--train-json", help="train split file (default <raw>/train.json)")
    parser.add_argument("--test-json", help="test split file (default <raw>/test.json)")
    parser.add_argument("--image-root", help="root that img_path is relative to (default --raw)")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                        help="BERT tokens kept incl. [CLS]/[SEP] = text sequence length (default 50)")
    parser.add_argument("--val-frac", type=float, default=0.1, help="fraction of train carved out as val")
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the val carve-out")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="stored feature dtype")
    parser.add_argument("--vit-normalize", choices=VIT_NORMS, default="pretrained",
                        help="pretrained: the ViT's mean/std; none: [0, 1] pixels as released")
    parser.add_argument("--crop", choices=("none", "center"), default="none",
                        help="none: stretch to the ViT size as released (default); center: square first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per model forward")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (0: in-process)")
    parser.add_argument("--block", type=int, default=256, help="samples decoded and extracted per block")
    parser.add_argument("--skip-missing-images", action="store_true",
                        help="drop samples whose image file is missing (default: error)")


def _options(args):
    """The parsed options as convert's keywords: the two split files become ``split_files``."""
    options = vars(args)
    options["split_files"] = {s: options.pop(f"{s}_json") for s in ("train", "test")}
    return options


def main(argv=None):
    return converter.main(argv, prog="food101", doc=__doc__, arguments=_arguments, convert=convert,
                          options=_options, name_default="food101", name_help="dataset name (default food101)")


if __name__ == "__main__":
    sys.exit(main())
