"""Checkpoints: <run>/checkpoints/ckpt-<step>[-<n>]/{state.pt, rng-rank<r>.pt[, deepspeed/]} and
<run>/checkpoints/latest. Written into a temporary directory, renamed when complete, then `latest` is
replaced atomically. A complete checkpoint is never deleted before its successor is in place: a
second save at the same step (a step checkpoint, then the epoch end; a stop at an epoch's last
step, then the resumed epoch end) gets its own name (`-1`, `-2`, ...), and an old checkpoint is
renamed out of the `ckpt-*` namespace before it is removed. So a process killed at any point leaves
only complete `ckpt-*` directories, and `latest` names one of them — or, killed between the first
rename and the first `latest`, none: resume then takes the newest complete one (resume_checkpoint).
Every file is read back with torch.load(weights_only=True) (load_trusted): nothing in a checkpoint
can run code."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml

from train.distributed import (deepspeed_checkpoint_globals, deepspeed_engine, deepspeed_stage,
                               deepspeed_state_dict, is_deepspeed_optimizer)


class CheckpointError(RuntimeError):
    """A run directory or checkpoint cannot be used as asked: unreadable, untrusted (it would run
    code), written by another script, or for another model. Raised before the run changes anything."""


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_run_config(run_dir: Path, cfg: dict) -> None:
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))


def save_model_atomic(model: torch.nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _fsync_save(model.state_dict(), tmp)
    os.replace(tmp, path)


def save_deepspeed_model_atomic(module: torch.nn.Module, path: Path, accelerator) -> None:
    """save_model_atomic for a DeepSpeed engine's module (float32 master weights). Collective."""
    state = deepspeed_state_dict(module)
    if accelerator.is_main_process:
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        _fsync_save(state, tmp)
        os.replace(tmp, path)


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


def _modules(accelerator, objects: dict, engine) -> dict:
    """{key: the bare nn.Module} of the checkpointed objects that are models."""
    return {key: engine.module if engine is not None and obj is engine else accelerator.unwrap_model(obj)
            for key, obj in objects.items() if isinstance(obj, torch.nn.Module)}


def _rank_buffers(accelerator, objects: dict, engine) -> dict:
    """This rank's own buffers (BatchNorm running statistics), saved beside its RNG state: between
    validations each rank's follow its own batches (and a method may read them in eval mode)."""
    return {key: {name: b.detach().cpu().clone() for name, b in module.named_buffers()}
            for key, module in _modules(accelerator, objects, engine).items()}


def save_checkpoint(run_dir: Path, accelerator, objects: dict, trainer_state: dict, keep: int = 2,
                    generators: dict | None = None) -> Path | None:
    """Save `objects` (name -> thing with state_dict(); models are unwrapped) and `trainer_state`;
    return the checkpoint's directory on the main process (None on the others).

    Collective: every rank calls it. Each rank stores its own RNG states (the global ones and the
    script's own `generators`, e.g. an augmentation's) and its own buffers; rank 0 stores the rest.
    Under DeepSpeed the engine writes its own checkpoint into <ckpt>/deepspeed (every rank its
    optimizer partition); state.pt then holds the model's full float32 weights (for readers of
    the checkpoint; resume uses the engine's files) and the other objects, not the optimizer.
    """
    engine = deepspeed_engine(accelerator, objects)
    ckpt_root = run_dir / "checkpoints"
    name = f"ckpt-{trainer_state['step']:09d}"
    tmp = ckpt_root / f".tmp-{name}"
    if accelerator.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    rank_state = _rng_state(generators) | {"buffers": _rank_buffers(accelerator, objects, engine)}
    _fsync_save(rank_state, tmp / f"rng-rank{accelerator.process_index}.pt")
    if engine is not None:   # collectives: every rank writes its ZeRO partition
        engine.save_checkpoint(str(tmp), tag="deepspeed", save_latest=False)
        engine_weights = deepspeed_state_dict(engine.module)
    accelerator.wait_for_everyone()
    final = None
    if accelerator.is_main_process:
        state = {"trainer": trainer_state, "world_size": accelerator.num_processes}
        if engine is not None:
            state["deepspeed_stage"] = deepspeed_stage(accelerator)
        for key, obj in objects.items():
            if engine is not None and (obj is engine or is_deepspeed_optimizer(obj)):
                if obj is engine:
                    state[key] = engine_weights
                continue   # the optimizer (partitioned) is in <ckpt>/deepspeed
            if isinstance(obj, torch.nn.Module):
                obj = accelerator.unwrap_model(obj)
                state.setdefault("model_classes", {})[key] = type(obj).__name__
            state[key] = obj.state_dict()
        _fsync_save(state, tmp / "state.pt")
        final = _unused_name(ckpt_root, name)   # never replace (and so never delete) a complete checkpoint
        os.replace(tmp, final)
        atomic_write_text(ckpt_root / "latest", final.name + "\n")
        _remove_stale(ckpt_root, keep=final, n_keep=keep)
    accelerator.wait_for_everyone()
    return final


