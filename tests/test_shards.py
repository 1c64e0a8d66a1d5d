"""Shard format: writer/reader round trip, validation errors, writer checks, sampler, DataLoader."""
import json
import os
import pickle
import time

import h5py
import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.shards import validation
from data_prep.shards import (
    FORMAT, KINDS, VERSION, ShardBatchSampler, ShardDataset, ShardFormatError, ShardWriter,
    load_meta, validate, write_dataset,
)

ALL_DTYPES = ["uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool"]


def _modalities():
    mods = {f"m_{dt}": {"kind": "features", "shape": [3], "dtype": dt} for dt in ALL_DTYPES}
    mods["image"] = {"kind": "image", "shape": [3, 5, 4], "dtype": "uint8"}
    mods["table"] = {"kind": "tabular", "shape": [3], "dtype": "float32",
                     "continuous": ["a", "b"], "categorical": {"c": 4}}
    return mods


def _arrays(mods, n, first_id, seed, task="classification", num_classes=5):
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in mods.items():
        shape = (n, *spec["shape"])
        dt = np.dtype(spec["dtype"])
        if dt == np.bool_:
            out[name] = rng.integers(0, 2, shape).astype(bool)
        elif dt.kind in "iu":
            info = np.iinfo(dt)
            out[name] = rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dt)
        else:
            out[name] = rng.standard_normal(shape).astype(dt)
        if spec["kind"] == "tabular":   # categorical columns (after the continuous ones) hold codes
            first = len(spec.get("continuous", []))
            for j, card in enumerate(spec.get("categorical", {}).values()):
                out[name][:, first + j] = rng.integers(0, card, n)
    if task == "classification":
        out["label"] = rng.integers(0, num_classes, n).astype(np.int64)
    elif task == "regression":
        out["label"] = rng.standard_normal(n).astype(np.float32)
    else:
        out["label"] = rng.integers(0, num_classes, (n, 6, 7)).astype(np.uint8)
    out["sample_id"] = np.arange(first_id, first_id + n, dtype=np.int64)
    return out


@pytest.fixture(autouse=True)
def scan_cache(tmp_path, monkeypatch):
    """Each test gets its own value-scan cache directory (never the user's ~/.cache)."""
    path = tmp_path / "scan-cache"
    monkeypatch.setenv(shards.CACHE_ENV, str(path))
    return path


def _concat(parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture
def toy(tmp_path):
    """A small classification dataset: train 23 samples in shards of 10 (appended in uneven
    batches interleaved with val), val 7 samples."""
    mods = _modalities()
    train_parts = [_arrays(mods, n, i0, s) for n, i0, s in [(4, 0, 1), (13, 4, 2), (6, 17, 3)]]
    val = _arrays(mods, 7, 1000, 4)
    with ShardWriter(tmp_path, "toy", "classification", 5, mods, samples_per_shard=10,
                     source={"test": True}) as w:
        w.append("train", train_parts[0])
        w.append("val", val)
        w.append("train", train_parts[1])
        w.append("train", train_parts[2])
    return w.root, mods, {"train": _concat(train_parts), "val": val}


def _assert_batch_equal(batch, ref, indices, names):
    for name in [*names, "label", "sample_id"]:
        got = batch[name].numpy()
        np.testing.assert_array_equal(got, ref[name][indices], err_msg=name)
        assert got.dtype == ref[name].dtype, name
    np.testing.assert_array_equal(batch["index"].numpy(), indices)
    assert batch["index"].dtype == torch.int64


# ------------------------------------------------------------------------- round trip


def test_round_trip_all_dtypes(toy):
    root, mods, ref = toy
    meta = validate(root)
    assert meta["format"] == FORMAT and meta["version"] == VERSION
    assert list(meta["modalities"]) == list(mods)
    assert meta["splits"]["train"]["shards"] == [f"train-{i:05d}-of-00003.h5" for i in range(3)]
    assert meta["splits"]["train"]["num_samples"] == 23
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["meta.json", "val-00000-of-00001.h5"] + meta["splits"]["train"]["shards"])
    ds = ShardDataset(root, "train")
    assert len(ds) == 23
    for i in [0, 9, 10, 22]:   # single reads, across shard borders
        item = ds[i]
        for name in [*mods, "label", "sample_id"]:
            np.testing.assert_array_equal(item[name].numpy(), ref["train"][name][i])
        assert item["index"].item() == i and item["label"].shape == ()
    assert ds[-1]["sample_id"].item() == ref["train"]["sample_id"][-1]
    whole = ds[list(range(23))]
    _assert_batch_equal(whole, ref["train"], np.arange(23), mods)


