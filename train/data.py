"""Data: validate a shard directory before any compute (generating a missing embedded benchmark), and
the loaders over its splits, each rank reading its part of every global batch."""
from __future__ import annotations

import signal
from pathlib import Path

import torch

from data_prep import shards
from train.config import ConfigError

#: What SLURM sends before a time limit or a preemption (and scancel), and Ctrl-C: the training
#: process checkpoints at the next step boundary (train.loop.Preemption); DataLoader workers ignore them.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def prepare_data(cfg: dict, accelerator) -> dict:
    """Validate the shard directory `cfg['data']` (every shard, every split, and the values: see
    data_prep.shards.validate) and return its meta.

    An embedded-benchmark directory (`.../embedded_<flavour>`) that does not exist yet is generated
    first, on the main process, from `cfg['data_seed']`.
    """
    root = Path(cfg["data"])
    if not (root / "meta.json").exists() and root.name.startswith("embedded_"):
        from data_prep import embedded
        flavour = root.name[len("embedded_"):]
        if flavour not in embedded.FLAVOURS:
            raise ConfigError(f"data={cfg['data']}: unknown embedded flavour '{flavour}' "
                              f"(choose from {', '.join(embedded.FLAVOURS)})")
        if accelerator.is_main_process:
            embedded.generate(root.parent, flavour, seed=cfg["data_seed"])
    # outside the `if`: another rank may already see the meta.json the main process just wrote, and
    # every rank must reach the same barriers
    accelerator.wait_for_everyone()
    if not (root / "meta.json").exists():
        raise ConfigError(f"data={cfg['data']}: no meta.json there; prepare the dataset with a "
                          "data_prep converter first")
    # The main process scans the values first (NaN/Inf, categorical codes) and caches a clean result
    # per shard; the others then validate from that cache instead of scanning the data N times. All
    # reach the barrier, and all raise the same error on bad data.
    refused = None
    if accelerator.is_main_process:
        try:
            meta = shards.validate(root)
        except shards.ShardFormatError as err:
            refused = err
    accelerator.wait_for_everyone()
    if refused is not None:
        raise refused
    return meta if accelerator.is_main_process else shards.validate(root)


def make_loader(cfg: dict, meta: dict, split: str, accelerator, modalities=None, train: bool = False):
    """DataLoader over one split, this rank's part of each global batch (see ShardBatchSampler).
    `standardize: true` standardises the float modalities with the training-split statistics of
    meta.json (shards.standardize_plan); data without them is refused (ConfigError, one line)."""
    standardize = bool(cfg.get("standardize", False))
    if standardize:
        try:
            shards.standardize_plan(meta, modalities, cfg["data"])
        except shards.ShardFormatError as err:
            raise ConfigError(f"standardize: true: {err} (or set standardize: false)") from None
    dataset = shards.ShardDataset(cfg["data"], split, modalities=modalities, meta=meta, standardize=standardize)
    sampler = shards.ShardBatchSampler(
        len(dataset), cfg["batch_size"] if train else cfg["eval_batch_size"],
        rank=accelerator.process_index, world_size=accelerator.num_processes,
        seed=cfg["seed"], shuffle=train, drop_last=train)
    workers = cfg["num_workers"]
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        # its own generator: creating an iterator must not draw from the global RNG (dropout,
        # augmentation), or a run resumed mid-epoch would see a shifted random stream
        generator=torch.Generator().manual_seed(cfg["seed"]))
    return loader, sampler


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start: ignore SIGTERM/SIGUSR1/SIGINT. SLURM signals every process of a job
    step, and Ctrl-C every process of the terminal's foreground group, workers included; a worker
    killed by it makes the training process fail ("DataLoader worker killed by signal") before it
    can checkpoint. The training process alone handles the signal
    (train.loop.Preemption); the workers stop when it shuts the loader down, or on their own when it dies."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
