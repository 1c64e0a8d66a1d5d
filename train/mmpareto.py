"""MMPareto: the multimodal loss plus one unimodal loss per modality, with each encoder's two gradients
integrated Pareto-style (a direction common to both, magnitude given back and enhanced).

    accelerate launch train/mmpareto.py                                            # embedded audio-visual benchmark
    accelerate launch train/mmpareto.py --config train/configs/mmpareto_crema_d.yaml --data /data/shards/crema_d
    accelerate launch train/mmpareto.py --variant paper --magnitude_scale 1.0      # per-encoder magnitude, no boost
    accelerate launch --multi_gpu --num_processes 2 train/mmpareto.py              # 2-rank data parallel

Model (models.fusion.ConcatAndUnimodalHeadsModel, the released AVClassifier): per modality an encoder E_m and a
unimodal head H_m = Linear(D_m, C); the fused prediction is H(cat_m f_m), H = Linear(sum D_m, C).
Losses: L_mm = CE(H(cat f), y), L_m = CE(H_m(f_m), y). Per training batch (docs/methods/mmpareto.md):
  for each encoder E_m, over all its parameters:
    g_mm = grad_{E_m} L_mm,  g_u = grad_{E_m} L_m
    cos = cos(g_mm, g_u);  (a_mm, a_u) = (1/2, 1/2) if cos > 0, else the two-task min-norm (MGDA)
      weights (c, 1 - c), c = argmin_c |c g_mm + (1 - c) g_u|^2 (methods.mmpareto.min_norm_weight)
    h = 2 (a_mm g_mm + a_u g_u)
    grad E_m <- magnitude_scale * max(1, |g_mm + g_u| / |h|) * h
  grad H <- grad_H L_mm, grad H_m <- grad_{H_m} L_m (the heads are not integrated), optimizer step.
  variant official (the released code): the cosine and the weights per encoder, the magnitude
    factor per parameter TENSOR of the encoder; magnitude_scale = 1.5 (the released gamma);
  variant paper: the magnitude factor over the whole encoder's gradient, as the paper's algorithm
    writes it per encoder (there the max(1, .) never binds: the min-norm element is the shortest).

Two backward passes per batch (L_mm, then sum_m L_m: each L_m reaches only E_m and H_m), where the
released step runs one per loss plus one of their sum: the same gradients. Per encoder the two
gradient sets are each copied into one flat buffer and integrated there (methods.mmpareto.
integrate_flat); the encoder's final .grad are views of the integrated buffer.

Data parallelism without a DDP wrapper: torch.autograd.grad bypasses DDP, so both gradient sets are
all-reduced by hand in one bucket before the cosines, the weights and the norms are computed — on
the global-batch gradients, so N ranks x B/N = 1 rank x B (models without BatchNorm).

TensorBoard per modality: train loss/acc of its head, the cosine of g_mm and g_u on its encoder,
whether they conflicted, a_mm, the mean magnitude factor, |g_mm| and |g_u|; fused train loss/acc.
"""
from __future__ import annotations

from train.config import ConfigError, Key, check_declared, declare, exit_on_help
from train.loop_config import LOOP_CONFIG

CONFIG = declare(LOOP_CONFIG,   # + the loop's keys (data, optimiser, selection, ...): train/loop_config.py
    data="data/embedded_av",
    modalities=Key([], "the modalities, in the fused head's concatenation order ([] = the dataset's)"),
    out_dir="runs/mmpareto_av",
    variant=Key("official", "official: magnitude factor per parameter tensor | paper: per encoder",
                choices=("official", "paper")),
    magnitude_scale=Key(1.5, "gamma: the final encoder gradient's extra scale (released: 1.5)"),
    epochs=Key(50, "the released recipe (code/MMPareto.py argparse defaults, CREMA-D); the embedded configs "
                   "use the joint baseline's instead"),
    batch_size=Key(64, "the released recipe (the embedded configs use the joint baseline's)"),
    optimizer="sgd",
    lr=Key(2e-3, "constant: the released StepLR(30, 0.1) is built but never stepped"),
    momentum=0.9,
    weight_decay=Key(1e-4, "coupled L2, added by the optimiser to the integrated gradient"),
    scheduler="none",
    mixed_precision=Key("no", "no | bf16 (the forward; losses and the integration in float32)",
                        choices=("no", "bf16")),
)
DEFAULT_CONFIG = "train/configs/mmpareto_av.yaml"
if __name__ == "__main__":   # --help needs nothing below: answered before torch is imported
    exit_on_help(CONFIG, DEFAULT_CONFIG)

import contextlib
import functools
import operator

import torch
import torch.nn.functional as F

from methods import mmpareto
from models.fusion import ConcatAndUnimodalHeadsModel
from train import loop, optim
from train.distributed import all_reduce_mean_


def check_config(cfg):
    loop.check_config(cfg)
    check_declared(cfg, CONFIG)   # choices and bounds, for a config built by hand too
    if not cfg["magnitude_scale"] > 0:
        raise ConfigError(f"magnitude_scale={cfg['magnitude_scale']}: must be > 0 (released: 1.5)")


def build(cfg: dict, ctx: loop.Context) -> loop.Setup:
    """The concat-fusion model with unimodal heads; one optimiser over everything (as released)."""
    model = ConcatAndUnimodalHeadsModel(ctx.meta, cfg["encoders"], ctx.modalities).to(ctx.device)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    return loop.Setup(model, optimizer, optim.build_scheduler(cfg, optimizer),
                      result=dict(variant=cfg["variant"], magnitude_scale=cfg["magnitude_scale"]))


def gradients(loss, params, retain_graph=False):
    """d loss / d params, zeros for a parameter the loss does not reach."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _sum(tensors):
    """Python's sum without its leading 0 + (one operator fewer; the same value)."""
    return functools.reduce(operator.add, tensors)


