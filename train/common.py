"""Shared training pieces, one small module: config, Accelerate set-up, data loaders, logging,
checkpoints, evaluation and metrics. The training scripts call these; the loop stays in the script.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # scripts run as `python train/x.py` / `accelerate launch train/x.py`
    sys.path.insert(0, str(REPO_ROOT))

from data_prep import shards  # noqa: E402


class ConfigError(ValueError):
    """A config file or command-line flag is wrong; raised before any compute is spent."""


# --------------------------------------------------------------------------------------------------
# Config: the script's DEFAULTS dict < YAML file < command-line flags. Types are those of DEFAULTS.

def _type_name(value) -> str:
    return type(value).__name__


def _deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_and_merge(base: dict, update: dict, where: str, prefix: str = "", schema: dict | None = None) -> dict:
    """Merge `update` into a copy of `base`, rejecting unknown keys and wrong types.

    Rules: a key must exist in `base`; a value must have the type of the default (an int is
    accepted for a float; a default of None accepts any value); a dict is checked key by key,
    except where the script's DEFAULTS (`schema`) holds an empty dict: such a mapping is free
    (its keys depend on the dataset and are validated by whoever consumes them, e.g.
    models.build_encoder) and is deep-merged.
    """
    schema = base if schema is None else schema
    merged = copy.deepcopy(base)
    for key, value in update.items():
        name = prefix + key
        if key not in base:
            close = [k for k in base if k.split("_")[0] == key.split("_")[0] or k in key or key in k]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown config key '{name}'{hint}")
        default = base[key]
        free = isinstance(schema.get(key), dict) and not schema[key]
        if default is None:
            merged[key] = value
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{name}' must be a mapping, got {_type_name(value)} {value!r}")
            merged[key] = (_deep_merge(default, value) if free else
                           _check_and_merge(default, value, where, name + ".", schema.get(key)))
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: '{name}' must be true or false, got {value!r}")
            merged[key] = value
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: '{name}' must be a number, got {_type_name(value)} {value!r}")
            merged[key] = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: '{name}' must be an integer, got {_type_name(value)} {value!r}")
            merged[key] = value
        elif isinstance(default, list):
            if not isinstance(value, list):
                raise ConfigError(f"{where}: '{name}' must be a list, got {_type_name(value)} {value!r}")
            merged[key] = value
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: '{name}' must be a string, got {_type_name(value)} {value!r}")
            merged[key] = value
        else:
            merged[key] = value
    return merged


def _parse_cli_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001 (YAML 1.1 would keep it a string), 'true' -> True, '[1,2]' -> list."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: cannot parse value {text!r}: {err}") from None


def _cli_to_nested(argv: list[str]) -> tuple[str | None, dict]:
    """Parse `--config F --a.b 3 --c=x --flag` into (F, {"a": {"b": 3}, "c": "x", "flag": True})."""
    config_path, nested, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # a bare flag, e.g. --resume
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            config_path = value
            continue
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: --{key} conflicts with another flag")
        node[parts[-1]] = _parse_cli_value(value)
    return config_path, nested


def load_config(defaults: dict, argv: list[str] | None = None, default_config: str | None = None) -> dict:
    """Resolve the run config: DEFAULTS, then the YAML (`--config`, else `default_config`), then flags.

    Every key may be overridden from the command line (`--lr 3e-4`, `--encoders.image.base_width 32`);
    unknown keys and wrong types raise ConfigError naming the file or flag and the key.
    """
    argv = sys.argv[1:] if argv is None else argv
    config_path, cli = _cli_to_nested(argv)
    config_path = config_path or default_config
    cfg = copy.deepcopy(defaults)
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {config_path}")
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        from_file.pop("config_file", None)  # a run directory's config.yaml records where it came from
        cfg = _check_and_merge(cfg, from_file, str(path), schema=defaults)
        cfg["config_file"] = str(path)
    cfg = _check_and_merge(cfg, cli, "command line", schema=defaults)
    check_ranges(cfg)
    return cfg


# Numeric keys shared by the scripts and the range each must lie in (a script checks its own
# method's knobs in its check_config). A key a script does not have is skipped.
POSITIVE_KEYS = ("lr", "clf_lr", "epochs", "batch_size", "eval_batch_size", "log_every", "eval_every",
                 "keep_checkpoints", "preempt_check_every", "step_size", "gamma")
NON_NEGATIVE_KEYS = ("weight_decay", "clf_weight_decay", "momentum", "grad_clip", "num_workers", "plateau_patience",
                     "ckpt_every_steps", "stop_after_steps", "patience", "min_delta", "warmup_epochs",
                     "warmup_start_lr", "min_lr", "data_seed", "seed")


def check_ranges(cfg: dict) -> None:
    """Refuse a negative (or zero, where it must be positive) or non-finite learning rate, weight
    decay, epoch count, batch size, ... before anything runs: the key and its value in one line."""
    for keys, ok, what in ((POSITIVE_KEYS, lambda v: v > 0, "> 0"), (NON_NEGATIVE_KEYS, lambda v: v >= 0, ">= 0")):
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"{key}={value}: must be {what}")


class CheckpointError(RuntimeError):
    """A run directory or checkpoint cannot be used as asked: unreadable, untrusted (it would run
    code), written by another script, or for another model. Raised before the run changes anything."""


def run_entry_point(main, defaults: dict, default_config: str | None) -> None:
    """What `python train/<script>.py ...` runs: resolve the config, call `main(cfg)`, leave the
    process group. A refusal of the input (config, data, run directory, checkpoint) or a non-finite
    loss ends the process with ONE line on stderr that names the file, field or flag, and exit
    status 2, instead of a traceback. Several processes print it each, prefixed with their rank."""
    try:
        main(load_config(defaults, default_config=default_config))
    except (ConfigError, CheckpointError, shards.ShardFormatError, NonFiniteLossError) as err:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        prefix = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
        print(f"{prefix}error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    finish()


# --------------------------------------------------------------------------------------------------
# Accelerate set-up

def setup_accelerator(cfg: dict):
    """Accelerator with real DDP on CPU-only machines, and a refusal of silent rank-0 clones.

    On a machine without CUDA, Accelerate only starts a gloo process group when `cpu=True`;
    without it every launched process believes it is rank 0 of 1 and trains alone. Launches that
    cannot give the processes asked for (`accelerate launch --cpu --num_processes N`: one process;
    DeepSpeed with several processes and no CUDA) are refused first (check_world_size).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_world_size()   # launches that cannot give the processes the user asked for: refused first
    cpu = cfg.get("cpu", False) or not torch.cuda.is_available()
    if deepspeed_requested():   # Accelerate drops a DeepSpeed launch config silently when cpu=True
        if cfg.get("cpu", False) and torch.cuda.is_available():
            raise ConfigError("cpu=true cannot be combined with a DeepSpeed launch config (DeepSpeed "
                              "would still run on the GPU): drop --cpu or launch without DeepSpeed")
        cpu = False   # without CUDA, DeepSpeed's CPU accelerator (gloo) is used
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.get("mixed_precision", "no"))
    check_world_size(accelerator)
    if cfg["batch_size"] % accelerator.num_processes:
        raise ConfigError(f"batch_size={cfg['batch_size']} (the global batch) is not divisible by "
                          f"the number of processes {accelerator.num_processes}")
    set_seed(cfg["seed"])  # same on every rank: identical init, and DDP broadcasts it anyway
    return accelerator


