"""data_prep.from_arrays: NumPy arrays, CSV tables and image folders -> shards, the training-split
standardisation statistics and the loader applying them, every refusal, and the docs/data.md
example run verbatim."""
import csv
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from data_prep import from_arrays
from data_prep.image_io import load_image
from data_prep.shards import ShardDataset, ShardFormatError, validate, write_dataset
from train.config import ConfigError
from train.data import make_loader
from tests.conftest import read_shards, write_csv

REPO = Path(__file__).resolve().parent.parent


def _convert(tmp_path, *args, name="ds"):
    """main() with --out tmp_path/out --name NAME; returns (exit status, the dataset directory)."""
    return from_arrays.main(["--out", str(tmp_path / "out"), "--name", name, *map(str, args)]), tmp_path / "out" / name



def _by_id(data, key):
    """{sample_id: row} over all splits."""
    return {int(i): row for split in data.values() for i, row in zip(split["sample_id"], split[key])}



@pytest.fixture
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    y = np.repeat(np.arange(3), 20)
    np.save(tmp_path / "feats.npy", (rng.normal(size=(n, 5)) * 10 + 50).astype(np.float64))
    np.save(tmp_path / "labels.npy", y)
    np.savez(tmp_path / "more.npz", seq=rng.normal(size=(n, 4, 3)).astype(np.float32),
             pix=rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8), y=y)
    return tmp_path


# ---------------------------------------------------------------------------------- round trips


def test_arrays_round_trip_kinds_guessed(arrays, capsys):
    rc, root = _convert(arrays, "--modality", f"feats={arrays}/feats.npy", "--modality",
                        f"seq={arrays}/more.npz", "--modality", f"pix={arrays}/more.npz:key=pix",
                        "--labels", f"{arrays}/more.npz:key=y")
    out = capsys.readouterr().out
    assert rc == 0
    assert "feats: features (guessed) 5 float32" in out and "seq: sequence (guessed) 4x3" in out
    assert "pix: image (guessed) 3x8x8 uint8" in out and "classification (guessed), 3 classes" in out
    meta, data = read_shards(root)
    mods = meta["modalities"]
    assert list(mods) == ["feats", "seq", "pix"]
    assert [mods[m]["kind"] for m in mods] == ["features", "sequence", "image"]
    assert mods["feats"]["dtype"] == "float32" and mods["pix"]["dtype"] == "uint8"
    assert "standardize" in mods["feats"] and "standardize" in mods["seq"] and "standardize" not in mods["pix"]
    assert meta["class_names"] == ["0", "1", "2"] and meta["task"] == "classification"
    feats = np.load(arrays / "feats.npy").astype(np.float32)
    z = np.load(arrays / "more.npz")
    for key, ref in (("feats", feats), ("seq", z["seq"]), ("pix", z["pix"]), ("label", z["y"])):
        got = _by_id(data, key)
        assert sorted(got) == list(range(60))
        np.testing.assert_array_equal(np.stack([got[i] for i in range(60)]), ref)
    # a 1-D array is one feature; :kind= overrides the guess
    np.save(arrays / "one.npy", np.arange(60.0))
    rc, root = _convert(arrays, "--modality", f"one={arrays}/one.npy", "--modality",
                        f"spec={arrays}/more.npz:key=seq:kind=spectrogram", "--labels", f"{arrays}/labels.npy",
                        name="ds2")
    assert rc == 0
    meta = validate(root)
    assert meta["modalities"]["one"]["shape"] == [1] and meta["modalities"]["spec"]["kind"] == "spectrogram"


def test_regression_labels_and_random_split(tmp_path, capsys):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", rng.normal(size=(40, 3)).astype(np.float32))
    target = rng.normal(size=40)
    np.save(tmp_path / "t.npy", target)
    rc, root = _convert(tmp_path, "--modality", f"x={tmp_path}/x.npy", "--labels", f"{tmp_path}/t.npy",
                        "--split", "0.5,0.25,0.25", "--seed", "3")
    assert rc == 0 and "regression (guessed)" in capsys.readouterr().out
    meta, data = read_shards(root)
    assert meta["task"] == "regression" and meta["num_classes"] == 1 and "class_names" not in meta
    assert {s: len(d["label"]) for s, d in data.items()} == {"train": 20, "val": 10, "test": 10}
    got = _by_id(data, "label")
    np.testing.assert_allclose([got[i] for i in range(40)], target.astype(np.float32))


