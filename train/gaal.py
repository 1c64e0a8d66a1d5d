"""GAAL: gradient-aligned alternating learning with cross-modal gradient surgery (tabular + image).

    accelerate launch train/gaal.py                                   # embedded image+tabular benchmark
    accelerate launch train/gaal.py --variant paper --surgery false   # ablations: surgery, guidance, ...
    accelerate launch --multi_gpu --num_processes 2 train/gaal.py     # 2-rank data parallel

Per training batch, two updates, image first (docs/methods/gaal.md):
  for the active modality m, with the other modality o:
    1. g_ref = grad_H of the mean CE over the hard samples of o (top topk_frac of the batch by the
       entropy of softmax(H(f_o))), with f_o computed without a graph (only H's gradient is used);
    2. g = grad_H of the full-batch CE of m (the same backward gives E_m its gradient);
    3. if g . g_ref < 0:  v = max(margin, -(g . g_ref) / (|g_ref|^2 + qp_eps)),  g <- g + v g_ref;
    4. optimizer step.
  variant official (the released code): one Adam over everything with zero_grad(set_to_none=False),
    so the inactive encoder is stepped too (momentum echo + weight decay), and every encoder runs two
    training-mode forwards per batch (BatchNorm statistics update twice);
  variant paper: clean alternation, the inactive encoder untouched (no step, reference features in
    eval mode so its BatchNorm statistics update once per batch).

Data parallelism without a DDP wrapper: each phase uses one encoder and the head, so a wrapper would
see unused parameters every step; instead the phase's gradients are all-reduced by hand (one bucket),
the hard samples are chosen over the gathered entropies of all ranks (loss normalised by the global
count), and the surgery acts on the reduced head gradient, so N ranks x B/N = 1 rank x B.
"""
from __future__ import annotations

from train.config import ConfigError, Key, check_declared, declare, exit_on_help
from train.loop_config import LOOP_CONFIG

CONFIG = declare(LOOP_CONFIG,   # + the loop's keys (data, optimiser, selection, ...): train/loop_config.py
    data="data/embedded_imgtab",
    modalities=Key([], "the two modalities in update order ([] = the dataset's order)"),
    augment=Key({}, "on-device augmentation of the image modality ({} = none; keys: "
                    "models.augment.AUGMENT_DEFAULTS, e.g. {p: 0.95} for DVM's recipe)"),
    out_dir="runs/gaal_imgtab",
    variant=Key("official", "official | paper", choices=("official", "paper")),
    surgery=Key(True, "cross-modal gradient surgery on the head gradient (paper: CGS)"),
    guidance=Key("hard", "hard | full: reference from the hard samples or the whole batch (UGG)",
                 choices=("hard", "full")),
    topk_frac=Key(0.5, "the hard samples: this fraction of the batch, by entropy of the other modality", above=0),
    margin=Key(0.75, "the surgery's least step along the reference, v >= margin", at_least=0),
    qp_eps=Key(1e-3, "ridge of the surgery's denominator |g_ref|^2 + qp_eps", at_least=0),
    epochs=100,
    patience=Key(10, "early stopping on fused validation accuracy"),
    min_delta=2e-4,
    batch_size=256,
    optimizer="adam",
    lr=1e-3,
    weight_decay=Key(1e-4, "coupled L2 (torch Adam), as the released code"),
    scheduler=Key("step", "StepLR(10, 0.1) per epoch"),
    step_size=10,
    gamma=0.1,
    mixed_precision=Key("no", "no | bf16 (fp16 needs a loss scaler the two-update step lacks)", choices=("no", "bf16")),
    channels_last=Key(False, "CNN weights (and so their activations) in NHWC: faster convolutions under bf16 "
                             "on GPUs"),
)
DEFAULT_CONFIG = "train/configs/gaal_imgtab.yaml"
if __name__ == "__main__":   # --help needs nothing below: answered before torch is imported
    exit_on_help(CONFIG, DEFAULT_CONFIG)

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from methods import surgery
from models.augment import build_augment
from models.fusion import SharedHeadModel
from train import loop, optim
from train.distributed import all_reduce_mean_


def check_config(cfg):
    loop.check_config(cfg)
    check_declared(cfg, CONFIG)   # choices and bounds, for a config built by hand too
    if not 0 < cfg["topk_frac"] <= 1:
        raise ConfigError(f"topk_frac={cfg['topk_frac']}: must be in (0, 1]")


def set_training(encoder, modules, mode):
    """encoder.train(mode) given the list of its modules (encoder.modules()): the same flags, set
    without the recursive walk and Module.__setattr__ per module (~90 µs per call on a ResNet encoder,
    twice per phase: host time on every step). Falls back to encoder.train(mode) when a module
    overrides train(). No operator is dispatched either way."""
    if all(type(mod).train is torch.nn.Module.train for mod in modules):
        for mod in modules:
            object.__setattr__(mod, "training", mode)
    else:
        encoder.train(mode)


