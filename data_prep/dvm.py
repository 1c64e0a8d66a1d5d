"""DVM-CAR v2.0 -> shards: GAAL's car-model task (image + table, label Genmodel_ID).

CLI:
  python -m data_prep.dvm --raw DIR --out DIR [--name dvm] [--low-data 1.0|0.1|0.01]
      [--image-size 128] [--workers N] [--min-class-count 100] [--seed 2022]
      [--skip-missing-images] [--crop none|center] [--samples-per-shard N] [--block 512]
      [--overwrite]

Raw layout (under --raw):
  tables_V2.0/Ad_table.csv          Maker, Genmodel, Genmodel_ID, Adv_ID, Adv_year, Adv_month, Color,
                                    Reg_year, Bodytype, Runned_Miles, Engin_size ("2.0L"), Gearbox,
                                    Fuel_type, Price, Seat_num, Door_num (headers may carry spaces)
  tables_V2.0/Price_table.csv       Genmodel_ID, Year, Entry_price (Genmodel unused)
  tables_V2.0/Image_table.csv       Image_ID, Image_name (Genmodel_ID, Predicted_viewpoint,
                                    Quality_check are not used)
  tables_V2.0/Ad_table (extra).csv  Adv_ID, Wheelbase, Length, Width, Height (other columns unused)
  resized_DVM/<f0>/<f1>/<f2>/<f3>/<Image_name>   f0..f3: the first four '$$' fields of the name
A missing column is an error naming the file and the column; a missing image file is an error
naming its path (--skip-missing-images: log and drop those adverts instead).

Output <out>/<name>/ (name: --name, default "dvm", or "dvm_low<frac>" e.g. "dvm_low0.1"):
  image  kind image    uint8 [3, S, S] (S = --image-size, default 128; no mean/std normalisation)
  table  kind tabular  float32 [17]: 13 continuous, z-scored with train statistics, in the order
         Wheelbase, Height, Width, Length, Adv_year, Adv_month, Reg_year, Runned_Miles, Price,
         Seat_num, Door_num, Entry_price, Engine_size; then the codes of Color, Bodytype, Gearbox,
         Fuel_type (cardinalities in meta.json modalities.table.categorical; one-hot at load)
  label  index of the advert's Genmodel_ID (class_names = the Genmodel_IDs)
  samples.csv  sample_id, split, Adv_ID, Genmodel_ID, Image_name of every sample
meta.json `source` records the options, drop counts, split rule and seed, jitter rule, category
values per code, the z-score statistics and the "Maker Genmodel" name of each class.

Pipeline and the choices the paper and the released loader leave open:
1. Ad_table: header names and values are stripped; a duplicated Adv_ID keeps its first row.
   Missing = empty or a pandas NA string ("NaN", "NA", ...). Adv_year, Adv_month, Reg_year,
   Runned_Miles, Price, Seat_num, Door_num are parsed like pandas.to_numeric(errors="coerce")
   (non-numeric or non-finite -> missing; "12,000" is non-numeric, as it was for the released
   pipeline); Engine_size = the first number in Engin_size ("2.0L" -> 2.0, none -> missing).
2. Price join: inner join on (Genmodel_ID, Reg_year) = (Genmodel_ID, Year), years compared as
   integers ("2017.0" == "2017"); a Reg_year that is not an integer joins nothing. Duplicate
   (Genmodel_ID, Year) rows in Price_table: the first wins (the count is recorded).
3. Physical dimensions from Ad_table (extra) by Adv_ID. A value that is missing, non-numeric,
   non-finite or <= 0 (and an advert absent from the extra table) is filled, per column, with the
   value of the first advert of the same Genmodel_ID (Genmodel_ID from Ad_table; file order of
   the extra table) that has a valid value; if there is none the advert has a missing value.
4. Images: an image belongs to the advert given by the first two '$$' fields of its Image_ID.
   ONE image per advert: the one whose Image_name sorts first (Python string order); the other
   images of the advert are not used even if that file is missing. Viewpoint and quality
   columns are ignored.
5. Adverts without a price match, with any missing value or without an image are dropped; then
   (unless skipped) a missing image file is an error; then classes with fewer than
   --min-class-count (default 100) adverts are dropped. The headers of all four tables are
   checked before any is read. Counts of every drop reason and of filled dimensions are
   recorded in meta.json source.counts.
6. Samples are ordered by Adv_ID (natural order: digit runs compare as numbers); sample_id = the
   position in that order, so the same advert has the same id in every low-data variant.
   Classes are the kept Genmodel_IDs in natural order. Categorical codes: the sorted distinct
   values over all kept adverts (all splits), so codes are the same in every split and variant.
7. Jitter: np.random.default_rng(seed).integers(-50, 51, size=(N, 4)) in sample order is added
   to (Wheelbase, Height, Width, Length) in mm, before splitting.
8. Split (stratified per class, implemented here): test = 50% of all adverts, then val = 20% of
   the rest, train = the remainder; per-class counts floor(frac * n_c) topped up by largest
   remainder to a total of ceil(frac * N); within a class, indices are permuted by
   default_rng([seed, 1]) (test) and default_rng([seed, 2]) (val). A class with >= 3 adverts is
   in every split; smaller classes fill train first, then val.
9. Low-data (--low-data f < 1): train keeps f of each class (same allocation, total ceil(f*n),
   at least one advert per class; permutation default_rng([seed, 3])); val and test unchanged.
10. z-score: mean and std (ddof 0) of the 13 continuous columns over the written train split
   (the low-data train for a low-data variant); a constant column gets std 1. The released
   pipeline z-scored over all rows before splitting, which leaks val/test statistics.
11. Images: PIL decode, RGB, stretched to S x S with bilinear (antialiased) resampling
   (--crop center: largest centred square first); see data_prep.image_io.
"""
from __future__ import annotations

