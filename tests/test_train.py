"""Tiny real trainings end to end: the baselines, exact resume, atomic checkpoints, DDP = 1 process."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_prep import embedded
from train import checkpoint

REPO = Path(__file__).resolve().parent.parent
SEQ_ENCODER = {"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.1}


@pytest.fixture(scope="module")
def seq3_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return embedded.generate(root, "seq3", seed=3, n_train=512, n_val=128, n_test=128)


@pytest.fixture(scope="module")
def imgtab_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return embedded.generate(root, "imgtab", seed=3, n_train=256, n_val=64, n_test=64)


def seq3_args(data, out, *extra):
    args = ["--config", "train/configs/joint_seq3.yaml", "--data", str(data), "--out_dir", str(out), "--epochs", "2", "--batch_size", "64",
            "--eval_batch_size", "100", "--log_every", "3", "--progress", "false"]
    for m in ("text", "audio", "vision"):
        for key, value in SEQ_ENCODER.items():
            args += [f"--encoders.{m}.{key}", str(value)]
    return args + list(extra)


def run_script(script, args, nproc=1, env_extra=None, check=True, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    if nproc == 1:
        cmd = [sys.executable, str(REPO / script)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / script)]
    # its own session: a run that outlives `timeout` (a hang) is killed with every process it started
    with subprocess.Popen(cmd + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.communicate()
            raise
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(run_dir):
    name = (Path(run_dir) / "checkpoints" / "latest").read_text().strip()
    return torch.load(Path(run_dir) / "checkpoints" / name / "state.pt", weights_only=False)["model"]


@pytest.mark.slow
def tb_scalars(run_dir: Path) -> dict:
    """{tag: {step: value}} of a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def tb_tags(run_dir) -> set:
    """The scalar tags of a run's TensorBoard events."""
    return set(tb_scalars(run_dir))


