"""train/gaal.py end to end on a tiny embedded image+tabular set: variants, switches, resume."""
import json
from pathlib import Path

import pytest
import torch

from data_prep import embedded
from tests.conftest import run_on_gloo_ranks
from tests.test_train import final_weights, run_script


@pytest.fixture(scope="module")
def imgtab(tmp_path_factory):
    return embedded.generate(tmp_path_factory.mktemp("data"), "imgtab", seed=5, n_train=256, n_val=64, n_test=64)


def gaal_args(data, out, *extra):
    return ["--data", str(data), "--out_dir", str(out), "--epochs", "2", "--batch_size", "64",
            "--log_every", "2", "--progress", "false", *extra]


def checkpoint_state(run_dir):
    name = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    return torch.load(Path(run_dir) / "checkpoints" / name / "state.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("variant, image_adam_steps, table_adam_steps, bn_updates", [
    # official: zero-filled grads on every parameter from the first phase (as the released step,
    # whose reference loss back-propagates through the other encoder), so each encoder is stepped
    # in both phases of a batch; two training forwards each
    ("official", 2, 2, 2),
    # paper: clean alternation, each encoder stepped once, BatchNorm statistics updated once
    ("paper", 1, 1, 1),
])
def test_variants_differ_where_the_spec_says(imgtab, tmp_path, variant, image_adam_steps, table_adam_steps,
                                             bn_updates):
    out = tmp_path / variant
    run_script("train/gaal.py", gaal_args(imgtab, out, "--variant", variant, "--stop_after_steps", "1"))
    state = checkpoint_state(out)
    names = list(state["model"].keys())
    params = [n for n in names if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    steps = {n: int(state["optimizer"]["state"][i]["step"]) for i, n in enumerate(params)
             if i in state["optimizer"]["state"]}
    assert {s for n, s in steps.items() if n.startswith("encoders.image.")} == {image_adam_steps}
    assert {s for n, s in steps.items() if n.startswith("encoders.table.")} == {table_adam_steps}
    assert {s for n, s in steps.items() if n.startswith("head.")} == {2}
    tracked = {n: int(v) for n, v in state["model"].items() if n.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {bn_updates}


@pytest.mark.slow
def test_switches_run_and_report(imgtab, tmp_path):
    out = tmp_path / "ablation"
    run_script("train/gaal.py", gaal_args(imgtab, out, "--surgery", "false", "--guidance", "full",
                                          "--topk_frac", "0.25", "--margin", "0.5", "--channels_last", "true"))
    result = json.loads((out / "result.json").read_text())
    assert set(result["test"]) == {"image", "table", "fused"}
    convs = [w for w in final_weights(out).values() if w.dim() == 4]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert result["surgery"] is False and result["guidance"] == "full"
    bad = run_script("train/gaal.py", gaal_args(imgtab, tmp_path / "bad", "--guidance", "some"), check=False)
    assert bad.returncode != 0 and "guidance='some'" in bad.stderr


@pytest.mark.slow
def test_gaal_resume_is_exact(imgtab, tmp_path):
    """With the on-device augmentation on: its generator is part of each rank's checkpointed state."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    aug = ("--augment.p", "0.95", "--augment.size", "32")
    run_script("train/gaal.py", gaal_args(imgtab, whole, *aug))
    run_script("train/gaal.py", gaal_args(imgtab, split, "--stop_after_steps", "5", *aug))
    run_script("train/gaal.py", gaal_args(imgtab, split, "--resume", *aug))
    a, b = final_weights(whole), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------
# N ranks x B/N == 1 rank x B for GAAL's step (in-process gloo group, BatchNorm-free toy encoders)

def toy_gaal(seed=0):
    torch.manual_seed(seed)
    encoders = torch.nn.ModuleDict({"image": torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh()),
                                    "table": torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())})
    head = torch.nn.Linear(8, 5)
    params = list(encoders.parameters()) + list(head.parameters())
    return encoders, head, torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4)


def toy_batches(n_batches=3, batch=16):
    g = torch.Generator().manual_seed(1)
    return [{"image": torch.randn(batch, 6, generator=g), "table": torch.randn(batch, 4, generator=g),
             "label": torch.randint(0, 5, (batch,), generator=g)} for _ in range(n_batches)]


STEP_CFG = {"topk_frac": 0.5, "margin": 0.75, "qp_eps": 1e-3, "surgery": True, "guidance": "hard"}


def _gaal_on_rank(world, rank, variant):
    from train.gaal import gaal_step
    encoders, head, opt = toy_gaal()
    cfg = dict(STEP_CFG, variant=variant)
    conflicts = []
    for batch in toy_batches():
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        stats = gaal_step(encoders, head, opt, local, ["image", "table"], cfg, world, rank)
        conflicts.append(stats["image/conflict"] + stats["table/conflict"])
    return {"state": {**encoders.state_dict(), **head.state_dict()}, "conflicts": conflicts}


@pytest.mark.parametrize("variant", ["official", "paper"])
@pytest.mark.slow
def test_gaal_step_two_ranks_equal_one(tmp_path, variant):
    single = _gaal_on_rank(1, 0, variant)
    ddp = run_on_gloo_ranks(_gaal_on_rank, tmp_path, variant)[0]
    assert sum(float(c) for c in single["conflicts"]) > 0, "the toy problem must exercise the surgery"
    assert [float(c) for c in ddp["conflicts"]] == [float(c) for c in single["conflicts"]]
    for key, value in single["state"].items():
        torch.testing.assert_close(ddp["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def released_official_step(encoders, head, opt, batch, order, cfg):
    """The released official step, written the way the released code runs it: the reference loss
    over the other modality's hard samples back-propagates through that encoder (with a graph),
    `zero_grad(set_to_none=False)` between, one Adam over everything."""
    from methods import surgery
    labels = batch["label"]
    for m, other in ((order[0], order[1]), (order[1], order[0])):
        opt.zero_grad(set_to_none=False)
        logits_other = head(encoders[other](batch[other]))
        hard = surgery.hard_sample_indices(logits_other.detach(), cfg["topk_frac"])
        torch.nn.functional.cross_entropy(logits_other[hard], labels[hard]).backward()
        g_ref = surgery.flatten_head_grad(head.weight.grad, head.bias.grad).clone()
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(head(encoders[m](batch[m])), labels).backward()
        g = surgery.project_conflicting(surgery.flatten_head_grad(head.weight.grad, head.bias.grad), g_ref,
                                        cfg["margin"], cfg["qp_eps"])
        weight_grad, bias_grad = surgery.unflatten_head_grad(g, head.weight.shape)
        head.weight.grad.copy_(weight_grad)
        head.bias.grad.copy_(bias_grad)
        opt.step()


def test_official_step_equals_the_released_step_from_the_first_batch():
    """Fresh model and optimiser: the very first image phase steps the tabular encoder too (its
    zero gradient tensors exist in the released step); after 3 batches the parameters and Adam's
    step counts agree with the released procedure."""
    from train.gaal import gaal_step
    cfg = dict(STEP_CFG, variant="official")
    ours, released = toy_gaal(), toy_gaal()
    for batch in toy_batches():
        gaal_step(*ours, batch, ["image", "table"], cfg)
        released_official_step(*released, batch, ["image", "table"], cfg)
    for (name, a), b in zip(list(ours[0].named_parameters()) + list(ours[1].named_parameters()),
                            list(released[0].parameters()) + list(released[1].parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    steps = lambda opt: sorted(int(s["step"]) for s in opt.state_dict()["state"].values())  # noqa: E731
    assert steps(ours[2]) == steps(released[2]) == [6] * len(steps(released[2]))   # 2 phases x 3 batches


def written_out_step(encoders, head, opt, batch, order, cfg):
    """GAAL's step with every formula written out here, nothing from methods.surgery: entropy of
    softmax over the CLASSES, the top floor(topk_frac B) of the OTHER modality by entropy (guidance
    hard) or its whole batch (full), g . g_ref < 0 -> g + max(margin, -g.g_ref / (|g_ref|^2 + qp_eps))
    g_ref in float64 (surgery on). official: the released procedure (reference loss back-propagated
    through the other encoder, zero_grad(set_to_none=False)); paper: clean alternation, the other
    encoder in eval mode for the reference and not stepped."""
    labels = batch["label"]
    official = cfg["variant"] == "official"
    for m, other in ((order[0], order[1]), (order[1], order[0])):
        opt.zero_grad(set_to_none=not official)
        if official:
            logits_other = head(encoders[other](batch[other]))
        else:
            encoders[other].eval()
            with torch.no_grad():
                features = encoders[other](batch[other])
            encoders[other].train()
            logits_other = head(features)
        if cfg["guidance"] == "hard":
            p = torch.softmax(logits_other.detach().double(), dim=1)
            k = max(1, int(cfg["topk_frac"] * labels.shape[0]))
            chosen = torch.topk(-(p * torch.log(p)).sum(dim=1), k).indices
        else:
            chosen = torch.arange(labels.shape[0])
        ce = torch.nn.functional.cross_entropy(logits_other[chosen], labels[chosen])
        if official:   # released: a backward through the other encoder too (its gradients then zeroed)
            ce.backward()
            g_ref = torch.cat([head.weight.grad.flatten(), head.bias.grad]).clone()
        else:
            g_ref = torch.cat([g.flatten() for g in torch.autograd.grad(ce, [head.weight, head.bias])])
        opt.zero_grad(set_to_none=not official)
        torch.nn.functional.cross_entropy(head(encoders[m](batch[m])), labels).backward()
        g = torch.cat([head.weight.grad.flatten(), head.bias.grad])
        if cfg["surgery"] and float(g @ g_ref) < 0:
            g64, r64 = g.double(), g_ref.double()
            v = max(cfg["margin"], -float(g64 @ r64) / (float(r64 @ r64) + cfg["qp_eps"]))
            g = (g64 + v * r64).float()
        n = head.weight.numel()
        head.weight.grad.copy_(g[:n].view_as(head.weight))
        head.bias.grad.copy_(g[n:])
        opt.step()


def toy_gaal_bn(seed=1):
    """toy_gaal with BatchNorm in each encoder (eval vs training mode of the reference forward, and how
    often the running statistics move, change the result) and no squashing: with this seed the head
    gradients of the two modalities conflict in some phases of the first batches, with either guidance."""
    torch.manual_seed(seed)
    encoders = torch.nn.ModuleDict({m: torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.BatchNorm1d(8))
                                    for m, d in (("image", 6), ("table", 4))})
    head = torch.nn.Linear(8, 5)
    params = list(encoders.parameters()) + list(head.parameters())
    return encoders, head, torch.optim.Adam(params, lr=1e-2, weight_decay=1e-4)


@pytest.mark.parametrize("variant, guidance, surgery", [
    ("official", "hard", True), ("official", "full", True), ("official", "hard", False),
    ("paper", "hard", True), ("paper", "full", True)])
def test_step_equals_the_written_out_step_for_every_switch(variant, guidance, surgery):
    """gaal_step against written_out_step on a BatchNorm toy (3 batches): parameters and running
    statistics. Each switch must matter on this toy: the same run with the switch flipped differs."""
    from train.gaal import gaal_step
    cfg = dict(STEP_CFG, variant=variant, guidance=guidance, surgery=surgery)
    flipped = [dict(cfg, surgery=not surgery), dict(cfg, variant="paper" if variant == "official" else "official")]
    if surgery:   # without surgery the reference has no effect, so guidance cannot matter
        flipped.append(dict(cfg, guidance="full" if guidance == "hard" else "hard"))
    ours, written = toy_gaal_bn(), toy_gaal_bn()
    for batch in toy_batches():
        gaal_step(*ours, batch, ["image", "table"], cfg)
        written_out_step(*written, batch, ["image", "table"], cfg)
    got = {**ours[0].state_dict(), **ours[1].state_dict()}
    want = {**written[0].state_dict(), **written[1].state_dict()}
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for other_cfg in flipped:
        other = toy_gaal_bn()
        for batch in toy_batches():
            written_out_step(*other, batch, ["image", "table"], other_cfg)
        state = {**other[0].state_dict(), **other[1].state_dict()}
        assert max((state[k].double() - v.double()).abs().max().item() for k, v in want.items()) > 1e-4, other_cfg


# the image and table each converter writes with its defaults (data_prep/<dataset>.py)
CONVERTED = {
    "dvm": (286, [3, 128, 128], {"continuous": [f"c{i}" for i in range(13)],
                                  "categorical": {"Color": 22, "Bodytype": 13, "Gearbox": 3, "Fuel_type": 12}}),
    "celeba": (2, [3, 225, 225], {"continuous": [f"a{i}" for i in range(39)], "categorical": {}}),
    "sun": (2, [3, 225, 225], {"continuous": [f"a{i}" for i in range(101)], "categorical": {}}),
}


@pytest.mark.parametrize("dataset", sorted(CONVERTED))
def test_dataset_configs_load_and_build_on_the_converted_shapes(dataset):
    """Each released-recipe config loads, passes check_config, builds the shared-head model on the
    converter's shapes, and its augmentation (the released recipe; DVM 128, CelebA/SUN 225) keeps the
    stored image size."""
    from models.augment import build_augment
    from models.fusion import SharedHeadModel
    from train import gaal
    from train.config import load_config
    cfg = load_config(gaal.CONFIG, ["--config", f"train/configs/gaal_{dataset}.yaml"])
    gaal.check_config(cfg)
    classes, image_shape, table = CONVERTED[dataset]
    n_table = len(table["continuous"]) + len(table["categorical"])
    meta = {"num_classes": classes, "modalities": {
        "image": {"kind": "image", "shape": image_shape, "dtype": "uint8"},
        "table": {"kind": "tabular", "shape": [n_table], "dtype": "float32", **table}}}
    model = SharedHeadModel(meta, cfg["encoders"], ["image", "table"])
    assert model.head.in_features == 2048 and model.head.out_features == classes
    assert cfg["augment"]["p"] == 0.95 and cfg["augment"]["size"] == image_shape[-1]
    images = torch.randint(0, 256, (2, *image_shape), dtype=torch.uint8)
    assert build_augment(cfg["augment"], generator=torch.Generator().manual_seed(0))(images).shape == images.shape
    assert (cfg["epochs"], cfg["seed"], cfg["batch_size"], cfg["lr"], cfg["weight_decay"]) == (500, 2022, 256, 1e-3, 1e-4)


# ------------------------------------------------------------------------------------------------
# the step's operator cuts (issue 25) keep its numbers bit for bit

@pytest.mark.parametrize("batch, frac, sizes", [(7, 0.5, [7]), (12, 0.5, [5, 7]), (10, 0.3, [4, 6]), (3, 1.0, [3])])
def test_hard_sample_weights_are_the_gradient_of_the_masked_mean(batch, frac, sizes):
    """w = 1/k on the hard samples: grad_outputs=w gives the head gradient of (ce * mask).sum() / k
    bit for bit (and the same w as the mask divided by k), on one rank and on a split batch."""
    from methods import surgery
    g = torch.Generator().manual_seed(batch)
    head = torch.nn.Linear(5, 4)
    feats, labels = torch.randn(batch, 5, generator=g), torch.randint(0, 4, (batch,), generator=g)
    log_p = torch.log_softmax(head(feats), dim=1)
    ce = torch.nn.functional.nll_loss(log_p, labels, reduction="none")
    assert torch.equal(surgery.entropy_from_log_probs(log_p.detach()), surgery.entropy(head(feats).detach()))
    ent = surgery.entropy(log_p.detach())
    offset = 0
    for n in sizes:
        mask, k = surgery.global_hard_sample_mask(ent, frac, offset, n)
        w, k2 = surgery.global_hard_sample_weights(ent, frac, offset, n)
        assert k2 == k and w.dtype == torch.float32 and torch.equal(w, mask / k)
        local = slice(offset, offset + n)
        old = torch.autograd.grad((ce[local] * mask).sum() / k, [head.weight, head.bias], retain_graph=True)
        new = torch.autograd.grad(ce[local], [head.weight, head.bias], grad_outputs=w, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(old, new))
        offset += n
    full = torch.autograd.grad(ce.sum() / batch, [head.weight, head.bias], retain_graph=True)
    weighted = torch.autograd.grad(ce, [head.weight, head.bias], grad_outputs=torch.full_like(ce, 1.0 / batch))
    assert all(torch.equal(a, b) for a, b in zip(full, weighted))


def test_surgery_in_place_equals_the_pure_function():
    from methods import surgery
    gen = torch.Generator().manual_seed(4)
    for conflicting in (True, False):
        g = torch.randn(301, generator=gen)
        g_ref = (-g if conflicting else g) + 0.5 * torch.randn(301, generator=gen)
        pure = surgery.project_conflicting_with_stats(g, g_ref)
        buf = g.clone()
        inplace = surgery.project_conflicting_with_stats(buf, g_ref, out=buf)
        assert inplace.g is buf and torch.equal(buf, pure.g) and bool(pure.conflict) == conflicting
        assert all(torch.equal(a, b) for a, b in zip(pure[1:], inplace[1:]))


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_head_gradient_lives_in_one_buffer_across_steps(variant):
    """The head's .grad are views of one flat [weight | bias] buffer, kept from step to step, rebuilt
    after a zero_grad(set_to_none=True) from elsewhere; Adam steps what the variant says."""
    from train.gaal import gaal_step
    encoders, head, opt = toy_gaal()
    cfg = dict(STEP_CFG, variant=variant)
    batches = toy_batches()
    gaal_step(encoders, head, opt, batches[0], ["image", "table"], cfg)
    flat = head.weight.grad._base
    assert flat is not None and flat.dim() == 1 and head.bias.grad._base is flat
    gaal_step(encoders, head, opt, batches[1], ["image", "table"], cfg)
    assert head.weight.grad._base is flat
    opt.zero_grad(set_to_none=True)
    gaal_step(encoders, head, opt, batches[2], ["image", "table"], cfg)
    assert head.weight.grad._base is not None and head.weight.grad._base is not flat
    steps = sorted(int(s["step"]) for s in opt.state_dict()["state"].values())
    assert steps == ([6] * len(steps) if variant == "official" else [3] * (len(steps) - 2) + [6, 6])
