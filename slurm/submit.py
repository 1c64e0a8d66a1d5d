"""Submit training runs with submitit: single runs and sweeps, on SLURM or on this machine.

    python slurm/submit.py --script gaal --config train/configs/gaal_dvm.yaml --data /data/shards/dvm \\
        --nodes 1 --gpus_per_node 4 --time 1440 --partition gpu
    python slurm/submit.py --script joint --sweep seed=0,1,2 --sweep lr=1e-3,1e-4     # job array of 6
    python slurm/submit.py --cluster local --script gaal --epochs 2 --wait            # no SLURM here

Options of this launcher are listed by --help; every other argument is the training script's own
(`--config`, `--key value` overrides, `--out_dir`, `--resume`; see train/config.py load_config) and
is checked against the script's config before anything is submitted.

Run directories: `--out_dir` (else `runs/<name>`, name = `<script>_<config>`, and `_on_<data set>`
(meta.json's name) when `--data` names another data set than the config's) holds one run, or
with --sweep one sub-directory per point of the product, `seed0_lr0.001` style. Each gets
`submit.txt`: the submit command, the resolved training command, the executor parameters and the
job id. submitit's own logs go to `<out_dir>/submitit/`.

Requeueing (submitit's checkpoint protocol, public API only): a job is signalled with submitit's
signal (`submitit.JobEnvironment.USR_SIG`, USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise;
`signal_delay_s` before its time limit, or at preemption with SLURM's preempt_send_user_signal).
TrainRun's handler passes it to the training script as SIGUSR1, which checkpoints at the next step
boundary and returns; then TrainRun hands the signal to the handler submitit installed for it, which
calls `TrainRun.checkpoint()` -> `DelayedSubmission(TrainRun(... --resume))` and requeues the job
(SLURM: `scontrol requeue`; local: the controller restarts it), at most `--max_requeues` times for
time-outs. A job that SLURM itself requeues (node failure, `scontrol requeue`) also resumes: a run
that starts with a checkpoint in its out_dir adds `--resume`. SIGTERM (scancel) makes the script
checkpoint and stop without a requeue. `interrupt(job)` sends the signal by public means (tests).

Imports: `train.<script>` comes from the installed package (pyproject.toml; scripts/env.sh installs
the checkout editable). It must be this checkout's: the submit and the job both refuse to run code
from another checkout (set PYTHONPATH to this one, or re-install it) rather than run it silently.

Several tasks per job (--tasks_per_node > 1 or --nodes > 1): every task runs the script's main()
after `submitit.helpers.TorchDistributedEnvironment().export()` (MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK), which Accelerate picks up: one task per GPU, no `accelerate launch`.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import submitit

REPO = Path(__file__).resolve().parent.parent


def training_scripts(repo: Path = REPO) -> tuple:
    """train.SCRIPTS of this checkout, read from train/__init__.py without importing it (the checkout
    check comes first: see import_script)."""
    import ast
    tree = ast.parse((repo / "train" / "__init__.py").read_text())
    return next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["SCRIPTS"])


SCRIPTS = training_scripts()


def _pickle_by_value() -> None:
    """TrainRun is pickled by submitit; when this file is imported as a module (the tests) rather
    than run as a script, pickle it by value: the job need not import this file by its name."""
    if __name__ != "__main__" and __name__ in sys.modules:
        try:
            cloudpickle.register_pickle_by_value(sys.modules[__name__])
        except ValueError:
            pass


def requeue_signal() -> signal.Signals:
    """The signal submitit requeues on: its public `JobEnvironment.USR_SIG` (a name, "USR2" unless
    the environment variable SUBMITIT_PREEMPT_SIGNAL sets another), the one it asks SLURM for
    (`--signal=USR2@<signal_delay_s>`) and handles in the job."""
    name = submitit.JobEnvironment.USR_SIG
    try:
        return signal.Signals["SIG" + name.upper().removeprefix("SIG")]
    except KeyError:
        raise RuntimeError(f"submitit's signal {name!r} (SUBMITIT_PREEMPT_SIGNAL) is not a signal name") from None


class CheckoutError(RuntimeError):
    """train/ would be imported from another checkout than the one submitting (or not at all)."""


def import_script(script: str, repo: str | Path = REPO):
    """`train.<script>`, checked to come from the checkout `repo`."""
    try:
        module = importlib.import_module(f"train.{script}")
    except ModuleNotFoundError as err:
        raise CheckoutError(f"cannot import train.{script} ({err}): install the repository into this Python "
                            f"(bash scripts/env.sh, or pip install --no-deps -e {repo})") from None
    found = Path(module.__file__).resolve().parent.parent
    if found != Path(repo).resolve():
        raise CheckoutError(f"train.{script} is imported from {found}, not from {repo}: the environment's editable "
                            f"install points at another checkout. Run `pip install --no-deps -e {repo}` (or "
                            f"`bash scripts/env.sh` there), or set PYTHONPATH={repo}")
    return module


def pid_file(paths, job_id, rank) -> Path:
    """Where a running task leaves its process id (for interrupt(); in the job's submitit folder)."""
    return Path(paths.folder) / f"{job_id}_{rank}.pid"


def has_checkpoint(out_dir: str | Path) -> bool:
    """A checkpoint to resume from: `latest`, or a complete ckpt-* directory (train.checkpoint's
    rule, by file names: this module imports nothing of train/ before the checkout check)."""
    out = Path(out_dir)
    return any(any(run.glob("checkpoints/latest")) or any(run.glob("checkpoints/ckpt-*/state.pt"))
               for run in (out, *out.glob("*/")))  # unimodal: one run per modality


def was_stopped(result) -> bool:
    """main() returns {'stopped_at_step': ...} when it checkpointed and stopped on a signal
    (unimodal: a dict of such results per modality)."""
    if not isinstance(result, dict):
        return False
    return "stopped_at_step" in result or any(isinstance(v, dict) and "stopped_at_step" in v for v in result.values())


class TrainRun:
    """One training run: `train/<script>.py` main() with `argv`, inside a submitit job."""

    def __init__(self, script: str, argv: list[str], out_dir: str, repo: str = str(REPO), threads: int = 0):
        self.script, self.argv, self.out_dir, self.repo, self.threads = script, list(argv), out_dir, repo, threads
        self._submitit_handler = None
        self._requeue_signal = threading.Event()

    def __getstate__(self):
        return {k: self.__dict__[k] for k in ("script", "argv", "out_dir", "repo", "threads")}

    def __setstate__(self, state):
        self.__init__(**state)

    def command(self) -> str:
        return shlex.join([sys.executable, f"train/{self.script}.py", *self.argv])

    def _on_requeue_signal(self, signum, frame):
        """submitit's signal (SIGUSR2): ask the script to checkpoint at its next step boundary (its
        SIGUSR1 handler, train/loop.py Preemption), then requeue once main() has returned. The
        handler may not be installed yet (imports, data checks): a thread waits for it."""
        print(f"[submit] {signal.Signals(signum).name}: checkpoint at the next step, then requeue", flush=True)
        self._requeue_signal.set()
        pid = os.getpid()

        def forward():
            for _ in range(6000):   # at most 10 minutes
                if callable(signal.getsignal(signal.SIGUSR1)):
                    os.kill(pid, signal.SIGUSR1)
                    return
                time.sleep(0.1)
        threading.Thread(target=forward, daemon=True).start()

    def __call__(self):
        if self.threads:   # before torch is imported: one task's share of the CPUs
            os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))
        os.chdir(self.repo)
        module = import_script(self.script, self.repo)
        from train import config, distributed   # after the checkout check: this repository's
        argv = list(self.argv)
        if has_checkpoint(self.out_dir) and "--resume" not in argv:
            argv.append("--resume")   # requeued by SLURM itself (node failure, scontrol requeue)
        cfg = config.load_config(module.CONFIG, argv, default_config=module.DEFAULT_CONFIG,
                                   ignored=getattr(module, "ignored_keys", None))
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # one task per process; GPUs stay all visible, Accelerate takes cuda:LOCAL_RANK
            dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                              overwrite=True)
            if dist_env.rank != 0:   # one line after RDZV_TIMEOUT s, not the process group's 30-minute wait
                distributed.wait_for_rendezvous(dist_env.master_addr, dist_env.master_port)
        print(f"[submit] {env}: {shlex.join(['train/' + self.script + '.py', *argv])}", flush=True)
        requeue_sig = requeue_signal()
        self._submitit_handler = signal.getsignal(requeue_sig)   # submitit's: checkpoint() and requeue
        signal.signal(requeue_sig, self._on_requeue_signal)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)   # until the script installs its handler
        pid = self._write_pid(env)
        try:
            result = module.main(cfg)
        finally:
            if pid:
                pid.unlink(missing_ok=True)
        distributed.finish()
        if was_stopped(result):
            if not self._requeue_signal.is_set():
                self._requeue_signal.wait(3.0)  # SIGTERM may come just before submitit's signal
            if self._requeue_signal.is_set() and callable(self._submitit_handler):
                # submitit: checkpoint() -> DelayedSubmission, requeue, exit (rank 0; others return)
                self._submitit_handler(requeue_sig, None)
        return result

    @staticmethod
    def _write_pid(env) -> Path | None:
        """This task's pid in the job's submitit folder, for interrupt() (none for in-process debug jobs)."""
        try:
            pid = pid_file(env.paths, env.job_id, env.global_rank)
        except KeyError:   # the debug executor runs in this process and has no job folder
            return None
        tmp = pid.with_suffix(".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(pid)
        return pid

    def checkpoint(self, *args, **kwargs):
        """submitit's protocol: what to run after a requeue (the same run, resumed)."""
        argv = list(self.argv)
        if has_checkpoint(self.out_dir) and "--resume" not in argv:
            argv.append("--resume")
        return submitit.helpers.DelayedSubmission(TrainRun(self.script, argv, self.out_dir, self.repo, self.threads))


def interrupt(job) -> None:
    """Send a running job the signal submitit requeues on: what SLURM sends `signal_delay_s` before
    the time limit (and at preemption with preempt_send_user_signal). For tests and by hand.

    SLURM: `scancel --signal=USR2 <job>` (to the job's steps, where the tasks run, as SLURM's own
    time-limit signal). Local: to each task's process, whose id the task wrote into the job's
    submitit folder when it started (the local controller itself must not get it: it has no handler
    and would die, leaving the task unsupervised)."""
    sig = requeue_signal()
    if isinstance(job, submitit.SlurmJob):
        subprocess.run(["scancel", f"--signal={sig.name.removeprefix('SIG')}", str(job.job_id)], check=True)
        return
    files = sorted(Path(job.paths.folder).glob(f"{job.job_id}_*.pid"))
    if not files:
        raise RuntimeError(f"job {job.job_id}: no running task (no {job.job_id}_<rank>.pid in {job.paths.folder})")
    for f in files:
        os.kill(int(f.read_text()), sig)


# --------------------------------------------------------------------------------------------------
# command line

def split_values(text: str) -> list[str]:
    """'0,1,2' -> ['0', '1', '2']; commas inside [...] or {...} stay: '[image],[table]' -> 2 values."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values if v.strip()]


def without_keys(argv: list[str], keys) -> list[str]:
    """argv without `--key value` / `--key=value` for the given keys."""
    out, i = [], 0
    while i < len(argv):
        key = argv[i][2:].split("=")[0].replace("-", "_") if argv[i].startswith("--") else None
        if key in keys:
            i += 1 if "=" in argv[i] or i + 1 >= len(argv) or argv[i + 1].startswith("--") else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def parse_sweep(specs: list[str]) -> list[list[tuple[str, str]]]:
    """['seed=0,1', 'lr=1e-3,1e-4'] -> the product: [[(seed, 0), (lr, 1e-3)], ...]."""
    axes = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip().lstrip("-")
        if not eq or not key or not split_values(values):
            raise SystemExit(f"--sweep {spec!r}: expected KEY=V1,V2,...")
        if key in ("out_dir", "config", "resume"):
            raise SystemExit(f"--sweep {key}: not a sweepable key")
        axes.append([(key, v) for v in split_values(values)])
    return [list(point) for point in itertools.product(*axes)] if axes else [[]]


def point_tag(point: list[tuple[str, str]]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{k.split('.')[-1] if len(k) > 24 else k}{v}").strip("-")
                    for k, v in point)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slurm/submit.py", description=__doc__.split("\n\n")[0],
        epilog="Every other argument goes to the training script (e.g. --config FILE --epochs 5 --lr 3e-4).",
)
    p.add_argument("--script", required=True, choices=SCRIPTS, help="train/<script>.py")
    p.add_argument("--cluster", default="auto", choices=("auto", "slurm", "local", "debug"),
                   help="auto (default): slurm when sbatch is found, else local; debug runs in this process")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="repeatable; one run per point of the product, submitted as one job array")
    p.add_argument("--name", help="job name and default run directory name (default <script>_<config>)")
    p.add_argument("--run_root", default="runs", help="where runs go when the script args have no --out_dir (default: runs)")
    p.add_argument("--nodes", type=int, default=1, help="(default: 1)")
    p.add_argument("--gpus_per_node", type=int, default=0, help="(default: 0)")
    p.add_argument("--tasks_per_node", type=int, help="processes per node (default: gpus_per_node, or 1)")
    p.add_argument("--cpus_per_task", type=int, default=4, help="(default: 4)")
    p.add_argument("--mem_gb", type=int, help="memory per node")
    p.add_argument("--time", type=int, default=24 * 60, help="time limit per job in minutes (default: 1440)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--array_parallelism", type=int, default=64, help="sweep jobs running at once (default: 64)")
    p.add_argument("--signal_delay_s", type=int, default=300,
                   help="SLURM: the requeue signal comes this long before the time limit (default: 300)")
    p.add_argument("--max_requeues", type=int, default=20, help="requeues after time-outs, per job (default: 20)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="more sbatch options (repeatable), e.g. --slurm constraint=a100")
    p.add_argument("--folder", help="submitit logs (default <out_dir>/submitit)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    p.add_argument("--dry_run", action="store_true", help="print the runs, submit nothing")
    return p


def dataset_name(data) -> str | None:
    """The `name` in a shard directory's meta.json (None when unreadable: the script refuses it later)."""
    try:
        name = json.loads((Path(data) / "meta.json").read_text()).get("name")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) if name else None


