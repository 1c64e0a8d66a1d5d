"""`compile: none | encoders | step` — opt-in torch.compile of a run, against the host cost of issuing
a step's many small operators on a GPU (docs/performance.md, host overhead).

- `encoders`: every encoder of the model compiled in place (`nn.Module.compile`: the module stays
  itself, so state_dict keys, checkpoints, best.pt and resume are unchanged), inductor's default
  mode: fused kernels, no CUDA graphs (an encoder runs several times per step with different
  inputs — GAAL's reference forwards, IGM's SAM pass — and a CUDA-graph replay would overwrite the
  outputs of the previous call while they are still needed).
- `step`: the method's whole step (forward, losses, backward, the method's gradient edit and the
  optimiser step) compiled as one callable; on CUDA with mode "reduce-overhead" (CUDA graphs of the
  compiled regions: static shapes — the loaders drop the last partial batch — and no host sync in
  the steps, tested by tests/test_gpu.py), on CPU with the default mode. Dynamo splits the step at
  the backward calls; the regions between are captured. A method whose step cannot be compiled
  says why (`loop.train(..., compile_step=<reason>)`) and `compile: step` is refused in one line.

Compiled arithmetic is not bit-identical to eager (fused kernels reorder float operations): the
tests hold a compiled run to its eager run within a stated tolerance, and a resumed compiled run to
the uninterrupted compiled run exactly. Not with DeepSpeed (its engine owns the step)."""
from __future__ import annotations

from typing import Callable

import torch

from train.config import ConfigError

MODES = ("none", "encoders", "step")


def compile_encoders(model: torch.nn.Module) -> int:
    """Compile each module of `model.encoders` in place (inductor's default mode); returns how many."""
    encoders = getattr(model, "encoders", None)
    if not isinstance(encoders, torch.nn.ModuleDict) or not encoders:
        raise ConfigError(f"compile=encoders: the model ({type(model).__name__}) has no encoders ModuleDict to "
                          "compile; use compile=none")
    for encoder in encoders.values():
        encoder.compile()
    return len(encoders)


def compiled_step(step: Callable, device: torch.device) -> Callable:
    """`step` under torch.compile: mode "reduce-overhead" (CUDA graphs) on CUDA, the default elsewhere."""
    return torch.compile(step, mode="reduce-overhead" if device.type == "cuda" else None)


def apply_compile(cfg: dict, model: torch.nn.Module, step: Callable, device: torch.device, *, method: str,
                  compile_step: bool | str, deepspeed: bool) -> Callable:
    """What `cfg["compile"]` asks for, done before the first step: the step the loop calls (compiled
    for "step", else `step` itself; "encoders" compiles `model`'s encoders in place). Refused in one
    line (ConfigError) under DeepSpeed, and for "step" where the method's `compile_step` is a reason."""
    mode = cfg["compile"]
    if mode == "none":
        return step
    if deepspeed:
        raise ConfigError(f"compile={mode}: not under DeepSpeed (its engine owns the step); use compile=none")
    if mode == "encoders":
        compile_encoders(model)
        return step
    if compile_step is not True:
        raise ConfigError(f"compile=step: {method} cannot be compiled as one step: {compile_step}; "
                          "compile=encoders compiles its encoders alone")
    return compiled_step(step, device)
