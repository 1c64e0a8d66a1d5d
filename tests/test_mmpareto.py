"""MMPareto: the maths against hand-computed cases, the step against a straightforward re-implementation
of the released step, N ranks == 1 rank, and train/mmpareto.py end to end on a tiny embedded
audio-visual set (result, TensorBoard, exact resume, refusals, the shipped configs)."""
import json
import math

import pytest
import torch
from torch import nn

from data_prep import embedded
from methods import mmpareto
from models.fusion import ConcatAndUnimodalHeadsModel
from tests.conftest import run_on_gloo_ranks
from tests.test_train import final_weights, run_script, tb_tags
from train import config, mmpareto as script

MODALITIES = ("audio", "video", "text")


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# The maths

def test_min_norm_weight_closed_form_and_released_boundaries():
    # x1 = (2, 0), x2 = (-1, 1): c = (|x2|^2 - x1.x2) / |x1 - x2|^2 = (2 + 2) / (4 + 2 + 4) = 0.4
    c = mmpareto.min_norm_weight(t(4.0)[0], t(-2.0)[0], t(2.0)[0])
    assert c.item() == pytest.approx(0.4)
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    norms = ((grid[:, None] * t(2, 0) + (1 - grid[:, None]) * t(-1, 1)) ** 2).sum(1)
    assert grid[norms.argmin()].item() == pytest.approx(0.4, abs=1e-5)
    # x1.x2 >= |x1|^2: the released 0.999 (not 1); x1.x2 >= |x2|^2: 0.001 (not 0)
    assert mmpareto.min_norm_weight(t(1.0)[0], t(2.0)[0], t(4.0)[0]).item() == 0.999
    assert mmpareto.min_norm_weight(t(4.0)[0], t(2.0)[0], t(1.0)[0]).item() == 0.001


def test_weights_are_equal_without_conflict_and_min_norm_with_it_over_the_whole_encoder():
    aligned = mmpareto.pareto_weights([t(1, 0)], [t(1, 1)])
    assert not aligned.conflict and aligned.alpha_m.item() == 0.5 and aligned.alpha_u.item() == 0.5
    assert aligned.cos.item() == pytest.approx(1 / math.sqrt(2))
    # the same encoder split into two tensors: one decision over the concatenation
    # g_m = [(2, 0), (0, 1)], g_u = [(-3, 1), (0, 1)]: |g_m|^2 = 5, g_m.g_u = -5, |g_u|^2 = 11
    w = mmpareto.pareto_weights([t(2, 0), t(0, 1)], [t(-3, 1), t(0, 1)])
    assert w.conflict and w.cos.item() == pytest.approx(-5 / math.sqrt(55))
    assert w.alpha_m.item() == pytest.approx(16 / 26) and w.alpha_u.item() == pytest.approx(10 / 26)
    # the second tensor alone agrees (cos = 1): deciding per tensor would have given 1/2 there
    assert not mmpareto.pareto_weights([t(0, 1)], [t(0, 1)]).conflict


def test_orthogonal_gradients_take_the_min_norm_branch():
    """cos = 0 exactly: the released `if cos > 0` sends it to the min-norm solver. Asymmetric lengths,
    so that branch differs from 1/2: g_m = (2, 0), g_u = (0, 1): c = (1 - 0) / (4 + 1) = 0.2 —
    (0.2, 0.8), not (0.5, 0.5) (which orthogonal gradients of EQUAL length would give either way)."""
    w = mmpareto.pareto_weights([t(2, 0)], [t(0, 1)])
    assert w.cos.item() == 0.0 and bool(w.conflict)
    assert w.alpha_m.item() == pytest.approx(0.2) and w.alpha_u.item() == pytest.approx(0.8)
    # h = 2 (0.2 g_m + 0.8 g_u) = (0.8, 1.6); per encoder |g_m + g_u| / |h| = sqrt(5) / sqrt(3.2) > 1
    final, factor = mmpareto.integrate([t(2, 0)], [t(0, 1)], w, gamma=1.0, per_tensor=False)
    torch.testing.assert_close(final[0], math.sqrt(5 / 3.2) * t(0.8, 1.6))
    assert factor.item() == pytest.approx(math.sqrt(5 / 3.2))