def reference_gradient(encoder, head, x_other, labels, cfg, world, rank, autocast, modules=None):
    """g_ref: the head gradient of the CE over the other modality's hard samples, flattened
    [weight | bias]. The hard samples are the global top-k by entropy over all ranks' samples and
    the loss is normalised by the global count, so the all-reduced sum equals one rank holding the
    whole batch. The other encoder runs without a graph: training mode in the official variant
    (its BatchNorm statistics update), eval mode in the paper variant (untouched); it is left in
    training mode. `modules`: list(encoder.modules()) if the caller holds it (saves the walks)."""
    modules = list(encoder.modules()) if modules is None else modules
    with torch.no_grad():
        if cfg["variant"] == "paper":
            set_training(encoder, modules, False)
        with autocast():
            f_other = encoder(x_other)
        if not all(mod.training for mod in modules):   # official: already in training mode as a rule
            set_training(encoder, modules, True)
    log_p = torch.log_softmax(head(f_other.float()), dim=1)
    ce = F.nll_loss(log_p, labels, reduction="none")   # = F.cross_entropy(logits, ...): the same two kernels
    local = labels.shape[0]
    # The reference loss is Σ_i w_i·ce_i: (ce·mask).sum()/k over the hard samples (w_i = 1/k on
    # them), ce.sum()/(B·world) for the whole batch. Its head gradient is taken as ce's with
    # grad_outputs=w: the very w its backward would send each ce_i, so the same gradient bit for bit
    # without the loss's forward (mul, sum, div) and the matching backward steps.
    if cfg["guidance"] == "hard":
        with torch.no_grad():   # the selection needs no graph: no detach; cross-entropy's log_softmax reused
            ent = surgery.entropy_from_log_probs(log_p)
        if world > 1:
            parts = [torch.empty_like(ent) for _ in range(world)]
            dist.all_gather(parts, ent)
            ent = torch.cat(parts)
        w, _ = surgery.global_hard_sample_weights(ent, cfg["topk_frac"], rank * local, local, dtype=ce.dtype)
    else:
        w = torch.full_like(ce, 1.0 / (local * world))   # float32(1/N): the value ce.sum()/N sends back
    g_ref = surgery.flatten_head_grad(*torch.autograd.grad(ce, [head.weight, head.bias], grad_outputs=w))
    if world > 1:
        dist.all_reduce(g_ref)
    return g_ref


def head_grad_buffer(head):
    """The head's gradient as one flat buffer [weight row-major | bias] (the surgery's layout) whose
    views ARE head.weight.grad and head.bias.grad, so that backward accumulates straight into the
    vector the surgery reads and rewrites: no flatten, no copy back. Returns the buffer; a fresh one,
    zero-filled, whenever the gradients are not (or no longer, e.g. after a zero_grad(set_to_none=True)
    elsewhere) such views. The caller zeroes it before each backward."""
    w, b = head.weight, head.bias
    gw, gb = w.grad, b.grad
    n = w.numel()
    if gw is not None and gb is not None and gw._base is not None and gb._base is gw._base:
        flat = gw._base
        if (flat.dim() == 1 and flat.numel() == n + b.numel() and flat.dtype == w.dtype and flat.device == w.device
                and gw.is_contiguous() and gw.data_ptr() == flat.data_ptr()
                and gb.data_ptr() == flat.data_ptr() + n * flat.element_size()):
            return flat
    flat = torch.zeros(n + b.numel(), dtype=w.dtype, device=w.device)
    w.grad, b.grad = flat[:n].view_as(w), flat[n:]
    return flat


def reset_grads(optimizer_params, encoder_params, active, head, flat, official):
    """Before the phase of encoder `active`, leave every gradient as optimizer.zero_grad(set_to_none=
    not official) leaves it for the backward that follows (the same values after it), in fewer operators:
    the head's flat buffer zeroed in place (backward adds into it); paper: every other gradient None;
    official: the active encoder's None (backward's fresh tensors become them: the values 0 + g would
    give; `fill_missing_grads` re-creates any it leaves unset), every other one zeroed in ONE foreach
    call, the other encoders' missing ones created zero-filled (the released step's reference
    backward gives every parameter a gradient tensor from the first phase).
    optimizer_params: the optimiser's parameters; encoder_params: {modality: its encoder's parameters}."""
    keep = {id(head.weight), id(head.bias)}
    if not official:
        for p in optimizer_params:
            if id(p) not in keep:
                p.grad = None
        flat.zero_()
        return
    for m, params in encoder_params.items():
        if m != active:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
    fresh = {id(p) for p in encoder_params[active]}
    grads = [flat]
    for p in optimizer_params:
        if id(p) in fresh:
            p.grad = None
        elif p.grad is not None and id(p) not in keep:
            grads.append(p.grad)
    torch._foreach_zero_(grads)


