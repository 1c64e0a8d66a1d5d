"""Launches that would not give the user the processes asked for are refused before any compute,
and a 2-process run stopped by SIGTERM checkpoints and ends the way the README promises.

- `accelerate launch --cpu --num_processes N` (or N > 1 without --multi_gpu on a machine without
  GPUs) starts ONE process: refused, from that process's own environment (Accelerate's one-process
  launcher sets MASTER_PORT but no WORLD_SIZE), naming what to run instead;
- DeepSpeed with several processes and no CUDA (Accelerate would join 1, DeepSpeed sees N): refused;
- SIGTERM to a 2-process run: every training process checkpoints at the next step boundary and
  exits 0. Started through slurm/node.sh (what slurm/train.sbatch and the sbatch scripts run, in or
  outside SLURM), the launcher exits 0 too, whether the signal reaches the launcher alone, its
  process group, or every process (SLURM). A bare `accelerate launch --multi_gpu` exits 1 (torch's
  elastic agent re-raises the signal as SignalException); its checkpoint is just as complete.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_prep import embedded
from tests.test_train import SEQ_ENCODER, final_weights, free_port
from train import config, distributed

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 60   # 4 steps per epoch: long enough that a SIGTERM after the first epoch lands mid-run


@pytest.fixture(scope="module")
def seq3_small(tmp_path_factory):
    """256 training samples: 4 steps per epoch at batch 64."""
    return embedded.generate(tmp_path_factory.mktemp("data"), "seq3", seed=3, n_train=256, n_val=64, n_test=64)


def model_args(*extra, epochs=1):
    """train/configs/joint_seq3.yaml made tiny."""
    args = ["--epochs", str(epochs), "--batch_size", "64", "--eval_batch_size", "64", "--progress", "false"]
    for m in ("text", "audio", "vision"):
        for key, value in SEQ_ENCODER.items():
            args += [f"--encoders.{m}.{key}", str(value)]
    return args + list(extra)


def tiny_args(data, out, *extra, epochs=1):
    return ["--config", "train/configs/joint_seq3.yaml", "--data", str(data), "--out_dir", str(out),
            *model_args(*extra, epochs=epochs)]


def script_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "ACCELERATE_", "PET_", "TORCHELASTIC_"))
           and k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def accelerate_launch(*launch_args):
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port", str(free_port())]


def run(cmd, timeout=120, **env):
    return subprocess.run(cmd, cwd=REPO, env=script_env(**env), capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# (a) `accelerate launch --cpu --num_processes N`: one process for N

CPU_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_machines: 1
num_processes: 2
use_cpu: true
mixed_precision: 'no'
"""
WITH_CPU = "with --cpu (or use_cpu: true in its config) it never starts more than one"


@pytest.mark.parametrize("launch, how", [
    (["--cpu", "--num_processes", "2"], WITH_CPU),
    (["--num_processes", "3"], "without --multi_gpu (and without several GPUs) it never starts more than one"),
    (["--config_file", "{cpu_config}"], WITH_CPU),
])
@pytest.mark.slow
def test_one_process_for_several_is_refused_before_compute(launch, how, seq3_small, tmp_path):
    if torch.cuda.device_count() > 1:
        pytest.skip("with several GPUs accelerate launch turns on --multi_gpu by itself")
    cpu_config = tmp_path / "cpu2.yaml"
    cpu_config.write_text(CPU_CONFIG)
    launch = [a.format(cpu_config=cpu_config) for a in launch]
    out = tmp_path / "run"
    proc = run(accelerate_launch(*launch) + ["train/joint.py", *tiny_args(seq3_small, out)])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error: accelerate launch was asked" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"asked for several processes but started ONE: {how}" in errors[0]
    assert "accelerate launch --multi_gpu --num_processes N train/joint.py" in errors[0]
    assert "torchrun --nproc_per_node N train/joint.py" in errors[0]
    assert not out.exists()   # refused before the run directory (or any compute)


