"""The training loop, written once. Every script in train/ hands `train()` plain functions:

    build(cfg, ctx) -> Setup         the model, its optimiser(s) and scheduler, the method's own state
    step(setup, batch, ctx) -> dict  ONE update on a batch; returns 0-d device tensors (or numbers) to log
    after_step(setup, ctx)           optional: after the position advanced (e.g. a periodic refresh)
    epoch_end(setup, ctx, val)       optional: after validation and selection, before the checkpoint
                                     (e.g. IGM's stage restarts); val is None in an epoch not validated

and `train()` owns the rest: the accelerator and the refusals before any compute, the data
(validated shards, loaders, the sampler position), the run directory, tqdm progress over the whole run,
the logging window, the NaN/Inf check, preemption, checkpoints and exact resume, validation every
`eval_every` epochs, model selection (`select_on`, `select_metric`), early stopping (`patience`,
`min_delta`), the scheduler (per epoch, or on the validation loss for `plateau`), the experiment
trackers (`report_to`, through Accelerate's tracker API: `ctx.log` is `accelerator.log` at the current
step), and the final test of the selected model. docs/adding-a-method.md walks through a complete method.

train() is a sequence of named phases: start (refusals, accelerator, data, build, run directory),
resume (on --resume), open_progress, then per epoch start_epoch, run_epoch (step, log_window,
checkpoint_if_due; stop when a signal or stop_after_steps ends the run) and end_epoch (scheduler,
validate_and_select, the method's epoch_end, checkpoint), and finally test_selected_model.

A method whose run follows a plan of its own sets `Setup.schedule` to a `Schedule`, the one hook for
that: the run's length in epochs, whether the scheduler steps before each epoch instead of after it,
and `phase()` -> `Phase(label, record)`, where the run is now: the progress label beside the epoch and
the fields added to each metrics.jsonl record. IGM's stages are one (train/igm.py: sum(stage_epochs)
epochs, the scheduler before each epoch as the released scripts do, "stage 2/12 (audio)" and
{"stage": 1}); any method with phases, a curriculum or a warm-up stage of its own can use it.

Conventions the loop relies on:
- the logging window sums what `step` returns on the device and divides each key by the number of
  steps that returned it (a window cut by a resume is not biased); at a log step the means are
  averaged over ranks in one all-reduce; every returned key whose name ends in "loss" is checked for
  NaN/Inf (the flag is accumulated on the device and all-reduced at log steps, epoch ends and before
  each checkpoint: no per-step host sync, and every rank stops at the same check);
- `step` must return the same keys on every rank (they are reduced together); it may read
  `ctx.log_step` (True when this step's window is logged) to compute costly diagnostics only then;
- the model's forward returns {modality: (features, logits)} and `Setup.fuse` maps that to the
  fused prediction (evaluation reports every modality and the fusion);
- whatever `Setup.state` holds (tensors, numbers, nested dicts/lists/tuples) is checkpointed with
  the position and restored on resume (tensors back on the device).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep import shards
from models.encoders import ModelConfigError, resolve_encoder_configs
from train import capture, checkpoint, data, distributed, metrics, optim, rundir
from train.checkpoint import CheckpointError
from train.config import COMMAND_LINE, ConfigError, check_choice, load_config, main_script, source_of, warn


@dataclasses.dataclass(frozen=True)
class Phase:
    """Where a run is within a method's own plan (Schedule.phase), e.g. IGM's stage."""
    label: str = ""                        # beside "epoch e/E" in the progress bar, e.g. "stage 2/12 (audio)"
    record: dict = dataclasses.field(default_factory=dict)   # fields added to each metrics.jsonl record


@dataclasses.dataclass
class Schedule:
    """How a run is laid out over its epochs, for a method whose run follows a plan of its own
    (IGM's stages): the loop asks it for the run's length, whether the learning-rate scheduler steps
    at the start of each epoch instead of its end, and, through `phase()`, where the run is now —
    asked at each epoch's start (the progress label) and at each validation (the metrics.jsonl
    record), which comes after the epoch ended and before the method's `epoch_end` (where a method
    moves to its next phase, as IGM's next_stage does). Without one (Setup.schedule None) a run is
    cfg["epochs"] epochs, the scheduler steps after each epoch (on the validation loss for
    `plateau`) and there is no phase."""
    epochs: int                            # epochs of the whole run
    scheduler_before_epoch: bool = False   # step the scheduler before each epoch (released IGM scripts)
    phase: Callable[[], Phase] = Phase     # the current phase; by default none (Phase())


@dataclasses.dataclass
class Setup:
    """What a method's `build(cfg, ctx)` returns: what the loop trains, evaluates and checkpoints.

    `optimizer` and `scheduler` may be replaced by a hook (IGM's stage restarts): the loop reads
    them from here at every use. `objects`: further things with state_dict() to checkpoint (e.g. a
    second optimiser); `generators`: per-rank torch.Generators saved with the rank's RNG state."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object = None
    fuse: Callable | None = None           # outputs -> fused prediction; default model.fuse
    state: dict = dataclasses.field(default_factory=dict)
    objects: dict = dataclasses.field(default_factory=dict)
    generators: dict = dataclasses.field(default_factory=dict)
    schedule: Schedule | None = None       # the method's own plan of the run; default cfg["epochs"] epochs
    result: dict = dataclasses.field(default_factory=dict)   # recorded in result.json
    parts: dict = dataclasses.field(default_factory=dict)    # the method's own objects (not checkpointed)


@dataclasses.dataclass
class Context:
    """What the loop hands a method's functions: the run's environment and position."""
    cfg: dict
    accelerator: object
    meta: dict
    task: str
    modalities: list
    loaders: dict                          # train / val / test DataLoaders
    train_sampler: shards.ShardBatchSampler
    position: dict = dataclasses.field(default_factory=dict)   # step, epoch, batch_in_epoch, best, ...
    log_step: bool = False                 # this step's window is logged: compute costly diagnostics
    run_dir: Path | None = None            # set once the run directory is accepted
    quiet: bool = False                    # print() says nothing (train.evaluate rebuilding a finished run)
    trackers_open: bool = False            # log() has opened the experiment trackers

    @property
    def device(self):
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def autocast(self):
        return self.accelerator.autocast

    def log(self, scalars: dict) -> None:
        """Scalars (already identical on every rank) at the current step, to the trackers of
        `report_to` (accelerator.log), from the main process. The trackers open at the run's first
        scalar (rundir.start_trackers): before the run directory is accepted nothing is logged, and a
        run refused before it logs (a --resume whose checkpoint does not fit) writes no tracker file."""
        if self.run_dir is None or not self.accelerator.is_main_process:
            return
        if not self.trackers_open:
            rundir.start_trackers(self.accelerator, self.cfg, self.run_dir)
            self.trackers_open = True
        self.accelerator.log({key: float(value) for key, value in scalars.items()}, step=self.position["step"])

    def print(self, text: str) -> None:
        """A line on the main process's stdout that does not break the progress bar."""
        if self.accelerator.is_main_process and not self.quiet:
            tqdm.write(text)
            sys.stdout.flush()


# --------------------------------------------------------------------------------------------------
# NaN/Inf and preemption

class NonFiniteLossError(FloatingPointError):
    pass


def check_finite(loss_flag: torch.Tensor, step: int, accelerator=None) -> None:
    """Stop loudly on a NaN/inf loss. `loss_flag` accumulates ~isfinite on the device between checks
    so that the hot path never waits on the host. Collective with several processes: the flag is
    all-reduced (MAX) so that every rank stops at the same check — a rank that stopped alone would
    leave the others waiting in their next collective."""
    if accelerator is not None and accelerator.num_processes > 1:
        loss_flag = loss_flag.to(torch.int32)
        dist.all_reduce(loss_flag, op=dist.ReduceOp.MAX)
    if bool(loss_flag):
        raise NonFiniteLossError(f"non-finite loss at or before step {step} (since the last check): "
                                 "stopping (no checkpoint is written after a NaN)")


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit or a preemption) and SIGINT (Ctrl-C)
    request a stop: the loop checkpoints at the next step boundary and exits cleanly (exit code 0),
    ready for --resume. A second Ctrl-C stops at once, without a checkpoint (KeyboardInterrupt; one
    line, exit 130). Once the stop checkpoint is written (`done`), every further stop signal is
    ignored until the process exits: SLURM and train.sbatch repeat theirs, and a signal arriving
    during the exit would otherwise turn a clean stop (and its requeue) into a failure.

    Ranks must agree on the step at which they stop (the checkpoint is a collective), so with
    several processes the flag is all-reduced (MAX) every `check_every` steps: one tiny collective
    and one host sync per check; with one process the flag is read at every step, for free.
    """

    def __init__(self, accelerator, check_every: int = 10):
        self.accelerator, self.check_every, self.received = accelerator, max(1, check_every), None
        for sig in data.STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            if self.received == name:
                raise KeyboardInterrupt   # the second Ctrl-C
            if self.accelerator.is_main_process:   # os.write: print() may be interrupted mid-line here
                os.write(sys.stderr.fileno(), b"\n[stop] Ctrl-C: checkpointing at the next step, then exiting "
                                              b"(Ctrl-C again stops at once, without a checkpoint)\n")
        self.received = self.received or name

    def requested(self, step: int) -> bool:
        if self.accelerator.num_processes == 1:
            return self.received is not None
        if step % self.check_every:
            return False
        flag = torch.tensor([self.received is not None], dtype=torch.int32, device=self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @staticmethod
    def done() -> None:
        """The stop checkpoint is written: ignore every stop signal until the process exits."""
        for sig in data.STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------------
# The logging window

class Window:
    """Per-key sums on the device and the number of steps that returned each key."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, stats: dict) -> None:
        for key, value in stats.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self, accelerator) -> dict:
        """{key: mean over the window's steps, averaged over ranks} as Python floats; resets."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=accelerator.device)
                             / self.counts[k] for k in keys])
        if accelerator.num_processes > 1:
            dist.all_reduce(means)
            means /= accelerator.num_processes
        self.sums, self.counts = {}, {}
        return dict(zip(keys, means.tolist()))


def _nonfinite_in(stats: dict, flag: torch.Tensor) -> torch.Tensor:
    for key, value in stats.items():
        if key.endswith("loss"):
            flag = flag | ~torch.isfinite(torch.as_tensor(value, device=flag.device)).all()
    return flag


def _to_device(obj, device):
    """Tensors in nested dicts / lists / tuples moved to `device` (a restored method state)."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def checkpointed(setup: Setup) -> dict:
    """The objects a checkpoint holds, read from the setup now (a hook may have replaced one)."""
    objects = {"model": setup.model, "optimizer": setup.optimizer}
    if setup.scheduler is not None:
        objects["scheduler"] = setup.scheduler
    return objects | setup.objects


