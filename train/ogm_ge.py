"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022).

    accelerate launch train/ogm_ge.py                                   # embedded audio-visual benchmark
    accelerate launch train/ogm_ge.py --config train/configs/ogm_ge_crema_d.yaml --data /data/shards/crema_d
    accelerate launch train/ogm_ge.py --modulation ogm                  # ablations: ogm (no noise), none
    accelerate launch train/ogm_ge.py --variant paper                   # every encoder parameter, no tie artefact
    accelerate launch --multi_gpu --num_processes 2 train/ogm_ge.py     # 2-rank data parallel

Model: per modality an encoder E_m; one fusion layer over the concatenated features (`fusion:
concat`, models.fusion.ConcatFusionModel) or one Linear head per modality, logits summed (`fusion:
sum`, LateFusionModel); out_m = modality m's part of the fusion layer (concat: f_m W_m^T + b/M).
One update per batch (docs/methods/ogm_ge.md):
    L = CE(sum_m out_m, y);  g = grad L (all-reduced)
    s_m = sum_i softmax(out_m,i)[y_i]     (summed over the GLOBAL batch: one all-reduce)
    rho_m = s_m / s_ref(m);  k_m = 1 - tanh(alpha rho_m) if rho_m > 1 else 1
    inside the window modulation_starts <= epoch <= modulation_ends (0-based, inclusive), for every
    modulated parameter of E_m:   g <- k_m g  (ogm)   or   g <- k_m g + N(0, (std(g) + 1e-8)^2)  (ogm_ge)
    optimizer step.
variant official (the released main.py): only 4-d gradients are modulated (`modulated_params: conv`,
  Conv2d weights; BatchNorm, biases, Linear and transformer weights keep their gradient — on an
  encoder without Conv2d weights OGM-GE changes nothing, and the script says so at the start); with
  two modalities the released branch damps the FIRST one at an exact tie s_1 = s_2.
