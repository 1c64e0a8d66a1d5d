"""Frozen feature extractors from LOCAL weights, for converters that store features in shards.

Nothing is ever downloaded: every extractor takes a local path and fails, naming the path and
the command-line flag, when it is not there. All run batched, in eval mode, under
``torch.inference_mode()``, on ``device`` ("cpu", "cuda", "cuda:N"), in float32, and return numpy
float32 arrays.

- :class:`BertExtractor` -- a local Hugging Face directory (config.json, the weights as
  model.safetensors / pytorch_model.bin, tokenizer files: vocab.txt and/or tokenizer.json),
  loaded with ``AutoTokenizer`` / ``AutoModel`` (``local_files_only=True``; a BERT config gives
  ``BertModel``).
  ``cls(texts)`` -> (N, hidden): the [CLS] vector of the last hidden state (not the pooler).
  Texts are tokenised with truncation to ``max_length`` tokens ([CLS] and [SEP] included;
  default: the model's max_position_embeddings, 512 for BERT-base) and padded to the longest
  text of the batch; the attention mask hides the padding, so a text's vector does not depend
  on its batch.
  ``tokens(texts, max_len)`` -> (features (N, max_len, hidden), mask (N, max_len) bool): the
  last hidden state of the first ``max_len`` tokens ([CLS] ... [SEP], truncated), padded to
  exactly ``max_len``; padding positions are zero and False in the mask (CGGM's BERT tokens,
  max_len 50 -> 50 x 768). A text may be a string or a list of words (joined with spaces).
- :class:`ResNetExtractor` -- our ``models.encoders`` ResNet (default ``resnet50``, base width
  64) loading a torchvision-layout state dict file (.pth / .pt) through
  ``models.encoders.load_pretrained``: every key must match (``fc.*`` is dropped; a
  ``state_dict`` / ``model`` wrapper and a DDP ``module.`` prefix are accepted), anything
  missing, unexpected or mis-shaped is an error listing it. ``__call__(images)`` takes uint8
  (N, 3, H, W) RGB, scales by 1/255, applies ImageNet mean/std, and returns the globally
  average-pooled last feature map, (N, 2048) for ResNet-50. Resizing is the caller's job: the
  converters give 224 x 224 (the centred square of the image, PIL bilinear, see
  ``data_prep.image_io``). A narrower ``base_width`` exists for tests (tiny random nets saved
  in the same on-disk layout).
- :class:`ViTExtractor` -- a local Hugging Face ViT directory loaded with ``ViTModel``
  (no pooling layer). ``__call__(images)`` takes uint8 (N, 3, S, S) with S = the config's
  image_size (224 for ViT-B/16), scales by 1/255, normalises with image_mean / image_std from
  preprocessor_config.json when the directory has one (else 0.5 / 0.5, the ViT default) and
  returns the last hidden state (N, 1 + (S/P)^2, hidden): 197 x 768 for ViT-B/16 at 224.

``add_feature_args`` / ``text_image_extractors`` / ``collect_text_image_rows`` /
``text_image_batches`` / ``convert_text_image`` are the shared command-line options, reading and
writing of the image + text feature converters (data_prep.twitter2015, data_prep.sarcasm).

On CUDA, PyTorch's default cuDNN settings allow TF32 convolutions, so ResNet features there can
differ from CPU ones by ~1e-3 relative; BERT/ViT matmuls stay float32.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np
import torch

from data_prep import converter
from data_prep.image_io import ImageLoader, decoded_blocks, drop_missing
from models.encoders import IMAGENET_MEAN, IMAGENET_STD, RESNET_ARCHS, load_pretrained

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
              "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")


class WeightsError(FileNotFoundError):
    """A local weights path is missing or incomplete."""


def resolve_device(device):
    """'cpu', 'cuda' or 'cuda:N' -> torch.device; CUDA asked for but absent is an error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device}: not a device (use cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: only cpu and cuda are supported")
    return dev


def check_hf_dir(path, flag, tokenizer=False):
    """Fail early, naming ``flag`` and ``path``, unless ``path`` is a local Hugging Face model
    directory (config.json + weights [+ tokenizer files]). Returns the resolved path."""
    if path is None:
        raise WeightsError(f"{flag} is required: a local Hugging Face model directory "
                           "(weights are never downloaded)")
    p = pathlib.Path(path).expanduser()
    hint = "(weights are never downloaded; give a local Hugging Face model directory)"
    if not p.is_dir():
        raise WeightsError(f"{flag} {p}: not a directory {hint}")
    if not (p / "config.json").is_file():
        raise WeightsError(f"{flag} {p}: no config.json {hint}")
    if not any((p / f).is_file() for f in HF_WEIGHTS):
        raise WeightsError(f"{flag} {p}: no weights file (one of {', '.join(HF_WEIGHTS)}) {hint}")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise WeightsError(f"{flag} {p}: no tokenizer files (vocab.txt or tokenizer.json) {hint}")
    return p.resolve()


def check_file(path, flag):
    """Fail early, naming ``flag`` and ``path``, unless ``path`` is an existing file."""
    if path is None:
        raise WeightsError(f"{flag} is required: a local weights file (never downloaded)")
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"{flag} {p}: weights file not found (weights are never downloaded; "
                           "give a local file)")
    return p.resolve()


