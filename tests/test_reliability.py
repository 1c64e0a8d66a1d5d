"""Reliability: several processes reach every collective on the same path, checkpoints are data
(never code), preemption with DataLoader workers, run directories are never silently reused, and a
refused input is one line before anything is written."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from data_prep import embedded
from tests.conftest import run_on_gloo_ranks
from tests.test_train import REPO, final_weights, run_script, seq3_args
from train import checkpoint, config, loop


@pytest.fixture(scope="module")
def seq3(tmp_path_factory):
    return embedded.generate(tmp_path_factory.mktemp("data"), "seq3", seed=3, n_train=512, n_val=128, n_test=128)


@pytest.fixture(scope="module")
def av(tmp_path_factory):
    return embedded.generate(tmp_path_factory.mktemp("data"), "av", seed=5, n_train=256, n_val=64, n_test=64)


def one_line_error(proc, *fragments):
    """The process refused its input: exit 2, one `error:` line naming what is wrong, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert len(errors) >= 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


# ------------------------------------------------------------------------------------------------
# IGM official on 2 processes: the stage restart (barrier, best.pt on a "cpu:0" device)

@pytest.mark.slow
def test_igm_official_stage_restarts_on_two_processes(av, tmp_path):
    """The first stage of one epoch (best.pt written at the very moment the other rank looks for
    it: it used to skip the barrier and deadlock) and a 2-process CPU device (`cpu:0`, which
    map_location could not restore); the run ends with a result on both."""
    out = tmp_path / "igm2"
    args = ["--data", str(av), "--out_dir", str(out), "--batch_size", "64", "--log_every", "2", "--progress", "false",
            "--encoders.audio.base_width", "8", "--encoders.video.base_width", "8", "--stage_epochs", "[1, 1]"]
    run_script("train/igm.py", args, nproc=2, timeout=300)   # a hang fails here instead of stalling CI
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1]
    assert set(json.loads((out / "result.json").read_text())["test"]) == {"audio", "video", "fused"}


def _nonfinite_on_rank(world, rank):
    flag = torch.tensor(rank == 1)   # only rank 1 saw a NaN
    try:
        loop.check_finite(flag, 10, SimpleNamespace(num_processes=world))
        return "went on"
    except loop.NonFiniteLossError:
        return "stopped"


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    """A rank that stopped alone would leave the others in their next collective."""
    assert run_on_gloo_ranks(_nonfinite_on_rank, tmp_path) == ["stopped", "stopped"]


# ------------------------------------------------------------------------------------------------
# checkpoints are data: a crafted pickle is refused, naming the file

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def stopped_run(seq3, tmp_path_factory):
    """A joint run checkpointed at step 3 (mid-epoch), kept pristine: tests copy it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run_script("train/joint.py", seq3_args(seq3, out, "--stop_after_steps", "3"))
    return out


def copy_run(run, dest):
    subprocess.run(["cp", "-a", str(run), str(dest)], check=True)
    return dest


def start_joint(args):
    """train/joint.py with `args` as a background process in a session of its own (its process group
    can be signalled), stdout and stderr piped; the caller waits for it or kills the group."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "train/joint.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.parametrize("victim", ["state.pt", "rng-rank0.pt"])
@pytest.mark.slow
def test_crafted_checkpoint_is_refused_and_runs_nothing(seq3, stopped_run, tmp_path, victim):
    run = copy_run(stopped_run, tmp_path / "run")
    marker = tmp_path / "code-ran"
    path = run / "checkpoints" / "ckpt-000000003" / victim
    original = torch.load(path, weights_only=False)
    original["trainer" if victim == "state.pt" else "python"] = RunsCode(marker)
    torch.save(original, path)
    config_before = (run / "config.yaml").read_bytes()
    proc = run_script("train/joint.py", seq3_args(seq3, run, "--resume"), check=False)
    one_line_error(proc, str(path), "refused", "weights_only=True")
    assert not marker.exists(), "the checkpoint ran a command"
    assert (run / "config.yaml").read_bytes() == config_before


