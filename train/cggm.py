"""CGGM: classifier-guided gradient modulation (any number of modalities; classification, regression,
segmentation).

    accelerate launch train/cggm.py                                   # embedded three-modality benchmark
    accelerate launch train/cggm.py --config train/configs/cggm_mosi.yaml
    accelerate launch train/cggm.py --direction false                 # ablations: modulation, direction
    accelerate launch --multi_gpu --num_processes 2 train/cggm.py     # 2-rank data parallel

Model: per modality an encoder (input projection + core), a fusion transformer over all encoded
modalities, a residual head F (last Linear `out`), and per-modality classifiers f_i on DETACHED encoder
outputs with their own optimiser (they never send gradient to the encoders) — models.fusion.CGGMModel;
for segmentation (BraTS) DeepLabv3+ encoders per MRI modality, a fused decoder (last 1x1 conv `out`)
and light per-modality decoders — models.segmentation.BratsCGGMModel (config key `segmentation`).
Per step t
(docs/methods/cggm.md; metric_prev = 0 and no L_gm at the very first step):
  1. loss = task_loss(F(fusion(h)), y) [+ lambda_gm * L_gm of the previous step]; backward.
  2. classifier losses sum_i task_loss(f_i(h_i.detach()), y); backward into the classifiers.
  3. metric_now_i = f_i's accuracy on the GLOBAL training batch (regression: sign accuracy, over
     every sample in the official variant, over non-zero labels in the paper one; segmentation: the mean of the WT/TC/ET Dice over the batch's slices,
     with the released eps 1e-3 in the official variant, the exact Dice (eps 0) in the paper one).
  4. d_i = now_i - prev_i; S = sum d + 1e-8; c_i = (S - d_i)/S; encoder-core gradients of modality i
     are multiplied by rho * c_i (`modulation`); c_i always logged, optionally clipped (`coeff_clip`).
     Not released: `progress_estimate` ema | window puts a smoothed estimate of each modality's gain
     per step in place of d_i and takes c_i from max(d_i, 0) (methods.modulation; docs/methods/cggm.md).
  5. `direction`: L_gm = (sum |c_i| - sum c_i cos(vec_i, vec_F)) / M.
       official: vec = the flattened WEIGHTS of F.out and f_i.out; L_gm enters the NEXT step's loss,
         so only F.out.weight receives its gradient, taken at this step's values. We add that gradient
         explicitly at the next step (lambda_gm * dL_gm/dvec_F from the stored vectors and c): the same
         update as keeping the graph, but checkpointable, so resume stays exact.
       paper: vec = the GRADIENTS of those layers' task losses (F.out's with create_graph, so L_gm is
         differentiable through it; that graph is the loss -> logits -> F.out path only, cheap), the
         coefficients inside L_gm are rho * c_i, and lambda_gm * L_gm is part of THIS step's loss.
  6. classifier step (no clipping); clip_grad_norm_(model, grad_clip); model step.

Data parallelism without a DDP wrapper: all gradients are all-reduced by hand in one bucket before the
edits (the scaling by rho * c_i is linear; the classifier metrics use all-reduced counts; the paper
variant's F.out gradient uses a differentiable all-reduce), so N ranks x B/N = 1 rank x B (models
without BatchNorm; the BraTS encoders have it).
"""
from __future__ import annotations

from train.config import ConfigError, Key, check_declared, declare, exit_on_help
from train.loop_config import LOOP_CONFIG, NON_NEGATIVE, POSITIVE

