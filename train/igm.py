"""IGM: flat gradient modification + SAM over alternating unimodal learning (m modalities).

    accelerate launch train/igm.py                                      # embedded audio-visual benchmark
    accelerate launch train/igm.py --config train/configs/igm_crema_d.yaml
    accelerate launch train/igm.py --variant paper --rho 0.05           # step-wise alternation, real SAM
    accelerate launch train/igm.py --projection false --sam false       # ablations: T, SAM, rho, tau, layers
    accelerate launch --multi_gpu --num_processes 2 train/igm.py        # 2-rank data parallel

Model: per modality an encoder E_j and a head H_j = Linear(D_j,256) -> ReLU -> Linear(256,64) ->
Linear(64,C); nothing shared. Fused prediction: mean of the per-modality softmax outputs (official),
or entropy-weighted (`fusion: entropy`, MLA-style). See docs/methods/igm.md (official vs paper, every switch).

variant official (the released code):
  stages of whole epochs (`stage_epochs`), modality j = modalities[s % m] in stage s. Each stage
  restarts from the best checkpoint so far (on VALIDATION: `select_on`, `select_metric`; the released
  scripts use the fused macro-F1, Twitter the fused accuracy), builds a fresh optimiser
  and scheduler (stepped before each epoch), and trains E_j and H_j only. At its start the flat
  projection T is built from the PREVIOUS stage's modality k: one no-grad pass over the training
  loader (eval mode), Y = sum over batches of outer(mean a, mean a) for the input a of each Linear of
  H_k, T = V diag(exp(-tau (lam - lam_min)/(lam_max - lam_min))) V^T. After backward, before the step:
  weight.grad <- weight.grad @ T for each Linear of H_j paired with the same-shape Linear of H_k.
  Step: mixup on the input (Beta(alpha, alpha)), L_ori = lam CE(o,y) + (1-lam) CE(o,y[perm]); the
  released "SAM" moves each parameter tensor by rho g/|g| (not restored) and re-evaluates the head on
  the same features with un-mixed labels: loss = 0.7 L_ori + 0.3 CE(H_j(z), y). At the released rho
  (1e-10 audio-visual, 1e-15 others) the move is below float32 resolution, so the step equals ONE
  backward of (0.3 + 0.7 lam) CE(o,y) + 0.7 (1 - lam) CE(o,y[perm]) — `sam_impl: reweighted` (default,
  one backward) computes exactly that; `sam_impl: exact` runs the released procedure itself
  (tests check that both agree at the released rho; reweighted refuses rho > 1e-8).
variant paper (what the text promises):
  step-wise alternation: every batch updates each modality in turn (shared optimiser, no restarts);
  real SAM (Foret et al.): g at theta, eps = rho g/|g| (global norm, on the all-reduced gradient),
  re-forward and backward at theta + eps (BatchNorm statistics frozen), restore theta, project with T,
  base optimiser step. Y is an exponential moving average (`moment_decay`) of each modality's head-input
  moments, taken from its own training forwards; T is rebuilt every `refresh_every` steps and modality
  j is projected with the T of the modality updated just before it.

Data parallelism without a DDP wrapper (each update uses one modality's parameters): the update's
gradients are all-reduced by hand in one bucket; moment sums Y and SAM norms use global quantities,
so N ranks x B/N = 1 rank x B (mixup pairs are drawn within a rank's slice; lambda and the
permutation come from the seeded global RNG, identical on every rank).

TensorBoard: per-modality train loss/acc, val per-modality and fused metrics, the stage, what each
projection does (T/<active>_from_<previous>/layer<i>/: effective rank and top-direction energy share
of the moments Y, share of directions T damps by more than half, T's mean scale), and `plasticity/cos_consecutive_stages`: the cosine between the summed
weight gradients of the head's 2nd and 3rd Linear (same shapes in every modality) over a stage and over
the stage before it (official); in the paper variant a stage is one modality turn, as in train/mla.py:
the step's mean cosine between a turn's projected gradients of those layers and the turn's before.

`projector: orthogonal` (official variant): MLA's OWM projector (methods/mla.py) in place of T — per
layer P from the identity, one recursion P <- P - k k^T/(alpha + r^T k), k = P r, per training-batch
mean r of the previous stage's head-layer input (the same pass that builds Y), alpha = 0.1^(1 + b/L);
weight.grad <- weight.grad @ P. Same model, schedule, SAM and mixup: IGM and IGM-orthogonal differ only
by the projector.
"""
from __future__ import annotations

