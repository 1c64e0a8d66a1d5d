"""report_to: the experiment trackers (TensorBoard by default; wandb and MLflow as optional extras),
through Accelerate's tracker API (Accelerator(log_with=...), init_trackers, accelerator.log).

The refusals run the real script. "Not installed" is real: a tracker is tested as missing only when
its package is absent from this environment (the trackers extra is not part of the default install).
Where wandb/MLflow are missing, what the code path can be checked without them is: the Accelerate
trackers made for them (their arguments, nothing imported or written), and start/close against
stand-ins for the opened runs and for the mlflow module. Where both are installed (the trackers
extra), the tests decorated `@real` run them: wandb offline, MLflow's default store, read back with
each library's own reader (wandb's protobuf records, MlflowClient)."""
import atexit
import importlib.util
import json
import shutil
import struct
import sys
import types

import pytest
import yaml
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
    """Made whether or not their packages are installed (report_to decides that): nothing imported.
    wandb's project is mm-balance, as MLflow's experiment, unless WANDB_PROJECT says otherwise (wandb's
    own default would be named after the git checkout and the script's folder)."""
    monkeypatch.setattr(rundir, "report_to", lambda value: ["wandb", "mlflow"])
    for name in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    before = set(sys.modules)
    wandb, mlflow = rundir.trackers(run_cfg(tmp_path))
    assert isinstance(wandb, WandBTracker) and isinstance(mlflow, MLflowTracker)
    assert (wandb.run_name, wandb.init_kwargs) == ("mm-balance", {"dir": str(tmp_path / "run"), "id": None,
                                                                  "resume": "allow", "name": "run"})
    assert (mlflow.experiment_name, mlflow.run_id, mlflow.run_name) == ("mm-balance", None, "run")
    assert not {"wandb", "mlflow"} & (set(sys.modules) - before)
    monkeypatch.setenv("WANDB_PROJECT", "study")
    assert rundir.trackers(run_cfg(tmp_path))[0].run_name == "study"
    (tmp_path / "run").mkdir()
    rundir.tracker_id(tmp_path / "run", "wandb", "w1")
    rundir.tracker_id(tmp_path / "run", "mlflow", "m1")
    wandb, mlflow = rundir.trackers(run_cfg(tmp_path, resume=True))
    assert wandb.init_kwargs["id"] == "w1" and mlflow.run_id == "m1"


def test_tracker_ids_are_a_previous_runs_file():
    """A fresh run refuses a directory holding them, and a user who deletes the files that refusal names
    deletes them too: a fresh run never continues another run's wandb/MLflow runs."""
    assert "tracker_ids.json" in rundir.RUN_FILES


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

    def __init__(self, log_with, fails=None):
        self.log_with, self.trackers, self.projects, self.fails = log_with, [], [], fails

    def init_trackers(self, project_name):
        self.projects.append(project_name)
        if self.fails is not None:
            raise self.fails
        self.trackers = list(self.log_with)


def stand_in_mlflow(monkeypatch, calls, active=None):
    """The mlflow module as start/close_trackers use it; `calls` records what they asked of it."""
    monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(
        set_tracking_uri=lambda uri: calls.append(("uri", uri)), end_run=lambda status: calls.append(("end", status)),
        active_run=lambda: active, utils=types.SimpleNamespace(validation=types.SimpleNamespace(MAX_PARAM_VAL_LENGTH=6000))))


