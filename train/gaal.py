"""GAAL: gradient-aligned alternating learning with cross-modal gradient surgery (tabular + image).

    accelerate launch train/gaal.py                                   # embedded image+tabular benchmark
    accelerate launch train/gaal.py --variant paper --surgery false   # ablations: surgery, guidance, ...
    accelerate launch --multi_gpu --num_processes 2 train/gaal.py     # 2-rank data parallel

Per training batch, two updates, image first (README.md, "GAAL"):
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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from methods import surgery  # noqa: E402
from models.augment import build_augment  # noqa: E402
from models.fusion import SharedHeadModel  # noqa: E402
from train import common  # noqa: E402

# ------------------------------------------------------------------------------------------------
DEFAULTS = dict(
    data="data/embedded_imgtab",   # a shard directory; a missing embedded_<flavour> is generated
    data_seed=0,
    modalities=[],                 # the two modalities in update order ([] = the dataset's order)
    encoders={},                   # per-modality encoder config (models.encoders.build_encoder)
    augment={},                    # on-device augmentation of the image modality ({} = none;
                                   # keys: models.augment.AUGMENT_DEFAULTS, e.g. {p: 0.95} for DVM's recipe)
    out_dir="runs/gaal_imgtab",
    seed=0,
    resume=False,
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
    eval_batch_size=500,
    num_workers=0,
    optimizer="adam",
    lr=1e-3,
    weight_decay=1e-4,             # coupled L2 (torch Adam), as the released code
    momentum=0.9,
    scheduler="step",              # StepLR(10, 0.1) per epoch
    step_size=10,
    gamma=0.1,
    mixed_precision="no",          # no | bf16
    channels_last=False,           # CNN weights (and so their activations) in NHWC: faster convolutions under bf16 on GPUs
    cpu=False,
    log_every=25,
    ckpt_every_steps=0,
    keep_checkpoints=2,
    preempt_check_every=1,         # steps between checks for SIGTERM/SIGUSR1 across ranks
    stop_after_steps=0,
    progress=True,
)
DEFAULT_CONFIG = "train/configs/gaal_imgtab.yaml"


def check_config(cfg):
    for key, allowed in (("variant", ("official", "paper")), ("guidance", ("hard", "full")),
                         ("mixed_precision", ("no", "bf16"))):
        if cfg[key] not in allowed:
            raise common.ConfigError(f"{key}='{cfg[key]}': choose {' or '.join(allowed)}"
                                     + (" (fp16 needs a loss scaler, which the two-update step does not use)"
                                        if key == "mixed_precision" else ""))
    if not 0 < cfg["topk_frac"] <= 1:
        raise common.ConfigError(f"topk_frac={cfg['topk_frac']}: must be in (0, 1]")
    if cfg["margin"] < 0 or cfg["qp_eps"] < 0:
        raise common.ConfigError("margin and qp_eps must be >= 0")


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
        common.all_reduce_mean_([p.grad for p in active], world)
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


def main(cfg: dict) -> dict:
    check_config(cfg)
    accelerator = common.setup_accelerator(cfg)
    common.refuse_deepspeed(accelerator, "GAAL", "its gradient surgery edits the shared head's reduced gradient against the other modality's reference gradient")
    preemption = common.Preemption(accelerator, cfg["preempt_check_every"])   # SIGTERM/SIGUSR1 -> checkpoint, exit
    meta = common.prepare_data(cfg, accelerator)            # validates every shard before any compute
    if meta["task"] != "classification":
        raise common.ConfigError(f"{cfg['data']}: GAAL is a classification method (task is {meta['task']})")
    order = cfg["modalities"] or list(meta["modalities"])
    if len(order) != 2 or any(m not in meta["modalities"] for m in order):
        raise common.ConfigError(f"modalities={order}: GAAL needs exactly two of {list(meta['modalities'])}")
    run_dir, writer = common.setup_run_dir(cfg, accelerator)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    official = cfg["variant"] == "official"

    # data ----------------------------------------------------------------------------------------
    train_loader, train_sampler = common.make_loader(cfg, meta, "train", accelerator, order, train=True)
    val_loader, _ = common.make_loader(cfg, meta, "val", accelerator, order)
    test_loader, _ = common.make_loader(cfg, meta, "test", accelerator, order)
    if len(train_sampler) == 0:
        raise common.ConfigError(f"batch_size={cfg['batch_size']} exceeds the training split of {cfg['data']}")

    # model, optimiser (one optimiser over everything, as the released code) -----------------------
    model = SharedHeadModel(meta, cfg["encoders"], order).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    encoders, head = model.encoders, model.head
    optimizer = common.build_optimizer(cfg, model.parameters())
    scheduler = common.build_scheduler(cfg, optimizer)
    images = [m for m in order if meta["modalities"][m]["kind"] == "image"]
    if cfg["augment"] and not images:
        raise common.ConfigError(f"augment: {cfg['data']} has no modality of kind image to augment")
    try:   # per-rank stream, checkpointed with the rank's RNG states so that resume stays exact
        augment = build_augment(cfg["augment"] or None, generator=torch.Generator(device).manual_seed(cfg["seed"] + rank))
    except (ValueError, TypeError) as err:
        raise common.ConfigError(f"augment: {err}") from None
    generators = {"augment": augment.generator}

    state = dict(epoch=0, batch_in_epoch=0, step=0, best=None, best_epoch=-1, bad_epochs=0, stopped_early=False)
    checkpointed = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    if cfg["resume"]:
        state = common.load_checkpoint(run_dir, accelerator, checkpointed, generators, cfg=cfg)
        accelerator.print(f"[resume] from step {state['step']} (epoch {state['epoch']}, batch {state['batch_in_epoch']})")

    # loop ----------------------------------------------------------------------------------------
    window = {f"{m}/{k}": torch.zeros((), device=device) for m in order
              for k in ("loss", "acc", "conflict", "v", "cos_before", "cos_after")}
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    model.train()
    while state["epoch"] < cfg["epochs"] and not state["stopped_early"]:
        train_sampler.set_epoch(state["epoch"], start_batch=state["batch_in_epoch"])
        bar = tqdm(train_loader, total=len(train_sampler), desc=f"epoch {state['epoch']}", leave=False,
                   disable=not (cfg["progress"] and accelerator.is_main_process))
        for batch in bar:
            batch = common.to_device(batch, device)
            for m in images:
                batch[m] = augment(batch[m])
            stats = gaal_step(encoders, head, optimizer, batch, order, cfg, world, rank, accelerator.autocast)
            for key, value in stats.items():   # summed on the device, averaged at log time
                window[key] += value
            nonfinite |= ~torch.isfinite(stats[f"{order[0]}/loss"] + stats[f"{order[1]}/loss"])

            state["step"] += 1
            state["batch_in_epoch"] += 1
            if state["step"] % cfg["log_every"] == 0:
                common.check_finite(nonfinite, state["step"], cfg["log_every"], accelerator)
                scalars = {k: accelerator.reduce(v / cfg["log_every"], "mean") for k, v in window.items()}
                scalars["train/lr"] = optimizer.param_groups[0]["lr"]
                common.log_scalars(writer, scalars, state["step"])
                for v in window.values():
                    v.zero_()
                if accelerator.is_main_process:
                    bar.set_postfix({m: f"{float(scalars[f'{m}/loss']):.3f}" for m in order})
            if common.checkpoint_at_step_boundary(cfg, state, preemption, nonfinite, run_dir, accelerator,
                                                  checkpointed, generators):
                return {"stopped_at_step": state["step"], "run_dir": str(run_dir)}
        bar.close()

        # end of epoch: validate (fused = mean of the two heads' logits), early stopping, checkpoint
        common.check_finite(nonfinite, state["step"], cfg["log_every"], accelerator)
        scheduler.step()
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        val = common.evaluate(model, val_loader, accelerator, "classification", SharedHeadModel.fuse)
        common.log_scalars(writer, {f"val_{k}/{name}": v for k, mets in val.items() for name, v in mets.items()},
                           state["step"])
        common.append_jsonl(run_dir, {"epoch": state["epoch"], "step": state["step"], "val": val}, accelerator)
        score = val["fused"]["acc"]
        if state["best"] is None or score > state["best"] + cfg["min_delta"]:
            state["best"], state["best_epoch"], state["bad_epochs"] = score, state["epoch"], 0
            if accelerator.is_main_process:
                common.save_model_atomic(model, run_dir / "best.pt")
        else:
            state["bad_epochs"] += 1
            state["stopped_early"] = state["bad_epochs"] >= cfg["patience"]
        accelerator.print(f"epoch {state['epoch']}: val " + "  ".join(f"{k} {v['acc']:.4f}" for k, v in val.items())
                          + ("  [early stop]" if state["stopped_early"] else ""))
        common.save_checkpoint(run_dir, accelerator, checkpointed, state, cfg["keep_checkpoints"], generators)

    # test with the model selected on validation ----------------------------------------------------
    return common.test_best_model(model, run_dir, accelerator, "classification", SharedHeadModel.fuse,
                                  {"val": val_loader, "test": test_loader}, meta, state, writer,
                                  variant=cfg["variant"], surgery=cfg["surgery"], guidance=cfg["guidance"])


if __name__ == "__main__":
    common.run_entry_point(main, DEFAULTS, DEFAULT_CONFIG)