import pathlib
import re
import sys
import time
from typing import NamedTuple

import numpy as np

from data_prep import converter
from data_prep.image_io import (NA_STRINGS, CsvColumnError, add_image_table_args, csv_header, drop_missing,
                                image_table_batches, image_table_modalities, read_csv, resize_rule,
                                stratified_pick, to_float, zscore_stats)

TABLES = "tables_V2.0"
AD_TABLE = "Ad_table.csv"
PRICE_TABLE = "Price_table.csv"
IMAGE_TABLE = "Image_table.csv"
EXTRA_TABLE = "Ad_table (extra).csv"
IMAGE_DIR = "resized_DVM"

AD_COLUMNS = ("Maker", "Genmodel", "Genmodel_ID", "Adv_ID", "Adv_year", "Adv_month", "Color",
              "Reg_year", "Bodytype", "Runned_Miles", "Engin_size", "Gearbox", "Fuel_type",
              "Price", "Seat_num", "Door_num")
PRICE_COLUMNS = ("Genmodel_ID", "Year", "Entry_price")
IMAGE_COLUMNS = ("Image_ID", "Image_name")
DIMENSIONS = ("Wheelbase", "Height", "Width", "Length")        # order in the table
EXTRA_COLUMNS = ("Adv_ID", "Wheelbase", "Length", "Width", "Height")
AD_NUMERIC = ("Adv_year", "Adv_month", "Reg_year", "Runned_Miles", "Price", "Seat_num", "Door_num")
CONTINUOUS = ("Wheelbase", "Height", "Width", "Length", "Adv_year", "Adv_month", "Reg_year",
              "Runned_Miles", "Price", "Seat_num", "Door_num", "Entry_price", "Engine_size")
CATEGORICAL = ("Color", "Bodytype", "Gearbox", "Fuel_type")
TABLE_COLUMNS = {"ad": (AD_TABLE, AD_COLUMNS), "price": (PRICE_TABLE, PRICE_COLUMNS),
                 "image": (IMAGE_TABLE, IMAGE_COLUMNS), "extra": (EXTRA_TABLE, EXTRA_COLUMNS)}
