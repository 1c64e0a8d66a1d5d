"""Two nodes for real: slurm/*.sh and slurm/submit.py on a two-node SLURM cluster on this machine
(`bash scripts/slurm_cluster.sh start --nodes 2`: node1 and node2, each a slurmd in its own network
and UTS namespace, partition `multi`), CPU, gloo, one process per node, tiny embedded data.

- a two-node run (sbatch of a real wrapper; submit.py --nodes 2) equals a one-process run at the
  same global batch, within the tolerance of the one-host N-ranks test (joint; IGM, whose
  statistics are all-reduced by hand);
- `scontrol requeue` and the time-limit signal (USR1) stop both nodes at the same step with one
  checkpoint; the requeued job resumes on two nodes and ends bit-exactly where the uninterrupted
  two-node run ends;
- one node lost mid-run (its training process SIGKILLed): the job fails with srun's error naming
  the node; the resubmission resumes from the last complete checkpoint, bit-exactly;
- the run directory, data and logs (one shared disk) are written once, by the main process of node 0.

The cluster named by SLURM_CONF is used when scripts/slurm_cluster.sh generated it with a `multi`
partition of two idle nodes (.ci/run starts one); else a private one is started for the session
(root, namespaces) and stopped at the end; where neither works the tests skip and say why.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep import embedded
from tests.test_slurm import (TERMINAL, _ours, job_field, launch_env, lift_requeue_hold, private_cluster,
                              resumed_from, wait_for)
from tests.test_train import SEQ_ENCODER, final_weights, run_script, tb_scalars

REPO = Path(__file__).resolve().parent.parent
EPOCHS = 24   # 4 steps per epoch at batch 64: long enough to interrupt twice
SGD = ["--optimizer", "sgd", "--lr", "0.05"]   # Adam turns 1e-10 round-off in a zero gradient into lr-sized steps


def sequence_encoders(*modalities):
    return "{" + ", ".join(f"{m}: {{d_model: {SEQ_ENCODER['d_model']}, n_layers: 1, n_heads: 2, dropout: 0.0}}"
                           for m in modalities) + "}"


# one process or two nodes, the same run: the wrapper's script and config, then these flags
RUNS = {
    "joint": ("slurm/joint_seq3.sh", "train/joint.py", "train/configs/joint_seq3.yaml",
              [*SGD, "--encoders", sequence_encoders("text", "audio", "vision")]),
    "igm": ("slurm/igm_av.sh", "train/igm.py", "train/configs/igm_av.yaml",
            [*SGD, "--modalities", "[text, audio]", "--mixup_alpha", "0", "--stage_epochs", "[1, 1]",
             "--encoders", sequence_encoders("text", "audio")]),
}


def flags(name, epochs=2):
    args = RUNS[name][3] + ["--batch_size", "64", "--eval_batch_size", "64", "--log_every", "1", "--progress", "false",
                            "--ckpt_every_steps", "1", "--preempt_check_every", "1"]
    return args + ([] if name == "igm" else ["--epochs", str(epochs)])


@pytest.fixture(scope="module")
def seq3_small(tmp_path_factory):
    """256 training samples: 4 steps per epoch at batch 64."""
    return embedded.generate(tmp_path_factory.mktemp("data"), "seq3", seed=3, n_train=256, n_val=64, n_test=64)


def multi_nodes_idle(env) -> int:
    out = subprocess.run(["sinfo", "-h", "-p", "multi", "-N", "-o", "%T"], env=env, capture_output=True, text=True)
    states = out.stdout.split() if out.returncode == 0 else []
    return len(states) if states and all(s == "idle" for s in states) else 0


@pytest.fixture(scope="session")
def two_nodes(tmp_path_factory):
    """Environment for sbatch/squeue/scontrol talking to a cluster with partition `multi` of 2 nodes."""
    missing = [b for b in ("sbatch", "squeue", "scontrol", "slurmctld", "slurmd", "munged", "ip", "unshare", "nsenter")
               if not shutil.which(b)]
    if missing:
        pytest.skip(f"a two-node cluster needs {', '.join(missing)}: apt-get install -y slurmctld slurmd "
                    "slurm-client munge iproute2 util-linux (.ci/run does)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    conf = os.environ.get("SLURM_CONF", "")
    if conf and _ours(conf) and multi_nodes_idle(env) >= 2:
        yield env
        return
    if os.geteuid() != 0:
        pytest.skip("starting a two-node SLURM cluster needs root (namespaces, slurmd)")
    yield from private_cluster(env, "a two-node SLURM cluster", "--nodes", "2")


def sbatch_two_nodes(env, name, data, run_dir, log_dir, *extra) -> str:
    wrapper = RUNS[name][0]
    proc = subprocess.run(["sbatch", "--parsable", "--partition=multi", "--nodes=2", "--gpus-per-node=0",
                           "--cpus-per-task=1", "--time=20", f"--output={log_dir}/%x-%j.out", wrapper, *extra],
                          cwd=REPO, env=launch_env(data, run_dir, SLURM_CONF=env["SLURM_CONF"]),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_for_first_checkpoint(env, job, run_dir: Path) -> None:
    wait_for(lambda: (run_dir / "checkpoints" / "latest").exists() or job_field(env, job, "JobState") in TERMINAL,
             300, "the first checkpoint")


def job_log(env, job) -> str:
    path = job_field(env, job, "StdOut")
    return Path(path).read_text() if path and Path(path).exists() else ""


def wait_until_done(env, job, timeout=600) -> str:
    return wait_for(lambda: (s := job_field(env, job, "JobState")) in TERMINAL and s, timeout, f"job {job} to end")


def one_process(name, data, run_dir, epochs=2):
    _, script, config, _ = RUNS[name]
    return run_script(script, ["--config", config, "--data", str(data), "--out_dir", str(run_dir),
                               *flags(name, epochs)], timeout=600)


def assert_close_runs(one: Path, two: Path):
    """What the one-host N-ranks test holds (tests/test_train.py::test_ddp_two_ranks_match_one):
    weights within rtol 1e-4 / atol 1e-5, accuracies within one sample; and the logged losses."""
    a, b = final_weights(one), final_weights(two)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    sa, sb = tb_scalars(one), tb_scalars(two)
    losses = [tag for tag in sa if tag.endswith("loss")]   # training (per step) and validation losses
    assert losses and set(losses) <= set(sb)
    for tag in losses:
        assert sa[tag].keys() == sb[tag].keys(), tag
        for step in sa[tag]:
            assert sb[tag][step] == pytest.approx(sa[tag][step], rel=1e-4, abs=1e-5), (tag, step)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (one, two))
    for split in ("val", "test"):
        for m in ra[split]:
            assert rb[split][m]["acc"] == pytest.approx(ra[split][m]["acc"], abs=1 / 64 + 1e-9), (split, m)
    return worst


def assert_written_once_by_node0(run_dir: Path, log: str):
    """Two nodes share the disk: one TensorBoard file, one metrics record per epoch, the lock taken on
    node1 (node 0), each rank's RNG file in the checkpoint, one launch line per job start."""
    assert "on 2 node(s) x 1 process(es)" in log and "main node1:" in log, log[-3000:]
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))
    assert " on node1" in (run_dir / ".lock").read_text()
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in latest.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert torch.load(latest / "state.pt", weights_only=False)["world_size"] == 2


