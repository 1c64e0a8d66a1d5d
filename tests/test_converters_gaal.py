"""GAAL converters (DVM, SUN Attribute, CelebA) end to end on small files in the raw formats."""
import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from data_prep import celeba, dvm, sun_attribute
from data_prep.image_io import allocate, load_image
from data_prep.shards import validate
from tests.conftest import read_samples, read_shards, write_csv




def _solid(path, colour, size=(37, 29), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)



# ----------------------------------------------------------------------------------------- DVM

AD_HEADER = ["Maker", " Genmodel", " Genmodel_ID", "Adv_ID", "Adv_year", "Adv_month", "Color",
             "Reg_year", "Bodytype", "Runned_Miles", "Engin_size", "Gearbox", "Fuel_type", "Price",
             "Seat_num", "Door_num"]
MODELS = {"1_1": ("Abarth", "124 Spider", 12, (2300, 1200, 1700, 4000)),
          "1_2": ("Abarth", "595", 10, (2400, 1500, 1600, 3600)),
          "2_1": ("Alfa Romeo", "Giulia", 3, (2800, 1400, 1850, 4600))}   # dropped at min count 5
COLOURS = ["Black", "Blue", "Red", "White", "Silver"]
BODIES = ["Convertible", "Hatchback", "Saloon"]
GEARS = ["Manual", "Automatic"]
FUELS = ["Petrol", "Diesel", "Electric"]


def _colour(k):
    return ((40 + 37 * k) % 256, (200 - 23 * k) % 256, (90 + 61 * k) % 256)


@pytest.fixture(scope="module")
def dvm_raw(tmp_path_factory):
    """A DVM-CAR v2.0 tree; returns (raw dir, truth {Adv_ID: dict}) for the adverts that survive."""
    raw = tmp_path_factory.mktemp("dvm_raw")
    tables = raw / "tables_V2.0"
    ads, prices, images, extra, truth = [], [], [], [], {}
    k = 0
    for gid, (maker, model, count, base) in MODELS.items():
        for year in (2015, 2016, 2017):
            prices.append([model, gid, year, 20000 + 500 * (year - 2015) + 100 * int(gid[-1])])
        for j in range(1, count + 1):
            adv = f"{gid}$${j}"
            reg = 2015 + k % 3
            row = {"Maker": maker, "Genmodel": model, "Genmodel_ID": gid, "Adv_ID": adv,
                   "Adv_year": 2018 + k % 3, "Adv_month": 1 + k % 12, "Color": COLOURS[k % 5],
                   "Reg_year": f"{reg}.0" if k == 4 else reg, "Bodytype": BODIES[k % 3],
                   "Runned_Miles": 1000 * k + 17, "Engin_size": f"{1.0 + 0.2 * (k % 5):.1f}L",
                   "Gearbox": GEARS[k % 2], "Fuel_type": FUELS[k % 3], "Price": 15000 + 123 * k,
                   "Seat_num": 2 + k % 4, "Door_num": 2 + k % 3}
            ads.append([row[h.strip()] for h in AD_HEADER])
            dims = [b + 10 * j for b in base]            # Wheelbase, Height, Width, Length
            extra.append([adv, gid, dims[0], dims[3], dims[2], dims[1], 99])
            folder = [maker, model, str(row["Adv_year"]), row["Color"]]
            ext = "png" if k == 5 else "jpg"
            for n in (1, 0):                              # image_1 listed first; image_0 is chosen
                name = "$$".join(folder + [gid, str(j), f"image_{n}.{ext}"])
                images.append([gid, f"{adv}$${n}", name, 0 if n else 90, "P"])
                colour = _colour(k) if n == 0 else (255 - _colour(k)[0], 10, 250)
                _solid(raw.joinpath("resized_DVM", *folder, name), colour,
                       fmt="PNG" if ext == "png" else "JPEG")
            truth[adv] = {"gid": gid, "k": k, "dims": dims, "colour": _colour(k),
                          "image": name.replace("image_1", "image_0"),
                          "cont": [row["Adv_year"], row["Adv_month"], reg, row["Runned_Miles"],
                                   row["Price"], row["Seat_num"], row["Door_num"],
                                   prices[-3 + reg - 2015][3], 1.0 + 0.2 * (k % 5)],
                          "cats": [row["Color"], row["Bodytype"], row["Gearbox"], row["Fuel_type"]]}
            k += 1
    # extra-table gaps for 1_1: $$1 has no Height (so the fill comes from $$2), $$3 a zero
    # Wheelbase, $$4 an empty Height; 1_2$$5 is absent from the extra table altogether
    ex = {r[0]: r for r in extra}
    ex["1_1$$1"][6 - 1] = ""
    ex["1_1$$3"][2] = 0
    ex["1_1$$4"][5] = ""
    del ex["1_2$$5"]
    truth["1_1$$1"]["dims"][1] = truth["1_1$$2"]["dims"][1]
    truth["1_1$$3"]["dims"][0] = truth["1_1$$1"]["dims"][0]
    truth["1_1$$4"]["dims"][1] = truth["1_1$$2"]["dims"][1]
    truth["1_2$$5"]["dims"] = list(truth["1_2$$1"]["dims"])
    # adverts that must be dropped (class 1_1)
    bad = {"1_1$$90": {"Price": "Uknown"}, "1_1$$91": {"Color": ""}, "1_1$$92": {"Reg_year": 1999},
           "1_1$$93": {}}                                 # 93: no image
    for adv, change in bad.items():
        row = dict(zip([h.strip() for h in AD_HEADER], ads[0]))
        row.update({"Adv_ID": adv, **change})
        ads.append([row[h.strip()] for h in AD_HEADER])
        ex[adv] = [adv, "1_1", 2500, 4100, 1700, 1300, 1]
        if adv != "1_1$$93":
            name = f"Abarth$$124 Spider$$2018$$Black$$1_1$${adv[5:]}$$image_0.jpg"
            images.append(["1_1", f"{adv}$$0", name, 0, "P"])
            _solid(raw.joinpath("resized_DVM", "Abarth", "124 Spider", "2018", "Black", name), (0, 0, 0))
    images.append(["9_9", "9_9$$1$$0", "X$$Y$$2000$$Red$$9_9$$1$$image_0.jpg", 0, "P"])   # no advert
    write_csv(tables / "Ad_table.csv", AD_HEADER, ads)
    write_csv(tables / "Price_table.csv", ["Genmodel", " Genmodel_ID", " Year", " Entry_price"], prices)
    write_csv(tables / "Image_table.csv", ["Genmodel_ID", " Image_ID", " Image_name",
                                            " Predicted_viewpoint", " Quality_check"], images)
    write_csv(tables / "Ad_table (extra).csv", ["Adv_ID", " Genmodel_ID", " Wheelbase", " Length",
                                                 " Width", " Height", " Annual_Tax"], ex.values())
    kept = {a: t for a, t in truth.items() if t["gid"] != "2_1"}
    return raw, kept