@pytest.mark.slow
def test_garbage_rng_file_names_the_file(seq3, stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "run")
    path = run / "checkpoints" / "ckpt-000000003" / "rng-rank0.pt"
    path.write_bytes(os.urandom(512))
    one_line_error(run_script("train/joint.py", seq3_args(seq3, run, "--resume"), check=False), str(path))
    torch.save({"python": "not a state"}, path)   # loadable, but not an RNG state
    one_line_error(run_script("train/joint.py", seq3_args(seq3, run, "--resume"), check=False), str(path))


def test_plain_pickle_of_allowed_types_still_loads(tmp_path):
    """The allow-list is exactly the RNG state's numpy types: a real RNG state loads."""
    state = checkpoint._rng_state({"g": torch.Generator().manual_seed(3)})
    torch.save(state, tmp_path / "rng.pt")
    loaded = checkpoint.load_trusted(tmp_path / "rng.pt", checkpoint.RNG_STATE_GLOBALS)
    assert (loaded["numpy"][1] == state["numpy"][1]).all() and torch.equal(loaded["torch"], state["torch"])
    with pytest.raises(checkpoint.CheckpointError, match="rng.pt: refused"):
        checkpoint.load_trusted(tmp_path / "rng.pt")   # numpy arrays are not allowed by default
    with open(tmp_path / "raw.pt", "wb") as f:
        pickle.dump(RunsCode(tmp_path / "x"), f)
    with pytest.raises(checkpoint.CheckpointError, match="raw.pt: refused"):
        checkpoint.load_trusted(tmp_path / "raw.pt", checkpoint.RNG_STATE_GLOBALS)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# run directories: never silently reused; a rejected --resume changes nothing and says why