@pytest.fixture(scope="module")
def joint_runs(two_nodes, seq3_small, tmp_path_factory):
    """The joint command of EPOCHS epochs: one process, and two nodes uninterrupted (the reference of
    the interrupted two-node runs)."""
    root = tmp_path_factory.mktemp("joint")
    one_process("joint", seq3_small, root / "one", epochs=EPOCHS)
    job = sbatch_two_nodes(two_nodes, "joint", seq3_small, root / "two", root, *flags("joint", EPOCHS))
    assert wait_until_done(two_nodes, job) == "COMPLETED", job_log(two_nodes, job)[-3000:]
    return root / "one", root / "two", job_log(two_nodes, job)


# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sbatch_two_nodes_equals_one_process_joint(two_nodes, joint_runs):
    one, two, log = joint_runs
    worst = assert_close_runs(one, two)
    assert_written_once_by_node0(two, log)
    print(f"[two nodes] joint: max |weight difference| to one process {worst:.2e}")


@pytest.mark.slow
def test_sbatch_two_nodes_equals_one_process_igm(two_nodes, seq3_small, tmp_path):
    """IGM: its head-input moments and SAM norms are all-reduced by hand, its stages restart from
    best.pt (a barrier on every rank) — across two hosts."""
    one_process("igm", seq3_small, tmp_path / "one")
    job = sbatch_two_nodes(two_nodes, "igm", seq3_small, tmp_path / "two", tmp_path, *flags("igm"))
    assert wait_until_done(two_nodes, job) == "COMPLETED", job_log(two_nodes, job)[-3000:]
    worst = assert_close_runs(tmp_path / "one", tmp_path / "two")
    assert_written_once_by_node0(tmp_path / "two", job_log(two_nodes, job))
    print(f"[two nodes] igm: max |weight difference| to one process {worst:.2e}")