@pytest.mark.slow
def test_one_process_launches_still_train(seq3_small, tmp_path):
    """Accelerate's own console script with --cpu and one process, and a plain `python` run with
    MASTER_ADDR/MASTER_PORT exported (what slurm/node.sh gives a one-process job)."""
    exe = Path(sys.executable).parent / "accelerate"
    launcher = [str(exe), "launch"] if exe.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    proc = run(launcher + ["--cpu", "--num_processes", "1", "train/joint.py", *tiny_args(seq3_small, tmp_path / "a")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "a" / "result.json").exists()
    proc = run([sys.executable, "train/joint.py", *tiny_args(seq3_small, tmp_path / "b")], MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]


# the same decision in-process: it reads only this process's environment

@pytest.fixture
def one_for_several(monkeypatch):
    """The environment Accelerate's one-process launcher gives its process when asked for several."""
    for key in (*distributed.WORLD_SIZE_VARIABLES, "RANK", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setattr(sys, "argv", ["train/gaal.py"])
    return monkeypatch


def test_one_process_for_several_is_read_from_the_environment(one_for_several):
    with pytest.raises(config.ConfigError, match=r"asked for several processes but started ONE: with --cpu.*"
                                                 r"accelerate launch --multi_gpu --num_processes N train/gaal.py.*"
                                                 r"torchrun --nproc_per_node N train/gaal.py.*python train/gaal.py"):
        distributed.check_launch()
    one_for_several.setenv("ACCELERATE_USE_CPU", "False")   # --num_processes N without --multi_gpu, no GPUs
    with pytest.raises(config.ConfigError, match="started ONE: without --multi_gpu"):
        distributed.check_launch()


@pytest.mark.parametrize("change", [
    {"MASTER_PORT": None},                     # one process asked for: the launcher sets no MASTER_PORT
    {"ACCELERATE_USE_CPU": None},              # python or torchrun, MASTER_PORT exported
    {"WORLD_SIZE": "2"},                       # a multi-process launcher (torchrun, --multi_gpu)
    {"OMPI_COMM_WORLD_SIZE": "2"},             # mpirun (a MULTI_CPU config with a hostfile)
])
def test_launches_that_give_the_processes_asked_for_pass(one_for_several, change):
    for key, value in change.items():
        if value is None:
            one_for_several.delenv(key)
        else:
            one_for_several.setenv(key, value)
    distributed.check_launch()


def test_accelerate_must_join_every_launched_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setattr(sys, "argv", ["train/igm.py"])
    with pytest.raises(config.ConfigError, match="each process would train alone as rank 0.*"
                                                 "accelerate launch --multi_gpu --num_processes 2 train/igm.py"):
        distributed.check_world_size(SimpleNamespace(num_processes=1))
    distributed.check_world_size(SimpleNamespace(num_processes=2))


# --------------------------------------------------------------------------------------------------
# (c) DeepSpeed with several processes on a machine without CUDA

@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), ("yes", True),
                                             ("false", False), ("0", False), ("", False)])