# --------------------------------------------------------------------------------------------------
# The loop

def selection(cfg: dict, task: str) -> tuple[str, Callable[[float, float], bool]]:
    """(the validation metric a run selects its model by, is_better(new, best)) for the task."""
    if task == "classification":
        key, higher = cfg["select_metric"], True
    elif cfg["select_metric"] != "acc":
        raise ConfigError(f"select_metric='{cfg['select_metric']}': a {task} run selects on "
                          + ("MAE" if task == "regression" else "the mean Dice"))
    else:
        key, higher = ("mae", False) if task == "regression" else ("dice_mean", True)
    delta = cfg["min_delta"]
    return key, (lambda new, best: new > best + delta) if higher else (lambda new, best: new < best - delta)


def resolve_encoders(cfg: dict, meta: dict, modalities: list[str], feature_dim: int | None = None) -> dict:
    """cfg["encoders"] fitted to the dataset (models.encoders.resolve_encoder_configs) and returned:
    an entry that does not fit it (a modality the dataset lacks, an entry written for another kind
    of encoder) is refused (ConfigError, one line) when the command line set it, and dropped with
    one warning line when it came from a file; every used modality left without an entry gets the
    default encoder of its kind (width `feature_dim`, else the common width of the kept entries,
    else models.encoders.AUTO_WIDTH). ConfigError for what resolve_encoder_configs refuses."""
    try:
        configs, dropped = resolve_encoder_configs(meta["modalities"], modalities, cfg.get("encoders") or {},
                                                   feature_dim)
    except ModelConfigError as err:
        raise ConfigError(str(err) if str(err).startswith("encoders.") else f"encoders: {err}") from None
    if not dropped:
        return configs
    data, has = cfg.get("data", "the dataset"), ", ".join(meta["modalities"])
    absent = [m for m in dropped if m not in meta["modalities"]]
    why = {m: f"{data} has no modality {m!r} (it has {has})" for m in absent}
    why |= {m: f"{reason} ({data})" for m, reason in dropped.items() if m not in absent}
    on_cli = [m for m in dropped if source_of(cfg, f"encoders.{m}") == COMMAND_LINE]
    if on_cli:
        raise ConfigError(f"--encoders.{on_cli[0]}: {why[on_cli[0]]}")
    parts = [f"encoders for {', '.join(absent)} dropped: {data} has no modality "
             f"{' or '.join(map(repr, absent))} (it has {has})"] if absent else []
    parts += [f"encoders.{m} dropped ({m} gets the default encoder of its kind): {why[m]}"
              for m in dropped if m not in absent]
    where = next((s for m in dropped if (s := source_of(cfg, f"encoders.{m}"))), None)
    warn((f"{where}: " if where else "") + "; ".join(parts))
    return configs