@pytest.mark.slow
def test_submit_two_nodes_equals_one_process(two_nodes, joint_runs, seq3_small, tmp_path, monkeypatch):
    """slurm/submit.py --nodes 2 (submitit): one task per node, the torch distributed environment
    exported by submitit, the rendezvous on node1."""
    one, _, _ = joint_runs
    out = tmp_path / "two"
    proc = subprocess.run([sys.executable, "slurm/submit.py", "--cluster", "slurm", "--partition", "multi", "--nodes",
                           "2", "--tasks_per_node", "1", "--cpus_per_task", "1", "--time", "20", "--script", "joint",
                           "--wait", "--config", RUNS["joint"][2], "--data", str(seq3_small), "--out_dir", str(out),
                           *flags("joint", EPOCHS)], cwd=REPO, env=two_nodes, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    worst = assert_close_runs(one, out)
    assert torch.load(out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "state.pt",
                      weights_only=False)["world_size"] == 2
    print(f"[two nodes] submit.py joint: max |weight difference| to one process {worst:.2e}")


def stop_steps(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"\[stop\] SIG\w+ at step (\d+): checkpoint written", log)]


@pytest.mark.slow
def test_requeue_and_time_limit_on_two_nodes_resume_exactly(two_nodes, joint_runs, seq3_small, tmp_path):
    """`scontrol requeue` (SIGTERM to every process of the job), then, once it runs again, the
    time-limit signal (SIGUSR1 to the batch shell, as `--signal=B:USR1@300` sends it; train.sbatch
    forwards it and requeues the job itself): each time both nodes stop at one step with one
    checkpoint, the job resumes on two nodes, and it ends bit-exactly as the uninterrupted run."""
    _, reference, _ = joint_runs
    run = tmp_path / "run"
    job = sbatch_two_nodes(two_nodes, "joint", seq3_small, run, tmp_path, *flags("joint", EPOCHS))
    try:
        wait_for_first_checkpoint(two_nodes, job, run)
        subprocess.run(["scontrol", "requeue", job], env=two_nodes, check=True)
        lift_requeue_hold(two_nodes, job)
        wait_for(lambda: "[resume] from step" in job_log(two_nodes, job) or
                 job_field(two_nodes, job, "JobState") in TERMINAL, 300, "the requeued job to resume")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=two_nodes, check=True)
        wait_for(lambda: job_field(two_nodes, job, "Restarts") == "2" or
                 job_field(two_nodes, job, "JobState") in TERMINAL, 300, "the job to requeue itself")
        lift_requeue_hold(two_nodes, job)
        assert wait_until_done(two_nodes, job) == "COMPLETED"
    finally:
        subprocess.run(["scancel", job], env=two_nodes, capture_output=True)
    log = job_log(two_nodes, job)
    stops = stop_steps(log)
    resumes = [int(s) for s in re.findall(r"\[resume\] from step (\d+)", log)]
    # each node's first process reports its stop (and resume): both nodes stopped at the same step
    assert len(stops) == 4 and stops[0] == stops[1] and stops[2] == stops[3] and resumes == stops, log[-5000:]
    stops = stops[::2]
    assert "[stop] SIGTERM" in log and "[stop] SIGUSR1" in log and "requeueing job" in log
    assert log.count("on 2 node(s) x 1 process(es)") == 3
    a, b = final_weights(reference), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (reference, run))
    assert (ra["val"], ra["test"], ra["best_epoch"]) == (rb["val"], rb["test"], rb["best_epoch"])
    print(f"[two nodes] requeue at step {stops[0]}, time-limit signal at step {stops[1]}: bit-exact")


