"""benchmarks/data_path.py at --quick sizes: same bytes on both sides of the comparison, rows that
hold what they claim, chunk shapes read from the file. No timing threshold is asserted."""
import math
import re

import h5py
import numpy as np
import pytest

from benchmarks import data_path as dp
from data_prep import shards


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_reader_same_bytes_and_rows(tmp_path):
    spec = dp.SHAPES["dvm"]
    samples, batch = spec["quick_samples"], spec["quick_batch"]
    root = dp.write_synthetic(tmp_path, "dvm", "dvm", dp.synthetic_arrays("dvm", samples))
    dataset, raw = shards.ShardDataset(root, "train"), dp.RawReader(root)
    try:
        shuffled = dp.epoch_batches(samples, batch, shuffle=True)
        assert len(shuffled) == samples // batch
        assert sorted(i for b in shuffled for i in b) == list(range(samples))
        assert shuffled[0] != sorted(shuffled[0])   # really shuffled, so the reorder path is exercised
        for b, readers in ((shuffled[0], (raw.sorted_runs, raw.per_row)),
                           (dp.epoch_batches(samples, batch, shuffle=False)[1], (raw.slice,))):
            ours = dataset[b]
            assert ours["sample_id"].tolist() == list(b)
            for read in readers:
                theirs = read(b)
                assert set(theirs) == {"image", "table", "label", "sample_id"}
                for key, arr in theirs.items():
                    mine = ours[key].numpy()
                    assert mine.dtype == arr.dtype and mine.shape == arr.shape
                    assert mine.tobytes() == arr.tobytes(), (read.__name__, key)
    finally:
        raw.close()
        dataset.close()

    rows = dp.reader_rows(root, batch, passes=1)
    per_sample = dp.bytes_per_sample(shards.load_meta(root))
    assert per_sample == 3 * 128 * 128 + 17 * 4 + 8 + 8
    for order in ("sequential", "shuffled"):
        mine = [r for r in rows if r["order"] == order]
        ours = [r for r in mine if r["reader"] == "ShardDataset"]
        used = [r for r in mine if r["raw"]]
        assert len(ours) == 1 and len(used) == 1
        # the raw reference is the fastest raw candidate
        assert used[0]["samples_per_s"] == max(r["samples_per_s"] for r in mine if r["reader"] != "ShardDataset")
        assert ours[0]["ratio"] == pytest.approx(ours[0]["samples_per_s"] / used[0]["samples_per_s"], rel=1e-9)
    for r in rows:
        assert _finite_positive(r["samples_per_s"]) and _finite_positive(r["mb_per_s"])
        assert r["mb_per_s"] == pytest.approx(r["samples_per_s"] * per_sample / 1e6, rel=1e-9)
        assert (r["ratio"] is not None) == (r["reader"] == "ShardDataset")

    assert _finite_positive(dp.loader_samples_per_s(root, "train", batch, 0, max_batches=2))
    (row,) = dp.loader_rows(root, batch, [1], max_batches=2)   # one worker process: uint8 survives
    assert row["workers"] == 1 and row["batches"] == 2 and row["uint8_kept"]
    assert _finite_positive(row["samples_per_s"])


def test_chunk_sweep_reads_chunks_from_file_and_main_prints(tmp_path, capsys):
    spec = dp.SHAPES["crema_d"]
    samples, batch = spec["quick_samples"], spec["quick_batch"]
    arrays = dp.synthetic_arrays("crema_d", samples)
    rows, skipped = dp.chunk_sweep_rows(tmp_path, "crema_d", arrays, batch, passes=1, keep=True)
    assert skipped == [16, 64]    # 16 rows of a 193 kB spectrogram are >= 1 MiB
    assert [(r["chunk_rows"], r["lzf"]) for r in rows] == [
        (c, z) for c in (1, 4, None) for z in (False, True)]
    assert [r["default"] for r in rows] == [False] * 4 + [True, False]
    for r in rows:
        meta = shards.load_meta(r["root"])
        with h5py.File(r["root"] / meta["splits"]["train"]["shards"][0], "r", locking=False) as f:
            assert r["chunks"] == {k: f[k].chunks for k in f}
            assert (f["video"].compression == "lzf") == r["lzf"] and f["audio"].compression is None
            stored = shards.ShardDataset(r["root"], "train")[list(range(samples))]
            assert all(np.array_equal(stored[k].numpy(), arrays[k]) for k in arrays)
        rows_per_chunk = r["chunk_rows"] or 1            # default: one 193 kB / 151 kB row per chunk
        assert r["chunks"]["audio"] == (rows_per_chunk, 257, 188)
        assert r["chunks"]["video"] == (rows_per_chunk, 1, 3, 224, 224)
        assert r["chunks"]["label"] == ((r["chunk_rows"] or 64),)
        assert _finite_positive(r["shuffled_samples_per_s"]) and _finite_positive(r["sequential_samples_per_s"])
        assert _finite_positive(r["size_mb"])

    results = dp.main(["--quick", "--shape", "dvm", "--workers", "0", "--dir", str(tmp_path / "keep")])
    out = capsys.readouterr().out
    assert "h5py" in out and "HDF5" in out and "usable CPUs" in out and "page cache warm" in out
    for row in results["dvm"]["reader"]:
        if row["ratio"] is not None:
            verdict = "met" if row["ratio"] >= 0.90 else "NOT met"
            assert f"{row['order']}: ours/raw {row['ratio']:.3f}, target >= 0.90: {verdict}" in out
    printed = re.findall(r"^(default\*|default|\d+)\s+(on|off)\s+(\(\S+\))", out, flags=re.M)
    assert [(c, z, img) for c, z, img in printed] == [
        (str(r["chunk_rows"]) if r["chunk_rows"] else ("default*" if r["default"] else "default"),
         "on" if r["lzf"] else "off", "(" + ",".join(map(str, r["chunks"]["image"])) + ")")
        for r in results["dvm"]["sweep"]]
    assert (tmp_path / "keep" / "dvm" / "meta.json").is_file()    # --dir: kept
