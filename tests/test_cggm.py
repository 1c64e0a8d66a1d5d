"""CGGM: the step (direction one step late, closed-form F.out gradient, classifiers isolated, global
batch metrics), N ranks == 1 rank, and train/cggm.py end to end on a tiny seq3 set."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_prep import embedded
from models.fusion import CGGMModel
from tests.conftest import run_on_gloo_ranks
from tests.test_train import final_weights, run_script, tb_tags
from methods import modulation
from train import cggm, config

META = {"num_classes": 5, "task": "classification", "modalities": {
    "text": {"kind": "sequence", "shape": [6, 8]}, "audio": {"kind": "sequence", "shape": [5, 4]},
    "vision": {"kind": "sequence", "shape": [4, 6]}}}
STEP_CFG = dict(config.defaults(cggm.CONFIG), grad_clip=0.0)


def toy_model(task="classification", seed=0):
    torch.manual_seed(seed)
    meta = dict(META, num_classes=5 if task == "classification" else 1, task=task)
    enc = {"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.0}
    return CGGMModel(meta, {m: enc for m in META["modalities"]}, d_model=16,
                     fusion={"n_layers": 1, "n_heads": 2, "dropout": 0.0}, head_hidden=16,
                     classifier={"n_heads": 2, "dropout": 0.0})


def optimizers(model, lr=1e-2):
    return (torch.optim.SGD(model.model_parameters(), lr=lr),
            torch.optim.SGD(model.classifiers.parameters(), lr=lr))


def toy_batches(n=3, batch=16, task="classification", seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {m: torch.randn(batch, *s["shape"], generator=g) for m, s in META["modalities"].items()}
        b["label"] = (torch.randint(0, 5, (batch,), generator=g) if task == "classification"
                      else torch.randint(-3, 4, (batch,), generator=g).float())
        out.append(b)
    return out


def fresh_state(model):
    return {"metric_prev": torch.zeros(len(model.modalities), dtype=torch.float64), "direction_prev": None}


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def test_official_direction_reaches_only_fused_out_weight_one_step_late():
    runs = {}
    for direction in (False, True):
        model = toy_model()
        opt, clf_opt = optimizers(model)
        state, per_step = fresh_state(model), []
        for batch in toy_batches(2):
            cggm.cggm_step(model, batch, opt, clf_opt, state, dict(STEP_CFG, direction=direction), "classification")
            per_step.append(grads(model))
        runs[direction] = per_step
    for name, g in runs[False][0].items():      # step 1: no L_gm yet
        assert (g is None and runs[True][0][name] is None) or torch.equal(g, runs[True][0][name]), name
    differ = [n for n, g in runs[False][1].items() if g is not None and not torch.equal(g, runs[True][1][n])]
    assert differ == ["head.out.weight"]


def test_official_direction_gradient_is_the_previous_steps_l_gm():
    model = toy_model()
    opt, clf_opt = optimizers(model)
    state = fresh_state(model)
    b1, b2 = toy_batches(2)
    cggm.cggm_step(model, b1, opt, clf_opt, state, STEP_CFG, "classification")
    c, vec_f, vecs = state["direction_prev"]
    # by hand: L_gm at step 1's weights and coefficients, differentiated w.r.t. F.out's weight
    w = vec_f.clone().requires_grad_(True)
    cos = torch.stack([F.cosine_similarity(v, w, dim=0) for v in vecs])
    (c.abs().sum() - (c * cos).sum()).div(3).backward()
    without = toy_model()
    without.load_state_dict(model.state_dict())
    o2, co2 = optimizers(without)
    s2 = {"metric_prev": state["metric_prev"].clone(), "direction_prev": None}
    cggm.cggm_step(model, b2, opt, clf_opt, state, STEP_CFG, "classification")
    cggm.cggm_step(without, b2, o2, co2, s2, STEP_CFG, "classification")
    extra = model.head.out.weight.grad - without.head.out.weight.grad
    torch.testing.assert_close(extra, STEP_CFG["lambda_gm"] * w.grad.view_as(extra), rtol=1e-5, atol=1e-7)


def hand_coefficients(model, batch, metric_prev):
    """c_i = (S - d_i) / S, d_i = acc_i - prev_i, S = sum d + 1e-8, from the classifiers' batch
    accuracies computed here (not by the code under test)."""
    with torch.no_grad():
        out = model(batch)
    acc = [float((out[m][1].argmax(-1) == batch["label"]).double().mean()) for m in model.modalities]
    d = [a - p for a, p in zip(acc, metric_prev)]
    s = sum(d) + 1e-8
    assert abs(s) > 0.05, "the hand case must not be the degenerate S = 0"
    return [(s - x) / s for x in d]


def test_official_direction_terms_are_unscaled_c_and_the_layer_weights():
    """Official: the L_gm the next step differentiates is built from c_i WITHOUT rho (the same c as the
    encoder multipliers divided by rho) and from the WEIGHTS of F.out and f_i.out as they were at this
    step (not their gradients, not the updated weights)."""
    model = toy_model()
    opt, clf_opt = optimizers(model)
    batch = toy_batches(1)[0]
    c = hand_coefficients(model, batch, [0.0, 0.0, 0.0])
    fused_w = model.head.out.weight.detach().flatten().clone()
    clf_w = torch.stack([model.classifiers[m].out.weight.detach().flatten().clone() for m in model.modalities])
    state = fresh_state(model)
    cggm.cggm_step(model, batch, opt, clf_opt, state, dict(STEP_CFG, rho=1.7), "classification")
    c_stored, vec_f, vecs = state["direction_prev"]
    assert c_stored.tolist() == pytest.approx(c, rel=1e-6)
    torch.testing.assert_close(vec_f, fused_w)
    torch.testing.assert_close(vecs.reshape(clf_w.shape), clf_w)
    assert not torch.equal(model.head.out.weight.detach().flatten(), fused_w)   # the step did move them


def test_paper_direction_loss_uses_rho_c_and_the_layer_gradients():
    """Paper: L_gm = (sum |B_i| - sum B_i cos(vec_i, vec_F)) / M with B_i = rho c_i and vec the
    GRADIENTS of F.out (task loss) and f_i.out (classifier i's loss), all written out here."""
    rho = 1.7
    model = toy_model()
    batch = toy_batches(1)[0]
    c = hand_coefficients(model, batch, [0.0, 0.0, 0.0])
    out = model(batch)
    labels = batch["label"]
    vec_f = torch.autograd.grad(F.cross_entropy(model.fuse(out), labels), model.head.out.weight)[0].flatten()
    cos = [F.cosine_similarity(torch.autograd.grad(F.cross_entropy(out[m][1], labels),
                                                   model.classifiers[m].out.weight)[0].flatten(), vec_f, dim=0)
           for m in model.modalities]
    b = [rho * x for x in c]
    want = (sum(abs(x) for x in b) - sum(x * float(y) for x, y in zip(b, cos))) / 3
    opt, clf_opt = optimizers(model)
    stats = cggm.cggm_step(model, batch, opt, clf_opt, fresh_state(model),
                           dict(STEP_CFG, variant="paper", rho=rho), "classification")
    assert stats["train/lgm"].item() == pytest.approx(want, rel=1e-5)
    assert abs(want - want / rho) > 1e-3   # B_i = c_i would give another value


def test_classifiers_never_send_gradient_to_encoders():
    batch = toy_batches(1)[0]
    model = toy_model()
    out = model(batch)
    sum(F.cross_entropy(logits, batch["label"]) for _, logits in out.values()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (not name.startswith("classifiers.")), name


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_out_weight_gradient_matches_the_closed_form_and_stays_differentiable(task):
    model = toy_model(task)
    batch = toy_batches(1, task=task)[0]
    out = model(batch)
    x = model.fusion({m: h for m, (h, _) in out.items()})
    z = x + model.head.mlp(x)                      # the input of F.out
    logits = model.head.out(z)
    from train.metrics import task_loss
    grad = cggm.out_weight_grad(task_loss(task, logits, batch["label"]), model.head.out.weight, 1)
    if task == "classification":
        dlogits = torch.softmax(logits, -1) - F.one_hot(batch["label"], 5).float()
    else:
        dlogits = torch.sign(logits - batch["label"].reshape(logits.shape))
    torch.testing.assert_close(grad, dlogits.T @ z / logits.shape[0], rtol=1e-5, atol=1e-7)
    assert grad.requires_grad   # the paper's L_gm reaches the encoders through it


def test_batch_metric_counts_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    hits, count = cggm.batch_metric_counts("classification", logits, torch.tensor([0, 0, 0]))
    assert (hits.item(), count.item()) == (2, 3)
    pred, y = torch.tensor([[0.5], [-1.0], [2.0], [0.3]]), torch.tensor([1.0, 0.0, -2.0, 0.4])
    # official (released train_eval_senti): every sample, y = 0 is "not positive" (pred -1.0 agrees)
    hits, count = cggm.batch_metric_counts("regression", pred, y)
    assert (hits.item(), count.item()) == (3, 4)
    hits, count = cggm.batch_metric_counts("regression", pred, y, zero_labels_count=False)   # paper: Acc-2
    assert (hits.item(), count.item()) == (2, 3)


@pytest.mark.parametrize("variant, zero_labels_count", [("official", True), ("paper", False)])
def test_regression_step_metric_per_variant(variant, zero_labels_count):
    """The metric a step carries into c_i on a batch with zero labels: official the released
    all-sample sign accuracy (train_eval_senti), paper the non-zero Acc-2 convention."""
    batch = toy_batches(1, task="regression")[0]
    assert (batch["label"] == 0).any()
    model = toy_model("regression")
    opt, clf_opt = optimizers(model)
    state = fresh_state(model)
    with torch.no_grad():
        out = model(batch)
    expected = []
    for m in model.modalities:
        pred, y = out[m][1].reshape(-1), batch["label"]
        agree = (pred > 0) == (y > 0)
        expected.append(float(agree.double().mean() if zero_labels_count else agree[y != 0].double().mean()))
    cggm.cggm_step(model, batch, opt, clf_opt, state, dict(STEP_CFG, variant=variant), "regression")
    assert state["metric_prev"].tolist() == pytest.approx(expected, abs=1e-12)


def test_segmentation_batch_dice_uses_the_released_eps_in_official():
    """BraTS batch metric (feeds c_i): official the released training Dice, eps 1e-3
    ((2|A∩G| + 2eps) / (|A| + |G| + 2eps), src/eval_metrics.py Dice), paper the exact Dice (eps 0).
    Slice 0: an empty prediction against a one-pixel ET target (WT, TC, ET each |A|=0, |G|=1):
    0 exactly, 2eps/(1 + 2eps) with eps; slice 1: empty prediction, empty target: 1 either way."""
    labels = torch.tensor([[[3, 0]], [[0, 0]]])                     # (B=2, H=1, W=2)
    logits = F.one_hot(torch.zeros(2, 1, 2, dtype=torch.long), 4).permute(0, 3, 1, 2).float()  # predicts 0
    eps = 1e-3
    assert cggm.RELEASED_DICE_EPS == eps
    hits, count = cggm.batch_metric_counts("segmentation", logits, labels)             # official default
    assert count.item() == 2 and hits.item() == pytest.approx(2 * eps / (1 + 2 * eps) + 1.0, abs=1e-15)
    hits, count = cggm.batch_metric_counts("segmentation", logits, labels, dice_eps=0.0)   # paper
    assert count.item() == 2 and hits.item() == 1.0
    rows = cggm.batch_metric_counts_all("segmentation", [logits, logits], labels, True)
    assert rows[:, 0].tolist() == pytest.approx([2 * eps / (1 + 2 * eps) + 1.0] * 2, abs=1e-15)


@pytest.mark.parametrize("variant, dice_eps", [("official", 1e-3), ("paper", 0.0)])
def test_step_passes_the_variants_dice_eps(variant, dice_eps, monkeypatch):
    seen = []
    real = cggm.batch_metric_counts_all

    def spy(task, logits, labels, zero_labels_count=True, dice_eps=cggm.RELEASED_DICE_EPS):
        seen.append(dice_eps)
        return real(task, logits, labels, zero_labels_count, dice_eps)

    monkeypatch.setattr(cggm, "batch_metric_counts_all", spy)
    model = toy_model()
    opt, clf_opt = optimizers(model)
    cggm.cggm_step(model, toy_batches(1)[0], opt, clf_opt, fresh_state(model), dict(STEP_CFG, variant=variant),
                   "classification")
    assert seen == [dice_eps]


def test_modulation_scales_encoder_cores_by_rho_c():
    batch = toy_batches(1)[0]
    runs = {}
    for mod in (False, True):
        model = toy_model()
        opt, clf_opt = optimizers(model)
        state = fresh_state(model)
        stats = cggm.cggm_step(model, batch, opt, clf_opt, state, dict(STEP_CFG, modulation=mod, direction=False),
                               "classification")
        runs[mod] = (grads(model), stats)
    (plain, _), (scaled, stats) = runs[False], runs[True]
    for name, g in plain.items():
        m = name.split(".")[1] if name.startswith("encoders.") else None
        if m is not None and ".core." in name:
            torch.testing.assert_close(scaled[name], g * 1.3 * stats[f"{m}/coeff"], msg=name)
        elif g is not None:
            assert torch.equal(scaled[name], g), name   # input projections, fusion, head, classifiers
    coeffs = torch.stack([stats[f"{m}/coeff"] for m in META["modalities"]])
    assert abs(coeffs.sum().item() - 2.0) < 1e-5       # sum c_i = M - 1


def test_coeff_clip_bounds_the_multipliers():
    model = toy_model()
    opt, clf_opt = optimizers(model)
    state = fresh_state(model)
    state["metric_prev"] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)   # large, mixed-sign d
    stats = cggm.cggm_step(model, toy_batches(1)[0], opt, clf_opt, state, dict(STEP_CFG, coeff_clip=[0.0, 2.0]),
                           "classification")
    assert all(0.0 <= stats[f"{m}/coeff"].item() <= 2.0 for m in META["modalities"])


# ------------------------------------------------------------------------------------------------
# progress_estimate ema | window (not released): the estimators, c_i >= 0, the step

def test_rectified_coefficients_by_hand():
    c, none = modulation.rectified_balance_coefficients(torch.tensor([0.03, 0.01, -0.02], dtype=torch.float64))
    # d+ = [0.03, 0.01, 0], S = 0.04: c_i = (S - d+_i)/S; the falling modality counts as not progressing
    torch.testing.assert_close(c, torch.tensor([0.25, 0.75, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)
    assert not none
    c, none = modulation.rectified_balance_coefficients(torch.tensor([-0.1, 0.0, -0.2], dtype=torch.float64))
    assert c.tolist() == [1.0, 1.0, 1.0] and none   # nothing progresses: no modality is held back


def test_ema_progress_by_hand():
    average, estimates = torch.zeros(2, dtype=torch.float64), []
    changes = [[0.2, 0.0], [-0.1, 0.1], [0.4, 0.1]]
    for count, change in enumerate(changes, 1):
        average, estimate = modulation.ema_progress(average, torch.tensor(change, dtype=torch.float64), 0.5, count)
        estimates.append(estimate.tolist())
    # bias-corrected: weights (1 - b) b^k / (1 - b^count) on the newest-first changes
    assert estimates[0] == pytest.approx([0.2, 0.0])
    assert estimates[1] == pytest.approx([(0.5 * -0.1 + 0.25 * 0.2) / 0.75, (0.5 * 0.1) / 0.75])
    assert estimates[2] == pytest.approx([(0.5 * 0.4 + 0.25 * -0.1 + 0.125 * 0.2) / 0.875,
                                          (0.5 * 0.1 + 0.25 * 0.1) / 0.875])
    with pytest.raises(ValueError, match="decay"):
        modulation.ema_progress(average, average, 1.0, 1)


def test_window_progress_by_hand():
    history = torch.tensor([[9.0, 9.0], [0.1, 0.5], [0.2, 0.5], [0.3, 0.4], [0.6, 0.4], [0.4, 0.3]],
                           dtype=torch.float64)   # the oldest row is not yet real: filled 5 -> h = 2
    got = modulation.window_progress(history, 5)
    expected = [((0.6 + 0.4) / 2 - (0.2 + 0.3) / 2) / 2, ((0.4 + 0.3) / 2 - (0.5 + 0.4) / 2) / 2]
    assert got.tolist() == pytest.approx(expected)
    assert modulation.window_progress(history, 1).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="filled"):
        modulation.window_progress(history, 7)


def test_smoothed_progress_noise_is_below_the_gain():
    """The reason for the variant, at the audio-visual set's numbers: batch accuracies of 128 samples
    near 0.5 rising by 4e-4 a step. The released d_i has a standard deviation ~150x the gain; the
    default ema and window estimates track the gain with a standard deviation below half of it."""
    g = torch.Generator().manual_seed(0)
    steps, gain = 1500, 4e-4
    acc = torch.binomial(torch.full((steps,), 128.0, dtype=torch.float64),
                         0.3 + gain * torch.arange(steps, dtype=torch.float64), generator=g) / 128
    defaults = config.defaults(cggm.CONFIG)
    average, history, ema, window = torch.zeros(1, dtype=torch.float64), torch.zeros(2 * defaults["progress_window"], 1,
                                                                                      dtype=torch.float64), [], []
    for t in range(1, steps):
        average, estimate = modulation.ema_progress(average, acc[t:t + 1] - acc[t - 1:t], defaults["progress_decay"], t)
        history = torch.cat([history[1:], acc[t:t + 1, None]])
        ema.append(estimate.item())
        window.append(modulation.window_progress(history, min(t, history.shape[0])).item())
    assert (acc[1:] - acc[:-1]).std().item() > 100 * gain
    for estimates in (torch.tensor(ema[500:]), torch.tensor(window[500:])):
        assert abs(estimates.mean().item() - gain) < 0.1 * gain and estimates.std().item() < 0.55 * gain


@pytest.mark.parametrize("estimate, extra", [("ema", dict(progress_decay=0.0)), ("window", dict(progress_window=1))])
def test_shortest_smoothing_is_the_released_change_rectified(estimate, extra):
    """ema with decay 0 and window 1 reduce to the released d_i (this batch's metric minus the
    previous one) from the second step on, with c_i from max(d_i, 0): in (0, 1], never negative."""
    model = toy_model()
    opt, clf_opt = optimizers(model)
    state, cfg = fresh_state(model), dict(STEP_CFG, progress_estimate=estimate, **extra)
    names, previous = list(META["modalities"]), None
    for i, batch in enumerate(toy_batches(4)):
        stats = cggm.cggm_step(model, batch, opt, clf_opt, state, cfg, "classification")
        metric = torch.stack([stats[f"{m}/clf_metric"] for m in names]).double()
        coeffs = torch.stack([stats[f"{m}/coeff"] for m in names])
        progress = torch.stack([stats[f"{m}/progress"] for m in names]).double()
        if i == 0:   # no previous metric: no progress, every c_i = 1
            assert coeffs.tolist() == [1.0, 1.0, 1.0] and stats["train/coeff_degenerate"].item() == 1.0
        else:
            torch.testing.assert_close(progress, metric - previous)
            torch.testing.assert_close(coeffs, modulation.rectified_balance_coefficients(progress)[0].float())
        assert ((coeffs > 0) & (coeffs <= 1)).all()
        previous = metric


# ------------------------------------------------------------------------------------------------
# N ranks x B/N == 1 rank x B

def _run(world, rank, variant, task, estimate="batch"):
    model = toy_model(task)
    opt, clf_opt = optimizers(model)
    state = fresh_state(model)
    cfg = dict(STEP_CFG, variant=variant, grad_clip=0.8, progress_estimate=estimate, progress_window=1)
    for batch in toy_batches(3, task=task):
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        cggm.cggm_step(model, local, opt, clf_opt, state, cfg, task, world)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant, task, estimate", [
    ("official", "classification", "batch"), ("paper", "classification", "batch"), ("paper", "regression", "batch"),
    ("official", "classification", "window")])   # window 1: the estimator acts from the second step
