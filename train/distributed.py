"""Processes and devices: the Accelerator (real DDP on CPU, refusal of silent rank-0 clones), DeepSpeed
ZeRO-1/2 through Accelerate, and the collectives the scripts use instead of a DDP wrapper (gradients
all-reduced by hand, per-rank results gathered in dataset order)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from train.config import ConfigError

# DeepSpeed (through Accelerate: `accelerate launch --config_file train/configs/accelerate/
# deepspeed_zero<1|2>.yaml ...`). Only ZeRO stages 1 and 2; the joint baseline supports them, the
# methods that edit gradients between backward and step refuse them (refuse_deepspeed).


DEEPSPEED_STAGES = (1, 2)


# Imported without CUDA, DeepSpeed logs "Setting accelerator to CPU" to STDOUT, and Accelerate
# imports it in every unwrap_model once it is installed: name the CPU accelerator (what DeepSpeed
# picks anyway) so that the scripts' stdout stays their own.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


def setup_accelerator(cfg: dict, log_with: list | None = None):
    """Accelerator with real DDP on CPU-only machines, and a refusal of silent rank-0 clones.

    On a machine without CUDA, Accelerate only starts a gloo process group when `cpu=True`;
    without it every launched process believes it is rank 0 of 1 and trains alone. Launches that
    cannot give the processes asked for are refused first (check_launch), processes the
    Accelerator did not join after it is made (check_world_size). `log_with`: the experiment
    trackers (train.rundir.trackers), opened later by accelerator.init_trackers.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_launch()   # launches that cannot give the processes the user asked for: refused first
    cpu = cfg.get("cpu", False) or not torch.cuda.is_available()
    if deepspeed_requested():   # Accelerate drops a DeepSpeed launch config silently when cpu=True
        if cfg.get("cpu", False) and torch.cuda.is_available():
            raise ConfigError("cpu=true cannot be combined with a DeepSpeed launch config (DeepSpeed "
                              "would still run on the GPU): drop --cpu or launch without DeepSpeed")
        cpu = False   # without CUDA, DeepSpeed's CPU accelerator (gloo) is used
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.get("mixed_precision", "no"), log_with=log_with or None)
    check_world_size(accelerator)
    if cfg["batch_size"] % accelerator.num_processes:
        raise ConfigError(f"batch_size={cfg['batch_size']} (the global batch) is not divisible by "
                          f"the number of processes {accelerator.num_processes}")
    set_seed(cfg["seed"])  # same on every rank: identical init, and DDP broadcasts it anyway
    return accelerator


def launched_script() -> str:
    """The training script's file name (joint.py), for the commands that refusals suggest."""
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "<script>.py"


def env_flag(name: str) -> bool:
    """A boolean the launcher set in the environment, read the way Accelerate reads it (true/yes/on/1)."""
    return os.environ.get(name, "false").strip().lower() in ("1", "y", "yes", "t", "true", "on")


# What a launcher that starts several processes tells each of them (torchrun, `accelerate launch
# --multi_gpu` and DeepSpeed: WORLD_SIZE; mpirun: its own size variable, which Accelerate reads too).
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch() -> None:
    """Refuse, before any compute, a launch that cannot give the processes asked for (ConfigError, one line).

    Decided from this process's own environment and device:
    - `accelerate launch --cpu --num_processes N` (or N > 1 without --multi_gpu on a machine with
      at most one GPU) runs Accelerate's one-process launcher, which starts ONE process: it marks it
      with ACCELERATE_USE_CPU and, asked for several processes, sets MASTER_ADDR/MASTER_PORT, but no
      WORLD_SIZE. N itself is not in the environment, so the message says "several". A one-process
      `accelerate launch` from a shell that exports MASTER_PORT looks the same; the message says so.
    - DeepSpeed with several processes and no CUDA: Accelerate joins 1 process while DeepSpeed sees
      WORLD_SIZE of them (multi-rank DeepSpeed through Accelerate needs GPUs here).
    """
    env = os.environ
    launched, script = int(env.get("WORLD_SIZE", "1")), launched_script()
    if deepspeed_requested() and launched > 1 and not torch.cuda.is_available():
        raise ConfigError(
            f"DeepSpeed with {launched} processes on a machine without CUDA: multi-process DeepSpeed "
            f"through Accelerate needs GPUs (on CPU Accelerate joins 1 process while DeepSpeed sees "
            f"{launched}). Here run DeepSpeed with one process (--num_processes 1: it works on CPU), "
            f"or {launched} processes without DeepSpeed: accelerate launch --multi_gpu "
            f"--num_processes {launched} train/{script} ...")
    if "ACCELERATE_USE_CPU" not in env or "MASTER_PORT" not in env or any(k in env for k in WORLD_SIZE_VARIABLES):
        return   # not Accelerate's one-process launcher asked for several (torchrun, --multi_gpu, python)
    how = ("with --cpu (or use_cpu: true in its config) it" if env_flag("ACCELERATE_USE_CPU")
           else "without --multi_gpu (and without several GPUs) it")
    raise ConfigError(
        f"accelerate launch was asked for several processes but started ONE: {how} never starts more "
        "than one (it set MASTER_PORT, as it does when asked for several, but no WORLD_SIZE), and this "
        "run would silently train alone. For N processes on CPU run accelerate launch --multi_gpu "
        f"--num_processes N train/{script} ... (real DDP over gloo) or torchrun --nproc_per_node N "
        f"train/{script} ...; for one process run python train/{script} ... (or ask accelerate launch "
        "for one, and unset MASTER_PORT if your shell exports it)")


