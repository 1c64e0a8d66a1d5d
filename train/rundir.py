"""The run directory: checked before anything is written, locked for the whole run, the resolved
config (and, on --resume, its reconciliation with the config the run was started with),
the experiment trackers (`report_to`: TensorBoard, wandb, MLflow, through Accelerate's tracker
API), metrics.jsonl, result.json and the closing table."""
from __future__ import annotations

import atexit
import copy
import fcntl
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml

from train import distributed
from train.checkpoint import (CheckpointError, atomic_write_text, checkpoint_step, has_checkpoint,
                              resume_checkpoint, write_run_config)
from train.config import COMMAND_LINE, ConfigError, load_yaml, source_of


#: What a run writes into its out_dir. A fresh run refuses a directory holding any of them (the
#: launchers' own files, slurm_jobs.log, submit.txt, submitit/, and the lock, .lock, do not count).
#: tracker_ids.json among them: a fresh run that found one would continue that run's wandb/MLflow runs.
RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl", "best.pt", "result.json", "tb", "tracker_ids.json")

#: Keys a resumed run may set to another value than its config.yaml has, from the command line or
#: its YAML: how the run is fed, watched, logged and checkpointed, never what it computes.
RESUME_FREE_KEYS = ("resume", "out_dir", "config_file", "progress", "stop_after_steps", "num_workers",
                    "eval_batch_size", "log_every", "report_to", "ckpt_every_steps", "keep_checkpoints", "preempt_check_every")
#: Keys a flag may change on --resume under a condition (resumed_config): a longer `epochs` (the
#: scheduler must not span the run's length), and `data` moved (the same meta.json). Recorded.
RESUME_CHANGEABLE_KEYS = ("epochs", "data")