def training_pids(job: str, node_id: int, script: str) -> list[int]:
    """The processes of `job` on the node with SLURM_NODEID `node_id` that run `script`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and f"SLURM_NODEID={node_id}".encode() in environ \
                and any(arg.endswith(script.encode()) for arg in cmdline) and b"accelerate.commands.launch" not in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.slow
def test_a_lost_node_fails_the_job_naming_it_and_a_resubmission_resumes(two_nodes, joint_runs, seq3_small, tmp_path):
    _, reference, _ = joint_runs
    run = tmp_path / "run"
    job = sbatch_two_nodes(two_nodes, "joint", seq3_small, run, tmp_path, *flags("joint", EPOCHS))
    try:
        wait_for_first_checkpoint(two_nodes, job, run)
        victims = wait_for(lambda: training_pids(job, 1, "train/joint.py"), 60, "node2's training process")
        for pid in victims:
            os.kill(pid, 9)
        state = wait_until_done(two_nodes, job, timeout=300)
    finally:
        subprocess.run(["scancel", job], env=two_nodes, capture_output=True)
    log = job_log(two_nodes, job)
    assert state == "FAILED", (state, log[-3000:])
    assert re.search(r"srun: error: node2: task 1: ", log), log[-3000:]
    assert "[slurm] training failed on node2 (first failure: node2: task 1: " in log, log[-3000:]
    # the same command again: it resumes from the last complete checkpoint, on two nodes
    again = sbatch_two_nodes(two_nodes, "joint", seq3_small, run, tmp_path, *flags("joint", EPOCHS))
    assert wait_until_done(two_nodes, again) == "COMPLETED", job_log(two_nodes, again)[-3000:]
    assert resumed_from(job_log(two_nodes, again)) >= 1
    a, b = final_weights(reference), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()


# --------------------------------------------------------------------------------------------------
# a rendezvous that cannot be reached: one line naming the address and port, after RDZV_TIMEOUT
# (no cluster needed: slurm/node.sh as the second node of a job whose first node never started)

@pytest.mark.parametrize("address, message", [
    ("127.0.0.1", "rendezvous: nothing answered at 127.0.0.1:{port} (MASTER_ADDR:MASTER_PORT) within 3 s "
                  "(RDZV_TIMEOUT)"),
    ("no-such-node.invalid", "rendezvous: no-such-node.invalid (MASTER_ADDR) does not resolve on "),
])
@pytest.mark.slow
def test_an_unreachable_rendezvous_is_one_line_within_the_timeout(address, message, tmp_path):
    from tests.test_train import free_port
    port = free_port()   # nothing listens there
    env = dict(os.environ, PYTHON=sys.executable, NNODES="2", NPROC_PER_NODE="1", NUM_PROCESSES="2", SLURM_NODEID="1",
               MASTER_ADDR=address, MASTER_PORT=str(port), RDZV_TIMEOUT="3", PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", "slurm/node.sh", "train/joint.py", "--out_dir", str(tmp_path / "never")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[node ") and message.format(port=port) in lines[0], proc.stderr
    assert not (tmp_path / "never").exists()