def test_batched_reads_keep_order_with_unsorted_and_duplicate_indices(toy):
    root, mods, ref = toy
    ds = ShardDataset(root, "train")
    for indices in ([22, 3, 15, 3, 0, 22, 9, 10], np.array([5, 4, 3, 2, 1]), [7], [12, 12, 12],
                    [8, 1, 2, 3, 6, 7, 0, 19, 18, 11]):   # several runs of consecutive rows per shard
        _assert_batch_equal(ds[indices], ref["train"], np.asarray(indices), mods)
    _assert_batch_equal(ds[torch.tensor([1, 20])], ref["train"], np.array([1, 20]), mods)
    rng = np.random.default_rng(0)
    for _ in range(200):   # random batches: runs, repeats inside runs, several shards, any order
        indices = rng.integers(0, 23, size=int(rng.integers(1, 40)))
        _assert_batch_equal(ds[indices], ref["train"], indices, mods)
    with pytest.raises(IndexError):
        ds[[0, 23]]
    empty = ds[[]]
    assert empty["image"].shape == (0, 3, 5, 4) and empty["label"].dtype == torch.int64
    assert set(empty) == {*mods, "label", "sample_id", "index"}


def test_modality_subset_and_val_split(toy):
    root, mods, ref = toy
    meta = validate(root)
    ds = ShardDataset(root, "val", modalities=["table", "image"], meta=meta)
    assert ds.modalities == ["image", "table"]   # canonical (meta) order
    batch = ds[[6, 0]]
    assert set(batch) == {"image", "table", "label", "sample_id", "index"}
    _assert_batch_equal(batch, ref["val"], np.array([6, 0]), ["image", "table"])
    with pytest.raises(KeyError):
        ShardDataset(root, "val", modalities=["nope"], meta=meta)


@pytest.mark.parametrize("task", ["regression", "segmentation"])
def test_round_trip_other_tasks(tmp_path, task):
    mods = {"x": {"kind": "volume", "shape": [2, 3, 4], "dtype": "float32"}}
    num_classes = 1 if task == "regression" else 4
    arrays = _arrays(mods, 9, 0, 0, task=task, num_classes=num_classes)
    root = write_dataset(tmp_path, task, task, num_classes, mods, {"test": arrays}, samples_per_shard=4)
    meta = validate(root)
    if task == "segmentation":
        assert meta["label_shape"] == [6, 7]
    ds = ShardDataset(root, "test", meta=meta)
    _assert_batch_equal(ds[[8, 1, 4]], arrays, np.array([8, 1, 4]), ["x"])


def test_dataset_pickles_and_reopens(toy):
    root, mods, ref = toy
    ds = ShardDataset(root, "train")
    ds[[0, 15]]   # opens handles
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {}
    _assert_batch_equal(clone[[15, 0]], ref["train"], np.array([15, 0]), mods)


def test_chunks_along_sample_axis_under_one_mib(tmp_path):
    mods = {"small": {"kind": "features", "shape": [8], "dtype": "float32"},
            "big": {"kind": "spectrogram", "shape": [257, 1003], "dtype": "float32"}}
    arrays = _arrays(mods, 3, 0, 0)
    root = write_dataset(tmp_path, "c", "classification", 5, mods, {"train": arrays})
    with h5py.File(root / "train-00000-of-00001.h5", "r", locking=False) as f:
        assert f["small"].chunks == (64, 8)
        big = f["big"].chunks
        assert big[0] == 1 and np.prod(big) * 4 < 1 << 20
        assert f["small"].compression is None
    np.testing.assert_array_equal(ShardDataset(root, "train")[[2, 0]]["big"].numpy(), arrays["big"][[2, 0]])


# ------------------------------------------------------------------------- validation errors


def _edit_meta(root, edit):
    path = root / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _expect_error(root, *fragments, splits=None):
    with pytest.raises(ShardFormatError) as info:
        validate(root, splits)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_meta_key(toy):
    root = toy[0]
    _edit_meta(root, lambda m: m.pop("task"))
    _expect_error(root, str(root / "meta.json"), "'task'")


def test_wrong_version(toy):
    root = toy[0]
    _edit_meta(root, lambda m: m.update(version=2))
    _expect_error(root, "meta.json", "'version'")