def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _batches(n, size):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _as_text(t, i):
    if isinstance(t, str):
        return t
    if isinstance(t, (list, tuple)) and all(isinstance(w, str) for w in t):
        return " ".join(t)
    raise TypeError(f"text {i}: expected a string or a list of words, got {type(t).__name__}")


class BertExtractor:
    """Frozen BERT (or any Hugging Face encoder with a [CLS]-first tokenizer) from a local dir."""

    def __init__(self, path, device="cpu", batch_size=64, max_length=None, flag="--bert"):
        self.path = check_hf_dir(path, flag, tokenizer=True)
        self.device = resolve_device(device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        transformers = _quiet_transformers()
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = transformers.AutoModel.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise WeightsError(f"{flag} {self.path}: cannot load the model or tokenizer ({e})") from e
        self.model.eval().requires_grad_(False).to(self.device)
        cfg = self.model.config
        self.hidden = int(cfg.hidden_size)
        limit = int(getattr(cfg, "max_position_embeddings", 512) or 512)
        self.max_length = min(limit, 512) if max_length is None else int(max_length)
        if not 2 <= self.max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] for {self.path}, got {max_length}")

    def describe(self):
        return {"path": str(self.path), "class": type(self.model).__name__,
                "model_type": self.model.config.model_type, "hidden": self.hidden,
                "tokenizer": type(self.tokenizer).__name__,
                "lowercases": bool(getattr(self.tokenizer, "do_lower_case", False)),
                "max_length": self.max_length}

    def _encode(self, texts, padding, max_length):
        return self.tokenizer(texts, padding=padding, truncation=True, max_length=max_length,
                              return_tensors="pt")

    @torch.inference_mode()
    def cls(self, texts):
        """(N, hidden) float32: [CLS] of the last hidden state, texts truncated to max_length."""
        texts = [_as_text(t, i) for i, t in enumerate(texts)]
        out = np.empty((len(texts), self.hidden), dtype=np.float32)
        for a, b in _batches(len(texts), self.batch_size):
            enc = self._encode(texts[a:b], "longest", self.max_length).to(self.device)
            h = self.model(**enc).last_hidden_state
            out[a:b] = h[:, 0].float().cpu().numpy()
        return out

    @torch.inference_mode()
    def tokens(self, texts, max_len):
        """(features (N, max_len, hidden) float32, mask (N, max_len) bool); padding rows are 0."""
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        texts = [_as_text(t, i) for i, t in enumerate(texts)]
        feats = np.zeros((len(texts), max_len, self.hidden), dtype=np.float32)
        mask = np.zeros((len(texts), max_len), dtype=bool)
        for a, b in _batches(len(texts), self.batch_size):
            enc = self._encode(texts[a:b], "max_length", max_len).to(self.device)
            h = self.model(**enc).last_hidden_state
            m = enc["attention_mask"].bool()
            h = h * m.unsqueeze(-1).to(h.dtype)
            feats[a:b] = h.float().cpu().numpy()
            mask[a:b] = m.cpu().numpy()
        return feats, mask


