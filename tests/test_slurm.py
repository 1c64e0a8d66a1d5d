"""slurm/*.sh under a real one-node SLURM cluster (scripts/slurm_cluster.sh), and slurm/submit.py
(submitit) with the local executor and on that cluster: results, requeue, exact resume.

The cluster tests need root and the Debian packages slurmctld slurmd slurm-client munge (.ci/run
installs them); without them they skip and say why. They use the cluster named by SLURM_CONF when
it is one that scripts/slurm_cluster.sh generated, else start a private one for the session (about
a second) and stop it at the end.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from data_prep import embedded
from tests.test_train import final_weights

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
GENERIC = REPO / "slurm" / "train.sbatch"   # the one launcher; slurm/<name>.sh are thin wrappers around it
SBATCH_SCRIPTS = sorted(p for p in (REPO / "slurm").glob("*.sh") if p.name != "node.sh")
EPOCHS = 4   # 4 steps per epoch on the tiny set: long enough to interrupt after the first checkpoint
STEPS = 4 * EPOCHS
# train/configs/gaal_dvm.yaml's ResNet-50 at 128x128 made tiny for the 32x32 embedded images
TINY_DVM = ["--epochs", str(EPOCHS), "--batch_size", "64", "--eval_batch_size", "64", "--num_workers", "0",
            "--encoders.image.arch", "resnet10", "--encoders.image.base_width", "8",
            "--encoders.image.small_input", "true", "--encoders.table.hidden", "32",
            "--encoders.table.out_dim", "64", "--augment.size", "32", "--progress", "false",
            "--log_every", "2", "--ckpt_every_steps", "1"]
TINY_GAAL = ["--epochs", str(EPOCHS), "--batch_size", "64", "--eval_batch_size", "64",
             "--encoders.image.base_width", "8", "--encoders.table.out_dim", "64", "--progress", "false",
             "--log_every", "2", "--ckpt_every_steps", "1"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE")


def load_submit():
    spec = importlib.util.spec_from_file_location("slurm_submit", REPO / "slurm" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["slurm_submit"] = module
    spec.loader.exec_module(module)
    return module


def script_vars(path: Path) -> dict:
    line = next(l for l in path.read_text().splitlines() if l.startswith("SCRIPT="))
    return dict(item.split("=", 1) for item in line.split())


def assert_same_run(a: Path, b: Path):
    ra, rb = json.loads((a / "result.json").read_text()), json.loads((b / "result.json").read_text())
    assert (ra["test"], ra["val"], ra["best_epoch"]) == (rb["test"], rb["val"], rb["best_epoch"])
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def resumed_from(log: str) -> int:
    found = re.findall(r"\[resume\] from step (\d+)", log)
    assert found, f"no [resume] in the log:\n{log[-3000:]}"
    return int(found[0])


# --------------------------------------------------------------------------------------------------
# fast: the scripts themselves

def test_sbatch_scripts_parse_and_name_existing_configs():
    assert SBATCH_SCRIPTS, "no slurm/*.sh"
    for helper in ("train.sbatch", "node.sh"):
        subprocess.run(["bash", "-n", str(REPO / "slurm" / helper)], check=True)
    subprocess.run(["bash", "-n", str(CLUSTER_SCRIPT)], check=True)
    for path in SBATCH_SCRIPTS:
        subprocess.run(["bash", "-n", str(path)], check=True)
        text = path.read_text()
        v = script_vars(path)
        assert (REPO / v["CONFIG"]).is_file(), f"{path.name}: {v['CONFIG']} does not exist"
        assert (REPO / "train" / f"{v['SCRIPT']}.py").is_file(), path.name
        assert Path(v["CONFIG"]).stem == path.stem, f"{path.name} trains {v['CONFIG']}"
        header = [l for l in text.splitlines() if l.startswith("#SBATCH")]
        for option in ("--nodes", "--gpus-per-node", "--cpus-per-task", "--time", "--output", "--signal=B:USR1@",
                       "--requeue", "--open-mode=append"):
            assert any(option in l for l in header), f"{path.name}: no #SBATCH {option}"
        first_command = next(i for i, l in enumerate(text.splitlines()) if l and not l.startswith("#"))
        assert all(i < first_command for i, l in enumerate(text.splitlines()) if l.startswith("#SBATCH")), \
            f"{path.name}: #SBATCH lines after the first command are ignored by sbatch"
    # the generic script, submitted directly, carries the same protocol
    header = [l for l in GENERIC.read_text().splitlines() if l.startswith("#SBATCH")]
    for option in ("--output", "--signal=B:USR1@", "--requeue", "--open-mode=append", "--ntasks-per-node=1"):
        assert any(option in l for l in header), f"train.sbatch: no #SBATCH {option}"
    # every shipped config of the three scripts has its sbatch script
    for config in (REPO / "train" / "configs").glob("*.yaml"):
        if config.stem.split("_")[0] in ("gaal", "igm", "joint"):
            assert (REPO / "slurm" / f"{config.stem}.sh").is_file(), f"no slurm/{config.stem}.sh"


def test_sbatch_wrappers_are_thin():
    """Each slurm/<name>.sh: its resources and the protocol's #SBATCH lines (what a cluster user edits
    first, partition and account included), the data path, SCRIPT/CONFIG/DATASET, and `. train.sbatch`."""
    assert len(SBATCH_SCRIPTS) >= 21   # the glob found the shipped wrappers (a test over nothing passes)
    for path in SBATCH_SCRIPTS:
        lines = path.read_text().splitlines()
        commands = [l for l in lines if l.strip() and not l.lstrip().startswith("#")]
        assert len(commands) <= 4, f"{path.name}: logic belongs in slurm/train.sbatch: {commands}"
        assert commands[0].startswith('DATA="${DATA:-'), path.name
        assert commands[1].startswith("SCRIPT="), path.name
        assert commands[2].startswith(". ") and "/slurm/train.sbatch" in commands[2], path.name
        v = script_vars(path)
        assert set(v) == {"SCRIPT", "CONFIG", "DATASET"}, path.name
        top = "\n".join(lines[:10])
        for what in ("##SBATCH --partition=", "##SBATCH --account=", "--gpus-per-node=", "--time="):
            assert what in top, f"{path.name}: {what} not among the first lines"
        assert f"--job-name={path.stem} " in path.read_text(), path.name


def test_train_sbatch_direct_use_is_checked(tmp_path):
    env = launch_env(tmp_path / "nodata", tmp_path / "run")
    cases = [([], "usage: sbatch slurm/train.sbatch SCRIPT CONFIG"),
             (["nosuch", "train/configs/gaal_dvm.yaml"], "no train/nosuch.py"),
             (["gaal", "train/configs/nosuch.yaml"], "no config train/configs/nosuch.yaml"),
             (["train/gaal.py", "train/configs/gaal_dvm.yaml", "--config", "x.yaml"], "this script trains")]
    for args, message in cases:
        proc = subprocess.run(["bash", "slurm/train.sbatch", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "run").exists()


def test_submit_uses_only_public_submitit_api():
    """No private submitit name (job._interrupt(), job._process, JobEnvironment._usr_sig(), ...):
    the only `x._name` accesses left in submit.py are TrainRun's own, on `self`."""
    import ast
    tree = ast.parse((REPO / "slurm" / "submit.py").read_text())
    private = [f"{ast.unparse(n.value)}.{n.attr} (line {n.lineno})" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert not private, private
    text = (REPO / "slurm" / "submit.py").read_text()
    for name in ("_usr_sig", "_interrupt", "_process", "_handle_signals", "_checkpoint_function"):
        assert name not in text, name


def test_submit_help_and_dry_run_sweep(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "slurm/submit.py", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--sweep" in proc.stdout and "--cluster" in proc.stdout
    submit = load_submit()
    _, runs = submit.submit(["--script", "gaal", "--dry_run", "--sweep", "seed=0,1", "--sweep", "lr=1e-3,1e-4",
                             "--out_dir", str(tmp_path / "sw"), "--epochs", "2"])
    assert sorted(Path(out).name for out, _ in runs) == ["seed0_lr1e-3", "seed0_lr1e-4", "seed1_lr1e-3", "seed1_lr1e-4"]
    for out, argv in runs:
        assert argv[argv.index("--out_dir") + 1] == out
    assert submit.split_values("[image],[table]") == ["[image]", "[table]"]
    with pytest.raises(SystemExit, match="unknown config key 'bogus'"):
        submit.submit(["--script", "gaal", "--dry_run", "--bogus", "1"])


def test_submit_takes_every_script_and_names_runs_after_the_data_set(tmp_path, monkeypatch):
    """--script mla (a baseline) is accepted; a run whose --data is another data set than its
    config's is named after both (`mla_av_on_embedded_seq3`), the config's own is not."""
    data = embedded.generate(tmp_path / "data", "seq3", seed=3, n_train=64, n_val=32, n_test=32)
    monkeypatch.chdir(tmp_path)
    submit = load_submit()
    _, runs = submit.submit(["--script", "mla", "--dry_run", "--run_root", str(tmp_path / "runs"), "--data", str(data)])
    assert [Path(out).name for out, _ in runs] == ["mla_av_on_embedded_seq3"]
    _, runs = submit.submit(["--script", "ogm_ge", "--dry_run", "--run_root", str(tmp_path / "runs"),
                             "--config", "train/configs/ogm_ge_seq3.yaml", "--data", str(data)])
    assert [Path(out).name for out, _ in runs] == ["ogm_ge_seq3"]


# --------------------------------------------------------------------------------------------------
# the launcher without SLURM (runs anywhere): automatic --resume, finished runs left alone

@pytest.fixture(scope="module")
def tiny_imgtab(tmp_path_factory):
    return embedded.generate(tmp_path_factory.mktemp("data"), "imgtab", seed=5, n_train=256, n_val=64, n_test=64)


def launch_env(data, run_dir, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(DATA=str(data), RUN_DIR=str(run_dir), PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


@pytest.mark.slow
def test_launcher_outside_slurm_resumes_automatically(tiny_imgtab, tmp_path):
    run = tmp_path / "run"
    env = launch_env(tiny_imgtab, run)
    cmd = ["bash", "slurm/gaal_dvm.sh", *TINY_DVM]
    first = subprocess.run(cmd + ["--stop_after_steps", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stop_after_steps=3" in first.stdout and not (run / "result.json").exists()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "--resume" in second.stdout and resumed_from(second.stdout) == 3
    assert (run / "result.json").exists() and len((run / "slurm_jobs.log").read_text().splitlines()) == 4
    third = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert third.returncode == 0 and "already holds result.json" in third.stdout
    bad = subprocess.run(cmd + ["--out_dir", "x"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "set RUN_DIR" in bad.stderr


@pytest.mark.slow
def test_train_sbatch_used_directly_outside_slurm(tiny_imgtab, tmp_path):
    """`bash slurm/train.sbatch SCRIPT CONFIG flags`: the same launcher as the wrappers (DATASET from
    the config's data path when DATA is not set; here DATA_ROOT holds it)."""
    run = tmp_path / "run"
    env = launch_env(tiny_imgtab, run)
    del env["DATA"]
    env["DATA_ROOT"] = str(tiny_imgtab.parent)
    cmd = ["bash", "slurm/train.sbatch", "gaal", "train/configs/gaal_imgtab.yaml", *TINY_GAAL, "--epochs", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"--data {tiny_imgtab}" in proc.stdout and (run / "result.json").exists()


# --------------------------------------------------------------------------------------------------
# the cluster

def _ours(conf: str) -> bool:
    try:
        return "generated by scripts/slurm_cluster.sh" in Path(conf).read_text()
    except OSError:
        return False


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Environment for sbatch/squeue/scontrol talking to a one-node cluster of ours."""
    missing = [b for b in ("sbatch", "squeue", "scontrol", "slurmctld", "slurmd", "munged") if not shutil.which(b)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): "
                    "apt-get install -y slurmctld slurmd slurm-client munge (.ci/run does)")
    conf = os.environ.get("SLURM_CONF", "")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if conf and _ours(conf) and subprocess.run(["sinfo", "-h"], env=env, capture_output=True).returncode == 0:
        yield env
        return
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM cluster needs root (slurmd runs jobs as their users)")
    yield from private_cluster(env, "a SLURM cluster")


def private_cluster(env: dict, what: str, *start_args):
    """A cluster of scripts/slurm_cluster.sh of this test session's own (`start *start_args`, in a
    fresh directory under /tmp: munged must reach it, pytest's tmp is private): yields `env` with its
    SLURM_CONF, stops it and removes its directory afterwards; skips, saying why, when it cannot start."""
    cluster_dir = Path(tempfile.mkdtemp(prefix="slurm-test-", dir="/tmp"))
    start = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", *start_args, str(cluster_dir)], capture_output=True,
                           text=True, timeout=180)
    if start.returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(cluster_dir)], capture_output=True, timeout=180)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        pytest.skip(f"could not start {what}: {start.stdout[-1500:]} {start.stderr[-1500:]}")
    env["SLURM_CONF"] = str(cluster_dir / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(cluster_dir)], capture_output=True, timeout=180)
        shutil.rmtree(cluster_dir, ignore_errors=True)


def job_field(env, job_id, field):
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=env, capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else None


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def lift_requeue_hold(env, job_id):
    """SLURM holds a requeued job for about two minutes (BeginTime); start it in 3 s instead, once
    the old run has left the node (slurmd refuses to relaunch a job within the second it killed it)."""
    wait_for(lambda: subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], env=env, capture_output=True,
                                    text=True).stdout.strip() == "PENDING", 300, f"job {job_id} requeued and cleaned up")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+3"], env=env, check=True)


def requeue_now(env, job_id):
    subprocess.run(["scontrol", "requeue", str(job_id)], env=env, check=True)
    lift_requeue_hold(env, job_id)


def cancel(env, *job_ids):
    subprocess.run(["scancel", *map(str, job_ids)], env=env, capture_output=True)


@pytest.fixture(scope="module")
def sbatch_runs(cluster, tiny_imgtab, tmp_path_factory):
    """The same tiny command twice through `sbatch slurm/gaal_dvm.sh`: A uninterrupted; B requeued
    (scontrol requeue) once it has written its first checkpoint."""
    root = tmp_path_factory.mktemp("sbatch")
    jobs = {}
    for name in ("a", "b"):
        env = dict(cluster, **launch_env(tiny_imgtab, root / name), SLURM_CONF=cluster["SLURM_CONF"])
        proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15",
                               f"--output={root}/{name}-%j.out", "slurm/gaal_dvm.sh", *TINY_DVM],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        jobs[name] = proc.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: (root / "b" / "checkpoints" / "latest").exists()
                 or job_field(cluster, jobs["b"], "JobState") in TERMINAL, 300, "B's first checkpoint")
        requeue_now(cluster, jobs["b"])
        for job in jobs.values():
            wait_for(lambda: job_field(cluster, job, "JobState") in TERMINAL, 600, f"job {job} to end")
    finally:
        cancel(cluster, *jobs.values())
    return {name: dict(job=job, run=root / name, log=(root / f"{name}-{job}.out").read_text(),
                       state=job_field(cluster, job, "JobState"), restarts=job_field(cluster, job, "Restarts"))
            for name, job in jobs.items()}


@pytest.mark.slow
def test_sbatch_gaal_dvm_script_trains_under_slurm(sbatch_runs):
    a = sbatch_runs["a"]
    assert a["state"] == "COMPLETED", a["log"][-3000:]
    result = json.loads((a["run"] / "result.json").read_text())
    assert set(result["test"]) == {"image", "table", "fused"}
    assert f"[slurm] job {a['job']} restart 0 on 1 node(s) x 1 process(es)" in a["log"]
    assert "[slurm] finished" in a["log"] and "--resume" not in a["log"]
    assert f"job={a['job']}" in (a["run"] / "slurm_jobs.log").read_text()


@pytest.mark.slow
def test_sbatch_requeue_resumes_and_matches_uninterrupted_run(sbatch_runs):
    a, b = sbatch_runs["a"], sbatch_runs["b"]
    assert b["state"] == "COMPLETED" and b["restarts"] == "1", b["log"][-3000:]
    assert "DUE TO JOB REQUEUE" in b["log"] and f"[slurm] job {b['job']} restart 1" in b["log"]
    step = resumed_from(b["log"])
    assert 1 <= step < STEPS, f"resumed at step {step}: the requeue came after the end of training"
    assert_same_run(a["run"], b["run"])


@pytest.mark.slow
def test_sbatch_time_limit_signal_two_processes_checkpoint_requeue_resume(cluster, tiny_imgtab, tmp_path,
                                                                          sbatch_runs):
    """Two processes (accelerate launch --multi_gpu, gloo on CPU) and the time-limit path: SIGUSR1 to
    the batch shell (what `#SBATCH --signal=B:USR1@300` sends) -> forwarded -> checkpoint -> exit 0
    -> the script requeues the job -> it resumes and finishes. (After sbatch_runs: both CPUs free.)"""
    run = tmp_path / "run"
    env = dict(cluster, **launch_env(tiny_imgtab, run, NPROC_PER_NODE="2"), SLURM_CONF=cluster["SLURM_CONF"])
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", "--time=15",
                           f"--output={tmp_path}/%j.out", "slurm/gaal_dvm.sh", *TINY_DVM],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: (run / "checkpoints" / "latest").exists() or job_field(cluster, job, "JobState") in TERMINAL,
                 300, "the first checkpoint")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster, check=True)
        wait_for(lambda: job_field(cluster, job, "Restarts") == "1", 300, "the script to requeue its job")
        lift_requeue_hold(cluster, job)
        wait_for(lambda: job_field(cluster, job, "JobState") in TERMINAL, 600, f"job {job} to end")
    finally:
        cancel(cluster, job)
    log = (tmp_path / f"{job}.out").read_text()
    assert job_field(cluster, job, "JobState") == "COMPLETED", log[-4000:]
    assert "x 2 process(es)" in log and "[stop] SIGUSR1 at step" in log, log[-4000:]
    assert f"requeueing job {job}" in log and 1 <= resumed_from(log) < STEPS
    assert (run / "result.json").exists()


# --------------------------------------------------------------------------------------------------
# slurm/submit.py (submitit)

@pytest.fixture(scope="module")
def local_sweep(tiny_imgtab, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "gaal"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "slurm/submit.py", "--cluster", "local", "--script", "gaal",
                           "--sweep", "seed=0,1", "--cpus_per_task", "1", "--wait", "--data", str(tiny_imgtab),
                           "--out_dir", str(out), *TINY_GAAL], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_submit_local_sweep_runs_each_seed(local_sweep):
    results = {}
    for seed in (0, 1):
        run = local_sweep / f"seed{seed}"
        results[seed] = json.loads((run / "result.json").read_text())
        assert f"--seed {seed}" in (run / "submit.txt").read_text()
        assert (run / "config.yaml").exists()
    assert results[0]["test"] != results[1]["test"]   # different seeds, different runs


def _submit_interrupted(submit, cluster_name, tiny_imgtab, out, resubmit_hold=None):
    jobs, _ = submit.submit(["--cluster", cluster_name, "--script", "gaal", "--cpus_per_task", "1", "--time", "30",
                             "--data", str(tiny_imgtab), "--out_dir", str(out), *TINY_GAAL, "--seed", "0"])
    job = jobs[0]
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").exists() or job.done(), 300, "the first checkpoint")
        submit.interrupt(job)
        if resubmit_hold:
            resubmit_hold(job.job_id)
        wait_for(lambda: (out / "result.json").exists() or job.state in TERMINAL + ("FINISHED", "INTERRUPTED"),
                 600, "the job to finish")
        result = job.result()
    finally:
        job.cancel(check=False)
    return job, result


@pytest.mark.slow
def test_submit_local_interrupt_requeues_and_resumes_exactly(local_sweep, tiny_imgtab, tmp_path):
    submit = load_submit()
    out = tmp_path / "interrupted"
    job, result = _submit_interrupted(submit, "local", tiny_imgtab, out)
    log = Path(job.paths.stdout).read_text()
    assert "Requeued job" in log and "--resume" in log
    assert 1 <= resumed_from(log) < STEPS
    assert result["test"] == json.loads((out / "result.json").read_text())["test"]
    assert_same_run(local_sweep / "seed0", out)


@pytest.mark.slow
def test_submit_slurm_interrupt_requeues_and_resumes_exactly(cluster, local_sweep, tiny_imgtab, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    submit = load_submit()
    out = tmp_path / "interrupted"

    def lift_hold(job_id):   # submitit requeues with scontrol requeue
        wait_for(lambda: job_field(cluster, job_id, "Restarts") == "1", 300, "the requeue")
        lift_requeue_hold(cluster, job_id)

    job, result = _submit_interrupted(submit, "slurm", tiny_imgtab, out, lift_hold)
    log = Path(job.paths.stdout).read_text()
    assert "Requeued job" in log and job_field(cluster, job.job_id, "Restarts") == "1"
    assert 1 <= resumed_from(log) < STEPS
    assert_same_run(local_sweep / "seed0", out)