SEED = 2022
TEST_FRAC = 0.5
VAL_FRAC = 0.2          # of what remains after the test split
JITTER_MM = 50
MIN_CLASS_COUNT = 100
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")


def natural_key(text):
    """Sort key in which runs of digits compare as numbers ("2_1$$10" after "2_1$$9")."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


def _year(text):
    v = to_float(text)
    return int(v) if v is not None and v == int(v) else None


def _engine_size(text):
    if text in NA_STRINGS:
        return None
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def _read_ads(path):
    """Adv_ID -> (Genmodel_ID, "Maker Genmodel", {numeric}, {categorical}); first row wins."""
    ads, duplicates = {}, 0
    for _, row in read_csv(path, AD_COLUMNS):
        adv = row["Adv_ID"]
        if adv in ads:
            duplicates += 1
            continue
        nums = {c: to_float(row[c]) for c in AD_NUMERIC}
        nums["Engine_size"] = _engine_size(row["Engin_size"])
        cats = {c: (None if row[c] in NA_STRINGS else row[c]) for c in CATEGORICAL}
        gid = row["Genmodel_ID"] if row["Genmodel_ID"] not in NA_STRINGS else None
        ads[adv] = (gid, f"{row['Maker']} {row['Genmodel']}".strip(), nums, cats)
    return ads, duplicates


def _read_prices(path):
    prices, duplicates, conflicts = {}, 0, 0
    for _, row in read_csv(path, PRICE_COLUMNS):
        key = (row["Genmodel_ID"], _year(row["Year"]))
        price = to_float(row["Entry_price"])
        if key in prices:
            duplicates += 1
            conflicts += prices[key] != price
            continue
        prices[key] = price
    return prices, {"duplicate_keys": duplicates, "conflicting_duplicates": conflicts}


def _read_dimensions(path, ads):
    """Adv_ID -> [Wheelbase, Height, Width, Length] with invalid values filled (see module doc)."""
    own, fill = {}, {}
    for _, row in read_csv(path, EXTRA_COLUMNS):
        adv = row["Adv_ID"]
        if adv not in ads or adv in own:
            continue
        vals = []
        for c in DIMENSIONS:
            v = to_float(row[c])
            vals.append(v if v is not None and v > 0 else None)
        own[adv] = vals
        gid = ads[adv][0]
        slot = fill.setdefault(gid, [None] * len(DIMENSIONS))
        for j, v in enumerate(vals):
            if slot[j] is None and v is not None:
                slot[j] = v
    dims, filled = {}, dict.fromkeys(DIMENSIONS, 0)
    for adv, (gid, _, _, _) in ads.items():
        vals = list(own.get(adv, [None] * len(DIMENSIONS)))
        for j, c in enumerate(DIMENSIONS):
            if vals[j] is None:
                vals[j] = fill.get(gid, [None] * len(DIMENSIONS))[j]
                filled[c] += vals[j] is not None
        dims[adv] = vals
    return dims, filled


def _pick_images(path, ads):
    """Adv_ID -> (Image_name, line) of the advert's image whose name sorts first."""
    chosen, unjoinable = {}, 0
    for line, row in read_csv(path, IMAGE_COLUMNS):
        parts = row["Image_ID"].split("$$")
        if len(parts) < 2:
            unjoinable += 1
            continue
        adv = "$$".join(parts[:2])
        if adv not in ads or not row["Image_name"]:
            continue
        if adv not in chosen or row["Image_name"] < chosen[adv][0]:
            chosen[adv] = (row["Image_name"], line)
    return chosen, unjoinable


