"""scripts/bin/accelerate (first on PATH in the venv, scripts/env.sh): a bare `accelerate launch`
gets train/configs/accelerate/default.yaml and prints no "defaults used instead" warning; a launch
with a config (given, or the user's own) and every other command go to accelerate unchanged."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import embedded

REPO = Path(__file__).resolve().parent.parent
WRAPPER = REPO / "scripts" / "bin" / "accelerate"
DEFAULT = REPO / "train" / "configs" / "accelerate" / "default.yaml"


def wrapper_env(venv: Path, hf_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "SLURM_"))}
    env.update(VIRTUAL_ENV=str(venv), HF_HOME=str(hf_home), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


@pytest.fixture
def fake_venv(tmp_path):
    """A venv whose `accelerate` prints the arguments it got."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "accelerate"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return venv


def args_seen(venv, hf_home, *args):
    proc = subprocess.run([str(WRAPPER), *args], env=wrapper_env(venv, hf_home), capture_output=True, text=True,
                          timeout=30, check=True)
    return proc.stdout.splitlines()


def test_wrapper_adds_the_default_config_only_to_a_bare_launch(fake_venv, tmp_path):
    hf = tmp_path / "hf"
    bare = args_seen(fake_venv, hf, "launch", "train/joint.py", "--config_file", "mine.yaml")
    assert bare == ["launch", "--quiet", "--config_file", str(DEFAULT), "train/joint.py", "--config_file", "mine.yaml"]
    flags = args_seen(fake_venv, hf, "launch", "--multi_gpu", "--num_processes", "2", "train/joint.py")
    assert flags[:4] == ["launch", "--quiet", "--config_file", str(DEFAULT)] and \
        flags[4:] == ["--multi_gpu", "--num_processes", "2", "train/joint.py"]
    for given in (["--config_file", "ds.yaml"], ["--config-file=ds.yaml"]):
        assert args_seen(fake_venv, hf, "launch", *given, "train/joint.py") == ["launch", "--quiet", *given,
                                                                                "train/joint.py"]
    assert args_seen(fake_venv, hf, "launch", "-q", "train/joint.py")[:2] == ["launch", "--config_file"]  # no 2nd -q
    assert args_seen(fake_venv, hf, "env") == ["env"]
    (hf / "accelerate").mkdir(parents=True)
    (hf / "accelerate" / "default_config.yaml").write_text("compute_environment: LOCAL_MACHINE\n")
    assert args_seen(fake_venv, hf, "launch", "train/joint.py") == ["launch", "--quiet", "train/joint.py"]  # user's own


@pytest.mark.slow
def test_bare_accelerate_launch_prints_no_defaults_warning(tmp_path):
    real = Path(sys.prefix) / "bin" / "accelerate"
    if not real.exists():
        pytest.skip(f"no accelerate console script in {sys.prefix}")
    data = embedded.generate(tmp_path / "data", "seq3", seed=1, n_train=128, n_val=64, n_test=64)

    def launch(accelerate, out):
        return subprocess.run([str(accelerate), "launch", "train/joint.py", "--config", "train/configs/joint_seq3.yaml",
                               "--data", str(data), "--out_dir", str(tmp_path / out), "--epochs", "1",
                               "--batch_size", "64", "--progress", "false"],
                              cwd=REPO, env=wrapper_env(Path(sys.prefix), tmp_path / "hf"), capture_output=True,
                              text=True, timeout=600)

    proc = launch(WRAPPER, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "were not passed to `accelerate launch`" not in proc.stderr, proc.stderr
    assert (tmp_path / "run" / "result.json").exists()
    proc = launch(real, "plain")   # what it replaces: accelerate itself warns
    assert proc.returncode == 0 and "were not passed to `accelerate launch`" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("args, line", [
    (["train/gaal.py", "--lr_rate", "3"], "error: command line: unknown config key 'lr_rate' (did you mean lr?)"),
    (["train/igm.py", "--epochs", "3"], "error: --epochs: ignored by variant=official"),
    # several processes: the wrapper checks the config once before torch's launcher starts them
    (["--multi_gpu", "--num_processes", "2", "train/cggm.py", "--lr", "-1"], "error: lr=-1.0: must be > 0"),
])
@pytest.mark.slow
def test_a_mistake_through_accelerate_launch_is_one_line(tmp_path, args, line):
    """What a new user meets: a config mistake under `accelerate launch` prints one line on stderr (no
    traceback of the launcher, no defaults warning), nothing on stdout, and exits non-zero."""
    real = Path(sys.prefix) / "bin" / "accelerate"
    if not real.exists():
        pytest.skip(f"no accelerate console script in {sys.prefix}")
    proc = subprocess.run([str(WRAPPER), "launch", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=wrapper_env(Path(sys.prefix), tmp_path / "hf"))
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(line), proc.stderr
    assert proc.stdout == ""
