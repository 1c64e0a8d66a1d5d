"""Kill campaign: SIGKILL every training script at chosen moments, resume it, and check that the
resumed run ends bit-exactly where an uninterrupted run ends.

    python scripts/kill_campaign.py --trials 24 --seed 0 [--scripts joint,gaal,...] [--out DIR] [--keep-runs]

What it does, top to bottom:

1. Generates the tiny embedded data sets once per flavour (imgtab, av, seq3: 256 training samples,
   64 validation, 64 test) under <out>/data.
2. For each script (joint, unimodal, gaal, igm, cggm, ogm_ge, mla, mmpareto) runs ONE uninterrupted
   reference run: batch 32, so 8 steps per epoch, `--ckpt_every_steps 4` (divides the epoch: the
   step checkpoint and the epoch-end checkpoint of each epoch fall on the same step, which the
   reference run is checked to show as ckpt-<step> and ckpt-<step>-1), `--keep_checkpoints 2`,
   2-3 epochs, narrow encoders (the arguments the tests use; joint adds a cosine scheduler, so that a
   scheduler's state is compared too, as GAAL's config brings a step scheduler).
3. Runs trials. A trial starts the same command in a fresh out_dir (its own session, one training
   process at a time, OMP_NUM_THREADS=1), kills it at a moment chosen by the trial's kind, re-launches
   it with the same command line plus `--resume`, and repeats (1-3 kills per trial) until the run
   finishes. Kinds, rotated over the trials so that every script meets several:
     a  SIGKILL at a random time after the run's first checkpoint exists (on a resumed launch: after
        it printed "[resume] from step", or, one time in five, during its start-up);
     b  SIGKILL aimed inside a checkpoint write: checkpoints/ is polled every ~1 ms and the process is
        killed 0-15 ms after a new `.tmp-ckpt-*` directory appears (a write takes ~15 ms here), or,
        one time in three, the moment a `ckpt-*` directory newer than the one `latest` names appears
        (renamed, `latest` not yet replaced: a ~1 ms window; a missed one waits for the next write).
        Which write is aimed at is drawn among the writes the run still has to do (a fresh launch:
        its first write one time in four);
     c  SIGKILL at an epoch end: the moment metrics.jsonl gains a line (that epoch's validation was
        just written; its best.pt and epoch-end checkpoint are being written or about to be);
     d  SIGTERM to the process group (the run then checkpoints at the next step and exits), followed
        by SIGKILL 0-200 ms later, at a random time chosen as for a.
   A run killed before its first checkpoint cannot resume, by design (docs/reliability.md). Kinds a,
   c and d therefore only kill once every run directory the script has started holds a checkpoint.
   Kind b may hit the first checkpoint write: a run directory left without a complete checkpoint is
   then deleted and started afresh, counted as "killed before the first checkpoint" (unimodal: one
   directory per modality; a finished modality is kept and --resume skips it).
4. Compares each finished trial with its reference, bit-exactly. "Bit-exact" here means:
     - the final checkpoint (the one `latest` names; its directory name may differ, e.g. a re-saved
       -2): every entry of state.pt (model, optimiser state, scheduler, trainer position, method
       state, ...) and of rng-rank0.pt (Python, numpy, torch and the script's generator states,
       buffers) equal — tensors of the same dtype and shape with identical bytes (so NaN == NaN and
       0.0 != -0.0), numbers with identical bits, same keys, same container types;
     - best.pt: the same, tensor by tensor;
     - metrics.jsonl: byte-identical;
     - result.json: identical JSON apart from its `run_dir` field.
   Any difference is a failure, printed with what differed, the kills of the trial (kind, when, the
   step, what checkpoints/ held) and the trial directory, which is kept. Passing trials' directories
   are deleted unless --keep-runs.
5. Prints a table per script: trials, kills per kind, kills that landed inside a checkpoint write (a
   new `.tmp-ckpt-*` directory or a `ckpt-*` directory newer than `latest`'s existed when the process
   died), kills before the first checkpoint, resumes, planned kills that missed (the run ended first:
   not counted as kills; a trial with no kill is started again), failures, wall time (of the trials;
   the reference runs are timed apart); then the totals. Every kill is recorded in <out>/kills.jsonl,
   every trial in <out>/trials.jsonl. Exit status 1 on any failure.

Standard library and torch only (plus the repository's own data generator and the list of numpy
types its RNG files may hold).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from data_prep import embedded   # importable through the editable install (scripts/env.sh)
from train.checkpoint import RNG_STATE_GLOBALS

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# The runs: tiny data, 8 steps per epoch, a step checkpoint every 4 steps (so at every epoch end too)

N_TRAIN, N_VAL, N_TEST, BATCH = 256, 64, 64, 32
STEPS_PER_EPOCH = N_TRAIN // BATCH          # 8 (the last partial batch is dropped; here there is none)
CKPT_EVERY = 4                              # divides STEPS_PER_EPOCH
assert STEPS_PER_EPOCH % CKPT_EVERY == 0
COMMON = ["--batch_size", str(BATCH), "--eval_batch_size", "64", "--log_every", "2", "--progress", "false",
          "--ckpt_every_steps", str(CKPT_EVERY), "--keep_checkpoints", "2"]
AV_NARROW = ["--encoders.audio.base_width", "8", "--encoders.video.base_width", "8"]
SEQ_NARROW = [arg for m in ("text", "audio", "vision") for arg in (f"--encoders.{m}.n_layers", "1")]

#: script -> (data flavour, epochs, its own arguments, the run directories it writes under out_dir)
SCRIPTS = {
    "joint":    ("imgtab", 3, ["--epochs", "3", "--scheduler", "cosine"], [""]),
    "unimodal": ("imgtab", 2, ["--epochs", "2"], ["image", "table"]),
    "gaal":     ("imgtab", 3, ["--epochs", "3"], [""]),   # its config: step scheduler, patience 10
    "igm":      ("av", 3, ["--stage_epochs", "[1, 2]", *AV_NARROW], [""]),   # official: a stage restart at epoch 1
    "cggm":     ("seq3", 3, ["--epochs", "3", "--d_model", "32", *SEQ_NARROW], [""]),
    "ogm_ge":   ("av", 3, ["--epochs", "3", "--optimizer", "sgd", "--lr", "0.05", *AV_NARROW], [""]),
    "mla":      ("av", 3, ["--epochs", "3", "--variant", "paper", *AV_NARROW], [""]),
    "mmpareto": ("av", 3, ["--epochs", "3", "--variant", "paper", *AV_NARROW], [""]),
}
KINDS = {"a": "random time", "b": "inside a checkpoint write", "c": "at an epoch end", "d": "SIGTERM, then SIGKILL"}
CKPT_NAME = re.compile(r"ckpt-(\d{9,})(?:-(\d+))?")
POLL_S = 0.001


def command(script: str, data: Path, out_dir: Path, resume: bool) -> list[str]:
    own = SCRIPTS[script][2]
    return ([sys.executable, str(REPO / "train" / f"{script}.py"), "--data", str(data), "--out_dir", str(out_dir)]
            + COMMON + own + (["--resume"] if resume else []))


def writes_per_run(epochs: int) -> int:
    """Checkpoint writes of one uninterrupted run directory: the step ones and the epoch ends."""
    return epochs * (STEPS_PER_EPOCH // CKPT_EVERY) + epochs


# ------------------------------------------------------------------------------------------------
# What a run directory holds


def ckpt_order(name: str):
    match = CKPT_NAME.fullmatch(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def read_latest(ckpt_root: Path) -> str | None:
    try:
        return (ckpt_root / "latest").read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def complete(ckpt_root: Path) -> list[str]:
    """Names of the complete checkpoints (ckpt-* holding a state.pt), oldest first."""
    try:
        names = os.listdir(ckpt_root)
    except OSError:
        return []
    return sorted((n for n in names if ckpt_order(n) and (ckpt_root / n / "state.pt").is_file()), key=ckpt_order)


def resumable(run_dir: Path) -> bool:
    """A checkpoint --resume can start from (`latest`, or a complete checkpoint), or a finished run."""
    ckpt_root = run_dir / "checkpoints"
    return (run_dir / "result.json").is_file() or (ckpt_root / "latest").is_file() or bool(complete(ckpt_root))


def tmp_identities(ckpt_root: Path) -> dict:
    """{.tmp-ckpt-* name: (inode, mtime)}: tells a write in progress from a leftover of an earlier kill."""
    found = {}
    try:
        names = os.listdir(ckpt_root)
    except OSError:
        return found
    for name in names:
        if name.startswith(".tmp-ckpt-"):
            try:
                st = os.stat(ckpt_root / name)
                found[name] = (st.st_ino, st.st_mtime_ns)
            except OSError:
                pass
    return found


def in_write(ckpt_root: Path, leftovers: dict, renamed_only: bool = False) -> str | None:
    """The checkpoint being written, if checkpoints/ shows one: a new `.tmp-ckpt-*` directory, or a
    `ckpt-*` directory newer than the one `latest` names (renamed, `latest` not yet replaced; only
    that with `renamed_only`)."""
    try:
        names = os.listdir(ckpt_root)   # listed before `latest` is read: a rename seen here is judged against
    except OSError:                     # the `latest` of the same moment or later
        return None
    latest = read_latest(ckpt_root)
    latest_order = ckpt_order(latest) if latest else None
    for name in names:
        if name.startswith(".tmp-ckpt-") and renamed_only:
            continue
        if name.startswith(".tmp-ckpt-") and name not in leftovers:
            return name
        if name.startswith(".tmp-ckpt-"):
            try:
                st = os.stat(ckpt_root / name)
            except OSError:
                continue
            if (st.st_ino, st.st_mtime_ns) != leftovers[name]:
                return name
        order = ckpt_order(name)
        if order and name != latest and (latest_order is None or order > latest_order):
            return name
    return None


def metrics_lines(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def position(run_dir: Path) -> tuple[int, int]:
    """(step, completed epochs) of the checkpoint a resume would start from; (0, 0) without one."""
    ckpt_root = run_dir / "checkpoints"
    name = read_latest(ckpt_root)
    if not name or not (ckpt_root / name / "state.pt").is_file():
        names = complete(ckpt_root)
        name = names[-1] if names else None
    if name is None:
        return 0, 0
    trainer = torch.load(ckpt_root / name / "state.pt", map_location="cpu", weights_only=True)["trainer"]
    return trainer["step"], trainer["epoch"]


def describe_checkpoints(run_dir: Path) -> dict:
    """What checkpoints/ held (after a kill): `latest`, every entry with its files and sizes."""
    ckpt_root = run_dir / "checkpoints"
    entries = {}
    try:
        names = sorted(os.listdir(ckpt_root))
    except OSError:
        return {"exists": False}
    for name in names:
        path = ckpt_root / name
        if path.is_dir():
            entries[name] = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    return {"latest": read_latest(ckpt_root), "entries": entries, "metrics_lines": metrics_lines(run_dir),
            "best.pt": (run_dir / "best.pt").is_file(), "result.json": (run_dir / "result.json").is_file()}


# ------------------------------------------------------------------------------------------------
# Bit-exact comparison


def tensor_bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def differences(a, b, path: str, out: list, limit: int = 20) -> list:
    """Append to `out` one line per difference between `a` and `b` (nested containers, tensors,
    numbers; numpy arrays of the RNG state), bit for bit."""
    if len(out) >= limit:
        return out
    if torch.is_tensor(a) or torch.is_tensor(b):
        if not (torch.is_tensor(a) and torch.is_tensor(b)):
            out.append(f"{path}: {type(a).__name__} vs {type(b).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif tensor_bits(a) != tensor_bits(b):
            if a.is_floating_point():
                diff = (a.double() - b.double()).abs()
                n = int((~((a == b) | (a.isnan() & b.isnan()))).sum()) or int(a.numel())
                out.append(f"{path}: {n} of {a.numel()} elements differ (max |diff| {float(diff.nan_to_num(0).max()):.3g})")
            else:
                out.append(f"{path}: {int((a != b).sum())} of {a.numel()} elements differ")
        return out
    if type(a) is not type(b):
        out.append(f"{path}: {type(a).__name__} {a!r:.80} vs {type(b).__name__} {b!r:.80}")
    elif isinstance(a, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                out.append(f"{path}.{key}: only in the " + ("reference" if key in a else "trial"))
            else:
                differences(a[key], b[key], f"{path}.{key}", out, limit)
    elif isinstance(a, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            differences(x, y, f"{path}[{i}]", out, limit)
    elif isinstance(a, float):
        if struct.pack("<d", a) != struct.pack("<d", b) and not (math.isnan(a) and math.isnan(b)):
            out.append(f"{path}: {a!r} vs {b!r}")
    elif hasattr(a, "tobytes") and hasattr(a, "dtype"):   # a numpy array (the numpy RNG's key)
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            out.append(f"{path}: numpy arrays differ")
    elif a != b:
        out.append(f"{path}: {a!r:.80} vs {b!r:.80}")
    return out


def load(path: Path):
    with torch.serialization.safe_globals(list(RNG_STATE_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True)


def compare_run(ref: Path, trial: Path) -> list[str]:
    """Every difference between a finished trial run directory and its reference."""
    diffs = []
    for run, what in ((ref, "reference"), (trial, "trial")):
        if not (run / "result.json").is_file():
            return [f"{run}: the {what} run did not finish (no result.json)"]
    ref_ckpt, trial_ckpt = (run / "checkpoints" / read_latest(run / "checkpoints") for run in (ref, trial))
    for name in ("state.pt", "rng-rank0.pt"):
        if not (trial_ckpt / name).is_file():
            diffs.append(f"{trial_ckpt / name}: missing")
            continue
        found = differences(load(ref_ckpt / name), load(trial_ckpt / name), name, [])
        diffs += [f"final checkpoint ({ref_ckpt.name} vs {trial_ckpt.name}) {d}" for d in found]
    diffs += [f"best.pt {d}" for d in differences(load(ref / "best.pt"), load(trial / "best.pt"), "", [])]
    if (ref / "metrics.jsonl").read_bytes() != (trial / "metrics.jsonl").read_bytes():
        a, b = ((run / "metrics.jsonl").read_text().splitlines() for run in (ref, trial))
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        diffs.append(f"metrics.jsonl: not byte-identical ({len(a)} vs {len(b)} lines; first difference at line "
                     f"{first + 1}: {a[first] if first < len(a) else '<none>'!r:.200} vs "
                     f"{b[first] if first < len(b) else '<none>'!r:.200})")
    ra, rb = (json.loads((run / "result.json").read_text()) for run in (ref, trial))
    ra.pop("run_dir", None), rb.pop("run_dir", None)
    if ra != rb:
        diffs += [f"result.json {d}" for d in differences(ra, rb, "", [])] or ["result.json differs"]
    return diffs


# ------------------------------------------------------------------------------------------------
# One launch: start the command, watch it, kill it when the trial's kind says so


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def all_started_have_checkpoint(runs: list[Path]) -> bool:
    return all(resumable(run) for run in runs if run.exists())


def run_launch(proc: subprocess.Popen, log: Path, runs: list[Path], kind: str | None, plan: dict,
               timeout: float) -> dict:
    """Watch `proc` until it exits, killing it as `kind` says (None: let it finish). Returns what happened.

    Kinds a and d count their delay from the moment the run is training past a checkpoint: a fresh
    launch's first checkpoint; a resumed launch's "[resume] from step" line (or its first new
    checkpoint, a unimodal modality started afresh) — or, for plan["startup"], from the launch itself
    (a kill while the resumed process starts, loads the checkpoint and trims metrics.jsonl)."""
    start = time.monotonic()
    leftovers = {run: tmp_identities(run / "checkpoints") for run in runs}
    latest_seen = {run: read_latest(run / "checkpoints") for run in runs}
    latest_changes = 0                          # kind b: `latest` replaced this many times in this launch
    lines_seen = {run: metrics_lines(run) for run in runs}
    line_gains = 0                              # kind c: metrics.jsonl grew this many times in this launch
    t0 = start if plan.get("startup") else None   # kinds a, d: when the delay starts
    latest_at_start = dict(latest_seen)
    fired, sigterm_at, trigger = False, None, None
    while proc.poll() is None:
        now = time.monotonic()
        if now - start > timeout:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
            return {"killed": False, "timeout": True, "rc": proc.returncode}
        if kind is not None and not fired:
            if kind == "b":
                for run in runs:
                    name = read_latest(run / "checkpoints")
                    if name != latest_seen[run]:
                        latest_seen[run], latest_changes = name, latest_changes + 1
                if latest_changes >= plan["skip"]:
                    trigger = next((f"{run.name or 'out_dir'}/{w}" for run in runs if (w := in_write(
                        run / "checkpoints", leftovers[run], renamed_only=plan["phase"] == "renamed"))), None)
                    fired = trigger is not None
                    if fired and plan["after_ms"]:
                        trigger += f" + {plan['after_ms']:.1f} ms"
                        time.sleep(plan["after_ms"] / 1000)
            elif kind == "c":
                for run in runs:
                    n = metrics_lines(run)
                    if n > lines_seen[run]:
                        line_gains += 1
                        if line_gains > plan["skip"] and trigger is None:
                            trigger = f"{run.name or 'out_dir'}/metrics.jsonl line {n}"
                    lines_seen[run] = n
                fired = trigger is not None and all_started_have_checkpoint(runs)
            else:   # a, d: a random time once the first checkpoint exists
                if t0 is None and all_started_have_checkpoint(runs) and any(run.exists() for run in runs) and (
                        not plan["resumed"] or b"[resume] from step" in log.read_bytes()
                        or any(read_latest(run / "checkpoints") != latest_at_start[run] for run in runs)):
                    t0 = now
                fired = t0 is not None and now - t0 >= plan["delay"] and all_started_have_checkpoint(runs)
                trigger = f"{now - start:.2f} s after launch" if fired else None
            if fired:
                if kind == "d":
                    signal_group(proc, signal.SIGTERM)
                    sigterm_at = time.monotonic()
                    time.sleep(plan["grace"])
                signal_group(proc, signal.SIGKILL)
                proc.wait()
                break
        time.sleep(POLL_S)
    if not fired:
        return {"killed": False, "rc": proc.returncode, "seconds": round(time.monotonic() - start, 2)}
    # the process is dead: what did it leave?
    after = {run.name or "out_dir": describe_checkpoints(run) for run in runs if run.exists()}
    writes = [f"{run.name or 'out_dir'}/{w}" for run in runs if run.exists()
              and (w := in_write(run / "checkpoints", leftovers[run]))]
    stales = [f"{run.name or 'out_dir'}/{n}" for run in runs if (run / "checkpoints").is_dir()
              for n in os.listdir(run / "checkpoints") if n.startswith(".stale-")]
    if plan.get("startup"):
        trigger += " (aimed at the resumed process's start-up)"
    return {"killed": True, "kind": kind, "trigger": trigger, "seconds": round(time.monotonic() - start, 3),
            "grace_ms": round(plan["grace"] * 1000) if sigterm_at else None, "rc": proc.returncode,
            "in_write": writes, "stale": stales, "checkpoints": after}


# ------------------------------------------------------------------------------------------------
# A trial


def remaining(runs: list[Path], epochs: int) -> dict:
    """What the run still has to do, from its checkpoints: writes, epochs, the share of its steps."""
    writes = lines = steps = 0
    for run in runs:
        if (run / "result.json").is_file():
            continue
        step, epoch = position(run) if run.exists() else (0, 0)
        writes += writes_per_run(epochs) - (step // CKPT_EVERY + epoch)
        lines += epochs - epoch
        steps += epochs * STEPS_PER_EPOCH - step
    return {"writes": max(1, writes), "epochs": max(1, lines),
            "share": steps / (epochs * STEPS_PER_EPOCH * len(runs))}


def plan_kill(kind: str, rng: random.Random, left: dict, ref_times: dict, fresh: bool) -> dict:
    """Which write (b) or epoch end (c) to aim at, or how long to wait (a, d): on a fresh launch, up to
    the reference's time from its first checkpoint to its end; on a resumed one, one time in five
    inside its start-up (up to the reference's time to its first checkpoint), else up to the time
    the steps still to do took in the reference."""
    plan = {"grace": rng.uniform(0.0, 0.2) if kind == "d" else 0.0, "resumed": not fresh}
    if kind == "b":   # a fresh launch aims at its first checkpoint write one time in four
        plan["skip"] = 0 if fresh and rng.random() < 0.25 else rng.randrange(left["writes"])
        # where in the write (~15 ms here: mkdir, rng-rank0.pt, state.pt, fsyncs, rename, `latest`):
        # one time in three the ~1 ms between the rename and `latest` (missed polls try the next write),
        # else 0-15 ms after the temporary directory appeared
        plan["phase"] = "renamed" if rng.random() < 1 / 3 else "tmp"
        plan["after_ms"] = rng.uniform(0.0, 15.0) if plan["phase"] == "tmp" else 0.0
    elif kind == "c":
        plan["skip"] = rng.randrange(left["epochs"])
    else:
        train_span = ref_times["end"] - ref_times["first_ckpt"]
        plan["startup"] = not fresh and rng.random() < 0.2
        span = ref_times["first_ckpt"] if plan["startup"] else 0.9 * train_span * (1.0 if fresh else left["share"])
        plan["delay"] = rng.uniform(0.0, max(0.1, span))
    return plan


def trial(index: int, script: str, kind: str, seed: int, data: Path, ref: Path, ref_times: dict,
          trial_dir: Path) -> dict:
    """Run one trial (launch, kill, resume, ... until the run finishes), then compare with the reference.

    A planned kill that lands only after the run finished (every result.json written), or not at all
    (the run was faster than the drawn delay), is not counted as a kill ("missed"); a trial whose
    kills all missed is started again in a fresh out_dir (at most 3 attempts)."""
    _, epochs, _, subruns = SCRIPTS[script]
    rng = random.Random(f"{seed}/{index}")
    out_dir = trial_dir / "run"
    runs = [out_dir / s if s else out_dir for s in subruns]
    finished = lambda: all((run / "result.json").is_file() for run in runs)  # noqa: E731
    kills_planned = rng.randint(1, 3)
    record = {"trial": index, "script": script, "kind": kind, "kills_planned": kills_planned, "kills": [],
              "resumes": 0, "fallback_resumes": 0, "before_first_ckpt": 0, "missed": 0, "attempts": 1,
              "dir": str(trial_dir)}
    timeout = max(120.0, 20 * ref_times["end"])
    start, resume, launches = time.monotonic(), False, 0
    while True:
        launches += 1
        if launches > kills_planned + 8 + 3 * record["attempts"]:
            record["failure"] = [f"did not finish after {launches - 1} launches"]
            break
        kill_now = len(record["kills"]) < kills_planned
        plan = plan_kill(kind, rng, remaining(runs, epochs), ref_times, fresh=not resume) if kill_now else {}
        record["resumes"] += resume
        log = trial_dir / f"launch-{launches}.log"
        proc = launch(command(script, data, out_dir, resume), log)
        try:
            outcome = run_launch(proc, log, runs, kind if kill_now else None, plan, timeout)
        except BaseException:
            signal_group(proc, signal.SIGKILL)
            proc.wait()
            raise
        text = log.read_text(errors="replace")
        record["fallback_resumes"] += "resuming from the newest complete checkpoint" in text
        if outcome.get("timeout"):
            record["failure"] = [f"launch {launches} ran past {timeout:.0f} s (killed); log {log}"]
            break
        if not outcome["killed"] and outcome["rc"] != 0:
            tail = "\n".join(text.splitlines()[-15:])
            record["failure"] = [f"launch {launches} ({'--resume' if resume else 'fresh'}) exited "
                                 f"{outcome['rc']}; log {log}:\n{tail}"]
            break
        if finished():
            record["missed"] += kill_now
            if record["kills"] or record["attempts"] >= 3:
                break
            shutil.rmtree(out_dir)   # every planned kill missed: this trial starts again
            record["attempts"] += 1
            resume = False
            continue
        if not outcome["killed"]:
            resume = True   # a clean stop (kind d's SIGTERM won the race against SIGKILL): continue it
            continue
        outcome["launch"], outcome["resumed"] = launches, resume
        outcome["at_step"] = {run.name or "out_dir": position(run)[0] for run in runs if run.exists()}
        # a run directory left without any complete checkpoint cannot resume (by design): start it afresh
        dead = [run for run in runs if run.exists() and not resumable(run)]
        for run in dead:
            shutil.rmtree(run)
        outcome["before_first_ckpt"] = bool(dead)
        record["before_first_ckpt"] += bool(dead)
        record["kills"].append(outcome)
        resume = any(resumable(run) for run in runs if run.exists())
        if not resume and out_dir.exists():
            shutil.rmtree(out_dir)
    record["seconds"] = round(time.monotonic() - start, 1)
    if "failure" not in record:
        diffs = []
        for run, ref_run in zip(runs, [ref / s if s else ref for s in subruns]):
            diffs += [f"{run.name or 'out_dir'}: {d}" if len(runs) > 1 else d for d in compare_run(ref_run, run)]
        if diffs:
            record["failure"] = diffs
    return record


# ------------------------------------------------------------------------------------------------
# The campaign


def reference(script: str, data: Path, ref: Path) -> dict:
    """The uninterrupted run; its timings (first checkpoint, end) steer kinds a and d."""
    _, epochs, _, subruns = SCRIPTS[script]
    runs = [ref / s if s else ref for s in subruns]
    log = ref.parent / f"{script}.log"
    start = time.monotonic()
    proc = launch(command(script, data, ref, resume=False), log)
    first = None
    while proc.poll() is None:
        if first is None and resumable(runs[0]):
            first = time.monotonic() - start
        time.sleep(0.005)
    end = time.monotonic() - start
    if proc.returncode != 0 or not all((r / "result.json").is_file() for r in runs):
        sys.exit(f"reference run of {script} failed ({proc.returncode}): see {log}")
    for run in runs:   # the collision this campaign is after: a step checkpoint and the epoch end at one step
        last = epochs * STEPS_PER_EPOCH
        held = set(os.listdir(run / "checkpoints"))
        if not {f"ckpt-{last:09d}", f"ckpt-{last:09d}-1"} <= held or read_latest(run / "checkpoints") != f"ckpt-{last:09d}-1":
            sys.exit(f"reference run of {script}: expected ckpt-{last:09d} and ckpt-{last:09d}-1 (latest) in "
                     f"{run / 'checkpoints'}, found {sorted(held)}")
    return {"first_ckpt": first or end / 2, "end": end}


def schedule(n_trials: int, scripts: list[str]) -> list[tuple[str, str]]:
    """(script, kind) per trial: kinds rotate a, b, c, d; the scripts rotate with a shift after each
    lcm(len(scripts), 4) trials, so that every script meets different kinds."""
    kinds, n = list(KINDS), len(scripts)
    block = n * 4 // math.gcd(n, 4)
    return [(scripts[(i + i // block) % n], kinds[i % 4]) for i in range(n_trials)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="comma-separated, of: " + ", ".join(SCRIPTS))
    parser.add_argument("--out", type=Path, default=None, help="default: a new directory under /tmp")
    parser.add_argument("--keep-runs", action="store_true", help="keep passing trials' run directories too")
    args = parser.parse_args(argv)
    scripts = [s.strip() for s in args.scripts.split(",") if s.strip()]
    unknown = [s for s in scripts if s not in SCRIPTS]
    if unknown or not scripts:
        parser.error(f"--scripts: unknown {unknown} (choose among {', '.join(SCRIPTS)})")
    out = args.out or Path(tempfile.mkdtemp(prefix="kill_campaign-", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    campaign_start = time.monotonic()
    print(f"kill campaign: {args.trials} trials over {', '.join(scripts)}, seed {args.seed}, in {out}", flush=True)
    print(f"  {N_TRAIN} training samples, batch {BATCH}: {STEPS_PER_EPOCH} steps per epoch, --ckpt_every_steps "
          f"{CKPT_EVERY}, --keep_checkpoints 2", flush=True)

    data = {}
    for flavour in sorted({SCRIPTS[s][0] for s in scripts}):
        data[flavour] = embedded.generate(out / "data", flavour, seed=3, n_train=N_TRAIN, n_val=N_VAL,
                                          n_test=N_TEST, overwrite=True)
    refs, ref_times = {}, {}
    for script in scripts:
        refs[script] = out / "reference" / script
        if refs[script].exists():
            shutil.rmtree(refs[script])
        refs[script].parent.mkdir(parents=True, exist_ok=True)
        ref_times[script] = reference(script, data[SCRIPTS[script][0]], refs[script])
        print(f"  reference {script:9s} {ref_times[script]['end']:5.1f} s (first checkpoint after "
              f"{ref_times[script]['first_ckpt']:.1f} s)", flush=True)
    ref_seconds = time.monotonic() - campaign_start

    records = []
    with open(out / "trials.jsonl", "w") as trials_log, open(out / "kills.jsonl", "w") as kills_log:
        for index, (script, kind) in enumerate(schedule(args.trials, scripts)):
            trial_dir = out / "trials" / f"{index:03d}-{script}-{kind}"
            if trial_dir.exists():
                shutil.rmtree(trial_dir)
            trial_dir.mkdir(parents=True)
            record = trial(index, script, kind, args.seed, data[SCRIPTS[script][0]], refs[script],
                           ref_times[script], trial_dir)
            records.append(record)
            for kill in record["kills"]:
                kills_log.write(json.dumps({"trial": index, "script": script} | kill) + "\n")
            trials_log.write(json.dumps({k: v for k, v in record.items() if k != "kills"}
                                        | {"n_kills": len(record["kills"])}) + "\n")
            kills_log.flush(), trials_log.flush()
            landed = sum(bool(k["in_write"]) for k in record["kills"])
            status = "FAIL" if "failure" in record else "ok"
            print(f"  trial {index:3d} {script:9s} kind {kind}: {len(record['kills'])} kill(s), {landed} inside a "
                  f"checkpoint write, {record['before_first_ckpt']} before the first checkpoint, "
                  f"{record['resumes']} resume(s)" + (f", {record['missed']} missed" if record["missed"] else "")
                  + f", {record['seconds']:5.1f} s  {status}", flush=True)
            if "failure" in record:
                report_failure(record)
            elif not args.keep_runs:
                shutil.rmtree(trial_dir / "run", ignore_errors=True)

    print_table(records, scripts, ref_seconds, time.monotonic() - campaign_start, out)
    return 1 if any("failure" in r for r in records) else 0


def report_failure(record: dict) -> None:
    print(f"\nFAILURE: trial {record['trial']}, {record['script']}, kind {record['kind']} "
          f"({KINDS[record['kind']]}); run directory kept: {record['dir']}/run", flush=True)
    for line in record["failure"]:
        print(f"    differs: {line}", flush=True)
    for kill in record["kills"]:
        print(f"    kill in launch {kill['launch']} ({'resumed' if kill['resumed'] else 'fresh'}) at "
              f"{kill['seconds']} s, trigger {kill['trigger']}, rc {kill['rc']}"
              + (f", SIGKILL {kill['grace_ms']} ms after SIGTERM" if kill.get('grace_ms') is not None else "")
              + f"; checkpoint step then {kill['at_step']}; inside write: {kill['in_write'] or 'no'}"
              + (f"; stale: {kill['stale']}" if kill['stale'] else ""), flush=True)
        for run, held in kill["checkpoints"].items():
            print(f"        {run}: latest={held.get('latest')!r}, metrics lines {held.get('metrics_lines')}, "
                  f"best.pt {held.get('best.pt')}, entries {json.dumps(held.get('entries'))}", flush=True)
    print(flush=True)


def print_table(records: list[dict], scripts: list[str], ref_seconds: float, total_seconds: float, out: Path) -> None:
    header = ["script", "trials", "kills a/b/c/d", "in ckpt write", "before 1st ckpt", "resumes", "missed", "failures",
              "wall s"]
    rows, totals = [], None
    for script in scripts + [None]:
        mine = [r for r in records if script is None or r["script"] == script]
        kills = [k for r in mine for k in r["kills"]]
        per_kind = "/".join(str(sum(k["kind"] == kind for k in kills)) for kind in KINDS)
        row = [script or "total", len(mine), per_kind, sum(bool(k["in_write"]) for k in kills),
               sum(r["before_first_ckpt"] for r in mine), sum(r["resumes"] for r in mine), sum(r["missed"] for r in mine),
               sum("failure" in r for r in mine), f"{sum(r['seconds'] for r in mine):.0f}"]
        if script is None:
            totals = row
        else:
            rows.append(row)
    widths = [max(len(str(r[i])) for r in rows + [header, totals]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    print("\n" + "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
                           + [line(["-" * w for w in widths]), line(totals)]))
    trials_per_kind = {kind: sum(r["kind"] == kind for r in records) for kind in KINDS}
    fallback = sum(r["fallback_resumes"] for r in records)
    print(f"\ntrials per kind: " + ", ".join(f"{k} ({KINDS[k]}) {n}" for k, n in trials_per_kind.items()))
    print(f"resumes that found `latest` unusable and took the newest complete checkpoint: {fallback}")
    print(f"reference runs {ref_seconds:.0f} s; campaign {total_seconds:.0f} s in all "
          f"({total_seconds / 60:.1f} min); records: {out / 'trials.jsonl'}, {out / 'kills.jsonl'}")
    failed = [r for r in records if "failure" in r]
    print(f"RESULT: {len(records) - len(failed)} of {len(records)} trials resumed bit-exactly"
          + (f"; {len(failed)} FAILED: " + ", ".join(f"{r['trial']} ({r['script']}, kind {r['kind']})" for r in failed)
             if failed else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