@pytest.fixture(scope="module")
def dvm_full(dvm_raw, tmp_path_factory):
    raw, truth = dvm_raw
    out = tmp_path_factory.mktemp("dvm_out")
    root = dvm.convert(raw, out, min_class_count=5, block=5)
    meta, data = read_shards(root)
    return root, meta, data, truth


def test_dvm_meta_and_filtering(dvm_full):
    root, meta, data, truth = dvm_full
    assert root.name == "dvm"
    assert meta["class_names"] == ["1_1", "1_2"] and meta["num_classes"] == 2
    assert meta["source"]["class_models"] == ["Abarth 124 Spider", "Abarth 595"]
    table = meta["modalities"]["table"]
    assert meta["modalities"]["image"] == {"kind": "image", "shape": [3, 128, 128], "dtype": "uint8"}
    assert table["shape"] == [17] and table["dtype"] == "float32"
    assert table["continuous"] == list(dvm.CONTINUOUS)
    kept_cats = [sorted({t["cats"][j] for t in truth.values()}) for j in range(4)]
    assert table["categorical"] == {c: len(v) for c, v in zip(dvm.CATEGORICAL, kept_cats)}
    assert meta["source"]["categories"] == dict(zip(dvm.CATEGORICAL, kept_cats))
    dropped = meta["source"]["counts"]["dropped"]
    assert dropped == {"no_price_match": 1, "missing_value": 2, "no_image": 1,
                       "missing_image_file": 0, "small_class": 3}
    assert meta["source"]["split"]["seed"] == 2022
    index = read_samples(root)
    ids = np.concatenate([d["sample_id"] for d in data.values()])
    assert sorted(ids.tolist()) == list(range(len(truth)))          # every kept advert once
    assert sorted(r["Adv_ID"] for r in index.values()) == sorted(truth)
    assert [index[i]["Adv_ID"] for i in range(len(truth))] == sorted(truth, key=dvm.natural_key)