def test_wrong_format_and_task(toy):
    root = toy[0]
    _edit_meta(root, lambda m: m.update(format="other"))
    _expect_error(root, "meta.json", "'format'")
    _edit_meta(root, lambda m: m.update(format=FORMAT, task="ranking"))
    _expect_error(root, "meta.json", "'task'")


def test_unknown_kind(toy):
    root = toy[0]
    assert "hologram" not in KINDS
    _edit_meta(root, lambda m: m["modalities"]["image"].update(kind="hologram"))
    _expect_error(root, "meta.json", "modalities.image.kind", "hologram")


def test_missing_meta_file(tmp_path):
    with pytest.raises(ShardFormatError, match="meta.json"):
        load_meta(tmp_path)


def test_shape_mismatch(toy):
    root = toy[0]
    _edit_meta(root, lambda m: m["modalities"]["image"].update(shape=[3, 4, 5]))
    _expect_error(root, "train-00000-of-00003.h5", "'image'", "shape")


def test_dtype_mismatch(toy):
    root = toy[0]
    _edit_meta(root, lambda m: m["modalities"]["m_float16"].update(dtype="float32"))
    _expect_error(root, "train-00000-of-00003.h5", "'m_float16'", "dtype")


def test_missing_modality_dataset(toy):
    root = toy[0]
    with h5py.File(root / "val-00000-of-00001.h5", "a", locking=False) as f:
        del f["table"]
    _expect_error(root, "val-00000-of-00001.h5", "'table'", "missing")
    validate(root, ["train"])   # the other split is still fine


def test_label_dtype_mismatch(toy):
    root = toy[0]
    with h5py.File(root / "val-00000-of-00001.h5", "a", locking=False) as f:
        labels = f["label"][()]
        del f["label"]
        f["label"] = labels.astype(np.int32)
    _expect_error(root, "val-00000-of-00001.h5", "'label'", "dtype")


def test_count_mismatch(toy):
    root = toy[0]

    def edit(m):
        m["splits"]["train"]["num_samples"] = 24
        del m["splits"]["train"]["shard_sizes"]
    _edit_meta(root, edit)
    _expect_error(root, "meta.json", "splits.train.num_samples", "24", "23")


def test_shard_sizes_mismatch(toy):
    root = toy[0]

    def edit(m):
        m["splits"]["train"]["shard_sizes"] = [11, 9, 3]
    _edit_meta(root, edit)
    _expect_error(root, "train-00000-of-00003.h5", "shard_sizes")


def test_missing_shard_file(toy):
    root = toy[0]
    (root / "train-00001-of-00003.h5").unlink()
    _expect_error(root, "train-00001-of-00003.h5", "missing")


def test_truncated_shard_names_the_shard(toy):
    root = toy[0]
    path = root / "train-00002-of-00003.h5"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    _expect_error(root, str(path))
    with pytest.raises(ShardFormatError, match="train-00002-of-00003.h5"):
        ShardDataset(root, "train")


def test_corrupt_shard_names_the_shard(toy):
    root = toy[0]
    path = root / "val-00000-of-00001.h5"
    path.write_bytes(b"not an hdf5 file" * 100)
    _expect_error(root, str(path))


def test_duplicate_sample_id_across_splits_detected(toy):
    root = toy[0]
    with h5py.File(root / "val-00000-of-00001.h5", "a", locking=False) as f:
        f["sample_id"][0] = 5   # also used in train
    _expect_error(root, "sample_id", "5")


# ------------------------------------------------------------------------- value checks


@pytest.fixture
def scans(monkeypatch):
    """Records the shards the value scan actually reads (cache misses), in order."""
    seen = []
    real = validation._scan_shard

    def counting(path, *args, **kw):
        seen.append(os.path.basename(str(path)))
        return real(path, *args, **kw)
    monkeypatch.setattr(validation, "_scan_shard", counting)
    return seen


def _set(path, field, index, value):
    with h5py.File(path, "a", locking=False) as f:
        data = f[field][()]
        data[index] = value
        f[field][...] = data


def _settle(root, seconds=60):
    """Backdate the mtimes of shards written in the last few seconds, as if written a while ago: the
    cache keeps no entry for a shard modified within CACHE_RACY_NS of its scan. (This changes their
    ctime, so it invalidates their entries as any write does; settled shards are left alone.)"""
    for p in root.glob("*.h5"):
        st = p.stat()
        if time.time_ns() - st.st_mtime_ns < 30 * 10 ** 9:
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - seconds * 10 ** 9))


