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

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from methods import surgery
from models.augment import build_augment
from models.fusion import SharedHeadModel
from train import loop, optim
from train.config import ConfigError, check_choice
from train.distributed import all_reduce_mean_

# ------------------------------------------------------------------------------------------------
DEFAULTS = loop.DEFAULTS | dict(   # + the loop's keys (data, optimiser, selection, ...): train/loop.py
    data="data/embedded_imgtab",   # a shard directory; a missing embedded_<flavour> is generated
    modalities=[],                 # the two modalities in update order ([] = the dataset's order)
    augment={},                    # on-device augmentation of the image modality ({} = none;
                                   # keys: models.augment.AUGMENT_DEFAULTS, e.g. {p: 0.95} for DVM's recipe)
    out_dir="runs/gaal_imgtab",
    variant="official",            # official | paper
    surgery=True,                  # cross-modal gradient surgery on the head gradient (paper: CGS)
    guidance="hard",               # hard | full: reference from the hard samples or the whole batch (UGG)
    topk_frac=0.5,
    margin=0.75,
    qp_eps=1e-3,
    epochs=100,
    patience=10,                   # early stopping on fused validation accuracy
    min_delta=2e-4,
    batch_size=256,
    optimizer="adam",
    lr=1e-3,
    weight_decay=1e-4,             # coupled L2 (torch Adam), as the released code
    scheduler="step",              # StepLR(10, 0.1) per epoch
    step_size=10,
    gamma=0.1,
    mixed_precision="no",          # no | bf16
    channels_last=False,           # CNN weights (and so their activations) in NHWC: faster convolutions under bf16 on GPUs
)
DEFAULT_CONFIG = "train/configs/gaal_imgtab.yaml"


def check_config(cfg):
    loop.check_config(cfg)
    for key, allowed in (("variant", ("official", "paper")), ("guidance", ("hard", "full")),
                         ("mixed_precision", ("no", "bf16"))):
        check_choice(key, cfg[key], allowed)   # bf16 only: fp16 needs a loss scaler the two-update step lacks
    if not 0 < cfg["topk_frac"] <= 1:
        raise ConfigError(f"topk_frac={cfg['topk_frac']}: must be in (0, 1]")
    if cfg["margin"] < 0 or cfg["qp_eps"] < 0:
        raise ConfigError("margin and qp_eps must be >= 0")


def reference_gradient(encoder, head, x_other, labels, cfg, world, rank, autocast):
    """g_ref: the head gradient of the CE over the other modality's hard samples, flattened
    [weight | bias]. The hard samples are the global top-k by entropy over all ranks' samples and
    the loss is normalised by the global count, so the all-reduced sum equals one rank holding the
    whole batch. The other encoder runs without a graph: training mode in the official variant
    (its BatchNorm statistics update), eval mode in the paper variant (untouched)."""
    with torch.no_grad():
        if cfg["variant"] == "paper":
            encoder.eval()
        with autocast():
            f_other = encoder(x_other)
        encoder.train()
    logits = head(f_other.float())
    ce = F.cross_entropy(logits, labels, reduction="none")
    local = labels.shape[0]
    if cfg["guidance"] == "hard":
        ent = surgery.entropy(logits.detach())
        if world > 1:
            parts = [torch.empty_like(ent) for _ in range(world)]
            dist.all_gather(parts, ent)
            ent = torch.cat(parts)
        mask, k = surgery.global_hard_sample_mask(ent, cfg["topk_frac"], rank * local, local)
        loss_ref = (ce * mask).sum() / k
    else:
        loss_ref = ce.sum() / (local * world)
    g_ref = surgery.flatten_head_grad(*torch.autograd.grad(loss_ref, [head.weight, head.bias]))
    if world > 1:
        dist.all_reduce(g_ref)
    return g_ref


def gaal_step(encoders, head, optimizer, batch, order, cfg, world=1, rank=0, autocast=contextlib.nullcontext):
    """One training batch of GAAL: an update of order[0] then of order[1], each guided by the other.

    Returns what to log, as device tensors: per modality its loss, batch accuracy, whether the head
    gradients conflicted, the multiplier v and the cosines before/after the surgery."""
    labels = batch["label"]
    official = cfg["variant"] == "official"
    if official:
        # The released step back-propagates the reference loss through the other encoder, so from
        # the very first phase every parameter holds a gradient tensor, zero-filled by
        # zero_grad(set_to_none=False), which Adam steps (weight decay, momentum echo). Ours takes
        # the reference without a graph: create the missing ones (first batch of a fresh or of a
        # resumed run), so the first image phase steps the tabular encoder too, as released.
        for p in list(encoders.parameters()) + list(head.parameters()):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    stats = {}
    for m, other in ((order[0], order[1]), (order[1], order[0])):
        g_ref = reference_gradient(encoders[other], head, batch[other], labels, cfg, world, rank, autocast)
        with autocast():
            logits = head(encoders[m](batch[m]).float())
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=not official)   # official: zeros -> the inactive encoder is stepped
        loss.backward()
        active = [p for p in list(encoders[m].parameters()) + [head.weight, head.bias] if p.grad is not None]
        all_reduce_mean_([p.grad for p in active], world)
        g = surgery.flatten_head_grad(head.weight.grad, head.bias.grad)
        result = surgery.project_conflicting_with_stats(g, g_ref, cfg["margin"], cfg["qp_eps"])
        if cfg["surgery"]:
            weight_grad, bias_grad = surgery.unflatten_head_grad(result.g, head.weight.shape)
            head.weight.grad.copy_(weight_grad)
            head.bias.grad.copy_(bias_grad)
        optimizer.step()
        stats.update({f"{m}/loss": loss.detach(), f"{m}/acc": (logits.detach().argmax(1) == labels).float().mean(),
                      f"{m}/conflict": result.conflict.float(), f"{m}/v": result.v.float(),
                      f"{m}/cos_before": result.cos_before.float(), f"{m}/cos_after": result.cos_after.float()})
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
                                "other modality's reference gradient")


if __name__ == "__main__":
    loop.run_entry_point(main, DEFAULTS, DEFAULT_CONFIG)