def test_start_records_the_run_ids_and_config_and_close_says_how_the_run_ended(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    calls = []
    stand_in_mlflow(monkeypatch, calls)
    monkeypatch.setattr(rundir, "report_to", lambda value: ["wandb", "mlflow"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = {"report_to": "wandb,mlflow", "lr": 0.1, "encoders": {"audio": {"base_width": 8}}, "note": "n" * 7000}
    accelerator = StandInAccelerator([StandIn("wandb"), StandIn("mlflow")])
    rundir.start_trackers(accelerator, cfg, run_dir)
    wandb, mlflow = accelerator.trackers
    # MLflow's own default store, SQLite (MLflow 3.17 refuses a file store unless told to allow it)
    assert accelerator.projects == ["run"] and calls == [("uri", f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")]
    assert json.loads((run_dir / "tracker_ids.json").read_text()) == {"wandb": "w-new", "mlflow": "m-new"}
    assert wandb.stored == [cfg]
    # flattened; a value cut only where MLflow would refuse it (its longest, 6000 characters: not 500)
    assert mlflow.stored == [{"report_to": "wandb,mlflow", "lr": "0.1", "encoders.audio.base_width": "8",
                              "note": "n" * 6000}]
    rundir.close_trackers(accelerator, finished=False)   # stopped, to be resumed
    assert wandb.finished == 1 and calls[-1] == ("end", "KILLED") and mlflow.finished is False
    # the resume: the same runs (ids kept), MLflow's parameters not logged again
    accelerator = StandInAccelerator([StandIn("wandb"), StandIn("mlflow")])
    rundir.start_trackers(accelerator, cfg, run_dir)
    assert json.loads((run_dir / "tracker_ids.json").read_text()) == {"wandb": "w-new", "mlflow": "m-new"}
    assert accelerator.trackers[1].stored == []
    rundir.close_trackers(accelerator)
    assert all(t.finished is True for t in accelerator.trackers)


def test_a_tracker_that_cannot_start_is_refused_in_one_line(tmp_path, monkeypatch):
    """wandb not logged in, an MLflow store refused or unreachable: one line naming report_to and the
    library's own reason, not a traceback from inside Accelerate."""
    stand_in_mlflow(monkeypatch, [])
    monkeypatch.setattr(rundir, "report_to", lambda value: ["wandb", "mlflow"])
    failure = RuntimeError("no store at\n  bogus://nowhere")
    accelerator = StandInAccelerator([StandIn("wandb"), StandIn("mlflow")], fails=failure)
    with pytest.raises(ConfigError) as refused:
        rundir.start_trackers(accelerator, {"report_to": "all"}, tmp_path)
    assert str(refused.value) == ("report_to=all: a tracker could not start its run "
                                  "(builtins.RuntimeError: no store at bogus://nowhere)")
    assert not (tmp_path / "tracker_ids.json").exists()
    atexit.unregister(rundir._end_unclosed_mlflow_run)   # registered by the start: not this process's exit


def test_an_mlflow_run_left_open_at_exit_ends_failed(tmp_path, monkeypatch):
    """A process that ends without close_trackers (an error line, an exception, a second Ctrl-C): the
    hook start_trackers registers ends the open run FAILED, before MLflow's own hook (FINISHED)."""
    calls = []
    stand_in_mlflow(monkeypatch, calls, active=object())
    rundir._end_unclosed_mlflow_run()
    assert calls == [("end", "FAILED")]
    stand_in_mlflow(monkeypatch, calls, active=None)   # ended by close_trackers: nothing left to end
    rundir._end_unclosed_mlflow_run()
    assert calls == [("end", "FAILED")]
    monkeypatch.delitem(sys.modules, "mlflow")   # never imported: no run
    rundir._end_unclosed_mlflow_run()


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


# --------------------------------------------------------------------------------------------------
# The real libraries (the trackers extra installed): wandb offline, MLflow's default store in the run
# directory, each read back with its own reader. Skipped only where wandb or mlflow is missing.

real = pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} not installed (pip install -e \".[trackers]\")")


def wandb_runs(out):
    """{offline run directory name: (run record, config, [history rows], exit code or None)} of the wandb
    files under `out`, oldest first. A .wandb file is a LevelDB-style log (7-byte header, 32 KiB
    blocks of crc/length/type-framed chunks) of wandb's own protobuf Records; wandb ships no Python
    reader for it."""
    from wandb.proto import wandb_internal_pb2
    runs = {}
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        pos, chunks, records = 7, b"", []
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:   # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunks = (chunks if kind in (3, 4) else b"") + data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):   # a whole record, or its last chunk
                records.append(wandb_internal_pb2.Record.FromString(chunks))
        run = next((r.run for r in records if r.HasField("run")), None)
        config = {item_key(i): json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
        history = [{item_key(i): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
        exits = [r.exit.exit_code for r in records if r.HasField("exit")]
        runs[path.parent.name] = (run, config, history, exits[-1] if exits else None)
    return runs


def item_key(item):
    return item.key or "/".join(item.nested_key)   # wandb writes some keys (_step) as a one-part nested key


def mlflow_run(out):
    """The MLflow run of tracker_ids.json, from <out>/mlflow.db; and its client."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    return client.get_run(json.loads((out / "tracker_ids.json").read_text())["mlflow"]), client


def real_env(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_PROJECT", "WANDB_RUN_ID",
                 "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)


def check_stopped_run(out) -> dict:
    """A run stopped at step 6, a point at every step: one wandb run (exit code 1) and one MLflow run
    (KILLED), both named after the run directory in mm-balance, holding the resolved config. Its ids."""
    ids = json.loads((out / "tracker_ids.json").read_text())
    assert set(ids) == {"wandb", "mlflow"}
    ((run, config, history, exit_code),) = wandb_runs(out).values()
    assert (run.run_id, run.project, run.display_name, exit_code) == (ids["wandb"], "mm-balance", "run", 1)
    assert [row["_step"] for row in history] == [1, 2, 3, 4, 5, 6]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert {key: value for key, value in config.items() if key != "_wandb"} == json.loads(json.dumps(resolved))
    stopped, client = mlflow_run(out)
    assert (stopped.info.status, stopped.info.run_name) == ("KILLED", "run")
    assert client.get_experiment(stopped.info.experiment_id).name == "mm-balance"
    assert stopped.data.params == {key: str(value) for key, value in rundir._flat(rundir._plain(resolved)).items()}
    return ids


@real
@pytest.mark.slow
def test_real_wandb_and_mlflow_continue_a_stopped_run_under_two_ranks(seq3_data, tmp_path, monkeypatch):
    """Two ranks, a point at every step: stopped at step 6 (as by SIGTERM), resumed from step 4 (as after
    a kill between checkpoints 4 and 6). Only the main process logs: one wandb run (a file per start,
    offline), one MLflow run, both with the ids tracker_ids.json keeps; the stopped start ends as
    documented (wandb exit code 1, MLflow KILLED), the resumed one FINISHED; MLflow keeps steps 5-6
    of both starts; the parameters and wandb's config are the resolved config."""
    real_env(monkeypatch)
    out = tmp_path / "run"
    args = seq3_args(seq3_data, out, "--log_every", "1", "--ckpt_every_steps", "4", "--report_to", "tensorboard,wandb,mlflow")
    run_script("train/joint.py", args + ["--stop_after_steps", "6"], nproc=2)
    ids = check_stopped_run(out)
    (out / "checkpoints" / "latest").write_text("ckpt-000000004\n")
    shutil.rmtree(out / "checkpoints" / "ckpt-000000006")
    run_script("train/joint.py", args + ["--resume"], nproc=2)
    assert json.loads((out / "tracker_ids.json").read_text()) == ids
    first, resumed = wandb_runs(out).values()
    assert first[3] == 1 and (resumed[0].run_id, resumed[3]) == (ids["wandb"], 0)
    assert [row["_step"] for row in resumed[2]] == list(range(5, 17))   # offline: the resumed start's own file
    run, client = mlflow_run(out)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6] + list(range(5, 17))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_fused/acc")] == [8, 16]


@real
@pytest.mark.slow
def test_real_failed_run_and_a_tracker_that_cannot_start(seq3_data, tmp_path, monkeypatch):
    """A run that ends on an error line is FAILED in MLflow (its own exit hook would say FINISHED) and
    has wandb's exit code 2; a long parameter (a data path past 500 characters) is kept whole; an
    MLflow store that cannot be used is refused in one line."""
    real_env(monkeypatch)
    data = tmp_path / ("a" * 200) / ("b" * 200) / ("c" * 150)
    data.parent.mkdir(parents=True)
    data.symlink_to(seq3_data)
    out = tmp_path / "run"
    proc = run_script("train/joint.py", seq3_args(data, out, "--lr", "1e30", "--log_every", "1", "--report_to", "all"),
                      check=False)
    assert proc.returncode == 2 and "error: non-finite loss" in proc.stderr, proc.stderr
    run, _ = mlflow_run(out)
    assert run.info.status == "FAILED" and run.data.params["data"] == str(data)
    assert [exit_code for *_, exit_code in wandb_runs(out).values()] == [2]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    proc = run_script("train/joint.py", seq3_args(seq3_data, tmp_path / "other", "--report_to", "mlflow"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: report_to=mlflow: a tracker could not start its run (mlflow.")
