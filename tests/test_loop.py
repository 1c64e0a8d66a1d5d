"""train/loop.py through every script: N ranks = 1 rank (weights and the logged losses, which are the
mean over ranks), the logging window after a resume, a NaN on one rank, and the skeleton written once."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_train import final_weights, run_script, tb_scalars

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def seq3(tmp_path_factory):
    from data_prep import embedded
    return embedded.generate(tmp_path_factory.mktemp("data"), "seq3", n_train=256, n_val=128, n_test=128)


NO_DROPOUT = ["--encoders", "{text: {d_model: 16, n_layers: 1, dropout: 0.0}, audio: {d_model: 16, n_layers: 1, "
              "dropout: 0.0}, vision: {d_model: 16, n_layers: 1, dropout: 0.0}}"]
# Per script: a configuration where N ranks x B/N is the same computation as 1 rank x B (no
# BatchNorm, no dropout, no mixup pairing within a rank's slice; SGD, see test_train.test_ddp_two_ranks_match_one).
SCRIPTS = {
    "joint": NO_DROPOUT + ["--epochs", "2"],
    "gaal": NO_DROPOUT + ["--epochs", "2", "--modalities", "[text, audio]", "--patience", "0"],
    "igm": NO_DROPOUT + ["--mixup_alpha", "0", "--stage_epochs", "[1, 1]", "--scheduler", "none"],
    "ogm_ge": NO_DROPOUT + ["--epochs", "2", "--modulated_params", "all", "--modulation_ends", "1"],
    "mmpareto": NO_DROPOUT + ["--epochs", "2"],
    "mla": NO_DROPOUT + ["--epochs", "2", "--variant", "paper"],   # with the OWM projection
    "cggm": ["--epochs", "2", "--d_model", "16", "--fusion", "{n_layers: 1, dropout: 0.0}", "--classifier", "{dropout: 0.0}",
             "--head_dropout", "0.0"] + [
        "--encoders", "{text: {d_model: 16, n_layers: 1, dropout: 0.0}, audio: {d_model: 16, "
        "n_layers: 1, dropout: 0.0}, vision: {d_model: 16, n_layers: 1, dropout: 0.0}}"],
}


EMPTY_CONFIG = REPO / "tests" / "empty.yaml"   # the declared defaults and the flags only, no shipped YAML


def common_args(data, out, *extra):
    return ["--config", str(EMPTY_CONFIG), "--data", str(data), "--out_dir", str(out), "--batch_size", "64",
            "--optimizer", "sgd", "--lr", "0.05", "--log_every", "2", "--progress", "false", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_two_ranks_equal_one_through_the_loop(seq3, tmp_path, script):
    """Every script on the shared loop: 2 processes x 32 == 1 process x 64 — the final weights, and
    every logged loss (the mean over ranks of each rank's window mean) at every logged step."""
    one, two = tmp_path / "one", tmp_path / "two"
    run_script(f"train/{script}.py", common_args(seq3, one, *SCRIPTS[script]))
    run_script(f"train/{script}.py", common_args(seq3, two, *SCRIPTS[script]), nproc=2)
    a, b = final_weights(one), final_weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{script}: {key}")
    sa, sb = tb_scalars(one), tb_scalars(two)
    losses = [tag for tag in sa if tag.endswith("loss") and not tag.startswith("val")]
    assert losses, sorted(sa)
    for tag in losses:
        assert sorted(sa[tag]) == sorted(sb[tag]), tag
        for step, value in sa[tag].items():
            assert sb[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-5), f"{script}: {tag} at step {step}"


@pytest.mark.slow
def test_first_window_after_a_resume_is_the_mean_of_the_steps_it_summed(seq3, tmp_path):
    """log_every=4, stopped at step 2 and resumed: the value logged at step 4 is the mean of steps 3
    and 4 (as a log_every=1 run gives them), not their sum divided by 4."""
    args = SCRIPTS["cggm"]
    every = tmp_path / "every"
    run_script("train/cggm.py", common_args(seq3, every, *args, "--log_every", "1", "--epochs", "2"))
    cut = tmp_path / "cut"
    run_script("train/cggm.py", common_args(seq3, cut, *args, "--log_every", "4", "--epochs", "2",
                                            "--stop_after_steps", "2"))
    run_script("train/cggm.py", common_args(seq3, cut, *args, "--log_every", "4", "--epochs", "2", "--resume"))
    per_step, resumed = tb_scalars(every), tb_scalars(cut)
    for tag in ("train/loss", "text/clf_loss"):
        expected = (per_step[tag][3] + per_step[tag][4]) / 2
        assert resumed[tag][4] == pytest.approx(expected, rel=1e-5), tag
        # the uninterrupted windows are means too
        assert resumed[tag][8] == pytest.approx(sum(per_step[tag][s] for s in range(5, 9)) / 4, rel=1e-5), tag


NAN_METHOD = '''
"""A method whose loss turns NaN on rank 1 only, at its third step."""
import torch
import torch.nn.functional as F

from models.fusion import LateFusionModel
from train import loop, optim
from train.config import declare
from train.loop_config import LOOP_CONFIG

CONFIG = declare(LOOP_CONFIG, data={data!r}, log_every=5)


def build(cfg, ctx):
    model = LateFusionModel(ctx.meta, {{}}, ctx.modalities)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    model, optimizer = ctx.accelerator.prepare(model, optimizer)
    return loop.Setup(model, optimizer, fuse=LateFusionModel.fuse)


def step(setup, batch, ctx):
    loss = F.cross_entropy(LateFusionModel.fuse(setup.model(batch)), batch["label"])
    setup.optimizer.zero_grad()
    ctx.accelerator.backward(loss)
    setup.optimizer.step()
    if ctx.rank == 1 and ctx.position["step"] == 2:
        loss = loss * float("nan")
    return {{"train/loss": loss.detach()}}


if __name__ == "__main__":
    loop.run_entry_point(lambda cfg: loop.train(cfg, method="nan-on-rank-1", build=build, step=step), CONFIG, None)
'''


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_through_the_loop(seq3, tmp_path):
    """Rank 1 alone sees a NaN at step 3; at the next check (step 5) BOTH ranks stop with the one-line
    error and exit 2 — none waits forever in a collective, and no checkpoint is written after it."""
    script = tmp_path / "nan_method.py"
    script.write_text(NAN_METHOD.format(data=str(seq3)))
    out = tmp_path / "run"
    proc = run_script(str(script), ["--out_dir", str(out), "--batch_size", "32", "--progress", "false"], nproc=2,
                      check=False, timeout=300)
    assert proc.returncode != 0
    errors = re.findall(r"\[rank (\d)\] error: non-finite loss at or before step (\d+)", proc.stderr)
    assert sorted(errors) == [("0", "5"), ("1", "5")], proc.stderr[-3000:]
    assert not (out / "checkpoints").exists()


PHASED_METHOD = '''
"""A method with a plan of its own (loop.Schedule): 3 epochs whatever `epochs` says, the scheduler
stepped before each epoch, a warm-up phase (epoch 1) then a main one, both in metrics.jsonl."""
import torch.nn.functional as F

from models.fusion import LateFusionModel
from train import loop, optim
from train.config import declare
from train.loop_config import LOOP_CONFIG

CONFIG = declare(LOOP_CONFIG, data={data!r}, epochs=1, log_every=2, scheduler="step", step_size=1, gamma=0.5,
                 optimizer="sgd", lr=0.08)


def build(cfg, ctx):
    model = LateFusionModel(ctx.meta, {{}}, ctx.modalities)
    optimizer = optim.build_optimizer(cfg, model.parameters())
    model, optimizer = ctx.accelerator.prepare(model, optimizer)

    state = {{"phase": "warm-up"}}
    phase = lambda: loop.Phase(state["phase"], {{"phase": state["phase"]}})  # noqa: E731
    return loop.Setup(model, optimizer, optim.build_scheduler(cfg, optimizer), fuse=LateFusionModel.fuse,
                      state=state, schedule=loop.Schedule(3, scheduler_before_epoch=True, phase=phase))


def epoch_end(setup, ctx, val):   # the phase changes here, after the epoch's validation
    setup.state["phase"] = "main"


def step(setup, batch, ctx):
    loss = F.cross_entropy(LateFusionModel.fuse(setup.model(batch)), batch["label"])
    setup.optimizer.zero_grad()
    ctx.accelerator.backward(loss)
    setup.optimizer.step()
    return {{"train/loss": loss.detach()}}


if __name__ == "__main__":
    loop.run_entry_point(lambda cfg: loop.train(cfg, method="phased", build=build, step=step, epoch_end=epoch_end),
                         CONFIG, None)
'''


@pytest.mark.slow
def test_a_schedule_sets_the_runs_length_its_scheduler_steps_and_its_phase(seq3, tmp_path):
    """loop.Schedule, used by a method other than IGM: the run lasts the schedule's 3 epochs (not
    `epochs`), the scheduler steps before each epoch (lr 0.04, 0.02, 0.01 over the epochs of 4
    steps), each metrics.jsonl record carries the phase; a plateau scheduler is refused with it."""
    script = tmp_path / "phased.py"
    script.write_text(PHASED_METHOD.format(data=str(seq3)))
    out = tmp_path / "run"
    run_script(str(script), ["--out_dir", str(out), "--batch_size", "64", "--progress", "false"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(list(r)[:4], r["epoch"], r["phase"]) for r in records] == [
        (["epoch", "phase", "step", "val"], 1, "warm-up"), (["epoch", "phase", "step", "val"], 2, "main"),
        (["epoch", "phase", "step", "val"], 3, "main")]
    assert tb_scalars(out)["train/lr"] == pytest.approx({2: 0.04, 4: 0.04, 6: 0.02, 8: 0.02, 10: 0.01, 12: 0.01})
    proc = run_script(str(script), ["--out_dir", str(tmp_path / "plateau"), "--scheduler", "plateau"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: scheduler=plateau: phased () steps its scheduler before each epoch, before any validation loss "
        "exists; choose another scheduler"]
    assert not (tmp_path / "plateau").exists()


# A training loop, structurally: a loop over epochs (its target, iterable or condition names an
# epoch), or a loop that takes batches (its iterable names a loader, the batches or the progress bar,
# or its target is a batch) and updates the model in its body (a call of backward or of a step: a
# method's step, optimizer.step, scheduler.step). A pass that only reads batches (evaluation, input
# statistics) is not one.
LOADER_WORDS = {"loader", "loaders", "dataloader", "dl", "batches", "bar"}
UPDATE_WORDS = {"step", "backward"}


def _words(node) -> set[str]:
    """The lower-cased '_'-separated words of every name, attribute and string in `node`."""
    names = [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    names += [n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)]
    names += [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return {w for name in names for w in name.lower().split("_")}


def _called_words(statements) -> set[str]:
    """The words of the names of the functions called in `statements`."""
    calls = [n.func for s in statements for n in ast.walk(s) if isinstance(n, ast.Call)]
    return {w for f in calls for w in (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")).lower().split("_")}


def training_loops(source: str) -> list[int]:
    """Line numbers of the training loops in `source` (the rule above)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.While):
            is_training = _words(node.test) & {"epoch", "epochs"}
        elif isinstance(node, ast.For):
            takes_batches = _words(node.iter) & LOADER_WORDS or "batch" in _words(node.target)
            is_training = (_words(node.target) | _words(node.iter)) & {"epoch", "epochs"} or (
                takes_batches and _called_words(node.body) & UPDATE_WORDS)
        else:
            continue
        if is_training:
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("source, loops", [
    ("for batch in loader:\n    stats = step(setup, batch, ctx)", [1]),
    ("for i, (x, y) in enumerate(train_dl):\n    loss = f(x, y)\n    loss.backward()\n    opt.step()", [1]),
    ("for b in ctx.loaders['train']:\n    gaal_step(model, b)", [1]),
    ("for epoch in range(cfg['epochs']):\n    run_epoch()", [1]),
    ("for _ in range(n_epochs):\n    run_epoch()", [1]),
    ("while position['epoch'] < epochs:\n    pass", [1]),
    ("for batch in loader:\n    outputs.append(model(batch))", []),              # an evaluation pass
    ("for m in modalities:\n    losses[m].backward()\n    optimizer.step()", []),  # inside one step
])
def test_training_loop_rule(source, loops):
    assert training_loops(source) == loops


def test_one_epoch_loop_in_train():
    """The skeleton exists once: train/loop.py holds the training loop (the rule finds it there), and
    no other file of the training code (train/, methods/, models/) has one or writes checkpoints itself."""
    assert training_loops((REPO / "train" / "loop.py").read_text()), "the rule no longer finds loop.py's loop"
    for path in sorted(p for d in ("train", "methods", "models") for p in (REPO / d).rglob("*.py")):
        where = path.relative_to(REPO).as_posix()
        if where in ("train/loop.py", "train/checkpoint.py"):   # the loop; where save_checkpoint is defined
            continue
        text = path.read_text()
        assert not training_loops(text), f"{where}: a training loop at line(s) {training_loops(text)} (use train/loop.py)"
        assert "save_checkpoint(" not in text, f"{where} writes checkpoints itself (train/loop.py does)"


@pytest.mark.slow
def test_adding_a_method_example_trains_end_to_end(tmp_path):
    """docs/adding-a-method.md's complete example, extracted from the page and run as written."""
    page = (REPO / "docs" / "adding-a-method.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    script = tmp_path / "ensemble.py"
    script.write_text(code)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(script), "--data", str(REPO / "data" / "embedded_av"), "--out_dir",
                           str(out), "--epochs", "1", "--progress", "false", "--label_smoothing", "0.1", "--encoders",
                           "{audio: {arch: resnet10, base_width: 8}, video: {arch: resnet10, base_width: 8, "
                           "small_input: true}}"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "ensemble" and set(result["test"]) == {"audio", "video", "fused"}
    assert result["test"]["fused"]["acc"] > 0.5
    assert yaml.safe_load((out / "config.yaml").read_text())["label_smoothing"] == 0.1
    help_ = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "cross-entropy label smoothing of every head" in help_.stdout