def test_csv_table_guessed_and_declared(tmp_path, capsys):
    rows = [[20 + i * 0.5, 100 + (i * 7) % 13, ["f", "m"][i % 2], i % 3, ["cat", "dog"][i % 2 == 0 and i % 3 == 0],
             ["train", "val", "test"][0 if i % 4 < 2 else i % 4 - 1]] for i in range(24)]
    write_csv(tmp_path / "t.csv", ["age", "bp", "sex", "site", "animal", "split"], rows)
    rc, root = _convert(tmp_path, "--modality", f"clin={tmp_path}/t.csv", "--labels", f"{tmp_path}/t.csv:column=animal",
                        "--split-column", f"{tmp_path}/t.csv:column=split")
    out = capsys.readouterr().out
    assert rc == 0
    assert "continuous (guessed) age, bp; categorical (guessed) sex (2), site (3)" in out
    assert f"--modality clin={tmp_path}/t.csv:cont=age,bp:cat=sex,site" in out
    meta, data = read_shards(root)
    spec = meta["modalities"]["clin"]
    assert spec["kind"] == "tabular" and spec["continuous"] == ["age", "bp"]
    assert spec["categorical"] == {"sex": 2, "site": 3} and spec["shape"] == [4]
    assert meta["class_names"] == ["cat", "dog"]
    assert meta["source"]["inputs"]["clin"]["categories"] == {"sex": ["f", "m"], "site": ["0", "1", "2"]}
    table = _by_id(data, "clin")
    labels = _by_id(data, "label")
    for i, r in enumerate(rows):
        np.testing.assert_allclose(table[i], [r[0], r[1], ["f", "m"].index(r[2]), r[3]], rtol=1e-6)
        assert labels[i] == ["cat", "dog"].index(r[4])
    # declared columns: only those, in that order; the split column is the split, not a feature
    rc, root = _convert(tmp_path, "--modality", f"clin={tmp_path}/t.csv:cont=bp:cat=site,sex",
                        "--labels", f"{tmp_path}/t.csv:column=animal", name="ds2")
    assert rc == 0
    spec = validate(root)["modalities"]["clin"]
    assert spec["continuous"] == ["bp"] and list(spec["categorical"]) == ["site", "sex"]


def _image(path, colour, size=(13, 9)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_and_csv_of_paths(tmp_path, capsys):
    colours = {"apple": (200, 30, 30), "kiwi": (30, 200, 30)}
    for c, colour in colours.items():
        for k in range(4):
            _image(tmp_path / "imgs" / c / f"{k}.png", tuple(v + 5 * k for v in colour))
    (tmp_path / "imgs" / "kiwi" / "notes.txt").write_text("not an image")
    np.save(tmp_path / "f.npy", np.arange(16.0).reshape(8, 2))
    rc, root = _convert(tmp_path, "--modality", f"photo={tmp_path}/imgs:size=6", "--modality", f"f={tmp_path}/f.npy",
                        "--split", "0.5,0.25,0.25")
    assert rc == 0, capsys.readouterr().err
    meta, data = read_shards(root)
    assert meta["class_names"] == ["apple", "kiwi"] and meta["modalities"]["photo"]["shape"] == [3, 6, 6]
    photo, labels = _by_id(data, "photo"), _by_id(data, "label")
    files = [tmp_path / "imgs" / c / f"{k}.png" for c in colours for k in range(4)]   # sorted (class, name)
    for i, f in enumerate(files):
        np.testing.assert_array_equal(photo[i], load_image(f, 6))
        assert labels[i] == i // 4
    with open(root / "samples.csv", newline="") as fh:
        index = list(csv.DictReader(fh))
    assert [r["photo_path"] for r in index] == [str(f) for f in files]
    # a CSV of paths (relative to the CSV) with the labels in the same CSV
    write_csv(tmp_path / "imgs" / "list.csv", ["file", "fruit"],
               [[f"{c}/{k}.png", c] for c in reversed(list(colours)) for k in range(4)])
    rc, root = _convert(tmp_path, "--modality", f"photo={tmp_path}/imgs/list.csv:path=file:size=5:crop=center",
                        "--labels", f"{tmp_path}/imgs/list.csv:column=fruit", name="ds2")
    assert rc == 0
    meta, data = read_shards(root)
    photo, labels = _by_id(data, "photo"), _by_id(data, "label")
    assert labels[0] == 1 and labels[7] == 0   # kiwi rows first in the CSV; classes sorted
    np.testing.assert_array_equal(photo[0], load_image(tmp_path / "imgs/kiwi/0.png", 5, "center"))


# ---------------------------------------------------------------------------------------- splits


def test_split_by_fractions_is_stratified_and_deterministic(arrays):
    args = ["--modality", f"feats={arrays}/feats.npy", "--labels", f"{arrays}/labels.npy", "--split", "0.6,0.2,0.2"]
    ids = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        rc, root = _convert(arrays, *args, "--seed", seed, name=name)
        assert rc == 0
        meta, data = read_shards(root)
        ids[name] = {s: sorted(d["sample_id"].tolist()) for s, d in data.items()}
        for s, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            assert np.bincount(data[s]["label"], minlength=3).tolist() == [round(20 * frac)] * 3
        assert meta["source"]["split"]["seed"] == seed
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]
    assert sorted(sum(ids["a"].values(), [])) == list(range(60))