def check_config(cfg: dict) -> None:
    """Refuse a loop key that names no choice (select_on, select_metric, scheduler, optimizer),
    before any compute. Every script's own check_config calls this first; train() calls it too."""
    check_choice("select_on", cfg["select_on"], metrics.SELECT_ON)
    check_choice("select_metric", cfg["select_metric"], metrics.SELECT_METRIC)
    check_choice("scheduler", cfg["scheduler"], optim.SCHEDULERS)
    check_choice("optimizer", cfg["optimizer"], optim.OPTIMIZERS)
    rundir.report_to(cfg["report_to"])   # an unknown tracker, or one whose package is not installed


def run_modalities(cfg: dict, meta: dict, method: str, min_modalities: int, max_modalities: int | None) -> list:
    """The modalities a run trains (`modalities`, or the dataset's), refused in one line when one is
    not in the dataset, named twice, or their number is not what `method` trains."""
    modalities = list(cfg["modalities"] or meta["modalities"])
    unknown = [m for m in modalities if m not in meta["modalities"]]
    if unknown or len(set(modalities)) != len(modalities):
        raise ConfigError(f"modalities={modalities}: " + (f"{unknown} not in {cfg['data']}" if unknown else
                                                         "a modality is named twice")
                          + f" (it has {', '.join(meta['modalities'])})")
    if len(modalities) < min_modalities or (max_modalities and len(modalities) > max_modalities):
        need = (f"exactly {min_modalities}" if min_modalities == max_modalities else
                f"{min_modalities} or more" if not max_modalities else f"{min_modalities} to {max_modalities}")
        raise ConfigError(f"modalities={modalities}: {method} trains {need} modalities "
                          f"(set --modalities to {need} of {list(meta['modalities'])})")
    return modalities