def test_magnitude_per_tensor_and_per_encoder():
    g_m, g_u = [t(2, 0), t(0, 1)], [t(-3, 1), t(0, 1)]
    w = mmpareto.pareto_weights(g_m, g_u)
    h1, h2 = t(2, 10) / 13, t(0, 2)                     # 2 (8/13 g_m + 5/13 g_u), tensor by tensor
    # per tensor: |g_m + g_u| = sqrt(2) vs |h1| = sqrt(104)/13 -> rescaled; |(0, 2)| = |h2| -> factor 1
    final, factor = mmpareto.integrate(g_m, g_u, w, gamma=1.5, per_tensor=True)
    r1 = math.sqrt(2) / (math.sqrt(104) / 13)
    torch.testing.assert_close(final[0], 1.5 * r1 * h1)
    torch.testing.assert_close(final[1], 1.5 * h2)
    assert factor.item() == pytest.approx((r1 + 1) / 2)
    # per encoder: one factor |g_m + g_u| / |h| = sqrt(6) / sqrt(104/169 + 4) for both tensors
    final, factor = mmpareto.integrate(g_m, g_u, w, gamma=1.5, per_tensor=False)
    r = math.sqrt(6) / math.sqrt(104 / 169 + 4)
    torch.testing.assert_close(final[0], 1.5 * r * h1)
    torch.testing.assert_close(final[1], 1.5 * r * h2)
    assert factor.item() == pytest.approx(r)
    # no conflict: h = g_m + g_u, factor 1, only gamma
    final, factor = mmpareto.integrate([t(1, 0)], [t(1, 1)], mmpareto.pareto_weights([t(1, 0)], [t(1, 1)]), 1.5)
    torch.testing.assert_close(final[0], 1.5 * t(2, 1))
    assert factor.item() == 1.0


def test_a_tensor_whose_integrated_gradient_is_longer_keeps_its_norm():
    """Per tensor the factor is max(1, .): a tensor where |h| > |g_m + g_u| is not shrunk."""
    g_m, g_u = [t(1, 0), t(3, 0)], [t(-4, 0.5), t(-1, 0)]
    w = mmpareto.pareto_weights(g_m, g_u)
    assert w.conflict
    h = [2 * (w.alpha_m * a + w.alpha_u * b) for a, b in zip(g_m, g_u)]
    assert torch.linalg.vector_norm(h[1]) > torch.linalg.vector_norm(g_m[1] + g_u[1])
    final, _ = mmpareto.integrate(g_m, g_u, w, gamma=1.0)
    torch.testing.assert_close(final[1], h[1])


def test_per_encoder_factor_never_shrinks():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        g_m = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
        g_u = [torch.randn(5, generator=g), torch.randn(3, 2, generator=g)]
        w = mmpareto.pareto_weights(g_m, g_u)
        h = [2 * (w.alpha_m * a + w.alpha_u * b) for a, b in zip(g_m, g_u)]
        norm_h = torch.linalg.vector_norm(torch.cat([x.flatten() for x in h]))
        norm_sum = torch.linalg.vector_norm(torch.cat([(a + b).flatten() for a, b in zip(g_m, g_u)]))
        assert norm_h <= norm_sum * (1 + 1e-6)


# ------------------------------------------------------------------------------------------------
# The step against the released step

class Toy(ConcatAndUnimodalHeadsModel):
    """BatchNorm-free stand-in with ConcatAndUnimodalHeadsModel's layout (encoders, head on the concatenation,
    unimodal heads), its forward and fuse."""

    def __init__(self, modalities=MODALITIES[:2], seed=0):
        nn.Module.__init__(self)
        torch.manual_seed(seed)
        self.modalities = list(modalities)
        widths = {"audio": 6, "video": 4, "text": 5}
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(widths[m], 8), nn.Tanh(), nn.Linear(8, 8))
                                       for m in self.modalities})
        self.head = nn.Linear(8 * len(self.modalities), 5)
        self.heads = nn.ModuleDict({m: nn.Linear(8, 5) for m in self.modalities})


def toy_batches(n_batches=4, batch=16):
    g = torch.Generator().manual_seed(1)
    return [{"audio": torch.randn(batch, 6, generator=g), "video": torch.randn(batch, 4, generator=g),
             "text": torch.randn(batch, 5, generator=g), "label": torch.randint(0, 5, (batch,), generator=g)}
            for _ in range(n_batches)]