@pytest.mark.slow
def test_fresh_run_refuses_a_previous_runs_directory(seq3, stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "run")
    subprocess.run(["rm", "-r", str(run / "checkpoints")], check=True)
    before = {name: (run / name).read_bytes() for name in ("config.yaml",)}
    proc = run_script("train/joint.py", seq3_args(seq3, run), check=False)
    one_line_error(proc, f"out_dir={run}", "config.yaml", "tb", "no checkpoint to resume from")
    assert {name: (run / name).read_bytes() for name in before} == before
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_rejected_resume_says_what_differs_and_changes_nothing(seq3, stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "run")
    config_before = (run / "config.yaml").read_bytes()
    files_before = sorted(str(f.relative_to(run)) for f in run.rglob("*") if f.name != ".lock")
    # a flag that changes the run: refused before anything, naming the key, the run's value and the flag's
    proc = run_script("train/joint.py", seq3_args(seq3, run, "--resume", "--encoders.text.d_model", "32"), check=False)
    one_line_error(proc, "--encoders.text.d_model 32 (the run has 16", str(run / "config.yaml"))
    # a config.yaml edited by hand: the checkpoint does not fit the model it describes
    edited = yaml.safe_load(config_before)
    edited["encoders"]["text"]["d_model"] = 32
    (run / "config.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    proc = run_script("train/joint.py", seq3_args(seq3, run, "--resume", "--encoders.text.d_model", "32"), check=False)
    line = one_line_error(proc, "does not fit this run's model", "shapes differ")
    assert "[16]" in line and "[32]" in line
    (run / "config.yaml").write_bytes(config_before)
    # another script's checkpoint
    proc = run_script("train/cggm.py", ["--data", str(seq3), "--out_dir", str(run), "--resume", "--progress", "false"],
                      check=False)
    one_line_error(proc, str(run / "config.yaml"), "keys aux_weight are not keys of this script",
                   "trained by another script")
    assert (run / "config.yaml").read_bytes() == config_before
    assert sorted(str(f.relative_to(run)) for f in run.rglob("*") if f.name != ".lock") == files_before   # no new TensorBoard file


@pytest.mark.slow
def test_kill_between_metrics_line_and_checkpoint_leaves_no_duplicate_epoch(seq3, tmp_path):
    """What a kill leaves between the epoch-end metrics line and the epoch-end checkpoint: the
    record of epoch 1 on disk, the latest checkpoint at the last step of epoch 1 (written before
    the validation). The resumed run validates epoch 1 again: one record per epoch, as uninterrupted."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script("train/joint.py", seq3_args(seq3, whole))
    steps_per_epoch = 512 // 64
    run_script("train/joint.py", seq3_args(seq3, split, "--stop_after_steps", str(steps_per_epoch)))
    first = json.loads((whole / "metrics.jsonl").read_text().splitlines()[0])
    with open(split / "metrics.jsonl", "a") as f:   # the killed run's epoch-1 line, and a torn line
        f.write(json.dumps(first) + "\n" + '{"epoch": 2, "st')
    run_script("train/joint.py", seq3_args(seq3, split, "--resume"))
    epochs = [json.loads(line)["epoch"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert (split / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()


# ------------------------------------------------------------------------------------------------
# bad numbers are refused before a run directory exists

@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "-0.001", "lr=-0.001: must be > 0"),
    ("--weight_decay", "-1", "weight_decay=-1.0: must be >= 0"),
    ("--epochs", "-2", "epochs=-2: must be > 0"),
    ("--epochs", "0", "epochs=0: must be > 0"),
    ("--batch_size", "0", "batch_size=0: must be > 0"),
    ("--lr", "inf", "lr=inf: must be finite"),
    ("--lr", "nan", "lr=nan: must be finite"),
])
def test_bad_numbers_are_refused_before_the_run_directory(seq3, tmp_path, flag, value, message):
    out = tmp_path / "never"
    proc = run_script("train/joint.py", seq3_args(seq3, out, flag, value), check=False)
    one_line_error(proc, message)
    assert not out.exists()


def test_method_scripts_check_the_same_numbers():
    from train import cggm, gaal, igm
    for module in (gaal, igm, cggm):
        with pytest.raises(config.ConfigError, match="lr=-1.0: must be > 0"):
            config.load_config(module.CONFIG, ["--lr", "-1"], default_config=module.DEFAULT_CONFIG)
    with pytest.raises(config.ConfigError, match="clf_lr=-1.0"):
        config.load_config(cggm.CONFIG, ["--clf_lr", "-1"], default_config=cggm.DEFAULT_CONFIG)


# ------------------------------------------------------------------------------------------------
# preemption with DataLoader workers: SLURM signals the whole process group

@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_to_the_process_group_with_workers_checkpoints(seq3, tmp_path, stop_signal):
    """SIGTERM to every process of the job (training process AND its DataLoader workers), as SLURM
    sends it, or SIGINT, as Ctrl-C in a terminal sends it to the foreground group: the workers ignore
    it, the training process checkpoints at the next step boundary and exits 0 with one line (no
    traceback), and the resumed run ends bit-identical to an uninterrupted one."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    workers = ["--num_workers", "2", "--epochs", "6"]   # long enough to be stopped inside the training
    run_script("train/joint.py", seq3_args(seq3, whole, *workers))
    proc = start_joint(seq3_args(seq3, split, *workers, "--log_every", "1"))
    try:
        deadline, group = time.time() + 120, []
        while len(group) < 3 and time.time() < deadline and proc.poll() is None:   # the loader's workers are up
            time.sleep(0.1)
            group = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(group) >= 3, "the training process and its 2 workers"
        time.sleep(0.3)   # a few steps in
        os.killpg(proc.pid, stop_signal)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert f"[stop] {stop_signal.name} at step" in stdout and (split / "checkpoints" / "latest").exists()
    if stop_signal == signal.SIGINT:
        assert "[stop] Ctrl-C: checkpointing at the next step" in stderr
    run_script("train/joint.py", seq3_args(seq3, split, *workers, "--resume"))
    a, b = final_weights(whole), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ignore_stop_signals_in_a_worker():
    """What the DataLoader's worker_init_fn does, in a real child process."""
    code = ("import os, signal\n"
            "from train import data\n"
            "data.ignore_stop_signals(0)\n"
            "os.kill(os.getpid(), signal.SIGTERM); os.kill(os.getpid(), signal.SIGUSR1)\n"
            "print('alive')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", proc.stderr


# ------------------------------------------------------------------------------------------------
# sizes that cannot fit the data or this host's memory are refused before the model is built
# (issue 23, item 8): one `error: model:` line naming the key, nothing written

@pytest.mark.parametrize("key, value, fragments", [
    # seq3's text is stored as (16, 32): a 4e7-step position table would never be trained
    ("max_len", "40000000", ("'max_len' = 40000000", "stored length 16", "leave max_len unset")),
    # one 1e5-wide transformer layer: ~1.2e11 parameters, ~1.9 TB with gradients and Adam moments
    ("d_model", "100000", ("d_model=100000", "memory available")),
])
def test_sizes_that_cannot_fit_are_refused_before_the_model(seq3, tmp_path, key, value, fragments):
    out = tmp_path / "never"
    proc = run_script("train/joint.py", seq3_args(seq3, out, f"--encoders.text.{key}", value), check=False,
                      timeout=300)
    line = one_line_error(proc, "error: model: ", "'text'", "'sequence'", *fragments)
    assert [ln for ln in proc.stderr.splitlines() if "error: " in ln] == [line]
    assert not out.exists()


def test_a_missing_checkpoint_file_is_reported_missing(tmp_path):
    missing = tmp_path / "run" / "best.pt"
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_trusted(missing)
    message = str(err.value)
    assert message.startswith(f"{missing}: missing (") and "\n" not in message, message
    assert "not a checkpoint file" not in message and "Errno" not in message, message
    with pytest.raises(checkpoint.CheckpointError, match=r"rng-rank0\.pt: missing \("):
        checkpoint.load_trusted(tmp_path / "rng-rank0.pt", checkpoint.RNG_STATE_GLOBALS, mmap=True)
    # any other failure keeps its wording
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(checkpoint.CheckpointError, match="garbage.pt: refused: not a checkpoint file this code writes"):
        checkpoint.load_trusted(tmp_path / "garbage.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refused: not a checkpoint file this code writes"):
        checkpoint.load_trusted(tmp_path)   # a directory, not a missing file


# ------------------------------------------------------------------------------------------------
# checkpoints: a step saved twice never strands a run; a broken `latest` falls back (issue 23, item 1)

def checkpoint_saver(run):
    """(save(step, fill), load() -> trainer state) over a real one-process Accelerator: each save
    fills the weights with `fill`, each load checks that the weights it restored are that fill."""
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())

    def save(step, fill):
        with torch.no_grad():
            model.weight.fill_(fill)
        return checkpoint.save_checkpoint(run, acc, {"model": model, "optimizer": opt}, {"step": step, "fill": fill})

    def load():
        fresh = torch.nn.Linear(4, 3)
        state = checkpoint.load_checkpoint(run, acc, {"model": fresh, "optimizer": torch.optim.Adam(fresh.parameters())})
        assert torch.all(fresh.weight == state["fill"])
        return state
    return save, load


def test_a_step_saved_twice_keeps_its_complete_checkpoint_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """The step checkpoint at an epoch's last step, then the epoch end's at the same step: a kill
    just before the second one's rename used to find the first deleted while `latest` named it."""
    save, load = checkpoint_saver(tmp_path)
    save(8, 1.0)
    real_replace = os.replace

    def killed_before_the_rename(src, dst):
        if Path(src).name.startswith(".tmp-ckpt-"):
            raise KeyboardInterrupt("SIGKILL here")
        return real_replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", killed_before_the_rename)
    with pytest.raises(KeyboardInterrupt):
        save(8, 2.0)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert load()["fill"] == 1.0   # `latest` still names the complete step checkpoint
    assert save(8, 2.0).name == "ckpt-000000008-1"   # the save again (the resumed run): a name of its own
    assert load()["fill"] == 2.0
    save(9, 3.0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-000000008-1", "ckpt-000000009",
                                                                            "latest"]   # keep=2, leftovers gone


@pytest.mark.parametrize("breakage", ["missing", "garbage", "names a removed one", "names an incomplete one"])
def test_a_broken_latest_resumes_from_the_newest_complete_checkpoint(tmp_path, breakage, capsys):
    save, load = checkpoint_saver(tmp_path)
    save(4, 1.0)
    save(8, 2.0)
    root = tmp_path / "checkpoints"
    if breakage == "missing":
        (root / "latest").unlink()
    elif breakage == "garbage":
        (root / "latest").write_bytes(b"\xff\x00\x13")
    elif breakage == "names a removed one":
        (root / "latest").write_text("ckpt-000000012\n")
    else:
        (root / "ckpt-000000012").mkdir()   # a directory without state.pt
        (root / "latest").write_text("ckpt-000000012\n")
    capsys.readouterr()
    assert load()["fill"] == 2.0
    assert "resuming from the newest complete checkpoint, ckpt-000000008" in capsys.readouterr().out
    for done in root.glob("ckpt-*"):
        (done / "state.pt").unlink(missing_ok=True)
    with pytest.raises(checkpoint.CheckpointError, match="holds no complete checkpoint"):
        load()


@pytest.mark.slow
def test_resume_without_latest_says_so_and_is_exact(seq3, stopped_run, tmp_path):
    """What a kill between a checkpoint's rename and `latest` leaves at the first checkpoint:
    `--resume` (and train.sbatch / submit.py, which add it) takes the newest complete checkpoint."""
    whole = tmp_path / "whole"
    run_script("train/joint.py", seq3_args(seq3, whole))
    run = copy_run(stopped_run, tmp_path / "run")
    (run / "checkpoints" / "latest").unlink()
    from tests.test_slurm import load_submit
    assert load_submit().has_checkpoint(run) and checkpoint.has_checkpoint(run)
    proc = run_script("train/joint.py", seq3_args(seq3, run, "--resume"))
    assert "is missing: resuming from the newest complete checkpoint, ckpt-000000003" in proc.stdout
    a, b = final_weights(whole), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (run / "metrics.jsonl").read_bytes() == (whole / "metrics.jsonl").read_bytes()


# ------------------------------------------------------------------------------------------------
# --resume continues the run that was started (issue 23, item 2)

def without(args, flag):
    i = args.index(flag)
    return args[:i] + args[i + 2:]


@pytest.mark.slow
def test_resume_continues_the_run_that_was_started(seq3, stopped_run, tmp_path):
    """The run's config.yaml is the config: the YAML's 15 epochs do not lengthen a 2-epoch run; a flag
    that changes what the run computes is refused, naming the key and both values; a longer `epochs`
    is allowed and recorded; a finished run is refused."""
    whole = tmp_path / "whole"
    run_script("train/joint.py", seq3_args(seq3, whole))
    run = copy_run(stopped_run, tmp_path / "run")
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.name != ".lock"}
    for flag, value, fragment in (("--lr", "0.5", "--lr 0.5 (the run has 0.001"),
                                  ("--epochs", "1", "--epochs 1 (the run has 2: epochs can only grow"),
                                  ("--batch_size", "32", "--batch_size 32 (the run has 64")):
        proc = run_script("train/joint.py", seq3_args(seq3, run, "--resume", flag, value), check=False)
        one_line_error(proc, fragment, str(run / "config.yaml"), "start a new run in another out_dir")
        assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file() and f.name != ".lock"} == before
    proc = run_script("train/joint.py", without(seq3_args(seq3, run), "--epochs") + ["--resume"])   # YAML: 15
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a, b = final_weights(whole), final_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "config_changes" not in json.loads((run / "result.json").read_text())
    # finished: refused, whatever the flags
    proc = run_script("train/joint.py", seq3_args(seq3, run, "--resume", "--epochs", "4"), check=False)
    one_line_error(proc, f"out_dir={run}: finished: result.json", "choose another out_dir")
    # a longer run: allowed, printed, recorded in result.json with the step where it changed
    longer = copy_run(stopped_run, tmp_path / "longer")
    proc = run_script("train/joint.py", seq3_args(seq3, longer, "--resume", "--epochs", "3"))
    assert "[resume] epochs: 2 -> 3" in proc.stdout
    assert json.loads((longer / "result.json").read_text())["config_changes"] == [
        {"key": "epochs", "from": 2, "to": 3, "step": 3}]
    assert yaml.safe_load((longer / "config.yaml").read_text())["epochs"] == 3
    assert len((longer / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_longer_epochs_is_refused_under_a_schedule_that_spans_the_run(seq3, stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "run")
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(dict(saved, scheduler="cosine"), sort_keys=False))
    proc = run_script("train/joint.py", seq3_args(seq3, run, "--resume", "--epochs", "3"), check=False)
    one_line_error(proc, "--epochs 3 (the run has 2: scheduler=cosine spans the run's epochs")


# ------------------------------------------------------------------------------------------------
# Ctrl-C checkpoints like SIGTERM; a second one stops at once; stop signals during the exit are
# ignored (issue 23, items 3 and 4)

def test_a_second_ctrl_c_stops_at_once(monkeypatch):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        preemption = loop.Preemption(SimpleNamespace(num_processes=1, is_main_process=False))
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.received == "SIGINT" and preemption.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)   # a SIGTERM now changes nothing
        assert preemption.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        loop.Preemption.done()
        for sig in previous:
            assert signal.getsignal(sig) is signal.SIG_IGN
            os.kill(os.getpid(), sig)   # ignored
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_an_interrupt_ends_the_script_in_one_line(monkeypatch, capsys):
    """What the second Ctrl-C (or one before the training loop) gives: exit 130, one line, no traceback."""
    def main(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(sys, "argv", ["train/joint.py"])
    with pytest.raises(SystemExit) as stopped:
        loop.run_entry_point(main, {"lr": 0.1}, None)
    assert stopped.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: stopped at once, without a checkpoint (--resume continues from the last one written)"]


@pytest.mark.slow
def test_stop_signals_repeated_during_the_exit_keep_it_clean(seq3, tmp_path):
    """SIGTERM every few milliseconds from the first one until the process has exited (train.sbatch
    repeats SIGUSR1 every 10 s, SLURM signals every process): one checkpoint, exit 0. Python resets
    its own handlers to the default at shutdown, so a signal there used to kill the process (-15)."""
    out = tmp_path / "run"
    proc = start_joint(seq3_args(seq3, out, "--epochs", "6", "--ckpt_every_steps", "2"))
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        while proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.002)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (proc.returncode, stderr[-3000:])
    assert stdout.count("[stop] SIGTERM at step") == 1 and "Traceback" not in stderr