variant paper: every parameter of E_m (the paper's theta^u, `modulated_params: all`); no tie artefact.
Both: the noise of every modulated tensor (of the dominant AND the other modalities) is N(0, std^2)
with std the spread of that tensor's gradient entries, not the paper's SGD-noise covariance.

Data parallelism without a DDP wrapper: the gradients are all-reduced by hand (one bucket) before the
edit, the scores are global sums (one all-reduce), and the GE noise is drawn from a generator seeded
alike on every rank (checkpointed), so every rank adds the same noise to the same reduced gradient:
N ranks x B/N = 1 rank x B.

TensorBoard: train/loss (fused CE), per modality {m}/loss and {m}/acc (its logits out_m), {m}/score
(s_m / B, the mean probability of the true class), {m}/ratio (rho_m), {m}/coeff (k_m, 1 outside the
window), and on logged steps {m}/grad_norm_before and {m}/grad_norm_after the edit (modulated
parameters only); train/modulating (1 inside the window).
"""
from __future__ import annotations

from train.config import ConfigError, Key, check_declared, declare, exit_on_help
from train.loop_config import LOOP_CONFIG

CONFIG = declare(LOOP_CONFIG,   # + the loop's keys (data, optimiser, selection, ...): train/loop_config.py
    data="data/embedded_av",
    modalities=Key([], "in the order of the fusion layer's columns ([] = the dataset's); with two, the first "
                       "is the one the released tie rule damps"),
    out_dir="runs/ogm_ge_av",
    variant=Key("official", "official (released main.py) | paper (see the docstring)", choices=("official", "paper")),
    modulation=Key("ogm_ge", "ogm_ge | ogm (no noise) | none (the released \"Normal\": plain joint training)",
                   choices=("ogm_ge", "ogm", "none")),
    alpha=Key(0.8, "k = 1 - tanh(alpha rho); released README: 0.8 CREMA-D, 0.1 VGGSound"),
    modulation_starts=Key(0, "first epoch (0-based) of the modulation window (released default 0)"),
    modulation_ends=Key(50, "last epoch (0-based, inclusive) of the window (released default 50)"),
    modulated_params=Key("variant", "variant (official: conv, paper: all) | conv (4-d gradients, released) | "
                                    "weights (every >= 2-d tensor, BalanceBenchmark) | all (the paper's theta^u)",
                         choices=("variant", "conv", "weights", "all")),
    ratio_reference=Key("weakest", "M > 2 (not released): weakest (rho_m = s_m / min s) | others_mean",
                        choices=("weakest", "others_mean")),   # methods.ogm_ge.RATIO_REFERENCES
    fusion=Key("concat", "concat (released default: one Linear over [f_1|...|f_M]) | sum (a head per modality)",
               choices=("concat", "sum")),
    epochs=100,
    batch_size=64,
    optimizer=Key("sgd", "released: SGD(lr 1e-3, momentum 0.9, weight decay 1e-4) whatever --optimizer says"),
    lr=1e-3,
    momentum=0.9,
    weight_decay=1e-4,
    scheduler=Key("step", "released: StepLR(lr_decay_step 70, lr_decay_ratio 0.1) per epoch"),
    step_size=70,
    gamma=0.1,
    mixed_precision=Key("no", "no | bf16", choices=("no", "bf16")),
)
DEFAULT_CONFIG = "train/configs/ogm_ge_av.yaml"
if __name__ == "__main__":   # --help needs nothing below: answered before torch is imported
    exit_on_help(CONFIG, DEFAULT_CONFIG)

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from methods import ogm_ge
from models.fusion import ConcatFusionModel, LateFusionModel
from train import loop, optim
from train.distributed import all_reduce_mean_


def check_config(cfg):
    loop.check_config(cfg)
    check_declared(cfg, CONFIG)   # choices and bounds, for a config built by hand too
    if not isinstance(cfg["alpha"], (int, float)) or isinstance(cfg["alpha"], bool) or cfg["alpha"] < 0:
        raise ConfigError(f"alpha={cfg['alpha']}: must be a number >= 0")
    for key in ("modulation_starts", "modulation_ends"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool):
            raise ConfigError(f"{key}={cfg[key]}: must be an integer (a 0-based epoch)")


def modulated_parameters(encoder: torch.nn.Module, which: str) -> list:
    """The parameters of one encoder whose gradients OGM-GE edits: conv = the 4-d ones (main.py:
    `len(parms.grad.size()) == 4`, i.e. Conv2d weights), weights = every tensor of 2 or more
    dimensions (BalanceBenchmark: `!= 1`), all = every parameter (the paper's theta^u)."""
    params = list(encoder.parameters())
    if which == "conv":
        return [p for p in params if p.dim() == 4]
    if which == "weights":
        return [p for p in params if p.dim() >= 2]
    return params


def discrepancy_coefficients(logits, labels, cfg, world):
    """s_m over the global batch (the per-rank sums, all-reduced: the ratio is scale-free, but a sum
    keeps it the released quantity), the discrepancy ratios rho_m and the coefficients k_m
    (two modalities, official: the released formula). Returns (scores, ratios, coeffs), (M,) each."""
    scores = torch.stack([ogm_ge.target_score_sum(x, labels) for x in logits.values()])
    if world > 1:
        dist.all_reduce(scores)
    if len(logits) == 2 and cfg["variant"] == "official":
        coeffs, ratios = ogm_ge.released_two_modality_coefficients(scores, cfg["alpha"])
    else:
        ratios = ogm_ge.discrepancy_ratios(scores, cfg["ratio_reference"])
        coeffs = ogm_ge.modulation_coefficients(ratios, cfg["alpha"])
    return scores, ratios, coeffs


def modulate_gradients(params_by_modality, coeffs, with_noise, generator):
    """OGM (each modulated gradient times k_m) and, with_noise, GE (plus Gaussian noise of the
    gradient's std): one draw per tensor, in modality then parameter order (as released), then a few
    operators for all the tensors (flat stds, foreach scaling and noise: methods/ogm_ge.py)."""
    grads = [[p.grad for p in params if p.grad is not None] for params in params_by_modality.values()]
    noises = None
    if with_noise:
        noises = [[torch.randn(g.shape, generator=generator, device=g.device, dtype=g.dtype) for g in group]
                  for group in grads]
    flat = [g for group in grads for g in group]
    if flat:
        lengths = _lengths(tuple(g.numel() for g in flat), flat[0].device) if noises is not None else None
        ogm_ge.modulate_gradients_(grads, coeffs, noises, lengths)


def ogm_ge_step(model, optimizer, batch, cfg, epoch, params_by_modality, world=1, generator=None,
                autocast=contextlib.nullcontext, diagnostics=False):
    """One OGM-GE update of the whole model on a batch (this rank's part of it): forward, the fused
    loss's backward (all-reduced) -> the discrepancy coefficients -> inside the modulation window,
    the gradient edit -> one optimiser step.

    params_by_modality: {m: the parameters of E_m to modulate} (modulated_parameters). epoch: the
    0-based epoch, for the window. generator: the GE noise stream, identical on every rank.
    Returns what to log, as device tensors."""
    labels = batch["label"]
    modalities = list(params_by_modality)
    with autocast():
        out = model(batch)
    logits = {m: out[m][1].float() for m in modalities}
    fused = torch.stack(list(logits.values())).sum(0)
    loss = F.cross_entropy(fused, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_mean_([p.grad for p in model.parameters() if p.grad is not None], world)
    scores, ratios, coeffs = discrepancy_coefficients(logits, labels, cfg, world)
    modulating = cfg["modulation"] != "none" and cfg["modulation_starts"] <= epoch <= cfg["modulation_ends"]
    stats = {"train/loss": loss.detach(), "train/modulating": torch.tensor(float(modulating))}
    norms_before = {m: _grad_norm(params_by_modality[m]) for m in modalities} if diagnostics else {}
    if modulating:
        modulate_gradients(params_by_modality, coeffs, cfg["modulation"] == "ogm_ge", generator)
    optimizer.step()
    batch_size = labels.shape[0] * world
    for i, m in enumerate(modalities):
        stats |= {f"{m}/loss": F.cross_entropy(logits[m].detach(), labels),
                  f"{m}/acc": (logits[m].detach().argmax(1) == labels).float().mean(),
                  f"{m}/score": scores[i] / batch_size, f"{m}/ratio": ratios[i],
                  f"{m}/coeff": coeffs[i] if modulating else torch.ones_like(coeffs[i])}
        if diagnostics:
            stats |= {f"{m}/grad_norm_before": norms_before[m], f"{m}/grad_norm_after": _grad_norm(params_by_modality[m])}
    return stats


@functools.lru_cache(maxsize=8)
def _lengths(sizes: tuple, device: torch.device) -> torch.Tensor:
    """The modulated tensors' sizes as a device tensor, built once (a host-to-device copy) per layout."""
    return torch.tensor(sizes, dtype=torch.int64, device=device)


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().float().flatten() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.cat(grads)) if grads else torch.zeros(())


def build(cfg: dict, ctx: loop.Context) -> loop.Setup:
    """The fusion model (unwrapped: gradients reduced by hand), one optimiser over everything (as
    released), the modulated parameters of each encoder, and the GE noise generator (seeded alike on
    every rank, checkpointed)."""
    fusion = ConcatFusionModel if cfg["fusion"] == "concat" else LateFusionModel
    model = fusion(ctx.meta, cfg["encoders"], ctx.modalities).to(ctx.device)
    if cfg["fusion"] == "sum":   # the released weight_init of the fusion layers (SumFusion's fc_x, fc_y)
        for head in model.heads.values():
            torch.nn.init.xavier_normal_(head.weight)
            torch.nn.init.zeros_(head.bias)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    which = cfg["modulated_params"]
    if which == "variant":
        which = "conv" if cfg["variant"] == "official" else "all"
    params = {m: modulated_parameters(model.encoders[m], which) for m in ctx.modalities}
    untouched = [m for m, p in params.items() if not p]
    if untouched and cfg["modulation"] != "none" and not cfg["resume"]:
        ctx.print(f"note: modulated_params={which}: the encoder of {', '.join(untouched)} has no such parameter, "
                  "so OGM-GE leaves its gradients unchanged (set --modulated_params all to modulate it)")
    generator = torch.Generator(ctx.device).manual_seed(cfg["seed"])   # the same on every rank
    return loop.Setup(model, optimizer, optim.build_scheduler(cfg, optimizer), fuse=fusion.fuse,
                      generators={"ge_noise": generator}, parts=dict(params=params, generator=generator),
                      result=dict(variant=cfg["variant"], modulation=cfg["modulation"], alpha=cfg["alpha"],
                                  modulated_params=which, fusion=cfg["fusion"],
                                  modulation_window=[cfg["modulation_starts"], cfg["modulation_ends"]]))


def step(setup: loop.Setup, batch: dict, ctx: loop.Context) -> dict:
    return ogm_ge_step(setup.model, setup.optimizer, batch, ctx.cfg, ctx.position["epoch"], setup.parts["params"],
                       ctx.world, setup.parts["generator"], ctx.autocast, diagnostics=ctx.log_step)


def main(cfg: dict) -> dict:
    check_config(cfg)
    return loop.train(cfg, method="OGM-GE", build=build, step=step, min_modalities=2,
                      deepspeed="it scales each encoder's reduced gradients by the modality's coefficient and "
                                "adds noise scaled by their spread")


if __name__ == "__main__":
    loop.run_entry_point(main, CONFIG, DEFAULT_CONFIG)