def resolve_runs(args, script_argv: list[str]):
    """[(out_dir, argv)] per sweep point; argv with absolute --data and --out_dir, checked by load_config."""
    try:
        module = import_script(args.script)
    except CheckoutError as err:
        raise SystemExit(f"slurm/submit.py: {err}") from None
    from train import config, rundir   # after the checkout check: this repository's
    try:
        base_cfg = config.load_config(module.CONFIG, script_argv, default_config=module.DEFAULT_CONFIG,
                                   ignored=getattr(module, "ignored_keys", None))
    except config.ConfigError as err:
        raise SystemExit(f"train/{args.script}.py: {err}") from None
    config_name = Path(base_cfg.get("config_file") or module.DEFAULT_CONFIG).stem
    name = config_name if config_name.startswith(args.script) else f"{args.script}_{config_name}"
    dataset = dataset_name(base_cfg.get("data")) if "data" in {a[2:].split("=")[0] for a in script_argv} else None
    if dataset and dataset.removeprefix("embedded_") not in name:   # --data elsewhere than the config's data set
        name = f"{name}_on_{dataset}"
    name = args.name or name
    cli_keys = {a[2:].split("=")[0].replace("-", "_") for a in script_argv if a.startswith("--")}
    base_out = Path(base_cfg["out_dir"] if "out_dir" in cli_keys else Path(args.run_root) / name).resolve()
    data = str(Path(base_cfg["data"]).resolve()) if "data" in base_cfg else None
    runs = []
    points = parse_sweep(args.sweep)
    for point in points:
        out_dir = base_out / point_tag(point) if args.sweep else base_out
        argv = without_keys(script_argv, ("out_dir", "data"))   # replaced by absolute paths below
        for key, value in point:
            argv += [f"--{key}", value]
        argv += ["--out_dir", str(out_dir)] + (["--data", data] if data else [])
        try:
            cfg = config.load_config(module.CONFIG, argv, default_config=module.DEFAULT_CONFIG,
                                   ignored=getattr(module, "ignored_keys", None))
        except config.ConfigError as err:
            raise SystemExit(f"train/{args.script}.py {point_tag(point)}: {err}") from None
        previous = rundir.previous_run_files(out_dir)   # what the script itself would refuse, before submitting
        if (has_checkpoint(out_dir) or previous) and not cfg["resume"]:
            raise SystemExit(f"{out_dir} holds a previous run's files ({', '.join(previous) or 'checkpoints'}): "
                             "pass --resume to continue it, or choose another --out_dir / --name")
        runs.append((str(out_dir), argv))
    if len({out for out, _ in runs}) != len(runs):
        raise SystemExit("two sweep points map to the same run directory; use shorter or distinct values")
    return name, base_out, runs