from train.config import ConfigError, Key, check_declared, declare, exit_on_help
from train.loop_config import LOOP_CONFIG

CONFIG = declare(LOOP_CONFIG,   # + the loop's keys (data, optimiser, selection, ...): train/loop_config.py
    data="data/embedded_av",
    modalities=Key([], "stage / alternation order ([] = the dataset's order)"),
    head_hidden=Key([256, 64], "H_j = Linear(D,256) -> ReLU -> Linear(256,64) -> Linear(64,C)"),
    out_dir="runs/igm_av",
    variant=Key("official", "official | paper", choices=("official", "paper")),
    stage_epochs=Key([25, 50, 25, 50, 25, 50, 25, 50, 25, 50, 25, 50], "official: epochs per stage"),
    epochs=Key(100, "paper: total epochs (official: the sum of stage_epochs)"),
    projection=Key(True, "flat gradient projection T"),
    projector=Key("flat", "flat (IGM's T) | orthogonal (MLA's OWM projector P; official variant)",
                  choices=("flat", "orthogonal")),
    tau=Key(0.4, "the flat projection's threshold"),
    project_layers=Key([0, 1, 2], "which of the head's three Linear layers are projected"),
    moment_decay=Key(0.99, "paper: EMA of the head-input moments Y"),
    refresh_every=Key(50, "paper: steps between rebuilds of T"),
    sam=Key(True, "official: the released re-weighted \"SAM\"; paper: Foret SAM"),
    rho=Key(1e-10, "released: 1e-10 audio-visual, 1e-15 image-text; Foret: ~0.05"),
    sam_weight=Key(0.3, "official: loss = (1 - w) L_ori + w L_sam"),
    sam_impl=Key("reweighted", "official: reweighted (one backward) | exact (the released procedure)",
                 choices=("reweighted", "exact")),
    mixup_alpha=Key(1.0, "Beta(alpha, alpha) mixup of the active modality's input (0 = off)"),
    mixup_alpha_by_modality=Key({}, "per-modality override, e.g. {image: 0.9, text: 0.0}"),
    fusion=Key("mean", "mean (official) | entropy (MLA-style, paper option)", choices=("mean", "entropy")),
    select_on=Key("fused", "best model and stage restarts by: fused (released) | modality_mean"),
    select_metric=Key("acc", "... on validation acc | macro_f1 (released: macro_f1; Twitter acc)"),
    batch_size=64,
    optimizer="sgd",
    lr=1e-2,
    weight_decay=1e-4,
    momentum=0.9,
    scheduler=Key("step", "StepLR(40, 0.1); official: stepped before each epoch of a stage"),
    step_size=40,
    gamma=0.1,
    warmup_epochs=Key(2, "scheduler warmup_cosine: warmup_start_lr -> lr, then cosine to min_lr; with "
                         "min_lr = lr and the official before-epoch step it is the released image-text "
                         "warm-up (a stage's first epoch at 2/3 lr, then lr)"),
    warmup_start_lr=0.0,
    min_lr=0.0,
    mixed_precision=Key("no", "no | bf16", choices=("no", "bf16")),
    channels_last=Key(False, "CNN weights (and so their activations) in NHWC: faster convolutions under bf16 "
                             "on GPUs"),
)
DEFAULT_CONFIG = "train/configs/igm_av.yaml"
if __name__ == "__main__":   # --help needs nothing below: answered before torch is imported
    exit_on_help(CONFIG, DEFAULT_CONFIG)

import contextlib
import dataclasses
import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from methods import flat_sam, mla
from models.encoders import to_float
from models.fusion import IGMModel
from train import loop, optim
from train.checkpoint import load_trusted
from train.distributed import all_reduce_mean_