def image_path(raw, image_name, where="Image_table.csv"):
    """``<raw>/resized_DVM/<f0>/<f1>/<f2>/<f3>/<image_name>``."""
    fields = image_name.split("$$")
    if len(fields) < 5:
        raise ValueError(f"{where}: Image_name {image_name!r} has fewer than 5 '$$'-separated "
                         "fields (need Maker$$Genmodel$$Year$$Color$$...)")
    return pathlib.Path(raw) / IMAGE_DIR / fields[0] / fields[1] / fields[2] / fields[3] / image_name


def _default_name(low_data):
    return "dvm" if low_data >= 1 else f"dvm_low{low_data:g}"


class Advert(NamedTuple):
    """One kept advert (a sample), in Adv_ID natural order."""
    adv: str
    gid: str
    model: str           # "Maker Genmodel"
    continuous: list     # CONTINUOUS values
    categorical: list    # CATEGORICAL values
    image_name: str
    path: pathlib.Path


# ---------------------------------------------------------------------------------------- read


def _table_paths(raw):
    """The four tables, their required columns checked before any long read."""
    paths = {key: pathlib.Path(raw) / TABLES / f for key, (f, _) in TABLE_COLUMNS.items()}
    for key, (_, required) in TABLE_COLUMNS.items():
        header = csv_header(paths[key])
        for col in required:
            if col not in header:
                raise CsvColumnError(f"{paths[key]}: missing column '{col}' (header has {header})")
    return paths


def _read_tables(paths, log, started):
    """-> (ads, prices, dims, chosen images, counts for meta.json) of the four tables."""
    ads, dup_ads = _read_ads(paths["ad"])
    prices, price_dups = _read_prices(paths["price"])
    dims, filled = _read_dimensions(paths["extra"], ads)
    chosen, unjoinable = _pick_images(paths["image"], ads)
    log(f"read tables: {len(ads)} adverts, {len(prices)} prices, {len(chosen)} adverts with "
        f"images ({time.perf_counter() - started:.1f}s)")
    counts = {"adverts_in_ad_table": len(ads), "duplicate_adv_ids": dup_ads, "price_table": price_dups,
              "image_ids_without_adv_id": unjoinable, "dimensions_filled_from_same_model": filled}
    return ads, prices, dims, chosen, counts


def _join(raw, paths, ads, prices, dims, chosen):
    """Steps 2-5 of the module doc up to the image files -> (adverts with a price match, every
    value and an image, in Adv_ID natural order; drop counts; missing values by column)."""
    dropped = {"no_price_match": 0, "missing_value": 0, "no_image": 0, "missing_image_file": 0,
               "small_class": 0}
    missing_by_column, rows = {}, []
    for adv in sorted(ads, key=natural_key):
        gid, model, nums, cats = ads[adv]
        reg = nums["Reg_year"]
        key = (gid, int(reg) if reg is not None and reg == int(reg) else None)
        if gid is None or key[1] is None or key not in prices:
            dropped["no_price_match"] += 1
            continue
        values = {**dict(zip(DIMENSIONS, dims[adv])), **nums, "Entry_price": prices[key]}
        missing = [c for c in CONTINUOUS if values[c] is None] + [c for c in CATEGORICAL if cats[c] is None]
        if missing:
            dropped["missing_value"] += 1
            for c in missing:
                missing_by_column[c] = missing_by_column.get(c, 0) + 1
            continue
        if adv not in chosen:
            dropped["no_image"] += 1
            continue
        img_name, line = chosen[adv]
        rows.append(Advert(adv, gid, model, [values[c] for c in CONTINUOUS], [cats[c] for c in CATEGORICAL],
                           img_name, image_path(raw, img_name, f"{paths['image']}, line {line}")))
    return rows, dropped, missing_by_column


def _drop_missing_images(raw, rows, skip, dropped, log):
    """Adverts whose image file exists (without ``skip`` a missing one is an error)."""
    missing = drop_missing([r.path for r in rows], skip, f"{raw} (DVM)", lambda i: f"advert {rows[i].adv}", log)
    dropped["missing_image_file"] = len(missing)
    gone = set(missing)
    return [r for i, r in enumerate(rows) if i not in gone]