def make_executor(args, name: str, folder: Path):
    cluster = args.cluster
    if cluster == "auto":
        cluster = "slurm" if shutil.which("sbatch") else "local"
    kwargs = {f"{cluster}_max_num_timeout": args.max_requeues} if cluster in ("slurm", "local") else {}
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, **kwargs)
    tasks = args.tasks_per_node or max(1, args.gpus_per_node)
    params = dict(name=name, timeout_min=args.time, nodes=args.nodes, tasks_per_node=tasks,
                  cpus_per_task=args.cpus_per_task)
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if cluster == "slurm":
        params.update(slurm_signal_delay_s=args.signal_delay_s, slurm_array_parallelism=args.array_parallelism)
        for key, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos)):
            if value:
                params[f"slurm_{key}"] = value
        extra = dict(kv.split("=", 1) for kv in args.slurm)
        if extra:
            params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor, cluster, params


def submit(argv: list[str] | None = None):
    """Parse, check, submit. Returns (jobs, runs); used by main() and the tests."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if "--" in argv:
        cut = argv.index("--")
        args = parser.parse_args(argv[:cut])
        script_argv = argv[cut + 1:]
    else:
        args, script_argv = parser.parse_known_args(argv)
    name, base_out, runs = resolve_runs(args, script_argv)
    if args.dry_run:
        for out_dir, run_argv in runs:
            print(f"{out_dir}\n  {TrainRun(args.script, run_argv, out_dir).command()}")
        return [], runs
    folder = Path(args.folder).resolve() if args.folder else base_out / "submitit"
    _pickle_by_value()
    executor, cluster, params = make_executor(args, name, folder / "%j")
    calls = [TrainRun(args.script, run_argv, out_dir, threads=args.cpus_per_task) for out_dir, run_argv in runs]
    if len(calls) == 1:
        jobs = [executor.submit(calls[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(call) for call in calls]
    submit_cmd = shlex.join([sys.executable, str(Path(__file__).resolve()), *argv])
    for job, call in zip(jobs, calls):
        out = Path(call.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "submit.txt", "a") as f:
            f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} job {job.job_id} on {cluster} "
                    f"(logs {job.paths.stdout})\n"
                    f"cd {shlex.quote(os.getcwd())} && {submit_cmd}\n"
                    f"# the run, as one process:\ncd {shlex.quote(call.repo)} && {call.command()}\n"
                    f"# executor: {json.dumps(params, default=str)}\n\n")
        print(f"[submit] job {job.job_id} ({cluster}): {call.out_dir}", flush=True)
    return jobs, runs


def main() -> int:
    argv = sys.argv[1:]
    jobs, _ = submit(argv)
    wait = "--wait" in argv[: argv.index("--") if "--" in argv else len(argv)]
    if not jobs or not (wait or any(isinstance(j, submitit.DebugJob) for j in jobs)):
        return 0
    failed = 0
    for job in jobs:
        try:
            result = job.results()[0]   # task 0's (every task of a multi-task job returns)
            test = result.get("test", {}).get("fused") if isinstance(result, dict) else None
            print(f"[submit] job {job.job_id} done: {'stopped (checkpointed)' if was_stopped(result) else test}")
        except Exception as err:  # noqa: BLE001 - report every job, then fail
            failed += 1
            print(f"[submit] job {job.job_id} failed: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
