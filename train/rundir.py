"""The run directory: checked before anything is written, locked for the whole run, the resolved
config (and, on --resume, its reconciliation with the config the run was started with),
the experiment trackers (`report_to`: TensorBoard, wandb, MLflow), metrics.jsonl, result.json and
the closing table."""
from __future__ import annotations

import copy
import fcntl
import importlib.util
import json
import os
import socket
import time
from pathlib import Path

import yaml

from train import distributed
from train.checkpoint import (atomic_write_text, checkpoint_step, has_checkpoint, resume_checkpoint,
                              write_run_config)
from train.config import COMMAND_LINE, ConfigError, load_yaml, source_of


#: What a run writes into its out_dir. A fresh run refuses a directory holding any of them (the
#: launchers' own files, slurm_jobs.log, submit.txt, submitit/, and the lock, .lock, do not count).
RUN_FILES = ("checkpoints", "config.yaml", "metrics.jsonl", "best.pt", "result.json", "tb")

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


def setup_run_dir(cfg: dict, accelerator):
    """Check the run directory, lock it, then write the resolved config and open TensorBoard.

    The main process takes the directory's lock (lock_run_dir) before the checks: a second run on
    the same directory — simultaneous resumes, a fresh run into a running one — is refused in one
    line naming the holder, on every rank. Every rank checks before any rank writes (the directory
    is on a shared file system), so all refuse together. A fresh run refuses a directory that holds
    any file of a previous run (RUN_FILES): nothing already written is lost; --resume needs a
    checkpoint. A resumed run leaves config.yaml alone here: load_checkpoint rewrites it once the
    checkpoint has been accepted, so a rejected --resume changes nothing. TensorBoard events logged
    after the checkpoint (by the run that was stopped) are purged: they are logged again.
    """
    run_dir = Path(cfg["out_dir"])
    if cfg["resume"]:
        if not has_checkpoint(run_dir):
            raise ConfigError(f"--resume: no checkpoint under {run_dir / 'checkpoints'} "
                              "(drop --resume to start a run there)")
        purge_step = checkpoint_step(resume_checkpoint(run_dir / "checkpoints")[0]) + 1
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
    writer = None
    if accelerator.is_main_process:
        if not cfg["resume"]:
            write_run_config(run_dir, cfg)
        writer = open_trackers(cfg, run_dir, purge_step=purge_step if cfg["resume"] else None)
    accelerator.wait_for_everyone()
    return run_dir, writer


# --------------------------------------------------------------------------------------------------
# Experiment trackers (`report_to`): each has add_scalar(tag, value, step) and close(finished=True),
# opens lazily at the first scalar (a run refused before it logs leaves nothing behind) and exists on
# the main process only. TensorBoard is our own writer (it purges events after the checkpoint on
# --resume); wandb and MLflow are optional extras (pip install -e ".[trackers]").

#: report_to's tracker names and the package each needs ("all": tensorboard and every installed other).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def report_to(value) -> list[str]:
    """The trackers that `report_to` names (a name, a comma-separated list or a list), in
    TRACKERS' order; ConfigError, one line, for an unknown name or a tracker not installed."""
    listed = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
    names = [str(n).strip() for n in listed or [] if str(n).strip()]
    unknown = [n for n in names if n not in (*TRACKERS, "all", "none")]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise ConfigError(f"report_to='{value}': choose tensorboard, wandb, mlflow, all or none "
                          "(or a comma-separated list of the first three)")
    if "all" in names:
        return ["tensorboard"] + [n for n, pkg in TRACKERS.items() if n != "tensorboard" and importlib.util.find_spec(pkg)]
    for name in names:
        if name != "none" and importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"report_to={name}: the {TRACKERS[name]} package is not installed (pip install "
                              f"{TRACKERS[name]}, or pip install -e \".[trackers]\")")
    return [n for n in TRACKERS if n in names]


def open_trackers(cfg: dict, run_dir: Path, purge_step: int | None = None) -> "Trackers":
    names = report_to(cfg.get("report_to", "tensorboard"))
    return Trackers([TensorBoardLog(run_dir / "tb", purge_step=purge_step) if name == "tensorboard" else
                     WandbLog(run_dir, cfg) if name == "wandb" else MlflowLog(run_dir, cfg) for name in names])


class Trackers:
    """The trackers of `report_to` as one writer (none at all for report_to=none)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for tracker in self.trackers:
            tracker.add_scalar(tag, value, step)

    def close(self, finished: bool = True) -> None:
        for tracker in self.trackers:
            tracker.close(finished)


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


class WandbLog:
    """A wandb run with the run directory as its dir, the resolved config as its config, and its
    id in tracker_ids.json: --resume continues it (resume="allow"). wandb keeps the points it has:
    those the stopped run logged after its checkpoint are not replaced (TensorBoard's are)."""

    def __init__(self, run_dir: Path, cfg: dict):
        self.run_dir, self.cfg, self._run = Path(run_dir), cfg, None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._run is None:
            import wandb
            run_id = tracker_id(self.run_dir, "wandb", wandb.util.generate_id())
            self._run = wandb.init(dir=str(self.run_dir), config=_plain(self.cfg), id=run_id, resume="allow",
                                   name=self.run_dir.name)
        self._run.log({tag: value}, step=step)

    def close(self, finished: bool = True) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if finished else 1)


class MlflowLog:
    """An MLflow run in a file store under <run_dir>/mlruns (MLFLOW_TRACKING_URI, when set, is used
    instead; MLFLOW_EXPERIMENT_NAME names the experiment, else "mm-balance"), its id in
    tracker_ids.json: --resume logs into the same run."""

    def __init__(self, run_dir: Path, cfg: dict):
        self.run_dir, self.cfg, self._client, self._run_id = Path(run_dir), cfg, None, None

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._client is None:
            from mlflow.tracking import MlflowClient
            uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.run_dir / "mlruns").resolve().as_uri()
            client = MlflowClient(tracking_uri=uri)
            run_id = tracker_id(self.run_dir, "mlflow")
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mm-balance")
                experiment = client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
                run_id = tracker_id(self.run_dir, "mlflow",
                                    client.create_run(experiment_id, run_name=self.run_dir.name).info.run_id)
                for key, value in _flat(_plain(self.cfg)).items():
                    client.log_param(run_id, key, str(value)[:500])
            else:
                client.update_run(run_id, status="RUNNING")
            self._client, self._run_id = client, run_id
        self._client.log_metric(self._run_id, tag, value, step=step)

    def close(self, finished: bool = True) -> None:
        if self._client is not None:
            self._client.set_terminated(self._run_id, "FINISHED" if finished else "KILLED")


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

    def close(self, finished: bool = True) -> None:
        if self._writer is not None:
            self._writer.close()


def log_scalars(writer, scalars: dict, step: int) -> None:
    if writer is not None:
        for key, value in scalars.items():
            writer.add_scalar(key, float(value), step)


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