def check_world_size(accelerator) -> None:
    """Refuse processes that the Accelerator did not join (ConfigError, one line): the launcher
    started WORLD_SIZE processes, Accelerate must report as many, else each trains alone as rank 0."""
    launched, script = int(os.environ.get("WORLD_SIZE", "1")), launched_script()
    if accelerator.num_processes != launched:
        raise ConfigError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate joined "
            f"{accelerator.num_processes}: each process would train alone as rank 0 (without CUDA "
            "Accelerate joins processes only when created with Accelerator(cpu=True), as train/*.py "
            f"do); launch with accelerate launch --multi_gpu --num_processes {launched} train/{script} "
            f"... or torchrun --nproc_per_node {launched} train/{script} ...")


def deepspeed_requested() -> bool:
    """True when the launcher asked for DeepSpeed (what `accelerate launch` with a DEEPSPEED config sets)."""
    return env_flag("ACCELERATE_USE_DEEPSPEED")


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
    script = launched_script()
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


def deepspeed_engine(accelerator, objects: dict):
    """The DeepSpeed engine among checkpointed objects, None when the run does not use DeepSpeed."""
    if deepspeed_stage(accelerator) is None:
        return None
    import deepspeed
    engines = [obj for obj in objects.values() if isinstance(obj, deepspeed.DeepSpeedEngine)]
    if len(engines) != 1:
        raise RuntimeError(f"checkpoint under DeepSpeed: expected one DeepSpeed engine among "
                           f"{sorted(objects)}, found {len(engines)}")
    return engines[0]


def is_deepspeed_optimizer(obj) -> bool:
    from accelerate.utils import DeepSpeedOptimizerWrapper
    return isinstance(obj, DeepSpeedOptimizerWrapper)


def deepspeed_checkpoint_globals() -> tuple:
    """What DeepSpeed's ZeRO-1/2 optimizer files hold beyond tensors (checked: torch 2.14,
    deepspeed 0.19.8): the stage enum, the (static) loss scaler, the fragment addresses."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return (ZeroStageEnum, LossScaler, fragment_address)


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


#: Seconds a node waits for the rendezvous (the first node's address and port) before it gives up in
#: one line: slurm/node.sh and slurm/submit.py read RDZV_TIMEOUT (default 300), and node.sh passes it
#: to torch's launcher (`--rdzv_conf timeout=...`), whose own default would be 600 s and then a traceback.
RDZV_TIMEOUT_DEFAULT = 300


def wait_for_rendezvous(address: str, port: int, timeout: float | None = None) -> None:
    """Return once `address:port` (the first node's rendezvous) accepts a TCP connection; raise
    ConfigError in one line naming them when the name does not resolve here, or when nothing answers
    within `timeout` seconds (RDZV_TIMEOUT). Run on every node but the first, before the launcher: a
    first node that is down, or a port closed between nodes, is then one line, not a long hang
    ending in a C++ traceback. (A bare connect and close does not disturb torch's TCPStore.)"""
    import socket
    import time
    timeout = float(os.environ.get("RDZV_TIMEOUT", RDZV_TIMEOUT_DEFAULT) if timeout is None else timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, int(port)), timeout=5).close()
            return
        except socket.gaierror as err:
            raise ConfigError(f"rendezvous: {address} (MASTER_ADDR) does not resolve on {socket.gethostname()} "
                              f"({err.strerror})") from None
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConfigError(f"rendezvous: nothing answered at {address}:{port} (MASTER_ADDR:MASTER_PORT) "
                                  f"within {timeout:.0f} s (RDZV_TIMEOUT) from {socket.gethostname()} "
                                  f"({err.strerror or err}): is the first node's training started, and is the "
                                  "port open between the nodes?") from None
            time.sleep(1)


def main_process_flag(flag: bool, accelerator) -> bool:
    """The main process's `flag`, on every rank (one tiny broadcast; free with one process): a
    decision only the main process can make (it holds the run directory's lock) taken by all."""
    if accelerator.num_processes == 1:
        return bool(flag)
    value = torch.tensor([int(bool(flag))], dtype=torch.int32, device=accelerator.device)
    dist.broadcast(value, 0)
    return bool(value.item())


def sync_buffers(modules, accelerator) -> None:
    """Every rank takes the main process's buffers (BatchNorm's running statistics and counters).

    Each rank's running statistics follow its own batches, and methods whose passes bypass DDP's
    forward never get rank 0's broadcast; the checkpoint and best.pt hold rank 0's. The loop calls
    this before every validation and checkpoint, so a validation reads the same statistics on every
    rank, before and after a resume. Training is unchanged: in train mode BatchNorm normalises with
    the batch's statistics, and rank 0's own buffers are never overwritten."""
    if accelerator.num_processes == 1:
        return
    for module in modules:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def finish() -> None:
    """Leave the process group cleanly at the end of a script."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