def previous_run_files(run_dir: Path) -> list[str]:
    """The names in RUN_FILES that exist under `run_dir`: what a fresh run there would overwrite."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value})
    return out


def _read_meta(data_dir) -> dict | None:
    try:
        return json.loads((Path(data_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _why_not(key: str, old, new, saved: dict) -> str | None:
    """None when a flag may change `key` from `old` to `new` on --resume, else why it may not."""
    if key == "epochs" and isinstance(old, int) and isinstance(new, int):
        if new < old:
            return "epochs can only grow on --resume"
        if saved.get("scheduler") in ("cosine", "warmup_cosine"):
            return f"scheduler={saved['scheduler']} spans the run's epochs"
        return None
    if key == "data":
        before = _read_meta(old)
        if before is not None and before != _read_meta(new):
            return f"{new}/meta.json differs from {old}/meta.json: not the data set the run trained on"
        return None
    return "a resumed run continues the run that was started"


def _read_run_config(path: Path, cfg: dict) -> dict:
    """The run's config.yaml, refused in one line unless it reads as a mapping of this script's keys."""
    try:
        saved = load_yaml(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())[:200]
        raise ConfigError(f"{path}: cannot read the config of the run to resume ({reason})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a run config (its top level is not a mapping)")
    foreign = sorted(set(saved) - set(cfg))
    if foreign:
        raise ConfigError(f"{path}: keys {', '.join(foreign[:3])} are not keys of this script: the run was "
                          "trained by another script; resume it with that one")
    return saved


def _flag_changes(cfg: dict, saved: dict, path: Path) -> list[dict]:
    """The command-line flags that set a key (dotted, nested keys too) to another value than the run's
    config.yaml: those RESUME_CHANGEABLE_KEYS allows, as {"key", "from", "to"}; any other refused in
    one line (the first three named). Free keys, unchanged values and the same data path are skipped."""
    old_flat, new_flat = _flat(saved), _flat(cfg)
    refused, changes = [], []
    for key in sorted(set(old_flat) & set(new_flat)):
        old, new = old_flat[key], new_flat[key]
        top = key.split(".")[0]
        if old == new or top in RESUME_FREE_KEYS or source_of(cfg, key) != COMMAND_LINE:
            continue
        if top == "data" and Path(str(old)).resolve() == Path(str(new)).resolve():
            continue
        why = _why_not(top, old, new, saved) if top in RESUME_CHANGEABLE_KEYS else \
            "a resumed run continues the run that was started"
        if why is None:
            changes.append({"key": key, "from": old, "to": new})
        else:
            refused.append(f"--{key} {new!r} (the run has {old!r}: {why})")
    if refused:
        raise ConfigError(f"--resume: {'; '.join(refused[:3])}; the run's config is {path}: drop the flag "
                          "or start a new run in another out_dir")
    return changes


def resumed_config(cfg: dict) -> tuple[dict, list[dict]]:
    """The config of the run in cfg["out_dir"] that --resume continues, and the changes it records.

    The run's config.yaml is the config: the script's defaults and YAML do not reach a resumed run
    (a longer default `epochs` does not lengthen it). A command-line flag that sets a key to another
    value is refused in one line naming the key, the run's value and the flag's — except the keys of
    RESUME_FREE_KEYS (taken as given) and RESUME_CHANGEABLE_KEYS under their condition (taken, and
    returned as {"key", "from", "to"} for the run to record). A finished run (result.json) is refused.
    Reads files only: nothing is written."""
    run_dir = Path(cfg["out_dir"])
    if (run_dir / "result.json").exists():
        raise ConfigError(f"out_dir={run_dir}: finished: result.json holds its result; --resume continues an "
                          "interrupted run only: choose another out_dir to train again")
    path = run_dir / "config.yaml"
    if not path.exists() and not has_checkpoint(run_dir):
        return cfg, []   # nothing to resume: setup_run_dir says so
    saved = _read_run_config(path, cfg)
    changes = _flag_changes(cfg, saved, path)
    resumed = copy.deepcopy(cfg)
    for key, value in saved.items():
        if key not in RESUME_FREE_KEYS:
            resumed[key] = copy.deepcopy(value)
    for change in changes:
        resumed[change["key"]] = change["to"]   # top-level keys only (RESUME_CHANGEABLE_KEYS)
    return resumed, changes


def lock_run_dir(run_dir: Path) -> str | None:
    """Take the run directory's exclusive lock (flock on <run>/.lock) for as long as this process
    holds it (unlock_run_dir, or its exit: a crashed run leaves no stale lock). None when taken;
    when another process holds it, that process as it described itself (pid, host, SLURM job, since)."""
    key = str(Path(run_dir).resolve())
    if key in _HELD:
        return None
    handle = open(Path(run_dir) / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return holder
    handle.seek(0)
    handle.truncate()
    job = os.environ.get("SLURM_JOB_ID")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}" + (f", SLURM job {job}" if job else "")
                 + time.strftime(", since %Y-%m-%d %H:%M:%S") + "\n")
    handle.flush()
    _HELD[key] = handle
    return None


def unlock_run_dir(run_dir: Path) -> None:
    handle = _HELD.pop(str(Path(run_dir).resolve()), None)
    if handle is not None:
        handle.close()


_HELD: dict[str, object] = {}


def setup_run_dir(cfg: dict, accelerator) -> Path:
    """Check the run directory, lock it, then write the resolved config; return the directory.

    The main process takes the directory's lock (lock_run_dir) before the checks: a second run on
    the same directory — simultaneous resumes, a fresh run into a running one — is refused in one
    line naming the holder, on every rank. Every rank checks before any rank writes (the directory
    is on a shared file system), so all refuse together. A fresh run refuses a directory that holds
    any file of a previous run (RUN_FILES): nothing already written is lost; --resume needs a
    checkpoint. A resumed run leaves config.yaml alone here: load_checkpoint rewrites it once the
    checkpoint has been accepted, so a rejected --resume changes nothing. The trackers open later,
    at the run's first scalar (start_trackers).
    """
    run_dir = Path(cfg["out_dir"])
    if cfg["resume"]:
        if not has_checkpoint(run_dir):
            raise ConfigError(f"--resume: no checkpoint under {run_dir / 'checkpoints'} "
                              "(drop --resume to start a run there)")
    holder = None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)   # a fresh run's (no check below can refuse a new one)
        holder = lock_run_dir(run_dir)
    if distributed.main_process_flag(holder is not None, accelerator):
        if holder is None:   # another rank: the main process's holder, as the lock file says
            holder = (run_dir / ".lock").read_text().strip() if (run_dir / ".lock").is_file() else "another process"
        raise ConfigError(f"out_dir={run_dir}: in use by another run ({holder}): one run per directory; wait "
                          "for it to end, or choose another out_dir")
    if not cfg["resume"]:
        previous = previous_run_files(run_dir)
        if previous:
            what = ("it is finished (result.json): choose another --out_dir" if "result.json" in previous else
                    "pass --resume to continue that run, or choose another --out_dir" if has_checkpoint(run_dir) else
                    "it has no checkpoint to resume from; choose another --out_dir, or delete those files")
            if accelerator.is_main_process:
                unlock_run_dir(run_dir)
            raise ConfigError(f"out_dir={run_dir} holds a previous run's files ({', '.join(previous)}): {what}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not cfg["resume"]:
        write_run_config(run_dir, cfg)
    accelerator.wait_for_everyone()
    return run_dir


# --------------------------------------------------------------------------------------------------
# Experiment trackers (`report_to`), through Accelerate's tracker API: trackers(cfg) makes Accelerate's
# own tracker objects for Accelerator(log_with=...) without opening anything; start_trackers opens
# them (accelerator.init_trackers) at the run's first scalar, once the run directory and a resumed
# checkpoint are accepted, so a refused run leaves nothing behind; every scalar goes through
# accelerator.log; close_trackers ends them. Main process only: Accelerate's init_trackers and log
# run there only. wandb and MLflow are optional extras (pip install -e ".[trackers]").

#: report_to's tracker names and the package each needs ("all": tensorboard and every installed other).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: wandb's project unless WANDB_PROJECT is set, MLflow's experiment unless MLFLOW_EXPERIMENT_NAME is
#: (Accelerate reads that one first). Without it wandb would name the project after the git checkout
#: and the script's folder (`main-train`), or `uncategorized` outside one.
TRACKER_PROJECT = "mm-balance"
#: MLflow's store when MLFLOW_TRACKING_URI is not set: SQLite, MLflow's own default (MLflow 3.17
#: refuses a file store, <out_dir>/mlruns, unless MLFLOW_ALLOW_FILE_STORE=true).
MLFLOW_DB = "mlflow.db"


def report_to(value) -> list[str]:
    """The trackers that `report_to` names (a name, a comma-separated list or a list), in
    TRACKERS' order; ConfigError, one line, for an unknown name or a tracker not installed."""
    names = _listed_names(value)
    if not names or not set(names) <= {*TRACKERS, "all", "none"} or ("none" in names and len(names) > 1):
        raise ConfigError(f"report_to='{value}': choose tensorboard, wandb, mlflow, all or none "
                          "(or a comma-separated list of the first three)")
    installed = [n for n, package in TRACKERS.items() if importlib.util.find_spec(package)]
    if "all" in names:
        return ["tensorboard"] + [n for n in installed if n != "tensorboard"]
    missing = [n for n in names if n in TRACKERS and n not in installed]
    if missing:
        raise ConfigError(f"report_to={missing[0]}: the {TRACKERS[missing[0]]} package is not installed (pip install "
                          f"{TRACKERS[missing[0]]}, or pip install -e \".[trackers]\")")
    return [n for n in TRACKERS if n in names]