def check_world_size(accelerator=None) -> None:
    """Refuse a run whose processes are not the ones the user asked for (ConfigError, one line).

    Without an accelerator (called first, before any compute), from the launch environment:
    - `accelerate launch --cpu --num_processes N` (or N > 1 without --multi_gpu and without GPUs)
      starts ONE process: its simple launcher only sets ACCELERATE_USE_CPU and MASTER_ADDR/PORT (no
      WORLD_SIZE); the count asked for is read from that launcher's command line (its config file
      included), the parent of this process;
    - DeepSpeed with several processes and no CUDA: Accelerate joins 1 process while DeepSpeed
      sees WORLD_SIZE of them (multi-rank DeepSpeed through Accelerate needs GPUs here).
    With an accelerator: the launcher started WORLD_SIZE processes and Accelerate joined them all.
    """
    env = os.environ
    launched = int(env.get("WORLD_SIZE", "1"))
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "<script>.py"
    if accelerator is not None:
        if accelerator.num_processes != launched:
            raise ConfigError(
                f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate joined "
                f"{accelerator.num_processes}: each process would train alone as rank 0 (without CUDA "
                "Accelerate joins processes only when created with Accelerator(cpu=True), as train/*.py "
                f"do); launch with accelerate launch --multi_gpu --num_processes {launched} train/{script} "
                f"... or torchrun --nproc_per_node {launched} train/{script} ...")
        return
    if deepspeed_requested() and launched > 1 and not torch.cuda.is_available():
        raise ConfigError(
            f"DeepSpeed with {launched} processes on a machine without CUDA: multi-process DeepSpeed "
            f"through Accelerate needs GPUs (on CPU Accelerate joins 1 process while DeepSpeed sees "
            f"{launched}). Here run DeepSpeed with one process (--num_processes 1: it works on CPU), "
            f"or {launched} processes without DeepSpeed: accelerate launch --multi_gpu "
            f"--num_processes {launched} train/{script} ...")
    mpi = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if "ACCELERATE_USE_CPU" not in env or "WORLD_SIZE" in env or any(k in env for k in mpi):
        return   # not started by accelerate's one-process launcher (torchrun, --multi_gpu, mpirun, python)

    # Started by `accelerate launch` without a multi-process launcher: how many did it ask for?
    requested, with_cpu, known, config_file = None, False, False, None
    try:
        argv = [a.decode() for a in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0") if a]
    except (OSError, UnicodeDecodeError):
        argv = None
    if argv is not None:
        start = next((i + 1 for i, a in enumerate(argv) if a == "accelerate.commands.launch"
                      or Path(a).name == "accelerate-launch"), None)
        if start is None:
            start = next((i + 2 for i, a in enumerate(argv[:-1])
                          if Path(a).name == "accelerate" and argv[i + 1] == "launch"), None)
        if start is None:
            return   # the parent is not accelerate: a plain `python train/x.py` with these variables
        import contextlib
        import io
        try:
            from accelerate.commands.config import default_config_file
            from accelerate.commands.config.config_args import load_config_from_file
            from accelerate.commands.launch import launch_command_parser
            with contextlib.redirect_stderr(io.StringIO()):
                args = launch_command_parser().parse_args(argv[start:])
            with_cpu, requested = bool(args.cpu), args.num_processes
            if requested is None and (args.config_file or (os.path.isfile(default_config_file) and not args.cpu)):
                config = load_config_from_file(args.config_file)
                requested, with_cpu = config.num_processes, with_cpu or bool(getattr(config, "use_cpu", False))
                config_file = args.config_file or default_config_file
            known = True
        except (Exception, SystemExit):   # noqa: BLE001 - an unknown launcher version: use the environment
            known = False
    if known and (requested is None or requested <= 1):
        return
    if not known:   # the launcher sets MASTER_ADDR/PORT only when asked for several processes or machines
        if "MASTER_PORT" not in env:
            return
        requested = None
    where = f"num_processes: {requested} in {config_file}" if config_file else f"--num_processes {requested}"
    asked = f"{requested} processes ({where})" if requested else "several processes"
    how = ("with --cpu (or use_cpu in its config) it" if with_cpu or env["ACCELERATE_USE_CPU"].lower() == "true"
           else "without --multi_gpu (and without several GPUs) it")
    n = requested or "N"
    raise ConfigError(
        f"accelerate launch was asked for {asked} but started ONE: {how} never starts more than one "
        f"process, and this run would silently train alone. For {n} processes on CPU run accelerate "
        f"launch --multi_gpu --num_processes {n} train/{script} ... (real DDP over gloo) or torchrun "
        f"--nproc_per_node {n} train/{script} ...; for one process " +
        (f"set num_processes: 1 in {config_file}" if config_file else "drop --num_processes"))


# --------------------------------------------------------------------------------------------------
# DeepSpeed (through Accelerate: `accelerate launch --config_file train/configs/accelerate/
# deepspeed_zero<1|2>.yaml ...`). Only ZeRO stages 1 and 2; the joint baseline supports them, the
# methods that edit gradients between backward and step refuse them (refuse_deepspeed).

DEEPSPEED_STAGES = (1, 2)

# Imported without CUDA, DeepSpeed logs "Setting accelerator to CPU" to STDOUT, and Accelerate
# imports it in every unwrap_model once it is installed: name the CPU accelerator (what DeepSpeed
# picks anyway) so that the scripts' stdout stays their own.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


def deepspeed_requested() -> bool:
    """True when the launcher asked for DeepSpeed (what `accelerate launch` with a DEEPSPEED config sets;
    read the way Accelerate reads it: true/yes/on/1)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").strip().lower() in ("1", "y", "yes", "t", "true", "on")


def deepspeed_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run, None when the run does not use DeepSpeed."""
    from accelerate.utils import DistributedType
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def refuse_deepspeed(accelerator, method: str, reason: str) -> None:
    """Stop a method that cannot run under DeepSpeed, before any compute, saying why and what instead.

    `reason`: what the method does to the gradients between backward and the optimizer step. Such
    scripts all-reduce by hand and never hand their model to Accelerate, so without this refusal a
    DeepSpeed launch config would be silently ignored (no ZeRO); moving them onto the engine would not
    be enough either: Accelerate's DeepSpeed wrapper steps inside accelerator.backward(), and under
    ZeRO-2 each rank holds only a partition of the reduced gradients after backward.
    """
    stage = deepspeed_stage(accelerator)
    if stage is None:
        return
    where = ("and ZeRO-2 partitions the reduced gradients across ranks after backward, so no rank "
             "holds the full gradient to edit" if stage >= 2 else
             "and under ZeRO-1 the reduced gradients sit in DeepSpeed's flat buffers (p.grad is None)")
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "<script>.py"
    raise ConfigError(
        f"{method} does not support DeepSpeed (ZeRO stage {stage}): {reason}. These edits need the "
        "full, all-reduced gradients between backward and the optimizer step; Accelerate's DeepSpeed "
        f"wrapper runs the step inside accelerator.backward(), so there is no such point, {where}. "
        f"Train {method} with plain data parallelism instead (its gradients are all-reduced by hand, "
        f"exactly): accelerate launch --multi_gpu --num_processes N train/{script} ... "
        "DeepSpeed ZeRO-1/2 is supported by train/joint.py.")


def configure_deepspeed(accelerator, cfg: dict, model: torch.nn.Module) -> int | None:
    """Before accelerator.prepare under DeepSpeed: check the stage and fill the DeepSpeed config's
    "auto" entries from the run config, refusing disagreements (nothing is silently ignored):
    train_micro_batch_size_per_gpu = batch_size / processes, gradient_clipping = grad_clip
    (DeepSpeed clips inside its step; 0 = off), no gradient accumulation, no optimizer/scheduler
    in the file (the script builds its own), bf16 on exactly when mixed_precision is bf16.

    Under bf16 DeepSpeed casts the module to bf16 and Accelerate's autocast is off, so the model's
    forward is wrapped in bf16 autocast with float32 outputs (what Accelerate does for DDP):
    float inputs and float32 losses keep working. Returns the ZeRO stage, or None without DeepSpeed.
    """
    stage = deepspeed_stage(accelerator)
    if stage is None:
        return None
    if stage not in DEEPSPEED_STAGES:
        raise ConfigError(f"DeepSpeed ZeRO stage {stage}: only stages {DEEPSPEED_STAGES} are supported "
                          "(stage 3 partitions the parameters themselves, which evaluation and the "
                          "checkpoints read whole); use train/configs/accelerate/deepspeed_zero1.yaml "
                          "or deepspeed_zero2.yaml")
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")

    def fill(key, value, what):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"{source}: {key}={ds[key]!r} disagrees with {what} ({value!r}): set it "
                              f"to \"auto\" (it then follows the run config) or make them equal")

    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{source}: remove '{key}': the script builds its own from the run config")
    if cfg.get("mixed_precision", "no") not in ("no", "bf16"):
        raise ConfigError(f"mixed_precision={cfg['mixed_precision']}: under DeepSpeed use bf16 or no "
                          "(the shipped configs keep fp16 off)")
    fill("train_micro_batch_size_per_gpu", cfg["batch_size"] // accelerator.num_processes,
         f"batch_size={cfg['batch_size']} / {accelerator.num_processes} processes")
    fill("train_batch_size", cfg["batch_size"], "batch_size")
    fill("gradient_accumulation_steps", 1, "the scripts, which do not accumulate gradients")
    fill("gradient_clipping", float(cfg.get("grad_clip", 0.0)), "grad_clip")
    bf16 = str(ds.get("bf16", {}).get("enabled", False)).lower() == "true"
    if bf16 != (cfg.get("mixed_precision", "no") == "bf16") or \
            str(ds.get("fp16", {}).get("enabled", False)).lower() == "true":
        raise ConfigError(f"{source}: bf16.enabled={ds.get('bf16', {}).get('enabled')}, "
                          f"fp16.enabled={ds.get('fp16', {}).get('enabled')} disagree with "
                          f"mixed_precision={cfg.get('mixed_precision', 'no')}: set bf16.enabled to "
                          "\"auto\" and fp16.enabled to false")
    if bf16:
        from accelerate.utils import convert_outputs_to_fp32
        model.forward = convert_outputs_to_fp32(
            torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16)(model.forward))
    accelerator.print(f"[deepspeed] ZeRO stage {stage}: micro batch {ds['train_micro_batch_size_per_gpu']} "
                      f"x {accelerator.num_processes} processes, gradient_clipping "
                      f"{ds['gradient_clipping']} (grad_clip), bf16 {'on' if bf16 else 'off'}")
    return stage