def test_deepspeed_requested_reads_the_flag_like_accelerate(value, expected, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", value)
    assert distributed.deepspeed_requested() is expected


def test_multi_rank_deepspeed_without_cuda_is_refused_in_process(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["train/joint.py"])
    with pytest.raises(config.ConfigError, match="DeepSpeed with 2 processes on a machine without CUDA"):
        distributed.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_launch()   # one DeepSpeed process on CPU is fine


@pytest.mark.slow
def test_multi_rank_deepspeed_on_cpu_is_refused_before_compute(seq3_small, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (multi-rank DeepSpeed works on GPUs)")
    probe = run([sys.executable, "-c", "import deepspeed, transformers"], timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"deepspeed/transformers cannot be imported: {probe.stderr.strip().splitlines()[-1:]}")
    out = tmp_path / "run"
    proc = run(accelerate_launch("--config_file", "train/configs/accelerate/deepspeed_zero2.yaml",
                                 "--num_processes", "2") + ["train/joint.py", *tiny_args(seq3_small, out)], timeout=300)
    assert proc.returncode != 0
    assert "error: DeepSpeed with 2 processes on a machine without CUDA: multi-process DeepSpeed" in proc.stderr, \
        proc.stderr[-3000:]
    assert "--num_processes 1" in proc.stderr
    assert "accelerate launch --multi_gpu --num_processes 2 train/joint.py" in proc.stderr
    assert "Accelerate sees" not in proc.stderr and "not `--cpu`" not in proc.stderr   # the old, misleading text
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# (b) SIGTERM to a 2-process run

def descendants(pid):
    """Every process below `pid`, from the process table `ps` prints."""
    table = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True, check=True)
    children = {}
    for line in table.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc):
    """SIGKILL what is left of a test's launch: its session and the training processes (which torch
    starts in sessions of their own)."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def start(cmd, log, **env):
    """Start `cmd` in a session of its own (setsid), stdout+stderr to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=script_env(**env), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def wait_for_text(proc, log, text, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in Path(log).read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before '{text}':\n{Path(log).read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no '{text}' after {timeout} s:\n{Path(log).read_text()[-3000:]}")


def send_sigterm(proc, target):
    if target == "launcher":      # kill -TERM <pid>
        os.kill(proc.pid, signal.SIGTERM)
    elif target == "group":       # kill -TERM -- -<pgid>  (setsid: pgid == pid)
        os.killpg(proc.pid, signal.SIGTERM)
    elif target == "every":       # what slurmstepd does: every process of the step, whatever its session
        pids = descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def stopped_at(log):
    steps = set(re.findall(r"\[stop\] SIGTERM at step (\d+): checkpoint written", Path(log).read_text()))
    assert len(steps) == 1, Path(log).read_text()[-3000:]   # both ranks stopped at the same step
    return int(steps.pop())


def assert_checkpoint(run_dir, step):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"ckpt-{step:09d}"
    state = torch.load(run_dir / "checkpoints" / latest / "state.pt", weights_only=False)
    assert state["world_size"] == 2 and state["trainer"]["step"] == step
    assert {p.name for p in (run_dir / "checkpoints" / latest).glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert not (run_dir / "result.json").exists()


def through_sbatch_wrapper(data, run_dir, *extra, epochs=EPOCHS):
    """`bash slurm/joint_seq3.sh` outside SLURM on 2 processes: slurm/train.sbatch -> slurm/node.sh ->
    accelerate launch --multi_gpu (resumes by itself when run_dir holds a checkpoint)."""
    cmd = ["bash", "slurm/joint_seq3.sh", *model_args(*extra, epochs=epochs)]
    env = dict(DATA=str(data), RUN_DIR=str(run_dir), PYTHON=sys.executable, NPROC_PER_NODE="2",
               MASTER_PORT=str(free_port()))
    return cmd, env


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "group", "every"])
def test_sigterm_two_processes_through_node_sh_exits_0_and_resumes(target, seq3_small, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    cmd, env = through_sbatch_wrapper(seq3_small, run_dir)
    proc = start(cmd, log, **env)
    try:
        wait_for_text(proc, log, "epoch 1/")
        send_sigterm(proc, target)
        assert proc.wait(timeout=90) == 0, Path(log).read_text()[-3000:]
    finally:
        kill_tree(proc)
    step = stopped_at(log)
    assert 4 <= step < 4 * EPOCHS
    assert_checkpoint(run_dir, step)
    # the same command again resumes (train.sbatch adds --resume) and continues: here for two steps
    cmd, env = through_sbatch_wrapper(seq3_small, run_dir, "--stop_after_steps", str(step + 2))
    again = run(cmd, timeout=120, **env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "--resume" in again.stdout and f"[resume] from step {step} " in again.stdout
    assert f"stop_after_steps={step + 2} at step {step + 2}" in again.stdout
    assert_checkpoint(run_dir, step + 2)


@pytest.mark.slow
def test_sigterm_two_processes_resume_is_exact(seq3_small, tmp_path):
    """SIGTERM to the launcher (node.sh) of a 2-process run, then the same command: the resumed run
    ends bit-identical to an uninterrupted 2-process one, and every launch exits 0."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    cmd, env = through_sbatch_wrapper(seq3_small, whole, epochs=20)
    proc = run(cmd, timeout=120, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cmd, env = through_sbatch_wrapper(seq3_small, split, epochs=20)
    log = tmp_path / "split.log"
    proc = start(cmd, log, **env)
    try:
        wait_for_text(proc, log, "epoch 1/")
        send_sigterm(proc, "launcher")
        assert proc.wait(timeout=90) == 0, Path(log).read_text()[-3000:]
    finally:
        kill_tree(proc)
    if (split / "result.json").exists():
        pytest.skip("the run ended before the signal arrived")
    step = stopped_at(log)
    proc = run(cmd, timeout=120, **env)
    assert proc.returncode == 0 and f"[resume] from step {step} " in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = final_weights(whole), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (whole, split))
    assert ra["test"] == rb["test"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "group"])
def test_sigterm_bare_accelerate_launch_checkpoints_but_exits_1(target, seq3_small, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` started by hand: torch's elastic agent passes
    SIGTERM on (its workers run in sessions of their own: a group signal reaches only the agent),
    waits for them (at most 30 s), then re-raises it: exit 1 with a SignalException traceback. The
    training processes have checkpointed and exited 0 by then; --resume continues."""
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    launch = accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                               "--mixed_precision", "no", "--dynamo_backend", "no")
    proc = start(launch + ["train/joint.py", *tiny_args(seq3_small, run_dir, epochs=EPOCHS)], log)
    try:
        wait_for_text(proc, log, "epoch 1/")
        send_sigterm(proc, target)
        rc = proc.wait(timeout=90)
    finally:
        kill_tree(proc)
    text = Path(log).read_text()
    assert rc == 1 and "SignalException" in text, text[-3000:]
    assert "exitcode" not in text   # no worker failed: the agent only re-raised the signal
    step = stopped_at(log)
    assert_checkpoint(run_dir, step)
    again = run(accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                                  "no", "--dynamo_backend", "no") +
                ["train/joint.py", *tiny_args(seq3_small, run_dir, "--resume", "--stop_after_steps", str(step + 2),
                                              epochs=EPOCHS)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[resume] from step {step} " in again.stdout
    assert_checkpoint(run_dir, step + 2)
