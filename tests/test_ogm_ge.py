"""OGM-GE: the maths by hand, the step against the released step written out, N ranks == 1 rank, and
train/ogm_ge.py end to end on a tiny embedded audio-visual set (result, TensorBoard, exact resume,
refusals, the shipped configs)."""
import json
import math

import pytest
import torch
from torch import nn

from data_prep import embedded
from methods import ogm_ge as maths
from models.fusion import ConcatFusionModel
from tests.conftest import run_on_gloo_ranks
from tests.test_train import final_weights, run_script, tb_tags
from train import config, ogm_ge

STEP_CFG = dict(variant="official", modulation="ogm_ge", alpha=0.5, modulation_starts=0, modulation_ends=50,
                ratio_reference="weakest")


# ------------------------------------------------------------------------------------------------
# The maths, by hand

def test_target_score_sum_is_the_summed_probability_of_the_true_class():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, math.log(3.0)]])
    labels = torch.tensor([0, 0, 0])
    assert maths.target_score_sum(logits, labels).item() == pytest.approx(0.5 + 0.75 + 0.25)


def test_ratios_and_coefficients():
    s = torch.tensor([2.0, 1.0, 4.0])
    assert maths.discrepancy_ratios(s, "weakest").tolist() == pytest.approx([2.0, 1.0, 4.0])
    assert maths.discrepancy_ratios(s, "others_mean").tolist() == pytest.approx([(2 + 0.5) / 2, (0.5 + 0.25) / 2, 3.0])
    k = maths.modulation_coefficients(torch.tensor([2.0, 1.0, 0.5]), 0.5)
    assert k.tolist() == pytest.approx([1 - math.tanh(1.0), 1.0, 1.0])
    # two modalities: both references give the released ratio s_m / s_other for the dominant one
    two = torch.tensor([3.0, 1.5])
    for ref in maths.RATIO_REFERENCES:
        assert maths.modulation_coefficients(maths.discrepancy_ratios(two, ref), 0.5).tolist() == \
            pytest.approx([1 - math.tanh(1.0), 1.0])
    with pytest.raises(ValueError, match="at least two"):
        maths.discrepancy_ratios(torch.tensor([1.0]))


@pytest.mark.parametrize("scores, k_first, k_second", [
    ((1.0, 2.0), 1.0, 1 - math.tanh(0.5 * 2.0)),      # the second (video) dominates
    ((2.0, 1.0), 1 - math.tanh(0.5 * 2.0), 1.0),      # the first (audio) dominates
    ((1.0, 1.0), 1 - math.tanh(0.5), 1.0),            # exact tie: the released else-branch damps the first
])
def test_released_two_modality_branch(scores, k_first, k_second):
    k, rho = maths.released_two_modality_coefficients(torch.tensor(scores), 0.5)
    assert k.tolist() == pytest.approx([k_first, k_second])
    assert rho.tolist() == pytest.approx([scores[0] / scores[1], scores[1] / scores[0]])
    if scores[0] == scores[1]:   # the generalised rule (and the paper) damps neither
        general = maths.modulation_coefficients(maths.discrepancy_ratios(torch.tensor(scores)), 0.5)
        assert general.tolist() == [1.0, 1.0]


def test_ge_noise_and_modulation():
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert maths.ge_noise_std(g).item() == pytest.approx(math.sqrt(5 / 3) + 1e-8)
    assert maths.ge_noise_std(torch.tensor([7.0])).item() == pytest.approx(1e-8)
    k = torch.tensor(0.25)
    assert torch.equal(maths.modulate_gradient(g, k), g * 0.25)
    z = torch.tensor([1.0, -1.0, 0.5, 0.0])
    torch.testing.assert_close(maths.modulate_gradient(g, k, z), g * 0.25 + z * (math.sqrt(5 / 3) + 1e-8))


# ------------------------------------------------------------------------------------------------
# The step against the released step

class Toy(ConcatFusionModel):
    """ConcatFusionModel's read-off and fusion over BatchNorm-free encoders that hold a Conv2d
    (4-d weight: modulated by the released rule) and a Linear (not modulated by it)."""

    def __init__(self, modalities=("audio", "video"), seed=0):
        nn.Module.__init__(self)
        torch.manual_seed(seed)
        self.modalities = list(modalities)
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Conv2d(1 + i, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1),
                                                        nn.Flatten(), nn.Linear(4, 5))
                                       for i, m in enumerate(modalities)})
        self.widths = [5] * len(modalities)
        self.fc = nn.Linear(5 * len(modalities), 4)


