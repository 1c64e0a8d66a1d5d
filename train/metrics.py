"""Losses and metrics of each task (classification, regression, segmentation), the evaluation of a
whole split gathered from every rank, and the validation score a run selects its model by."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.segmentation import dice_scores, segmentation_loss
from train.config import ConfigError, check_choice
from train.data import to_device
from train.distributed import gather_by_index


def task_loss(task, outputs, labels):
    """classification: mean CE; segmentation: `segmentation_loss` (CGGM's BraTS loss, defaults);
    anything else: L1 on the squeezed output (regression, CMU-MOSI convention)."""
    if task == "classification":
        return F.cross_entropy(outputs, labels)
    if task == "segmentation":
        return segmentation_loss(outputs, labels)
    return F.l1_loss(outputs.squeeze(-1), labels)  # regression (CMU-MOSI convention)


@torch.no_grad()
def evaluate(model, loader, accelerator, task, fuse):
    """Per-modality and fused metrics on a whole split (gathered from every rank), plus the fused
    prediction's mean loss (`fused.loss`, the per-batch losses weighted by batch size).
    `model(batch)` returns {modality: (features, logits)}; `fuse` maps that dict to fused logits.
    Segmentation gathers the predicted label maps (uint8), not the logits."""
    model.eval()
    outputs, index, labels = {}, [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in loader:
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            out = model(batch)
            fused = fuse(out)
        loss_sum += task_loss(task, fused.float(), batch["label"]).double() * batch["label"].shape[0]
        for m, logits in [(m, logits) for m, (_, logits) in out.items()] + [("fused", fused)]:
            keep = logits.argmax(1).to(torch.uint8) if task == "segmentation" else logits.float()
            outputs.setdefault(m, []).append(keep)
        index.append(batch["index"])
        labels.append(batch["label"])
    model.train()
    gathered = gather_by_index(
        accelerator, torch.cat(index), {k: torch.cat(v) for k, v in outputs.items()} | {"label": torch.cat(labels)})
    if accelerator.num_processes > 1:
        dist.all_reduce(loss_sum)
    metrics = {k: task_metrics(task, gathered[k], gathered["label"]) for k in outputs}
    metrics["fused"]["loss"] = float(loss_sum) / max(1, len(gathered["label"]))
    return metrics


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the precision-recall step curve: sum over distinct thresholds of
    (R_n - R_{n-1}) * P_n (tied scores form one threshold). NaN when the class has no positive."""
    positive = positive.to(torch.float64)
    num_pos = positive.sum()
    if num_pos == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    scores, positive = scores[order], positive[order]
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    true_pos = torch.cumsum(positive, 0)[last_of_tie]
    counted = torch.arange(1, len(scores) + 1, dtype=torch.float64)[last_of_tie]
    precision = true_pos / counted
    recall = true_pos / num_pos
    recall_step = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
    return float((recall_step * precision).sum())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """accuracy, macro-F1 (mean over classes present in labels or predictions) and mAP (mean over
    classes with a positive of the per-class average precision of the softmax probabilities)."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    num_classes = logits.shape[1]
    pred = logits.argmax(1)
    acc = (pred == labels).double().mean().item()
    f1s, aps = [], []
    probs = logits.softmax(1)
    for c in range(num_classes):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        if tp + fp + fn > 0:
            f1s.append(2 * tp / (2 * tp + fp + fn))
        ap = average_precision(probs[:, c], labels == c)
        if not math.isnan(ap):
            aps.append(ap)
    return {"acc": acc, "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
            "mAP": float(np.mean(aps)) if aps else float("nan")}


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """CMU-MOSI conventions: MAE, Pearson Corr, Acc-7 (both rounded after clipping to [-3, 3]),
    Acc-2 and F1 on the sign (positive vs negative) over samples whose label is non-zero."""
    pred, target = pred.double().flatten().cpu(), target.double().flatten().cpu()
    mae = (pred - target).abs().mean().item()
    pc, tc = pred - pred.mean(), target - target.mean()
    denom = (pc.norm() * tc.norm()).item()
    corr = (pc @ tc).item() / denom if denom > 0 else 0.0
    acc7 = (pred.clamp(-3, 3).round() == target.clamp(-3, 3).round()).double().mean().item()
    nonzero = target != 0
    p_pos, t_pos = pred[nonzero] > 0, target[nonzero] > 0
    acc2 = (p_pos == t_pos).double().mean().item() if nonzero.any() else float("nan")
    tp = (p_pos & t_pos).sum().item()
    fp = (p_pos & ~t_pos).sum().item()
    fn = (~p_pos & t_pos).sum().item()
    tn = (~p_pos & ~t_pos).sum().item()
    # weighted F1 over the two sign classes, as the MOSI literature reports it
    f1_pos = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    f1_neg = 2 * tn / (2 * tn + fn + fp) if tn + fn + fp else 0.0
    n_pos, n_neg = t_pos.sum().item(), (~t_pos).sum().item()
    f1 = (f1_pos * n_pos + f1_neg * n_neg) / max(1, n_pos + n_neg)
    return {"mae": mae, "corr": corr, "acc2": acc2, "acc7": acc7, "f1": f1}


def segmentation_metrics(outputs: torch.Tensor, mask: torch.Tensor) -> dict:
    """{"dice_wt", "dice_tc", "dice_et", "dice_mean"} as Python floats: `dice_scores` (eps 0,
    mean over slices) of argmax(outputs, 1); dice_mean = (WT + TC + ET) / 3 -- CGGM's BraTS
    metric (the batch metric of its classifiers and the validation score).

    outputs: logits (B, C, H, W), or already predicted labels (B, H, W) of an integer dtype (a
    cheaper thing to gather over a whole split); mask (B, H, W) integer labels.
    """
    if outputs.dim() == mask.dim() + 1:
        pred = outputs.argmax(1)
    elif outputs.dim() == mask.dim() and not torch.is_floating_point(outputs):
        pred = outputs
    else:
        raise ValueError(f"segmentation_metrics: expected logits (B, C, H, W) or integer labels "
                         f"(B, H, W) for a mask {tuple(mask.shape)}, got {tuple(outputs.shape)} "
                         f"{outputs.dtype}")
    d = {k: float(v) for k, v in dice_scores(pred, mask).items()}
    return {"dice_wt": d["wt"], "dice_tc": d["tc"], "dice_et": d["et"],
            "dice_mean": (d["wt"] + d["tc"] + d["et"]) / 3.0}


def task_metrics(task: str, outputs: torch.Tensor, labels: torch.Tensor) -> dict:
    if task == "classification":
        return classification_metrics(outputs, labels)
    if task == "regression":
        return regression_metrics(outputs, labels)
    if task == "segmentation":
        return segmentation_metrics(outputs, labels)
    raise ConfigError(f"task '{task}': metrics not implemented for this script")


SELECT_ON = ("fused", "modality_mean")


#: `select_metric`: which validation figure `selection_score` reads (classification). The released
#: IGM scripts keep their best model by fused macro-F1 (Twitter: accuracy).
SELECT_METRIC = ("acc", "macro_f1")


def selection_score(val: dict, select_on: str, key: str) -> float:
    """The validation figure a run keeps its best model by: the fused output's `key` (released
    recipes), or the mean of the per-modality `key`s (`modality_mean`; in stage-wise training only the
    active modality moves, so this keeps a stage's gains that an equal-weight fused output hides)."""
    check_choice("select_on", select_on, SELECT_ON)
    if select_on == "fused":
        return val["fused"][key]
    per_modality = [mets[key] for name, mets in val.items() if name != "fused"]
    return sum(per_modality) / len(per_modality)