def deepspeed_full_grads(params) -> torch.Tensor:
    """Flattened full (all-reduced, float32) gradients of `params` under a ZeRO-1/2 engine, between
    engine.backward and engine.step, where p.grad is None. Collective: every rank calls it for the
    same parameters in the same order."""
    from deepspeed.utils import safe_get_full_grad
    grads = []
    for p in params:
        g = safe_get_full_grad(p)
        grads.append((torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()).flatten())
    return torch.cat(grads)


def deepspeed_grad_norm(params) -> torch.Tensor:
    """L2 norm of the full reduced gradients of `params` under a ZeRO-1/2 engine, assembled one
    parameter at a time (never the whole model's gradient at once). Collective, like
    deepspeed_full_grads."""
    from deepspeed.utils import safe_get_full_grad
    squares = [g.float().pow(2).sum() for g in map(safe_get_full_grad, params) if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def deepspeed_state_dict(module: torch.nn.Module) -> dict:
    """The module's state dict with each parameter's full float32 master weights (under bf16 the
    module itself holds bf16 copies). Collective under ZeRO-1/2: every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param
    state = module.state_dict()
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        state[name] = (p.detach() if full is None else full).float().cpu().clone()
    return {k: v.cpu() for k, v in state.items()}


def save_deepspeed_model_atomic(module: torch.nn.Module, path: Path, accelerator) -> None:
    """save_model_atomic for a DeepSpeed engine's module (float32 master weights). Collective."""
    state = deepspeed_state_dict(module)
    if accelerator.is_main_process:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        _fsync_save(state, tmp)
        os.replace(tmp, path)


def _deepspeed_engine(accelerator, objects: dict):
    """The DeepSpeed engine among checkpointed objects, None when the run does not use DeepSpeed."""
    if deepspeed_stage(accelerator) is None:
        return None
    import deepspeed
    engines = [obj for obj in objects.values() if isinstance(obj, deepspeed.DeepSpeedEngine)]
    if len(engines) != 1:
        raise RuntimeError(f"checkpoint under DeepSpeed: expected one DeepSpeed engine among "
                           f"{sorted(objects)}, found {len(engines)}")
    return engines[0]


def _is_deepspeed_optimizer(obj) -> bool:
    from accelerate.utils import DeepSpeedOptimizerWrapper
    return isinstance(obj, DeepSpeedOptimizerWrapper)


# --------------------------------------------------------------------------------------------------
# Data

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
    """DataLoader over one split, this rank's part of each global batch (see ShardBatchSampler)."""
    dataset = shards.ShardDataset(cfg["data"], split, modalities=modalities, meta=meta)
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
    """DataLoader worker start: ignore SIGTERM/SIGUSR1. SLURM signals every process of a job step,
    workers included; a worker killed by it makes the training process fail ("DataLoader worker
    killed by signal") before it can checkpoint. The training process alone handles the signal
    (Preemption); the workers stop when it shuts the loader down, or on their own when it dies."""
    for sig in Preemption.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# Optimiser, scheduler, loss, evaluation

def build_optimizer(cfg, params):
    """Adam, AdamW or SGD; the fused (one kernel per step) implementation when every parameter is on a
    GPU — same update rule, no per-tensor launches; on CPU torch's default (foreach) path."""
    params = list(params)
    betas = tuple(cfg.get("betas", (0.9, 0.999)))   # a script without a `betas` key gets torch's default
    fused = True if params and all(p.is_cuda for p in params) else None
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], betas=betas, weight_decay=cfg["weight_decay"], fused=fused)
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], betas=betas, weight_decay=cfg["weight_decay"], fused=fused)
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"],
                               fused=fused)
    raise ConfigError(f"optimizer='{cfg['optimizer']}': choose adam, adamw or sgd")


