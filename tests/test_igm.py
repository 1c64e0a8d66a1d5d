"""IGM: the step (released SAM, Foret SAM, T), N ranks == 1 rank, and train/igm.py end to end on a
tiny embedded audio-visual set (stage schedule with restarts, switches, exact resume)."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from data_prep import embedded
from methods import flat_sam
from models.heads import IGMHead
from tests.conftest import run_on_gloo_ranks
from tests.test_train import final_weights, run_script, tb_tags
from train import config, igm

STEP_CFG = dict(variant="official", mixup_alpha=1.0, mixup_alpha_by_modality={}, sam=True,
                sam_impl="reweighted", sam_weight=0.3, rho=1e-10)


class Toy(nn.Module):
    """BatchNorm-free stand-in with IGMModel's layout (encoders[m], heads[m] = IGMHead)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoders = nn.ModuleDict({"audio": nn.Sequential(nn.Linear(6, 8), nn.Tanh()),
                                       "video": nn.Sequential(nn.Linear(4, 8), nn.Tanh())})
        self.heads = nn.ModuleDict({m: IGMHead(8, 5, (16, 8)) for m in ("audio", "video")})


def toy_batches(n_batches=3, batch=16):
    g = torch.Generator().manual_seed(1)
    return [{"audio": torch.randn(batch, 6, generator=g), "video": torch.randn(batch, 4, generator=g),
             "label": torch.randint(0, 5, (batch,), generator=g)} for _ in range(n_batches)]


def toy_projections(layers=(0, 1, 2), seed=2):
    g = torch.Generator().manual_seed(seed)
    dims = {0: 8, 1: 16, 2: 8}
    out = {}
    for i in layers:
        a = torch.randn(dims[i], 3, generator=g)
        out[i] = flat_sam.flat_projection(a @ a.T, 0.4)
    return out


def sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# The step

def test_released_sam_equals_one_reweighted_backward_at_released_rho():
    batch = toy_batches(1)[0]
    results = {}
    for impl, rho in (("reweighted", 1e-10), ("exact", 1e-10), ("exact", 0.5)):
        model = Toy()
        torch.manual_seed(3)   # same lambda and permutation in each run
        igm.igm_step(model, "video", batch, sgd(model), {}, dict(STEP_CFG, sam_impl=impl, rho=rho))
        results[(impl, rho)] = params_of(model)
    before = params_of(Toy())
    for key, value in results[("reweighted", 1e-10)].items():
        assert not torch.equal(value, before[key]) or key.startswith(("encoders.audio", "heads.audio")), key
        torch.testing.assert_close(results[("exact", 1e-10)][key], value, rtol=1e-6, atol=1e-7, msg=key)
    # the exact path really moves the parameters: at a large rho it no longer agrees
    diff = max((results[("exact", 0.5)][k] - v).abs().max().item() for k, v in results[("reweighted", 1e-10)].items())
    assert diff > 1e-4
    # and the audio modality was not touched by a video update
    for key, value in results[("reweighted", 1e-10)].items():
        if key.startswith(("encoders.audio", "heads.audio")):
            assert torch.equal(value, before[key])


def released_official_sam_step(model, m, batch, opt, rho, w=0.3):
    """The released official step written as the released code runs it: mixup, L_ori, its gradient,
    `param.data = param.data + rho g/|g|` per tensor, L_sam of the head on the same features, ONE
    backward of (1 - w) L_ori + w L_sam, step."""
    encoder, head = model.encoders[m], model.heads[m]
    x, y = batch[m], batch["label"]
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(y.shape[0])
    x = lam * x + (1 - lam) * x[perm]
    opt.zero_grad()
    features = encoder(x)
    logits = head(features)
    ce = nn.functional.cross_entropy
    loss_ori = lam * ce(logits, y) + (1 - lam) * ce(logits, y[perm])
    loss_ori.backward(retain_graph=True)
    for p in list(encoder.parameters()) + list(head.parameters()):
        if p.grad is not None:
            p.data = p.data + rho * p.grad / (p.grad.norm() + 1e-12)
    opt.zero_grad()
    loss_sam = ce(head(features), y)
    ((1 - w) * loss_ori + w * loss_sam).backward()
    opt.step()


