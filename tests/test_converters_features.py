"""Feature extractors (BERT, ResNet, ViT from local weights) and the IGM converters (Twitter2015,
Sarcasm, NVGesture) end to end on small files in the raw formats, with tiny random models saved
in the real on-disk layouts."""
import json
import shutil

import av
import numpy as np
import pytest
import torch
from PIL import Image

from data_prep import features, nvgesture, sarcasm, twitter2015
from data_prep.image_io import load_image
from data_prep.shards import validate
from models.encoders import resnet50
from tests.conftest import read_samples, read_shards

torch.set_num_threads(1)   # 2 threads on a shared 2-core machine were 50x slower (OpenMP spin)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a an is to of and in on at for my this that it was so not very what day night love hate "
    "happy sad great bad good best worst game team win lose music show new old people time http "
    "t co rt sun rain dog cat obama apple when you me we they oh yeah lol wow").split() + [
    "##s", "##ing", "##ed", "##ly", "##er"]




def _pattern_image(path, seed, size=(41, 29), fmt="JPEG"):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(base).resize(size, Image.Resampling.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


# ------------------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny random BERT / ResNet-50 / ViT saved exactly as the real ones are laid out on disk."""
    from transformers import BertConfig, BertModel, BertTokenizer, ViTConfig, ViTModel
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    bert = root / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    BertTokenizer(str(bert / "vocab.txt"), do_lower_case=True).save_pretrained(bert)
    BertModel(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64)).save_pretrained(bert)

    net = resnet50(base_width=4)
    with torch.no_grad():   # random BN statistics so that eval mode really uses them
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    sd = net.state_dict()
    sd["fc.weight"] = torch.randn(10, net.out_dim)    # torchvision files carry the classifier
    sd["fc.bias"] = torch.zeros(10)
    resnet = root / "resnet50_w4.pth"
    torch.save(sd, resnet)

    vit = root / "vit"
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64),
             add_pooling_layer=False).save_pretrained(vit)
    (vit / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.25, 0.3], "size": {"height": 32, "width": 32}}))
    return {"bert": bert, "resnet": resnet, "vit": vit, "net": net.eval()}


def _feature_args(w):
    return ["--bert", str(w["bert"]), "--resnet", str(w["resnet"]), "--resnet-width", "4",
            "--batch-size", "4", "--block", "5"]


def test_bert_cls_and_tokens(weights):
    from transformers import AutoModel, AutoTokenizer
    bert = features.BertExtractor(weights["bert"], batch_size=2)
    assert bert.hidden == 32 and bert.max_length == 64 and bert.describe()["lowercases"]
    texts = ["The cat is happy", "obama", "", "what a great day for my team " * 3, ["sad", "dog"]]
    cls = bert.cls(texts)
    assert cls.shape == (5, 32) and cls.dtype == np.float32
    tok = AutoTokenizer.from_pretrained(weights["bert"], local_files_only=True)
    model = AutoModel.from_pretrained(weights["bert"], local_files_only=True).eval()
    for i, t in enumerate(["The cat is happy", "obama", "", "what a great day for my team " * 3, "sad dog"]):
        with torch.no_grad():   # one text alone, no padding at all
            h = model(**tok([t], return_tensors="pt")).last_hidden_state[0]
        np.testing.assert_allclose(cls[i], h[0].numpy(), atol=1e-5)
    feats, mask = bert.tokens(texts, 8)
    assert feats.shape == (5, 8, 32) and mask.shape == (5, 8) and mask.dtype == bool
    assert mask.sum(1).tolist() == [6, 3, 2, 8, 4]          # [CLS] words [SEP], truncated at 8
    assert (feats[~mask] == 0).all() and (np.abs(feats[mask]).sum(-1) > 0).all()
    with torch.no_grad():
        h = model(**tok(["The cat is happy"], return_tensors="pt")).last_hidden_state[0]
    np.testing.assert_allclose(feats[0, :6], h.numpy(), atol=1e-5)
    np.testing.assert_allclose(feats[1, 0], cls[1], atol=1e-5)