CONFIG = declare(LOOP_CONFIG,   # + the loop's keys (data, optimiser, selection, ...): train/loop_config.py
    data="data/embedded_seq3",
    modalities=Key([], "[] = all of the dataset's, in its order"),
    d_model=Key(64, "width of every encoded modality and of the fusion transformer", above=0),
    fusion=Key({}, "FusionTransformer options: n_layers (2), n_heads (4), dropout"),
    head_hidden=Key(128, "hidden width of the fused head", above=0),
    head_dropout=Key(0.0, "dropout of the fused head", at_least=0),
    classifier=Key({}, "ModalityClassifier options: n_layers (1), n_heads (4), dropout"),
    segmentation=Key({}, "segmentation task: models.segmentation.SEG_DEFAULTS keys"),
    out_dir="runs/cggm_seq3",
    variant=Key("official", "official | paper", choices=("official", "paper")),
    modulation=Key(True, "scale encoder-core gradients by rho * c_i (magnitude)"),
    direction=Key(True, "the direction loss L_gm"),
    rho=Key(1.3, "the modulation's scale", at_least=0),
    lambda_gm=Key(0.2, "weight of the direction loss L_gm", at_least=0),
    coeff_clip=Key([], "[] = none (official) | [lo, hi]"),
    progress_estimate=Key("batch", "d_i: batch (released: change between consecutive batch metrics) | ema (its "
                          "average) | window (gain per step over two windows); ema, window: c_i from max(d_i, 0)",
                          choices=("batch", "ema", "window")),
    progress_decay=Key(0.995, "progress_estimate ema: the average's decay, in [0, 1)", at_least=0),
    progress_window=Key(50, "progress_estimate window: batches in each of the two windows compared", above=0),
    epochs=30,
    batch_size=64,
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    clf_lr=Key(5e-4, "the classifiers' optimiser (same type as the model's)", **POSITIVE),
    clf_weight_decay=Key(0.0, "the classifiers' weight decay", **NON_NEGATIVE),
    warmup_start_lr=Key(4e-4, "scheduler warmup_cosine (CGGM's BraTS recipe)"),
    min_lr=1e-3,
    grad_clip=Key(0.8, "clip_grad_norm_ of the model (not the classifiers); 0 = off", **NON_NEGATIVE),
    mixed_precision=Key("no", "no | bf16", choices=("no", "bf16")),
)
DEFAULT_CONFIG = "train/configs/cggm_seq3.yaml"
if __name__ == "__main__":   # --help needs nothing below: answered before torch is imported
    exit_on_help(CONFIG, DEFAULT_CONFIG)

import contextlib

import torch
import torch.distributed as dist

from methods import modulation
from models.fusion import CGGMModel
from models.segmentation import BratsCGGMModel, dice_scores
from train import loop, optim
from train.distributed import all_reduce_mean_
from train.metrics import task_loss as compute_task_loss


def check_config(cfg):
    loop.check_config(cfg)
    check_declared(cfg, CONFIG)   # choices and bounds, for a config built by hand too
    clip = cfg["coeff_clip"]
    if clip and (len(clip) != 2 or not all(isinstance(v, (int, float)) for v in clip) or clip[0] > clip[1]):
        raise ConfigError(f"coeff_clip={clip}: [] or [lo, hi] with lo <= hi")
    if cfg["progress_decay"] >= 1:
        raise ConfigError(f"progress_decay={cfg['progress_decay']}: must be below 1 (an average that never moves)")


# ------------------------------------------------------------------------------------------------
# Pieces of the step

#: The released training Dice's eps (src/eval_metrics.py Dice(output, target, eps=1e-3), reached from
#: the classifiers' batch metric SegClassifier.cal_coeff -> train_eval_seg): (2|A∩G| + 2eps)/(|A|+|G| + 2eps).
RELEASED_DICE_EPS = 1e-3