def _empty_split(root, split):
    """Cut every dataset of ``split``'s shards to 0 rows and record that in meta.json."""
    meta = json.loads((root / "meta.json").read_text())
    for shard in meta["splits"][split]["shards"]:
        with h5py.File(root / shard, "a", locking=False) as f:
            for ds in f.values():
                ds.resize(0, axis=0)

    def edit(m):
        m["splits"][split]["num_samples"] = 0
        m["splits"][split]["shard_sizes"] = [0] * len(m["splits"][split]["shards"])
    _edit_meta(root, edit)


def test_empty_split_refused(toy):
    root = toy[0]
    _empty_split(root, "val")
    message = _expect_error(root, str(root / "meta.json"), "'splits.val.num_samples'", "split 'val'", "empty")
    assert "\n" not in message
    with pytest.raises(ShardFormatError, match="splits.val.num_samples.*empty"):
        ShardDataset(root, "val")
    assert validate(root, ["train"])["splits"]["train"]["num_samples"] == 23   # only splits asked about


def test_empty_split_declared_but_shards_hold_rows(toy):
    root = toy[0]

    def edit(m):
        m["splits"]["val"]["num_samples"] = 0
        del m["splits"]["val"]["shard_sizes"]
    _edit_meta(root, edit)
    _expect_error(root, "meta.json", "splits.val.num_samples", "says 0", "hold 7")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_float_modality_refused(toy, dtype, value):
    root, _, ref = toy
    path = root / "train-00001-of-00003.h5"   # rows 10..19 of train
    _set(path, f"m_{dtype}", (3, 2), value)
    sample_id = int(ref["train"]["sample_id"][13])
    message = _expect_error(root, str(path), f"field 'm_{dtype}'", "split 'train'", "row 3 ",
                            f"sample_id {sample_id}", "element (2,)", repr(float(value)), "NaN/Inf")
    assert "\n" not in message
    validate(root, ["val"])   # the other split is clean


def test_nonfinite_reports_first_offending_row_and_tabular_column(toy):
    root, _, ref = toy
    path = root / "val-00000-of-00001.h5"
    _set(path, "table", (5, 1), np.inf)
    _set(path, "table", (2, 0), np.nan)
    _expect_error(root, str(path), "field 'table'", "split 'val'", "row 2 ",
                  f"sample_id {int(ref['val']['sample_id'][2])}", "column 0 'a'", "nan")


def test_nonfinite_regression_label_refused(tmp_path):
    mods = {"x": {"kind": "features", "shape": [4], "dtype": "int16"}}
    arrays = _arrays(mods, 9, 500, 0, task="regression", num_classes=1)
    arrays["label"][6] = np.nan
    root = write_dataset(tmp_path, "reg", "regression", 1, mods, {"train": arrays}, samples_per_shard=4)
    path = root / "train-00001-of-00003.h5"
    _expect_error(root, str(path), "field 'label'", "split 'train'", "row 2 ", "sample_id 506", "nan")


@pytest.mark.parametrize("code,fragment", [
    (4.0, "categorical code 4.0 is outside [0, 4)"),
    (-1.0, "categorical code -1.0 is outside [0, 4)"),
    (2.5, "categorical code 2.5 is not an integer code"),
    (np.nan, "column 2 'c' is nan"),
])
def test_categorical_code_refused(toy, code, fragment):
    root, _, ref = toy
    path = root / "val-00000-of-00001.h5"
    _set(path, "table", (4, 2), code)
    message = _expect_error(root, str(path), "field 'table'", "column 2 'c'", "split 'val'", "row 4 ",
                            f"sample_id {int(ref['val']['sample_id'][4])}", fragment)
    assert "\n" not in message


def test_categorical_codes_of_integer_tabular_and_categorical_only_tables(tmp_path):
    mods = {"t": {"kind": "tabular", "shape": [3], "dtype": "int16", "continuous": ["a"],
                  "categorical": {"b": 3, "c": 2}},
            "u": {"kind": "tabular", "shape": [1], "dtype": "uint8", "categorical": {"k": 5}}}
    arrays = _arrays(mods, 6, 40, 0)
    root = write_dataset(tmp_path, "ints", "classification", 5, mods, {"test": arrays})
    validate(root)
    path = root / "test-00000-of-00001.h5"
    _set(path, "t", (3, 2), 2)
    _expect_error(root, str(path), "field 't'", "column 2 'c'", "code 2 is outside [0, 2)", "sample_id 43")
    _set(path, "t", (3, 2), 1)
    _set(path, "u", (1, 0), 5)
    _expect_error(root, str(path), "field 'u'", "column 0 'k'", "code 5 is outside [0, 5)", "sample_id 41")