def prepare(cfg: dict, accelerator, *, method: str, build: Callable, tasks=("classification",),
            min_modalities: int = 1, max_modalities: int | None = None,
            feature_dim: int | None = None, quiet: bool = False) -> tuple[dict, Context, Setup]:
    """Everything of a run before its run directory: the validated data and its refusals (task,
    modalities, encoders fitted to the dataset, the selection metric, a batch larger than the
    training split), the loaders, the Context and the method's Setup from `build(cfg, ctx)`.
    Returns (cfg with its encoders resolved, ctx, setup). train() runs it; train.evaluate rebuilds
    a finished run's model with it (tasks=None: any task; quiet: ctx.print silent). Nothing is written."""
    meta = data.prepare_data(cfg, accelerator)            # validates every shard before any compute
    task = meta["task"]
    if tasks is not None and task not in tasks:
        raise ConfigError(f"data={cfg['data']}: its task is {task}; {method} supports {', '.join(tasks)}")
    modalities = run_modalities(cfg, meta, method, min_modalities, max_modalities)
    if task != "segmentation":   # BraTS's model reads `segmentation`, not `encoders`
        # entries for modalities this dataset lacks dropped (from a YAML) or refused (from the
        # command line); a default encoder for each modality without one
        cfg = cfg | dict(encoders=resolve_encoders(cfg, meta, modalities, feature_dim=feature_dim))
    selection(cfg, task)   # refuses a select_metric the task lacks
    loaders, samplers = {}, {}
    for split in ("train", "val", "test"):
        loaders[split], samplers[split] = data.make_loader(cfg, meta, split, accelerator, modalities,
                                                           train=split == "train")
    if len(samplers["train"]) == 0:
        raise ConfigError(f"batch_size={cfg['batch_size']} exceeds the {meta['splits']['train']['num_samples']} "
                          f"training samples of {cfg['data']} (the last partial batch is dropped)")
    position = dict(epoch=0, batch_in_epoch=0, step=0, best=None, best_epoch=-1, bad_evals=0, stopped_early=False)
    ctx = Context(cfg, accelerator, meta, task, modalities, loaders, samplers["train"], position, quiet=quiet)
    try:
        setup = build(cfg, ctx)
    except ModelConfigError as err:
        raise ConfigError(f"model: {err}") from None
    return cfg, ctx, setup