def released_step(model, optimizer, batch, per_tensor=True, gamma=1.5):
    """The released train_epoch step, written as it runs: one backward per loss recording each
    encoder's gradients, the cosine of the concatenations, 0.5/0.5 or the min-norm weights from the
    summed dot products, the backward of the summed loss, then per encoder parameter
    three_norm = |grad|, new = 2 k0 g_both + 2 k1 g_uni, grad = diff new gamma if diff > 1 else new
    gamma (per_tensor=False: the norms of the whole encoder instead)."""
    ce = nn.functional.cross_entropy
    out = model(batch)
    loss_mm = ce(model.fuse(out), batch["label"])
    losses = {m: ce(out[m][1], batch["label"]) for m in model.modalities}
    named = {m: list(model.encoders[m].named_parameters()) for m in model.modalities}
    both, uni = {}, {}
    for kind, loss in [("both", loss_mm)] + list(losses.items()):
        optimizer.zero_grad()
        loss.backward(retain_graph=True)
        for m in model.modalities:
            if kind in ("both", m):
                (both if kind == "both" else uni)[m] = {n: p.grad.clone() for n, p in named[m]}
    optimizer.zero_grad()
    k = {}
    for m in model.modalities:
        a = torch.cat([g.flatten() for g in both[m].values()])
        b = torch.cat([g.flatten() for g in uni[m].values()])
        if nn.functional.cosine_similarity(a, b, dim=0) > 0:
            k[m] = (0.5, 0.5)
        else:
            v11, v12, v22 = float(a @ a), float(a @ b), float(b @ b)
            c = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else -(v12 - v22) / (v11 + v22 - 2 * v12)
            k[m] = (c, 1 - c)
    (loss_mm + sum(losses.values())).backward()
    for m in model.modalities:
        new = {n: 2 * k[m][0] * both[m][n] + 2 * k[m][1] * uni[m][n] for n, _ in named[m]}
        if per_tensor:
            for n, p in named[m]:
                diff = p.grad.norm() / new[n].norm()
                p.grad = diff * new[n] * gamma if diff > 1 else new[n] * gamma
        else:
            three = torch.cat([p.grad.flatten() for _, p in named[m]]).norm()
            diff = three / torch.cat([g.flatten() for g in new.values()]).norm()
            for n, p in named[m]:
                p.grad = diff * new[n] * gamma if diff > 1 else new[n] * gamma
    optimizer.step()
    return {m: k[m][0] != 0.5 for m in model.modalities}


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)


@pytest.mark.parametrize("variant, modalities", [("official", MODALITIES[:2]), ("paper", MODALITIES[:2]),
                                                 ("official", MODALITIES)])
def test_step_equals_the_released_step(variant, modalities):
    ours, released = Toy(modalities), Toy(modalities)
    opt_ours, opt_released = sgd(ours), sgd(released)
    conflicts = []
    for batch in toy_batches(6):
        stats = script.mmpareto_step(ours, opt_ours, batch, dict(variant=variant, magnitude_scale=1.5))
        released_conflicts = released_step(released, opt_released, batch, per_tensor=variant == "official")
        assert {m: bool(stats[f"{m}/conflict"]) for m in modalities} == released_conflicts
        conflicts += released_conflicts.values()
    assert any(conflicts) and not all(conflicts), conflicts   # both branches exercised
    for (key, a), b in zip(ours.state_dict().items(), released.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)


def test_heads_get_their_own_loss_gradients_unscaled():
    model, batch = Toy(), toy_batches(1)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ce = nn.functional.cross_entropy
    out = model(batch)
    want_head = torch.autograd.grad(ce(model.fuse(out), batch["label"]), model.head.weight)[0]
    want_audio = torch.autograd.grad(ce(out["audio"][1], batch["label"]), model.heads["audio"].weight)[0]
    script.mmpareto_step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch,
                         dict(variant="official", magnitude_scale=1.5))
    torch.testing.assert_close(before["head.weight"] - model.head.weight.detach(), want_head)
    torch.testing.assert_close(before["heads.audio.weight"] - model.heads["audio"].weight.detach(), want_audio)


# ------------------------------------------------------------------------------------------------
# N ranks x B/N == 1 rank x B (in-process gloo group)

def _run_steps(variant, world=1, rank=0):
    model = Toy(MODALITIES)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    logged = []
    for batch in toy_batches():
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        stats = script.mmpareto_step(model, opt, local, dict(variant=variant, magnitude_scale=1.5), world)
        logged.append(torch.stack([stats[f"{m}/{k}"] for m in MODALITIES for k in ("cos_mm_uni", "alpha_mm")]))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, torch.stack(logged)


def _mmpareto_on_rank(world, rank):
    return {variant: _run_steps(variant, world, rank) for variant in VARIANTS}


VARIANTS = ("official", "paper")


@pytest.mark.slow
def test_step_two_ranks_equal_one(tmp_path):
    """Both variants in one 2-process group (one spawn): weights, cosines and weights logged."""
    ddp = run_on_gloo_ranks(_mmpareto_on_rank, tmp_path)[0]
    for variant in VARIANTS:
        single, logged = _run_steps(variant)
        state, ddp_logged = ddp[variant]
        for key, value in single.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=f"{variant}: {key}")
        torch.testing.assert_close(ddp_logged, logged, rtol=1e-5, atol=1e-6)   # computed on global gradients


# ------------------------------------------------------------------------------------------------
# train/mmpareto.py end to end

@pytest.fixture(scope="module")
def av(tmp_path_factory):
    return embedded.generate(tmp_path_factory.mktemp("data"), "av", seed=5, n_train=256, n_val=64, n_test=64)


def args(data, out, *extra):
    return ["--data", str(data), "--out_dir", str(out), "--batch_size", "64", "--epochs", "2", "--log_every", "2",
            "--progress", "false", "--encoders.audio.base_width", "8", "--encoders.video.base_width", "8", *extra]


