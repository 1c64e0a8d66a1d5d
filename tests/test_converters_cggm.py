"""CGGM converters (UPMC Food-101, CMU-MOSI, IEMOCAP, BraTS 2021) end to end on small files in the
real raw formats: JSON + JPEGs + tiny BERT / ViT saved as Hugging Face directories, a MulT
pickle, MMIN-layout h5 / npy feature files, NIfTI volumes written with nibabel."""
import csv
import json
import pickle
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import brats, features, food101, iemocap, mosi
from data_prep.image_io import load_image
from data_prep.shards import validate
from tests.conftest import read_shards

torch.set_num_threads(1)   # 2 threads on a shared 2-core machine were 50x slower (OpenMP spin)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a and of with in to add salt sugar butter flour egg eggs cheese tomato rice fish bake "
    "mix cook minutes oven sauce fresh apple pie pizza sushi dough roll cut serve hot cold").split()



def _csv(root, name="samples.csv"):
    with open(root / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ Food-101


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random BERT and ViT saved exactly as the real ones are laid out on disk."""
    from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    bert = root / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    BertTokenizer(str(bert / "vocab.txt"), do_lower_case=True).save_pretrained(bert)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(bert)
    vit = root / "vit"
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=64),
             add_pooling_layer=False).save_pretrained(vit)
    (vit / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32, "width": 32}}))
    return {"bert": bert, "vit": vit}


FOOD_CLASSES = ["apple_pie", "pizza", "sushi"]
RECIPES = [["Add", "salt", "and", "sugar", "to", "the", "butter"], ["bake", "in", "the", "oven"],
           ["mix", "flour", "with", "eggs", "then", "roll", "the", "dough", "cut", "and", "serve", "hot"],
           [], ["fresh", "fish", "rice"]]


def _jpeg(path, seed, size):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG")


@pytest.fixture(scope="module")
def food_raw(tmp_path_factory):
    """train.json: the released list-of-objects form (4 per class); test.json: the id -> object
    form, one item without 'label' (class from its directory)."""
    raw = tmp_path_factory.mktemp("food_raw")
    truth, k = {}, 0
    train = []
    for j in range(12):
        c = FOOD_CLASSES[j % 3]
        img = f"images/train/{c}/{c}_{j}.jpg"
        _jpeg(raw / img, k, (40 + j, 30 + 2 * j))
        train.append({"id": f"{c}_{j}.jpg", "text_tokens": RECIPES[j % 5], "img_path": img, "label": c})
        truth[k] = (FOOD_CLASSES.index(c), RECIPES[j % 5], img)
        k += 1
    test = {}
    for j, c in enumerate(["sushi", "apple_pie", "pizza"]):
        img = f"images/test/{c}/{c}_{j}.jpg"
        _jpeg(raw / img, 100 + j, (37, 45))
        item = {"text_tokens": RECIPES[(j + 2) % 5], "img_path": img}
        if j != 1:
            item["label"] = c
        test[f"{c}_{j}.jpg"] = item
        truth[k] = (FOOD_CLASSES.index(c), RECIPES[(j + 2) % 5], img)
        k += 1
    (raw / "train.json").write_text(json.dumps(train))
    (raw / "test.json").write_text(json.dumps(test))
    return raw, truth


def _food_args(raw, out, w, *extra):
    return ["--raw", str(raw), "--out", str(out), "--bert", str(w["bert"]), "--vit", str(w["vit"]),
            "--max-tokens", "8", "--val-frac", "0.25", "--batch-size", "4", "--block", "5", *extra]


def test_food101_end_to_end(food_raw, weights, tmp_path):
    raw, truth = food_raw
    assert food101.main(_food_args(raw, tmp_path, weights)) == 0
    root = tmp_path / "food101"
    meta, data = read_shards(root)
    assert meta["task"] == "classification" and meta["num_classes"] == 101
    assert meta["class_names"][:3] == ["apple_pie", "baby_back_ribs", "baklava"]
    assert meta["modalities"] == {"image": {"kind": "sequence", "shape": [5, 32], "dtype": "float32"},
                                  "text": {"kind": "sequence", "shape": [8, 32], "dtype": "float32"}}
    assert {s: len(d["label"]) for s, d in data.items()} == {"train": 9, "val": 3, "test": 3}
    names = [food101.CLASS_INDEX[c] for c in FOOD_CLASSES]
    assert sorted(data["val"]["label"].tolist()) == sorted(names)                # stratified
    ids = np.concatenate([d["sample_id"] for d in data.values()])
    assert sorted(ids.tolist()) == list(range(15)) and data["test"]["sample_id"].tolist() == [12, 13, 14]
    src = meta["source"]
    assert src["split"]["seed"] == 0 and src["split"]["val_frac"] == 0.25
    assert src["counts"]["label_from_directory"] == 1 and src["counts"]["label_dir_mismatch"] == 0
    assert src["image"]["model"]["normalization_from"] == "preprocessor_config.json"
    index = {int(r["sample_id"]): r for r in _csv(root)}
    bert = features.BertExtractor(weights["bert"], max_length=8)
    vit = features.ViTExtractor(weights["vit"])
    for split, d in data.items():
        words, images = [], []
        for j, sid in enumerate(d["sample_id"]):
            label, recipe, img = truth[int(sid)]
            assert d["label"][j] == food101.CLASS_INDEX[FOOD_CLASSES[label]]
            assert index[int(sid)]["img_path"] == img and index[int(sid)]["split"] == split
            words.append(recipe)
            images.append(load_image(raw / img, 32, "none"))
        feats, mask = bert.tokens(words, 8)
        np.testing.assert_allclose(d["text"], feats, atol=1e-5)
        np.testing.assert_allclose(d["image"], vit(np.stack(images)), atol=1e-5)
        # the padding mask is implicit: zero rows <=> padding, and n_tokens records it
        assert np.array_equal(np.abs(d["text"]).sum(-1) > 0, mask)
        assert [int(index[int(s)]["n_tokens"]) for s in d["sample_id"]] == mask.sum(1).tolist()
    assert src["counts"]["tokens"]["train"]["max"] == 8          # the 12-word recipe is truncated
    assert min(v["min"] for v in src["counts"]["tokens"].values()) == 2     # [] -> [CLS] [SEP]


def test_food101_float16_and_released_pixels(food_raw, weights, tmp_path):
    """float16 storage (size halved, relative error <= 2^-11) and --vit-normalize none ([0, 1])."""
    raw, truth = food_raw
    r32 = food101.convert(raw, tmp_path, weights["bert"], weights["vit"], max_tokens=8, val_frac=0,
                          vit_normalize="none", batch_size=8)
    r16 = food101.convert(raw, tmp_path, weights["bert"], weights["vit"], name="f16", max_tokens=8,
                          val_frac=0, vit_normalize="none", dtype="float16", batch_size=8)
    m32, d32 = read_shards(r32)
    m16, d16 = read_shards(r16)
    assert set(d32) == {"train", "test"} and m16["modalities"]["image"]["dtype"] == "float16"
    assert m32["source"]["image"]["model"]["mean"] == [0.0, 0.0, 0.0]
    from transformers import ViTModel
    model = ViTModel.from_pretrained(weights["vit"], local_files_only=True, add_pooling_layer=False).eval()
    x = torch.stack([torch.from_numpy(load_image(raw / truth[int(s)][2], 32)).float() / 255
                     for s in d32["test"]["sample_id"]])
    with torch.no_grad():   # the released input: ToTensor() pixels, no normalisation
        want = model(pixel_values=x).last_hidden_state.numpy()
    np.testing.assert_allclose(d32["test"]["image"], want, atol=1e-5)
    for split in d32:
        for key in ("image", "text"):
            a, b = d32[split][key], d16[split][key].astype(np.float32)
            assert d16[split][key].dtype == np.float16
            assert np.all(np.abs(a - b) <= np.abs(a) * 2.0 ** -11 + 1e-7), (split, key)
    size = lambda r: sum(p.stat().st_size for p in r.glob("*.h5"))
    assert size(r16) < 0.6 * size(r32)


def test_food101_errors(food_raw, weights, tmp_path):
    raw, truth = food_raw
    items = json.loads((raw / "train.json").read_text())
    bad = tmp_path / "bad.json"
    conv = lambda out, **kw: food101.convert(raw, tmp_path / out, weights["bert"], weights["vit"],
                                             split_files={"train": bad}, max_tokens=8, **kw)
    broken = [dict(it) for it in items]
    del broken[2]["img_path"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"bad\.json, item 2 \(id 'sushi_2\.jpg'\): missing key 'img_path'"):
        conv("o1")
    broken = [dict(it) for it in items]
    broken[1]["text_tokens"] = "a string"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"item 1 .*key 'text_tokens' is not a list of strings"):
        conv("o2")
    broken = [dict(it) for it in items]
    broken[3]["label"] = "tacos al pastor"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"item 3 .*key 'label' = 'tacos al pastor'"):
        conv("o3")
    broken = [dict(it) for it in items]
    del broken[4]["label"]
    broken[4]["img_path"] = "flat.jpg"
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"item 4 .*no key 'label', and the image directory ''"):
        conv("o4")
    broken = [dict(it) for it in items]
    broken[5]["img_path"] = "images/train/pizza/gone.jpg"
    bad.write_text(json.dumps(broken))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        conv("o5")
    with pytest.raises(features.WeightsError, match=r"--vit .*novit: not a directory"):
        food101.convert(raw, tmp_path / "o6", weights["bert"], tmp_path / "novit")
    bad.write_text(json.dumps(items + [items[0]]))
    with pytest.raises(ValueError, match=r"item 12 .*id listed twice"):
        conv("o7")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5", "o6", "o7"))
    bad.write_text(json.dumps(broken))
    root = conv("o8", skip_missing_images=True, val_frac=0)
    assert validate(root)["splits"]["train"]["num_samples"] == 11


def test_food101_no_half_written_output(food_raw, weights, tmp_path):
    """A corrupt image met while writing the test split leaves no dataset behind."""
    raw, truth = food_raw
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    (bad / truth[13][2]).write_bytes(b"not a jpeg" * 10)
    with pytest.raises(ValueError, match=truth[13][2]):
        food101.convert(bad, tmp_path / "out", weights["bert"], weights["vit"], max_tokens=8, block=2)
    assert not (tmp_path / "out" / "food101").exists()


# ----------------------------------------------------------------------------------------- MOSI

MOSI_N = {"train": 6, "valid": 3, "test": 4}


def _mosi_data(seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for k, (split, n) in enumerate(MOSI_N.items()):
        audio = rng.normal(size=(n, 7, 3))
        audio[0, 2, 1] = -np.inf
        audio[n - 1, 6, :] = -np.inf
        data[split] = {"text": rng.normal(size=(n, 4, 6)).astype(np.float32), "audio": audio,
                       "vision": rng.normal(size=(n, 5, 2)),
                       "labels": rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32),
                       "id": np.array([[f"vid{k}", str(i)] for i in range(n)])}
    data["train"]["labels"][0, 0, 0] = -3.0
    return data


def test_mosi_end_to_end(tmp_path):
    data = _mosi_data()
    pkl = tmp_path / "mosi_data.pkl"
    pkl.write_bytes(pickle.dumps(data))
    assert mosi.main(["--pickle", str(pkl), "--out", str(tmp_path), "--block", "4"]) == 0
    root = tmp_path / "mosi"
    meta, out = read_shards(root)
    assert meta["task"] == "regression" and meta["num_classes"] == 1
    assert list(meta["modalities"]) == ["text", "audio", "vision"]
    assert meta["modalities"]["audio"] == {"kind": "sequence", "shape": [7, 3], "dtype": "float32"}
    assert meta["modalities"]["text"]["shape"] == [4, 6] and meta["modalities"]["vision"]["shape"] == [5, 2]
    assert {s: len(d["label"]) for s, d in out.items()} == {"train": 6, "val": 3, "test": 4}
    src = meta["source"]
    assert src["counts"]["audio_neg_inf_zeroed"] == {"train": 4, "val": 4, "test": 4}
    assert src["raw_arrays"]["train"]["audio"] == {"shape": [6, 7, 3], "dtype": "float64"}
    next_id = 0
    for key, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        d, raw = out[split], data[key]
        assert d["label"].dtype == np.float32
        np.testing.assert_array_equal(d["label"], raw["labels"].reshape(-1))
        np.testing.assert_array_equal(d["text"], raw["text"])
        np.testing.assert_array_equal(d["vision"], raw["vision"].astype(np.float32))
        want = raw["audio"].astype(np.float32)
        want[np.isneginf(want)] = 0
        np.testing.assert_array_equal(d["audio"], want)
        assert np.isfinite(d["audio"]).all()
        assert d["sample_id"].tolist() == list(range(next_id, next_id + MOSI_N[key]))
        next_id += MOSI_N[key]
    assert src["label"]["range"]["train"][0] == -3.0
    rows = _csv(root)
    assert rows[7]["id"] == "vid1|1" and rows[7]["split"] == "val" and rows[7]["index"] == "1"
    with pytest.raises(FileExistsError, match="mosi: dataset directory exists"):
        mosi.main(["--pickle", str(pkl), "--out", str(tmp_path)])
    assert mosi.main(["--pickle", str(pkl), "--out", str(tmp_path), "--overwrite"]) == 0
    assert validate(root)["splits"]["test"]["num_samples"] == 4


def test_mosi_errors(tmp_path):
    def run(out, data, **kw):
        pkl = tmp_path / f"{out}.pkl"
        pkl.write_bytes(pickle.dumps(data))
        return mosi.convert(pkl, tmp_path / out, **kw)

    data = _mosi_data()
    data["valid"]["vision"][1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"o1\.pkl: split 'valid', key 'vision': 1 non-finite value"):
        run("o1", data)
    root = run("o1b", data, fix_nonfinite=True)
    meta, out = read_shards(root)
    assert out["val"]["vision"][1, 2, 0] == 0 and meta["source"]["counts"]["nonfinite_zeroed"]["val"]["vision"] == 1
    data = _mosi_data()
    data["test"]["labels"] = np.zeros((4, 1, 2), np.float32)
    with pytest.raises(ValueError, match=r"split 'test', key 'labels': 2 values per sample"):
        run("o2", data)
    data = _mosi_data()
    data["train"]["labels"][3, 0, 0] = 3.5
    with pytest.raises(ValueError, match=r"split 'train', key 'labels': 1 value\(s\) .*row 3 = 3\.5"):
        run("o3", data)
    data = _mosi_data()
    del data["valid"]
    with pytest.raises(ValueError, match=r"o4\.pkl: missing split\(s\) \['valid'\]"):
        run("o4", data)
    data = _mosi_data()
    data["test"]["audio"] = data["test"]["audio"][:, :5]
    with pytest.raises(ValueError, match=r"split 'test', key 'audio': per-sample shape \[5, 3\] differs"):
        run("o5", data)
    data = _mosi_data()
    data["train"]["vision"] = data["train"]["vision"][:5]
    with pytest.raises(ValueError, match=r"split 'train', key 'vision': 5 rows"):
        run("o6", data)
    (tmp_path / "o7.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match=r"o7\.pkl: not a readable pickle"):
        mosi.convert(tmp_path / "o7.pkl", tmp_path / "o7")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 8))


# -------------------------------------------------------------------------------------- IEMOCAP

IEMO = {"trn": 6, "val": 3, "tst": 3}
DIMS = {"text": 4, "audio": 6, "vision": 5}
LENS = {"text": 3, "audio": 10, "vision": 4}


def _write_iemocap(raw, seed=0):
    """MMIN layout: L/A/V per-utterance h5, target/1/{trn,val,tst}_{label,int2name}.npy."""
    rng = np.random.default_rng(seed)
    feats = {m: {} for m in DIMS}
    labels = {}
    for p, n in IEMO.items():
        names = [f"Ses0{1 + 'trn val tst'.split().index(p)}F_impro0{i}_F00{i}" for i in range(n)]
        lab = np.array([i % 4 for i in range(n)])
        labels[p] = (names, lab)
        (raw / "target" / "1").mkdir(parents=True, exist_ok=True)
        np.save(raw / "target" / "1" / f"{p}_label.npy", np.eye(4, dtype=np.float32)[lab])
        np.save(raw / "target" / "1" / f"{p}_int2name.npy", np.array([[u.encode()] for u in names]))
        for i, u in enumerate(names):
            feats["text"][u] = rng.normal(size=(1 + i % 3, DIMS["text"]))
            feats["audio"][u] = rng.normal(5.0 * (p == "trn") + 1, 2.0, size=(3 + i, DIMS["audio"]))
            feats["vision"][u] = rng.normal(size=(i % 5, DIMS["vision"]))       # 0 frames for i = 0
    for m, folder, fname in (("text", "L", "bert_large"), ("audio", "A", "comparE"), ("vision", "V", "denseface")):
        (raw / folder).mkdir(parents=True, exist_ok=True)
        with h5py.File(raw / folder / f"{fname}.h5", "w") as f:
            for u, x in feats[m].items():
                f[u] = x.astype(np.float32)
    with h5py.File(raw / "A" / "comparE_mean_std.h5", "w") as f:
        f["1/mean"] = np.full(DIMS["audio"], 2.0, np.float32)
        f["1/std"] = np.full(DIMS["audio"], 4.0, np.float32)
    return feats, labels


@pytest.fixture(scope="module")
def iemo_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("iemo_raw")
    return raw, *_write_iemocap(raw)


def _iemo_args(raw, out, *extra):
    return ["--raw", str(raw), "--out", str(out), "--text-len", "3", "--audio-len", "10",
            "--vision-len", "4", "--block", "4", *extra]


def test_iemocap_end_to_end(iemo_raw, tmp_path):
    raw, feats, labels = iemo_raw
    assert iemocap.main(_iemo_args(raw, tmp_path)) == 0
    root = tmp_path / "iemocap"
    meta, out = read_shards(root)
    assert meta["class_names"] == ["ang", "hap", "neu", "sad"] and meta["num_classes"] == 4
    assert meta["modalities"] == {m: {"kind": "sequence", "shape": [LENS[m], DIMS[m]], "dtype": "float32"}
                                  for m in ("text", "audio", "vision")}
    assert {s: len(d["label"]) for s, d in out.items()} == {"train": 6, "val": 3, "test": 3}
    # train statistics: every frame of every train utterance, float64, population std
    train_frames = np.concatenate([feats["audio"][u].astype(np.float32).astype(np.float64)
                                   for u in labels["trn"][0]])
    mean, std = train_frames.mean(0), train_frames.std(0)
    norm = meta["source"]["audio_norm"]
    np.testing.assert_allclose(norm["mean"], mean, rtol=1e-10)
    np.testing.assert_allclose(norm["std"], std, rtol=1e-10)
    assert norm["method"] == "train" and norm["frames"] == len(train_frames)
    rows = {r["utterance"]: r for r in _csv(root)}
    for p, split in iemocap.SPLITS.items():
        names, lab = labels[p]
        d = out[split]
        assert d["label"].tolist() == lab.tolist()
        for j, u in enumerate(names):
            for m in ("text", "audio", "vision"):
                x = feats[m][u].astype(np.float32).astype(np.float64)
                if m == "audio":
                    x = (x - mean) / std          # val / test too: TRAIN statistics
                t = len(x)
                np.testing.assert_allclose(d[m][j, :t], x, rtol=1e-5, atol=1e-5)
                assert (d[m][j, t:] == 0).all()
                assert int(rows[u][f"{m}_len"]) == t
    assert abs(out["train"]["audio"][:, :, 0][out["train"]["audio"][:, :, 0] != 0].mean()) < 1e-5
    assert abs(out["val"]["audio"][0, :4].mean()) > 1.0          # val is not re-centred on itself
    assert meta["source"]["counts"]["empty"]["vision"] == 4


def test_iemocap_options(iemo_raw, tmp_path):
    raw, feats, labels = iemo_raw
    root = iemocap.convert(raw, tmp_path, audio_norm="file", vision=False, truncate=True,
                           lengths={"text": 3, "audio": 5})
    meta, out = read_shards(root)
    assert list(meta["modalities"]) == ["text", "audio"]
    assert meta["source"]["audio_norm"]["mean"] == [2.0] * 6
    u = labels["trn"][0][4]                           # 7 audio frames, cut to 5
    np.testing.assert_allclose(out["train"]["audio"][4], (feats["audio"][u][:5].astype(np.float32) - 2) / 4,
                               rtol=1e-5, atol=1e-6)
    assert meta["source"]["counts"]["truncated"] == {"text": 0, "audio": 3}      # 6, 7, 8 frames


def test_iemocap_errors(iemo_raw, tmp_path):
    raw, feats, labels = iemo_raw
    with pytest.raises(ValueError, match=r"comparE\.h5: utterance 'Ses01F_impro03_F003' has 6 audio "
                                         r"frames, more than --audio-len 5 \(3 utterance"):
        iemocap.main(["--raw", str(raw), "--out", str(tmp_path / "o1"), "--audio-len", "5"])
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    with h5py.File(bad / "V" / "denseface.h5", "a") as f:
        del f[labels["val"][0][1]]
    with pytest.raises(ValueError, match=r"denseface\.h5: utterance 'Ses02F_impro01_F001' \(the val "
                                         r"split\) has no vision features"):
        iemocap.main(_iemo_args(bad, tmp_path / "o2"))
    (bad / "V" / "denseface.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"denseface\.h5: vision feature file not found; pass --no-vision"):
        iemocap.main(_iemo_args(bad, tmp_path / "o3"))
    lab = np.eye(4, dtype=np.float32)[[0, 1, 2]]
    lab[1, 3] = 1
    np.save(bad / "target" / "1" / "tst_label.npy", lab)
    with pytest.raises(ValueError, match=r"tst_label\.npy: row 1 = \[0\.0, 1\.0, 0\.0, 1\.0\] is not one-hot"):
        iemocap.main(_iemo_args(bad, tmp_path / "o4", "--no-vision"))
    np.save(bad / "target" / "1" / "tst_label.npy", np.eye(4, dtype=np.float32)[[0, 1]])
    with pytest.raises(ValueError, match=r"tst_int2name\.npy: 3 ids, tst_label\.npy has 2 labels"):
        iemocap.main(_iemo_args(bad, tmp_path / "o5", "--no-vision"))
    with pytest.raises(FileNotFoundError, match=r"target/2: target folder of fold --cv 2"):
        iemocap.main(_iemo_args(raw, tmp_path / "o6", "--cv", "2"))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


# --------------------------------------------------------------------------------------- BraTS

SHAPE = (24, 24, 12)
CASES = [f"BraTS2021_{i:05d}" for i in (0, 2, 3, 5, 6)]
TUMOUR = {0: (3, 6), 2: (5, 9), 3: None, 5: (0, 2), 6: (8, 11)}   # tumour slices [a, b) per case


def _volumes(k):
    """-> ({modality: volume}, seg) for case k: a box of 'brain', a tumour in some slices (labels
    1, 2 and 4), and in case 0 one stray tumour voxel in a corner (outside the centre crop)."""
    rng = np.random.default_rng(k)
    brain = np.zeros(SHAPE, bool)
    brain[3:21, 2:22, 1:11] = True
    vols = {m: np.where(brain, rng.uniform(100, 900, SHAPE) * (j + 1), 0).astype(np.float32)
            for j, m in enumerate(brats.MODALITIES)}
    seg = np.zeros(SHAPE, np.uint8)
    if TUMOUR[k] is not None:
        a, b = TUMOUR[k]
        seg[10:14, 9:15, a:b] = 2
        seg[11:13, 10:12, a:b] = 1
        seg[12, 13, a:b] = 4
    if k == 0:
        seg[0, 1, 9] = 2
    return vols, seg


def _write_case(raw, k, skip=()):
    case = f"BraTS2021_{k:05d}"
    d = raw / case
    d.mkdir(parents=True, exist_ok=True)
    vols, seg = _volumes(k)
    for m, v in [*vols.items(), ("seg", seg)]:
        if m not in skip:
            nib.save(nib.Nifti1Image(v, np.eye(4)), d / f"{case}_{m}.nii.gz")


@pytest.fixture(scope="module")
def brats_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("brats_raw")
    for k in TUMOUR:
        _write_case(raw, k)
    (raw / "name_mapping.csv").write_text("a,b\n")          # stray files are ignored
    return raw


def test_brats_end_to_end(brats_raw, tmp_path):
    assert brats.main(["--raw", str(brats_raw), "--out", str(tmp_path), "--crop", "16",
                       "--val-frac", "0.2", "--test-frac", "0.2", "--seed", "1"]) == 0
    root = tmp_path / "brats"
    meta, out = read_shards(root)
    assert meta["task"] == "segmentation" and meta["num_classes"] == 4 and meta["label_shape"] == [16, 16]
    assert list(meta["modalities"]) == ["flair", "t1ce", "t1", "t2"]
    assert all(s == {"kind": "image", "shape": [1, 16, 16], "dtype": "float32"} for s in meta["modalities"].values())
    src = meta["source"]
    cases = src["split"]["cases"]
    assert sorted(sum(cases.values(), [])) == CASES and all(len(cases[s]) == 1 for s in ("val", "test"))
    rows = _csv(root)
    of_case = {}
    for r in rows:                                                     # case-level disjointness
        assert of_case.setdefault(r["case"], r["split"]) == r["split"]
        assert r["case"] in cases[r["split"]]
    # tumour-bearing slices (full slice, before the crop) of every case, in sample_id order
    want = [(f"BraTS2021_{k:05d}", s) for k, t in TUMOUR.items() if t
            for s in sorted(set(range(*t)) | ({9} if k == 0 else set()))]
    assert [(r["case"], int(r["slice"])) for r in rows] == want
    assert [int(r["sample_id"]) for r in rows] == list(range(len(want)))
    assert src["counts"]["cases_without_tumour_slices"] == 1
    assert src["counts"]["slices_empty_after_crop"] == 1 and src["counts"]["tumour_voxels_cropped_away"] == 1
    by_id = {int(r["sample_id"]): r for r in rows}
    stats = {r["case"]: r for r in _csv(root, "cases.csv")}
    n = 0
    for split, d in out.items():
        assert d["label"].dtype == np.uint8 and d["label"].shape[1:] == (16, 16)
        assert set(np.unique(d["label"]).tolist()) <= {0, 1, 2, 3}
        for j, sid in enumerate(d["sample_id"]):
            case, s = by_id[int(sid)]["case"], int(by_id[int(sid)]["slice"])
            vols, seg = _volumes(int(case[-5:]))
            lab = seg[4:20, 4:20, s].astype(np.int64)                  # offset round((24 - 16) / 2)
            lab[lab == 4] = 3
            np.testing.assert_array_equal(d["label"][j], lab)
            for m in brats.MODALITIES:
                v = vols[m].astype(np.float64)
                b = v != 0
                z = np.where(b, (v - v[b].mean()) / v[b].std(), 0)
                np.testing.assert_allclose(d[m][j, 0], z[4:20, 4:20, s], rtol=1e-5, atol=1e-5)
                assert abs(float(stats[case][f"{m}_mean"]) - v[b].mean()) < 1e-3 * v[b].mean()
            n += 1
    assert n == len(want)
    assert 3 in out["train"]["label"] or 3 in out["val"]["label"] or 3 in out["test"]["label"]
    # the same split again from 2 reading processes
    again = brats.convert(brats_raw, tmp_path, name="again", crop=16, val_frac=0.2, test_frac=0.2,
                          seed=1, workers=2)
    _, out2 = read_shards(again)
    for split in out:
        for key in out[split]:
            assert np.array_equal(out[split][key], out2[split][key]), (split, key)


def test_brats_errors(brats_raw, tmp_path):
    bad = tmp_path / "raw"
    shutil.copytree(brats_raw, bad)
    conv = lambda out, **kw: brats.convert(bad, tmp_path / out, crop=16, val_frac=0.2, test_frac=0.2, **kw)
    (bad / CASES[2] / f"{CASES[2]}_t2.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 case\(s\) with missing files: BraTS2021_00003: .*"
                                                r"BraTS2021_00003_t2\.nii\.gz; pass --skip-incomplete"):
        conv("o1")
    root = conv("ok", skip_incomplete=True)
    meta = validate(root)
    assert meta["source"]["counts"]["incomplete_cases_skipped"] == 1
    seg = _volumes(5)[1]
    seg[1, 1, 1] = 3
    nib.save(nib.Nifti1Image(seg, np.eye(4)), bad / CASES[3] / f"{CASES[3]}_seg.nii.gz")
    with pytest.raises(ValueError, match=r"BraTS2021_00005_seg\.nii\.gz: label values \[3\] are not BraTS labels"):
        conv("o2", skip_incomplete=True)
    nib.save(nib.Nifti1Image(np.zeros((24, 24, 11), np.float32), np.eye(4)),
             bad / CASES[3] / f"{CASES[3]}_seg.nii.gz")
    with pytest.raises(ValueError, match=r"BraTS2021_00005_flair\.nii\.gz: shape \(24, 24, 12\) differs"):
        conv("o3", skip_incomplete=True)
    with pytest.raises(ValueError, match=r"smaller than --crop 30"):
        brats.convert(brats_raw, tmp_path / "o4", crop=30)
    with pytest.raises(ValueError, match=r"5 case\(s\) leave no train case"):
        brats.convert(brats_raw, tmp_path / "o5", val_frac=0.5, test_frac=0.5)
    assert not any((tmp_path / f"o{i}" / "brats").exists() for i in range(1, 6))