REWEIGHTED_MAX_RHO = 1e-8   # above this the released move is visible in float32: use sam_impl exact


def check_config(cfg):
    loop.check_config(cfg)
    check_declared(cfg, CONFIG)   # choices and bounds, for a config built by hand too
    check_schedule(cfg)
    check_projection_and_sam(cfg)
    check_mixup(cfg)


def check_schedule(cfg):
    """Official: the stages (stage_epochs); projector orthogonal needs them (it is built per stage)."""
    if cfg["variant"] == "official" and (not cfg["stage_epochs"] or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in cfg["stage_epochs"])):
        raise ConfigError(f"stage_epochs={cfg['stage_epochs']}: a non-empty list of positive integers")
    if cfg["projector"] == "orthogonal" and cfg["variant"] != "official":
        raise ConfigError("projector=orthogonal: built from a pass over the previous stage's inputs, so "
                          "variant official only (the paper variant keeps moving moments, not inputs)")


def check_projection_and_sam(cfg):
    """The projected layers, T's and SAM's numbers, the head's widths; the reweighted SAM's rho limit."""
    if not set(cfg["project_layers"]) <= {0, 1, 2} or not cfg["project_layers"] and cfg["projection"]:
        raise ConfigError(f"project_layers={cfg['project_layers']}: a non-empty subset of [0, 1, 2]")
    if cfg["tau"] <= 0 or cfg["rho"] < 0 or not 0 <= cfg["sam_weight"] <= 1 or not 0 <= cfg["moment_decay"] < 1:
        raise ConfigError("need tau > 0, rho >= 0, 0 <= sam_weight <= 1, 0 <= moment_decay < 1")
    if cfg["refresh_every"] < 1 or len(cfg["head_hidden"]) != 2:
        raise ConfigError("need refresh_every >= 1 and head_hidden = [h0, h1]")
    if cfg["variant"] == "official" and cfg["sam"] and cfg["sam_impl"] == "reweighted" and cfg["rho"] > REWEIGHTED_MAX_RHO:
        raise ConfigError(f"rho={cfg['rho']}: the released SAM move is visible in float32 above "
                          f"{REWEIGHTED_MAX_RHO}; set sam_impl: exact (two backwards) for it")


def check_mixup(cfg):
    """mixup_alpha and every mixup_alpha_by_modality value: a number >= 0."""
    for m, a in {"": cfg["mixup_alpha"], **cfg["mixup_alpha_by_modality"]}.items():
        if not isinstance(a, (int, float)) or a < 0:
            raise ConfigError(f"mixup_alpha{'_by_modality.' + m if m else ''}={a}: must be a number >= 0")


# ------------------------------------------------------------------------------------------------
# Pieces of the step (pure functions of their arguments; the loop below decides when to call them)

class HeadInputSums:
    """Forward pre-hooks on chosen Linear layers of a head: per forward, the sum over the batch of
    each layer's input and the number of rows (flat_sam.input_sum_and_count), kept on the device."""

    def __init__(self, head, layers):
        self.layers, self.sums, self.count, self.recording = list(layers), {i: [] for i in layers}, [], True
        self.handles = [head.linears[i].register_forward_pre_hook(self._hook(i)) for i in self.layers]

    def _hook(self, i):
        def hook(module, args):
            if not self.recording:
                return
            with torch.no_grad():   # no graph for the sums (cheaper than a detach per layer)
                total, n = flat_sam.input_sum_and_count(args[0].float())
            self.sums[i].append(total)
            if i == self.layers[0]:
                self.count.append(n)
        return hook

    def reduced(self, world):
        """{layer: (n_forwards, d) sums}, (n_forwards,) counts — summed over ranks in one all-reduce."""
        sums = {i: torch.stack(v) for i, v in self.sums.items()}
        device = next(iter(sums.values())).device   # pinned + non_blocking: no wait for the GPU's queue
        counts = torch.tensor(self.count, dtype=torch.float64, pin_memory=device.type == "cuda")
        counts = counts.to(device, non_blocking=True)
        if world > 1:
            flat = torch.cat([s.flatten().double() for s in sums.values()] + [counts])
            dist.all_reduce(flat)
            offset = 0
            for i, s in sums.items():
                sums[i] = flat[offset:offset + s.numel()].view_as(s)
                offset += s.numel()
            counts = flat[offset:]
        return sums, counts

    @contextlib.contextmanager
    def paused(self):
        self.recording = False
        try:
            yield
        finally:
            self.recording = True

    def close(self):
        for h in self.handles:
            h.remove()