def test_split_by_column(arrays):
    np.save(arrays / "split.npy", np.array(["train", "val", "test", "train"] * 15))
    rc, root = _convert(arrays, "--modality", f"feats={arrays}/feats.npy", "--labels", f"{arrays}/labels.npy",
                        "--split-column", f"{arrays}/split.npy")
    assert rc == 0
    _, data = read_shards(root)
    assert sorted(data["val"]["sample_id"].tolist()) == list(range(1, 60, 4))
    assert sorted(data["test"]["sample_id"].tolist()) == list(range(2, 60, 4))
    assert len(data["train"]["sample_id"]) == 30


# ------------------------------------------------------------------------------ standardisation


def test_statistics_fitted_on_training_split_only_and_applied(arrays):
    rng = np.random.default_rng(2)
    feats = np.load(arrays / "feats.npy")
    feats[:, 2] = 7.0                                  # a constant column: std 1
    split = np.array(["train"] * 30 + ["val"] * 15 + ["test"] * 15)
    feats[30:] += 1000.0                               # val/test far off: must not move the statistics
    np.save(arrays / "feats.npy", feats)
    np.save(arrays / "split.npy", split)
    write_csv(arrays / "t.csv", ["x", "c"], [[float(v), i % 2] for i, v in enumerate(rng.normal(5, 2, 60))])
    rc, root = _convert(arrays, "--modality", f"feats={arrays}/feats.npy", "--modality", f"seq={arrays}/more.npz",
                        "--modality", f"tab={arrays}/t.csv:cont=x:cat=c",
                        "--labels", f"{arrays}/labels.npy", "--split-column", f"{arrays}/split.npy",
                        "--samples-per-shard", 7)   # batches across shards too
    assert rc == 0
    meta, raw = read_shards(root)
    mods = meta["modalities"]
    train = feats[:30].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mods["feats"]["standardize"]["mean"], train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(mods["feats"]["standardize"]["std"], np.where(train.std(0) > 0, train.std(0), 1), rtol=1e-6)
    assert mods["feats"]["standardize"]["std"][2] == 1.0
    seq = np.load(arrays / "more.npz")["seq"][:30].astype(np.float64).reshape(-1, 3)
    np.testing.assert_allclose(mods["seq"]["standardize"]["mean"], seq.mean(0), rtol=1e-6)
    assert len(mods["tab"]["standardize"]["mean"]) == 1   # the continuous column only
    # the shards hold the raw values; the dataset standardises on request
    _, std = read_shards(root, standardize=True)
    for key in ("feats", "seq", "tab"):
        s = mods[key]["standardize"]
        mean, sd = np.array(s["mean"], dtype=np.float32), np.array(s["std"], dtype=np.float32)
        x, z = raw["train"][key], std["train"][key]
        if key == "tab":
            np.testing.assert_allclose(z[:, 0], (x[:, 0] - mean[0]) / sd[0], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(z[:, 1], x[:, 1])   # categorical codes untouched
        else:
            np.testing.assert_allclose(z, (x - mean) / sd, rtol=1e-5, atol=1e-5)
    assert abs(std["train"]["feats"][:, [0, 1, 3, 4]].mean()) < 1e-5
    # a single sample and a shuffled batch read the same values
    ds = ShardDataset(root, "val", meta=meta, standardize=True)
    np.testing.assert_array_equal(ds[3]["feats"].numpy(), ds[[5, 3]]["feats"][1].numpy())


def _accelerator():
    return types.SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))


