"""report_to: the experiment trackers (TensorBoard by default; wandb and MLflow as optional extras).

The refusals run the real script. "Not installed" is real: a tracker is tested as missing only when
its package is absent from this environment (the trackers extra is not part of the default install).
The wandb/MLflow logging paths need their packages and are not exercised where they are missing."""
import importlib.util
import json

import pytest

from data_prep import embedded
from train import rundir
from train.config import ConfigError
from tests.test_train import run_script, seq3_args

MISSING = [name for name in ("wandb", "mlflow") if importlib.util.find_spec(name) is None]


@pytest.fixture(scope="module")
def seq3_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return embedded.generate(root, "seq3", seed=3, n_train=512, n_val=128, n_test=128)


def test_report_to_names():
    assert rundir.report_to("tensorboard") == ["tensorboard"]
    assert rundir.report_to("none") == []
    assert rundir.report_to(" tensorboard , tensorboard") == ["tensorboard"]
    assert rundir.report_to("all") == ["tensorboard"] + [n for n in ("wandb", "mlflow") if n not in MISSING]
    for bad in ("tensorbord", "", "none,tensorboard", 3, ["tensorboard", "neptune"]):
        with pytest.raises(ConfigError, match="report_to=.*choose tensorboard, wandb, mlflow, all or none"):
            rundir.report_to(bad)


@pytest.mark.parametrize("name", MISSING or [pytest.param("wandb", marks=pytest.mark.skip("wandb and mlflow are both installed"))])
def test_a_missing_tracker_package_is_refused_in_one_line(name):
    with pytest.raises(ConfigError, match=rf"^report_to={name}: the {name} package is not installed \(pip install {name}"):
        rundir.report_to(f"tensorboard,{name}")


def test_open_trackers_none_is_an_empty_writer(tmp_path):
    writer = rundir.open_trackers({"report_to": "none"}, tmp_path)
    writer.add_scalar("loss", 1.0, 3)
    writer.close()
    assert list(tmp_path.iterdir()) == []


def test_tracker_ids_are_kept_for_resume(tmp_path):
    assert rundir.tracker_id(tmp_path, "wandb") is None
    assert rundir.tracker_id(tmp_path, "wandb", "abc123") == "abc123"
    assert rundir.tracker_id(tmp_path, "wandb", "other") == "abc123"   # a resume keeps the first id
    assert rundir.tracker_id(tmp_path, "mlflow", "r1") == "r1"
    assert json.loads((tmp_path / "tracker_ids.json").read_text()) == {"wandb": "abc123", "mlflow": "r1"}


def test_script_refuses_an_unknown_tracker_before_any_compute(seq3_data, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train/joint.py", seq3_args(seq3_data, out, "--report_to", "tensorboard,neptune"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: report_to='tensorboard,neptune': choose tensorboard, wandb, mlflow, all or none "
        "(or a comma-separated list of the first three)"]
    assert not out.exists()


@pytest.mark.skipif(not MISSING, reason="wandb and mlflow are both installed here: nothing is really missing")
def test_script_refuses_a_tracker_that_is_not_installed(seq3_data, tmp_path):
    name = MISSING[0]
    out = tmp_path / "run"
    proc = run_script("train/joint.py", seq3_args(seq3_data, out, "--report_to", name), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: report_to={name}: the {name} package is not installed (pip install {name}, "
        'or pip install -e ".[trackers]")']
    assert not out.exists()


@pytest.mark.slow
def test_report_to_none_writes_no_tensorboard(seq3_data, tmp_path):
    out = tmp_path / "run"
    proc = run_script("train/joint.py", seq3_args(seq3_data, out, "--report_to", "none", "--epochs", "1"))
    assert (out / "result.json").exists() and (out / "metrics.jsonl").exists()
    assert not (out / "tb").exists() and not (out / "tracker_ids.json").exists()
    assert "Bayes limit" in proc.stdout and "tensorboard --logdir" not in proc.stdout