def paired_layers(model, active, previous, layers):
    """Head layers of `active` projected with `previous`'s moments: chosen and of the same shape."""
    a, p = model.heads[active].linears, model.heads[previous].linears
    return [i for i in layers if a[i].weight.shape == p[i].weight.shape]


@torch.no_grad()
def batch_means_from_loader(model, modality, layers, loader, device, world, autocast):
    """{i: (n_batches, d)}: the global batch mean of the input of the i-th Linear of H_modality for
    every training batch — one no-grad pass in eval mode (all-reduced sums and counts under DDP)."""
    was_training = model.training
    model.eval()
    hooks = HeadInputSums(model.heads[modality], layers)
    try:
        for batch in loader:
            x = batch[modality].to(device, non_blocking=True)
            with autocast():
                features = model.encoders[modality](x)
            model.heads[modality](features.float())
        sums, counts = hooks.reduced(world)
    finally:
        hooks.close()
        model.train(was_training)
    return {i: sums[i].double() / counts.unsqueeze(1).double() for i in layers}


def orthogonal_projections(means):
    """`projector: orthogonal`: per layer MLA's OWM projector P from the identity, one recursion per
    training batch mean r_b of the pass (alpha = 0.1 ** (1 + b/L), MLA's schedule over an epoch; no
    Frobenius normalisation, the paper's form) — methods.mla. P is symmetric, so weight.grad @ P
    (project_weight_grad) is MLA's weight.grad @ P^T: the gradient loses its component in the span
    of the previous modality's head-layer inputs."""
    out = {}
    for i, m in means.items():
        alphas = [mla.projector_alpha(b, len(m)) for b in range(len(m))]
        out[i] = mla.orthogonal_projector(m, alphas, m.shape[1], device=m.device).float()
    return out


def projections_from_moments(Y, tau):
    return {i: flat_sam.flat_projection(y, tau).float() for i, y in Y.items()}