def test_loader_applies_statistics_and_refuses_data_without(arrays, tmp_path):
    rc, root = _convert(arrays, "--modality", f"feats={arrays}/feats.npy", "--modality", f"pix={arrays}/more.npz:key=pix",
                        "--labels", f"{arrays}/labels.npy")
    assert rc == 0
    meta = validate(root)
    cfg = dict(data=str(root), batch_size=8, eval_batch_size=100, seed=0, num_workers=0, standardize=True)
    loader, _ = make_loader(cfg, meta, "val", _accelerator(), ["feats", "pix"])
    batch = next(iter(loader))
    plain, _ = make_loader(dict(cfg, standardize=False), meta, "val", _accelerator(), ["feats", "pix"])
    raw = next(iter(plain))
    s = meta["modalities"]["feats"]["standardize"]
    expect = (raw["feats"].numpy() - np.float32(s["mean"])) / np.float32(s["std"])
    np.testing.assert_allclose(batch["feats"].numpy(), expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(batch["pix"], raw["pix"]) and batch["pix"].dtype == torch.uint8
    # data written without statistics (the shipped converters): refused in one line
    x = np.zeros((4, 2), dtype=np.float32)
    split = {"feats": x, "label": np.array([0, 1, 0, 1]), "sample_id": np.arange(4)}
    bare = write_dataset(tmp_path / "bare", "bare", "classification", 2,
                         {"feats": {"kind": "features", "shape": [2], "dtype": "float32"}},
                         {"train": split, "val": dict(split, sample_id=np.arange(4, 8)),
                          "test": dict(split, sample_id=np.arange(8, 12))})
    bare_meta = validate(bare)
    with pytest.raises(ConfigError) as err:
        make_loader(dict(cfg, data=str(bare)), bare_meta, "train", _accelerator())
    msg = str(err.value)
    assert msg.startswith("standardize: true") and str(bare / "meta.json") in msg and "\n" not in msg
    assert "modalities.feats.standardize" in msg
    make_loader(dict(cfg, data=str(bare), standardize=False), bare_meta, "train", _accelerator())
    # images only: nothing to standardise, so asking for it is refused too
    with pytest.raises(ConfigError, match="none of"):
        make_loader(cfg, meta, "train", _accelerator(), ["pix"])
    # malformed statistics
    bad = json.loads((root / "meta.json").read_text())
    bad["modalities"]["feats"]["standardize"]["std"][0] = 0.0
    with pytest.raises(ShardFormatError, match="modalities.feats.standardize"):
        ShardDataset(root, "train", meta=bad, standardize=True)


# ------------------------------------------------------------------------------------- refusals


def _refused(capsys, tmp_path, *args, match):
    """The conversion exits 2 with one line 'error: <file or flag>: ...' and writes nothing."""
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, _ = _convert(tmp_path, *args)
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert re.search(match, lines[0]), lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    return lines[0]


REFUSALS = {   # id: (arguments, with {a} the data folder, F the features and L the labels; the error line)
    "missing modality file": (["--modality", "feats={a}/missing.npy", "L"], r"^error: .*missing\.npy: no such file"),
    "missing labels file": (["F", "--labels", "{a}/nope.npy"], r"^error: .*nope\.npy: no such file"),
    "rows differ": (["F", "--modality", "s={a}/short.npy", "L"], r"^error: --modality s: 59 rows, but feats has 60"),
    "NaN label": (["F", "--labels", "{a}/nan.npy"], r"nan\.npy: row 7: label is nan"),
    "Inf feature": (["--modality", "f={a}/inf.npy", "L"], r"inf\.npy: row 4 holds NaN or Inf"),
    "unknown table column": (["--modality", "t={a}/t.csv:cont=x,z", "L"], r"t\.csv: no column 'z'"),
    "empty table cell": (["--modality", "t={a}/t.csv:cont=x", "L"], r"t\.csv: line 61, column 'x': missing value"),
    "unknown label column": (["F", "--labels", "{a}/t.csv:column=nope"], r"t\.csv: no column 'nope'"),
    "unknown kind": (["--modality", "feats={a}/feats.npy:kind=video", "L"], r"^error: --modality feats: kind='video'"),
    "unknown option": (["--modality", "feats={a}/feats.npy:size=3", "L"], r"^error: --modality feats: unknown option 'size'"),
    "unknown npz array": (["--modality", "x={a}/more.npz", "L"], r"more\.npz: no array 'x'"),
    "fractions over 1": (["F", "L", "--split", "0.8,0.3,0.1"], r"^error: --split: "),
    "a zero fraction": (["F", "L", "--split", "0.5,0.5,0"], r"^error: --split: "),
    "split column without val": (["F", "L", "--split-column", "{a}/nosplit.npy"],
                                 r"^error: --split-column: the val split is empty"),
    "no labels": (["F"], r"^error: --labels: required"),
    "no modality": (["L"], r"^error: --modality: give at least one"),
    "modality named twice": (["F", "F", "L"], r"^error: --modality feats: modality named twice"),
    "reserved modality name": (["--modality", "label={a}/feats.npy", "L"], r"^error: --modality label: modality name"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(arrays, capsys, case):
    a = arrays
    np.save(a / "short.npy", np.zeros((59, 2)))
    nan = np.load(a / "labels.npy").astype(float)
    nan[7] = np.nan
    np.save(a / "nan.npy", nan)
    bad_feats = np.load(a / "feats.npy")
    bad_feats[4, 1] = np.inf
    np.save(a / "inf.npy", bad_feats)
    np.save(a / "nosplit.npy", np.array(["train", "test"] * 30))
    write_csv(a / "t.csv", ["x", "y"], [[i, i % 2] for i in range(59)] + [["", 1]])
    args, match = REFUSALS[case]
    expand = {"F": ["--modality", "feats={a}/feats.npy"], "L": ["--labels", "{a}/labels.npy"]}
    argv = [x.format(a=a) for arg in args for x in expand.get(arg, [arg])]
    _refused(capsys, a, *argv, match=match)


def test_argparse_refusals_are_one_line(arrays, capsys):
    with pytest.raises(SystemExit) as exit_:
        from_arrays.main(["--modality", f"feats={arrays}/feats.npy", "--labels", f"{arrays}/labels.npy"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --out, --name: required"]


def test_refuses_a_non_empty_output_directory(arrays, capsys):
    root = arrays / "out" / "ds"
    root.mkdir(parents=True)
    (root / "keep.txt").write_text("mine")
    _refused(capsys, arrays, "--modality", f"feats={arrays}/feats.npy", "--labels", f"{arrays}/labels.npy",
             match=r"^error: --out: .*exists and is not empty")
    assert (root / "keep.txt").read_text() == "mine"


def test_image_folder_refusals(tmp_path, capsys):
    _image(tmp_path / "imgs" / "a" / "0.png", (1, 2, 3))
    _image(tmp_path / "imgs" / "b" / "0.png", (3, 2, 1))
    np.save(tmp_path / "y.npy", np.array([0, 1]))
    _refused(capsys, tmp_path, "--modality", f"p={tmp_path}/imgs", "--labels", f"{tmp_path}/y.npy",
             match=r"^error: --labels: the labels come from the class folders")
    write_csv(tmp_path / "list.csv", ["file", "y"], [["imgs/a/0.png", 0], ["imgs/a/gone.png", 1]])
    _refused(capsys, tmp_path, "--modality", f"p={tmp_path}/list.csv:path=file", "--labels",
             f"{tmp_path}/list.csv:column=y", match=r"list\.csv: 1 image file\(s\) not found: .*gone\.png")
    (tmp_path / "imgs" / "c").mkdir()
    _refused(capsys, tmp_path, "--modality", f"p={tmp_path}/imgs", match=r"imgs/c: no image files")


# ------------------------------------------------------------------------------ the docs example


def docs_example() -> str:
    text = (REPO / "docs" / "data.md").read_text(encoding="utf-8")
    marker = text.index("<!-- from_arrays example")
    return re.search(r"```bash\n(.*?)```", text[marker:], re.S).group(1)


def test_docs_example_is_complete():
    block = docs_example()
    assert "python -m data_prep.from_arrays" in block and "sklearn" not in block
    assert "python -m train.gaal" in block and "python -m train.igm" in block and "--standardize true" in block


@pytest.mark.slow
def test_docs_example_runs_verbatim(tmp_path):
    (tmp_path / "example.sh").write_text(docs_example())
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MMSHARDS_CACHE_DIR="off")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # `python` = this venv's
    proc = subprocess.run(["bash", "-euo", "pipefail", "example.sh"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    meta = validate(tmp_path / "shards" / "toy")
    assert list(meta["modalities"]) == ["strong", "weak"] and meta["num_classes"] == 3
    assert all("standardize" in spec for spec in meta["modalities"].values())
    for run in ("gaal_toy", "igm_toy"):
        assert (tmp_path / "runs" / run / "result.json").is_file(), run
    assert yaml.safe_load((tmp_path / "runs" / "igm_toy" / "config.yaml").read_text())["standardize"] is True