#: A checkpoint directory's name: ckpt-<step, 9 digits>, then -<n> for the n-th re-save of that step.
CKPT_NAME = re.compile(r"ckpt-(\d{9,})(?:-(\d+))?")


def _order(path: Path) -> tuple[int, int] | None:
    """(step, n) of a checkpoint directory's name, None for anything else."""
    match = CKPT_NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete checkpoints under `ckpt_root`, oldest first: the `ckpt-*` directories holding a
    state.pt (a directory gets its name only when complete; one being deleted was renamed first)."""
    found = [p for p in ckpt_root.glob("ckpt-*") if _order(p) is not None and (p / "state.pt").is_file()]
    return sorted(found, key=_order)


def _unused_name(ckpt_root: Path, name: str) -> Path:
    final, n = ckpt_root / name, 0
    while final.exists():
        n += 1
        final = ckpt_root / f"{name}-{n}"
    return final


def _remove_stale(ckpt_root: Path, keep: Path, n_keep: int) -> None:
    """Remove all but the newest `n_keep` complete checkpoints (`keep`, just written, among them),
    and what killed processes left behind (other steps' temporary directories, half-removed
    checkpoints). A checkpoint is first renamed out of the `ckpt-*` namespace, atomically, then
    deleted: a kill during the deletion leaves a `.stale-*` directory, never a half-deleted `ckpt-*`."""
    def leftovers():
        return [p for p in ckpt_root.glob(".*") if p.is_dir() and p.name.startswith((".stale-", ".tmp-"))]
    for leftover in leftovers():
        shutil.rmtree(leftover, ignore_errors=True)
    older = [p for p in complete_checkpoints(ckpt_root) if p != keep]
    for old in older[:max(0, len(older) - (n_keep - 1))]:
        os.replace(old, ckpt_root / f".stale-{old.name}")
    for leftover in leftovers():
        shutil.rmtree(leftover, ignore_errors=True)


def has_checkpoint(run_dir: Path) -> bool:
    """The run directory holds a checkpoint a --resume can start from (`latest`, or a complete one)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    return (ckpt_root / "latest").is_file() or bool(complete_checkpoints(ckpt_root))


def resume_checkpoint(ckpt_root: Path) -> tuple[Path, str | None]:
    """(the checkpoint to resume from, a note when it is not the one `latest` names).

    `latest` is trusted when it names a complete checkpoint. When it is missing, unreadable or names
    a directory that is missing or incomplete (a kill at the wrong moment, a file system that lost
    the last write), the newest complete checkpoint is taken and the note says so. CheckpointError
    when there is none."""
    latest = ckpt_root / "latest"
    try:
        text = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or type(err).__name__
        text, why = None, f"is unreadable ({reason})" if latest.exists() else "is missing"
    if text is not None:
        named = ckpt_root / text
        if CKPT_NAME.fullmatch(text) and (named / "state.pt").is_file():
            return named, None
        why = (f"names {text!r}, " + ("which is incomplete (no state.pt)" if named.is_dir() else
                                      "which does not exist" if CKPT_NAME.fullmatch(text) else "not a checkpoint"))
    complete = complete_checkpoints(ckpt_root)
    if not complete:
        raise CheckpointError(f"{latest}: {why}, and {ckpt_root} holds no complete checkpoint (ckpt-*/state.pt) "
                              "to resume from")
    return complete[-1], f"{latest} {why}: resuming from the newest complete checkpoint, {complete[-1].name}"


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint directory (ckpt-<step>[-<n>])."""
    return _order(path)[0]


#: Beyond torch's weights-only set (tensors, containers, numbers, strings), exactly what a rank's
#: RNG state holds: numpy's MT19937 key array (an ndarray of uint32).
RNG_STATE_GLOBALS = (np.ndarray, np.dtype, np._core.multiarray._reconstruct, np.dtypes.UInt32DType)


def load_trusted(path: Path, allowed_globals=(), mmap: bool = False):
    """torch.load(weights_only=True) onto the CPU: nothing in the file can run code. Accepted:
    tensors, containers, numbers, strings and exactly `allowed_globals`. Anything else — a crafted
    pickle, a truncated or garbage file — raises CheckpointError naming the file; a file that is not
    there raises CheckpointError '<path>: missing (...)'."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (there is no such file: it was never written, or it was moved "
                              "or deleted)") from None
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


def _read_trainer_state(path: Path) -> dict:
    """<checkpoint>/state.pt, refused in one line unless it is a training checkpoint."""
    state = load_trusted(path / "state.pt")
    if not isinstance(state, dict) or "trainer" not in state or "world_size" not in state:
        raise CheckpointError(f"{path / 'state.pt'}: not a training checkpoint (no trainer state)")
    return state