def _listed_names(value) -> list[str]:
    """The names of a report_to value (a name, a comma-separated list or a list), blanks dropped."""
    listed = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else []
    return [str(n).strip() for n in listed if str(n).strip()]


def trackers(cfg: dict) -> list:
    """Accelerate's trackers for `report_to`, to pass as Accelerator(log_with=...): made, not opened
    (no package imported, nothing written). TensorBoard writes <out_dir>/tb/; on --resume its events
    after the checkpoint the run resumes from are purged (they are logged again). wandb logs under
    the run directory, its run named after it, in project WANDB_PROJECT or TRACKER_PROJECT; MLflow
    names its run after it, in experiment MLFLOW_EXPERIMENT_NAME or TRACKER_PROJECT. A --resume
    continues the wandb/MLflow run whose id tracker_ids.json holds."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker
    run_dir = Path(cfg["out_dir"])
    made = []
    for name in report_to(cfg["report_to"]):
        if name == "tensorboard":
            resumed = resume_step(run_dir) if cfg["resume"] else None
            made.append(TensorBoardTracker("tb", str(run_dir), purge_step=None if resumed is None else resumed + 1))
        elif name == "wandb":   # an explicit project would override WANDB_PROJECT in wandb.init: read it here
            made.append(WandBTracker(os.environ.get("WANDB_PROJECT") or TRACKER_PROJECT, dir=str(run_dir),
                                     id=tracker_id(run_dir, "wandb"), resume="allow", name=run_dir.name))
        else:
            made.append(MLflowTracker(TRACKER_PROJECT, run_id=tracker_id(run_dir, "mlflow"), run_name=run_dir.name))
    return made


def resume_step(run_dir: Path) -> int | None:
    """The step of the checkpoint a --resume of `run_dir` loads (checkpoint.resume_checkpoint), None
    when it has none to load (setup_run_dir or load_checkpoint refuses the resume then)."""
    if not has_checkpoint(run_dir):
        return None
    try:
        return checkpoint_step(resume_checkpoint(Path(run_dir) / "checkpoints")[0])
    except CheckpointError:
        return None


def start_trackers(accelerator, cfg: dict, run_dir: Path) -> None:
    """Open the Accelerator's trackers (accelerator.init_trackers), on the main process; a tracker
    that cannot start its run is refused in one line (ConfigError). MLflow gets a SQLite store,
    <run_dir>/mlflow.db, unless MLFLOW_TRACKING_URI is set; the resolved config goes to wandb (every
    start) and to a new MLflow run as its parameters (flattened, each cut to MLflow's longest value);
    each tracker's run id is kept in <run_dir>/tracker_ids.json for --resume."""
    if not accelerator.is_main_process:
        return
    if "mlflow" in report_to(cfg["report_to"]):
        import mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(Path(run_dir) / MLFLOW_DB).resolve()}")
        atexit.unregister(_end_unclosed_mlflow_run)   # registered once, after MLflow's own hook: runs before it
        atexit.register(_end_unclosed_mlflow_run)
    try:
        accelerator.init_trackers(Path(run_dir).name)
    except Exception as err:   # wandb not logged in, an MLflow store refused or unreachable, ...
        reason = " ".join(str(err).split()) or "no message"
        raise ConfigError(f"report_to={cfg['report_to']}: a tracker could not start its run "
                          f"({type(err).__module__}.{type(err).__name__}: {reason})") from None
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.store_init_configuration(_plain(cfg))
            tracker_id(run_dir, "wandb", tracker.tracker.id)
        elif tracker.name == "mlflow" and tracker_id(run_dir, "mlflow") is None:   # mlflow imported above
            longest = mlflow.utils.validation.MAX_PARAM_VAL_LENGTH   # longer values Accelerate would drop
            tracker_id(run_dir, "mlflow", tracker.tracker.info.run_id)
            tracker.store_init_configuration({key: str(value)[:longest] for key, value in _flat(_plain(cfg)).items()})


