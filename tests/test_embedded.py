"""Embedded benchmark: determinism, contract, Bayes numbers, and the designed (im)balance:
the strong modality is nearly linearly decodable, the weak image is not."""
import time

import numpy as np
import pytest
import torch

from data_prep import embedded
from data_prep.shards import ShardDataset, load_meta, validate

SMALL = {"n_train": 300, "n_val": 100, "n_test": 120}
EXPECTED_LAYOUT = {
    "imgtab": {"image": ("image", [3, 32, 32], "uint8"), "table": ("tabular", [10], "float32")},
    "av": {"audio": ("spectrogram", [64, 48], "float32"), "video": ("frames", [2, 3, 32, 32], "uint8")},
    "seq3": {"text": ("sequence", [16, 32], "float32"), "audio": ("sequence", [20, 16], "float32"),
             "vision": ("sequence", [12, 24], "float32")},
}


def _read_all(root):
    meta = load_meta(root)
    out = {}
    for split in meta["splits"]:
        ds = ShardDataset(root, split, meta=meta)
        out[split] = {k: v.numpy() for k, v in ds[np.arange(len(ds))].items()}
    return meta, out


@pytest.fixture(scope="module")
def imgtab(tmp_path_factory):
    """The imgtab flavour at default sizes."""
    t0 = time.perf_counter()
    root = embedded.generate(tmp_path_factory.mktemp("emb"), "imgtab")
    print(f"\nimgtab generated in {time.perf_counter() - t0:.2f}s")
    meta, data = _read_all(root)
    return root, meta, data


@pytest.mark.parametrize("flavour", embedded.FLAVOURS)
def test_deterministic_and_valid(tmp_path, flavour):
    t0 = time.perf_counter()
    a = embedded.generate(tmp_path / "a", flavour, seed=3, **SMALL)
    print(f"\n{flavour} (small) generated in {time.perf_counter() - t0:.2f}s")
    b = embedded.generate(tmp_path / "b", flavour, seed=3, **SMALL)
    c = embedded.generate(tmp_path / "c", flavour, seed=4, **SMALL)
    meta = validate(a)
    assert a.name == f"embedded_{flavour}"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():   # bit-identical files, meta.json included
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    meta_c, data_c = _read_all(c)
    _, data_a = _read_all(a)
    for name in meta["modalities"]:
        assert not np.array_equal(data_a["train"][name], data_c["train"][name]), name

    assert meta["task"] == "classification" and meta["num_classes"] == 8
    got = {n: (s["kind"], s["shape"], s["dtype"]) for n, s in meta["modalities"].items()}
    assert got == EXPECTED_LAYOUT[flavour]
    assert list(meta["modalities"]) == list(EXPECTED_LAYOUT[flavour])
    assert {s: meta["splits"][s]["num_samples"] for s in meta["splits"]} == {
        "train": 300, "val": 100, "test": 120}
    ids = np.concatenate([d["sample_id"] for d in data_a.values()])
    assert len(np.unique(ids)) == len(ids)
    labels = data_a["train"]["label"]
    assert labels.min() >= 0 and labels.max() < 8 and len(np.unique(labels)) == 8


def test_split_sizes_do_not_change_other_splits(tmp_path):
    a = embedded.generate(tmp_path / "a", "seq3", **SMALL)
    b = embedded.generate(tmp_path / "b", "seq3", n_train=200, n_val=100, n_test=120)
    _, da = _read_all(a)
    _, db = _read_all(b)
    np.testing.assert_array_equal(da["val"]["text"], db["val"]["text"])
    np.testing.assert_array_equal(da["train"]["text"][:200], db["train"]["text"])


@pytest.mark.parametrize("flavour", embedded.FLAVOURS)
def test_bayes_numbers_recorded_and_ordered(flavour):
    acc, err = embedded.bayes_accuracy(flavour, seed=0)
    strong = [m[0] for m in embedded.LAYOUT[flavour] if m[4] == "strong"]
    weak = [m[0] for m in embedded.LAYOUT[flavour] if m[4] == "weak"]
    assert len(strong) == 1 and weak
    s = strong[0]
    print(f"\n{flavour}: " + ", ".join(f"{k} {v:.3f}±{err[k]:.4f}" for k, v in acc.items()))
    assert set(acc) == set(err) == {*strong, *weak, "all"}
    assert 0.90 <= acc[s] <= 0.98
    for w in weak:
        assert 0.53 <= acc[w] <= 0.72 and acc[s] > acc[w] + 0.2
    assert acc["all"] >= acc[s] and 0.96 <= acc["all"] <= 0.995
    assert all(e < 0.002 for e in err.values())


def test_meta_source(imgtab):
    root, meta, data = imgtab
    src = meta["source"]
    assert src["generator"] == "data_prep.embedded" and src["flavour"] == "imgtab" and src["seed"] == 0
    assert src["sizes"] == {"train": 8000, "val": 2000, "test": 2000}
    assert src["mc_samples"] >= 200_000
    assert src["strong_modality"] == "table" and src["weak_modalities"] == ["image"]
    assert set(src["bayes_accuracy"]) == {"image", "table", "all"} == set(src["bayes_stderr"])
    assert src["bayes_accuracy"] == embedded.bayes_accuracy("imgtab", 0)[0]
    assert src["sigmas"] == {"image": embedded.DEFAULTS["imgtab"]["sigma_image"],
                             "table": embedded.DEFAULTS["imgtab"]["sigma_table"]}
    table = meta["modalities"]["table"]
    assert len(table["continuous"]) == 8 and table["categorical"] == {"colour": 5, "body": 4}
    codes = data["train"]["table"][:, 8:]
    assert np.array_equal(codes, np.round(codes)) and codes.min() == 0
    assert codes[:, 0].max() == 4 and codes[:, 1].max() == 3