def test_dvm_split_stratified(dvm_full):
    root, meta, data, truth = dvm_full
    n = {s: len(d["label"]) for s, d in data.items()}
    assert n["test"] == 11 and n["val"] == 3 and n["train"] == 8      # 50% of 22, 20% of 11
    for split, d in data.items():
        assert set(d["label"].tolist()) == {0, 1}, split
    assert meta["source"]["counts"]["splits"] == n


def test_dvm_table_values(dvm_full):
    root, meta, data, truth = dvm_full
    index = read_samples(root)
    std = meta["source"]["standardisation"]["table"]
    mean, sd = np.array(std["mean"]), np.array(std["std"])
    assert std["fitted_on"] == "train"
    recovered, true, split_of = {}, {}, {}
    for split, d in data.items():
        cont = d["table"][:, :13].astype(np.float64) * sd + mean
        for sid, row, codes, lab in zip(d["sample_id"], cont, d["table"][:, 13:], d["label"]):
            t = truth[index[int(sid)]["Adv_ID"]]
            assert lab == meta["class_names"].index(t["gid"])
            recovered[int(sid)] = row
            true[int(sid)] = np.array(t["dims"] + t["cont"], dtype=np.float64)
            split_of[int(sid)] = split
            # categorical codes: position in the sorted distinct values
            want = [meta["source"]["categories"][c].index(v) for c, v in zip(dvm.CATEGORICAL, t["cats"])]
            assert codes.tolist() == want
    ids = sorted(recovered)
    rec = np.stack([recovered[i] for i in ids])
    tru = np.stack([true[i] for i in ids])
    np.testing.assert_allclose(rec[:, 4:], tru[:, 4:], rtol=1e-5, atol=1e-3)   # no jitter there
    jit = rec[:, :4] - tru[:, :4]
    np.testing.assert_allclose(jit, np.round(jit), atol=0.02)                  # integer jitter
    jit = np.round(jit).astype(int)
    assert jit.min() >= -50 and jit.max() <= 50 and np.abs(jit).max() > 0
    expected = np.random.default_rng(2022).integers(-50, 51, size=(len(ids), 4))
    assert np.array_equal(jit, expected)                                      # documented rule
    # z-scoring with train statistics only: recompute them from the raw values
    raw_vals = tru.copy()
    raw_vals[:, :4] += jit
    train = np.array([split_of[i] == "train" for i in ids])
    m, s = raw_vals[train].mean(0), raw_vals[train].std(0)
    s[s == 0] = 1
    np.testing.assert_allclose(mean, m, rtol=1e-9)
    np.testing.assert_allclose(sd, s, rtol=1e-9)
    z_train = data["train"]["table"][:, :13].astype(np.float64)
    np.testing.assert_allclose(z_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z_train.std(0), 1, atol=1e-5)
    all_stats = raw_vals.mean(0)
    assert not np.allclose(all_stats, m)                                        # not fitted on all
    for split in ("val", "test"):
        d = data[split]
        want = (np.stack([raw_vals[ids.index(int(i))] for i in d["sample_id"]]) - m) / s
        np.testing.assert_allclose(d["table"][:, :13], want, rtol=1e-5, atol=1e-5)


def test_dvm_one_image_per_advert_content_preserved(dvm_full):
    root, meta, data, truth = dvm_full
    index = read_samples(root)
    for d in data.values():
        assert d["image"].shape[1:] == (3, 128, 128) and d["image"].dtype == np.uint8
        for sid, img in zip(d["sample_id"], d["image"]):
            t = truth[index[int(sid)]["Adv_ID"]]
            assert index[int(sid)]["Image_name"] == t["image"]               # the first by name
            px = img.reshape(3, -1).astype(int)
            assert np.abs(px - np.array(t["colour"])[:, None]).max() <= 4, t["image"]


