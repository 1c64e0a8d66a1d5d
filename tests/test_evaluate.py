"""train.evaluate: the Shapley maths on games whose contributions are known, the input rules (uint8
pixels, tabular codes), and the command on a real tiny run (metrics equal result.json, efficiency,
a modality the model ignores contributes 0, missing/noise entries, re-runs, refusals)."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from data_prep import embedded
from tests.test_train import REPO, run_script, seq3_args
from train import evaluate


# ------------------------------------------------------------------------------------------------
# Shapley values

def test_additive_game_gives_each_player_its_own_value():
    a = {"text": 0.3, "audio": -0.1, "vision": 0.05, "x": 0.2}
    players = list(a)
    value = {frozenset(s): sum(a[m] for m in s) for s in evaluate.subsets(players)}
    assert evaluate.shapley_values(value, players) == pytest.approx(a, abs=1e-12)


def test_ignored_player_gets_zero_and_efficiency_holds():
    rng = random.Random(0)
    for m in (1, 2, 3, 4):
        players = [f"p{i}" for i in range(m)]
        base = {frozenset(s): rng.random() for s in evaluate.subsets(players[1:])}
        # p0 never changes the value: v(S) = v(S without p0)
        value = {frozenset(s): base[frozenset(s) - {"p0"}] for s in evaluate.subsets(players)}
        phi = evaluate.shapley_values(value, players)
        assert phi["p0"] == pytest.approx(0, abs=1e-12)
        assert sum(phi.values()) == pytest.approx(value[frozenset(players)] - value[frozenset()], abs=1e-12)
    # symmetric players share equally; the weights of one player sum to one over the subsets' sizes
    value = {frozenset(s): float(len(s) >= 2) for s in evaluate.subsets(["a", "b", "c"])}
    assert evaluate.shapley_values(value, ["a", "b", "c"]) == pytest.approx({m: 1 / 3 for m in "abc"})
    assert len(evaluate.subsets(list("abcd"))) == 16 and evaluate.subsets(["a", "b"])[0] == ()


# ------------------------------------------------------------------------------------------------
# Input rules

SPECS = {"image": {"kind": "image"},
         "table": {"kind": "tabular", "continuous": ["c0", "c1"], "categorical": {"colour": 3, "body": 2}}}


def test_input_rules_on_uint8_pixels_and_tabular_codes():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (10, 3, 2, 2), dtype=torch.uint8, generator=g)
    codes = torch.tensor([[0, 1], [2, 1], [2, 0], [2, 1], [1, 1], [2, 0], [0, 1], [2, 1], [1, 0], [2, 1]])
    table = torch.cat([torch.randn(10, 2, generator=g), codes.float()], 1)
    batches = [{"image": image[:6], "table": table[:6], "label": torch.zeros(6, dtype=torch.long)},
               {"image": image[6:], "table": table[6:], "label": torch.zeros(4, dtype=torch.long)}]
    stats = evaluate.input_stats(batches, {"modalities": SPECS}, ["image", "table"], "cpu")
    pixels = image.double() / 255
    torch.testing.assert_close(stats["image"]["mean"], pixels.mean(0).float())
    torch.testing.assert_close(stats["image"]["std"], pixels.std(0, unbiased=False).float())
    assert stats["table"]["mode"].tolist() == [2.0, 1.0]   # the most frequent code of each column

    absent = evaluate.absent_input(image[:4], stats["image"], SPECS["image"], "mean")
    assert absent.dtype == torch.float32 and absent.shape == (4, 3, 2, 2)
    torch.testing.assert_close(absent[3], pixels.mean(0).float())
    zeros = evaluate.absent_input(image[:4], stats["image"], SPECS["image"], "zero")
    assert torch.equal(zeros, torch.zeros(4, 3, 2, 2))
    filled = evaluate.absent_input(table[:4], stats["table"], SPECS["table"], "mean")
    torch.testing.assert_close(filled[:, :2], table[:, :2].double().mean(0).float().expand(4, 2))
    assert filled[:, 2:].tolist() == [[2.0, 1.0]] * 4
    zero = evaluate.absent_input(table[:4], stats["table"], SPECS["table"], "zero")
    assert zero[:, :2].abs().sum() == 0 and zero[:, 2:].tolist() == [[-1.0, -1.0]] * 4

    clean = evaluate.noisy_input(image, stats["image"], SPECS["image"], 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(clean, image.float() / 255)   # level 0: the pixels as the encoders read them
    noisy = evaluate.noisy_input(table, stats["table"], SPECS["table"], 2.0, torch.Generator().manual_seed(1))
    assert torch.equal(noisy[:, 2:], table[:, 2:])           # codes unchanged
    ratio = (noisy[:, :2] - table[:, :2]) / stats["table"]["std"][:2]
    expected = 2.0 * torch.randn(table.shape, generator=torch.Generator().manual_seed(1))[:, :2]
    torch.testing.assert_close(ratio, expected)              # level x per-element std x N(0, 1)


# ------------------------------------------------------------------------------------------------
# The command on a real tiny run

@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = embedded.generate(root / "data", "seq3", seed=3, n_train=512, n_val=128, n_test=128)
    out = root / "joint_s0"
    run_script("train/joint.py", seq3_args(data, out))
    return out


def run_evaluate(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "train.evaluate", *map(str, args), "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_evaluation_of_a_real_run(joint_run):
    result = json.loads((joint_run / "result.json").read_text())
    assert result["script"] == "train.joint"
    proc = run_evaluate(joint_run, "--noise_levels", "0,1,8")
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((joint_run / "evaluation.json").read_text())
    entry = stored["test"]
    assert stored["script"] == "train.joint" and entry["rules"]["absent"] == "mean"
    assert entry["metrics"] == result["test"]   # the selected model, rebuilt: the same numbers
    modalities = ["text", "audio", "vision"]
    values = {frozenset(row["present"]): row["fused"]["acc"] for row in entry["subsets"]}
    assert set(values) == {frozenset(s) for s in evaluate.subsets(modalities)}
    assert values[frozenset(modalities)] == result["test"]["fused"]["acc"]
    shapley = entry["shapley"]
    assert shapley["metric"] == "acc" and shapley["v_empty"] == values[frozenset()]
    assert shapley["values"] == pytest.approx(evaluate.shapley_values(values, modalities), abs=1e-12)
    # additive logits: the contributions add up to the fused gain over "no modality" (about chance)
    assert sum(shapley["values"].values()) == pytest.approx(shapley["v_all"] - shapley["v_empty"], abs=1e-12)
    assert shapley["v_empty"] < 0.3 < shapley["v_all"]   # 8 classes
    for m in modalities:
        curve = entry["noise"][m]
        assert [p["level"] for p in curve] == [0.0, 1.0, 8.0] and curve[0]["fused"] == result["test"]["fused"]
    # the strong modality (text) drowned in noise: the fused accuracy falls
    assert entry["noise"]["text"][2]["fused"]["acc"] < result["test"]["fused"]["acc"] - 0.1
    assert "Shapley text" in proc.stdout

    # same rules, same best.pt: skipped; another split and rule: a second entry beside the first
    again = run_evaluate(joint_run, "--noise_levels", "0,1,8")
    assert "test up to date" in again.stdout
    val = run_evaluate(joint_run, "--split", "val", "--absent", "zero", "--noise_levels", "0,1")
    assert val.returncode == 0, val.stderr
    stored = json.loads((joint_run / "evaluation.json").read_text())
    assert stored["test"] == entry and stored["val"]["metrics"] == result["val"]
    assert stored["val"]["rules"]["absent"] == "zero"


@pytest.mark.slow
def test_a_modality_the_model_ignores_contributes_nothing(joint_run, tmp_path):
    run = tmp_path / "ignored_s0"
    shutil.copytree(joint_run, run, ignore=shutil.ignore_patterns("evaluation.json"))
    state = torch.load(run / "best.pt", weights_only=True)
    state["heads.vision.weight"].zero_()   # the vision logits are 0 whatever its input
    state["heads.vision.bias"].zero_()
    torch.save(state, run / "best.pt")
    proc = run_evaluate(run, "--noise_levels", "0,4")
    assert proc.returncode == 0, proc.stderr
    entry = json.loads((run / "evaluation.json").read_text())["test"]
    assert entry["shapley"]["values"]["vision"] == 0.0
    values = {frozenset(row["present"]): row["fused"]["acc"] for row in entry["subsets"]}
    for s in evaluate.subsets(["text", "audio"]):
        assert values[frozenset(s) | {"vision"}] == values[frozenset(s)]
    assert entry["noise"]["vision"][1]["fused"] == entry["noise"]["vision"][0]["fused"]


@pytest.mark.slow
def test_bad_run_directories_are_refused_in_one_line(joint_run, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(joint_run, partial, ignore=shutil.ignore_patterns("best.pt"))
    for args, expected in (([partial], f"{partial}: no best.pt (not a finished run directory)"),
                           ([tmp_path / "nothing*"], "matches no path"),
                           ([joint_run, tmp_path], f"{tmp_path}: no result.json")):
        proc = run_evaluate(*args)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    wrong = tmp_path / "wrong"
    shutil.copytree(joint_run, wrong)
    result = json.loads((wrong / "result.json").read_text())
    (wrong / "result.json").write_text(json.dumps(dict(result, script="train.unimodal")))
    proc = run_evaluate(wrong)
    assert proc.returncode == 2 and "train.unimodal has no build(cfg, ctx)" in proc.stderr


def assert_one_error_line(proc, path) -> str:
    """The project's refusal of bad input: exit status 2 and ONE line on stderr, `error: <path>: ...`,
    no traceback. Returns that line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("content, expected", [
    (b'{"run_dir": "x", "test": {"rules": {"absent": "me', "not valid JSON"),   # cut short
    (b'[{"test": {}}]', "top level is a JSON array"),                            # valid JSON, wrong type
    (b'{"test": [1, 2]}', "its 'test' entry is a JSON array"),                    # an entry of the wrong type
    (b'{"test": {"rules": "\xff\xfe"}}', "not UTF-8"),
])
def test_a_corrupt_evaluation_json_is_refused_before_any_compute(joint_run, tmp_path, content, expected):
    """Every directory's evaluation.json is read in the check before any compute: the first run (not
    evaluated yet) is left alone when the second's evaluation.json is corrupt."""
    fresh, corrupt = tmp_path / "fresh_s0", tmp_path / "corrupt_s0"
    for run in (fresh, corrupt):
        shutil.copytree(joint_run, run, ignore=shutil.ignore_patterns("evaluation.json"))
    (corrupt / "evaluation.json").write_bytes(content)
    line = assert_one_error_line(run_evaluate(fresh, corrupt), corrupt / "evaluation.json")
    assert expected in line
    assert not (fresh / "evaluation.json").exists()


@pytest.mark.parametrize("name, content, expected", [
    ("config.yaml", b"epochs: 3\nlr: \xff\n", "not UTF-8"),
    ("config.yaml", b"epochs: [3\nlr: 0.1\n", "not valid YAML"),
    ("config.yaml", b"- epochs\n- 3\n", "top level is a list"),
    ("result.json", b'["method", "test"]', "top level is a JSON array"),
])
def test_a_corrupt_config_or_result_is_refused_in_one_line(joint_run, tmp_path, name, content, expected):
    run = tmp_path / "corrupt_s0"
    shutil.copytree(joint_run, run, ignore=shutil.ignore_patterns("evaluation.json"))
    (run / name).write_bytes(content)
    assert expected in assert_one_error_line(run_evaluate(run), run / name)