_SEGMENT_IDS: dict = {}


def _segments(sizes, device):
    """methods.mmpareto.segment_ids for an encoder's layout, built once per (layout, device): its
    host-to-device copy happens on the first step only, never again inside a step."""
    key = (tuple(sizes), device)
    if key not in _SEGMENT_IDS:
        _SEGMENT_IDS[key] = mmpareto.segment_ids(sizes, device)
    return _SEGMENT_IDS[key]


def set_grads(params, grads):
    """p.grad = g for each pair (the tensors themselves, not copies)."""
    for p, g in zip(params, grads):
        p.grad = g


def integrate_encoder_grads(params, g_mm, g_u, cfg):
    """One encoder's gradient: the Pareto integration of its multimodal and unimodal gradients
    (official: the magnitude rescaled per tensor, paper: over the whole encoder), set as the
    parameters' .grad (views of one flat buffer). Returns (the Pareto weights, the magnitude factor)."""
    per_tensor = cfg["variant"] == "official"
    # one flat buffer per encoder and gradient set: the cosine, the dot products, h and the final
    # gradient are a few operators on it, the per-tensor norms one foreach norm over its segments
    sizes = [p.numel() for p in params]
    flat_mm, flat_u = mmpareto.flatten(g_mm), mmpareto.flatten(g_u)
    weights = mmpareto.pareto_weights_flat(flat_mm, flat_u)
    final, factor = mmpareto.integrate_flat(flat_mm, flat_u, weights, sizes, cfg["magnitude_scale"],
                                            per_tensor=per_tensor,
                                            segments=_segments(sizes, flat_mm.device) if per_tensor else None)
    for p, g in zip(params, final.split(sizes)):
        p.grad = g if g.dim() == p.dim() else g.view(p.shape)   # views of one buffer (a 1-d one as is)
    return weights, factor


def encoder_stats(m, loss, logits, labels, weights, factor, g_mm, g_u):
    """What one modality logs: its head's loss and batch accuracy, the cosine of g_mm and g_u on its
    encoder, the conflict flag, a_mm, the magnitude factor, |g_mm| and |g_u|."""
    return {f"{m}/loss": loss.detach(), f"{m}/acc": (logits.detach().argmax(1) == labels).float().mean(),
            f"{m}/cos_mm_uni": weights.cos, f"{m}/conflict": weights.conflict.float(),
            f"{m}/alpha_mm": weights.alpha_m, f"{m}/magnitude_factor": factor,
            f"{m}/grad_norm_mm": torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g_mm))),
            f"{m}/grad_norm_uni": torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g_u)))}


def mmpareto_step(model, optimizer, batch, cfg, world=1, autocast=contextlib.nullcontext):
    """One MMPareto update of a ConcatAndUnimodalHeadsModel on a batch (see the module docstring):
    forward and losses -> the multimodal and the unimodal gradients apart (averaged over the `world`
    ranks before anything is decided from them) -> the heads take their own, each encoder the Pareto
    integration of its two -> one optimiser step.

    Returns device tensors to log: per modality its head's loss and batch accuracy, the cosine of
    g_mm and g_u on its encoder, the conflict flag, a_mm, the mean magnitude factor, |g_mm|, |g_u|;
    the fused loss and accuracy and the total loss L_mm + sum_m L_m."""
    labels = batch["label"]
    with autocast():
        out = model(batch)
        fused = model.fuse(out)
    loss_mm = F.cross_entropy(fused.float(), labels)
    losses = {m: F.cross_entropy(logits.float(), labels) for m, (_, logits) in out.items()}
    modalities = list(out)
    encoder_params = {m: list(model.encoders[m].parameters()) for m in modalities}
    encoders = [p for m in modalities for p in encoder_params[m]]
    fused_head = list(model.head.parameters())
    unimodal_heads = [p for m in modalities for p in model.heads[m].parameters()]
    grads_mm = gradients(loss_mm, encoders + fused_head, retain_graph=True)
    grads_u = gradients(_sum(losses.values()), encoders + unimodal_heads)   # L_m reaches only E_m, H_m
    all_reduce_mean_(grads_mm + grads_u, world)

    optimizer.zero_grad(set_to_none=True)
    n = len(encoders)
    set_grads(fused_head, grads_mm[n:])
    set_grads(unimodal_heads, grads_u[n:])
    stats, offset = {}, 0
    for m in modalities:
        k = len(encoder_params[m])
        g_mm, g_u = grads_mm[offset:offset + k], grads_u[offset:offset + k]
        offset += k
        weights, factor = integrate_encoder_grads(encoder_params[m], g_mm, g_u, cfg)
        stats |= encoder_stats(m, losses[m], out[m][1], labels, weights, factor, g_mm, g_u)
    optimizer.step()
    total = loss_mm.detach() + _sum(loss.detach() for loss in losses.values())
    return stats | {"fused/loss": loss_mm.detach(), "fused/acc": (fused.detach().argmax(1) == labels).float().mean(),
                    "train/loss": total}


def step(setup: loop.Setup, batch: dict, ctx: loop.Context) -> dict:
    return mmpareto_step(setup.model, setup.optimizer, batch, ctx.cfg, ctx.world, ctx.autocast)


def main(cfg: dict) -> dict:
    check_config(cfg)
    return loop.train(cfg, method="MMPareto", build=build, step=step, min_modalities=2,
                      deepspeed="it replaces each encoder's reduced gradient by a Pareto integration of the "
                                "multimodal and the unimodal gradients")


if __name__ == "__main__":
    loop.run_entry_point(main, CONFIG, DEFAULT_CONFIG)