def test_resnet_and_vit_extractors(weights, tmp_path):
    res = features.ResNetExtractor(weights["resnet"], base_width=4, batch_size=3)
    assert res.out_dim == 128 and res.describe()["normalize"] == "imagenet"
    imgs = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    out = res(imgs)
    x = torch.from_numpy(imgs).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = weights["net"](x).numpy()
    assert out.shape == (4, 128) and out.dtype == np.float32
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="resnet50_w4.pth"):      # strict: another width fails
        features.ResNetExtractor(weights["resnet"], base_width=8)

    from transformers import ViTModel
    vit = features.ViTExtractor(weights["vit"], batch_size=3)
    assert (vit.image_size, vit.num_tokens, vit.hidden) == (32, 5, 32)
    assert vit.describe()["normalization_from"] == "preprocessor_config.json"
    imgs = np.random.default_rng(1).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    out = vit(imgs)
    model = ViTModel.from_pretrained(weights["vit"], local_files_only=True, add_pooling_layer=False).eval()
    x = torch.from_numpy(imgs).float() / 255
    x = (x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(pixel_values=x).last_hidden_state.numpy()
    assert out.shape == (4, 5, 32)
    np.testing.assert_allclose(out, want, atol=1e-5)
    with pytest.raises(ValueError, match="32x32"):
        vit(np.zeros((1, 3, 16, 16), np.uint8))


def test_missing_weights_named(weights, tmp_path):
    with pytest.raises(features.WeightsError, match=r"--bert .*nope: not a directory"):
        features.BertExtractor(tmp_path / "nope")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(weights["bert"] / "config.json", partial)
    with pytest.raises(features.WeightsError, match="partial: no weights file"):
        features.BertExtractor(partial)
    shutil.copy(weights["bert"] / "model.safetensors", partial)
    with pytest.raises(features.WeightsError, match="partial: no tokenizer files"):
        features.BertExtractor(partial)
    with pytest.raises(features.WeightsError, match=r"--resnet .*missing\.pth: weights file not found"):
        features.ResNetExtractor(tmp_path / "missing.pth")
    with pytest.raises(features.WeightsError, match=r"--vit .*vitx"):
        features.ViTExtractor(tmp_path / "vitx")
    with pytest.raises(ValueError, match="--device"):
        features.resolve_device("tpu")


# ----------------------------------------------------------------------------------- Twitter2015

TW_HEADER = "index\t#1 Label\t#2 ImageID\t#3 String\t#3 String"
TWEETS = [
    ("RT @user : $T$ is so happy today ! http://t.co/x1", "Obama"),
    ("\"I love this game\" says $T$ #win", "the team"),
    ("$T$ 2015 : worst day ever :( 100 % sad", "Apple"),
    ("what a great show by $T$ tonight", "the Sun"),
    ("$T$ " + " ".join(["very"] * 60) + " good", "dog"),          # > 50 words
    ("no target here , just 'quotes' & numbers 42", "cat"),
]


def _write_tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def twitter_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("twitter_raw")
    truth, k = {}, 0
    for split, n in (("train", 6), ("dev", 3), ("test", 3)):
        rows = []
        for j in range(n):
            tweet, target = TWEETS[k % len(TWEETS)]
            image = f"{1000 + k}.jpg"
            label = k % 3
            rows.append([k, label, image, tweet, target])
            _pattern_image(raw / "twitter2015_images" / image, k, size=(41 + k, 29 + 2 * k))
            words = "".join(ch if ch.isascii() and ch.isalpha() else " "
                            for ch in tweet.replace("$T$", target)).split()[:50]
            truth[(split, j)] = (label, image, " ".join(words))
            k += 1
        _write_tsv(raw / "annotations" / f"{split}.tsv", TW_HEADER, rows)
    return raw, truth


def test_clean_text():
    assert twitter2015.clean_text("RT @Obama: I'm #happy!! http://t.co/x 2day") == "RT Obama I m happy http t co x day"
    assert twitter2015.clean_text(" ".join(["w"] * 70)) == " ".join(["w"] * 50)
    assert twitter2015.clean_text("a b c", max_words=2) == "a b"
    assert twitter2015.clean_text("123 :)") == ""


def test_twitter2015_end_to_end(twitter_raw, weights, tmp_path):
    raw, truth = twitter_raw
    assert twitter2015.main(["--raw", str(raw), "--out", str(tmp_path), *_feature_args(weights)]) == 0
    root = tmp_path / "twitter2015"
    meta, data = read_shards(root)
    assert meta["num_classes"] == 3 and meta["class_names"] == ["negative", "neutral", "positive"]
    assert list(meta["modalities"]) == ["text", "image"]
    assert meta["modalities"]["text"] == {"kind": "features", "shape": [32], "dtype": "float32"}
    assert meta["modalities"]["image"] == {"kind": "features", "shape": [128], "dtype": "float32"}
    assert {s: len(d["label"]) for s, d in data.items()} == {"train": 6, "val": 3, "test": 3}
    src = meta["source"]
    assert src["text"]["model"]["path"] == str(weights["bert"].resolve())
    assert src["image"]["model"]["path"] == str(weights["resnet"].resolve())
    assert src["image"]["model"]["arch"] == "resnet50" and src["options"]["max_words"] == 50
    index = read_samples(root)
    bert = features.BertExtractor(weights["bert"])
    res = features.ResNetExtractor(weights["resnet"], base_width=4)
    split_file = {"train": "train", "val": "dev", "test": "test"}
    for split, d in data.items():
        texts, images = [], []
        for j, (sid, lab) in enumerate(zip(d["sample_id"], d["label"])):
            row = index[int(sid)]
            label, image, text = truth[(split_file[split], j)]
            assert (row["split"], row["ImageID"], row["text"], int(lab)) == (split, image, text, label)
            texts.append(text)
            images.append(load_image(raw / "twitter2015_images" / image, 224, crop="center"))
        np.testing.assert_allclose(d["text"], bert.cls(texts), atol=1e-5)
        np.testing.assert_allclose(d["image"], res(np.stack(images)), rtol=1e-4, atol=1e-5)
    assert len(index[4]["text"].split()) == 50 and index[0]["text"].startswith("RT user Obama is")
    assert sorted(np.concatenate([d["sample_id"] for d in data.values()]).tolist()) == list(range(12))
    assert not np.allclose(data["train"]["image"][0], data["train"]["image"][1])


def test_twitter2015_errors(twitter_raw, weights, tmp_path):
    raw, _ = twitter_raw
    bad = tmp_path / "raw"
    shutil.copytree(raw / "annotations", bad / "annotations")
    (bad / "twitter2015_images").symlink_to(raw / "twitter2015_images")
    args = lambda out: ["--raw", str(bad), "--out", str(tmp_path / out), *_feature_args(weights)]
    dev = bad / "annotations" / "dev.tsv"
    lines = dev.read_text().splitlines()
    dev.write_text("\n".join([lines[0].replace("#1 Label", "#1 Polarity")] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"dev\.tsv: missing column 'Label'"):
        twitter2015.main(args("o1"))
    f = lines[2].split("\t")
    f[1] = "3"
    dev.write_text("\n".join([lines[0], lines[1], "\t".join(f)] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=r"dev\.tsv, line 3: column 'Label' = '3'"):
        twitter2015.main(args("o2"))
    dev.write_text("\n".join(lines[:2] + ["\t".join(f[:3])]) + "\n")
    with pytest.raises(ValueError, match=r"dev\.tsv, line 3: 3 tab-separated fields"):
        twitter2015.main(args("o3"))
    f[1], f[2] = "1", "gone.jpg"
    dev.write_text("\n".join([lines[0], lines[1], "\t".join(f)] + lines[3:]) + "\n")
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        twitter2015.main(args("o4"))
    with pytest.raises(FileNotFoundError, match="--bert .*nobert"):
        twitter2015.main(["--raw", str(bad), "--out", str(tmp_path / "o5"), "--bert", str(tmp_path / "nobert"),
                          "--resnet", str(weights["resnet"])])
    with pytest.raises(ValueError, match="--device tpu"):
        twitter2015.main(args("o6") + ["--device", "tpu"])
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5", "o6"))
    # --skip-missing-images drops the row and counts it
    root = twitter2015.convert(bad, tmp_path / "o7", weights["bert"], weights["resnet"], resnet_width=4,
                               skip_missing_images=True, image_size=32)
    meta = validate(root)
    assert meta["splits"]["val"]["num_samples"] == 2
    assert meta["source"]["counts"]["missing_images_skipped"] == {"train": 0, "val": 1, "test": 0}


def test_twitter2015_no_half_written_output(twitter_raw, weights, tmp_path):
    """A corrupt image found while writing the test split leaves no dataset behind."""
    raw, truth = twitter_raw
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    (bad / "twitter2015_images" / truth[("test", 1)][1]).write_bytes(b"not a jpeg" * 10)
    with pytest.raises(ValueError, match=truth[("test", 1)][1]):
        twitter2015.convert(bad, tmp_path / "out", weights["bert"], weights["resnet"], resnet_width=4,
                            image_size=32, block=2)
    assert not (tmp_path / "out" / "twitter2015").exists()


# -------------------------------------------------------------------------------------- Sarcasm


@pytest.fixture(scope="module")
def sarcasm_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("sarcasm_raw")
    truth, k = {}, 0
    texts = ["oh great , another monday <user> # love", "the new team is the best",
             "yeah i love rain", "  what   a   day  ", "wow so happy lol", "my dog is great"]
    for split, fname, n in (("train", "train.json", 5), ("val", "valid.json", 3), ("test", "test.json", 2)):
        items = []
        for j in range(n):
            label = [0, 1, "1", True, 0][k % 5]
            image = f"{900000 + k}.jpg"
            items.append({"image": f"dataset_image/sub\\{image}" if k % 2 else f"/abs/dataset_image/{image}",
                          "text": texts[k % len(texts)], "label": label})
            _pattern_image(raw / "images" / image, 100 + k, size=(50, 35 + k))
            truth[(split, j)] = (int(label), image, " ".join(texts[k % len(texts)].split()))
            k += 1
        (raw / fname).write_text(json.dumps(items), encoding="utf-8")
    return raw, truth


def test_sarcasm_end_to_end(sarcasm_raw, weights, tmp_path):
    raw, truth = sarcasm_raw
    assert sarcasm.main(["--raw", str(raw), "--out", str(tmp_path), *_feature_args(weights),
                         "--crop", "none", "--image-size", "64", "--max-tokens", "12"]) == 0
    root = tmp_path / "sarcasm"
    meta, data = read_shards(root)
    assert meta["num_classes"] == 2 and list(meta["modalities"]) == ["text", "image"]
    assert {s: len(d["label"]) for s, d in data.items()} == {"train": 5, "val": 3, "test": 2}
    assert meta["source"]["options"]["max_tokens"] == 12 and meta["source"]["options"]["crop"] == "none"
    index = read_samples(root)
    bert = features.BertExtractor(weights["bert"], max_length=12)
    res = features.ResNetExtractor(weights["resnet"], base_width=4)
    for split, d in data.items():
        texts, images = [], []
        for j, (sid, lab) in enumerate(zip(d["sample_id"], d["label"])):
            label, image, text = truth[(split, j)]
            assert int(lab) == label and index[int(sid)]["image"] == image
            texts.append(text)
            images.append(load_image(raw / "images" / image, 64))
        np.testing.assert_allclose(d["text"], bert.cls(texts), atol=1e-5)
        np.testing.assert_allclose(d["image"], res(np.stack(images)), rtol=1e-4, atol=1e-5)


def test_sarcasm_errors(sarcasm_raw, weights, tmp_path):
    raw, truth = sarcasm_raw
    items = json.loads((raw / "valid.json").read_text())
    bad = tmp_path / "valid.json"
    conv = lambda out, **kw: sarcasm.convert(raw, tmp_path / out, weights["bert"], weights["resnet"],
                                             resnet_width=4, split_files={"val": bad}, image_size=32, **kw)
    broken = [dict(it) for it in items]
    del broken[2]["label"]
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"valid\.json, item 2: missing key 'label'"):
        conv("o1")
    broken[2]["label"] = 2
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"valid\.json, item 2: key 'label' = 2"):
        conv("o2")
    bad.write_text(json.dumps({"data": items}))
    with pytest.raises(ValueError, match=r"valid\.json: expected a JSON list"):
        conv("o3")
    broken = [dict(it) for it in items]
    broken[1]["image"] = "x/missing_one.jpg"
    bad.write_text(json.dumps(broken))
    with pytest.raises(FileNotFoundError, match="missing_one.jpg"):
        conv("o4")
    with pytest.raises(FileNotFoundError, match=r"--resnet .*nothere\.pth"):
        sarcasm.convert(raw, tmp_path / "o5", weights["bert"], tmp_path / "nothere.pth")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4", "o5"))
    root = conv("o6", skip_missing_images=True)
    assert validate(root)["splits"]["val"]["num_samples"] == 2


# ------------------------------------------------------------------------------------ NVGesture

VW, VH, VN = 32, 24, 90          # video width, height, frames


def _rgb(k, f):
    return (10 + 2 * f, 220 - 2 * f, 20 + 25 * k)


def _grey(k, f):
    return 10 + 2 * f + k


def _write_video(path, frames):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mjpeg", rate=30)
        s.width, s.height, s.pix_fmt = VW, VH, "yuvj420p"
        for a in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


# (label 1-25, depth start, color start, flow kind): flow kinds exercise every accepted layout
NV_TRAIN = [(4, 0, 0, "thwc"), (4, 10, 12, "tchw"), (4, 20, 20, "thw_u8"), (4, 30, 31, "short"),
            (9, 5, 5, "thwc"), (9, 87, 87, "thwc"), (9, 40, 40, "tchw"), (9, 50, 50, "thw_u8")]
NV_TEST = [(4, 3, 3, "thwc"), (9, 60, 60, "tchw")]
T, S = 6, 16


def _flow(kind, k):
    """-> (array saved, expected stored of (T, 1, S, S) uint8)."""
    vals = np.array([-25.0, -20.0, -3.3, 0.4, 7.7, 19.0, 30.0])[:T] + k % 3
    if kind in ("thwc", "tchw", "short"):
        n = 4 if kind == "short" else T + 3
        arr = np.zeros((n, 12, 10, 2), np.float32)
        arr[..., 0] = np.resize(vals, n)[:, None, None]
        arr[..., 1] = 99.0                                     # the other channel is not stored
        want = np.round((np.clip(np.resize(vals, n)[:T], -20, 20) + 20) * 255 / 40).astype(np.uint8)
        if kind == "short":
            want = np.concatenate([want[:4], np.repeat(want[3:4], T - 4)])
        want = np.broadcast_to(want[:, None, None, None], (T, 1, S, S))
        return (arr.transpose(0, 3, 1, 2) if kind == "tchw" else arr), want
    arr = np.random.default_rng(k).integers(0, 256, (T + 1, 20, 28), dtype=np.uint8)
    want = np.stack([np.asarray(Image.fromarray(a).resize((S, S), Image.Resampling.BILINEAR))
                     for a in arr[:T]])[:, None]
    return arr, want


@pytest.fixture(scope="module")
def nv_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("nv_raw")
    truth, k = {}, 0
    for split, spec in (("train", NV_TRAIN), ("test", NV_TEST)):
        lines = []
        for i, (label, ds, cs, kind) in enumerate(spec):
            rel = f"Video_data/class_{label:02d}/subject{k}_r0"
            _write_video(raw / rel / "sk_color.avi", [np.full((VH, VW, 3), _rgb(k, f), np.uint8) for f in range(VN)])
            _write_video(raw / rel / "sk_depth.avi", [np.full((VH, VW, 3), _grey(k, f), np.uint8) for f in range(VN)])
            arr, want = _flow(kind, k)
            (raw / "flow_data" / split).mkdir(parents=True, exist_ok=True)
            np.save(raw / "flow_data" / split / f"{i}.npy", arr)
            lines.append(f"path:./{rel} depth:sk_depth:{ds}:{ds + 80} color:sk_color:{cs}:{cs + 80} "
                         f"duo_left:duo_left:{ds + 3}:{ds + 83} label:{label}")
            truth[(split, i)] = {"k": k, "label": label - 1, "ds": ds, "cs": cs, "flow": want}
            k += 1
        text = "\n".join(lines[:3] + [""] + lines[3:]) + "\n"     # a blank line is skipped
        (raw / f"nvgesture_{split}_correct_v2.lst").write_text(text)
    return raw, truth


def _check_clip(d_depth, d_rgb, d_of, t):
    k = t["k"]
    for j in range(T):
        f = min(t["ds"] + j, VN - 1)                         # past the end: the last frame repeated
        assert np.abs(d_depth[j].astype(int) - _grey(k, f)).max() <= 3, (k, j)
        f = min(t["cs"] + j, VN - 1)
        assert np.abs(d_rgb[j].reshape(3, -1).astype(int) - np.array(_rgb(k, f))[:, None]).max() <= 4, (k, j)
    assert np.array_equal(d_of, t["flow"]), k


def test_nvgesture_end_to_end(nv_raw, tmp_path):
    raw, truth = nv_raw
    assert nvgesture.main(["--raw", str(raw), "--out", str(tmp_path), "--frames", str(T), "--size", str(S),
                           "--val-frac", "0.25", "--block", "3"]) == 0
    root = tmp_path / "nvgesture"
    meta, data = read_shards(root)
    assert list(meta["modalities"]) == ["depth", "rgb", "of"] and meta["num_classes"] == 25
    assert meta["modalities"]["depth"] == {"kind": "frames", "shape": [T, 1, S, S], "dtype": "uint8"}
    assert meta["modalities"]["rgb"] == {"kind": "frames", "shape": [T, 3, S, S], "dtype": "uint8"}
    assert meta["modalities"]["of"] == {"kind": "frames", "shape": [T, 1, S, S], "dtype": "uint8"}
    assert {s: len(d["label"]) for s, d in data.items()} == {"train": 6, "val": 2, "test": 2}
    assert sorted(data["val"]["label"].tolist()) == [3, 8]                     # stratified
    assert set(data["train"]["sample_id"]).isdisjoint(data["val"]["sample_id"])
    assert sorted(np.concatenate([data["train"]["sample_id"], data["val"]["sample_id"]]).tolist()) == list(range(8))
    assert data["test"]["sample_id"].tolist() == [8, 9]
    src = meta["source"]
    assert src["split"]["seed"] == 2022 and src["split"]["val_frac"] == 0.25
    assert src["counts"]["padded"]["depth"] == {"clips": 1, "frames": 3}      # start 87 of 90
    assert src["counts"]["padded"]["rgb"] == {"clips": 1, "frames": 3}
    assert src["counts"]["padded"]["of"] == {"clips": 1, "frames": 2}         # 4-frame flow
    index = read_samples(root)
    for split, d in data.items():
        for j, sid in enumerate(d["sample_id"]):
            row = index[int(sid)]
            t = truth[(row["list"], int(row["index"]))]
            assert d["label"][j] == t["label"] == int(row["label"])
            assert row["path"].startswith("Video_data/") and row["split"] == split
            _check_clip(d["depth"][j], d["rgb"][j], d["of"][j], t)
    # 2 decoding processes write the same dataset
    again = nvgesture.convert(raw, tmp_path, name="again", frames=T, size=S, val_frac=0.25, workers=2)
    _, data2 = read_shards(again)
    for split in data:
        for key in data[split]:
            assert np.array_equal(data[split][key], data2[split][key]), (split, key)


def test_nvgesture_flow_float16_and_channel(nv_raw, tmp_path):
    raw, truth = nv_raw
    root = nvgesture.convert(raw, tmp_path, frames=T, size=S, flow_dtype="float16", flow_channel=1,
                             val_frac=0)
    meta, data = read_shards(root)
    assert set(data) == {"train", "test"} and meta["modalities"]["of"]["dtype"] == "float16"
    for of in data["test"]["of"]:
        assert (of == 99.0).all()                                               # channel 1, raw values
    with pytest.raises(ValueError, match=r"0\.npy: --flow-channel 2 but the array has 2 channels"):
        nvgesture.convert(raw, tmp_path / "o", frames=T, size=S, flow_channel=2, val_frac=0)
    assert not (tmp_path / "o" / "nvgesture").exists()


def test_nvgesture_errors(nv_raw, tmp_path):
    raw, truth = nv_raw
    lst = raw / "nvgesture_train_correct_v2.lst"
    lines = lst.read_text().splitlines()
    bad = tmp_path / "bad.lst"
    conv = lambda out, **kw: nvgesture.convert(raw, tmp_path / out, train_list=bad, frames=T, size=S, **kw)
    bad.write_text("\n".join(lines[:2] + [lines[2].replace(" label:4", "")] + lines[3:]))
    with pytest.raises(ValueError, match=r"bad\.lst, line 3: missing field 'label'"):
        conv("o1")
    bad.write_text("\n".join(lines[:1] + [lines[1].replace("label:4", "label:26")] + lines[2:]))
    with pytest.raises(ValueError, match=r"bad\.lst, line 2: field 'label' = 26 is outside 1\.\.25"):
        conv("o2")
    bad.write_text("\n".join([lines[0].replace("depth:sk_depth:0:80", "depth:sk_depth:x:80")] + lines[1:]))
    with pytest.raises(ValueError, match=r"bad\.lst, line 1: field 'depth'"):
        conv("o3")
    bad.write_text("\n".join([lines[0].replace("sk_color:0", "sk_colour:0")] + lines[1:]))
    with pytest.raises(FileNotFoundError, match=r"bad\.lst, line 1: 1 video file\(s\) not found: .*sk_colour\.avi"):
        conv("o4")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))


def test_nvgesture_corrupt_video_leaves_nothing(nv_raw, tmp_path):
    raw, truth = nv_raw
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    test_lst = (bad / "nvgesture_test_correct_v2.lst").read_text().split()
    rel = next(t for t in test_lst if t.startswith("path:"))[len("path:./"):]
    (bad / rel / "sk_depth.avi").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(ValueError, match=r"sk_depth\.avi: cannot decode video"):
        nvgesture.convert(bad, tmp_path / "out", frames=T, size=S, block=2)
    assert not (tmp_path / "out" / "nvgesture").exists()
    np.save(bad / "flow_data" / "test" / "0.npy", np.zeros((T, 2, 8, 3), np.float32))   # ambiguous
    with pytest.raises(ValueError, match=r"0\.npy: flow array of shape \(6, 2, 8, 3\): cannot tell"):
        nvgesture.read_flow(bad / "flow_data" / "test" / "0.npy", T, S)