def test_dvm_deterministic_with_workers_and_low_data(dvm_raw, dvm_full, tmp_path):
    raw, truth = dvm_raw
    _, meta, data, _ = dvm_full
    again = dvm.convert(raw, tmp_path, name="again", min_class_count=5, workers=2, block=3)
    meta2, data2 = read_shards(again)
    for split in data:
        for key in data[split]:
            assert np.array_equal(data[split][key], data2[split][key]), (split, key)
    low = dvm.convert(raw, tmp_path, low_data=0.1, min_class_count=5)
    assert low.name == "dvm_low0.1"
    meta3, data3 = read_shards(low)
    assert set(data3["train"]["label"].tolist()) == {0, 1}                   # >= 1 per class
    assert len(data3["train"]["label"]) == 2
    assert set(data3["train"]["sample_id"]) <= set(data["train"]["sample_id"])
    for split in ("val", "test"):
        assert np.array_equal(data3[split]["sample_id"], data[split]["sample_id"])
        assert np.array_equal(data3[split]["image"], data[split]["image"])
    z = data3["train"]["table"][:, :13]
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)                      # low-data train stats
    std3, std1 = (m["source"]["standardisation"]["table"] for m in (meta3, meta))
    assert std3["mean"] != std1["mean"]


def test_dvm_missing_column_and_image(dvm_raw, tmp_path):
    raw, truth = dvm_raw
    bad = tmp_path / "raw"
    shutil.copytree(raw / "tables_V2.0", bad / "tables_V2.0")
    (bad / "resized_DVM").symlink_to(raw / "resized_DVM")
    with open(raw / "tables_V2.0" / "Ad_table.csv", newline="") as f:
        rows = list(csv.reader(f))
    drop = [h.strip() for h in rows[0]].index("Price")
    write_csv(bad / "tables_V2.0" / "Ad_table.csv", rows[0][:drop] + rows[0][drop + 1:],
               [r[:drop] + r[drop + 1:] for r in rows[1:]])
    with pytest.raises(ValueError, match=r"Ad_table\.csv: missing column 'Price'"):
        dvm.convert(bad, tmp_path / "o1", min_class_count=5)
    shutil.copy(raw / "tables_V2.0" / "Ad_table.csv", bad / "tables_V2.0" / "Ad_table.csv")

    # a missing chosen image: error naming the path, or dropped with --skip-missing-images
    (bad / "resized_DVM").unlink()
    shutil.copytree(raw / "resized_DVM", bad / "resized_DVM")
    t = truth["1_2$$3"]
    gone = bad.joinpath("resized_DVM", *t["image"].split("$$")[:4], t["image"])
    gone.unlink()
    with pytest.raises(FileNotFoundError, match="image_0.jpg") as e:
        dvm.convert(bad, tmp_path / "o2", min_class_count=5)
    assert str(gone) in str(e.value)
    assert not (tmp_path / "o2" / "dvm" / "meta.json").exists()
    root = dvm.convert(bad, tmp_path / "o3", min_class_count=5, skip_missing_images=True)
    meta, data = read_shards(root)
    assert sum(len(d["label"]) for d in data.values()) == len(truth) - 1
    assert meta["source"]["counts"]["dropped"]["missing_image_file"] == 1
    assert "1_2$$3" not in {r["Adv_ID"] for r in read_samples(root).values()}
    # a class below the default threshold of 100: nothing left
    with pytest.raises(ValueError, match="no advert left"):
        dvm.convert(raw, tmp_path / "o4")


def test_dvm_cli(dvm_raw, tmp_path):
    raw, truth = dvm_raw
    assert dvm.main(["--raw", str(raw), "--out", str(tmp_path), "--min-class-count", "11",
                     "--image-size", "16", "--low-data", "0.5"]) == 0
    meta = validate(tmp_path / "dvm_low0.5")
    assert meta["class_names"] == ["1_1"] and meta["modalities"]["image"]["shape"] == [3, 16, 16]


# ---------------------------------------------------------------------------------- splitting


def test_allocate_totals_and_bounds():
    counts = [100, 150, 3, 2, 1]
    a = allocate(counts, 0.5)
    assert a.sum() == 128 and all(0 <= x <= c for x, c in zip(a, counts))
    lo = [1, 1, 1, 0, 0]
    hi = [98, 148, 1, 0, 0]
    b = allocate(counts, 0.5, lo, hi)
    assert b.sum() == 128 and b[2] == 1 and b[3] == 0 and b[4] == 0
    assert allocate([10, 10, 10], 0.01, [1, 1, 1]).tolist() == [1, 1, 1]


def test_load_image_center_crop(tmp_path):
    im = Image.new("RGB", (60, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))          # blue centre square
    im.save(tmp_path / "x.png")
    crop = load_image(tmp_path / "x.png", 8, "center")
    assert (crop[2] == 255).all() and (crop[0] == 0).all()
    stretch = load_image(tmp_path / "x.png", 8)
    assert stretch[0, :, 0].min() == 255