def _check_deepspeed_stage(path: Path, state: dict, accelerator) -> None:
    """The run's DeepSpeed ZeRO stage (or none) must be the one the checkpoint was written under."""
    written, running = state.get("deepspeed_stage"), deepspeed_stage(accelerator)
    if written != running:
        raise CheckpointError(f"checkpoint {path} was written " +
                              (f"under DeepSpeed ZeRO-{written}" if written is not None else "without DeepSpeed") +
                              " but this run " + (f"uses ZeRO-{running}" if running is not None else
                                                 "does not use DeepSpeed") +
                              ": resume with the launch config that wrote it")


def _check_objects_fit(path: Path, run_dir: Path, state: dict, objects: dict, accelerator, engine) -> None:
    """Every object is in the checkpoint (DeepSpeed's optimiser is in its own files), and every
    module is of the class that wrote it with the same parameter names and shapes: else one line
    saying what differs, before anything is loaded."""
    for key, obj in objects.items():
        if engine is not None and is_deepspeed_optimizer(obj):
            continue   # in DeepSpeed's own files (<ckpt>/deepspeed), not in state.pt
        if key not in state:
            raise CheckpointError(f"checkpoint {path} has no '{key}' (it holds {sorted(state)}): it was "
                                  f"written by another training script")
        if not isinstance(obj, torch.nn.Module):
            continue
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
            raise CheckpointError(f"checkpoint {path}: {mismatch}")


def _load_deepspeed(path: Path, state: dict, engine, accelerator) -> None:
    """The engine's module and optimiser partitions from <checkpoint>/deepspeed: written by as many
    processes as this run has, every file checked with load_trusted before DeepSpeed unpickles it."""
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


def _load_objects(path: Path, state: dict, objects: dict, accelerator, engine) -> None:
    """load_state_dict of every object from state.pt (not the DeepSpeed engine's: restored already);
    a refusal becomes one line naming the object."""
    for key, obj in objects.items():
        if engine is not None and (obj is engine or is_deepspeed_optimizer(obj)):
            continue   # restored by engine.load_checkpoint
        if isinstance(obj, torch.nn.Module):
            obj = accelerator.unwrap_model(obj)
        try:
            obj.load_state_dict(state[key])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"checkpoint {path}: '{key}' does not fit this run's "
                                  f"{type(obj).__name__}: {first}") from None


def _restore_rng(path: Path, state: dict, accelerator, objects: dict, engine, generators: dict | None) -> None:
    """This rank's RNG states and its modules' own buffers, at the world size that wrote them; at
    another world size the RNG streams restart (the data order stays exact) and the main process says so."""
    rng_file = path / f"rng-rank{accelerator.process_index}.pt"
    if state["world_size"] == accelerator.num_processes and rng_file.exists():
        rng = load_trusted(rng_file, RNG_STATE_GLOBALS)
        try:
            _set_rng_state(rng, generators)
            for key, module in _modules(accelerator, objects, engine).items():   # this rank's own buffers
                saved = rng.get("buffers", {}).get(key, {})
                for name, buffer in module.named_buffers():
                    if name in saved:
                        buffer.copy_(saved[name])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            raise CheckpointError(f"{rng_file}: not this run's RNG state ({type(err).__name__}: {err})") from None
    elif accelerator.is_main_process:
        print(f"[resume] world size changed ({state['world_size']} -> {accelerator.num_processes}): "
              "RNG streams restart; the data order stays exact", flush=True)


def load_checkpoint(run_dir: Path, accelerator, objects: dict, generators: dict | None = None,
                    cfg: dict | None = None) -> dict:
    """Restore `objects` and this rank's RNG states from the latest checkpoint; return trainer state.

    The checkpoint is the one `latest` names, or the newest complete one when `latest` is broken
    (resume_checkpoint; the main process says so). Every file is loaded with weights_only=True
    (load_trusted); DeepSpeed's own files are checked the same way before the engine reads them. A
    checkpoint of another script or another model is refused in one line (CheckpointError) that says
    what differs. With `cfg` (a resumed run, its config already reconciled with its config.yaml by
    train.rundir.resumed_config), once every rank has restored its state: metrics.jsonl loses the
    records after the checkpoint's epoch, and config.yaml becomes `cfg`. Nothing is written before
    that point, so a refused resume leaves the run as it was.
    """
    path, note = resume_checkpoint(run_dir / "checkpoints")
    if note and accelerator.is_main_process:
        print(f"[resume] {note}", flush=True)
    state = _read_trainer_state(path)
    engine = deepspeed_engine(accelerator, objects)
    _check_deepspeed_stage(path, state, accelerator)
    _check_objects_fit(path, run_dir, state, objects, accelerator, engine)
    if engine is not None:
        _load_deepspeed(path, state, engine, accelerator)
    _load_objects(path, state, objects, accelerator, engine)
    _restore_rng(path, state, accelerator, objects, engine, generators)
    trainer = state["trainer"]
    if cfg is not None:
        accelerator.wait_for_everyone()   # every rank restored its state: now the run may change
        if accelerator.is_main_process:
            if isinstance(trainer, dict) and "epoch" in trainer:
                _trim_metrics(run_dir, trainer["epoch"])
            write_run_config(run_dir, cfg)
    return trainer