def batch_metric_counts(task, logits, labels, zero_labels_count=True, dice_eps=RELEASED_DICE_EPS):
    """(hits, count) of the classifier's batch metric, as 0-d float64 tensors (summed over ranks by
    the caller): accuracy for classification, the sum over slices of mean(WT, TC, ET Dice) and the
    number of slices for segmentation, sign accuracy for regression — (pred > 0) == (label > 0):
      zero_labels_count=True (official; the released train_eval_senti, exclude_zero=False): over
        EVERY sample of the batch, a zero label counting as "not positive";
      False (paper): over the samples with a non-zero label only (MOSI's Acc-2 convention).
    dice_eps: the Dice's eps (models.segmentation.dice_scores): 1e-3 (official, the released
      training Dice) or 0 (paper: the exact Dice, the one evaluation reports)."""
    if task == "classification":
        hits, count = (logits.argmax(-1) == labels).sum(), labels.shape[0]
    elif task == "segmentation":
        dice = dice_scores(logits.argmax(1), labels, eps=dice_eps, reduction="sum")
        hits, count = (dice["wt"] + dice["tc"] + dice["et"]) / 3, labels.shape[0]
    else:
        pred, target = logits.reshape(-1), labels.reshape(-1)
        counted = torch.ones_like(target, dtype=torch.bool) if zero_labels_count else target != 0
        hits, count = (((pred > 0) == (target > 0)) & counted).sum(), counted.sum()
    if isinstance(count, int):   # filled on the device: copying a Python number there syncs with the host
        count = torch.full((), count, dtype=torch.float64, device=labels.device)
    return hits.to(torch.float64), count.to(torch.float64)


def batch_metric_counts_all(task, logits, labels, zero_labels_count=True, dice_eps=RELEASED_DICE_EPS):
    """(M, 2) float64 tensor: the rows (hits, count) of batch_metric_counts for each of the M
    classifiers' logits (no gradient). Classification in a few operators for all of them (the
    logits stacked: one argmax, one comparison, one sum); the other tasks per classifier."""
    with torch.no_grad():
        if task == "classification" and len({tuple(x.shape) for x in logits}) == 1:
            hits = (torch.stack(list(logits)).argmax(-1) == labels).sum(1).to(torch.float64)
            count = torch.full_like(hits, labels.shape[0])
            return torch.stack([hits, count], 1)
        return torch.stack([torch.stack(batch_metric_counts(task, x, labels, zero_labels_count, dice_eps))
                            for x in logits])


def out_weight_grad(loss, weight, world):
    """d loss / d weight with create_graph (differentiable further), averaged over ranks through a
    differentiable all-reduce: the gradient of the GLOBAL batch mean (equal per-rank batches)."""
    (grad,) = torch.autograd.grad(loss, weight, create_graph=True)
    if world > 1:
        import torch.distributed.nn.functional as dist_nn
        grad = dist_nn.all_reduce(grad) / world
    return grad


def core_parameters(encoder):
    """The parameters CGGM scales: the encoder core (not the input projection) where there is one."""
    return list((encoder.core if hasattr(encoder, "core") else encoder).parameters())


def forward_losses(model, batch, task, autocast):
    """The forward: the fused prediction's task loss, and each classifier's loss on its (detached)
    encoder output. Returns (task_loss, classifier losses in model.modalities order, {m: (h_m, f_m logits)})."""
    labels = batch["label"]
    with autocast():
        out = model(batch)
        fused = model.fuse(out)
    fused = fused.float()
    task_loss = compute_task_loss(task, fused, labels)
    clf_losses = [compute_task_loss(task, out[m][1].float(), labels) for m in model.modalities]
    return task_loss, clf_losses, out


def balance_coefficients(task, clf_logits, labels, state, cfg, world):
    """Steps 3-4: the classifiers' metrics on the GLOBAL batch (counts all-reduced) and c_i from each
    modality's progress (`progress_estimate`; batch, released: the change since the previous step),
    clipped to `coeff_clip` if set. Reads state["metric_prev"]; ema and window update their estimator
    in state["progress"]. Returns (metric_now (M,) float64, c (M,), whether the progress summed to
    zero (batch: S = sum d degenerate; ema, window: no modality progressed, every c_i = 1), the
    progress estimate (M,) or None for batch)."""
    official = cfg["variant"] == "official"
    hits_counts = batch_metric_counts_all(task, clf_logits, labels, official,
                                          RELEASED_DICE_EPS if official else 0.0)
    if world > 1:
        dist.all_reduce(hits_counts)
    hits, counts = hits_counts.unbind(1)
    metric_now = hits / counts.clamp_min(1)
    progress = None
    if cfg["progress_estimate"] == "batch":
        coeffs = modulation.balance_coefficients_tensor(metric_now, state["metric_prev"])
        degenerate = modulation.balance_degenerate_tensor(metric_now, state["metric_prev"])
    else:
        progress = estimate_progress(metric_now, state, cfg)
        coeffs, degenerate = modulation.rectified_balance_coefficients(progress)
    if cfg["coeff_clip"]:
        coeffs = modulation.clip_coefficients(coeffs, *cfg["coeff_clip"])
    return metric_now, coeffs, degenerate, progress


