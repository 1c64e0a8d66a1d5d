"""MLA: alternating unimodal adaptation through a shared head, with orthogonal gradient modification
(any number of modalities; classification).

    accelerate launch train/mla.py                                      # embedded audio-visual benchmark
    accelerate launch train/mla.py --config train/configs/mla_crema_d.yaml
    accelerate launch train/mla.py --variant paper                      # the projection as the paper describes it
    accelerate launch train/mla.py --projection true --fusion fixed     # switches, one divergence each
    accelerate launch --multi_gpu --num_processes 2 train/mla.py        # 2-rank data parallel

Model (models.fusion.SharedHeadModel): per modality an encoder E_m, ONE Linear head H shared by every
modality (the released ConcatFusion.fc_out used on one modality's features at a time).
Per training batch (docs/methods/mla.md), every encoder forwarded once, then a turn per modality m
in `modalities` order (one optimiser step each):
    f_m = E_m(x_m);  loss_m = CE(H(f_m), y);  backward;  r = batch mean of f_m
    projection (`projection`): alpha = alpha_base ** (1 + b/L)  (b: batch in the epoch, L: batches per epoch)
        P <- P - (k k^T) ./ (alpha + k r'^T)  (`owm_denominator: matrix`, released: element-wise by a
        d x d matrix) or P - k k^T / (alpha + r'^T k) (`scalar`, OWM, the paper),  k = P r',
        with r' = r (`projector_features: current`,
        released: skipped at the very first turn of the run) or r' = the previous turn's r
        (`previous`, the paper); P <- P / ||P||_F (`normalize_projector`, released)
        H.weight.grad <- H.weight.grad @ P^T     (P starts at the identity; the bias is not projected)
    optimizer step;  gradients zero-filled (`zero_grad_echo`: the released torch 1.8 zero_grad, so
    the encoders of earlier turns of this batch are stepped again by later turns — weight decay and
    momentum) or dropped; all dropped at the batch end (released `del p.grad`).
variant official = the released main.py --gs_flag: its name check ("module.weight" against an
nn.Linear's "weight") never matches, so the projection never runs (`projection: false`); echo on;
fusion entropy over the evaluation BATCH axis, evaluated with the training batch (`eval_batch_size`
null: = batch_size, the released test loader; a value in the YAML or on the command line wins).
variant paper: projection with the previous turn's features and the scalar OWM denominator, no
Frobenius normalisation, no echo, per-sample entropy, eval_batch_size 500 when null. Each is a switch
(null = the variant's). Test-time fusion: sum_m w_m H(f_m), w = softmax_m(-entropy_m) (`fusion:
entropy`, the README's "dynamic fusion") or fixed weights (`fusion: fixed`, `fusion_weights`; []:
the released 0.55 / 0.45 for two modalities).

Data parallelism without a DDP wrapper (a turn uses one encoder and the head): each turn's gradients
and the batch mean r of the head input are all-reduced by hand in one bucket, and P and the
projection act on the reduced quantities, so N ranks x B/N = 1 rank x B.

TensorBoard: per-modality train loss/acc; <m>/grad_kept = |g P^T| / |g| of the head weight gradient
(1 without projection); plasticity/cos_consecutive_stages = the mean over the step's turns of the
cosine between the head weight gradient a turn applies and the one the turn before applied (a "stage"
is one modality turn of the shared head; IGM's definition: docs/methods/igm.md); on log steps
projector/mean_scale = trace(P)/d and projector/fro_norm.
"""
from __future__ import annotations

from train.config import ConfigError, Key, check_declared, declare, exit_on_help
from train.loop_config import LOOP_CONFIG