def script_module(build: Callable) -> str:
    """The importable module whose `build` made a run ("train.gaal"), recorded in result.json
    (`script`) so that train.evaluate rebuilds the model the same way. A script started as
    `python train/gaal.py` (or `-m train.gaal`) is `__main__`: named from its path."""
    name = build.__module__
    path = main_script() if name == "__main__" else None
    if path is not None:
        try:
            name = ".".join(path.relative_to(Path(__file__).resolve().parent.parent).with_suffix("").parts)
        except ValueError:   # a script outside this repository
            name = path.stem
    return name


@dataclasses.dataclass
class Run:
    """A run in progress: what the phases of train() share."""
    setup: Setup
    ctx: Context
    schedule: Schedule
    fuse: Callable                         # the model's outputs -> the fused prediction
    plateau: bool                          # the scheduler steps on the validation loss (ReduceLROnPlateau)
    preemption: Preemption
    nonfinite: torch.Tensor                # ~isfinite of the losses since the last check, on the device
    step: Callable                         # the method's step, compiled where `compile: step` asks
    window: Window = dataclasses.field(default_factory=Window)
    bar: tqdm | None = None

    @property
    def position(self) -> dict:
        return self.ctx.position

    @property
    def more_epochs(self) -> bool:
        """Epochs are left and early stopping has not ended the run."""
        return self.position["epoch"] < self.schedule.epochs and not self.position["stopped_early"]


