"""Joint training baseline: late fusion (per-modality heads, logits summed), one loss on the fused
prediction, optionally plus the sum of the per-modality losses (`aux_weight`).

    accelerate launch train/joint.py                                  # embedded image+tabular benchmark
    accelerate launch train/joint.py --config train/configs/joint_av.yaml --epochs 5
    accelerate launch --multi_gpu --num_processes 2 train/joint.py    # 2-rank DDP (gloo on CPU)
    accelerate launch --config_file train/configs/accelerate/deepspeed_zero2.yaml --num_processes 8 \
        train/joint.py --mixed_precision bf16                         # DeepSpeed ZeRO-2 (or zero1)

Each head alone is that modality's classifier, so the per-modality accuracies read off a jointly
trained model show modality laziness: the weak modality stays far below what it can reach alone.
"""
from __future__ import annotations

from train.config import ConfigError, Key, declare, exit_on_help
from train.loop_config import LOOP_CONFIG, NON_NEGATIVE

CONFIG = declare(LOOP_CONFIG,   # + the loop's keys (data, optimiser, selection, ...): train/loop_config.py
    data="data/embedded_imgtab",
    out_dir="runs/joint_imgtab",
    epochs=15,
    batch_size=128,
    aux_weight=Key(0.0, "+ aux_weight * sum_m loss(head_m(f_m), y)", **NON_NEGATIVE),
    grad_clip=Key(0.0, "clip the global gradient norm (0 = off)", **NON_NEGATIVE),
    mixed_precision=Key("no", "no | bf16 | fp16", choices=("no", "bf16", "fp16")),
)
DEFAULT_CONFIG = "train/configs/joint_imgtab.yaml"
if __name__ == "__main__":   # --help needs nothing below: answered before torch is imported
    exit_on_help(CONFIG, DEFAULT_CONFIG)

import torch
import torch.nn.functional as F

from models.fusion import LateFusionModel
from train import distributed, loop, optim
from train.metrics import task_loss


def build(cfg: dict, ctx: loop.Context) -> loop.Setup:
    model = LateFusionModel(ctx.meta, cfg["encoders"], ctx.modalities)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    scheduler = optim.build_scheduler(cfg, optimizer)
    distributed.configure_deepspeed(ctx.accelerator, cfg, model)   # a no-op without DeepSpeed
    model, optimizer = ctx.accelerator.prepare(model, optimizer)
    return loop.Setup(model, optimizer, scheduler, fuse=LateFusionModel.fuse,
                      result=dict(aux_weight=cfg["aux_weight"]))


def joint_step(model, optimizer, batch, cfg, task, accelerator, diagnostics=False):
    """One update of the late-fusion model on task_loss(sum of the heads' logits, y)
    [+ aux_weight * sum of the per-modality losses]. Under DeepSpeed `model` is the engine: its own
    backward and step (Accelerate's wrapper would step inside backward, before the diagnostics read
    the gradients; DeepSpeed clips inside its step, `gradient_clipping` = grad_clip).

    With `diagnostics` (a logged step), per modality: its head's loss and batch accuracy, the
    encoder's gradient norm, and the cosine between the head gradient the fused loss sends and the
    one the modality's own loss through its head alone would send — modality laziness, visible."""
    engine = model if distributed.deepspeed_stage(accelerator) is not None else None
    raw = accelerator.unwrap_model(model)
    labels = batch["label"]
    with accelerator.autocast():
        out = model(batch)
        fused = LateFusionModel.fuse(out)
        loss = task_loss(task, fused, labels)
        if cfg["aux_weight"]:
            loss = loss + cfg["aux_weight"] * sum(task_loss(task, lg, labels) for _, lg in out.values())
    optimizer.zero_grad(set_to_none=True)
    if engine is None:
        accelerator.backward(loss)
    else:
        engine.backward(loss)
    if cfg["grad_clip"] > 0 and engine is None:
        accelerator.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
    stats = {"train/loss": loss.detach()}
    if diagnostics:
        stats |= lazy_modality_diagnostics(raw, engine, out, labels, cfg, task, accelerator)
    optimizer.step()   # a no-op under DeepSpeed (Accelerate's wrapper); the engine steps:
    if engine is not None:
        engine.step()
    return stats


def lazy_modality_diagnostics(raw, engine, out, labels, cfg, task, accelerator) -> dict:
    """Per-modality scalars read between backward and step (see joint_step)."""
    if engine is None:
        fused_head_grads = {m: distributed.flat_grad(raw.heads[m].parameters()) for m in out}
        encoder_norms = {m: distributed.grad_norm(raw.encoders[m]) for m in out}
    else:
        # ZeRO-1/2: p.grad is None after engine.backward; the diagnostics are computed (not skipped)
        # from the full reduced gradients, deepspeed.utils.safe_get_full_grad (collectives, same
        # order on every rank). DeepSpeed clips later, inside engine.step: scale as clip_grad_norm_
        # does, so that the logged values are the clipped ones, as without DeepSpeed.
        fused_head_grads = {m: distributed.deepspeed_full_grads(raw.heads[m].parameters()) for m in out}
        encoder_norms = {m: distributed.deepspeed_grad_norm(raw.encoders[m].parameters()) for m in out}
        if cfg["grad_clip"] > 0:
            total = torch.linalg.vector_norm(torch.stack(
                [*encoder_norms.values(), *map(torch.linalg.vector_norm, fused_head_grads.values())]))
            coef = torch.clamp(cfg["grad_clip"] / (total + 1e-6), max=1.0)
            fused_head_grads = {m: g * coef for m, g in fused_head_grads.items()}
            encoder_norms = {m: n * coef for m, n in encoder_norms.items()}
    stats = {}
    for m, (features, logits) in out.items():
        # this modality's own loss through its head alone, vs what the fused loss sends it
        head_input = features.detach().float()
        if engine is not None:   # under DeepSpeed bf16 the head's weights are bf16
            head_input = head_input.to(next(raw.heads[m].parameters()).dtype)
        own = task_loss(task, raw.heads[m](head_input).float(), labels)
        own_grad = distributed.flat_grad(raw.heads[m].parameters(), own, accelerator)
        stats[f"{m}/loss"] = task_loss(task, logits.detach().float(), labels)
        if task == "classification":
            stats[f"{m}/acc"] = (logits.argmax(1) == labels).float().mean()
        stats[f"{m}/grad_norm_encoder"] = encoder_norms[m]
        stats[f"{m}/cos_head_grad_own_vs_fused"] = F.cosine_similarity(
            own_grad.float(), fused_head_grads[m], dim=0, eps=1e-12)
    return stats


def step(setup: loop.Setup, batch: dict, ctx: loop.Context) -> dict:
    return joint_step(setup.model, setup.optimizer, batch, ctx.cfg, ctx.task, ctx.accelerator,
                      diagnostics=ctx.log_step)


def main(cfg: dict, method: str = "joint") -> dict:
    if cfg["mixed_precision"] not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision='{cfg['mixed_precision']}': choose no, bf16 or fp16")
    return loop.train(cfg, method=method, build=build, step=step, tasks=("classification", "regression"),
                      deepspeed=True, compile_step=True)


if __name__ == "__main__":
    loop.run_entry_point(main, CONFIG, DEFAULT_CONFIG)