CONFIG = declare(LOOP_CONFIG,   # + the loop's keys (data, optimiser, selection, ...): train/loop_config.py
    data="data/embedded_av",
    modalities=Key([], "turn order within a batch ([] = the dataset's order)"),
    out_dir="runs/mla_av",
    variant=Key("official", "official (released main.py --gs_flag) | paper", choices=("official", "paper")),
    projection=Key(None, "project the head weight gradient with P (null: official false — the released name "
                         "check never matches —, paper true)", type=bool),
    projector_features=Key(None, "current | previous: whose batch-mean head input updates P before a turn's "
                                 "gradient is projected (null: official current, paper previous)", type=str),
    normalize_projector=Key(None, "P <- P / ||P||_F after each update (null: official true, paper false)",
                            type=bool),
    owm_denominator=Key(None, "matrix | scalar: P - (k k^T) ./ (alpha + k r^T) element-wise (released GSPlugin) "
                              "or P - k k^T / (alpha + r^T k) (OWM) (null: official matrix, paper scalar)",
                        type=str),
    alpha_base=Key(0.1, "OWM alpha = alpha_base ** (1 + batch_in_epoch / batches_per_epoch)"),
    zero_grad_echo=Key(None, "earlier turns' encoders keep zero gradients and are stepped again by later turns "
                             "of the batch (null: official true, paper false)", type=bool),
    fusion=Key("entropy", "entropy (the README's dynamic fusion, the paper) | fixed", choices=("entropy", "fixed")),
    fusion_entropy=Key(None, "batch | sample: entropy over the eval batch axis (released) or per sample over "
                             "classes (paper) (null: the variant's)", type=str),
    fusion_weights=Key([], "fusion fixed: one weight per modality ([] = released: two modalities 0.55, 0.45 "
                           "(main(av_alpha=0.55), the first of the turn order 0.55); three or more: equal)"),
    eval_batch_size=Key(None, "evaluation batch (null: official = batch_size, as the released test loader, which "
                              "the batch-axis entropy fusion depends on; paper = 500)"),
    epochs=100,
    batch_size=64,
    optimizer=Key("sgd", "released: SGD momentum 0.9, weight decay 1e-4"),
    lr=1e-3,
    weight_decay=1e-4,
    momentum=0.9,
    scheduler=Key("step", "released: StepLR(70, 0.1) per epoch"),
    step_size=70,
    gamma=0.1,
    mixed_precision=Key("no", "no | bf16", choices=("no", "bf16")),
)
DEFAULT_CONFIG = "train/configs/mla_av.yaml"
if __name__ == "__main__":   # --help needs nothing below: answered before torch is imported
    exit_on_help(CONFIG, DEFAULT_CONFIG)

import contextlib

import torch
import torch.nn.functional as F

from methods import mla
from models.fusion import SharedHeadModel
from train import loop, optim
from train.distributed import all_reduce_mean_


#: The switches a variant decides when left null: (official, paper).
VARIANT_SWITCHES = dict(projection=(False, True), projector_features=("current", "previous"),
                        normalize_projector=(True, False), owm_denominator=("matrix", "scalar"),
                        zero_grad_echo=(True, False), fusion_entropy=("batch", "sample"))
SWITCH_CHOICES = dict(projection=(True, False), projector_features=("current", "previous"),
                      normalize_projector=(True, False), owm_denominator=("matrix", "scalar"),
                      zero_grad_echo=(True, False), fusion_entropy=("batch", "sample"))
#: The released fixed fusion weights of two modalities: main.py runs main(av_alpha=0.55) and fuses
#: av_alpha * out_a + (1 - av_alpha) * out_v (audio, the first modality, 0.55).
RELEASED_AV_ALPHA = 0.55


def resolve_switches(cfg: dict) -> dict:
    """cfg with every null switch set to its variant's value, and a null eval_batch_size set to the
    training batch (official: the released test loader's batch is batch_size) or the loop's 500
    (paper); recorded so in the run's config.yaml. An eval_batch_size given anywhere (YAML, command
    line, a hand-built cfg) is kept."""
    column = 0 if cfg["variant"] == "official" else 1
    out = cfg | {k: v[column] for k, v in VARIANT_SWITCHES.items() if cfg[k] is None}
    if out.get("eval_batch_size") is None:
        official = cfg["variant"] == "official"
        out["eval_batch_size"] = cfg["batch_size"] if official else LOOP_CONFIG["eval_batch_size"].default
    return out


