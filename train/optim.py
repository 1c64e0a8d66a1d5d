"""Optimisers and per-epoch learning-rate schedulers built from the run config."""
from __future__ import annotations

import math

import torch

from train.config import check_choice

#: The names `optimizer` and `scheduler` accept (train.loop.check_config refuses others before any compute).
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine", "warmup_cosine", "plateau")


def build_optimizer(cfg, params):
    """Adam, AdamW or SGD; the fused (one kernel per step) implementation when every parameter is on a
    GPU — same update rule, no per-tensor launches; on CPU torch's default (foreach) path."""
    check_choice("optimizer", cfg["optimizer"], OPTIMIZERS)
    params = list(params)
    betas = tuple(cfg.get("betas", (0.9, 0.999)))   # a script without a `betas` key gets torch's default
    fused = True if params and all(p.is_cuda for p in params) else None
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], betas=betas, weight_decay=cfg["weight_decay"], fused=fused)
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], betas=betas, weight_decay=cfg["weight_decay"], fused=fused)
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                           fused=fused)


def build_scheduler(cfg, optimizer):
    """Per-epoch schedulers: none | step (StepLR(step_size, gamma)) | cosine (over `epochs`) |
    warmup_cosine (linear from `warmup_start_lr` to lr over `warmup_epochs`, then cosine to `min_lr`;
    CGGM's BraTS recipe) | plateau (ReduceLROnPlateau on the validation loss, `plateau_patience`,
    factor `gamma`; step it with the loss)."""
    name = cfg["scheduler"]
    check_choice("scheduler", name, SCHEDULERS)
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg["step_size"], cfg["gamma"])
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg["epochs"])
    if name == "warmup_cosine":
        warmup, total = cfg["warmup_epochs"], cfg["epochs"]
        start, floor = cfg["warmup_start_lr"] / cfg["lr"], cfg["min_lr"] / cfg["lr"]

        def factor(epoch):
            if epoch < warmup:
                return start + (1 - start) * epoch / warmup
            progress = (epoch - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg["gamma"],   # plateau
                                                      patience=cfg["plateau_patience"])