class ConvToy(Toy):
    """Toy whose video encoder has a convolution after a Linear: the convolution's backward reads
    the parameter itself, so after the released move the gradient reaching the Linear below it was
    taken at theta + eps (a Linear's own backward reads a view saved at theta)."""

    def __init__(self, seed=0):
        super().__init__(seed)
        torch.manual_seed(seed + 1)
        self.encoders["video"] = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Unflatten(1, (1, 4)),
                                               nn.Conv1d(1, 4, 3), nn.Tanh(), nn.Flatten())


@pytest.mark.parametrize("rho", [1e-2, 0.5])
def test_exact_sam_is_the_released_procedure(rho):
    """`sam_impl: exact` is the released procedure, at a rho where the move is visible (not only
    at the released 1e-10): L_ori's backward runs after the move, through the weights each layer
    kept."""
    batch = toy_batches(1)[0]
    ours, released = ConvToy(), ConvToy()
    torch.manual_seed(3)
    igm.igm_step(ours, "video", batch, sgd(ours), {}, dict(STEP_CFG, sam_impl="exact", rho=rho))
    torch.manual_seed(3)
    released_official_sam_step(released, "video", batch, sgd(released), rho)
    for (key, a), b in zip(params_of(ours).items(), params_of(released).values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)


def test_reweighted_loss_is_the_documented_formula():
    model, batch = Toy(), toy_batches(1)[0]
    torch.manual_seed(3)
    lam = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(16)
    x = flat_sam.mix_inputs(batch["video"], lam, perm)
    logits = model.heads["video"](model.encoders["video"](x))
    ce = nn.functional.cross_entropy
    want = ((0.3 + 0.7 * lam) * ce(logits, batch["label"], reduction="none")
            + 0.7 * (1 - lam) * ce(logits, batch["label"][perm], reduction="none")).mean()
    fresh = Toy()
    torch.manual_seed(3)
    stats = igm.igm_step(fresh, "video", batch, sgd(fresh), {}, STEP_CFG)
    torch.testing.assert_close(stats["video/loss"], want.detach())