def build_scheduler(cfg, optimizer):
    """Per-epoch schedulers: none | step (StepLR(step_size, gamma)) | cosine (over `epochs`) |
    warmup_cosine (linear from `warmup_start_lr` to lr over `warmup_epochs`, then cosine to `min_lr`;
    CGGM's BraTS recipe) | plateau (ReduceLROnPlateau on the validation loss, `plateau_patience`,
    factor `gamma`; step it with the loss)."""
    name = cfg["scheduler"]
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
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=cfg["gamma"],
                                                          patience=cfg["plateau_patience"])
    raise ConfigError(f"scheduler='{name}': choose none, step, cosine"
                      + (", warmup_cosine or plateau" if "plateau_patience" in cfg else ""))


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


# --------------------------------------------------------------------------------------------------
# Run directory, logging

SELECT_ON = ("fused", "modality_mean")


def selection_score(val: dict, select_on: str, key: str) -> float:
    """The validation figure a run keeps its best model by: the fused output's `key` (released
    recipes), or the mean of the per-modality `key`s (`modality_mean`; in stage-wise training only the
    active modality moves, so this keeps a stage's gains that an equal-weight fused output hides)."""
    check_choice("select_on", select_on, SELECT_ON)
    if select_on == "fused":
        return val["fused"][key]
    per_modality = [mets[key] for name, mets in val.items() if name != "fused"]
    return sum(per_modality) / len(per_modality)


def check_choice(key: str, value, allowed) -> None:
    """Refuse a config value that is not one of the `allowed` names: ConfigError naming the key."""
    if value not in allowed:
        raise ConfigError(f"{key}='{value}': choose {' or '.join(allowed)}")


#: `select_metric`: which validation figure `selection_score` reads (classification). The released
#: IGM scripts keep their best model by fused macro-F1 (Twitter: accuracy).
SELECT_METRIC = ("acc", "macro_f1")


#: What a run writes into its out_dir. A fresh run refuses a directory holding any of them (the
#: launchers' own files, slurm_jobs.log, submit.txt, submitit/, do not count).
RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl", "best.pt", "result.json", "tb")