def toy_batches(modalities=("audio", "video"), n_batches=3, batch=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        b = {m: torch.randn(batch, 1 + i, 6, 6, generator=g) for i, m in enumerate(modalities)}
        b["label"] = torch.randint(0, 4, (batch,), generator=g)
        out.append(b)
    return out


def released_sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def released_step(model, batch, opt, args, epoch, generator):
    """main.py train_epoch's body for concat fusion, written as released (python loop over the batch,
    the if/else on ratio_v, the name and 4-d filter, normal_ with std().item() + 1e-8) — the noise
    from `generator` instead of the global RNG so that both runs draw the same numbers."""
    spec, image, label = batch["audio"], batch["video"], batch["label"]
    opt.zero_grad()
    a = model.encoders["audio"](spec)
    v = model.encoders["video"](image)
    out = model.fc(torch.cat((a, v), dim=1))
    weight_size = model.fc.weight.size(1)
    out_v = torch.mm(v, torch.transpose(model.fc.weight[:, weight_size // 2:], 0, 1)) + model.fc.bias / 2
    out_a = torch.mm(a, torch.transpose(model.fc.weight[:, :weight_size // 2], 0, 1)) + model.fc.bias / 2
    loss = nn.CrossEntropyLoss()(out, label)
    loss.backward()
    if args["modulation"] != "none":
        softmax, relu, tanh = nn.Softmax(dim=1), nn.ReLU(inplace=True), nn.Tanh()
        score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
        score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:
            coeff_v, coeff_a = 1 - tanh(args["alpha"] * relu(ratio_v)), 1
        else:
            coeff_a, coeff_v = 1 - tanh(args["alpha"] * relu(ratio_a)), 1
        if args["modulation_starts"] <= epoch <= args["modulation_ends"]:
            for name, parms in model.named_parameters():
                layer = str(name).split(".")[1]
                for key, coeff in (("audio", coeff_a), ("video", coeff_v)):
                    if key in layer and len(parms.grad.size()) == 4:
                        if args["modulation"] == "ogm_ge":
                            parms.grad = parms.grad * coeff + torch.zeros_like(parms.grad).normal_(
                                0, parms.grad.std().item() + 1e-8, generator=generator)
                        else:
                            parms.grad *= coeff
    opt.step()


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("modulation, epoch, alpha", [("ogm_ge", 0, 0.5), ("ogm", 3, 2.0), ("ogm_ge", 51, 0.5),
                                                      ("none", 0, 0.5)])
def test_official_step_equals_the_released_step(modulation, epoch, alpha):
    cfg = dict(STEP_CFG, modulation=modulation, alpha=alpha)
    ours, released = Toy(), Toy()
    opt_ours, opt_released = released_sgd(ours), released_sgd(released)
    g_ours, g_released = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    params = {m: ogm_ge.modulated_parameters(ours.encoders[m], "conv") for m in ours.modalities}
    assert [p.dim() for p in params["audio"]] == [4]
    for batch in toy_batches():
        stats = ogm_ge.ogm_ge_step(ours, opt_ours, batch, cfg, epoch, params, generator=g_ours)
        released_step(released, batch, opt_released, cfg, epoch, g_released)
    for (key, a), b in zip(params_of(ours).items(), params_of(released).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    if modulation != "none" and epoch <= 50:   # the edit really happened: a plain joint step differs
        plain = Toy()
        opt_plain = released_sgd(plain)
        for batch in toy_batches():
            ogm_ge.ogm_ge_step(plain, opt_plain, batch, dict(cfg, modulation="none"), epoch, params_of_plain(plain))
        diff = max((params_of(plain)[k] - v).abs().max().item() for k, v in params_of(ours).items())
        assert diff > 1e-5
        assert min(stats["audio/coeff"].item(), stats["video/coeff"].item()) < 1


def params_of_plain(model):
    return {m: ogm_ge.modulated_parameters(model.encoders[m], "conv") for m in model.modalities}


@pytest.mark.parametrize("epoch, inside", [(1, False), (2, True), (4, True), (5, False)])
def test_modulation_window_is_inclusive_at_both_ends(epoch, inside):
    """modulation_starts <= epoch <= modulation_ends (0-based, both ends inclusive, main.py): with the
    window [2, 4] epochs 2 and 4 are modulated, 1 and 5 are plain joint steps."""
    cfg = dict(STEP_CFG, modulation="ogm", alpha=2.0, modulation_starts=2, modulation_ends=4)
    runs = {}
    for modulation in ("ogm", "none"):
        model = Toy()
        stats = ogm_ge.ogm_ge_step(model, released_sgd(model), toy_batches()[0], dict(cfg, modulation=modulation),
                                   epoch, params_of_plain(model))
        runs[modulation] = (params_of(model), stats)
    (modulated, stats), (plain, _) = runs["ogm"], runs["none"]
    assert stats["train/modulating"].item() == float(inside)
    assert min(stats["audio/coeff"].item(), stats["video/coeff"].item()) < 1 if inside else \
        stats["audio/coeff"].item() == stats["video/coeff"].item() == 1.0
    differs = any(not torch.equal(modulated[k], plain[k]) for k in plain)
    assert differs == inside


def test_paper_variant_modulates_every_encoder_parameter_and_has_no_tie_artefact():
    model = Toy()
    params = {m: ogm_ge.modulated_parameters(model.encoders[m], "all") for m in model.modalities}
    assert len(params["audio"]) == 4   # conv weight and bias, linear weight and bias
    assert [p.dim() for p in ogm_ge.modulated_parameters(model.encoders["audio"], "weights")] == [4, 2]
    # one encoder shared by both modalities, the same input and the same fusion columns: the scores tie
    # exactly; official damps the first modality, paper neither
    batch = toy_batches()[0]
    batch = {"audio": batch["audio"], "video": batch["audio"], "label": batch["label"]}
    for variant, want in (("official", 1 - math.tanh(0.5)), ("paper", 1.0)):
        model = Toy()
        model.encoders["video"] = model.encoders["audio"]
        with torch.no_grad():
            model.fc.weight[:, 5:] = model.fc.weight[:, :5]
        params = {m: ogm_ge.modulated_parameters(model.encoders[m], "conv") for m in model.modalities}
        stats = ogm_ge.ogm_ge_step(model, released_sgd(model), batch, dict(STEP_CFG, variant=variant), 0, params,
                                   generator=torch.Generator().manual_seed(0))
        assert stats["audio/ratio"].item() == 1.0
        assert stats["audio/coeff"].item() == pytest.approx(want) and stats["video/coeff"].item() == 1.0


# ------------------------------------------------------------------------------------------------
# N ranks x B/N == 1 rank x B (in-process gloo group)

DDP_CASES = {"official_two": (("audio", "video"), dict(STEP_CFG)),
             "paper_three": (("audio", "video", "text"), dict(STEP_CFG, variant="paper", ratio_reference="others_mean"))}


def _run_steps(case, world=1, rank=0):
    modalities, cfg = DDP_CASES[case]
    model = Toy(modalities)
    opt = released_sgd(model)
    params = {m: ogm_ge.modulated_parameters(model.encoders[m], "all") for m in modalities}
    generator = torch.Generator().manual_seed(3)   # the same on every rank
    for batch in toy_batches(modalities):
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        ogm_ge.ogm_ge_step(model, opt, local, cfg, 0, params, world, generator)
    return params_of(model)


def _ogm_ge_on_rank(world, rank):
    return {case: _run_steps(case, world, rank) for case in DDP_CASES}   # one group for every case


@pytest.mark.slow
def test_ogm_ge_step_two_ranks_equal_one(tmp_path):
    """Two modalities (official, released branch) and three (paper, others_mean), every encoder
    parameter modulated with GE noise: global scores, reduced gradients, one noise stream."""
    ddp = run_on_gloo_ranks(_ogm_ge_on_rank, tmp_path)[0]
    for case in DDP_CASES:
        for key, value in _run_steps(case).items():
            torch.testing.assert_close(ddp[case][key], value, rtol=1e-5, atol=1e-6, msg=f"{case}: {key}")


# ------------------------------------------------------------------------------------------------
# train/ogm_ge.py end to end

@pytest.fixture(scope="module")
def av(tmp_path_factory):
    return embedded.generate(tmp_path_factory.mktemp("data"), "av", seed=5, n_train=256, n_val=64, n_test=64)


def ogm_args(data, out, *extra):
    return ["--data", str(data), "--out_dir", str(out), "--batch_size", "64", "--epochs", "2", "--log_every", "2",
            "--progress", "false", "--encoders.audio.base_width", "8", "--encoders.video.base_width", "8",
            "--optimizer", "sgd", "--lr", "0.05", *extra]


@pytest.mark.slow
def test_trains_end_to_end_and_logs_per_modality(av, tmp_path):
    out = tmp_path / "run"
    run_script("train/ogm_ge.py", ogm_args(av, out, "--modulation_ends", "0"))
    result = json.loads((out / "result.json").read_text())
    assert set(result["test"]) == {"audio", "video", "fused"} and result["method"] == "OGM-GE"
    assert result["modulated_params"] == "conv" and result["modulation_window"] == [0, 0]
    tags = tb_tags(out)
    for m in ("audio", "video"):
        for kind in ("loss", "acc", "score", "ratio", "coeff", "grad_norm_before", "grad_norm_after"):
            assert f"{m}/{kind}" in tags, (m, kind)
    assert {"train/loss", "train/modulating", "val_fused/acc"} <= tags


@pytest.mark.slow
def test_resume_is_exact(av, tmp_path):
    """Stopped inside the first epoch (4 steps per epoch) with the GE noise on, resumed == uninterrupted:
    the noise generator is checkpointed."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script("train/ogm_ge.py", ogm_args(av, whole))
    run_script("train/ogm_ge.py", ogm_args(av, split, "--stop_after_steps", "3"))
    run_script("train/ogm_ge.py", ogm_args(av, split, "--resume"))
    a, b = final_weights(whole), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_switch_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "never"
    proc = run_script("train/ogm_ge.py", ["--data", str(tmp_path / "no_data"), "--out_dir", str(out),
                                          "--modulation", "OGM_GE"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "modulation='OGM_GE'" in errors[0] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    (dict(variant="released"), "variant='released'"),
    (dict(modulation="OGM"), "modulation='OGM'"),
    (dict(modulated_params="convs"), "modulated_params='convs'"),
    (dict(ratio_reference="min"), "ratio_reference='min'"),
    (dict(fusion="film"), "fusion='film'"),
    (dict(mixed_precision="fp16"), "mixed_precision='fp16'"),
    (dict(alpha=-1), "alpha=-1"),
    (dict(modulation_ends=5.5), "modulation_ends=5.5"),
])
def test_bad_config_is_refused(override, message):
    with pytest.raises(ogm_ge.ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        ogm_ge.check_config(dict(config.defaults(ogm_ge.CONFIG), **override))


# the shapes each converter writes with its defaults (data_prep/<dataset>.py), and the embedded layouts
CONVERTED = {
    "crema_d": {"audio": ("spectrogram", [257, 188]), "video": ("frames", [1, 3, 224, 224])},
    "kinetics_sounds": {"audio": ("spectrogram", [257, 1003]), "video": ("frames", [3, 3, 224, 224])},
    **{flavour: {name: (kind, shape) for name, kind, shape, _, _ in embedded.LAYOUT[flavour]}
       for flavour in ("av", "imgtab", "seq3")},
}


@pytest.mark.parametrize("dataset", sorted(CONVERTED))
def test_dataset_configs_load_and_build_on_the_converted_shapes(dataset):
    from train.config import load_config
    cfg = load_config(ogm_ge.CONFIG, ["--config", f"train/configs/ogm_ge_{dataset}.yaml"])
    ogm_ge.check_config(cfg)
    modalities = {m: {"kind": k, "shape": s, "dtype": "float32"} for m, (k, s) in CONVERTED[dataset].items()}
    if "table" in modalities:
        modalities["table"] |= {"continuous": embedded.TABLE_CONTINUOUS, "categorical": embedded.TABLE_CATEGORICAL}
    meta = {"num_classes": 3, "modalities": modalities}
    assert cfg["modalities"] == list(CONVERTED[dataset])
    model = ConcatFusionModel(meta, cfg["encoders"], cfg["modalities"])
    assert model.fc.out_features == 3 and model.fc.in_features == sum(model.widths)
    which = cfg["modulated_params"] if cfg["modulated_params"] != "variant" else "conv"
    for m in cfg["modalities"]:   # every modality has parameters the config's rule modulates
        assert ogm_ge.modulated_parameters(model.encoders[m], which), (dataset, m)