def test_value_scan_cached_and_invalidated_by_a_change(toy, scans, scan_cache):
    root = toy[0]
    all_shards = ["train-00000-of-00003.h5", "train-00001-of-00003.h5", "train-00002-of-00003.h5",
                  "val-00000-of-00001.h5"]
    validate(root)   # shards written just now: scanned, not cached (racily clean)
    assert scans == all_shards and not scan_cache.exists()
    _settle(root)
    validate(root)
    assert scans == all_shards * 2
    entries = sorted(scan_cache.iterdir())
    assert len(entries) == 4 and all(p.suffix == ".json" for p in entries)
    assert {json.loads(p.read_text())["shard"] for p in entries} == {str((root / s).resolve()) for s in all_shards}
    del scans[:]
    validate(root)
    ShardDataset(root, "val")
    assert scans == []   # later runs: nothing rescanned

    path = root / "train-00001-of-00003.h5"
    _set(path, "m_float32", (0, 0), np.nan)   # a write: new mtime and ctime
    _expect_error(root, str(path), "'m_float32'", "nan")
    _settle(root)
    _expect_error(root, str(path), "'m_float32'", "nan")   # failures are never cached
    assert scans == ["train-00001-of-00003.h5"] * 2
    _set(path, "m_float32", (0, 0), 1.0)
    _settle(root)
    del scans[:]
    validate(root)
    assert scans == ["train-00001-of-00003.h5"]   # only the changed shard
    del scans[:]
    validate(root)
    assert scans == []


def test_value_scan_cache_keyed_by_file_identity(toy, scans, tmp_path):
    root = toy[0]
    _settle(root)
    validate(root)
    path = root / "val-00000-of-00001.h5"
    st = path.stat()
    copy = tmp_path / "copy.h5"
    copy.write_bytes(path.read_bytes())
    os.replace(copy, path)   # same bytes, size and mtime, another file (a re-conversion, a restore)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    del scans[:]
    validate(root)
    assert scans == ["val-00000-of-00001.h5"]


def test_value_scan_cache_invalidated_by_meta_checks(toy, scans):
    root, _, ref = toy
    _settle(root)
    validate(root)
    del scans[:]
    # a smaller cardinality in meta.json: the cached clean scans no longer vouch for the codes
    _edit_meta(root, lambda m: m["modalities"]["table"]["categorical"].update(c=3))
    codes = ref["train"]["table"][:, 2]
    first = int(np.argmax(codes == 3))
    shard = first // 10
    _expect_error(root, f"train-{shard:05d}-of-00003.h5", "column 2 'c'", "outside [0, 3)",
                  f"sample_id {int(ref['train']['sample_id'][first])}")
    assert scans and scans[0] == "train-00000-of-00003.h5"


def test_read_only_dataset_dir_validates_without_cache(toy, scans, tmp_path, monkeypatch):
    root = toy[0]
    listing = sorted(p.name for p in root.iterdir())
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv(shards.CACHE_ENV, str(blocker / "cache"))   # cannot be created, even by root
    _settle(root)
    modes = {p: p.stat().st_mode for p in [root, *root.iterdir()]}
    try:
        for p in root.iterdir():
            p.chmod(0o444)
        root.chmod(0o555)
        validate(root)
        validate(root)
        assert len(scans) == 8   # no cache: scanned each time, and no error
        writable = tmp_path / "cache-elsewhere"
        monkeypatch.setenv(shards.CACHE_ENV, str(writable))
        del scans[:]
        validate(root)
        validate(root)
        assert len(scans) == 4 and len(list(writable.iterdir())) == 4   # cached outside the dataset
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert sorted(p.name for p in root.iterdir()) == listing   # validate never writes there


def test_cache_disabled_and_corrupt_entries(toy, scans, scan_cache, monkeypatch):
    root = toy[0]
    _settle(root)
    validate(root)
    for p in scan_cache.iterdir():
        p.write_text("{not json")
    del scans[:]
    validate(root)   # unreadable entries are misses, then rewritten
    assert len(scans) == 4
    monkeypatch.setenv(shards.CACHE_ENV, "off")
    del scans[:]
    validate(root)
    assert len(scans) == 4