def _keep_large_classes(raw, rows, min_class_count, dropped):
    """-> (adverts of the classes with >= min_class_count adverts, the classes in natural order)."""
    counts = {}
    for r in rows:
        counts[r.gid] = counts.get(r.gid, 0) + 1
    classes = sorted((g for g, n in counts.items() if n >= min_class_count), key=natural_key)
    kept = set(classes)
    dropped["small_class"] = sum(n for g, n in counts.items() if g not in kept)
    rows = [r for r in rows if r.gid in kept]
    if not rows:
        raise ValueError(f"{raw}: no advert left after joins and filters (dropped: {dropped}; "
                         f"--min-class-count {min_class_count})")
    return rows, classes


def _arrays(rows, classes, seed):
    """-> (labels, continuous (N, 13) float64 with the dimensions jittered, categorical codes
    (N, 4) float64, the sorted values of each categorical column)."""
    class_index = {g: i for i, g in enumerate(classes)}
    labels = np.array([class_index[r.gid] for r in rows], dtype=np.int64)
    cont = np.array([r.continuous for r in rows], dtype=np.float64)
    categories = {c: sorted({r.categorical[j] for r in rows}) for j, c in enumerate(CATEGORICAL)}
    lookup = {c: {v: i for i, v in enumerate(vals)} for c, vals in categories.items()}
    codes = np.array([[lookup[c][v] for c, v in zip(CATEGORICAL, r.categorical)] for r in rows],
                     dtype=np.float64)
    jitter = np.random.default_rng(seed).integers(-JITTER_MM, JITTER_MM + 1, size=(len(rows), len(DIMENSIONS)))
    cont[:, :len(DIMENSIONS)] += jitter
    return labels, cont, codes, categories


# --------------------------------------------------------------------------------------- split


def _split(labels, seed, low_data):
    """-> (split -> sample indices, train size before the low-data cut); module doc steps 8-9."""
    order = converter.stratified_split(labels, TEST_FRAC, VAL_FRAC, seed)
    full_train = len(order["train"])
    if low_data < 1:
        keep = stratified_pick(labels[order["train"]], low_data, np.random.default_rng([seed, 3]), min_picked=1)
        order["train"] = order["train"][keep]
    return order, full_train


# --------------------------------------------------------------------------------------- write


def _source(raw, paths, options, counts, categories, mean, std, rows, classes):
    models = {}
    for r in rows:
        models.setdefault(r.gid, r.model)
    seed, low_data = options["seed"], options["low_data"]
    return {
        "converter": "data_prep.dvm", "raw": str(raw),
        "tables": {k: str(p) for k, p in paths.items()},
        "options": options,
        "counts": counts,
        "image_rule": "one image per advert: the advert's Image_name that sorts first (string order)",
        "image": {"size": options["image_size"], "resize": resize_rule(options["crop"]), "normalize": "none"},
        "split": {"rule": "stratified per class by Genmodel_ID: test = 50% of all (ceil), then val "
                          "= 20% of the rest (ceil), train = remainder; per class floor(frac*n_c) "
                          "topped up by largest remainder; class indices permuted with "
                          "numpy default_rng([seed, 1]) (test) and default_rng([seed, 2]) (val)",
                  "seed": seed, "test_frac": TEST_FRAC, "val_frac_of_rest": VAL_FRAC,
                  "low_data": low_data,
                  "low_data_rule": "train keeps ceil(low_data * n_train) adverts, stratified, >= 1 "
                                   "per class, permutation default_rng([seed, 3]); val/test unchanged"},
        "jitter": {"columns": list(DIMENSIONS), "rule": "integers uniform in [-50, 50] mm from "
                   "numpy default_rng(seed).integers(-50, 51, (N, 4)), samples in sample_id order, "
                   "added before splitting", "seed": seed},
        "standardisation": {"table": {
            "fitted_on": "train", "columns": list(CONTINUOUS), "mean": mean.tolist(),
            "std": std.tolist(), "ddof": 0,
            "note": "the released pipeline z-scored over all rows before splitting (val/test "
                    "leakage); here the statistics come from the written train split only"}},
        "categories": categories,
        "class_models": [models[g] for g in classes],
        "sample_id": "position of the advert in Adv_ID natural order among the kept adverts; "
                     "samples.csv maps sample_id to Adv_ID and Image_name",
    }