def test_overrides(tmp_path):
    base = embedded.bayes_accuracy("seq3", 0)[0]
    noisier = embedded.bayes_accuracy("seq3", 0, sigma_vision=0.9)[0]
    assert noisier["vision"] < base["vision"] - 0.1 and noisier["text"] == base["text"]
    with pytest.raises(ValueError, match="sigma_image"):
        embedded.generate(tmp_path, "seq3", sigma_image=0.5)
    root = embedded.generate(tmp_path, "seq3", sigma_vision=0.9, **SMALL)
    assert load_meta(root)["source"]["sigmas"]["vision"] == 0.9
    with pytest.raises(FileExistsError):
        embedded.generate(tmp_path, "seq3", **SMALL)
    embedded.generate(tmp_path, "seq3", overwrite=True, **SMALL)


def _logistic_accuracy(train_x, train_y, test_x, test_y, weight_decay=1e-3):
    """Multinomial logistic regression, full-batch L-BFGS on standardised features."""
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    xtr = torch.tensor((train_x - mean) / std, dtype=torch.float32)
    xte = torch.tensor((test_x - mean) / std, dtype=torch.float32)
    ytr = torch.tensor(train_y)
    model = torch.nn.Linear(xtr.shape[1], 8)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=150, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xtr), ytr) + weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (model(xte).argmax(1).numpy() == test_y).mean()


def _table_features(table, meta):
    n_cont = len(meta["modalities"]["table"]["continuous"])
    cards = list(meta["modalities"]["table"]["categorical"].values())
    one_hot = [np.eye(c)[table[:, n_cont + j].astype(int)] for j, c in enumerate(cards)]
    return table[:, :n_cont].astype(np.float64), np.concatenate(one_hot, 1)


def test_strong_modality_is_nearly_linearly_decodable(imgtab):
    root, meta, data = imgtab
    tr_cont, tr_oh = _table_features(data["train"]["table"], meta)
    te_cont, te_oh = _table_features(data["test"]["table"], meta)
    mean, std = tr_cont.mean(0), tr_cont.std(0)
    xtr = np.concatenate([(tr_cont - mean) / std, tr_oh], 1)
    xte = np.concatenate([(te_cont - mean) / std, te_oh], 1)
    acc = _logistic_accuracy(xtr, data["train"]["label"], xte, data["test"]["label"])
    bayes = meta["source"]["bayes_accuracy"]["table"]
    print(f"\ntable: logistic {acc:.3f}, Bayes {bayes:.3f}")
    assert acc >= bayes - 0.04


@pytest.mark.slow
def test_weak_image_is_not_linearly_decodable(imgtab):
    root, meta, data = imgtab
    flat = {s: data[s]["image"].reshape(len(data[s]["image"]), -1).astype(np.float32) / 255 for s in ("train", "test")}
    acc = _logistic_accuracy(flat["train"], data["train"]["label"], flat["test"], data["test"]["label"])
    bayes = meta["source"]["bayes_accuracy"]
    print(f"\nimage: logistic {acc:.3f}, Bayes image {bayes['image']:.3f}, table {bayes['table']:.3f}")
    assert acc < bayes["table"] - 0.2
    assert acc < bayes["image"] - 0.08   # the random shift defeats a linear read-out of pixels
    assert acc > 1 / 8 + 0.05            # ... but the image is not noise


def test_cli(tmp_path, capsys):
    assert embedded.main(["--flavour", "av", "--out", str(tmp_path), "--n-train", "64", "--n-val", "32",
                          "--n-test", "32", "--set", "sigma_video=0.7"]) == 0
    out = capsys.readouterr().out
    assert "embedded_av" in out and "video" in out and "all" in out
    assert load_meta(tmp_path / "embedded_av")["source"]["sigmas"]["video"] == 0.7


def test_sequence_time_shift_knob(tmp_path):
    """shift_<m> rolls each weak sequence in time by a label-independent offset: same latent (the
    Bayes limits do not move), different observation; 0 (the default) leaves the data as it was."""
    plain = embedded.generate(tmp_path / "plain", "seq3", **SMALL)
    shifted = embedded.generate(tmp_path / "shifted", "seq3", shift_audio=5, **SMALL)
    read = lambda root: ShardDataset(root, "train")[list(range(16))]  # noqa: E731
    a, b = read(plain), read(shifted)
    assert torch.equal(a["text"], b["text"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["audio"], b["audio"])
    # every shifted sample is a circular time roll of the unshifted one
    for x, y in zip(a["audio"], b["audio"]):
        assert any(torch.equal(torch.roll(x, k, dims=0), y) for k in range(-5, 6))
    assert load_meta(shifted)["source"]["bayes_accuracy"] == load_meta(plain)["source"]["bayes_accuracy"]
