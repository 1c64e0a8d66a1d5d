"""What every converter (``data_prep/<dataset>.py``, ``data_prep/from_arrays.py``) shares, written once.

Every converter's ``convert`` has one shape, in this order:

1. check its options and the output directory (:func:`check_output`), before any raw file is read;
2. READ the raw files into samples: every malformed or missing input is an error naming the file,
   line and field, before anything is written;
3. SPLIT the samples: the released lists, or one of the shared rules :func:`carve_val` (validation
   carved from train) and :func:`stratified_split` (test, then validation, out of all samples);
4. WRITE (:func:`write`): describe the shards (:class:`Meta`: task, classes, modalities,
   meta.json ``source``), stream the batches of each split through a ``ShardWriter`` (shards
   under temporary names, meta.json last, nothing left behind on an error), then write
   ``samples.csv`` (and any other index file) next to them. The image + table converters with a
   binary attribute label (CelebA, SUN Attribute) write through :func:`write_binary_image_table`.

The dataset-specific parts of each step are small named functions in the converter itself.
:func:`main` is the one command line of every converter: ``--out``, ``--name``,
``--samples-per-shard`` and ``--overwrite`` declared once, ``--help`` showing the module
docstring, and bad input refused in one line (``error: <file or flag>: <what>``, exit status 2).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import pathlib
import sys
import time
from typing import Callable, Iterable

import numpy as np

from data_prep import shards
from data_prep.image_io import image_table_batches, image_table_modalities, stratified_pick
from data_prep.shards.format import META_NAME, TMP_PREFIX


class InputError(ValueError):
    """Bad input: ``str(err)`` is ``<file or flag>: <what>``; :func:`main` prints it as one line
    ``error: ...`` (exit status 2) even when called from Python."""

    def __init__(self, where, what):
        super().__init__(f"{where}: {what}")


def no_log(msg):
    """The ``log`` of a converter called without one."""


# ----------------------------------------------------------------------------------- 1. output


def _writer_leftover(path):
    """A temporary file of a killed conversion, which ShardWriter clears and reuses."""
    return path.name.startswith(TMP_PREFIX) or path.name == f"{META_NAME}.tmp"


def check_output(out, name, overwrite=False):
    """Refuse, before any raw file is read, an output directory the writer would refuse at the
    end: ``<out>`` or ``<out>/<name>`` not a directory, or ``<out>/<name>`` not empty without
    ``overwrite`` (a directory holding only a killed conversion's temporary files counts as empty).
    Raises FileExistsError naming ``--out`` and the path; nothing is created or touched."""
    out = pathlib.Path(out)
    root = out / name
    for path in (out, root):
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"--out: {path}: exists and is not a directory")
    if not overwrite and root.is_dir() and not all(_writer_leftover(p) for p in root.iterdir()):
        raise FileExistsError(f"--out: {root}: dataset directory exists and is not empty (nothing was "
                              "written; pass --overwrite to replace it, or choose another --name or --out)")


# ------------------------------------------------------------------------------------ 3. split


def carve_val(train, labels, val_frac, seed):
    """Validation carved out of ``train`` (sample indices into ``labels``) -> (train, val), both
    in ``train``'s order. Stratified by ``image_io.stratified_pick``: per class floor(val_frac * n_c)
    topped up by largest remainder to ceil(val_frac * N), at least one per class with >= 2 samples
    (when val_frac > 0) and at least one left in train; class members permuted with numpy
    ``default_rng([seed, 1])``. ``val_frac`` 0 gives an empty val."""
    train = np.asarray(train, dtype=np.int64)
    val = stratified_pick(labels[train], val_frac, np.random.default_rng([seed, 1]),
                          min_picked=1 if val_frac > 0 else 0, min_left=1)
    return train[~val], train[val]


def stratified_split(labels, test_frac, val_frac, seed):
    """{"train", "val", "test"}: increasing positions into ``labels``. test = ``test_frac`` of
    every class (at least one, at least two left; ``default_rng([seed, 1])``), then val =
    ``val_frac`` of the rest (at least one, at least one left; ``default_rng([seed, 2])``), train =
    the remainder; per class floor(frac * n_c) topped up by largest remainder to ceil(frac * N)
    (``image_io.stratified_pick``). A class of >= 3 samples is in every split."""
    labels = np.asarray(labels)
    test = stratified_pick(labels, test_frac, np.random.default_rng([seed, 1]), min_picked=1, min_left=2)
    rest = np.nonzero(~test)[0]
    val = np.zeros(len(labels), dtype=bool)
    val[rest[stratified_pick(labels[rest], val_frac, np.random.default_rng([seed, 2]),
                             min_picked=1, min_left=1)]] = True
    return {"train": np.nonzero(~test & ~val)[0], "val": np.nonzero(val)[0], "test": np.nonzero(test)[0]}


# ------------------------------------------------------------------------------------ 4. write


@dataclasses.dataclass
class Meta:
    """meta.json's fields other than the splits (the ShardWriter's arguments). ``source`` is the
    dict the writer dumps when it closes: counts added to it while the batches are written land
    in meta.json."""
    task: str
    num_classes: int
    modalities: dict
    source: dict
    class_names: list | None = None
    label_shape: list | None = None


def write_index(root, header, rows, name="samples.csv"):
    """Write ``<root>/<name>``: one line per sample (sample_id, split, raw identifiers), so a
    shard row can be traced back to its raw files. Written atomically after the shards."""
    root = pathlib.Path(root)
    tmp = root / f"{name}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(tmp, root / name)
    return root / name


def write(out, name, meta: Meta, batches: Iterable, index: Callable[[], dict], *, samples_per_shard=None,
          overwrite=False, log=no_log, started=None, validate=False, what="") -> pathlib.Path:
    """The write phase of every converter -> the dataset directory ``<out>/<name>``.

    ``batches`` yields ``(split, {modality..., "label", "sample_id"})`` in writing order (a
    generator runs while the writer is open, and is closed on an error so that its decoding
    pools stop); ``index()``, called once the shards are complete, returns
    ``{file name: (header, rows)}`` written next to them (samples.csv, ...). ``validate``: check the
    written dataset with ``shards.validate``. Logs ``wrote <root> (<what>) in <s>s`` (seconds since
    ``started``, default: since this call)."""
    started = time.perf_counter() if started is None else started
    with shards.ShardWriter(out, name, meta.task, meta.num_classes, meta.modalities,
                            samples_per_shard=samples_per_shard, class_names=meta.class_names,
                            source=meta.source, label_shape=meta.label_shape,
                            overwrite=overwrite) as writer, contextlib.closing(iter(batches)) as stream:
        for split, batch in stream:
            writer.append(split, batch)
    for file_name, (header, rows) in index().items():
        write_index(writer.root, header, rows, name=file_name)
    if validate:
        shards.validate(writer.root)
    log(f"wrote {writer.root}{f' ({what})' if what else ''} in {time.perf_counter() - started:.1f}s"
        + ("; validated" if validate else ""))
    return writer.root


def write_binary_image_table(out, name, label, samples, feature_names, missing, source, index, *, image_size,
                             crop, workers, block, samples_per_shard, overwrite, log, started) -> pathlib.Path:
    """The write phase of the image + table converters with a binary attribute label (CelebA,
    SUN Attribute) -> ``<out>/<name>``. ``samples`` = (paths, table, labels, order) over every raw
    row (sample_id: the row's index; ``order``: split -> kept rows), ``missing``: the rows skipped;
    ``source(counts)`` -> meta.json ``source`` given the counts (rows, skipped, per split: samples,
    positives); classes ``not <label>``, ``<label>``."""
    paths, table, labels, order = samples
    counts = {"rows": len(paths), "missing_images_skipped": len(missing),
              "splits": {s: int(len(i)) for s, i in order.items()},
              "positives": {s: int(labels[i].sum()) for s, i in order.items()}}
    meta = Meta("classification", 2, image_table_modalities(image_size, feature_names), source(counts),
                class_names=[f"not {label}", label])
    batches = image_table_batches(order, paths, table, labels, np.arange(len(paths), dtype=np.int64),
                                  image_size, crop, workers, block, log)
    return write(out, name, meta, batches, index, samples_per_shard=samples_per_shard, overwrite=overwrite,
                 log=log, started=started)


# -------------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit 2, as every other refusal
        required = "the following arguments are required: "
        if message.startswith(required):
            message = f"{message[len(required):]}: required"
        self.exit(2, f"error: {message}\n")


_AT_LEAST = (("samples_per_shard", "--samples-per-shard", 1), ("workers", "--workers", 0),
             ("block", "--block", 1))


def build_parser(prog, doc, arguments, *, name_help, name_default=None, name_required=False):
    """The argument parser of converter ``prog``: its own options (``arguments(parser)``), then
    the output options every converter shares."""
    p = _Parser(prog=f"python -m data_prep.{prog}", description=doc.split("\n\n")[0],
                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="output directory (the dataset goes to <out>/<name>)")
    out.add_argument("--name", default=name_default, required=name_required, help=name_help)
    out.add_argument("--samples-per-shard", type=int, help="default: about 1 GiB per shard")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the shards of an existing <out>/<name> (default: refuse)")
    return p


def main(argv, *, prog, doc, arguments, convert, options=vars, name_help, name_default=None,
         name_required=False, log_to="stderr", refusals=(InputError,)):
    """The command line of converter ``prog`` (``python -m data_prep.<prog>``) -> exit status.

    ``arguments(parser)`` adds the converter's own options; the parsed options, mapped by
    ``options(args)`` (default: as named), are ``convert``'s keyword arguments, with a ``log``
    printing ``[prog] message`` to ``log_to`` (stderr or stdout). Argument errors are one line.
    Bad input is one line ``error: ...`` with exit status 2: always for ``refusals``; for any
    other ValueError or OSError when run as a command (``argv`` None), while a Python caller
    (``argv`` given) gets the exception itself."""
    p = build_parser(prog, doc, arguments, name_help=name_help, name_default=name_default,
                     name_required=name_required)
    args = p.parse_args(argv)
    for key, flag, low in _AT_LEAST:
        value = getattr(args, key, None)
        if value is not None and value < low:
            p.error(f"{flag}: must be >= {low}, got {value}")
    log = lambda msg: print(f"[{prog}] {msg}", file=getattr(sys, log_to), flush=True)   # noqa: E731
    try:
        convert(**options(args), log=log)
    except (ValueError, OSError) as e:
        if argv is not None and not isinstance(e, refusals):
            raise
        print("error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    return 0