def test_cache_pruned_of_vanished_shards(toy, scans, scan_cache, monkeypatch, tmp_path):
    root = toy[0]
    _settle(root)
    gone = write_dataset(tmp_path, "gone", "classification", 5, toy[1], {"train": _arrays(toy[1], 3, 0, 0)})
    _settle(gone)
    validate(gone)
    for p in gone.iterdir():
        p.unlink()
    assert len(list(scan_cache.iterdir())) == 1
    monkeypatch.setattr(validation, "CACHE_MAX_ENTRIES", 4)
    validate(root)   # 4 new entries + 1 exceed 4: the vanished shard's entry goes, the live ones stay
    kept = {json.loads(p.read_text())["shard"] for p in scan_cache.iterdir()}
    assert kept == {str(p.resolve()) for p in root.glob("*.h5")}
    del scans[:]
    validate(root)
    assert scans == []
    monkeypatch.setattr(validation, "CACHE_MAX_ENTRIES", 1)
    (root / "val-00000-of-00001.h5").touch()   # one rescan and store, over the cap: the oldest half go
    _settle(root)
    validate(root)
    assert len(list(scan_cache.iterdir())) == 2


def test_scan_blocks_cover_dataset_once_and_find_rows_in_big_rows(tmp_path, monkeypatch):
    mods = {"v": {"kind": "volume", "shape": [6, 5, 4], "dtype": "float32"},
            "f": {"kind": "features", "shape": [3], "dtype": "float16"}}
    arrays = _arrays(mods, 11, 70, 0)
    root = write_dataset(tmp_path, "vol", "classification", 5, mods, {"train": arrays}, chunk_rows=2)
    path = root / "train-00000-of-00001.h5"
    with h5py.File(path, "r", locking=False) as f:   # rows of 480 bytes in chunks of 2 rows
        for budget, sizes in [(10 ** 9, {11}), (4 * 480 + 1, {4, 3}), (2 * 480, {2, 1})]:
            got = np.full(f["v"].shape, np.nan, np.float32)
            lens = set()
            for first, offset, block in validation._scan_blocks(f["v"], budget):
                assert offset is None and first % 2 == 0   # blocks start on chunk boundaries
                assert np.isnan(got[first:first + len(block)]).all()   # each row read once
                got[first:first + len(block)] = block
                lens.add(len(block))
            np.testing.assert_array_equal(got, arrays["v"])
            assert lens == sizes, budget
    with h5py.File(path, "a", locking=False) as f:   # chunks that split a row (as for rows >= 1 MiB)
        del f["v"]
        f.create_dataset("v", data=arrays["v"], chunks=(1, 2, 5, 4))
    with h5py.File(path, "r", locking=False) as f:
        for budget, step in [(100, 2), (330, 4), (479, 4)]:   # 80 bytes per [i, :, :] slice, 480 per row
            got = np.full(f["v"].shape, np.nan, np.float32)
            for first, offset, block in validation._scan_blocks(f["v"], budget):
                assert offset % 2 == 0 and block.shape[:2] == (1, min(step, 6 - offset))
                assert np.isnan(got[first, offset:offset + block.shape[1]]).all()
                got[first, offset:offset + block.shape[1]] = block[0]
            np.testing.assert_array_equal(got, arrays["v"])
    _set(path, "v", (7, 4, 3, 2), -np.inf)
    monkeypatch.setattr(validation, "SCAN_BLOCK_BYTES", 100)   # slices of 2 of the 6 [i, :, :] planes
    _expect_error(root, str(path), "field 'v'", "row 7 ", "sample_id 77", "element (4, 3, 2)", "-inf")
    _set(path, "v", (7, 4, 3, 2), 0.0)
    _set(path, "f", (9, 1), np.inf)
    _expect_error(root, str(path), "field 'f'", "row 9 ", "sample_id 79", "element (1,)", "inf")


# ------------------------------------------------------------------------- writer checks


@pytest.fixture
def writer(tmp_path):
    mods = {"image": {"kind": "image", "shape": [3, 4, 4], "dtype": "uint8"},
            "seq": {"kind": "sequence", "shape": [5, 2], "dtype": "float32"}}
    w = ShardWriter(tmp_path, "w", "classification", 3, mods, samples_per_shard=4)
    yield w, mods
    if not w._closed:
        w.abort()


def _good(mods, n=3, first_id=0):
    return _arrays(mods, n, first_id, first_id, num_classes=3)