def _end_unclosed_mlflow_run() -> None:
    """At exit: an MLflow run still open was not ended by close_trackers, so the process is ending on
    an error (a refusal, a non-finite loss, an exception) or a second Ctrl-C; say FAILED, where
    MLflow's own exit hook would say FINISHED."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status="FAILED")


def close_trackers(accelerator, finished: bool = True) -> None:
    """End the trackers' runs (main process). A run stopped to be resumed (finished=False) says so:
    wandb exit code 1, MLflow status KILLED; --resume continues them."""
    if not accelerator.is_main_process:
        return
    atexit.unregister(_end_unclosed_mlflow_run)   # ended here: nothing left for the exit
    for tracker in accelerator.trackers:
        if finished or tracker.name not in ("wandb", "mlflow"):
            tracker.finish()
        elif tracker.name == "wandb":
            tracker.tracker.finish(exit_code=1)
        else:
            import mlflow
            mlflow.end_run(status="KILLED")


def tracker_id(run_dir: Path, name: str, new_id: str | None = None) -> str | None:
    """The run id tracker `name` uses for this run, kept in <run_dir>/tracker_ids.json so that a
    --resume continues the same tracker run; `new_id` is stored when none is."""
    path = Path(run_dir) / "tracker_ids.json"
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if name not in ids and new_id is not None:
        ids[name] = new_id
        atomic_write_text(path, json.dumps(ids, indent=2))
    return ids.get(name)


def _plain(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=str))


def append_jsonl(run_dir: Path, record: dict, accelerator) -> None:
    if accelerator.is_main_process:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def write_result(run_dir: Path, result: dict) -> None:
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2))


def print_table(rows: list[list], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    text = "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
    print(text, flush=True)
    return text


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
    if (Path(result["run_dir"]) / "tb").is_dir():   # report_to without tensorboard writes none
        print(f"TensorBoard: tensorboard --logdir {result['run_dir']}/tb", flush=True)
    print(flush=True)
    return text