def progress_state(cfg, n_modalities, device):
    """The estimator's state for `progress_estimate` ema or window, checkpointed with the method's
    state (None for batch, which needs only metric_prev): `steps`, the batches seen (a host int, so
    the step reads no device value), and the (M,) average of the changes (ema) or the (2W, M) last
    batch metrics, oldest first (window)."""
    if cfg["progress_estimate"] == "batch":
        return None
    if cfg["progress_estimate"] == "ema":
        return {"steps": 0, "average": torch.zeros(n_modalities, dtype=torch.float64, device=device)}
    rows = 2 * cfg["progress_window"]
    return {"steps": 0, "history": torch.zeros(rows, n_modalities, dtype=torch.float64, device=device)}


def estimate_progress(metric_now, state, cfg):
    """d_i of ema and window from this step's global batch metrics (identical on every rank, so the
    estimator is too); updates state["progress"]. ema averages the changes from the second batch on
    (the first has no previous metric: its estimate is 0); window compares the two halves of the
    batches seen, up to progress_window each."""
    est = state.setdefault("progress", progress_state(cfg, metric_now.numel(), metric_now.device))
    est["steps"] += 1
    if cfg["progress_estimate"] == "ema":
        if est["steps"] == 1:
            return torch.zeros_like(metric_now)
        est["average"], progress = modulation.ema_progress(est["average"], metric_now - state["metric_prev"],
                                                           cfg["progress_decay"], est["steps"] - 1)
        return progress
    est["history"] = torch.cat([est["history"][1:], metric_now.unsqueeze(0)])
    return modulation.window_progress(est["history"], min(est["steps"], est["history"].shape[0]))


def previous_direction_loss(direction_prev):
    """Official: the previous step's L_gm at its own values, and its gradient w.r.t. vec_F (one
    evaluation: the value is logged, the gradient is what F.out.weight receives)."""
    c_prev, vec_f_prev, vecs_prev = direction_prev
    vec = vec_f_prev.detach().requires_grad_(True)
    with torch.enable_grad():
        lgm = modulation.direction_loss(c_prev, vec, vecs_prev)
        (lgm_grad,) = torch.autograd.grad(lgm, vec)
    return lgm.detach(), lgm_grad


def official_backward(model, model_params, task_loss, clf_losses, coeffs, state, cfg, world):
    """Official steps 1-2 and 5: ONE backward of the task and classifier losses, all gradients
    all-reduced in one bucket; the previous step's lambda_gm * L_gm joins the logged loss and its
    gradient is added to F.out.weight; this step's direction terms (c, vec_F, the (M, n) vecs) are
    stored in `state` for the next. Returns (loss, L_gm)."""
    lgm = torch.zeros((), device=task_loss.device)
    loss, lgm_grad = task_loss, None
    if cfg["direction"] and state["direction_prev"] is not None:
        lgm, lgm_grad = previous_direction_loss(state["direction_prev"])
        loss = loss + cfg["lambda_gm"] * lgm
    (task_loss + sum(clf_losses)).backward()
    params = model_params + list(model.classifiers.parameters())
    all_reduce_mean_([p.grad for p in params if p.grad is not None], world)
    out_weight = model.head.out.weight
    if lgm_grad is not None:
        out_weight.grad.add_(lgm_grad.view_as(out_weight), alpha=cfg["lambda_gm"])
    if cfg["direction"]:   # this step's terms, copied (vecs stacked: one (M, n) tensor)
        clf_weights = [model.classifiers[m].out.weight for m in model.modalities]
        with torch.no_grad():
            state["direction_prev"] = (coeffs.float(), out_weight.flatten().clone(),
                                       torch.stack(clf_weights).flatten(1))
    return loss, lgm