def _pixels(images, device, mean, std, size=None):
    """uint8 (N, 3, H, W) numpy/tensor -> normalised float32 tensor on ``device``."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    if size is not None and tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"expected {size}x{size} images, got {tuple(x.shape[2:])}")
    x = x.to(device).float().div_(255.0)
    m = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


class ResNetExtractor:
    """Frozen torchvision-layout ResNet from a local state-dict file -> pooled features."""

    def __init__(self, weights, arch="resnet50", base_width=64, device="cpu", batch_size=64,
                 flag="--resnet"):
        self.weights = check_file(weights, flag)
        if arch not in RESNET_ARCHS:
            raise ValueError(f"--resnet-arch {arch!r}: choose from {sorted(RESNET_ARCHS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.arch, self.base_width = arch, int(base_width)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.model = RESNET_ARCHS[arch](base_width=self.base_width)
        try:
            load_pretrained(self.model, str(self.weights))
        except (ValueError, RuntimeError, OSError) as e:
            raise ValueError(f"{flag} {self.weights}: {e}") from e
        self.model.eval().requires_grad_(False).to(self.device)
        self.out_dim = int(self.model.out_dim)

    def describe(self):
        return {"path": str(self.weights), "arch": self.arch, "base_width": self.base_width,
                "out_dim": self.out_dim, "normalize": "imagenet",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "pooling": "global average of the last feature map"}

    @torch.inference_mode()
    def __call__(self, images):
        """uint8 (N, 3, H, W) -> (N, out_dim) float32."""
        images = np.asarray(images)
        out = np.empty((len(images), self.out_dim), dtype=np.float32)
        for a, b in _batches(len(images), self.batch_size):
            x = _pixels(images[a:b], self.device, IMAGENET_MEAN, IMAGENET_STD)
            out[a:b] = self.model(x).float().cpu().numpy()
        return out


class ViTExtractor:
    """Frozen Hugging Face ViT from a local directory -> last hidden states (N, tokens, hidden)."""

    def __init__(self, path, device="cpu", batch_size=32, flag="--vit"):
        self.path = check_hf_dir(path, flag)
        self.device = resolve_device(device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        transformers = _quiet_transformers()
        try:
            self.model = transformers.ViTModel.from_pretrained(self.path, local_files_only=True,
                                                               add_pooling_layer=False)
        except (OSError, ValueError) as e:
            raise WeightsError(f"{flag} {self.path}: cannot load the ViT ({e})") from e
        self.model.eval().requires_grad_(False).to(self.device)
        cfg = self.model.config
        self.image_size, self.patch_size = int(cfg.image_size), int(cfg.patch_size)
        self.hidden = int(cfg.hidden_size)
        self.num_tokens = 1 + (self.image_size // self.patch_size) ** 2
        self.mean, self.std, self.norm_source = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "default 0.5/0.5"
        pre = self.path / "preprocessor_config.json"
        if pre.is_file():
            try:
                cfg_pre = json.loads(pre.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise WeightsError(f"{flag} {pre}: unreadable JSON ({e})") from e
            if "image_mean" in cfg_pre and "image_std" in cfg_pre:
                self.mean = tuple(float(v) for v in cfg_pre["image_mean"])
                self.std = tuple(float(v) for v in cfg_pre["image_std"])
                self.norm_source = "preprocessor_config.json"

    def describe(self):
        return {"path": str(self.path), "image_size": self.image_size, "patch_size": self.patch_size,
                "hidden": self.hidden, "tokens": self.num_tokens, "mean": list(self.mean),
                "std": list(self.std), "normalization_from": self.norm_source,
                "output": "last_hidden_state ([CLS] first), no pooling layer"}

    @torch.inference_mode()
    def __call__(self, images):
        """uint8 (N, 3, S, S) -> (N, 1 + (S/P)^2, hidden) float32."""
        images = np.asarray(images)
        out = np.empty((len(images), self.num_tokens, self.hidden), dtype=np.float32)
        for a, b in _batches(len(images), self.batch_size):
            x = _pixels(images[a:b], self.device, self.mean, self.std, self.image_size)
            out[a:b] = self.model(pixel_values=x).last_hidden_state.float().cpu().numpy()
        return out


# ------------------------------------------------------------- image + text feature converters


def add_feature_args(parser):
    """The command-line options the image + text feature converters share (one definition)."""
    parser.add_argument("--bert", required=True,
                        help="local Hugging Face BERT directory (config.json, weights, vocab.txt)")
    parser.add_argument("--resnet", required=True,
                        help="local torchvision-layout ResNet state dict file (.pth)")
    parser.add_argument("--resnet-arch", default="resnet50", choices=sorted(RESNET_ARCHS))
    parser.add_argument("--resnet-width", type=int, default=64,
                        help="ResNet base width (64 = torchvision; smaller only for test nets)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per model forward")
    parser.add_argument("--max-tokens", type=int,
                        help="BERT truncation in tokens incl. [CLS]/[SEP] (default: the model's "
                             "max_position_embeddings, 512 for BERT-base)")
    parser.add_argument("--image-size", type=int, default=224, help="ResNet input size")
    parser.add_argument("--crop", choices=("center", "none"), default="center",
                        help="center: centred square, then resize (default); none: stretch")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (0: in-process)")
    parser.add_argument("--block", type=int, default=256, help="samples decoded and extracted per block")
    parser.add_argument("--skip-missing-images", action="store_true",
                        help="drop samples whose image file is missing (default: error)")


def check_feature_weights(bert, resnet, device="cpu"):
    """Check both weights paths and the device before any annotation or image is read."""
    check_hf_dir(bert, "--bert", tokenizer=True)
    check_file(resnet, "--resnet")
    resolve_device(device)


def text_image_extractors(bert, resnet, resnet_arch="resnet50", resnet_width=64, device="cpu",
                          batch_size=64, max_tokens=None):
    return (BertExtractor(bert, device, batch_size, max_tokens),
            ResNetExtractor(resnet, resnet_arch, resnet_width, device, batch_size))


def text_image_modalities(bert, resnet):
    """Shard modalities: text (BERT [CLS]) then image (pooled ResNet), float32 features."""
    return {"text": {"kind": "features", "shape": [bert.hidden], "dtype": "float32"},
            "image": {"kind": "features", "shape": [resnet.out_dim], "dtype": "float32"}}


def collect_text_image_rows(rows, files, image_root, skip_missing_images, dataset, key_name, log):
    """Gather the annotated samples of every split for a text + image converter.

    rows: split -> list of (key, label, image file name, text) (key: the row's line or item number);
    files: split -> its annotation file (for messages). A missing image is an error naming the
    annotation file and the paths (image_io.missing_message), or with skip_missing_images a logged,
    counted skip. Returns (texts, paths, labels (int64), kept, order, skipped): kept[i] = (split,
    row) of sample i, order: split -> sample indices, skipped: split -> number of skipped rows."""
    texts, paths, labels, kept, order, skipped = [], [], [], [], {}, {}
    for split, split_rows in rows.items():
        split_paths = [image_root / r[2] for r in split_rows]
        name_of = lambda i: f"{files[split].name} {key_name} {split_rows[i][0]}"   # noqa: E731
        gone = set(drop_missing(split_paths, skip_missing_images, f"{files[split]} ({dataset})", name_of, log))
        skipped[split] = len(gone)
        idx = [i for i in range(len(split_rows)) if i not in gone]
        if not idx:
            raise ValueError(f"{files[split]}: no sample left (all images missing)")
        order[split] = np.arange(len(texts), len(texts) + len(idx), dtype=np.int64)
        texts += [split_rows[i][3] for i in idx]
        paths += [split_paths[i] for i in idx]
        labels += [split_rows[i][1] for i in idx]
        kept += [(split, split_rows[i]) for i in idx]
    return texts, paths, np.array(labels, dtype=np.int64), kept, order, skipped


def text_image_batches(order, texts, paths, labels, sample_ids, bert, resnet, size, crop, workers, block, log):
    """The batches of every split (``order``: split -> sample indices, in writing order): per
    block of ``block`` samples the images are decoded (image_io.ImageLoader) and passed through
    ``resnet``, the texts through ``bert.cls``."""
    with ImageLoader(size, crop, workers, block) as loader:
        for split, rows, images in decoded_blocks(order, loader, paths, log, every=10):
            yield split, {"text": bert.cls([texts[i] for i in rows]), "image": resnet(images),
                          "label": labels[rows], "sample_id": sample_ids[rows]}


def convert_text_image(out, name, class_names, rows, files, image_root, what, index, source, bert, resnet, *,
                       workers, block, samples_per_shard, overwrite, log, started, options):
    """Everything of an image + text feature converter after its annotation files are read ->
    ``<out>/<name>``: the samples (:func:`collect_text_image_rows`), their counts, the features,
    the shards.

    ``rows``, ``files``: as :func:`collect_text_image_rows`; ``what`` = (dataset, row key, count
    key), e.g. ("Sarcasm", "item", "items"): the names in messages and the meta.json count of
    annotated rows per split; ``index(kept)`` -> the index files (samples.csv); ``source(options,
    bert_x, resnet_x, counts)`` -> meta.json ``source``; ``bert``/``resnet``: the weights paths;
    ``options``: the converter's options as meta.json records them, the extractor settings among
    them (resnet_arch, resnet_width, device, batch_size, max_tokens, image_size, crop,
    skip_missing_images). sample_id: the sample's index; ``started``: the converter's start."""
    dataset, key_name, count_key = what
    texts, paths, labels, kept, order, skipped = collect_text_image_rows(
        rows, files, image_root, options["skip_missing_images"], dataset, key_name, log)
    counts = {count_key: {s: len(r) for s, r in rows.items()}, "missing_images_skipped": skipped,
              "splits": {s: int(len(i)) for s, i in order.items()},
              "per_class": {s: np.bincount(labels[i], minlength=len(class_names)).tolist()
                            for s, i in order.items()}}
    log(f"read annotations: {counts['splits']} samples ({time.perf_counter() - started:.1f}s)")

    bert_x, resnet_x = text_image_extractors(bert, resnet, options["resnet_arch"], options["resnet_width"],
                                             options["device"], options["batch_size"], options["max_tokens"])
    options = {**options, "max_tokens": bert_x.max_length}   # recorded: the truncation used (None: the model's)
    meta = converter.Meta("classification", len(class_names), text_image_modalities(bert_x, resnet_x),
                          source(options, bert_x, resnet_x, counts), class_names=class_names)
    batches = text_image_batches(order, texts, paths, labels, np.arange(len(texts), dtype=np.int64), bert_x,
                                 resnet_x, options["image_size"], options["crop"], workers, block, log)
    return converter.write(out, name, meta, batches, lambda: index(kept),
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=started)


def weights_source(bert, resnet, image_size, crop):
    return {"text": {"model": bert.describe(), "feature": "[CLS] vector of the last hidden state"},
            "image": {"model": resnet.describe(), "size": image_size,
                      "resize": ("centred square crop, then PIL bilinear (antialiased) to size x size"
                                 if crop == "center" else
                                 "whole image stretched to size x size, PIL bilinear (antialiased)"),
                      "input": "uint8 RGB / 255, then ImageNet mean/std"}}


def abspath(p):
    return str(pathlib.Path(os.path.expanduser(str(p))).resolve())