# ------------------------------------------------------------------------------------------------
# BatchNorm on several ranks (issue 23, item 5)

@pytest.mark.slow
def test_two_process_resume_with_batchnorm_validates_as_uninterrupted(tmp_path_factory, tmp_path):
    """The image encoder's BatchNorm statistics differ per rank between validations (GAAL's passes
    bypass DDP's forward, so DDP never broadcasts rank 0's). Each rank's own buffers are
    checkpointed, and every rank validates with the main process's: a 2-process run stopped
    mid-epoch and resumed logs the same validations, and ends with the same weights and buffers, as
    the uninterrupted 2-process run. (It used to resume with rank 0's buffers on every rank.)"""
    data = embedded.generate(tmp_path_factory.mktemp("imgtab"), "imgtab", seed=3, n_train=256, n_val=64, n_test=64)
    args = ["--data", str(data), "--epochs", "2", "--batch_size", "32", "--eval_batch_size", "32", "--log_every", "4",
            "--progress", "false", "--encoders.image.base_width", "4", "--encoders.table.out_dim", "32"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_script("train/gaal.py", args + ["--out_dir", str(whole)], nproc=2, timeout=300)
    run_script("train/gaal.py", args + ["--out_dir", str(split), "--stop_after_steps", "5"], nproc=2, timeout=300)
    run_script("train/gaal.py", args + ["--out_dir", str(split), "--resume"], nproc=2, timeout=300)
    assert (split / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    a, b = final_weights(whole), final_weights(split)
    assert any("running_mean" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (whole, split))
    assert ra["val"] == rb["val"] and ra["test"] == rb["test"]


# ------------------------------------------------------------------------------------------------
# one run per directory (issue 23, item 6)

@pytest.mark.slow
def test_a_second_run_on_a_running_directory_is_refused(seq3, tmp_path):
    """Two `--resume` on one directory used to both train (metrics.jsonl: epochs 1,1,2,2,...). The
    first holds the directory's lock; the second is refused in one line naming it; once the first is
    killed (SIGKILL: no clean-up), the lock is gone with it and a resume works."""
    out = tmp_path / "run"
    run_script("train/joint.py", seq3_args(seq3, out, "--stop_after_steps", "2"))
    first = start_joint(seq3_args(seq3, out, "--resume", "--epochs", "40", "--ckpt_every_steps", "1"))
    try:
        deadline = time.time() + 120
        while int((out / "checkpoints" / "latest").read_text()[5:14]) < 4 and time.time() < deadline:
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        for extra in (["--resume", "--epochs", "40"], []):   # a second resume; a fresh run
            proc = run_script("train/joint.py", seq3_args(seq3, out, *extra), check=False)
            line = one_line_error(proc, f"out_dir={out}: in use by another run (pid {first.pid} on ")
            assert "one run per directory" in line
        assert first.poll() is None, "the first run ended before the test was done with it"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    run_script("train/joint.py", seq3_args(seq3, out, "--resume", "--epochs", "40", "--stop_after_steps", "12"))
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs))