def paper_backward(model, model_params, task_loss, clf_losses, scales, cfg, world):
    """Paper steps 1-2 and 5: the classifiers' backward first (their F.out-layer gradients are vec_i),
    then one backward of task_loss + lambda_gm * L_gm, with vec_F = d task_loss / d F.out.weight
    (differentiable, all-reduced) and B_i = rho * c_i inside L_gm. Returns (loss, L_gm)."""
    lgm = torch.zeros((), device=task_loss.device)
    sum(clf_losses).backward()
    all_reduce_mean_([p.grad for p in model.classifiers.parameters() if p.grad is not None], world)
    loss = task_loss
    if cfg["direction"]:
        vec_f = out_weight_grad(task_loss, model.head.out.weight, world).reshape(-1)
        vecs = [model.classifiers[m].out.weight.grad.reshape(-1) for m in model.modalities]
        lgm = modulation.direction_loss(scales, vec_f, vecs)
        loss = loss + cfg["lambda_gm"] * lgm
    loss.backward()
    all_reduce_mean_([p.grad for p in model_params if p.grad is not None], world)
    return loss, lgm


def modulate_cores(model, scales, enabled):
    """Step 4's edit: each encoder core's gradients times rho * c_i (one foreach multiply per core,
    when `enabled`). Returns {m: the core's gradient norm after it} (the per-tensor norms of every
    core in one foreach call, then one norm per modality)."""
    names = model.modalities
    core_grads = {m: [p.grad for p in core_parameters(model.encoders[m]) if p.grad is not None] for m in names}
    if enabled:
        for m, scale in zip(names, scales.unbind()):
            if core_grads[m]:
                torch._foreach_mul_(core_grads[m], scale)
    all_core = [g for m in names for g in core_grads[m]]
    tensor_norms = iter(torch._foreach_norm(all_core, 2, dtype=torch.float32) if all_core else ())
    return {m: torch.linalg.vector_norm(torch.stack([next(tensor_norms) for _ in core_grads[m]]))
            if core_grads[m] else torch.zeros((), device=scales.device) for m in names}


def clip_model_gradients(model_params, grad_clip, device):
    """clip_grad_norm_ of the model (not the classifiers) when grad_clip > 0. Returns the factor the
    gradients were scaled by (1 without clipping), for the logged core norms."""
    if grad_clip > 0:
        total = torch.nn.utils.clip_grad_norm_(model_params, grad_clip)
        return (grad_clip / (total.float() + 1e-6)).clamp(max=1.0)
    return torch.ones((), device=device)


def step_stats(names, loss, task_loss, lgm, degenerate, coeffs, metric_now, clf_losses, core_norms, clip_factor):
    """What a step logs: the losses, c_i (always, unclipped or not), the classifiers' losses and
    metrics, each encoder core's gradient norm after rho * c_i and after the global clip."""
    stats = {"train/loss": loss.detach(), "train/task_loss": task_loss.detach(), "train/lgm": lgm.detach().float(),
             "train/coeff_degenerate": degenerate.float()}
    coeffs32, metrics32 = coeffs.float().unbind(), metric_now.float().unbind()
    for i, m in enumerate(names):
        stats[f"{m}/coeff"] = coeffs32[i]
        stats[f"{m}/clf_loss"] = clf_losses[i].detach()
        stats[f"{m}/clf_metric"] = metrics32[i]
        stats[f"{m}/grad_norm_core"] = core_norms[m]                        # after rho*c_i, before the clip
        stats[f"{m}/grad_norm_core_clipped"] = core_norms[m] * clip_factor  # what the optimiser receives
    return stats