def _index(rows, order):
    split_of = {}
    for s, idx in order.items():
        split_of.update(dict.fromkeys(idx.tolist(), s))
    return {"samples.csv": (["sample_id", "split", "Adv_ID", "Genmodel_ID", "Image_name"],
                            [[i, split_of[i], r.adv, r.gid, r.image_name] for i, r in enumerate(rows)
                             if i in split_of])}


def convert(raw, out, name=None, low_data=1.0, image_size=128, workers=0,
            min_class_count=MIN_CLASS_COUNT, seed=SEED, skip_missing_images=False, crop="none",
            samples_per_shard=None, block=512, overwrite=False, log=None) -> pathlib.Path:
    """Convert a DVM-CAR v2.0 directory into ``<out>/<name>/`` (see the module docstring)."""
    log = log or converter.no_log
    if not 0 < low_data <= 1:
        raise ValueError(f"low_data must be in (0, 1], got {low_data}")
    if min_class_count < 1:
        raise ValueError(f"min_class_count must be >= 1, got {min_class_count}")
    name = name or _default_name(low_data)
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    paths = _table_paths(raw)
    t0 = time.perf_counter()
    ads, prices, dims, chosen, counts = _read_tables(paths, log, t0)
    rows, dropped, missing_by_column = _join(raw, paths, ads, prices, dims, chosen)
    rows = _drop_missing_images(raw, rows, skip_missing_images, dropped, log)
    rows, classes = _keep_large_classes(raw, rows, min_class_count, dropped)
    log(f"{len(rows)} adverts in {len(classes)} classes kept; dropped {dropped}")
    labels, cont, codes, categories = _arrays(rows, classes, seed)

    order, full_train = _split(labels, seed, low_data)
    mean, std = zscore_stats(cont[order["train"]])
    table = np.concatenate([(cont - mean) / std, codes], axis=1).astype(np.float32)

    counts.update(dropped=dropped, missing_values_by_column=missing_by_column, kept=len(rows),
                  classes=len(classes), train_before_low_data=full_train,
                  splits={s: int(len(i)) for s, i in order.items()})
    options = {"low_data": low_data, "image_size": image_size, "min_class_count": min_class_count,
               "seed": seed, "skip_missing_images": skip_missing_images, "crop": crop}
    meta = converter.Meta("classification", len(classes), image_table_modalities(
        image_size, CONTINUOUS, {c: len(categories[c]) for c in CATEGORICAL}),
        _source(raw, paths, options, counts, categories, mean, std, rows, classes), class_names=list(classes))
    batches = image_table_batches(order, [r.path for r in rows], table, labels,
                                  np.arange(len(rows), dtype=np.int64), image_size, crop, workers, block, log)
    return converter.write(out, name, meta, batches, lambda: _index(rows, order),
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0)


# ---------------------------------------------------------------------------------------- CLI


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="DVM-CAR v2.0 root (tables_V2.0/, resized_DVM/)")
    add_image_table_args(parser, image_size=128)
    parser.add_argument("--low-data", type=float, default=1.0,
                        help="fraction of train to keep (1.0, 0.1, 0.01; >= 1 advert per class)")
    parser.add_argument("--min-class-count", type=int, default=MIN_CLASS_COUNT)
    parser.add_argument("--seed", type=int, default=SEED)


def main(argv=None):
    return converter.main(argv, prog="dvm", doc=__doc__, arguments=_arguments, convert=convert,
                          name_help="dataset name (default dvm, or dvm_low<frac> with --low-data)")


if __name__ == "__main__":
    sys.exit(main())