def previous_run_files(run_dir: Path) -> list[str]:
    """The names in RUN_FILES that exist under `run_dir`: what a fresh run there would overwrite."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def setup_run_dir(cfg: dict, accelerator):
    """Check the run directory, then create it, write the resolved config and open TensorBoard.

    Every rank checks before any rank writes (the directory is on a shared file system), so all
    refuse together. A fresh run refuses a directory that holds any file of a previous run
    (RUN_FILES): nothing already written is lost; --resume needs checkpoints/latest. A resumed run
    leaves config.yaml alone here: resume_from_checkpoint rewrites it once the checkpoint has been
    accepted, so a rejected --resume changes nothing. TensorBoard events logged after the
    checkpoint (by the run that was stopped) are purged: they are logged again.
    """
    run_dir = Path(cfg["out_dir"])
    latest = run_dir / "checkpoints" / "latest"
    if cfg["resume"]:
        if not latest.exists():
            raise ConfigError(f"--resume: no checkpoint under {run_dir / 'checkpoints'} "
                              "(drop --resume to start a run there)")
        purge_step = checkpoint_step(latest) + 1
    else:
        previous = previous_run_files(run_dir)
        if previous:
            what = ("pass --resume to continue that run, or choose another --out_dir" if latest.exists() else
                    "it has no checkpoint to resume from; choose another --out_dir, or delete those files")
            raise ConfigError(f"out_dir={run_dir} holds a previous run's files ({', '.join(previous)}): {what}")
    accelerator.wait_for_everyone()
    writer = None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg["resume"]:
            write_run_config(run_dir, cfg)
        writer = TensorBoardLog(run_dir / "tb", purge_step=purge_step if cfg["resume"] else None)
    accelerator.wait_for_everyone()
    return run_dir, writer


class TensorBoardLog:
    """TensorBoard's SummaryWriter, opened at the first scalar: a run refused before it logs
    anything (a --resume whose checkpoint does not fit) leaves tb/ exactly as it was."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self.log_dir, self.purge_step, self._writer = Path(log_dir), purge_step, None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def write_run_config(run_dir: Path, cfg: dict) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def log_scalars(writer, scalars: dict, step: int) -> None:
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, float(value), step)


def append_jsonl(run_dir: Path, record: dict, accelerator) -> None:
    if accelerator.is_main_process:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


class NonFiniteLossError(FloatingPointError):
    pass


def check_finite(loss_flag: torch.Tensor, step: int, window: int, accelerator=None) -> None:
    """Stop loudly on a NaN/inf loss. `loss_flag` accumulates ~isfinite on the device between checks
    so that the hot path never waits on the host. Collective with several processes: the flag is
    all-reduced (MAX) so that every rank stops at the same check — a rank that stopped alone would
    leave the others waiting in their next collective."""
    if accelerator is not None and accelerator.num_processes > 1:
        loss_flag = loss_flag.to(torch.int32)
        dist.all_reduce(loss_flag, op=dist.ReduceOp.MAX)
    if bool(loss_flag):
        raise NonFiniteLossError(f"non-finite loss within the {window} steps up to step {step}: "
                                 "stopping (no checkpoint is written after a NaN)")


class Preemption:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit or a preemption) request a stop: the
    loop checkpoints at the next step boundary and exits cleanly (exit code 0), ready for --resume.

    Ranks must agree on the step at which they stop (the checkpoint is a collective), so with
    several processes the flag is all-reduced (MAX) every `check_every` steps; that costs one tiny
    collective and one host sync per check, nothing with one process.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, accelerator, check_every: int = 1):
        self.accelerator, self.check_every, self.received = accelerator, max(1, check_every), None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signal.Signals(signum).name

    def requested(self, step: int) -> bool:
        if self.accelerator.num_processes == 1:
            return self.received is not None
        if step % self.check_every:
            return False
        flag = torch.tensor([self.received is not None], dtype=torch.int32, device=self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def checkpoint_at_step_boundary(cfg: dict, state: dict, preemption: "Preemption", nonfinite: torch.Tensor,
                                run_dir: Path, accelerator, objects: dict, generators: dict | None = None) -> bool:
    """After each step: checkpoint every `ckpt_every_steps`, and on a stop request (SIGTERM/SIGUSR1,
    or `stop_after_steps` reached) checkpoint and return True: the script then exits cleanly."""
    stop = bool(cfg["stop_after_steps"] and state["step"] >= cfg["stop_after_steps"]) or preemption.requested(state["step"])
    if stop or (cfg["ckpt_every_steps"] and state["step"] % cfg["ckpt_every_steps"] == 0):
        check_finite(nonfinite, state["step"], cfg["log_every"], accelerator)
        save_checkpoint(run_dir, accelerator, objects, state, cfg["keep_checkpoints"], generators)
    if stop:
        reason = preemption.received or f"stop_after_steps={cfg['stop_after_steps']}"
        accelerator.print(f"[stop] {reason} at step {state['step']}: checkpoint written, "
                          "exiting (resume with --resume)")
    return stop


# --------------------------------------------------------------------------------------------------
# Checkpoints: <run>/checkpoints/ckpt-<step>/{state.pt, rng-rank<r>.pt}, <run>/checkpoints/latest.
# Written into a temporary directory, renamed when complete, then `latest` is replaced atomically:
# a process killed at any point leaves `latest` naming a complete checkpoint.

def _rng_state(generators: dict | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generators: dict | None = None) -> None:
    for key, generator in (generators or {}).items():
        generator.set_state(state["generators"][key])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, accelerator, objects: dict, trainer_state: dict, keep: int = 2,
                    generators: dict | None = None) -> Path:
    """Save `objects` (name -> thing with state_dict(); models are unwrapped) and `trainer_state`.

    Collective: every rank calls it. Each rank stores its own RNG states (the global ones and the
    script's own `generators`, e.g. an augmentation's); rank 0 stores the rest.
    Under DeepSpeed the engine writes its own checkpoint into <ckpt>/deepspeed (every rank its
    optimizer partition); state.pt then holds the model's full float32 weights (for readers of
    the checkpoint; resume uses the engine's files) and the other objects, not the optimizer.
    """
    engine = _deepspeed_engine(accelerator, objects)
    ckpt_root = run_dir / "checkpoints"
    name = f"ckpt-{trainer_state['step']:09d}"
    tmp = ckpt_root / f".tmp-{name}"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _fsync_save(_rng_state(generators), tmp / f"rng-rank{accelerator.process_index}.pt")
    if engine is not None:   # collectives: every rank writes its ZeRO partition
        engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        engine_weights = deepspeed_state_dict(engine.module)
    accelerator.wait_for_everyone()
    final = ckpt_root / name
    if accelerator.is_main_process:
        state = {"trainer": trainer_state, "world_size": accelerator.num_processes}
        if engine is not None:
            state["deepspeed_stage"] = deepspeed_stage(accelerator)
        for key, obj in objects.items():
            if engine is not None and (obj is engine or _is_deepspeed_optimizer(obj)):
                if obj is engine:
                    state[key] = engine_weights
                continue   # the optimizer (partitioned) is in <ckpt>/deepspeed
            if isinstance(obj, torch.nn.Module):
                obj = accelerator.unwrap_model(obj)
                state.setdefault("model_classes", {})[key] = type(obj).__name__
            state[key] = obj.state_dict()
        _fsync_save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(ckpt_root / "latest", name + "\n")
        older = sorted(p for p in ckpt_root.glob("ckpt-*") if p.name != name)
        for stale in older[:max(0, len(older) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_step(latest: Path) -> int:
    """The step of the checkpoint that `checkpoints/latest` names (ckpt-<step>), checked to exist."""
    text = latest.read_text().strip() if latest.is_file() else ""
    match = re.fullmatch(r"ckpt-(\d+)", text)
    if match is None or not (latest.parent / text).is_dir():
        raise CheckpointError(f"{latest}: names {text!r}, not a checkpoint directory in {latest.parent}")
    return int(match.group(1))


#: Beyond torch's weights-only set (tensors, containers, numbers, strings), exactly what a rank's
#: RNG state holds: numpy's MT19937 key array (an ndarray of uint32).
RNG_STATE_GLOBALS = (np.ndarray, np.dtype, np._core.multiarray._reconstruct, np.dtypes.UInt32DType)


def deepspeed_checkpoint_globals() -> tuple:
    """What DeepSpeed's ZeRO-1/2 optimizer files hold beyond tensors (checked: torch 2.14,
    deepspeed 0.19.8): the stage enum, the (static) loss scaler, the fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return (ZeroStageEnum, LossScaler, fragment_address)


def load_trusted(path: Path, allowed_globals=(), mmap: bool = False):
    """torch.load(weights_only=True) onto the CPU: nothing in the file can run code. Accepted:
    tensors, containers, numbers, strings and exactly `allowed_globals`. Anything else — a crafted
    pickle, a truncated or garbage file — raises CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - every failure becomes one line naming the file
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith(("Trying to load", "Unsupported", "Can only build"))),
                      lines[0] if lines else type(err).__name__)
        raise CheckpointError(f"{path}: refused: not a checkpoint file this code writes ({reason}); it is "
                              "loaded with weights_only=True, which never runs code from a file") from None