@pytest.mark.parametrize("field,bad,fragment", [
    ("image", lambda a: a.astype(np.float32), "dtype"),
    ("image", lambda a: a[:, :, :3], "shape"),
    ("seq", lambda a: a.astype(np.float64), "dtype"),
    ("label", lambda a: a.astype(np.float32), "dtype"),
    ("label", lambda a: a + 3, "outside"),
    ("sample_id", lambda a: a[:2], "rows"),
])
def test_writer_rejects_bad_batches(writer, field, bad, fragment):
    w, mods = writer
    batch = _good(mods)
    batch[field] = bad(batch[field])
    with pytest.raises(ShardFormatError) as info:
        w.append("train", batch)
    message = str(info.value)
    assert str(w.root) in message and "'train'" in message and f"'{field}'" in message and fragment in message


def test_writer_rejects_missing_and_extra_fields(writer):
    w, mods = writer
    batch = _good(mods)
    del batch["seq"]
    with pytest.raises(ShardFormatError, match="'seq'"):
        w.append("train", batch)
    batch = _good(mods)
    batch["audio"] = batch["seq"]
    with pytest.raises(ShardFormatError, match="'audio'"):
        w.append("train", batch)


def test_writer_casts_lossless_integer_labels(writer):
    w, mods = writer
    batch = _good(mods)
    batch["label"] = batch["label"].astype(np.int32)
    batch["sample_id"] = batch["sample_id"].astype(np.uint16)
    w.append("train", batch)
    w.close()
    assert ShardDataset(w.root, "train")[[0]]["label"].dtype == torch.int64


def test_writer_rejects_duplicate_sample_ids(writer):
    w, mods = writer
    w.append("train", _good(mods, 3, first_id=0))
    with pytest.raises(ShardFormatError, match="sample_id.*2"):
        w.append("val", _good(mods, 3, first_id=2))   # 2 already used by train
    batch = _good(mods, 3, first_id=10)
    batch["sample_id"][:] = [10, 11, 10]
    with pytest.raises(ShardFormatError, match="duplicate sample_id 10"):
        w.append("train", batch)


def test_no_meta_json_when_writer_does_not_close(tmp_path):
    mods = {"x": {"kind": "features", "shape": [2], "dtype": "float32"}}
    with pytest.raises(RuntimeError, match="interrupted"):
        with ShardWriter(tmp_path, "half", "classification", 5, mods, samples_per_shard=2) as w:
            w.append("train", _arrays(mods, 5, 0, 0))
            raise RuntimeError("interrupted")
    root = tmp_path / "half"
    assert not (root / "meta.json").exists()
    assert not root.exists() or not any(root.iterdir())
    with pytest.raises(ShardFormatError, match="meta.json"):
        validate(root)
    # an unclosed writer (a crash before close) has no meta.json either, only temporary shards
    w = ShardWriter(tmp_path, "crash", "classification", 5, mods, samples_per_shard=2)
    w.append("train", _arrays(mods, 5, 0, 0))
    assert not (w.root / "meta.json").exists()
    assert all(p.name.startswith(".tmp-") for p in w.root.iterdir())
    # a new writer (the rerun after a kill) reuses a directory holding only such leftovers
    root = write_dataset(tmp_path, "crash", "classification", 5, mods, {"train": _arrays(mods, 3, 0, 1)})
    assert sorted(p.name for p in root.iterdir()) == ["meta.json", "train-00000-of-00001.h5"]
    assert validate(root)["splits"]["train"]["num_samples"] == 3