# --------------------------------------------------------------------------------- SUN Attribute

SUN_ATTRS = [f"attribute {i}" for i in range(40)] + ["open area"] + [f"attribute {i}" for i in range(40, 101)]


@pytest.fixture(scope="module")
def sun_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("sun_raw")
    rng = np.random.default_rng(0)
    votes = np.array([0, 1 / 3, 2 / 3, 1])
    rows, truth = [], {}
    for i in range(40):
        rel = f"{'ab'[i % 2]}/scene_{i % 3}/sun_{i:04d}.{'jpg' if i % 4 else 'png'}"
        v = votes[rng.integers(0, 4, len(SUN_ATTRS))]
        v[40] = 0 if i < 24 else votes[1 + i % 3]          # 16 open-area images
        rows.append([rel] + [f"{x:.2f}" if 0 < x < 1 else int(x) for x in v])
        colour = (i * 5, 255 - i * 6, 128)
        _solid(raw / "images" / rel, colour, size=(30, 21), fmt="JPEG" if i % 4 else "PNG")
        truth[rel] = (v, colour)
    write_csv(raw / "attributes.csv", ["image"] + SUN_ATTRS, rows)
    return raw, truth


def test_sun_attribute(sun_raw, tmp_path):
    raw, truth = sun_raw
    root = sun_attribute.convert(raw, tmp_path, block=16)
    meta, data = read_shards(root)
    assert meta["class_names"] == ["not open area", "open area"]
    tab = meta["modalities"]["table"]
    assert tab["shape"] == [101] and tab["categorical"] == {}
    assert tab["continuous"] == [a for a in SUN_ATTRS if a != "open area"]
    assert meta["modalities"]["image"]["shape"] == [3, 225, 225]
    assert meta["source"]["image"]["normalize"] == "imagenet" and meta["source"]["split"]["seed"] == 2022
    n = {s: len(d["label"]) for s, d in data.items()}
    assert n == {"train": 28, "val": 4, "test": 8}
    for split, d in data.items():
        assert set(d["label"].tolist()) == {0, 1}, split
    assert abs(data["test"]["label"].mean() - 0.4) < 0.15
    index = read_samples(root)
    for d in data.values():
        for sid, lab, feats, img in zip(d["sample_id"], d["label"], d["table"], d["image"]):
            v, colour = truth[index[int(sid)]["image"]]
            assert lab == int(v[40] > 0)
            assert feats.tolist() == (np.delete(v, 40) > 0).astype(np.float32).tolist()
            assert np.abs(img.reshape(3, -1).astype(int) - np.array(colour)[:, None]).max() <= 4
    again = sun_attribute.convert(raw, tmp_path, name="again", block=7, workers=2)
    _, data2 = read_shards(again)
    assert all(np.array_equal(data[s]["sample_id"], data2[s]["sample_id"]) for s in data)


def test_sun_attribute_errors(sun_raw, tmp_path):
    raw, truth = sun_raw
    with open(raw / "attributes.csv", newline="") as f:
        rows = list(csv.reader(f))
    bad = tmp_path / "bad.csv"
    no_label = [[c for j, c in enumerate(r) if j != 41] for r in rows]   # drop "open area"
    write_csv(bad, no_label[0], no_label[1:])
    with pytest.raises(ValueError, match=r"bad\.csv: missing column 'open area'"):
        sun_attribute.convert(raw, tmp_path / "o", csv_path=bad, image_root=raw / "images")
    rows2 = [r[:] for r in rows]
    rows2[3][5] = "yes"
    write_csv(bad, rows2[0], rows2[1:])
    with pytest.raises(ValueError, match=r"bad\.csv, line 4: column 'attribute 4'"):
        sun_attribute.convert(raw, tmp_path / "o", csv_path=bad, image_root=raw / "images")
    write_csv(bad, rows[0][:-1], [r[:-1] for r in rows[1:]])
    with pytest.raises(ValueError, match="101 attribute columns, expected 102"):
        sun_attribute.convert(raw, tmp_path / "o", csv_path=bad, image_root=raw / "images")
    rows3 = [r[:] for r in rows]
    rows3[2][0] = "a/scene_0/nope.jpg"
    write_csv(bad, rows3[0], rows3[1:])
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        sun_attribute.convert(raw, tmp_path / "o", csv_path=bad, image_root=raw / "images")
    root = sun_attribute.convert(raw, tmp_path / "o", csv_path=bad, image_root=raw / "images",
                                 skip_missing_images=True, image_size=8)
    assert sum(validate(root)["splits"][s]["num_samples"] for s in ("train", "val", "test")) == 39