def test_joint_trains_and_reports(seq3_data, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train/joint.py", seq3_args(seq3_data, out))
    result = json.loads((out / "result.json").read_text())
    assert set(result["test"]) == {"text", "audio", "vision", "fused"}
    assert result["test"]["fused"]["acc"] > 0.5  # chance is 1/8
    assert "Bayes limit" in proc.stdout and f"tensorboard --logdir {out}/tb" in proc.stdout
    assert (out / "config.yaml").exists() and (out / "best.pt").exists()
    tags = set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    for ev in (out / "tb").iterdir():
        acc = EventAccumulator(str(ev))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for m in ("text", "audio", "vision"):
        for kind in ("loss", "acc", "grad_norm_encoder", "cos_head_grad_own_vs_fused"):
            assert f"{m}/{kind}" in tags
    # a fresh run refuses to overwrite a run directory that holds checkpoints
    again = run_script("train/joint.py", seq3_args(seq3_data, out), check=False)
    assert again.returncode == 2 and "holds a previous run's files (checkpoints, config.yaml" in again.stderr
    assert "it is finished (result.json): choose another --out_dir" in again.stderr and "Traceback" not in again.stderr
    assert "--resume" not in again.stderr   # a finished run is not continued: no invitation to
    again = run_script("train/joint.py", seq3_args(seq3_data, out, "--resume"), check=False)
    assert again.returncode == 2 and "finished: result.json holds its result" in again.stderr


@pytest.mark.slow
def test_unimodal_trains_each_modality(imgtab_data, tmp_path):
    out = tmp_path / "uni"
    run_script("train/unimodal.py", ["--data", str(imgtab_data), "--out_dir", str(out), "--epochs", "1",
                                     "--batch_size", "64", "--progress", "false"])
    for m in ("image", "table"):
        result = json.loads((out / m / "result.json").read_text())
        assert set(result["test"]) == {m, "fused"}


@pytest.mark.slow
def test_resume_is_exact(seq3_data, tmp_path):
    """Stopped mid-epoch (8 steps per epoch, stop at 11) and resumed == uninterrupted, bit for bit."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script("train/joint.py", seq3_args(seq3_data, whole))
    stopped = run_script("train/joint.py", seq3_args(seq3_data, split, "--stop_after_steps", "11"))
    assert "stop_after_steps=11 at step 11" in stopped.stdout
    run_script("train/joint.py", seq3_args(seq3_data, split, "--resume"))
    a, b = final_weights(whole), final_weights(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((whole / "result.json").read_text())
    rb = json.loads((split / "result.json").read_text())
    assert ra["test"] == rb["test"]


@pytest.mark.slow
def test_ddp_two_ranks_match_one(seq3_data, tmp_path):
    """2 ranks x 32 == 1 rank x 64 (no BatchNorm, dropout off): same weights, same metrics.

    SGD, because Adam divides by sqrt(v): the attention key bias has a mathematically zero gradient
    (softmax ignores a constant shift), and Adam blows its 1e-10 round-off up to lr-sized steps."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = ("--optimizer", "sgd", "--lr", "0.05","--encoders.text.dropout", "0.0", "--encoders.audio.dropout", "0.0", "--encoders.vision.dropout", "0.0")
    run_script("train/joint.py", seq3_args(seq3_data, one, *args))
    proc = run_script("train/joint.py", seq3_args(seq3_data, two, *args), nproc=2)
    a, b = final_weights(one), final_weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    ra = json.loads((one / "result.json").read_text())
    rb = json.loads((two / "result.json").read_text())
    for split in ("val", "test"):
        for m in ra[split]:
            assert rb[split][m]["acc"] == pytest.approx(ra[split][m]["acc"], abs=1 / 128 + 1e-9)
    assert torch.load(two / "checkpoints" / (two / "checkpoints" / "latest").read_text().strip() / "state.pt",
                      weights_only=False)["world_size"] == 2, proc.stdout


GUARD_SCRIPT = """
from accelerate import Accelerator
from train import checkpoint, distributed
distributed.check_world_size(Accelerator(cpu=False))
"""


@pytest.mark.slow
def test_silent_rank0_clones_are_refused(tmp_path):
    """Without cpu=True on a CUDA-less machine, 2 launched processes each think they are rank 0 of 1."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    script = tmp_path / "guard.py"
    script.write_text(GUARD_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(script)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert "each process would train alone as rank 0" in proc.stderr


@pytest.mark.slow
def test_joint_select_metric(seq3_data, tmp_path):
    """select_metric: macro_f1 keeps the epoch of the highest validation macro-F1; a name that is not
    a metric, or macro_f1 on a regression set, is refused before any compute."""
    out = tmp_path / "f1"
    run_script("train/joint.py", seq3_args(seq3_data, out, "--epochs", "3", "--select_metric", "macro_f1"))
    result = json.loads((out / "result.json").read_text())
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    f1 = [e["val"]["fused"]["macro_f1"] for e in epochs if "val" in e]
    assert result["select_metric"] == "macro_f1" and result["best_epoch"] == f1.index(max(f1)) + 1
    proc = run_script("train/joint.py", seq3_args(seq3_data, tmp_path / "bad", "--select_metric", "f1"), check=False)
    assert proc.returncode == 2 and "select_metric='f1'" in proc.stderr and not (tmp_path / "bad").exists()


def test_bad_data_is_refused_before_compute(seq3_data, tmp_path):
    proc = run_script("train/joint.py", seq3_args(tmp_path / "nowhere", tmp_path / "r"), check=False)
    assert proc.returncode != 0 and "no meta.json there" in proc.stderr
    proc = run_script("train/joint.py", seq3_args(seq3_data, tmp_path / "r", "--modalities", "[smell]"), check=False)
    assert proc.returncode != 0 and "smell" in proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------
# checkpoints survive a kill at any moment

SAVER = """
import itertools
from pathlib import Path
import torch
from accelerate import Accelerator
from train import checkpoint, distributed
acc = Accelerator(cpu=True)
model = torch.nn.Linear(512, 512)
opt = torch.optim.Adam(model.parameters())
for step in itertools.count(1):
    with torch.no_grad():
        model.weight.fill_(step)
    checkpoint.save_checkpoint(Path({run!r}), acc, {{"model": model, "optimizer": opt}}, {{"step": step}}, keep=2)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_checkpoint_survives_sigkill(tmp_path):
    """A saver process writes checkpoints in a loop and is SIGKILLed at several moments; each time,
    `latest` must name a complete checkpoint that loads, with the weights of the step it claims."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(run=str(tmp_path / "run")))
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    for delay in (0.0, 0.013, 0.037, 0.071, 0.12, 0.2):
        proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
        assert proc.stdout.readline().strip() == "1"   # the first checkpoint of this process is complete
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = torch.nn.Linear(512, 512)
        opt = torch.optim.Adam(model.parameters())
        state = checkpoint.load_checkpoint(tmp_path / "run", acc, {"model": model, "optimizer": opt})
        assert torch.all(model.weight == state["step"])


@pytest.mark.slow
def test_nan_loss_stops_the_run_loudly(seq3_data, tmp_path):
    """An absurd learning rate makes the loss non-finite within a few steps: the run must fail with
    an error naming the step, and leave no checkpoint written after the NaN."""
    out = tmp_path / "nan"
    proc = run_script("train/joint.py", seq3_args(seq3_data, out, "--optimizer", "sgd", "--lr", "1e12",
                                                  "--log_every", "2"), check=False)
    assert proc.returncode != 0
    assert "error: non-finite loss at or before step 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_exact(seq3_data, tmp_path):
    """SIGTERM (SLURM's warning) mid-run: checkpoint at the next step boundary, exit 0, and the
    resumed run ends bit-identical to an uninterrupted one."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script("train/joint.py", seq3_args(seq3_data, whole))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train/joint.py"), *seq3_args(seq3_data, split, "--log_every", "1")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tb = split / "tb"
    deadline = time.time() + 120
    while not (tb.exists() and any(tb.iterdir())) and time.time() < deadline:
        time.sleep(0.05)
    # TensorBoard opens at the first scalar: with --log_every 1 the run is past its first step now
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "[stop] SIGTERM at step" in stdout
    assert not (split / "result.json").exists()
    run_script("train/joint.py", seq3_args(seq3_data, split, "--resume"))
    a, b = final_weights(whole), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_no_progress_bar_off_a_terminal_and_a_warning_for_few_log_points(seq3_data, tmp_path):
    """stderr piped (a SLURM log): no tqdm redraws even with progress on; a run that would log its
    training diagnostics fewer than 10 times says so, with a log_every that gives ~20 points."""
    proc = run_script("train/joint.py", seq3_args(seq3_data, tmp_path / "run", "--epochs", "1", "--progress", "true"))
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr[-2000:]
    assert "warning: log_every=3: this run logs its training diagnostics 2 time(s) over its 8 steps; " \
           "--log_every 1 gives ~20 points" in proc.stderr, proc.stderr
