"""Launching as the README says: one process is `python train/<script>.py`; several are
`accelerate launch --multi_gpu --num_processes N`, and train/configs/accelerate/default.yaml, passed
explicitly with --config_file, gives Accelerate every value it would otherwise warn about (flags still
win). Accelerate is called as installed: nothing in the repository wraps it or edits PATH."""
import sys
from pathlib import Path

import pytest
import torch

from data_prep import embedded
from tests.test_launch import run, tiny_args
from tests.test_train import free_port

DEFAULT = "train/configs/accelerate/default.yaml"
WARNING = "were not passed to `accelerate launch`"


def accelerate():
    """Accelerate's own console script, next to this python."""
    exe = Path(sys.executable).parent / "accelerate"
    if not exe.exists():
        pytest.skip(f"no accelerate console script next to {sys.executable}")
    return str(exe)


def launch(cmd, tmp_path):
    return run(cmd, timeout=300, HF_HOME=str(tmp_path / "hf"))   # HF_HOME: no Accelerate config of the user's own


@pytest.mark.slow
def test_default_config_launches_one_or_two_processes_without_the_warning(tmp_path):
    data = embedded.generate(tmp_path / "data", "seq3", seed=1, n_train=128, n_val=64, n_test=64)
    port = ["--main_process_port", str(free_port())]
    one = launch([accelerate(), "launch", "--config_file", DEFAULT, *port,
                  "train/joint.py", *tiny_args(data, tmp_path / "one")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert WARNING not in one.stderr and (tmp_path / "one" / "result.json").exists()
    two = launch([accelerate(), "launch", "--config_file", DEFAULT, "--multi_gpu", "--num_processes", "2", *port,
                  "train/joint.py", *tiny_args(data, tmp_path / "two")], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert WARNING not in two.stderr
    ckpt = tmp_path / "two" / "checkpoints"
    state = torch.load(ckpt / (ckpt / "latest").read_text().strip() / "state.pt", weights_only=False)
    assert state["world_size"] == 2   # the flags won over the file's one process: real DDP over 2 ranks


@pytest.mark.slow
def test_several_processes_without_the_config_warn_and_refuse_per_rank(tmp_path):
    """What the config file is for (Accelerate's warning), and what a refused config looks like with
    several processes: one line per rank that gets to it (its rank named), then torch's launcher's
    failure report."""
    proc = launch([accelerate(), "launch", "--multi_gpu", "--num_processes", "2",
                   "--main_process_port", str(free_port()), "train/cggm.py", "--lr", "-1"], tmp_path)
    assert proc.returncode != 0
    assert WARNING in proc.stderr
    # the first rank to fail makes torch's launcher SIGTERM the other, which may not have printed yet
    ranks = {line[:8] for line in proc.stderr.splitlines() if line.endswith("] error: lr=-1.0: must be > 0")}
    assert ranks and ranks <= {"[rank 0]", "[rank 1]"}, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("args, line", [
    (["train/gaal.py", "--lr_rate", "3"], "error: command line: unknown config key 'lr_rate' (did you mean lr?)"),
    (["train/igm.py", "--epochs", "3"], "error: --epochs: ignored by variant=official"),
])
@pytest.mark.slow
def test_a_mistake_in_one_process_is_one_line(tmp_path, args, line):
    """What a new user meets: `python train/<script>.py` with a config mistake prints one line on stderr
    (no traceback), nothing on stdout, and exits 2."""
    proc = launch([sys.executable, *args], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(line), proc.stderr
    assert proc.stdout == ""