@pytest.mark.slow
def test_cggm_step_two_ranks_equal_one(tmp_path, variant, task, estimate):
    single = _run(1, 0, variant, task, estimate)
    ddp = run_on_gloo_ranks(_run, tmp_path, variant, task, estimate)[0]
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------
# train/cggm.py end to end

@pytest.fixture(scope="module")
def seq3(tmp_path_factory):
    return embedded.generate(tmp_path_factory.mktemp("data"), "seq3", seed=5, n_train=256, n_val=64, n_test=64)


def cggm_args(data, out, *extra):
    small = []
    for m in ("text", "audio", "vision"):
        small += [f"--encoders.{m}.n_layers", "1"]
    return ["--data", str(data), "--out_dir", str(out), "--epochs", "2", "--batch_size", "64", "--log_every", "2",
            "--d_model", "32", "--progress", "false", *small, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_cggm_trains_and_resumes_exactly(seq3, tmp_path, variant):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script("train/cggm.py", cggm_args(seq3, whole, "--variant", variant))
    run_script("train/cggm.py", cggm_args(seq3, split, "--variant", variant, "--stop_after_steps", "5"))
    run_script("train/cggm.py", cggm_args(seq3, split, "--variant", variant, "--resume"))
    a, b = final_weights(whole), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    result = json.loads((whole / "result.json").read_text())
    assert set(result["test"]) == {"text", "audio", "vision", "fused"}
    assert {"text/coeff", "vision/coeff", "train/lgm", "train/coeff_degenerate", "audio/clf_metric",
            "audio/grad_norm_core", "audio/grad_norm_core_clipped", "val_fused/acc"} <= tb_tags(whole)


@pytest.mark.slow
@pytest.mark.parametrize("estimate", ["ema", "window"])
def test_progress_estimate_trains_and_resumes_exactly(seq3, tmp_path, estimate):
    """The estimator's state (batches seen; the average or the window of metrics) is checkpointed:
    stopping at step 5 of 8 and resuming gives the uninterrupted run's weights (window 2: the
    window is full when the run stops)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = ("--progress_estimate", estimate, "--progress_window", "2", "--log_every", "1")
    run_script("train/cggm.py", cggm_args(seq3, whole, *extra))
    run_script("train/cggm.py", cggm_args(seq3, split, *extra, "--stop_after_steps", "5"))
    run_script("train/cggm.py", cggm_args(seq3, split, *extra, "--resume"))
    a, b = final_weights(whole), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((whole / "result.json").read_text())["progress_estimate"] == estimate
    assert {"text/progress", "audio/progress", "vision/progress", "vision/coeff"} <= tb_tags(whole)


@pytest.mark.slow
def test_switches_are_recorded(seq3, tmp_path):
    out = tmp_path / "magnitude_only"
    run_script("train/cggm.py", cggm_args(seq3, out, "--direction", "false", "--coeff_clip", "[0.0, 3.0]",
                                          "--scheduler", "plateau", "--plateau_patience", "0",
                                          "--epochs", "1"))
    result = json.loads((out / "result.json").read_text())
    assert result["direction"] is False and result["modulation"] is True and result["coeff_clip"] == [0.0, 3.0]


@pytest.mark.parametrize("override, message", [
    (dict(coeff_clip=[2.0, 1.0]), "coeff_clip"),
    (dict(variant="both"), "variant='both'"),
    (dict(rho=-1.0), "rho"),
    (dict(progress_estimate="epoch"), "progress_estimate='epoch'"),
    (dict(progress_decay=1.0), "progress_decay=1.0"),
    (dict(progress_window=0), "progress_window"),
])
def test_bad_config_is_refused(override, message):
    with pytest.raises(cggm.ConfigError, match=message.replace("'", ".").replace("[", r"\[")):
        cggm.check_config(dict(config.defaults(cggm.CONFIG), **override))


@pytest.fixture(scope="module")
def tiny_brats(tmp_path_factory):
    """Four MRI-like modalities, 32x32 slices, a bright square tumour whose core/enhancing parts
    the modalities show with different contrast (enough to learn something in a few steps)."""
    from data_prep.shards import write_dataset
    rng = np.random.default_rng(0)
    mods = ["flair", "t1ce", "t1", "t2"]
    splits = {}
    next_id = 0
    for split, n in (("train", 32), ("val", 8), ("test", 8)):
        mask = np.zeros((n, 32, 32), np.uint8)
        for i in range(n):
            y, x = rng.integers(4, 20, 2)
            mask[i, y:y + 10, x:x + 10] = 2
            mask[i, y + 2:y + 8, x + 2:x + 8] = 1
            mask[i, y + 4:y + 6, x + 4:x + 6] = 3
        arrays = {m: (rng.standard_normal((n, 1, 32, 32)) + (k + 1) * (mask[:, None] > k % 3)).astype(np.float32)
                  for k, m in enumerate(mods)}
        arrays["label"] = mask
        arrays["sample_id"] = np.arange(next_id, next_id + n)
        next_id += n
        splits[split] = arrays
    spec = {m: {"kind": "image", "shape": [1, 32, 32], "dtype": "float32"} for m in mods}
    return write_dataset(tmp_path_factory.mktemp("data"), "tiny_brats", "segmentation", 4, spec, splits,
                         label_shape=[32, 32])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_cggm_segmentation_trains_and_reports_dice(tiny_brats, tmp_path, variant):
    out = tmp_path / variant
    seg = ["--segmentation.block", "basic", "--segmentation.layers", "[1, 1, 1, 1]", "--segmentation.base_width", "4",
           "--segmentation.multi_grid", "[1]", "--segmentation.aspp_rates", "[1, 2]", "--segmentation.aspp_channels", "8",
           "--segmentation.low_channels", "4", "--segmentation.decoder_channels", "8"]
    run_script("train/cggm.py", ["--data", str(tiny_brats), "--out_dir", str(out), "--epochs", "2", "--batch_size", "8",
                                 "--log_every", "2", "--progress", "false", "--variant", variant, "--optimizer", "sgd",
                                 "--lr", "0.01", "--scheduler", "warmup_cosine", "--warmup_epochs", "1",
                                 "--warmup_start_lr", "0.001", "--min_lr", "0.001", *seg])
    result = json.loads((out / "result.json").read_text())
    assert set(result["test"]) == {"flair", "t1ce", "t1", "t2", "fused"}
    for metrics in result["test"].values():
        assert {"dice_wt", "dice_tc", "dice_et", "dice_mean"} <= set(metrics)
        assert 0.0 <= metrics["dice_mean"] <= 1.0
    assert "loss" in result["val"]["fused"]
    assert {"flair/coeff", "train/lgm", "flair/clf_metric"} <= tb_tags(out)


# the shapes each converter writes (data_prep/<dataset>.py) and the task
CONVERTED = {
    "mosi": ("regression", 1, {"text": [50, 300], "audio": [50, 5], "vision": [50, 20]}),
    "iemocap": ("classification", 4, {"text": [22, 1024], "audio": [350, 130], "vision": [50, 342]}),
    "food101": ("classification", 101, {"image": [197, 768], "text": [50, 768]}),
}


@pytest.mark.parametrize("config", ["mosi", "mosi_paper", "iemocap", "iemocap_paper", "food101", "food101_paper", "brats"])
def test_dataset_configs_load_and_build(config):
    from models.segmentation import check_seg_config
    from train.config import load_config
    cfg = load_config(cggm.CONFIG, ["--config", f"train/configs/cggm_{config}.yaml"])
    cggm.check_config(cfg)
    dataset = config.split("_")[0]
    if dataset == "brats":
        check_seg_config(cfg["segmentation"])
        assert cfg["modalities"] == ["flair", "t1ce", "t1", "t2"]
        return
    task, classes, shapes = CONVERTED[dataset]
    meta = {"num_classes": classes, "task": task,
            "modalities": {m: {"kind": "sequence", "shape": s, "dtype": "float32"} for m, s in shapes.items()}}
    assert cfg["modalities"] == list(shapes)
    model = CGGMModel(meta, cfg["encoders"], cfg["modalities"], cfg["d_model"], cfg["fusion"], cfg["head_hidden"],
                      cfg["head_dropout"], cfg["classifier"])
    assert model.head.out.out_features == classes
    assert all(c.out.weight.shape == model.head.out.weight.shape for c in model.classifiers.values())


def test_logged_core_gradient_norms_are_the_scaled_and_clipped_ones():
    """`<m>/grad_norm_core` is the encoder core's gradient norm after rho*c_i; `_clipped` after the
    global clip: their ratio is the clip factor, the same for every modality, and <= 1."""
    model = toy_model()
    opt, clf_opt = optimizers(model)
    state = fresh_state(model)
    stats = [cggm.cggm_step(model, b, opt, clf_opt, state, dict(STEP_CFG, grad_clip=0.05), "classification")
             for b in toy_batches(2)][-1]
    ratios = [float(stats[f"{m}/grad_norm_core_clipped"] / stats[f"{m}/grad_norm_core"]) for m in model.modalities]
    assert all(r == pytest.approx(ratios[0], rel=1e-5) for r in ratios) and ratios[0] < 1
    unclipped = cggm.cggm_step(model, toy_batches(3)[2], opt, clf_opt, state, STEP_CFG, "classification")
    for m in model.modalities:   # grad_clip 0: nothing clipped; the norm is that of the scaled core gradients
        assert float(unclipped[f"{m}/grad_norm_core_clipped"]) == float(unclipped[f"{m}/grad_norm_core"])
        core = [p.grad for p in cggm.core_parameters(model.encoders[m]) if p.grad is not None]
        assert float(unclipped[f"{m}/grad_norm_core"]) == pytest.approx(
            float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in core]))), rel=1e-5)