def fill_missing_grads(params):
    """Official variant, after the backward: a parameter of the active encoder the loss did not reach
    gets its zero gradient back (zero_grad(set_to_none=False) would have left it one: Adam steps it)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def gaal_step(encoders, head, optimizer, batch, order, cfg, world=1, rank=0, autocast=contextlib.nullcontext):
    """One training batch of GAAL: an update of order[0] then of order[1], each guided by the other.

    Returns what to log, as device tensors: per modality its loss, batch accuracy, whether the head
    gradients conflicted, the multiplier v and the cosines before/after the surgery.

    The released official step back-propagates the reference loss through the other encoder, so from
    the very first phase every parameter holds a gradient tensor, zero-filled by
    zero_grad(set_to_none=False), which Adam steps (weight decay, momentum echo). Ours takes the
    reference without a graph and creates the missing zero tensors (first batch of a fresh or of a
    resumed run), so the first image phase steps the tabular encoder too, as released (reset_grads).
    The head's gradient lives in one flat buffer (head_grad_buffer) that the surgery edits in place."""
    labels = batch["label"]
    official = cfg["variant"] == "official"
    flat = head_grad_buffer(head)
    optimizer_params = [p for group in optimizer.param_groups for p in group["params"]]
    encoder_params = {name: list(encoder.parameters()) for name, encoder in encoders.items()}  # walked once a step
    encoder_modules = {name: list(encoder.modules()) for name, encoder in encoders.items()}
    stats = {}
    for m, other in ((order[0], order[1]), (order[1], order[0])):
        g_ref = reference_gradient(encoders[other], head, batch[other], labels, cfg, world, rank, autocast,
                                   encoder_modules[other])
        with autocast():
            logits = head(encoders[m](batch[m]).float())
        loss = F.cross_entropy(logits, labels)
        # official: zeros -> the inactive encoder is stepped
        reset_grads(optimizer_params, encoder_params, m, head, flat, official)
        loss.backward()
        if official:
            fill_missing_grads(encoder_params[m])
        active = [p for p in encoder_params[m] + [head.weight, head.bias] if p.grad is not None]
        all_reduce_mean_([p.grad for p in active], world)   # the head's views: `flat` is reduced in place
        result = surgery.project_conflicting_with_stats(flat, g_ref, cfg["margin"], cfg["qp_eps"],
                                                        out=flat if cfg["surgery"] else None)
        optimizer.step()
        conflict, v, cos_before, cos_after = torch.stack(result[1:]).float().unbind()   # one cast for the four
        stats.update({f"{m}/loss": loss.detach(),
                      f"{m}/acc": torch.mean(logits.argmax(1) == labels, dtype=torch.float32),
                      f"{m}/conflict": conflict, f"{m}/v": v,
                      f"{m}/cos_before": cos_before, f"{m}/cos_after": cos_after})
    return stats


def build(cfg: dict, ctx: loop.Context) -> loop.Setup:
    """The shared-head model (one optimiser over everything, as the released code) and the per-rank
    augmentation stream of the image modality (checkpointed with the rank's RNG states)."""
    model = SharedHeadModel(ctx.meta, cfg["encoders"], ctx.modalities).to(ctx.device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    images = [m for m in ctx.modalities if ctx.meta["modalities"][m]["kind"] == "image"]
    if cfg["augment"] and not images:
        raise ConfigError(f"augment: {cfg['data']} has no modality of kind image to augment")
    try:
        augment = build_augment(cfg["augment"] or None,
                                generator=torch.Generator(ctx.device).manual_seed(cfg["seed"] + ctx.rank))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"augment: {err}") from None
    return loop.Setup(model, optimizer, optim.build_scheduler(cfg, optimizer), fuse=SharedHeadModel.fuse,
                      generators={"augment": augment.generator}, parts=dict(augment=augment, images=images),
                      result=dict(variant=cfg["variant"], surgery=cfg["surgery"], guidance=cfg["guidance"]))


def step(setup: loop.Setup, batch: dict, ctx: loop.Context) -> dict:
    augment = setup.parts["augment"]
    for m in setup.parts["images"]:
        batch[m] = augment(batch[m])
    model = setup.model
    return gaal_step(model.encoders, model.head, setup.optimizer, batch, ctx.modalities, ctx.cfg, ctx.world,
                     ctx.rank, ctx.autocast)


def main(cfg: dict) -> dict:
    check_config(cfg)
    return loop.train(cfg, method="GAAL", build=build, step=step, min_modalities=2, max_modalities=2,
                      deepspeed="its gradient surgery edits the shared head's reduced gradient against the "
                                "other modality's reference gradient",
                      compile_step="inductor fails on its surgery, which reads the gradients between its backward "
                                   "calls (benchmarks/capture.py)")


if __name__ == "__main__":
    loop.run_entry_point(main, CONFIG, DEFAULT_CONFIG)