def check_config(cfg):
    loop.check_config(cfg)
    check_declared(cfg, CONFIG)   # choices and bounds, for a config built by hand too
    for key, allowed in SWITCH_CHOICES.items():
        if cfg[key] is not None and (cfg[key] not in allowed or type(cfg[key]) is not type(allowed[0])):
            raise ConfigError(f"{key}={cfg[key]!r}: choose {' or '.join(str(a).lower() for a in allowed)} "
                              "(or null: the variant's)")
    ebs = cfg["eval_batch_size"]
    if ebs is not None and (isinstance(ebs, bool) or not isinstance(ebs, int) or ebs <= 0):
        raise ConfigError(f"eval_batch_size={ebs!r}: a positive integer (or null: official the training "
                          "batch, paper 500)")
    if not 0 < cfg["alpha_base"] < 1:
        raise ConfigError(f"alpha_base={cfg['alpha_base']}: must be in (0, 1)")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in cfg["fusion_weights"]):
        raise ConfigError(f"fusion_weights={cfg['fusion_weights']}: numbers >= 0, one per modality")


# ------------------------------------------------------------------------------------------------
# The update

def project_head_grad(grad, mean, state, cfg, alpha):
    """With `projection`: P updated by OWM from r (this turn's batch-mean head input, projector_features
    current, or the previous turn's, previous), then the head weight gradient replaced in place by
    its projection — neither at the run's very first turn (released). Returns the gradient as it was
    before (a copy; `grad` itself without projection), for the kept-norm ratio."""
    if not cfg["projection"]:
        return grad
    raw = grad.clone()
    r = mean if cfg["projector_features"] == "current" else state["prev_mean"]
    first = state["turns"] == 0 if cfg["projector_features"] == "current" else r is None
    if not first:   # released: no update and no projection at the run's very first turn
        state["P"] = mla.owm_update(state["P"], r, alpha, cfg["normalize_projector"], cfg["owm_denominator"])
        grad.copy_(mla.project_weight_grad(grad, state["P"]))
    return raw


def batch_end_stats(cosines, P, log_projector):
    """The batch's plasticity (mean cosine of consecutive turns' applied head gradients) and, on a
    logging step with the projection, P's mean diagonal and Frobenius norm."""
    stats = {}
    if cosines:
        stats["plasticity/cos_consecutive_stages"] = torch.stack(cosines).mean()
    if log_projector:
        stats["projector/mean_scale"] = torch.diagonal(P).mean()
        stats["projector/fro_norm"] = torch.linalg.matrix_norm(P)
    return stats


def mla_step(encoders, head, optimizer, batch, order, state, cfg, batch_in_epoch=0, batches_per_epoch=1,
             world=1, autocast=contextlib.nullcontext, log_step=False):
    """One training batch of MLA: every encoder forwarded once, then a turn per modality in `order`:
    the shared head's loss on its features -> backward (all-reduced) -> the head weight gradient
    projected with P (project_head_grad) -> one optimiser step.

    state: {"P": (d, d) projector, "turns": turns so far (the released exp_count), "prev_mean": the
    previous turn's batch-mean head input or None, "prev_grad": the head weight gradient the previous
    turn applied or None} — updated in place. cfg: the resolved switches. Returns device tensors to log."""
    labels = batch["label"]
    with autocast():   # every encoder once, in training mode, before any turn (released forward)
        features = {m: encoders[m](batch[m]) for m in order}
    optimizer.zero_grad(set_to_none=True)
    alpha = mla.projector_alpha(batch_in_epoch, batches_per_epoch, cfg["alpha_base"])
    stats, cosines = {}, []
    for m in order:
        f = features[m] if features[m].dtype == torch.float64 else features[m].float()   # bf16 autocast -> fp32
        logits = head(f)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        mean = f.detach().mean(0)   # equal rank slices: the mean of the rank means is the global mean
        active = [p for p in list(encoders[m].parameters()) + list(head.parameters()) if p.grad is not None]
        all_reduce_mean_([p.grad for p in active] + [mean], world)
        grad = head.weight.grad
        raw = project_head_grad(grad, mean, state, cfg, alpha)
        stats[f"{m}/grad_kept"] = torch.linalg.vector_norm(grad) / torch.linalg.vector_norm(raw).clamp_min(1e-30)
        if state["prev_grad"] is not None:
            cosines.append(F.cosine_similarity(grad.flatten(), state["prev_grad"].flatten(), dim=0))
        state["prev_grad"], state["prev_mean"] = grad.detach().clone(), mean
        optimizer.step()
        state["turns"] += 1
        # released (torch 1.8): zero_grad() zero-fills, so this turn's encoder is stepped again by the
        # later turns of the batch (weight decay, momentum); the paper's alternation leaves it alone
        optimizer.zero_grad(set_to_none=not cfg["zero_grad_echo"])
        stats[f"{m}/loss"] = loss.detach()
        stats[f"{m}/acc"] = (logits.detach().argmax(1) == labels).float().mean()
    optimizer.zero_grad(set_to_none=True)   # released: `del p.grad` for every parameter at the batch end
    return stats | batch_end_stats(cosines, state["P"], log_step and cfg["projection"])


