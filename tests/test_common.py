"""train/config.py and train/metrics.py: config resolution and its errors, metrics against hand computations."""
import math

import pytest
import torch

from train import config, metrics

DEFAULTS = dict(data="d", lr=1e-3, epochs=3, resume=False, modalities=[], encoders={},
                nested=dict(a=1, b="x"), maybe=None)


def test_config_precedence_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.01\nepochs: 5\nnested:\n  b: y\n")
    cfg = config.load_config(DEFAULTS, ["--config", str(f), "--epochs", "7", "--nested.a=2", "--resume",
                                        "--lr", "1e-4", "--modalities", "[image]", "--encoders.image.width", "16"])
    assert cfg["lr"] == 1e-4 and isinstance(cfg["lr"], float)
    assert cfg["epochs"] == 7 and cfg["nested"] == {"a": 2, "b": "y"} and cfg["resume"] is True
    assert cfg["modalities"] == ["image"] and cfg["encoders"] == {"image": {"width": 16}}
    assert cfg["config_file"] == str(f)
    assert config.load_config(DEFAULTS, ["--lr", "3"])["lr"] == 3.0  # int accepted for a float
    # a free mapping (empty in DEFAULTS) set by the file is deep-merged with flags
    f.write_text("encoders:\n  image: {width: 8, depth: 2}\n")
    cfg = config.load_config(DEFAULTS, ["--config", str(f), "--encoders.image.width", "16", "--encoders.text.d", "4"])
    assert cfg["encoders"] == {"image": {"width": 16, "depth": 2}, "text": {"d": 4}}


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1"], "unknown config key 'lrr'"),
    (["--epochs", "2.5"], "'epochs' must be an integer"),
    (["--epochs", "true"], "'epochs' must be an integer"),
    (["--lr", "fast"], "'lr' must be a number"),
    (["--resume", "3"], "'resume' must be true or false"),
    (["--nested.c", "1"], "unknown config key 'nested.c'"),
    (["--nested", "3"], "'nested' must be a mapping"),
    (["--modalities", "image"], "'modalities' must be a list"),
    (["--config", "/nonexistent.yaml"], "--config: file not found"),
    (["epochs", "3"], "expected --key value"),
])
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[")):
        config.load_config(DEFAULTS, argv)


def test_config_file_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("epochs: three\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml: 'epochs' must be an integer"):
        config.load_config(DEFAULTS, ["--config", str(f)])
    f.write_text("- a list\n")
    with pytest.raises(config.ConfigError, match=r"bad\.yaml: top level must be a mapping"):
        config.load_config(DEFAULTS, ["--config", str(f)])


def test_selection_score():
    val = {"audio": {"acc": 0.9}, "video": {"acc": 0.5}, "fused": {"acc": 0.8}}
    assert metrics.selection_score(val, "fused", "acc") == 0.8
    assert metrics.selection_score(val, "modality_mean", "acc") == pytest.approx(0.7)
    with pytest.raises(config.ConfigError, match="select_on='best'"):
        metrics.selection_score(val, "best", "acc")


def test_select_metric_reads_macro_f1_and_refuses_other_names():
    val = {"audio": {"acc": 0.9, "macro_f1": 0.6}, "video": {"acc": 0.5, "macro_f1": 0.4},
           "fused": {"acc": 0.8, "macro_f1": 0.7}}
    assert metrics.selection_score(val, "fused", "macro_f1") == 0.7
    assert metrics.selection_score(val, "modality_mean", "macro_f1") == pytest.approx(0.5)
    for name in metrics.SELECT_METRIC:
        config.check_choice("select_metric", name, metrics.SELECT_METRIC)
    with pytest.raises(config.ConfigError, match="select_metric='f1': choose acc or macro_f1"):
        config.check_choice("select_metric", "f1", metrics.SELECT_METRIC)


def test_classification_metrics_by_hand():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # predictions: 0, 1, 1, 1, 2, 0
    logits = torch.tensor([[3., 0, 0], [0, 2, 0], [0, 3, 0], [0, 1, 0.5], [0, 0, 2], [1, 0, 0.5]])
    m = metrics.classification_metrics(logits, labels)
    assert m["acc"] == pytest.approx(4 / 6)
    # per-class F1: c0 tp1 fp1 fn1 -> 0.5; c1 tp2 fp1 fn0 -> 0.8; c2 tp1 fp0 fn1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    probs = logits.softmax(1)
    # AP by hand for class 0: scores ranked, positives at ranks where label==0
    def ap_by_hand(scores, positive):
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        hits, total = 0, 0.0
        for rank, i in enumerate(order, 1):
            if positive[i]:
                hits += 1
                total += hits / rank
        return total / sum(positive)
    expected = sum(ap_by_hand(probs[:, c].tolist(), (labels == c).tolist()) for c in range(3)) / 3
    assert m["mAP"] == pytest.approx(expected)


def test_average_precision_ties_form_one_threshold():
    # all scores tied: one threshold at recall 1 with precision = prevalence
    assert metrics.average_precision(torch.ones(4), torch.tensor([1, 0, 0, 1])) == pytest.approx(0.5)
    assert math.isnan(metrics.average_precision(torch.rand(3), torch.zeros(3, dtype=torch.bool)))


def test_regression_metrics_by_hand():
    target = torch.tensor([2.4, -1.2, 0.0, 0.6, -2.8])
    pred = torch.tensor([1.6, -0.4, 0.3, -0.2, -3.5])
    m = metrics.regression_metrics(pred, target)
    assert m["mae"] == pytest.approx((0.8 + 0.8 + 0.3 + 0.8 + 0.7) / 5)
    # Acc-7: rounded clipped: pred [2,0,0,0,-3] target [2,-1,0,1,-3] -> 3/5
    assert m["acc7"] == pytest.approx(3 / 5)
    # Acc-2 over non-zero labels: signs pred [+,-,-,-] vs target [+,-,+,-] -> 3/4
    assert m["acc2"] == pytest.approx(3 / 4)
    p, t = pred.double(), target.double()
    corr = ((p - p.mean()) @ (t - t.mean())) / ((p - p.mean()).norm() * (t - t.mean()).norm())
    assert m["corr"] == pytest.approx(corr.item())
    # weighted F1 on signs: positives tp1 fn1 fp0 -> 2/3; negatives tn2 fp... (pred neg & target neg)=2,
    # fn for negative class = target neg predicted pos = 0, fp for negative = target pos predicted neg = 1 -> 0.8
    assert m["f1"] == pytest.approx((2 / 3 * 2 + 0.8 * 2) / 4)
