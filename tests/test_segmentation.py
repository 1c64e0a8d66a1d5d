"""CGGM's BraTS path: models/segmentation.py (shapes, detached light decoders, `out` layers,
config errors) and the segmentation loss / Dice metrics (models/segmentation.py, train/metrics.py) against hand computations.
CPU, tiny nets (32x32 slices, base width 4)."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods.modulation import direction_loss
from models.segmentation import SEG_DEFAULTS, BratsCGGMModel, check_seg_config
from train import metrics
from models import segmentation

torch.set_num_threads(1)

MODS = ["flair", "t1ce", "t1", "t2"]
TINY = dict(block="basic", layers=[1, 1, 1, 1], base_width=4, multi_grid=[1], aspp_rates=[1, 2],
            aspp_channels=8, low_channels=4, decoder_channels=8)


def brats_meta(size=32, mods=MODS):
    return {"task": "segmentation", "num_classes": 4,
            "modalities": {m: {"kind": "image", "shape": [1, size, size], "dtype": "float32"}
                           for m in mods}}


def batch(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {m: torch.randn(b, 1, size, size, generator=g) for m in MODS}
    out["label"] = torch.randint(0, 4, (b, size, size), generator=g).to(torch.uint8)
    return out


# ------------------------------------------------------------------------------------------------
# Model


@pytest.mark.parametrize("cfg, low_ch, high_hw", [
    ({}, 4, 2),                                                  # basic, os 16
    ({"output_stride": 8}, 4, 4),                                # basic, os 8
    ({"block": "bottleneck", "fusion": "sum"}, 16, 2),           # bottleneck: expansion 4
])
def test_shapes(cfg, low_ch, high_hw):
    torch.manual_seed(0)
    model = BratsCGGMModel(brats_meta(), {**TINY, **cfg})
    assert list(model.encoders) == MODS and list(model.classifiers) == MODS
    fused, h = model.segment(batch())
    assert fused.shape == (2, 4, 32, 32)
    assert list(h) == MODS
    for m in MODS:
        low, high = h[m]
        assert low.shape == (2, low_ch, 8, 8)                   # stride 4
        assert high.shape == (2, 8, high_hw, high_hw)           # stride output_stride
    logits = model.classify(h)
    assert list(logits) == MODS and all(v.shape == (2, 4, 32, 32) for v in logits.values())
    assert model.classify({"t1": h["t1"]}, size=(16, 16))["t1"].shape == (2, 4, 16, 16)
    # a (B, H, W) slice is taken as one channel
    fused2, _ = model.eval().segment({m: x.squeeze(1) if m in MODS else x for m, x in batch().items()})
    assert fused2.shape == (2, 4, 32, 32)


def test_dilation_follows_released_output_stride_16():
    cfg = {**TINY, "block": "bottleneck", "layers": [1, 1, 1, 3], "multi_grid": [1, 2, 4]}
    enc = BratsCGGMModel(brats_meta(mods=["flair"]), cfg).encoders["flair"]
    l4 = enc.backbone.layer4
    assert [blk.conv2.dilation for blk in l4] == [(2, 2), (4, 4), (8, 8)]
    assert l4[0].conv2.stride == (1, 1) and l4[0].downsample[0].stride == (1, 1)
    assert enc.backbone.layer3[0].conv2.stride == (2, 2)
    enc8 = BratsCGGMModel(brats_meta(mods=["flair"]), {**cfg, "output_stride": 8}).encoders["flair"]
    assert enc8.backbone.layer3[0].conv2.dilation == (2, 2)
    assert [blk.conv2.dilation for blk in enc8.backbone.layer4] == [(4, 4), (8, 8), (16, 16)]
    # proj + core partition the encoder's parameters
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    proj, core = ids(enc.proj.parameters()), ids(enc.core.parameters())
    assert not proj & core and proj | core == ids(enc.parameters())
    assert not any(k.startswith(("core.", "proj.")) for k in enc.state_dict())  # views only


def test_classifiers_never_send_gradient_to_encoders():
    torch.manual_seed(0)
    model = BratsCGGMModel(brats_meta(), TINY)
    data = batch()
    _, h = model.segment(data)                           # h NOT detached by the caller
    logits = model.classify(h)
    loss = sum(metrics.task_loss("segmentation", v, data["label"]) for v in logits.values())
    loss.backward()
    for p in list(model.encoders.parameters()) + list(model.head.parameters()):
        assert p.grad is None
    for m in MODS:
        assert model.classifiers[m].out.weight.grad is not None
        assert model.classifiers[m].out.weight.grad.abs().sum() > 0
    # the fused loss reaches every encoder, and no classifier
    model.zero_grad(set_to_none=True)
    fused, _ = model.segment(data)
    metrics.task_loss("segmentation", fused, data["label"]).backward()
    for m in MODS:
        assert model.encoders[m].backbone.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.classifiers.parameters())


def test_out_layers_match_and_direction_is_defined():
    model = BratsCGGMModel(brats_meta(), {**TINY, "decoder_channels": 6})
    w_f = model.head.out.weight
    assert isinstance(model.head.out, torch.nn.Conv2d) and w_f.shape == (4, 6, 1, 1)
    for m in MODS:
        w_i = model.classifiers[m].out.weight
        assert w_i.shape == w_f.shape and w_i.numel() == w_f.numel()
    lgm = direction_loss([1.0, 0.5, 0.5, 1.0], w_f, [model.classifiers[m].out.weight.detach()
                                                      for m in MODS])
    lgm.backward()
    assert w_f.grad is not None and torch.isfinite(lgm)


@pytest.mark.parametrize("cfg, key", [
    ({"widht": 4}, "widht"),
    ({"output_stride": 32}, "output_stride"),
    ({"multi_grid": [1, 2]}, "multi_grid"),                 # layers[3] = 1 in TINY
    ({"fusion": "mean"}, "fusion"),
    ({"block": "wide"}, "block"),
    ({"layers": [1, 1, 1]}, "layers"),
    ({"base_width": 0}, "base_width"),
    ({"aspp_rates": []}, "aspp_rates"),
    ({"decoder_dropout": [0.5]}, "decoder_dropout"),
    ({"aspp_dropout": True}, "aspp_dropout"),
])
def test_config_errors_name_the_key(cfg, key):
    with pytest.raises(ValueError, match=f"'?{key}'?"):
        BratsCGGMModel(brats_meta(), {**TINY, **cfg})
    assert check_seg_config({})["aspp_rates"] == SEG_DEFAULTS["aspp_rates"] == [2, 4, 6]


def test_meta_errors_name_the_key():
    meta = brats_meta()
    meta["modalities"]["t1"] = {"kind": "sequence", "shape": [10, 4], "dtype": "float32"}
    with pytest.raises(ValueError, match="'t1'.*'kind'"):
        BratsCGGMModel(meta, TINY)
    meta = brats_meta()
    meta["modalities"]["t2"]["shape"] = [1, 16, 16]
    with pytest.raises(ValueError, match="one H, W"):
        BratsCGGMModel(meta, TINY)
    with pytest.raises(ValueError, match="'task'"):
        BratsCGGMModel({**brats_meta(), "task": "classification"}, TINY)


# ------------------------------------------------------------------------------------------------
# Loss


def test_segmentation_loss_uniform_logits_by_hand():
    logits = torch.zeros(1, 4, 1, 2)                     # p = 1/4 everywhere
    mask = torch.tensor([[[0, 3]]], dtype=torch.uint8)
    # wCE: both pixels have nll log 4 -> weighted mean log 4 whatever the weights
    # pooled foreground Dice: inter = 1/4 (pixel 1, class 3), Σp = 2 * 3 * 1/4, Σt = 1
    expected = 0.5 * math.log(4) + 0.5 * (1 - (2 * 0.25) / (1.5 + 1 + 0.01))
    assert segmentation.segmentation_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)
    # "mean" over all four classes: P_c = 1/2, T = (1, 0, 0, 1), I = (1/4, 0, 0, 1/4)
    d0 = (0.5 + 0.01) / (1.5 + 0.01)
    d1 = 0.01 / (0.5 + 0.01)
    expected_mean = 0.5 * math.log(4) + 0.5 * (1 - (2 * d0 + 2 * d1) / 4)
    got = segmentation.segmentation_loss(logits, mask, include_background=True, dice_reduction="mean")
    assert got.item() == pytest.approx(expected_mean, rel=1e-6)


def test_segmentation_loss_weighted_ce_and_dice_by_loops():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 2, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[[0, 1, 2], [3, 3, 0]], [[0, 0, 0], [2, 1, 0]]])
    w = (0.2, 0.3, 0.25, 0.25)
    num = den = inter = psum = tsum = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(3):
                z = logits[b, :, i, j].tolist()
                lse = math.log(sum(math.exp(v) for v in z))
                y = int(mask[b, i, j])
                num += w[y] * (lse - z[y])
                den += w[y]
                for c in range(1, 4):                    # background excluded
                    p = math.exp(z[c] - lse)
                    psum += p
                    tsum += float(y == c)
                    inter += p * float(y == c)
    wce = num / den
    dice = 2 * inter / (psum + tsum + 0.01)
    got = segmentation.segmentation_loss(logits, mask)
    assert got.item() == pytest.approx(0.5 * wce + 0.5 * (1 - dice), rel=1e-6)
    # the class weights matter (weighted mean, not plain mean)
    plain = segmentation.segmentation_loss(logits, mask, class_weights=None)
    assert abs(plain.item() - got.item()) > 1e-4
    assert segmentation.segmentation_loss(logits, mask, dice_weight=0.0).item() == \
        pytest.approx(wce, rel=1e-6)


def test_segmentation_loss_errors():
    with pytest.raises(ValueError, match="class_weights"):
        segmentation.segmentation_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        segmentation.segmentation_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dice_reduction"):
        segmentation.segmentation_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long),
                                 dice_reduction="macro")


# ------------------------------------------------------------------------------------------------
# Dice


MASK = torch.tensor([[[0, 1, 2], [3, 3, 0]],
                     [[0, 0, 0], [0, 0, 0]],             # empty slice
                     [[2, 2, 0], [0, 0, 0]]])            # oedema only: no TC, no ET
PRED = torch.tensor([[[0, 1, 1], [3, 0, 0]],
                     [[0, 0, 0], [0, 0, 0]],             # empty and predicted empty
                     [[3, 0, 0], [0, 0, 0]]])            # a false ET pixel
# slice 0: WT |A|=3 |G|=4 ∩=3; TC |A|=3 |G|=3 ∩=2; ET |A|=1 |G|=2 ∩=1
# slice 1: empty-empty -> 1, 1, 1
# slice 2: WT |A|=1 |G|=2 ∩=1; TC |A|=1 |G|=0 -> 0; ET |A|=1 |G|=0 -> 0
PER_SLICE = {"wt": [6 / 7, 1.0, 2 / 3], "tc": [4 / 6, 1.0, 0.0], "et": [2 / 3, 1.0, 0.0]}


def test_dice_scores_by_hand():
    per = segmentation.dice_scores(PRED, MASK.to(torch.uint8), reduction="none")
    for k, v in PER_SLICE.items():
        assert per[k].dtype == torch.float64
        assert per[k].tolist() == pytest.approx(v, abs=1e-12)
    mean = segmentation.dice_scores(PRED, MASK)
    summed = segmentation.dice_scores(PRED, MASK, reduction="sum")
    for k, v in PER_SLICE.items():
        assert mean[k].item() == pytest.approx(sum(v) / 3, abs=1e-12)
        assert summed[k].item() == pytest.approx(sum(v), abs=1e-12)
    # label 3 alone is ET; label 2 is neither TC nor ET
    only_et = segmentation.dice_scores(torch.tensor([[3]]), torch.tensor([[3]]))
    only_ed = segmentation.dice_scores(torch.tensor([[2]]), torch.tensor([[3]]))
    assert [only_et[k].item() for k in ("wt", "tc", "et")] == [1.0, 1.0, 1.0]
    assert [only_ed[k].item() for k in ("wt", "tc", "et")] == [1.0, 0.0, 0.0]


def test_dice_scores_released_eps_form():
    eps = 1e-3
    got = segmentation.dice_scores(PRED, MASK, eps=eps, reduction="none")
    sizes = {"wt": [(3, 4, 3), (0, 0, 0), (1, 2, 1)], "tc": [(3, 3, 2), (0, 0, 0), (1, 0, 0)],
             "et": [(1, 2, 1), (0, 0, 0), (1, 0, 0)]}
    for k, rows in sizes.items():
        released = [2 * (i + eps) / (a + g + 2 * eps) for a, g, i in rows]  # released Dice()
        assert got[k].tolist() == pytest.approx(released, abs=1e-12)
        assert got[k][1].item() == 1.0                    # empty-empty is 1 there too
    with pytest.raises(ValueError, match="shape"):
        segmentation.dice_scores(PRED, MASK[:2])


def test_segmentation_metrics_and_task_dispatch():
    logits = 5.0 * F.one_hot(PRED, 4).permute(0, 3, 1, 2).float()
    mask = MASK.to(torch.uint8)
    m = metrics.segmentation_metrics(logits, mask)
    expected = {f"dice_{k}": sum(v) / 3 for k, v in PER_SLICE.items()}
    expected["dice_mean"] = sum(expected.values()) / 3
    assert set(m) == set(expected) and all(isinstance(v, float) for v in m.values())
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12)
    assert metrics.segmentation_metrics(PRED.to(torch.uint8), mask) == m    # labels accepted
    assert metrics.task_metrics("segmentation", logits, mask) == m
    with pytest.raises(ValueError, match="segmentation_metrics"):
        metrics.segmentation_metrics(PRED.float(), mask)
    # task_loss dispatch; classification / regression unchanged
    g = torch.Generator().manual_seed(0)
    seg_logits = torch.randn(3, 4, 2, 3, generator=g)
    assert torch.equal(metrics.task_loss("segmentation", seg_logits, mask),
                       segmentation.segmentation_loss(seg_logits, mask))
    cls_logits, labels = torch.randn(5, 3, generator=g), torch.tensor([0, 1, 2, 1, 0])
    assert torch.equal(metrics.task_loss("classification", cls_logits, labels),
                       F.cross_entropy(cls_logits, labels))
    pred, target = torch.randn(5, 1, generator=g), torch.randn(5, generator=g)
    assert torch.equal(metrics.task_loss("regression", pred, target),
                       F.l1_loss(pred.squeeze(-1), target))
    assert metrics.task_metrics("classification", cls_logits, labels) == \
        metrics.classification_metrics(cls_logits, labels)


def test_cggm_interface_matches_segment():
    """forward/fuse (what train/cggm.py and metrics.evaluate call) give the same prediction as segment."""
    torch.manual_seed(0)
    model = BratsCGGMModel(brats_meta(), TINY).eval()
    data = batch()
    out = model(data)
    fused, h = model.segment(data)
    assert list(out) == MODS
    torch.testing.assert_close(model.fuse(out), fused)
    for m in MODS:
        torch.testing.assert_close(out[m][1], model.classify({m: h[m]})[m])
    names = {n for n, _ in model.named_parameters()}
    assert {id(p) for p in model.model_parameters()} == {id(p) for n, p in model.named_parameters()
                                                          if not n.startswith("classifiers.")} and names