@contextlib.contextmanager
def frozen_batchnorm_stats(module):
    """BatchNorm running statistics unchanged (momentum 0) — for SAM's second forward."""
    saved = [(m, m.momentum) for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


@dataclasses.dataclass
class Turn:
    """What one update of modality m works on: E_m and H_m (and their parameters), the (mixed) input,
    the labels and the mixup draw (lam 1, perm None: no mixup), the ranks and the forward's autocast."""
    encoder: torch.nn.Module
    head: torch.nn.Module
    params: list
    x: torch.Tensor
    y: torch.Tensor
    lam: float
    perm: torch.Tensor | None
    world: int
    autocast: object

    def forward(self):
        """(features as float32, H_m's logits)."""
        with self.autocast():
            features = self.encoder(self.x)
        features = features.float()
        return features, self.head(features)

    def mixup_loss(self, logits):
        """L_ori per sample: lam CE(o, y) + (1 - lam) CE(o, y[perm]) (plain CE without mixup)."""
        if self.perm is None:
            return F.cross_entropy(logits, self.y, reduction="none")
        return flat_sam.mixup_cross_entropy(logits, self.y, self.perm, self.lam)

    def reduce_grads(self):
        """E_m's and H_m's gradients averaged over the ranks (one bucket)."""
        all_reduce_mean_([p.grad for p in self.params if p.grad is not None], self.world)


def official_backward(turn, features, logits, optimizer, cfg):
    """Official: the backward of L_ori (sam off), of the reweighted released step (sam_impl
    reweighted) or the released procedure itself (sam_impl exact); gradients all-reduced. Returns the loss."""
    if not cfg["sam"]:
        loss = turn.mixup_loss(logits).mean()
    elif cfg["sam_impl"] == "reweighted":
        loss = reweighted_sam_loss(turn, logits, cfg["sam_weight"])
    else:
        return released_sam_backward(turn, features, logits, optimizer, cfg)
    loss.backward()
    turn.reduce_grads()
    return loss


def reweighted_sam_loss(turn, logits, w):
    """(1 - w) L_ori + w CE(o, y), batch mean: what the released step computes at rho below fp32
    resolution, in one backward."""
    y, lam, perm = turn.y, turn.lam, turn.perm
    ce = F.cross_entropy(logits, y, reduction="none")
    per_sample = ce if perm is None else ((w + (1 - w) * lam) * ce
                                          + (1 - w) * (1 - lam) * F.cross_entropy(logits, y[perm], reduction="none"))
    return per_sample.mean()


def released_sam_backward(turn, features, logits, optimizer, cfg):
    """The released procedure: g of L_ori (used only to move the parameters), each tensor moved by
    rho g/|g| with `p.data = p.data + eps` (not restored, invisible to autograd), the head
    re-evaluated on the same features with un-mixed labels, then ONE backward of (1 - w) L_ori +
    w L_sam through L_ori's retained graph. Which weights L_ori's backward then sees is the layer's
    business, as in the released step: a layer that saved the parameter itself (convolutions) sees
    theta + eps, one that saved a view of it (Linear saves weight.t()) still sees theta — so the
    assignment is kept, not an in-place add. Returns the (detached) loss."""
    w = cfg["sam_weight"]
    loss_ori = turn.mixup_loss(logits).mean()
    loss_ori.backward(retain_graph=True)
    turn.reduce_grads()
    with torch.no_grad():
        moved = [(p, e) for p, e in zip(turn.params, flat_sam.sam_perturbation_per_tensor(
            [p.grad for p in turn.params], cfg["rho"])) if e is not None]
        if moved:
            ps, es = zip(*moved)
            for p, new in zip(ps, torch._foreach_add([p.data for p in ps], list(es))):
                p.data = new
    optimizer.zero_grad(set_to_none=True)
    loss_sam = F.cross_entropy(turn.head(features), turn.y).mean()
    loss = (1 - w) * loss_ori + w * loss_sam
    loss.backward()
    turn.reduce_grads()
    return loss.detach()


def paper_backward(turn, logits, optimizer, cfg, head_hooks):
    """Paper: the backward of L_ori, then (sam) Foret SAM's gradient in its place. Returns L_ori."""
    loss = turn.mixup_loss(logits).mean()
    loss.backward()
    turn.reduce_grads()
    if cfg["sam"]:
        sam_gradient(turn, optimizer, cfg["rho"], head_hooks)
    return loss


def sam_gradient(turn, optimizer, rho, head_hooks):
    """Foret SAM: eps = rho g/|g| (global norm of the reduced gradients), the gradient of L_ori
    re-forwarded at theta + eps (BatchNorm statistics and the head-input hooks paused), theta restored."""
    eps = flat_sam.sam_perturbation_global([p.grad for p in turn.params], rho)
    moved = [p for p, e in zip(turn.params, eps) if e is not None]
    eps = [e for e in eps if e is not None]
    with torch.no_grad():   # theta + eps, one multi-tensor add (restored below by one subtract)
        torch._foreach_add_(moved, eps)
    optimizer.zero_grad(set_to_none=True)
    hooks_off = head_hooks.paused() if head_hooks is not None else contextlib.nullcontext()
    with frozen_batchnorm_stats(turn.encoder), hooks_off:
        _, logits_sam = turn.forward()
    turn.mixup_loss(logits_sam).mean().backward()
    turn.reduce_grads()
    with torch.no_grad():
        torch._foreach_sub_(moved, eps)


def project_head_grads(head, projections):
    """T: weight.grad <- weight.grad @ T for each projected Linear of the head. One matmul per layer
    (their weight shapes, (256, D), (64, 256), (C, 64), all differ: nothing to batch); the product
    replaces the gradient tensor instead of being copied into it."""
    for i, T in projections.items():
        weight = head.linears[i].weight
        if weight.grad is not None:
            weight.grad = flat_sam.project_weight_grad(weight.grad, T)


def igm_step(model, m, batch, optimizer, projections, cfg, world=1, autocast=contextlib.nullcontext,
             head_hooks=None):
    """One update of modality m on its part of the batch: mixup -> forward -> the variant's backward
    (official: L_ori, reweighted or released SAM; paper: L_ori, Foret SAM) -> T on H_m's weight
    gradients -> the optimiser step.

    projections: {layer index: T} for H_m (empty = no projection). head_hooks: the paper variant's
    HeadInputSums on H_m (paused during SAM's second forward) or None. Returns device tensors to log."""
    encoder, head = model.encoders[m], model.heads[m]
    x, y = batch[m], batch["label"]
    alpha = float(cfg["mixup_alpha_by_modality"].get(m, cfg["mixup_alpha"]))
    lam, perm = 1.0, None
    if alpha > 0:   # drawn from the global CPU RNG: seeded alike on every rank, checkpointed per rank
        # validate_args=False: alpha > 0 is checked in check_config; the same draw, without the
        # distribution's per-call argument checks (a dozen operators and host reads)
        lam = float(torch.distributions.Beta(alpha, alpha, validate_args=False).sample())
        # pinned + non_blocking: a pageable host-to-device copy would wait for the GPU's queue to drain
        perm = torch.randperm(y.shape[0], pin_memory=y.is_cuda).to(y.device, non_blocking=True)
        x = flat_sam.mix_inputs(to_float(x), lam, perm)   # mixup needs floats
    turn = Turn(encoder, head, list(encoder.parameters()) + list(head.parameters()), x, y, lam, perm, world, autocast)
    optimizer.zero_grad(set_to_none=True)
    features, logits = turn.forward()
    if cfg["variant"] == "official":
        loss = official_backward(turn, features, logits, optimizer, cfg)
    else:
        loss = paper_backward(turn, logits, optimizer, cfg, head_hooks)
    project_head_grads(head, projections)
    optimizer.step()
    return {f"{m}/loss": loss.detach(), f"{m}/acc": (logits.argmax(1) == y).float().mean()}   # argmax: no graph


def stage_gradient(head):
    """Flattened weight gradients of the head's 2nd and 3rd Linear (same shapes in every modality)."""
    return torch.cat([head.linears[i].weight.grad.flatten() for i in (1, 2)])


def orthogonal_scalars(active, previous, P):
    """P/<active>_from_<previous>/layer<i>/mean_scale: trace(P)/d (1 = no projection; each
    direction of the previous inputs' span removed lowers it by 1/d)."""
    return {f"P/{active}_from_{previous}/layer{i}/mean_scale": torch.diagonal(p).mean() for i, p in P.items()}


def projection_scalars(active, previous, Y, tau):
    """TensorBoard scalars of the projection that `active`'s head gradients get, built from
    `previous`'s head-input moments Y {layer: (d, d)}: T/<active>_from_<previous>/layer<i>/<name>,
    name = effective_rank, top_energy_share (of Y), damped_share, mean_scale (of T) — see
    methods.flat_sam.projection_diagnostics."""
    return {f"T/{active}_from_{previous}/layer{i}/{name}": value for i, y in Y.items()
            for name, value in flat_sam.projection_diagnostics(y, tau).items()}


# ------------------------------------------------------------------------------------------------
# The method on the shared loop: build, step, hooks

def stage_modalities(cfg, modalities):
    """Official: the modality of each stage, in turn (stage s trains modalities[s % m])."""
    return [modalities[s % len(modalities)] for s in range(len(cfg["stage_epochs"]))]


def build(cfg: dict, ctx: loop.Context) -> loop.Setup:
    """Per-modality encoders and heads, one optimiser over every parameter (the inactive modality
    has no gradient, so no update), and IGM's state: the stage, T per modality, the paper
    variant's moments Y, and the summed head gradients of this stage and the one before."""
    order = ctx.modalities
    unknown = set(cfg["mixup_alpha_by_modality"]) - set(order)
    if unknown:
        raise ConfigError(f"mixup_alpha_by_modality: no modality {sorted(unknown)} in {order}")
    model = IGMModel(ctx.meta, cfg["encoders"], order, tuple(cfg["head_hidden"])).to(ctx.device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    official = cfg["variant"] == "official"
    state = dict(stage=0, T={m: {} for m in order}, Y={m: {} for m in order}, stage_grad=None, prev_stage_grad=None,
                 prev_turn_grad=None)
    stages = stage_modalities(cfg, order)

    def phase():   # the stage in the progress label (official) and in every metrics.jsonl record
        s = state["stage"]
        label = f"stage {s + 1}/{len(stages)} ({stages[min(s, len(stages) - 1)]})" if official else ""
        return loop.Phase(label, {"stage": s})

    if official and not cfg["resume"]:
        ctx.print(f"stage 1/{len(stages)}: {stages[0]} for {cfg['stage_epochs'][0]} epochs")
    schedule = loop.Schedule(epochs=sum(cfg["stage_epochs"]) if official else cfg["epochs"],
                             scheduler_before_epoch=official,   # the released scripts step it before each epoch
                             phase=phase)
    return loop.Setup(model, optimizer, optim.build_scheduler(cfg, optimizer),
                      fuse=IGMModel.fuse if cfg["fusion"] == "mean" else IGMModel.fuse_entropy, state=state,
                      schedule=schedule,
                      result=dict(variant=cfg["variant"], projection=cfg["projection"], projector=cfg["projector"], sam=cfg["sam"],
                                  rho=cfg["rho"], tau=cfg["tau"]))


def step(setup: loop.Setup, batch: dict, ctx: loop.Context) -> dict:
    """Official: one update of the stage's modality; paper: one update of each modality in turn,
    each recording its head-input moments (Y, an EMA) from its own training forward."""
    cfg, state, model = ctx.cfg, setup.state, setup.model
    official = cfg["variant"] == "official"
    active = [stage_modalities(cfg, ctx.modalities)[state["stage"]]] if official else ctx.modalities
    stats, cosines = {}, []
    for m in active:
        hooks = HeadInputSums(model.heads[m], cfg["project_layers"]) if not official and cfg["projection"] else None
        try:
            stats |= igm_step(model, m, batch, setup.optimizer, state["T"][m], cfg, ctx.world, ctx.autocast,
                              head_hooks=hooks)
            if hooks is not None:
                sums, n = hooks.reduced(ctx.world)
        finally:
            if hooks is not None:
                hooks.close()
        if hooks is not None:
            for i, s in sums.items():
                moment = flat_sam.accumulate_input_moment_from_sum(None, s[0], n[0])
                prev = state["Y"][m].get(i)
                state["Y"][m][i] = moment if prev is None else cfg["moment_decay"] * prev + moment
        g = stage_gradient(model.heads[m])
        if official:
            state["stage_grad"] = g if state["stage_grad"] is None else state["stage_grad"] + g   # g: a fresh cat
        else:   # a stage is one modality turn (MLA's definition): the cosine with the turn before
            if state["prev_turn_grad"] is not None:
                cosines.append(F.cosine_similarity(g, state["prev_turn_grad"], dim=0))
            state["prev_turn_grad"] = g   # a fresh tensor (torch.cat): no copy needed
    if cosines:
        stats["plasticity/cos_consecutive_stages"] = torch.stack(cosines).mean()
    return stats


def refresh_paper_projections(setup: loop.Setup, ctx: loop.Context) -> None:
    """Paper: every `refresh_every` steps, T of each modality from the moments of the one before it."""
    cfg, state = ctx.cfg, setup.state
    if cfg["variant"] != "paper" or not cfg["projection"] or ctx.position["step"] % cfg["refresh_every"]:
        return
    scalars = {}
    for j, m in enumerate(ctx.modalities):
        previous = ctx.modalities[j - 1]
        layers = paired_layers(setup.model, m, previous, cfg["project_layers"])
        if all(i in state["Y"][previous] for i in layers):
            Y = {i: state["Y"][previous][i] for i in layers}
            state["T"][m] = projections_from_moments(Y, cfg["tau"])
            scalars.update(projection_scalars(m, previous, Y, cfg["tau"]))
    ctx.log(scalars)


def next_stage(setup: loop.Setup, ctx: loop.Context, val) -> None:
    """Official, at the end of a stage's last epoch: log the plasticity cosine, then start the next
    stage — restart from the best model so far (best.pt, selected on validation), a fresh optimiser
    and scheduler, and T of the new modality from the previous stage's modality (one no-grad pass
    over the training loader)."""
    cfg, state, model = ctx.cfg, setup.state, setup.model
    ends = list(itertools.accumulate(cfg["stage_epochs"]))
    if cfg["variant"] != "official" or ctx.position["epoch"] != ends[state["stage"]]:
        return
    if state["prev_stage_grad"] is not None and state["stage_grad"] is not None:
        cos = F.cosine_similarity(state["stage_grad"], state["prev_stage_grad"], dim=0)
        ctx.log({"plasticity/cos_consecutive_stages": cos})
    state["stage"] += 1
    s, stages = state["stage"], stage_modalities(cfg, ctx.modalities)
    if s == len(stages):
        return
    # every rank reaches the barrier (the main process may still be writing best.pt when another
    # rank looks for it), then all read the same file; loaded onto the CPU and copied into the
    # model: map_location=device fails for a "cpu:0" device (2 CPU processes)
    ctx.accelerator.wait_for_everyone()
    if (ctx.run_dir / "best.pt").exists():
        model.load_state_dict(load_trusted(ctx.run_dir / "best.pt"))
    setup.optimizer = optim.build_optimizer(cfg, model.parameters())
    setup.scheduler = optim.build_scheduler(cfg, setup.optimizer)
    active, previous = stages[s], stages[s - 1]
    state["T"] = {m: {} for m in ctx.modalities}
    if cfg["projection"] and active != previous:
        layers = paired_layers(model, active, previous, cfg["project_layers"])
        ctx.train_sampler.set_epoch(ctx.position["epoch"])
        means = batch_means_from_loader(model, previous, layers, ctx.loaders["train"], ctx.device, ctx.world,
                                        ctx.autocast)
        if cfg["projector"] == "orthogonal":   # MLA's projector in place of T, nothing else changed
            state["T"][active] = orthogonal_projections(means)
            ctx.log(orthogonal_scalars(active, previous, state["T"][active]))
        else:
            Y = {i: m.T @ m for i, m in means.items()}          # = sum_b outer(mean_b, mean_b)
            state["T"][active] = projections_from_moments(Y, cfg["tau"])
            ctx.log(projection_scalars(active, previous, Y, cfg["tau"]))
    state["prev_stage_grad"], state["stage_grad"] = state["stage_grad"], None
    ctx.log({"train/stage": s})
    ctx.print(f"stage {s + 1}/{len(stages)}: {active} for {cfg['stage_epochs'][s]} epochs"
              + (f", T from {previous} on layers {sorted(state['T'][active])}" if state["T"][active] else ""))


def ignored_keys(cfg: dict) -> dict:
    """Keys the chosen variant does not read: refused on the command line, warned in a YAML."""
    if cfg["variant"] == "official":
        return {"epochs": "by variant=official (a run lasts sum(stage_epochs) epochs): set the stages' lengths "
                          "instead, e.g. --stage_epochs '[2, 4]', or --variant paper to use --epochs",
                "moment_decay": "by variant=official (T comes from one pass over the training set)",
                "refresh_every": "by variant=official (T is rebuilt at each stage start)"}
    return {key: "by variant=paper (no stages; the released re-weighted SAM is official only)"
            for key in ("stage_epochs", "sam_impl", "sam_weight")}


def main(cfg: dict) -> dict:
    check_config(cfg)
    return loop.train(cfg, method="IGM", build=build, step=step, after_step=refresh_paper_projections,
                      epoch_end=next_stage, min_modalities=2,
                      deepspeed="it multiplies the head weight gradients by the flat projection T (paper "
                                "variant: SAM re-evaluates at a perturbed point)")


if __name__ == "__main__":
    loop.run_entry_point(main, CONFIG, DEFAULT_CONFIG, ignored=ignored_keys)