def _module_mismatch(key: str, written: dict, module: torch.nn.Module) -> str | None:
    """One line saying how a checkpoint's state dict differs from `module`'s, None when it fits."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in written]
    unexpected = [k for k in written if k not in expected]
    shapes = [f"{k} {list(written[k].shape)} in the checkpoint, {list(v.shape)} here" for k, v in expected.items()
              if k in written and hasattr(written[k], "shape") and tuple(written[k].shape) != tuple(v.shape)]
    parts = []
    for what, items in (("shapes differ", shapes), ("missing from the checkpoint", missing),
                        ("not in this model", unexpected)):
        if items:
            parts.append(f"{what}: {', '.join(items[:3])}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else ""))
    return f"'{key}' does not fit this run's model: " + "; ".join(parts) if parts else None


#: Keys that may change between a run and its resumption without changing the model or the state.
RESUME_FREE_KEYS = ("resume", "progress", "stop_after_steps", "num_workers", "config_file", "eval_batch_size",
                    "log_every", "ckpt_every_steps", "keep_checkpoints", "preempt_check_every")


def _config_changes(run_dir: Path, cfg: dict) -> str:
    """'; changed since that run (config.yaml): a.b 8 -> 16, ...' or '' (nothing readable, or no change)."""
    try:
        before = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ""
    if not isinstance(before, dict):
        return ""

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v})
        return out

    old, new = flat(before), flat(cfg)
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if k.split(".")[0] not in RESUME_FREE_KEYS and old.get(k) != new.get(k)]
    return f"; changed since that run (its config.yaml): {', '.join(changed[:4])}" if changed else ""


def _trim_metrics(run_dir: Path, epoch: int) -> None:
    """Drop metrics.jsonl records of epochs after the checkpoint's (and a line cut short by a kill):
    a run killed between an epoch's metrics line and its checkpoint validates that epoch again."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("epoch", 0) <= epoch:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(k + "\n" for k in kept))