@pytest.mark.slow
def test_trains_reports_and_resumes_exactly(av, tmp_path):
    """One uninterrupted run (result.json, TensorBoard), and the same run stopped at step 3 (4 steps
    per epoch) and resumed: bit-identical final weights."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script("train/mmpareto.py", args(av, whole, "--variant", "paper"))
    result = json.loads((whole / "result.json").read_text())
    assert set(result["test"]) == set(result["val"]) == {"audio", "video", "fused"}
    assert result["method"] == "MMPareto" and result["variant"] == "paper" and result["magnitude_scale"] == 1.5
    tags = tb_tags(whole)
    for m in ("audio", "video"):
        for kind in ("loss", "acc", "cos_mm_uni", "conflict", "alpha_mm", "magnitude_factor", "grad_norm_mm",
                     "grad_norm_uni"):
            assert f"{m}/{kind}" in tags, (m, kind)
    assert {"fused/loss", "fused/acc", "train/loss", "val_fused/acc"} <= tags
    stopped = run_script("train/mmpareto.py", args(av, split, "--variant", "paper", "--stop_after_steps", "3"))
    assert "stop_after_steps=3 at step 3" in stopped.stdout
    run_script("train/mmpareto.py", args(av, split, "--variant", "paper", "--resume"))
    a, b = final_weights(whole), final_weights(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((split / "result.json").read_text())["test"] == result["test"]


@pytest.mark.parametrize("flag, value, key", [("--variant", "released", "variant"),
                                               ("--modalities", "[audio]", "modalities")])
def test_bad_switch_is_refused_before_compute(av, tmp_path, flag, value, key):
    out = tmp_path / "refused"
    proc = run_script("train/mmpareto.py", args(av, out, flag, value), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("override, key", [(dict(variant="released"), "variant"), (dict(magnitude_scale=0), "magnitude_scale"),
                                           (dict(mixed_precision="fp16"), "mixed_precision"),
                                           (dict(select_on="audio"), "select_on")])
def test_check_config_names_the_key(override, key):
    with pytest.raises(script.ConfigError, match=key):
        script.check_config(dict(config.defaults(script.CONFIG), **override))


# the shapes each converter writes (data_prep/<dataset>.py; CREMA-D prepared with --frames 2, as the
# released loader takes 2 frames) and the embedded flavours' layouts
CONVERTED = {
    "crema_d": {"audio": ("spectrogram", [257, 188], "float32"), "video": ("frames", [2, 3, 224, 224], "uint8")},
    "kinetics_sounds": {"audio": ("spectrogram", [257, 1003], "float32"), "video": ("frames", [3, 3, 224, 224], "uint8")},
} | {flavour: {name: (kind, shape, dtype) for name, kind, shape, dtype, _ in embedded.LAYOUT[flavour]}
     for flavour in ("av", "imgtab", "seq3")}


@pytest.mark.parametrize("dataset", sorted(CONVERTED))
def test_configs_load_and_build_on_the_converted_shapes(dataset):
    from train.config import load_config
    from train.loop import resolve_encoders
    cfg = load_config(script.CONFIG, ["--config", f"train/configs/mmpareto_{dataset}.yaml"])
    script.check_config(cfg)
    meta = {"num_classes": 6, "modalities": {m: {"kind": k, "shape": s, "dtype": d}
                                             for m, (k, s, d) in CONVERTED[dataset].items()}}
    if dataset == "imgtab":   # what the generator writes for its tabular modality
        meta["modalities"]["table"] |= {"continuous": embedded.TABLE_CONTINUOUS,
                                        "categorical": embedded.TABLE_CATEGORICAL}
    modalities = cfg["modalities"] or list(meta["modalities"])
    assert modalities == list(CONVERTED[dataset])
    model = ConcatAndUnimodalHeadsModel(meta, resolve_encoders(cfg, meta, modalities), modalities)
    assert model.head.in_features == sum(e.out_dim for e in model.encoders.values())
    if dataset in ("crema_d", "kinetics_sounds"):
        assert (cfg["optimizer"], cfg["lr"], cfg["batch_size"], cfg["epochs"], cfg["scheduler"]) == ("sgd", 2e-3, 64, 50, "none")
        return
    joint = load_config(script.CONFIG, ["--config", f"train/configs/joint_{dataset}.yaml"])
    for key in ("encoders", "batch_size", "optimizer", "lr", "weight_decay", "epochs"):   # a fair comparison
        assert cfg[key] == joint[key], key
    batch = {m: torch.zeros(2, *s, dtype=getattr(torch, d)) for m, (_, s, d) in CONVERTED[dataset].items()}
    model.eval()
    with torch.no_grad():
        assert model.fuse(model(batch)).shape == (2, 6)