def test_refuses_to_overwrite_unless_asked(toy):
    root, mods, ref = toy
    new = {"train": _arrays(mods, 3, 0, 9)}
    with pytest.raises(FileExistsError, match=str(root)):
        write_dataset(root.parent, root.name, "classification", 5, mods, new)
    write_dataset(root.parent, root.name, "classification", 5, mods, new, overwrite=True)
    meta = validate(root)
    assert list(meta["splits"]) == ["train"] and meta["splits"]["train"]["num_samples"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["meta.json", "train-00000-of-00001.h5"]


def test_writer_rejects_bad_modality_spec(tmp_path):
    with pytest.raises(ShardFormatError, match="modalities.x.kind"):
        ShardWriter(tmp_path, "bad", "classification", 2, {"x": {"kind": "smell", "shape": [2], "dtype": "float32"}})
    with pytest.raises(ShardFormatError, match="modalities.t.shape"):
        ShardWriter(tmp_path, "bad", "classification", 2, {"t": {
            "kind": "tabular", "shape": [4], "dtype": "float32", "continuous": ["a"], "categorical": {"b": 3}}})


# ------------------------------------------------------------------------- sampler


def _epoch(sampler, epoch=0, start_batch=0):
    sampler.set_epoch(epoch, start_batch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    return batches


def test_sampler_exact_order():
    s = ShardBatchSampler(10, 4, seed=3)
    perm = np.random.default_rng([3, 0]).permutation(10)
    assert _epoch(s) == [perm[0:4].tolist(), perm[4:8].tolist()]
    s = ShardBatchSampler(10, 4, shuffle=False, drop_last=False)
    assert _epoch(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_sampler_determinism_and_epochs():
    a, b = ShardBatchSampler(100, 8, seed=1), ShardBatchSampler(100, 8, seed=1)
    assert _epoch(a, 2) == _epoch(b, 2)
    assert _epoch(a, 2) != _epoch(a, 3)
    assert _epoch(a, 2) != _epoch(ShardBatchSampler(100, 8, seed=2), 2)


@pytest.mark.parametrize("n,drop_last", [(103, True), (103, False), (96, False), (5, False), (101, False)])
def test_ranks_disjoint_and_union_is_single_rank_order(n, drop_last):
    G, N = 12, 4
    single = _epoch(ShardBatchSampler(n, G, seed=7, drop_last=drop_last), 1)
    per_rank = [_epoch(ShardBatchSampler(n, G, rank=r, world_size=N, seed=7, drop_last=drop_last), 1)
                for r in range(N)]
    flat = [np.concatenate(b) if b else np.array([], int) for b in per_rank]
    all_idx = np.concatenate(flat)
    assert len(np.unique(all_idx)) == len(all_idx)   # disjoint
    n_full = n // G
    for r in range(N):
        assert all(len(b) == G // N for b in per_rank[r][:n_full])
    # the global batch b is, in order, the concatenation of the ranks' b-th batches
    for b, batch in enumerate(single[:n_full]):
        assert batch == sum((per_rank[r][b] for r in range(N)), [])
    if drop_last:
        assert len(single) == n_full and len(all_idx) == n_full * G
    else:
        assert sorted(all_idx.tolist()) == list(range(n))
        tail = single[n_full:] if n % G else []
        joined = sum((per_rank[r][n_full:] for r in range(N)), [])
        assert sum(tail, []) == sum(joined, [])
        sizes = [sum(len(x) for x in per_rank[r][n_full:]) for r in range(N)]
        assert max(sizes) - min(sizes) <= 1


def test_sampler_empty_tail_part_yields_nothing():
    # 5 samples, G=4, N=4: the tail of 1 sample goes to rank 0; ranks 1..3 yield only the full batch
    lens = [len(ShardBatchSampler(5, 4, rank=r, world_size=4, drop_last=False)) for r in range(4)]
    assert lens == [2, 1, 1, 1]


def test_start_batch_resume_gives_exact_tail():
    for drop_last in (True, False):
        s = ShardBatchSampler(50, 6, rank=1, world_size=2, seed=5, drop_last=drop_last)
        full = _epoch(s, 4)
        for k in range(len(full) + 2):
            assert _epoch(s, 4, k) == full[k:]
        s.set_epoch(4, 3)
        state = s.state_dict()
        assert state == {"epoch": 4, "start_batch": 3, "seed": 5}
        t = ShardBatchSampler(50, 6, rank=1, world_size=2, seed=0, drop_last=drop_last)
        t.load_state_dict(state)
        assert list(t) == full[3:]


def test_global_batch_not_divisible_by_world_size():
    with pytest.raises(ValueError, match="global_batch_size=10.*world_size=4"):
        ShardBatchSampler(100, 10, world_size=4)


# ------------------------------------------------------------------------- DataLoader


def test_dataloader_workers_match_single_process(toy):
    root, mods, ref = toy
    meta = validate(root)
    ds = ShardDataset(root, "train", meta=meta)
    ds[[0]]   # a handle opened in the parent must not leak into the workers

    def run(workers):
        sampler = ShardBatchSampler(len(ds), 4, seed=11, drop_last=False)
        loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers,
                                             persistent_workers=workers > 0)
        epochs = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            epochs.append([{k: v.clone() for k, v in b.items()} for b in loader])
        return epochs

    single, multi = run(0), run(2)
    assert len(single[0]) == 6
    for e in range(2):
        assert len(single[e]) == len(multi[e])
        for a, b in zip(single[e], multi[e]):
            assert set(a) == set(b)
            for k in a:
                assert torch.equal(a[k], b[k]), k
            _assert_batch_equal(a, ref["train"], a["index"].numpy(), mods)
    assert os.getpid() == ds._pid