def test_paper_sam_matches_a_hand_computed_two_pass_step():
    batch, rho, lr = toy_batches(1)[0], 0.05, 0.1
    model = Toy()
    igm.igm_step(model, "audio", batch, sgd(model, lr), {},
                 dict(STEP_CFG, variant="paper", mixup_alpha=0.0, rho=rho))
    ref = Toy()
    params = list(ref.encoders["audio"].parameters()) + list(ref.heads["audio"].parameters())
    ce = nn.functional.cross_entropy

    def loss():
        return ce(ref.heads["audio"](ref.encoders["audio"](batch["audio"])), batch["label"])
    g = torch.autograd.grad(loss(), params)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(rho * t / norm)
    g_sam = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        for p, t, t_sam in zip(params, g, g_sam):
            p.sub_(rho * t / norm)         # restore theta, then the SGD step with the SAM gradient
            p.sub_(lr * t_sam)
    got = params_of(model)
    for key, value in params_of(ref).items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-7, msg=key)
    # SAM changes the step (the test would pass trivially if the second pass were skipped)
    plain = Toy()
    igm.igm_step(plain, "audio", batch, sgd(plain, lr), {}, dict(STEP_CFG, variant="paper", mixup_alpha=0.0, sam=False))
    assert max((params_of(plain)[k] - v).abs().max().item() for k, v in got.items()) > 1e-6


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_projection_multiplies_head_weight_gradients_by_T(variant):
    batch, lr = toy_batches(1)[0], 0.1
    T = toy_projections(layers=(0, 2))
    cfg = dict(STEP_CFG, variant=variant, mixup_alpha=0.0, sam=False)
    model, plain = Toy(), Toy()
    before = params_of(model)
    igm.igm_step(model, "video", batch, sgd(model, lr), T, cfg)
    igm.igm_step(plain, "video", batch, sgd(plain, lr), {}, cfg)
    after, after_plain = params_of(model), params_of(plain)
    for key in before:
        grad = (before[key] - after_plain[key]) / lr
        layer = next((i for i in T if key == f"heads.video.linears.{i}.weight"), None)
        want = grad if layer is None else grad @ T[layer]
        torch.testing.assert_close((before[key] - after[key]) / lr, want, rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(after["heads.video.linears.0.weight"], after_plain["heads.video.linears.0.weight"])


def test_orthogonal_projector_removes_the_previous_inputs_span():
    """projector: orthogonal, hand case: one batch mean r of the previous modality's layer-0 input
    (alpha = 0.1 at b = 0): P = I - r r^T / (0.1 + r.r); the projected weight gradient keeps its
    component orthogonal to r and keeps only 0.1 / (0.1 + r.r) of the one along r."""
    r = torch.randn(8, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    P = igm.orthogonal_projections({0: r[None]})[0]
    want = torch.eye(8, dtype=torch.float64) - torch.outer(r, r) / (0.1 + r @ r)
    torch.testing.assert_close(P.double(), want, rtol=1e-6, atol=1e-6)
    batch, lr = toy_batches(1)[0], 0.1
    cfg = dict(STEP_CFG, mixup_alpha=0.0, sam=False)
    model, plain = Toy(), Toy()
    before = params_of(model)["heads.video.linears.0.weight"]
    igm.igm_step(model, "video", batch, sgd(model, lr), {0: P}, cfg)
    igm.igm_step(plain, "video", batch, sgd(plain, lr), {}, cfg)
    got = (before - params_of(model)["heads.video.linears.0.weight"]).double() / lr
    grad = (before - params_of(plain)["heads.video.linears.0.weight"]).double() / lr
    unit = r / r.norm()
    along_got, along = got @ unit, grad @ unit
    torch.testing.assert_close(along_got, along * 0.1 / (0.1 + r @ r), rtol=1e-3, atol=1e-5)
    assert along.abs().max() > 1e-3   # there was something to remove
    torch.testing.assert_close(got - torch.outer(along_got, unit), grad - torch.outer(along, unit), rtol=1e-3, atol=1e-5)


def written_out_T(Y, tau):
    """T = V diag(exp(-tau (lam - lam_min) / (lam_max - lam_min))) V^T from eigh(Y), written out."""
    lam, V = torch.linalg.eigh(Y.double())
    return V @ torch.diag(torch.exp(-tau * (lam - lam[0]) / (lam[-1] - lam[0]))) @ V.T


def head_input_means(model, m, batches):
    """{layer: (n_batches, d)}: the batch mean of the input of each Linear of H_m, eval mode, no grad."""
    model.eval()
    with torch.no_grad():
        inputs = [model.heads[m](model.encoders[m](b[m]), return_inputs=True)[1] for b in batches]
    model.train()
    return {i: torch.stack([a[i].double().mean(0) for a in inputs]) for i in range(3)}


def fake_ctx(cfg, **fields):
    """The part of loop.Context the IGM hooks read, for a one-process CPU run."""
    import contextlib
    from types import SimpleNamespace
    return SimpleNamespace(cfg=cfg, modalities=["audio", "video"], log=lambda scalars: None, print=lambda line: None,
                           accelerator=SimpleNamespace(wait_for_everyone=lambda: None),
                           train_sampler=SimpleNamespace(set_epoch=lambda epoch: None), device=torch.device("cpu"),
                           world=1, autocast=contextlib.nullcontext, **fields)


def test_official_stage_start_builds_T_from_the_previous_modalitys_uncentred_moments(tmp_path):
    """Official, at the end of stage 0 (audio): the video stage's T of each head layer comes from one
    pass over the training loader through the AUDIO head: Y = sum_b outer(mean_b, mean_b) (uncentred),
    T written out. T from the video head's own inputs, or from centred moments, would differ."""
    from types import SimpleNamespace
    cfg = dict(config.defaults(igm.CONFIG), stage_epochs=[1, 1], tau=0.4)
    model, batches = Toy(), toy_batches(3)
    state = dict(stage=0, T={"audio": {}, "video": {}}, Y={"audio": {}, "video": {}}, stage_grad=None,
                 prev_stage_grad=None, prev_turn_grad=None)
    setup = SimpleNamespace(model=model, optimizer=None, scheduler=None, state=state)
    igm.next_stage(setup, fake_ctx(cfg, position={"epoch": 1}, run_dir=tmp_path, loaders={"train": batches}), None)
    assert state["stage"] == 1 and not state["T"]["audio"] and sorted(state["T"]["video"]) == [0, 1, 2]
    audio, video = head_input_means(model, "audio", batches), head_input_means(model, "video", batches)
    for i in range(3):
        want = written_out_T(audio[i].T @ audio[i], 0.4)
        torch.testing.assert_close(state["T"]["video"][i].double(), want, rtol=1e-4, atol=1e-5)
        centred = audio[i] - audio[i].mean(0)
        assert (written_out_T(video[i].T @ video[i], 0.4) - want).abs().max() > 1e-2
        assert (written_out_T(centred.T @ centred, 0.4) - want).abs().max() > 1e-2


def test_paper_refresh_builds_each_T_from_the_modality_before_it():
    """Paper, every refresh_every steps: T of modality j from the moments Y of modality j - 1 (cyclic:
    audio's from video's), and not at other steps."""
    from types import SimpleNamespace
    g = torch.Generator().manual_seed(5)

    def psd(d):
        a = torch.randn(d, 3, generator=g, dtype=torch.float64)
        return a @ a.T
    Y = {m: {0: psd(8), 1: psd(16), 2: psd(8)} for m in ("audio", "video")}
    cfg = dict(config.defaults(igm.CONFIG), variant="paper", refresh_every=5, tau=0.4)
    setup = SimpleNamespace(model=Toy(), state=dict(T={"audio": {}, "video": {}}, Y=Y))
    igm.refresh_paper_projections(setup, fake_ctx(cfg, position={"step": 7}))
    assert setup.state["T"] == {"audio": {}, "video": {}}
    igm.refresh_paper_projections(setup, fake_ctx(cfg, position={"step": 10}))
    for m, previous in (("video", "audio"), ("audio", "video")):
        for i in range(3):
            want = written_out_T(Y[previous][i], 0.4)
            torch.testing.assert_close(setup.state["T"][m][i].double(), want, rtol=1e-5, atol=1e-6)
            assert (written_out_T(Y[m][i], 0.4) - want).abs().max() > 1e-2


def test_paper_moments_are_an_exponential_moving_average():
    """Paper step: Y_m <- moment_decay Y_m + outer(mean, mean) of each head layer's input in modality
    m's training forward (recorded here by forward hooks of our own), over two steps."""
    from types import SimpleNamespace
    cfg = dict(config.defaults(igm.CONFIG), variant="paper", moment_decay=0.5, sam=False, mixup_alpha=0.0)
    model = Toy()
    seen = {i: [] for i in range(3)}
    for i in range(3):
        model.heads["audio"].linears[i].register_forward_pre_hook(
            lambda module, args, i=i: seen[i].append(args[0].detach().double().mean(0)))
    state = dict(stage=0, T={"audio": {}, "video": {}}, Y={"audio": {}, "video": {}}, prev_turn_grad=None)
    setup = SimpleNamespace(model=model, optimizer=sgd(model), state=state)
    for batch in toy_batches(2):
        igm.step(setup, batch, fake_ctx(cfg))
    for i in range(3):
        first, second = seen[i]
        want = 0.5 * torch.outer(first, first) + torch.outer(second, second)
        torch.testing.assert_close(state["Y"]["audio"][i], want, rtol=1e-5, atol=1e-7)
        assert (0.5 * torch.outer(first, first)).abs().max() > 1e-3   # what a plain sum (decay 1) would add


def test_orthogonal_projector_recursion_over_several_batches():
    """projector: orthogonal over L = 4 batch means r_b: from P = I, k = P r_b,
    P <- P - k k^T / (alpha_b + r_b^T k), alpha_b = 0.1 ** (1 + b / L), written out."""
    means = torch.randn(4, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.3

    def recursion(alphas):
        P = torch.eye(8, dtype=torch.float64)
        for r, alpha in zip(means, alphas):
            k = P @ r
            P = P - torch.outer(k, k) / (alpha + r @ k)
        return P
    want = recursion([0.1 ** (1 + b / 4) for b in range(4)])
    torch.testing.assert_close(igm.orthogonal_projections({0: means})[0].double(), want, rtol=1e-5, atol=1e-6)
    assert (recursion([0.1] * 4) - want).abs().max() > 1e-3   # the schedule matters on this case


def test_moments_from_hooks_match_the_definition():
    model, batches = Toy(), toy_batches(3)
    hooks = igm.HeadInputSums(model.heads["audio"], [0, 1, 2])
    for b in batches:
        model.heads["audio"](model.encoders["audio"](b["audio"]))
    sums, counts = hooks.reduced(1)
    hooks.close()
    for i in range(3):
        Y = sum(torch.outer(m, m) for m in (sums[i] / counts.unsqueeze(1).float()).double())
        want = None
        for b in batches:
            _, inputs = model.heads["audio"](model.encoders["audio"](b["audio"]), return_inputs=True)
            want = flat_sam.accumulate_input_moment(want, inputs[i].detach())
        torch.testing.assert_close(Y, want)


# ------------------------------------------------------------------------------------------------
# N ranks x B/N == 1 rank x B (in-process gloo group)

DDP_CFGS = {"official": dict(STEP_CFG, mixup_alpha=0.0), "paper": dict(STEP_CFG, variant="paper", mixup_alpha=0.0, rho=0.05)}


def _run_steps(model, cfg, batches, world=1, rank=0):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    T = toy_projections()
    hooks = igm.HeadInputSums(model.heads["audio"], [0, 1, 2])
    for batch in batches:
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        for m in ("audio", "video"):
            igm.igm_step(model, m, local, opt, T if m == "video" else {}, cfg, world, head_hooks=hooks)
    sums, counts = hooks.reduced(world)
    hooks.close()
    return params_of(model), {i: s / counts.unsqueeze(1) for i, s in sums.items()}


def _igm_on_rank(world, rank, variant):
    state, means = _run_steps(Toy(), DDP_CFGS[variant], toy_batches(), world, rank)
    return {"state": state, "means": means}


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.slow
def test_igm_step_two_ranks_equal_one(tmp_path, variant):
    single = _igm_on_rank(1, 0, variant)
    ddp = run_on_gloo_ranks(_igm_on_rank, tmp_path, variant)[0]
    for key, value in single["state"].items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for i, m in single["means"].items():   # global batch means of the head inputs (what Y is built from)
        torch.testing.assert_close(ddp["means"][i].float(), m.float(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# train/igm.py end to end

@pytest.fixture(scope="module")
def av(tmp_path_factory):
    return embedded.generate(tmp_path_factory.mktemp("data"), "av", seed=5, n_train=256, n_val=64, n_test=64)


def igm_args(data, out, *extra):
    return ["--data", str(data), "--out_dir", str(out), "--batch_size", "64", "--log_every", "2",
            "--progress", "false", "--encoders.audio.base_width", "8", "--encoders.video.base_width", "8", *extra]


def checkpoint(run_dir, step):
    return torch.load(Path(run_dir) / "checkpoints" / f"ckpt-{step:09d}" / "state.pt", weights_only=False)


@pytest.mark.slow
def test_official_stages_restart_from_best_with_fresh_optimizer(av, tmp_path):
    out = tmp_path / "official"
    # 4 steps per epoch; stage 0 = audio epochs 1-2, stage 1 = video from step 9
    run_script("train/igm.py", igm_args(av, out, "--stage_epochs", "[2, 1]", "--optimizer", "sgd",
                                        "--lr", "0.05", "--stop_after_steps", "9", "--keep_checkpoints", "5"))
    state = checkpoint(out, 9)
    best = torch.load(out / "best.pt", weights_only=True)
    assert state["trainer"]["method"]["stage"] == 1
    for key, value in state["model"].items():   # restarted from best.pt; the video stage never touches audio
        if key.startswith(("encoders.audio", "heads.audio")):
            assert torch.equal(value, best[key]), key
    names = [k for k in state["model"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    with_momentum = {names[i] for i in state["optimizer"]["state"]}
    assert with_momentum and all(n.startswith(("encoders.video", "heads.video")) for n in with_momentum), \
        "fresh optimiser: no momentum left from the audio stage"
    T = state["trainer"]["method"]["T"]["video"]
    assert sorted(T) == [0, 1, 2] and not state["trainer"]["method"]["T"]["audio"]
    for t in T.values():
        sigma = torch.linalg.eigvalsh(t.double())
        assert sigma.min() >= torch.exp(torch.tensor(-0.4, dtype=torch.float64)) - 1e-5 and sigma.max() <= 1 + 1e-5
    run_script("train/igm.py", igm_args(av, out, "--stage_epochs", "[2, 1]", "--optimizer", "sgd",
                                        "--lr", "0.05", "--keep_checkpoints", "5", "--resume"))
    result = json.loads((out / "result.json").read_text())
    assert set(result["test"]) == {"audio", "video", "fused"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 0, 1]
    tags = tb_tags(out)
    assert {"T/video_from_audio/layer0/effective_rank", "T/video_from_audio/layer2/damped_share",
            "T/video_from_audio/layer1/mean_scale", "T/video_from_audio/layer1/top_energy_share",
            "val_fused/mAP", "video/acc", "train/stage"} <= tags


@pytest.mark.slow
def test_switches(av, tmp_path):
    out = tmp_path / "switches"
    run_script("train/igm.py", igm_args(av, out, "--stage_epochs", "[1, 1, 1]", "--project_layers", "[2]",
                                        "--tau", "1.0", "--sam", "false", "--fusion", "entropy",
                                        "--mixup_alpha_by_modality.video", "0.0", "--select_on", "modality_mean"))
    tags = tb_tags(out)
    assert "T/video_from_audio/layer2/effective_rank" in tags and "T/video_from_audio/layer0/effective_rank" not in tags
    assert "T/audio_from_video/layer2/damped_share" in tags and "plasticity/cos_consecutive_stages" in tags
    state = torch.load(out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "state.pt",
                       weights_only=False)
    sigma = torch.linalg.eigvalsh(state["trainer"]["method"]["T"]["audio"][2].double())   # the last stage: audio from video
    assert abs(sigma.min().item() - torch.exp(torch.tensor(-1.0)).item()) < 1e-4   # tau = 1.0 reached
    result = json.loads((out / "result.json").read_text())
    assert result["sam"] is False and result["tau"] == 1.0
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if "val" in e]
    means = [(e["val"]["audio"]["acc"] + e["val"]["video"]["acc"]) / 2 for e in epochs]
    assert result["best_epoch"] == epochs[means.index(max(means))]["epoch"]   # select_on: modality_mean
    orth = tmp_path / "orthogonal"   # MLA's projector in place of T, same schedule
    run_script("train/igm.py", igm_args(av, orth, "--stage_epochs", "[1, 1]", "--projector", "orthogonal"))
    assert "P/video_from_audio/layer0/mean_scale" in tb_tags(orth)
    assert json.loads((orth / "result.json").read_text())["projector"] == "orthogonal"
    state = torch.load(orth / "checkpoints" / (orth / "checkpoints" / "latest").read_text().strip() / "state.pt",
                       weights_only=False)
    for P in state["trainer"]["method"]["T"]["video"].values():   # a contraction: eigenvalues in [0, 1]
        sigma = torch.linalg.eigvalsh(P.double())
        assert sigma.min() > -1e-4 and sigma.max() < 1 + 1e-4 and sigma.min() < 0.5
    off = tmp_path / "no_projection"
    run_script("train/igm.py", igm_args(av, off, "--stage_epochs", "[1, 1]", "--projection", "false"))
    assert not any(t.startswith("T/") for t in tb_tags(off))


@pytest.mark.slow
def test_select_metric_macro_f1_picks_best_pt_and_the_restarts(av, tmp_path):
    """select_metric: macro_f1 (the released IGM scripts' selection): best.pt, and with it the point
    every stage restarts from, is the epoch of the highest fused validation macro-F1."""
    out = tmp_path / "f1"
    # (on this fixture the fused accuracy peaks at epoch 4 and the macro-F1 at epoch 2, so selecting on
    # accuracy would keep another epoch and restart the video stage elsewhere)
    run_script("train/igm.py", igm_args(av, out, "--stage_epochs", "[2, 2]", "--select_metric", "macro_f1",
                                        "--keep_checkpoints", "5"))
    result = json.loads((out / "result.json").read_text())
    assert result["select_metric"] == "macro_f1" and result["select_on"] == "fused"
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if "val" in e]
    f1 = [e["val"]["fused"]["macro_f1"] for e in epochs]
    assert result["best_epoch"] == epochs[f1.index(max(f1))]["epoch"]
    # 4 steps per epoch; the checkpoint of step 8 is written after the restart into the video stage:
    # its audio half is the audio stage's epoch of the highest macro-F1
    first = f1[:2]
    best = checkpoint(out, 4 * (first.index(max(first)) + 1))["model"]
    restarted = checkpoint(out, 8)["model"]
    for key, value in restarted.items():
        if key.startswith(("encoders.audio", "heads.audio")):
            assert torch.equal(value, best[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("args, stop", [
    (["--variant", "official", "--stage_epochs", "[1, 2]"], "6"),                      # inside stage 1
    (["--variant", "paper", "--epochs", "2", "--rho", "0.05", "--refresh_every", "3"], "5"),
])
def test_resume_is_exact(av, tmp_path, args, stop):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script("train/igm.py", igm_args(av, whole, *args))
    run_script("train/igm.py", igm_args(av, split, *args, "--stop_after_steps", stop))
    run_script("train/igm.py", igm_args(av, split, *args, "--resume"))
    a, b = final_weights(whole), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (whole, split))
    assert ra["test"] == rb["test"]
    assert "plasticity/cos_consecutive_stages" in tb_tags(whole)   # both variants log it (paper: per turn)


@pytest.mark.parametrize("override, message", [
    (dict(projector="owm"), "projector='owm'"),
    (dict(variant="paper", projector="orthogonal"), "projector=orthogonal"),
    (dict(rho=1e-3), "sam_impl: exact"),
    (dict(stage_epochs=[]), "stage_epochs"),
    (dict(project_layers=[3]), "project_layers"),
    (dict(variant="foret"), "variant='foret'"),
    (dict(mixup_alpha_by_modality={"video": -1}), "mixup_alpha_by_modality.video"),
    (dict(select_on="video"), "select_on='video'"),
    (dict(select_metric="f1"), "select_metric='f1'"),
])
def test_bad_config_is_refused_before_compute(override, message):
    with pytest.raises(igm.ConfigError, match=message.replace(".", r"\.").replace("'", ".")):
        igm.check_config(dict(config.defaults(igm.CONFIG), **override))


# the shapes each converter writes with its defaults (data_prep/<dataset>.py)
CONVERTED = {
    "crema_d": {"audio": ("spectrogram", [257, 188]), "video": ("frames", [1, 3, 224, 224])},
    "kinetics_sounds": {"audio": ("spectrogram", [257, 1003]), "video": ("frames", [3, 3, 224, 224])},
    "twitter2015": {"text": ("features", [768]), "image": ("features", [2048])},
    "sarcasm": {"text": ("features", [768]), "image": ("features", [2048])},
    "nvgesture": {"depth": ("frames", [80, 1, 256, 256]), "rgb": ("frames", [80, 3, 256, 256]),
                  "of": ("frames", [80, 1, 256, 256])},
}


@pytest.mark.parametrize("dataset", sorted(CONVERTED))
def test_dataset_configs_load_and_build_on_the_converted_shapes(dataset):
    from models.fusion import IGMModel
    from train.config import load_config
    cfg = load_config(igm.CONFIG, ["--config", f"train/configs/igm_{dataset}.yaml"])
    igm.check_config(cfg)
    meta = {"num_classes": 3, "modalities": {m: {"kind": k, "shape": s, "dtype": "float32"}
                                             for m, (k, s) in CONVERTED[dataset].items()}}
    assert cfg["modalities"] == list(CONVERTED[dataset])
    model = IGMModel(meta, cfg["encoders"], cfg["modalities"], tuple(cfg["head_hidden"]))
    assert [h.linears[2].out_features for h in model.heads.values()] == [3] * len(cfg["modalities"])


@pytest.mark.parametrize("dataset", ["crema_d", "kinetics_sounds", "nvgesture", "twitter2015", "sarcasm"])
def test_dataset_config_learning_rate_per_epoch_of_a_stage(dataset):
    """The per-epoch learning rate of a stage, the scheduler stepped before each epoch (official), is
    the released one: audio-visual / NVGesture StepLR(40, 0.1); image-text WarmupMultiStepLR (warm-up
    2 epochs from lr/3, linear; milestones 160/180, never reached) = 2/3 lr in the first epoch, then lr."""
    import warnings
    from train.optim import build_optimizer, build_scheduler
    from train.config import load_config
    cfg = load_config(igm.CONFIG, ["--config", f"train/configs/igm_{dataset}.yaml"])
    if dataset in ("twitter2015", "sarcasm"):
        expected = [cfg["lr"] * (2 / 3 if e == 0 else 1) for e in range(30)]
    else:
        expected = [cfg["lr"] * 0.1 ** ((e + 1) // 40) for e in range(50)]
    optimizer = build_optimizer(cfg, [nn.Parameter(torch.zeros(1))])
    scheduler = build_scheduler(cfg, optimizer)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in expected:
            scheduler.step()
            lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx(expected, rel=1e-12)