# ------------------------------------------------------------------------------------------------
# the ablation runner: a run stopped before its end is continued, not counted as finished nor redone

def ablation_row(data, *extra) -> str:
    """One line of a .jobs file: the seq3 run of seq3_args, without the flags the runner adds."""
    args, skip = [], False
    for arg in seq3_args(data, "unused", *extra):
        if skip or arg in ("--out_dir", "--progress"):
            skip = not skip
            continue
        args.append(arg)
    return " ".join(["row", "train/joint.py", *args])


@pytest.mark.slow
def test_ablation_runner_continues_a_stopped_run(seq3, tmp_path):
    """scripts/ablation.sh: a run that exits cleanly before its end (a stop checkpoint: SIGTERM from a
    kill, a preemption or the end of a session; here --stop_after_steps) is not marked finished, and
    the next invocation continues it with --resume instead of starting it over: the result equals an
    uninterrupted run's, weight for weight."""
    whole = tmp_path / "whole"
    run_script("train/joint.py", seq3_args(seq3, whole, "--seed", "0"))
    out, env = tmp_path / "campaign", dict(os.environ, SEEDS="0", THREADS="1", PYTHONPATH=str(REPO))
    jobs = tmp_path / "stopping.jobs"
    jobs.write_text(ablation_row(seq3, "--stop_after_steps", "3") + "\n")
    first = subprocess.run(["bash", "scripts/ablation.sh", str(jobs), str(out), "1"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert "[ablation] row_s0 stopped before the end" in first.stdout, first.stdout + first.stderr[-2000:]
    assert first.returncode != 0 and "result.json under" in first.stderr   # nothing finished: no table
    assert checkpoint.has_checkpoint(out / "row_s0") and not (out / "row_s0" / ".done").exists()
    jobs.write_text(ablation_row(seq3) + "\n")
    second = subprocess.run(["bash", "scripts/ablation.sh", str(jobs), str(out), "1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr[-2000:]
    assert "[ablation] row_s0 continues from its checkpoint" in second.stdout
    assert "[ablation] row_s0 finished" in second.stdout and (out / "row_s0" / ".done").exists()
    assert [json.loads(line)["epoch"] for line in (out / "row_s0" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a, b = final_weights(whole), final_weights(out / "row_s0")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_scripts_find_a_checkpoint_in_a_run_or_below_it(tmp_path):
    """scripts/env.sh `has_checkpoint`, which ablation.sh and baselines.sh ask before --resume: true for
    a run directory with a checkpoint and for a folder with such a run below it (unimodal.py's one run
    per modality); false for a missing folder, an empty one and a run whose checkpoint is incomplete."""
    run = tmp_path / "unimodal" / "video"
    (run / "checkpoints" / "ckpt-000000003").mkdir(parents=True)
    (run / "checkpoints" / "ckpt-000000003" / "state.pt").write_bytes(b"")
    (tmp_path / "bare" / "checkpoints").mkdir(parents=True)   # the folder alone is not a checkpoint
    (tmp_path / "empty").mkdir()
    (tmp_path / "partial" / "checkpoints" / "ckpt-000000003").mkdir(parents=True)   # no state.pt
    folders = [run, run.parent, tmp_path / "bare", tmp_path / "missing", tmp_path / "empty", tmp_path / "partial"]
    proc = subprocess.run(["bash", "-c", '. scripts/env.sh >/dev/null; for d; do has_checkpoint "$d" && echo yes || echo no; done',
                           "_", *map(str, folders)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["yes", "yes", "no", "no", "no", "no"], proc.stderr