def cggm_step(model, batch, optimizer, clf_optimizer, state, cfg, task, world=1, autocast=contextlib.nullcontext):
    """One CGGM step (the module docstring's steps 1-6): forward and losses -> the classifiers'
    global batch metrics and c_i -> the variant's backward (with L_gm) -> rho * c_i on the encoder
    cores -> classifier step, global clip, model step. `state` carries metric_prev (M,) and,
    official, the previous step's direction terms (c, vec_F, vecs); it is updated in place.
    Returns device tensors to log."""
    labels = batch["label"]
    task_loss, clf_losses, out = forward_losses(model, batch, task, autocast)
    optimizer.zero_grad(set_to_none=True)
    clf_optimizer.zero_grad(set_to_none=True)
    metric_now, coeffs, degenerate, progress = balance_coefficients(task, [out[m][1] for m in model.modalities],
                                                                    labels, state, cfg, world)
    scales = (cfg["rho"] * coeffs).float()   # rho * c_i: the encoder cores' multipliers (and paper's B_i)
    model_params = model.model_parameters()
    if cfg["variant"] == "official":
        loss, lgm = official_backward(model, model_params, task_loss, clf_losses, coeffs, state, cfg, world)
    else:
        loss, lgm = paper_backward(model, model_params, task_loss, clf_losses, scales, cfg, world)
    core_norms = modulate_cores(model, scales, cfg["modulation"])
    clf_optimizer.step()
    clip_factor = clip_model_gradients(model_params, cfg["grad_clip"], labels.device)
    optimizer.step()
    state["metric_prev"] = metric_now   # computed without gradient
    stats = step_stats(model.modalities, loss, task_loss, lgm, degenerate, coeffs, metric_now, clf_losses,
                       core_norms, clip_factor)
    if progress is not None:   # ema, window: the estimate c_i was built from
        stats.update(zip([f"{m}/progress" for m in model.modalities], progress.float().unbind()))
    return stats


# ------------------------------------------------------------------------------------------------
# The method on the shared loop

def build(cfg: dict, ctx: loop.Context) -> loop.Setup:
    """The CGGM model (BraTS: the DeepLabv3+ one), the model's optimiser and the classifiers' own,
    and CGGM's state: the previous step's classifier metrics and direction terms."""
    names, meta = ctx.modalities, ctx.meta
    try:
        if ctx.task == "segmentation":
            model = BratsCGGMModel({**meta, "modalities": {m: meta["modalities"][m] for m in names}},
                                   cfg["segmentation"])
        else:
            model = CGGMModel(meta, cfg["encoders"], names, cfg["d_model"], cfg["fusion"], cfg["head_hidden"],
                              cfg["head_dropout"], cfg["classifier"])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None
    model = model.to(ctx.device)
    optimizer = optim.build_optimizer(cfg, model.model_parameters())
    clf_optimizer = optim.build_optimizer(dict(cfg, lr=cfg["clf_lr"], weight_decay=cfg["clf_weight_decay"]),
                                          model.classifiers.parameters())
    state = dict(metric_prev=torch.zeros(len(names), dtype=torch.float64, device=ctx.device), direction_prev=None)
    if cfg["progress_estimate"] != "batch":
        state["progress"] = progress_state(cfg, len(names), ctx.device)
    return loop.Setup(model, optimizer, optim.build_scheduler(cfg, optimizer), state=state,
                      objects={"clf_optimizer": clf_optimizer},
                      result=dict(variant=cfg["variant"], modulation=cfg["modulation"], direction=cfg["direction"],
                                  rho=cfg["rho"], lambda_gm=cfg["lambda_gm"], coeff_clip=cfg["coeff_clip"],
                                  progress_estimate=cfg["progress_estimate"]))


def step(setup: loop.Setup, batch: dict, ctx: loop.Context) -> dict:
    return cggm_step(setup.model, batch, setup.optimizer, setup.objects["clf_optimizer"], setup.state, ctx.cfg,
                     ctx.task, ctx.world, ctx.autocast)


def main(cfg: dict) -> dict:
    check_config(cfg)
    return loop.train(cfg, method="CGGM", build=build, step=step, min_modalities=2, feature_dim=cfg["d_model"],
                      tasks=("classification", "regression", "segmentation"),
                      deepspeed="it scales each encoder core's reduced gradient by rho*c_i, adds the L_gm "
                                "gradient and clips the global norm")


if __name__ == "__main__":
    loop.run_entry_point(main, CONFIG, DEFAULT_CONFIG)