# ---------------------------------------------------------------------------------------- CelebA


@pytest.fixture(scope="module")
def celeba_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("celeba_raw")
    rng = np.random.default_rng(1)
    attrs, parts, truth = [], [], {}
    for i in range(12):
        iid = f"{i + 1:06d}.jpg"
        v = rng.choice([-1, 1], len(celeba.ATTRIBUTES))
        v[2] = 1 if i % 3 == 0 else -1                     # Attractive
        attrs.append([iid] + v.tolist())
        parts.append([iid, 0 if i < 6 else 1 if i < 9 else 2])
        colour = (250 - 20 * i, 20 * i, 77)
        _solid(raw / "img_align_celeba" / "img_align_celeba" / iid, colour, size=(178, 218), fmt="JPEG")
        truth[iid] = (v, colour, ["train", "val", "test"][parts[-1][1]])
    write_csv(raw / "list_attr_celeba.csv", ["image_id", *celeba.ATTRIBUTES], attrs)
    write_csv(raw / "list_eval_partition.csv", ["image_id", "partition"], parts)
    return raw, truth


def test_celeba(celeba_raw, tmp_path):
    raw, truth = celeba_raw
    root = celeba.convert(raw, tmp_path, image_size=64)
    meta, data = read_shards(root)
    assert meta["class_names"] == ["not Attractive", "Attractive"]
    tab = meta["modalities"]["table"]
    assert tab["shape"] == [39] and "Attractive" not in tab["continuous"] and tab["categorical"] == {}
    assert {s: len(d["label"]) for s, d in data.items()} == {"train": 6, "val": 3, "test": 3}
    index = read_samples(root)
    for split, d in data.items():
        for sid, lab, feats, img in zip(d["sample_id"], d["label"], d["table"], d["image"]):
            iid = index[int(sid)]["image_id"]
            assert int(sid) == int(iid[:6]) - 1
            v, colour, want_split = truth[iid]
            assert split == want_split and lab == (v[2] == 1)
            assert feats.tolist() == (np.delete(v, 2) == 1).astype(np.float32).tolist()
            assert np.abs(img.reshape(3, -1).astype(int) - np.array(colour)[:, None]).max() <= 4


def test_celeba_errors(celeba_raw, tmp_path):
    raw, truth = celeba_raw
    with open(raw / "list_attr_celeba.csv", newline="") as f:
        rows = list(csv.reader(f))
    bad = tmp_path / "attr.csv"
    rows[5][8] = "0"
    write_csv(bad, rows[0], rows[1:])
    with pytest.raises(ValueError, match=rf"attr\.csv, line 6: column '{celeba.ATTRIBUTES[7]}'"):
        celeba.convert(raw, tmp_path / "o", attr_csv=bad)
    write_csv(bad, rows[0][:-1], [r[:-1] for r in rows[1:]])
    with pytest.raises(ValueError, match=r"attr\.csv: missing column 'Young'"):
        celeba.convert(raw, tmp_path / "o", attr_csv=bad)
    img_root = tmp_path / "imgs"
    shutil.copytree(raw / "img_align_celeba" / "img_align_celeba", img_root)
    (img_root / "000004.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000004.jpg"):
        celeba.convert(raw, tmp_path / "o", image_root=img_root)


@pytest.mark.slow
def test_gaal_trains_on_converted_dvm(dvm_full, tmp_path):
    """The shipped DVM config drives train/gaal.py on converter output (encoders shrunk to test size)."""
    from tests.test_train import run_script
    out = tmp_path / "run"
    root = dvm_full[0]
    run_script("train/gaal.py", [
        "--config", "train/configs/gaal_dvm.yaml", "--data", str(root), "--out_dir", str(out),
        "--epochs", "1", "--batch_size", "8", "--eval_batch_size", "16", "--num_workers", "0",
        "--progress", "false", "--encoders.image.arch", "resnet10", "--encoders.image.base_width", "8",
        "--encoders.table.hidden", "32", "--encoders.table.out_dim", "64"])
    import json
    result = json.loads((out / "result.json").read_text())
    assert set(result["test"]) == {"image", "table", "fused"}