def start(cfg: dict, *, method: str, build: Callable, step: Callable, deepspeed: bool | str,
          compile_step: bool | str, **prepare_kwargs) -> Run:
    """A run up to its first step: the refusals before any compute, the accelerator (with the
    trackers of `report_to`, not yet opened), the stop signals, the data and the method's setup
    (prepare), a schedule the scheduler cannot follow refused, `compile` applied (train.capture;
    Run.step is the step to call), then the run directory checked, locked and its config.yaml
    written (rundir.setup_run_dir)."""
    check_config(cfg)
    accelerator = distributed.setup_accelerator(cfg, log_with=rundir.trackers(cfg))
    if deepspeed is not True:
        distributed.refuse_deepspeed(accelerator, method, deepspeed or "its script does not declare DeepSpeed support "
                                     "(loop.train(..., deepspeed=True))")
    preemption = Preemption(accelerator, cfg["preempt_check_every"])   # SIGTERM/SIGUSR1/SIGINT -> checkpoint, exit
    cfg, ctx, setup = prepare(cfg, accelerator, method=method, build=build, **prepare_kwargs)
    schedule = setup.schedule or Schedule(cfg["epochs"])
    plateau = isinstance(setup.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    if plateau and schedule.scheduler_before_epoch:
        raise ConfigError(f"scheduler=plateau: {method} ({cfg.get('variant', '')}) steps its scheduler before each "
                          "epoch, before any validation loss exists; choose another scheduler")
    step = capture.apply_compile(cfg, accelerator.unwrap_model(setup.model), step, accelerator.device, method=method,
                                 compile_step=compile_step, deepspeed=distributed.deepspeed_stage(accelerator) is not None)
    ctx.run_dir = rundir.setup_run_dir(cfg, accelerator)
    fuse = setup.fuse or accelerator.unwrap_model(setup.model).fuse
    nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
    return Run(setup, ctx, schedule, fuse, plateau, preemption, nonfinite, step)


def resume(setup: Setup, ctx: Context, changes: list) -> None:
    """Restore the run's latest checkpoint into `setup` and `ctx.position`; record the config changes
    the resume was allowed (train.rundir.resumed_config) with the step they took effect at."""
    accelerator, position = ctx.accelerator, ctx.position
    saved = checkpoint.load_checkpoint(ctx.run_dir, accelerator, checkpointed(setup), setup.generators, cfg=ctx.cfg)
    setup.state.update(_to_device(saved.pop("method", {}), accelerator.device))
    position.update(saved)
    accelerator.print(f"[resume] from step {position['step']} (epoch {position['epoch']}, "
                      f"batch {position['batch_in_epoch']})")
    for change in changes:   # recorded in the checkpoints and result.json
        accelerator.print(f"[resume] {change['key']}: {change['from']!r} -> {change['to']!r} (recorded in result.json)")
    if changes:
        position["config_changes"] = position.get("config_changes", []) + \
            [change | {"step": position["step"]} for change in changes]


def open_progress(run: Run) -> None:
    """Before the first epoch: a warning when a fresh run would log its training diagnostics fewer
    than 10 times, the progress bar over the whole run (from a resumed step), the model in training mode."""
    cfg, accelerator, position = run.ctx.cfg, run.ctx.accelerator, run.position
    total = run.schedule.epochs * len(run.ctx.train_sampler)
    points = total // cfg["log_every"]
    if points < 10 and not cfg["resume"]:
        warn(f"log_every={cfg['log_every']}: this run logs its training diagnostics {points} time(s) over its "
             f"{total} steps; --log_every {max(1, total // 20)} gives ~20 points")
    run.bar = tqdm(total=total, initial=min(position["step"], total),
                   disable=not (cfg["progress"] and accelerator.is_main_process and sys.stderr.isatty()),
                   dynamic_ncols=True)
    run.setup.model.train()


def start_epoch(run: Run) -> None:
    """Before an epoch's first batch: the scheduler stepped when the schedule steps it before each
    epoch (not again when a resume continues the epoch), the progress label, the sampler at the
    epoch and at the batch a resume continues from."""
    position, schedule, setup = run.position, run.schedule, run.setup
    if schedule.scheduler_before_epoch and position["batch_in_epoch"] == 0:
        with warnings.catch_warnings():   # "scheduler.step() before optimizer.step()": intended
            warnings.simplefilter("ignore", UserWarning)
            setup.scheduler.step()
    label = schedule.phase().label
    run.bar.set_description(f"epoch {position['epoch'] + 1}/{schedule.epochs}" + (f" {label}" if label else ""))
    run.ctx.train_sampler.set_epoch(position["epoch"], start_batch=position["batch_in_epoch"])


def run_epoch(run: Run, step: Callable, after_step: Callable | None) -> bool:
    """The epoch's batches (the rest of them after a resume): the method's step, the logging window,
    the periodic checkpoint. True when the run stops here (a signal, stop_after_steps)."""
    ctx, position, cfg = run.ctx, run.position, run.ctx.cfg
    for batch in ctx.loaders["train"]:
        batch = data.to_device(batch, ctx.device)
        ctx.log_step = (position["step"] + 1) % cfg["log_every"] == 0
        stats = step(run.setup, batch, ctx)
        run.window.add(stats)
        run.nonfinite = _nonfinite_in(stats, run.nonfinite)
        position["step"] += 1
        position["batch_in_epoch"] += 1
        run.bar.update()
        if after_step is not None:
            after_step(run.setup, ctx)
        if ctx.log_step:
            log_window(run)
        if checkpoint_if_due(run):
            return True
    return False


def log_window(run: Run) -> None:
    """A log step: the NaN/Inf check, the window's means (averaged over ranks) and the learning
    rate logged, the losses shown beside the progress bar."""
    ctx = run.ctx
    check_finite(run.nonfinite, run.position["step"], ctx.accelerator)
    scalars = run.window.means(ctx.accelerator)
    scalars["train/lr"] = run.setup.optimizer.param_groups[0]["lr"]
    ctx.log(scalars)
    run.bar.set_postfix({k.removeprefix("train/").replace("/loss", ""): f"{v:.3f}"
                         for k, v in scalars.items() if k.endswith("/loss")}, refresh=False)


def checkpoint_if_due(run: Run) -> bool:
    """After a step: a checkpoint every `ckpt_every_steps` and when a stop is requested (a signal,
    `stop_after_steps`), after the NaN/Inf check. True when the run stops here."""
    cfg, position = run.ctx.cfg, run.position
    stop = bool(cfg["stop_after_steps"] and position["step"] >= cfg["stop_after_steps"]) \
        or run.preemption.requested(position["step"])
    if stop or (cfg["ckpt_every_steps"] and position["step"] % cfg["ckpt_every_steps"] == 0):
        if not run.ctx.log_step:   # a log step has just checked the flag
            check_finite(run.nonfinite, position["step"], run.ctx.accelerator)
        save(run)
    return stop


def save(run: Run) -> None:
    """A checkpoint of the run now: the setup's objects, the position and the method's state."""
    ctx, setup = run.ctx, run.setup
    checkpoint.save_checkpoint(ctx.run_dir, ctx.accelerator, checkpointed(setup),
                               run.position | {"method": setup.state}, ctx.cfg["keep_checkpoints"], setup.generators)


def stop(run: Run) -> dict:
    """The end of a run stopped by a signal or `stop_after_steps` (its checkpoint written): every
    further stop signal ignored, the trackers ended as unfinished, the run directory unlocked."""
    accelerator, position = run.ctx.accelerator, run.position
    run.preemption.done()
    run.bar.close()
    reason = run.preemption.received or f"stop_after_steps={run.ctx.cfg['stop_after_steps']}"
    accelerator.print(f"[stop] {reason} at step {position['step']}: checkpoint written, exiting (resume with --resume)")
    rundir.close_trackers(accelerator, finished=False)
    rundir.unlock_run_dir(run.ctx.run_dir)
    return {"stopped_at_step": position["step"], "run_dir": str(run.ctx.run_dir)}


def end_epoch(run: Run, epoch_end: Callable | None) -> None:
    """After an epoch's last batch: the NaN/Inf check, the scheduler's per-epoch step, validation
    and model selection every `eval_every` epochs and at the last, the method's hook, the checkpoint."""
    ctx, setup, position = run.ctx, run.setup, run.position
    check_finite(run.nonfinite, position["step"], ctx.accelerator)
    if setup.scheduler is not None and not (run.plateau or run.schedule.scheduler_before_epoch):
        setup.scheduler.step()
    position["epoch"] += 1
    position["batch_in_epoch"] = 0
    val = None
    if position["epoch"] % ctx.cfg["eval_every"] == 0 or position["epoch"] == run.schedule.epochs:
        val = validate_and_select(run)
    if epoch_end is not None:
        epoch_end(setup, ctx, val)
    save(run)


def validate_and_select(run: Run) -> dict:
    """An epoch end's validation: every rank takes the main process's BatchNorm statistics, then the
    validation metrics are logged and appended to metrics.jsonl (with the schedule's phase record),
    the plateau scheduler steps on the loss, and the model is selected (best.pt) or early stopping
    counts. Returns the metrics."""
    setup, ctx, position = run.setup, run.ctx, run.position
    cfg, accelerator, run_dir = ctx.cfg, ctx.accelerator, ctx.run_dir
    select_key, better = selection(cfg, ctx.task)
    # every rank validates (and best.pt, the checkpoint hold) the main process's BatchNorm statistics
    distributed.sync_buffers([o for o in checkpointed(setup).values() if isinstance(o, torch.nn.Module)], accelerator)
    val = metrics.evaluate(setup.model, ctx.loaders["val"], accelerator, ctx.task, run.fuse)
    if run.plateau:
        setup.scheduler.step(val["fused"]["loss"])
    ctx.log({f"val_{k}/{name}": v for k, mets in val.items() for name, v in mets.items()})
    record = {"epoch": position["epoch"], **run.schedule.phase().record, "step": position["step"]}
    rundir.append_jsonl(run_dir, record | {"val": val}, accelerator)
    score = metrics.selection_score(val, cfg["select_on"], select_key)
    if position["best"] is None or better(score, position["best"]):
        position.update(best=score, best_epoch=position["epoch"], bad_evals=0)
        if distributed.deepspeed_stage(accelerator) is not None:   # float32 master weights, gathered (collective)
            checkpoint.save_deepspeed_model_atomic(accelerator.unwrap_model(setup.model), run_dir / "best.pt",
                                                   accelerator)
        elif accelerator.is_main_process:
            checkpoint.save_model_atomic(accelerator.unwrap_model(setup.model), run_dir / "best.pt")
    else:
        position["bad_evals"] += 1
        position["stopped_early"] = bool(cfg["patience"]) and position["bad_evals"] >= cfg["patience"]
    ctx.print(f"epoch {position['epoch']}/{run.schedule.epochs}: val "
              + "  ".join(f"{k} {v[select_key]:.4f}" for k, v in val.items())
              + ("  [early stop]" if position["stopped_early"] else ""))
    return val


def test_selected_model(run: Run, method: str, script: str) -> dict:
    """The end of a run: the model selected on validation (best.pt) evaluated on test and validation,
    result.json written, the closing table printed, the trackers ended and the run directory unlocked."""
    setup, ctx, position = run.setup, run.ctx, run.position
    cfg, accelerator, run_dir = ctx.cfg, ctx.accelerator, ctx.run_dir
    select_key, _ = selection(cfg, ctx.task)
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(setup.model).load_state_dict(checkpoint.load_trusted(run_dir / "best.pt"))
    test = metrics.evaluate(setup.model, ctx.loaders["test"], accelerator, ctx.task, run.fuse)
    val = metrics.evaluate(setup.model, ctx.loaders["val"], accelerator, ctx.task, run.fuse)
    result = {"run_dir": str(run_dir), "method": method, "script": script,
              "best_epoch": position["best_epoch"], "val": val, "test": test,
              "bayes_accuracy": ctx.meta.get("source", {}).get("bayes_accuracy"),
              "select_on": cfg["select_on"], "select_metric": select_key, **setup.result}
    if position.get("config_changes"):
        result["config_changes"] = position["config_changes"]
    if accelerator.is_main_process:
        rundir.write_result(run_dir, result)
        rundir.print_result_table(result, select_key)
        rundir.close_trackers(accelerator)
        rundir.unlock_run_dir(run_dir)
    return result


def train(cfg: dict, *, method: str, build: Callable, step: Callable, after_step: Callable | None = None,
          epoch_end: Callable | None = None, tasks=("classification",), min_modalities: int = 1,
          max_modalities: int | None = None, deepspeed: bool | str = False, feature_dim: int | None = None,
          compile_step: bool | str = "its script does not declare that its step compiles "
                                     "(loop.train(..., compile_step=True))") -> dict:
    """Train `method` as configured by `cfg`; return result.json's content (or, when stopped by a
    signal or `stop_after_steps`, {"stopped_at_step", "run_dir"}).

    deepspeed: True when `build` supports DeepSpeed ZeRO-1/2 (it prepares the model with the
    accelerator and `step` steps the engine); otherwise the reason the method cannot run under
    it, refused before any compute. feature_dim: the width every encoder entry that leaves it unset
    gives (CGGM: d_model); see resolve_encoders. compile_step: True when `step` can run under
    torch.compile (`compile: step`, train.capture), else the reason it cannot, refused before any compute."""
    changes = []
    if cfg["resume"]:   # the run's own config.yaml is the config; flags that would change it are refused
        cfg, changes = rundir.resumed_config(cfg)
    run = start(cfg, method=method, build=build, step=step, deepspeed=deepspeed, compile_step=compile_step, tasks=tasks,
                min_modalities=min_modalities, max_modalities=max_modalities, feature_dim=feature_dim)
    if cfg["resume"]:
        resume(run.setup, run.ctx, changes)
    open_progress(run)
    while run.more_epochs:
        start_epoch(run)
        if run_epoch(run, run.step, after_step):
            return stop(run)
        end_epoch(run, epoch_end)
    run.bar.close()
    return test_selected_model(run, method, script_module(build))


def _rank_prefix() -> str:
    return f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def run_entry_point(main: Callable[[dict], dict], declared: dict, default_config: str | None,
                    ignored: Callable[[dict], dict] | None = None) -> None:
    """What `python train/<script>.py ...` runs: resolve the config, call `main(cfg)`, leave the
    process group. A refusal of the input (config, data, run directory, checkpoint) or a non-finite
    loss ends the process with ONE line on stderr that names the file, field or flag, and exit
    status 2, instead of a traceback. Several processes print it each, prefixed with their rank.
    `ignored(cfg)`: {key: why} for the keys the resolved config makes meaningless (e.g. IGM's
    official variant ignores `epochs`): see train.config.load_config."""
    try:
        cfg = load_config(declared, default_config=default_config, ignored=ignored)
        main(cfg)
    except (ConfigError, CheckpointError, shards.ShardFormatError, NonFiniteLossError) as err:
        print(f"{_rank_prefix()}error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:   # a second Ctrl-C (the first asks for a checkpoint), or one before training
        print(f"\n{_rank_prefix()}interrupted: stopped at once, without a checkpoint (--resume continues from the "
              "last one written)", file=sys.stderr, flush=True)
        sys.exit(130)
    distributed.finish()

