"""report_to: the experiment trackers (TensorBoard by default; wandb and MLflow as optional extras),
through Accelerate's tracker API (Accelerator(log_with=...), init_trackers, accelerator.log).

The refusals run the real script. "Not installed" is real: a tracker is tested as missing only when
its package is absent from this environment (the trackers extra is not part of the default install).
Where wandb/MLflow are missing, what the code path can be checked without them is: the Accelerate
trackers made for them (their arguments, nothing imported or written), and start/close against
stand-ins for the opened runs and for the mlflow module."""
import importlib.util
import json
import shutil
import sys
import types

import pytest
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

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


def run_cfg(tmp_path, report_to="tensorboard", resume=False):
    return {"report_to": report_to, "out_dir": str(tmp_path / "run"), "resume": resume}


def test_trackers_are_accelerate_trackers_made_without_writing(tmp_path):
    assert rundir.trackers(run_cfg(tmp_path, "none")) == []
    (tb,) = rundir.trackers(run_cfg(tmp_path))
    assert isinstance(tb, TensorBoardTracker)
    assert (tb.run_name, tb.logging_dir_param, tb.init_kwargs) == ("tb", str(tmp_path / "run"), {"purge_step": None})
    assert list(tmp_path.iterdir()) == []   # made, not opened: a run refused later leaves nothing


def test_a_resume_purges_tensorboard_after_the_checkpoint_it_loads(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (4, 6):
        (ckpts / f"ckpt-{step:09d}").mkdir(parents=True)
        (ckpts / f"ckpt-{step:09d}" / "state.pt").write_bytes(b"")
    (ckpts / "latest").write_text("ckpt-000000004\n")
    (tb,) = rundir.trackers(run_cfg(tmp_path, resume=True))
    assert tb.init_kwargs == {"purge_step": 5}   # the events the stopped run logged after step 4 are replaced
    (ckpts / "latest").write_text("ckpt-000000009\n")   # broken: the newest complete one is loaded
    assert rundir.trackers(run_cfg(tmp_path, resume=True))[0].init_kwargs == {"purge_step": 7}
    (ckpts / "latest").unlink()
    for path in sorted(ckpts.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    assert rundir.trackers(run_cfg(tmp_path, resume=True))[0].init_kwargs == {"purge_step": None}


def test_wandb_and_mlflow_trackers_continue_the_recorded_runs(tmp_path, monkeypatch):
    """Made whether or not their packages are installed (report_to decides that): nothing imported."""
    monkeypatch.setattr(rundir, "report_to", lambda value: ["wandb", "mlflow"])
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    before = set(sys.modules)
    wandb, mlflow = rundir.trackers(run_cfg(tmp_path))
    assert isinstance(wandb, WandBTracker) and isinstance(mlflow, MLflowTracker)
    assert (wandb.run_name, wandb.init_kwargs) == (None, {"dir": str(tmp_path / "run"), "id": None, "resume": "allow",
                                                          "name": "run"})
    assert (mlflow.experiment_name, mlflow.run_id, mlflow.run_name) == ("mm-balance", None, "run")
    assert not {"wandb", "mlflow"} & (set(sys.modules) - before)
    (tmp_path / "run").mkdir()
    rundir.tracker_id(tmp_path / "run", "wandb", "w1")
    rundir.tracker_id(tmp_path / "run", "mlflow", "m1")
    wandb, mlflow = rundir.trackers(run_cfg(tmp_path, resume=True))
    assert wandb.init_kwargs["id"] == "w1" and mlflow.run_id == "m1"


class StandIn(GeneralTracker):
    """An Accelerate tracker named like wandb's or MLflow's, its `tracker` a stand-in for the run."""
    requires_logging_directory = False

    def __init__(self, name):
        self.name, self.stored, self.finished = name, [], False
        super().__init__()
        self.run = types.SimpleNamespace(id="w-new", info=types.SimpleNamespace(run_id="m-new"),
                                         finish=lambda exit_code: setattr(self, "finished", exit_code))

    @property
    def tracker(self):
        return self.run

    def store_init_configuration(self, values):
        self.stored.append(values)

    def finish(self):
        self.finished = True


class StandInAccelerator:
    is_main_process = True

    def __init__(self, log_with):
        self.log_with, self.trackers, self.projects = log_with, [], []

    def init_trackers(self, project_name):
        self.projects.append(project_name)
        self.trackers = list(self.log_with)


def test_start_records_the_run_ids_and_config_and_close_says_how_the_run_ended(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    calls = []
    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("uri", uri)), end_run=lambda status: calls.append(("end", status))))
    monkeypatch.setattr(rundir, "report_to", lambda value: ["wandb", "mlflow"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = {"report_to": "wandb,mlflow", "lr": 0.1, "encoders": {"audio": {"base_width": 8}}}
    accelerator = StandInAccelerator([StandIn("wandb"), StandIn("mlflow")])
    rundir.start_trackers(accelerator, cfg, run_dir)
    wandb, mlflow = accelerator.trackers
    assert accelerator.projects == ["run"] and calls == [("uri", (run_dir / "mlruns").resolve().as_uri())]
    assert json.loads((run_dir / "tracker_ids.json").read_text()) == {"wandb": "w-new", "mlflow": "m-new"}
    assert wandb.stored == [cfg]
    assert mlflow.stored == [{"report_to": "wandb,mlflow", "lr": "0.1", "encoders.audio.base_width": "8"}]
    rundir.close_trackers(accelerator, finished=False)   # stopped, to be resumed
    assert wandb.finished == 1 and calls[-1] == ("end", "KILLED") and mlflow.finished is False
    # the resume: the same runs (ids kept), MLflow's parameters not logged again
    accelerator = StandInAccelerator([StandIn("wandb"), StandIn("mlflow")])
    rundir.start_trackers(accelerator, cfg, run_dir)
    assert json.loads((run_dir / "tracker_ids.json").read_text()) == {"wandb": "w-new", "mlflow": "m-new"}
    assert accelerator.trackers[1].stored == []
    rundir.close_trackers(accelerator)
    assert all(t.finished is True for t in accelerator.trackers)


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


@pytest.mark.slow
def test_a_resume_replaces_the_points_logged_after_its_checkpoint(seq3_data, tmp_path):
    """Checkpoints at steps 4 and 6, a point at every step, then the run resumed from step 4 (as
    after a kill between the two checkpoints): the resumed run's events file purges steps >= 5 (a
    START at step 5), so TensorBoard shows each of the 8 steps once."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tests.test_train import tb_scalars
    out = tmp_path / "run"
    args = seq3_args(seq3_data, out, "--log_every", "1", "--ckpt_every_steps", "4", "--epochs", "1")
    run_script("train/joint.py", args + ["--stop_after_steps", "6"])
    (out / "checkpoints" / "latest").write_text("ckpt-000000004\n")
    shutil.rmtree(out / "checkpoints" / "ckpt-000000006")
    run_script("train/joint.py", args + ["--resume"])
    files = sorted((out / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    starts = [[e.step for e in EventFileLoader(str(f)).Load() if e.HasField("session_log")] for f in files]
    assert starts == [[], [5]]
    assert sorted(tb_scalars(out)["train/lr"]) == list(range(1, 9))