def load_checkpoint(run_dir: Path, accelerator, objects: dict, generators: dict | None = None,
                    cfg: dict | None = None) -> dict:
    """Restore `objects` and this rank's RNG states from the latest checkpoint; return trainer state.

    Every file is loaded with weights_only=True (load_trusted); DeepSpeed's own files are checked
    the same way before the engine reads them. A checkpoint of another script or another model is
    refused in one line (CheckpointError) that says what differs — with `cfg` (a resumed run), also
    which config keys changed since the run's config.yaml. With `cfg`, once every rank has restored
    its state: metrics.jsonl loses the records after the checkpoint's epoch, and config.yaml becomes
    `cfg`. Nothing is written before that point, so a refused resume leaves the run as it was.
    """
    ckpt_root = run_dir / "checkpoints"
    path = ckpt_root / f"ckpt-{checkpoint_step(ckpt_root / 'latest'):09d}"
    state = load_trusted(path / "state.pt")
    if not isinstance(state, dict) or "trainer" not in state or "world_size" not in state:
        raise CheckpointError(f"{path / 'state.pt'}: not a training checkpoint (no trainer state)")
    changes = _config_changes(run_dir, cfg) if cfg is not None else ""
    engine = _deepspeed_engine(accelerator, objects)
    written, running = state.get("deepspeed_stage"), deepspeed_stage(accelerator)
    if written != running:
        raise CheckpointError(f"checkpoint {path} was written " +
                              (f"under DeepSpeed ZeRO-{written}" if written is not None else "without DeepSpeed") +
                              " but this run " + (f"uses ZeRO-{running}" if running is not None else
                                                 "does not use DeepSpeed") +
                              ": resume with the launch config that wrote it")
    for key, obj in objects.items():
        if engine is not None and _is_deepspeed_optimizer(obj):
            continue   # in DeepSpeed's own files (<ckpt>/deepspeed), not in state.pt
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no '{key}' (it holds {sorted(state)}): it was "
                                  f"written by another training script{changes}")
        if isinstance(obj, torch.nn.Module):
            module = accelerator.unwrap_model(obj)
            if engine is not None and obj is engine:
                module = engine.module
            written_class = state.get("model_classes", {}).get(key)
            if written_class is not None and written_class != type(module).__name__:
                raise CheckpointError(f"checkpoint {path} holds a {written_class} as '{key}', this script builds a "
                                      f"{type(module).__name__}: it was written by another training script "
                                      f"(see {run_dir / 'config.yaml'}); resume with that script")
            mismatch = _module_mismatch(key, state[key], module)
            if mismatch:
                raise CheckpointError(f"checkpoint {path}: {mismatch}{changes}")
    if engine is not None:
        if state["world_size"] != accelerator.num_processes:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed optimizer partitions were written by "
                                  f"{state['world_size']} processes; resume with that many (this run has "
                                  f"{accelerator.num_processes})")
        for file in sorted((path / "deepspeed").glob("*.pt")):   # before DeepSpeed unpickles them itself
            load_trusted(file, deepspeed_checkpoint_globals(), mmap=True)
        loaded, _ = engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=True,
                                           load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"cannot read the DeepSpeed checkpoint {path / 'deepspeed'}")
    for key, obj in objects.items():
        if engine is not None and (obj is engine or _is_deepspeed_optimizer(obj)):
            continue   # restored by engine.load_checkpoint
        if isinstance(obj, torch.nn.Module):
            obj = accelerator.unwrap_model(obj)
        try:
            obj.load_state_dict(state[key])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"checkpoint {path}: '{key}' does not fit this run's "
                                  f"{type(obj).__name__}: {first}{changes}") from None
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if state["world_size"] == accelerator.num_processes and rng_file.exists():
        rng = load_trusted(rng_file, RNG_STATE_GLOBALS)
        try:
            _set_rng_state(rng, generators)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{rng_file}: not this run's RNG state ({type(err).__name__}: {err})") from None
    elif accelerator.is_main_process:
        print(f"[resume] world size changed ({state['world_size']} -> {accelerator.num_processes}): "
              "RNG streams restart; the data order stays exact", flush=True)
    trainer = state["trainer"]
    if cfg is not None:
        accelerator.wait_for_everyone()   # every rank restored its state: now the run may change
        if accelerator.is_main_process:
            if isinstance(trainer, dict) and "epoch" in trainer:
                _trim_metrics(run_dir, trainer["epoch"])
            write_run_config(run_dir, cfg)
    return trainer


# --------------------------------------------------------------------------------------------------
# Evaluation: each rank predicts its part of the split; the parts are gathered and re-ordered by
# dataset index so that every rank gets the whole split, once, in order.