# ------------------------------------------------------------------------------------------------
# The method on the shared loop

def default_fusion_weights(n_modalities):
    """fusion_weights [] (fusion fixed): the released two-modality weights [0.55, 0.45] (the first
    modality of the turn order takes av_alpha, as the released audio); three or more: equal (the
    released three-modality weights, audio 0.35, visual 0.25, text 0.4, are tied to those names)."""
    if n_modalities == 2:
        return [RELEASED_AV_ALPHA, 1.0 - RELEASED_AV_ALPHA]
    return [1.0 / n_modalities] * n_modalities


def make_fuse(cfg, n_modalities):
    """outputs {m: (features, logits)} -> fused logits: entropy-weighted or fixed-weight sum."""
    if cfg["fusion"] == "entropy":
        axis = cfg["fusion_entropy"]
        return lambda outputs: mla.entropy_fusion(torch.stack([o for _, o in outputs.values()]), axis)
    weights = cfg["fusion_weights"] or default_fusion_weights(n_modalities)
    return lambda outputs: mla.fixed_fusion(torch.stack([o for _, o in outputs.values()]), weights)


def build(cfg: dict, ctx: loop.Context) -> loop.Setup:
    """The shared-head model, one optimiser over everything (released), P = I and the turn state."""
    if cfg["fusion"] == "fixed" and cfg["fusion_weights"] and len(cfg["fusion_weights"]) != len(ctx.modalities):
        raise ConfigError(f"fusion_weights={cfg['fusion_weights']}: one weight per modality of {ctx.modalities}")
    model = SharedHeadModel(ctx.meta, cfg["encoders"], ctx.modalities).to(ctx.device)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    d = model.head.in_features
    state = dict(P=torch.eye(d, device=ctx.device), turns=0, prev_mean=None, prev_grad=None)
    switches = {k: cfg[k] for k in VARIANT_SWITCHES} | {"variant": cfg["variant"], "fusion": cfg["fusion"]}
    # alpha's L: the full epoch's batches (len(train_sampler) counts only those left after a resume)
    batches_per_epoch = ctx.train_sampler.num_samples // ctx.train_sampler.global_batch_size
    return loop.Setup(model, optimizer, optim.build_scheduler(cfg, optimizer), fuse=make_fuse(cfg, len(ctx.modalities)),
                      state=state, result=switches, parts=dict(batches_per_epoch=batches_per_epoch))


def step(setup: loop.Setup, batch: dict, ctx: loop.Context) -> dict:
    model = setup.model
    return mla_step(model.encoders, model.head, setup.optimizer, batch, ctx.modalities, setup.state, ctx.cfg,
                    ctx.position["batch_in_epoch"], setup.parts["batches_per_epoch"], ctx.world, ctx.autocast, ctx.log_step)


def ignored_keys(cfg: dict) -> dict:
    """Keys the resolved config does not read: refused on the command line, warned in a YAML."""
    cfg = resolve_switches(cfg) if cfg["variant"] in ("official", "paper") else cfg
    out = {}
    if cfg["fusion"] != "fixed":
        out["fusion_weights"] = "by fusion=entropy (set --fusion fixed)"
    if cfg["fusion"] != "entropy":
        out["fusion_entropy"] = "by fusion=fixed"
    if cfg["projection"] is False:
        for key in ("projector_features", "normalize_projector", "owm_denominator", "alpha_base"):
            out[key] = "without the projection (set --projection true)"
    return out


def main(cfg: dict) -> dict:
    check_config(cfg)
    return loop.train(resolve_switches(cfg), method="MLA", build=build, step=step, min_modalities=2,
                      deepspeed="it replaces the shared head's reduced weight gradient by its projection with P",
                      compile_step="compiled, its turns backward through a freed graph a second time "
                                   "(benchmarks/capture.py)")


if __name__ == "__main__":
    loop.run_entry_point(main, CONFIG, DEFAULT_CONFIG, ignored=ignored_keys)