def gather_by_index(accelerator, index: torch.Tensor, tensors: dict) -> dict:
    """All-gather variable-length per-rank results and sort them by dataset index."""
    if accelerator.num_processes == 1:
        order = torch.argsort(index)
        return {k: v[order] for k, v in tensors.items()} | {"index": index[order]}
    device = accelerator.device
    n = torch.tensor([index.numel()], device=device)
    sizes = [torch.zeros_like(n) for _ in range(accelerator.num_processes)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    out = {}
    for key, value in list(tensors.items()) + [("index", index)]:
        padded = torch.zeros((longest, *value.shape[1:]), dtype=value.dtype, device=device)
        padded[: value.shape[0]] = value.to(device)
        parts = [torch.zeros_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        out[key] = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu()
    order = torch.argsort(out["index"])
    return {k: v[order] for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# Metrics

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


# Segmentation (CGGM's BraTS path). Source: the released CGGM code, src/eval_metrics.py (SegLoss,
# Dice, train_eval_seg, cal_dice); labels {0, 1, 2, 3} = background, necrotic core (NCR),
# oedema (ED), enhancing tumour (ET; BraTS label 4 remapped to 3).

def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor,
                      class_weights=(0.2, 0.3, 0.25, 0.25), dice_weight: float = 0.5,
                      smooth: float = 0.01, include_background: bool = False,
                      dice_reduction: str = "pooled") -> torch.Tensor:
    """(1 − dice_weight)·wCE + dice_weight·(1 − soft Dice); 0-d float32 tensor.

    logits (B, C, H, W), any float dtype (computed in float32); mask (B, H, W) integer labels in
    [0, C) (uint8 as stored in the shards is fine). `class_weights` has C entries (None: plain CE).

    wCE = F.cross_entropy(logits, mask, weight=class_weights): the weighted MEAN,
      Σ_pixels w_y·(−log p_y) / Σ_pixels w_y (PyTorch's normalisation, as the released SegLoss).
    Soft Dice on p = softmax(logits) against the one-hot mask, over the classes K (1..C−1 by
    default: background EXCLUDED, as the released SegLoss; all C with include_background=True):
      dice_reduction="pooled" (released): one Dice over the whole batch and all classes in K,
        2·Σ_{b,k,pixels} p·t / (Σ p + Σ t + smooth), smooth = 0.01 in the denominator only;
      dice_reduction="mean": per class over the batch, (2·Σ p_k·t_k + smooth) /
        (Σ p_k + Σ t_k + smooth), then the mean over K (a class absent from the mask and not
        predicted scores 1).
    Defaults reproduce the released SegLoss (alpha = 0.5, weights (.2, .3, .25, .25)).
    """
    if logits.dim() != 4 or mask.dim() != 3 or logits.shape[0] != mask.shape[0] \
            or logits.shape[2:] != mask.shape[1:]:
        raise ValueError(f"segmentation_loss: expected logits (B, C, H, W) and mask (B, H, W), "
                         f"got {tuple(logits.shape)} and {tuple(mask.shape)}")
    if dice_reduction not in ("pooled", "mean"):
        raise ValueError(f"segmentation_loss: dice_reduction must be 'pooled' or 'mean', "
                         f"got {dice_reduction!r}")
    num_classes = logits.shape[1]
    logits, mask = logits.float(), mask.long()
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
        if weight.numel() != num_classes:
            raise ValueError(f"segmentation_loss: {weight.numel()} class_weights for "
                             f"{num_classes} classes")
    ce = F.cross_entropy(logits, mask, weight=weight)
    probs = logits.softmax(1)
    onehot = F.one_hot(mask, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    if dice_reduction == "pooled":
        dice = 2.0 * (probs * onehot).sum() / (probs.sum() + onehot.sum() + smooth)
    else:
        dims = (0, 2, 3)
        inter, total = (probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)
        dice = ((2.0 * inter + smooth) / (total + smooth)).mean()
    return (1.0 - dice_weight) * ce + dice_weight * (1.0 - dice)


#: BraTS regions as sets of labels (after 4 -> 3): whole tumour, tumour core, enhancing tumour.
BRATS_REGIONS = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)}


def dice_scores(pred_labels: torch.Tensor, mask: torch.Tensor, eps: float = 0.0,
                reduction: str = "mean") -> dict:
    """Dice of the BraTS regions WT (labels 1, 2, 3), TC (1, 3), ET (3), per slice.

    pred_labels and mask: (B, H, W) (or (B, ...)) integer labels. For each slice b and region R
    with A = {pred in R}, G = {mask in R}:
      eps = 0 (default): Dice = 2|A∩G| / (|A| + |G|), and Dice = 1 when both are empty;
      eps > 0: (2|A∩G| + 2·eps) / (|A| + |G| + 2·eps) -- the released Dice (eps 1e-3); also 1
        when both are empty, and within ~eps/(|A|+|G|) of the exact value otherwise.
    reduction "mean" (released: the mean over the slices of the batch), "sum" (over slices, for
    accumulating over batches / all-reducing counts across ranks) or "none" ((B,) per slice).
    Returns {"wt", "tc", "et"} -> float64 tensors on the input's device (no host sync).
    Note: slices without ET that are predicted without ET score 1 for ET (the convention above).
    """
    if pred_labels.shape != mask.shape:
        raise ValueError(f"dice_scores: pred_labels {tuple(pred_labels.shape)} and mask "
                         f"{tuple(mask.shape)} differ in shape")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"dice_scores: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    pred, gt = pred_labels.long().flatten(1), mask.long().flatten(1)

    def region(x, labels):
        inside = x == labels[0]
        for label in labels[1:]:
            inside = inside | (x == label)
        return inside

    out = {}
    for name, labels in BRATS_REGIONS.items():
        a, g = region(pred, labels), region(gt, labels)
        inter = (a & g).sum(1).double()
        total = (a.sum(1) + g.sum(1)).double()
        if eps > 0:
            d = (2.0 * inter + 2.0 * eps) / (total + 2.0 * eps)
        else:
            d = torch.where(total > 0, 2.0 * inter / total.clamp_min(1.0), torch.ones_like(total))
        out[name] = d if reduction == "none" else d.sum() if reduction == "sum" else d.mean()
    return out


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


# --------------------------------------------------------------------------------------------------
# Small helpers used by every script

def all_reduce_mean_(tensors, world: int) -> None:
    """Average tensors (gradients) over ranks in place, in one bucket: DDP's reduction done by hand,
    for steps that leave parameters unused (alternating methods) or edit gradients after the reduce."""
    if world == 1:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of the module's gradients, on the device (no host sync)."""
    grads = [p.grad.detach().flatten() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.cat(grads))


def flat_grad(params, loss: torch.Tensor | None = None, accelerator=None) -> torch.Tensor:
    """Flattened gradient of `params`: of `loss` via autograd.grad (all-reduced by hand, since
    autograd.grad bypasses DDP), or the stored `.grad` when loss is None."""
    params = list(params)
    if loss is None:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    vec = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    if accelerator is not None and accelerator.num_processes > 1:
        dist.all_reduce(vec)
        vec /= accelerator.num_processes
    return vec


def print_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    text = "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
    print(text, flush=True)
    return text


def save_model_atomic(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _fsync_save(model.state_dict(), tmp)
    os.replace(tmp, path)


def write_result(run_dir: Path, result: dict) -> None:
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))


def print_result_table(result: dict, select_key: str = "acc") -> str:
    """The closing table: per-modality and fused test/val metric beside each Bayes limit."""
    bayes = dict(result.get("bayes_accuracy") or {})
    trained = [m for m in result["test"] if m != "fused"]
    # the fused limit is "all" only when every modality was used; one modality alone is its own limit
    bayes["fused"] = (bayes.get("all") if set(trained) == set(bayes) - {"all"} else
                      bayes.get(trained[0]) if len(trained) == 1 else None)
    rows = []
    for name, test in result["test"].items():
        limit = bayes.get(name)
        rows.append([name, f"{test[select_key]:.4f}", f"{result['val'][name][select_key]:.4f}",
                     "-" if limit is None else f"{limit:.4f}",
                     "-" if limit is None or select_key != "acc" else f"{limit - test[select_key]:+.4f}"])
    print(f"\nrun directory: {result['run_dir']}   (best epoch {result['best_epoch']} on validation)")
    text = print_table(rows, ["modality", f"test {select_key}", f"val {select_key}", "Bayes limit", "gap to limit"])
    print(f"TensorBoard: tensorboard --logdir {result['run_dir']}/tb\n", flush=True)
    return text


def test_best_model(model, run_dir: Path, accelerator, task: str, fuse, loaders: dict, meta: dict, state: dict,
                    writer, select_key: str = "acc", **extra) -> dict:
    """The end of every run: load best.pt (the model selected on validation), evaluate the val and
    test splits (`loaders`), write result.json and print the table on rank 0, close TensorBoard.
    `extra` (the method's switches) is recorded in result.json."""
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).load_state_dict(load_trusted(run_dir / "best.pt"))
    test = evaluate(model, loaders["test"], accelerator, task, fuse)
    val = evaluate(model, loaders["val"], accelerator, task, fuse)
    result = {"run_dir": str(run_dir), "best_epoch": state["best_epoch"], "val": val, "test": test,
              "bayes_accuracy": meta.get("source", {}).get("bayes_accuracy"), **extra}
    if accelerator.is_main_process:
        write_result(run_dir, result)
        print_result_table(result, select_key)
        writer.close()
    return result


def finish() -> None:
    """Leave the process group cleanly at the end of a script."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
