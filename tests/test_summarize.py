"""scripts/summarize.py --paired and --trace on synthetic run directories (result.json, metrics.jsonl,
TensorBoard scalars)."""
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_evaluate import assert_one_error_line

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("summarize", ROOT / "scripts" / "summarize.py")   # a script, not a package
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)

BAYES = {"image": 0.645, "table": 0.951, "all": 0.978}


def fake_run(root: Path, name: str, image_test: float, image_vals: list) -> None:
    d = root / name
    d.mkdir(parents=True)
    result = {"run_dir": str(d), "bayes_accuracy": BAYES,
              "test": {"image": {"acc": image_test}, "table": {"acc": 0.95}, "fused": {"acc": 0.97}}}
    (d / "result.json").write_text(json.dumps(result))
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e + 1, "step": 10 * (e + 1),
                    "val": {"image": {"acc": v}, "table": {"acc": 0.94}, "fused": {"acc": 0.96}}}) + "\n"
        for e, v in enumerate(image_vals)))


@pytest.fixture
def runs(tmp_path):
    # A beats B by 0.02, 0.01, -0.01 on test; seed 3 of B never finished (no result.json), seed 4 of A
    # is missing: only seeds 0-2 pair up. Best validation at any epoch: A − B = 0.03, 0.00, 0.06.
    for seed, (ta, tb, va, vb) in enumerate([(0.56, 0.54, [0.50, 0.60], [0.57, 0.55]),
                                             (0.55, 0.54, [0.58, 0.52], [0.58, 0.50]),
                                             (0.53, 0.54, [0.61, 0.40], [0.55, 0.52])]):
        fake_run(tmp_path, f"A_s{seed}", ta, va)
        fake_run(tmp_path, f"B_s{seed}", tb, vb)
    fake_run(tmp_path, "A_s3", 0.9, [0.9])
    (tmp_path / "B_s3").mkdir()
    fake_run(tmp_path, "B_s4", 0.1, [0.1])
    fake_run(tmp_path, "A_long_s0", 0.0, [0.0])     # another config whose name starts with "A_"
    return tmp_path


def test_paired_rows_pair_by_seed_and_take_the_weakest_modality(runs):
    modality, rows = summarize.paired_rows(str(runs), "A", "B")
    assert modality == "image"
    assert [r[0] for r in rows] == [0, 1, 2]
    assert rows[0] == pytest.approx((0, 0.56, 0.54, 0.60, 0.57))
    diffs = [r[1] - r[2] for r in rows]
    stats = summarize.paired_stats(diffs)
    assert stats["mean"] == pytest.approx((0.02 + 0.01 - 0.01) / 3)
    assert stats["std"] == pytest.approx(0.015275, abs=1e-6)
    assert stats["se"] == pytest.approx(0.015275 / 3 ** 0.5, abs=1e-6)
    assert (stats["above"], stats["tied"], stats["below"]) == (2, 0, 1)
    val = summarize.paired_stats([r[3] - r[4] for r in rows])
    assert val["mean"] == pytest.approx(0.03)
    assert (val["above"], val["tied"], val["below"]) == (2, 1, 0)


def test_paired_cli_prints_the_table(runs):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), "--paired", str(runs), "A", "B"],
                         capture_output=True, text=True, check=True).stdout
    assert "| 2 | 0.5300 | 0.5400 | -0.0100 | 0.6100 | 0.5500 | +0.0600 |" in out
    assert "| mean ± std (standard error), 3 pairs | | | +0.0067 ± 0.0153 (0.0088) | | | +0.0300 ± 0.0300 (0.0173) |" in out
    assert "| A above / tied / below | | | 2 / 0 / 1 | | | 2 / 1 / 0 |" in out


def test_paired_without_common_seeds_fails(runs):
    with pytest.raises(SystemExit):
        summarize.paired_rows(str(runs), "A", "nothing")


def test_trace_reads_coefficients_per_epoch(tmp_path):
    """--trace on a two-modality run whose c_i and classifier batch accuracies are known per step."""
    from torch.utils.tensorboard import SummaryWriter
    run = tmp_path / "official_s0"
    run.mkdir()
    (run / "config.yaml").write_text("rho: 2.0\nlog_every: 1\nmodulation: true\ndirection: true\nvariant: official\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"epoch": 1, "step": 4, "val": {"a": {"acc": 0.9}, "b": {"acc": 0.4}}}) + "\n"
        + json.dumps({"epoch": 2, "step": 6, "val": {"a": {"acc": 0.95}, "b": {"acc": 0.5}}}) + "\n")
    coeff_b = [0.5, -0.25, 1e-9, 0.75, 2.0, 0.0]
    acc_b = [0.1, 0.3, 0.2, 0.4, 0.5, 0.5]
    with SummaryWriter(str(run / "tb")) as writer:
        for step in range(1, 7):
            writer.add_scalar("b/coeff", coeff_b[step - 1], step)
            writer.add_scalar("a/coeff", 1 - coeff_b[step - 1], step)
            writer.add_scalar("b/clf_metric", acc_b[step - 1], step)
            writer.add_scalar("a/clf_metric", 0.9, step)
    names, rows = summarize.trace_rows(run)
    assert names == ["a", "b"]
    assert [r["epoch"] for r in rows] == [1, 2, "all"]
    first, second, whole = rows[0]["b"], rows[1]["b"], rows[2]["b"]
    assert first["median_rho_c"] == pytest.approx(2.0 * (1e-9 + 0.5) / 2)    # median of 1.0, -0.5, 2e-9, 1.5
    assert (first["neg"], first["zero"], first["shrunk"]) == (0.25, 0.25, 0.5)
    assert first["clf_batch_acc"] == pytest.approx(0.25)
    assert first["d_std"] == pytest.approx(statistics.stdev([0.2, -0.1, 0.2]))
    assert first["clf_val_acc"] == 0.4 and second["clf_val_acc"] == 0.5
    assert (second["neg"], second["zero"], second["shrunk"]) == (0.0, 0.5, 0.5)
    assert whole["neg"] == pytest.approx(1 / 6) and whole["zero"] == pytest.approx(2 / 6)
    assert rows[2]["a"]["d_std"] == pytest.approx(0.0)


def test_ablation_and_baselines_without_bayes_limits(tmp_path, capsys):
    """A dataset whose meta.json has no Bayes limits (any real dataset): the tables print "-" for the
    limits, and the weak modality is the one with the lowest mean test accuracy (was a TypeError:
    'NoneType' object is not subscriptable)."""
    for seed, (image, table) in enumerate([(0.55, 0.95), (0.57, 0.93)]):
        d = tmp_path / "abl" / f"official_s{seed}"
        d.mkdir(parents=True)
        result = {"run_dir": str(d), "bayes_accuracy": None,
                  "test": {"image": {"acc": image}, "table": {"acc": table}, "fused": {"acc": 0.97}}}
        (d / "result.json").write_text(json.dumps(result))
        (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 10, "val": {
            "image": {"acc": 0.5 + seed / 10}, "table": {"acc": 0.9}, "fused": {"acc": 0.96}}}) + "\n")
    summarize.ablation(str(tmp_path / "abl"))
    out = capsys.readouterr().out
    assert "| run | seeds | image: head | table: head | fused | image: head, best val, any epoch |" in out
    assert "| official | 2 | 0.560 ± 0.014 | 0.940 ± 0.014 | 0.970 ± 0.000 | 0.550 ± 0.071 |" in out
    joint = tmp_path / "base" / "joint_mine"
    joint.mkdir(parents=True)
    (joint / "result.json").write_text(json.dumps({"bayes_accuracy": None, "test": {"image": {"acc": 0.5}}}))
    other = tmp_path / "base" / "joint_other"   # evaluated: its fused model with only the image, the image's Shapley value
    other.mkdir()
    (other / "result.json").write_text(json.dumps({"bayes_accuracy": None, "test": {
        "image": {"acc": 0.6}, "table": {"acc": 0.9}, "fused": {"acc": 0.95}}}))
    fake_evaluation(other, {"image": 0.45, "table": 0.85}, {"image": 0.2, "table": 0.6})
    summarize.main(str(tmp_path / "base"))
    out = capsys.readouterr().out
    assert "| mine | image | - | 0.500 | - | - | - | - |" in out
    assert "| other | image | - | 0.600 | - | - | 0.450 | 0.200 |" in out
    assert "| other | fused | - | 0.950 | - | - | - | - |" in out
    assert out.strip().splitlines()[-1] == ("`-` in the last two columns: 1 run(s) without an evaluation.json: fill them "
                                            f"with `python -m train.evaluate {joint}`, then run this again.")


def evaluation_entry(only: dict, shapley: dict) -> dict:
    """An entry of evaluation.json in train.evaluate's layout: the fused accuracy with each single
    modality present is `only[m]`, the Shapley values `shapley`; every other subset 0.5."""
    modalities = list(shapley)
    subsets = []
    for k in range(len(modalities) + 1):
        for present in itertools.combinations(modalities, k):
            acc = only[present[0]] if len(present) == 1 else 0.5
            subsets.append({"present": list(present), "absent": [m for m in modalities if m not in present],
                            "fused": {"acc": acc, "macro_f1": acc}})
    return {"rules": {"absent": "mean"}, "modalities": modalities, "subsets": subsets,
            "shapley": {"metric": "acc", "values": shapley, "v_all": 0.97, "v_empty": 0.1}}


def fake_evaluation(run_dir: Path, only: dict, shapley: dict) -> None:
    """<run_dir>/evaluation.json with the test entry evaluation_entry(only, shapley)."""
    entry = evaluation_entry(only, shapley)
    (run_dir / "evaluation.json").write_text(json.dumps({"run_dir": str(run_dir), "test": entry}))


def test_ablation_adds_the_readings_that_are_the_same_for_every_method(runs, capsys):
    """Besides each method's own head, every modality gets `fused, only <m>` and `Shapley <m>` from
    evaluation.json (mean ± std over seeds); a row with a run not evaluated shows "-" there and the
    line under the table names the runs and the command that fills them; a unimodal row shows "-" for
    the modality it lacks."""
    for seed, (image, table, phi) in enumerate([(0.45, 0.90, 0.20), (0.47, 0.92, 0.22), (0.49, 0.94, 0.24)]):
        fake_evaluation(runs / f"A_s{seed}", {"image": image, "table": table}, {"image": phi, "table": 0.6})
    fake_evaluation(runs / "A_s3", {"image": 0.45, "table": 0.90}, {"image": 0.2, "table": 0.6})
    fake_evaluation(runs / "B_s0", {"image": 0.40, "table": 0.95}, {"image": 0.1, "table": 0.7})   # B_s1 ... not
    alone = runs / "image_alone_s0"
    alone.mkdir()
    (alone / "result.json").write_text(json.dumps({"run_dir": str(alone), "bayes_accuracy": BAYES,
                                                   "test": {"image": {"acc": 0.56}, "fused": {"acc": 0.56}}}))
    (alone / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 10, "val": {
        "image": {"acc": 0.55}, "fused": {"acc": 0.55}}}) + "\n")
    fake_evaluation(alone, {"image": 0.56}, {"image": 0.46})
    summarize.ablation(str(runs))
    out = capsys.readouterr().out
    assert ("| run | seeds | image: head (Bayes 0.645) | table: head (Bayes 0.951) | fused (Bayes 0.978) "
            "| image: head, best val, any epoch | fused, only image | fused, only table | Shapley image "
            "| Shapley table |") in out
    assert "|---|---|" + "---|" * 8 + "\n" in out
    assert ("| A | 4 | 0.635 ± 0.177 | 0.950 ± 0.000 | 0.970 ± 0.000 | 0.672 ± 0.152 "
            "| 0.465 ± 0.019 | 0.915 ± 0.019 | 0.215 ± 0.019 | 0.600 ± 0.000 |") in out
    assert "| B | 4 | 0.430 ± 0.220 | 0.950 ± 0.000 | 0.970 ± 0.000 | 0.450 ± 0.234 | - | - | - | - |" in out
    assert "| image_alone | 1 | 0.560 ± 0.000 | - | 0.560 ± 0.000 | 0.550 ± 0.000 | 0.560 ± 0.000 | - | 0.460 ± 0.000 | - |" in out
    assert "| A_long | 1 |" in out and "`fused, only <m>`: the fused model with every other modality absent" in out
    assert "absent modalities (train.evaluate --absent mean)" in out
    missing = [runs / name for name in ("B_s1", "B_s2", "B_s4", "A_long_s0")]
    hint = out.strip().splitlines()[-1]
    assert hint.startswith("`-` under `fused, only <m>` / `Shapley <m>`: 4 run(s) without an evaluation.json")
    assert sorted(hint.split("`python -m train.evaluate ")[1].split("`")[0].split()) == sorted(map(str, missing))


def test_paired_adds_the_uniform_readings_of_the_compared_modality(runs, capsys):
    """--paired: after the heads' table, the same seed-by-seed comparison of `fused, only <m>` and
    `Shapley <m>` from evaluation.json; without every run evaluated, the command that fills them."""
    summarize.paired(str(runs), ["A", "B"])
    out = capsys.readouterr().out
    assert "image: head, A against B (same seed), accuracy:" in out
    assert "fill them with `python -m train.evaluate " in out
    for seed, (a, b) in enumerate([(0.45, 0.40), (0.47, 0.44), (0.49, 0.49)]):
        fake_evaluation(runs / f"A_s{seed}", {"image": a, "table": 0.9}, {"image": a / 2, "table": 0.6})
        fake_evaluation(runs / f"B_s{seed}", {"image": b, "table": 0.9}, {"image": b / 2, "table": 0.6})
    summarize.paired(str(runs), ["A", "B"])
    out = capsys.readouterr().out.split("the readings the same for every method (evaluation.json)", 1)[1]
    assert ("| seed | A: fused, only image | B: fused, only image | fused, only image: A − B | A: Shapley image "
            "| B: Shapley image | Shapley image: A − B |") in out
    assert "| 0 | 0.4500 | 0.4000 | +0.0500 | 0.2250 | 0.2000 | +0.0250 |" in out
    assert "| mean ± std (standard error), 3 pairs | | | +0.0267 ± 0.0252 (0.0145) | | | +0.0133 ± 0.0126 (0.0073) |" in out
    assert "| A above / tied / below | | | 2 / 1 / 0 | | | 2 / 1 / 0 |" in out


def run_summarize(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize.py"), *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("mode, run, name, corrupt", [
    ("--ablation", "A_s1", "result.json", lambda text: text[:len(text) // 2]),           # truncated
    ("--ablation", "A_s1", "result.json", lambda text: "[]"),
    ("--paired", "A_s1", "result.json", lambda text: text.replace('"test"', '"tset"')),  # no test
    ("--paired", "B_s0", "metrics.jsonl", lambda text: text.replace("}\n", "\n", 1)),   # line 1 cut, line 2 whole
    ("--ablation", "A_s2", "metrics.jsonl", lambda text: text.replace("\n", "\n\"a\"\n", 1)),
    ("--ablation", ".", "jobs.txt", lambda text: "A_s0\n\udcff\n"),
    ("--ablation", "A_s1", "evaluation.json", lambda text: '{"test": {"rules": {"ab'),         # cut short
    ("--ablation", "A_s1", "evaluation.json", lambda text: '{"test": []}'),
    ("--ablation", "B_s2", "evaluation.json", lambda text: '{"test": {"subsets": []}}'),     # no shapley
    ("--paired", "B_s1", "evaluation.json", lambda text: '{"test": {"shapley": {"metric": "acc"}, "subsets": []}}'),
])
def test_a_corrupt_run_file_is_refused_in_one_line(runs, mode, run, name, corrupt):
    """summarize.py on a truncated result.json, a cut metrics.jsonl line that is not the last, a jobs
    list that is not text, an evaluation.json cut short or not of train.evaluate's layout: exit 2, one
    `error:` line naming the file, no traceback."""
    path = runs / run / name
    text = path.read_text() if path.is_file() else ""
    path.write_bytes(corrupt(text).encode("utf-8", "surrogateescape"))
    args = [mode, runs] + (["A", "B"] if mode == "--paired" else [])
    line = assert_one_error_line(run_summarize(*args), path)
    if name == "metrics.jsonl":
        assert " line 1: " in line or " line 2: " in line


def test_trace_refuses_a_config_yaml_that_is_not_yaml(tmp_path):
    run = tmp_path / "official_s0"
    run.mkdir()
    (run / "config.yaml").write_text("rho: [2.0\nlog_every: 1\n")
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 4, "val": {}}) + "\n")
    assert "not valid YAML" in assert_one_error_line(run_summarize("--trace", run), run / "config.yaml")


def test_a_cut_last_metrics_line_is_skipped_with_a_warning(runs):
    """A run killed while writing its last metrics.jsonl line: that line is skipped with one warning
    naming the file and the line, the whole lines count (A_s0's best validation: 0.50, not 0.60)."""
    path = runs / "A_s0" / "metrics.jsonl"
    first, second = path.read_text().splitlines()
    path.write_text(first + "\n" + second[:20])
    proc = run_summarize("--paired", runs, "A", "B")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [f"warning: {path}: line 2 is cut short (a run killed while writing it); "
                                        "skipped"]
    assert "| 0 | 0.5600 | 0.5400 | +0.0200 | 0.5000 | 0.5700 | -0.0700 |" in proc.stdout


def test_read_jsonl_skips_only_a_cut_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    whole = json.dumps({"epoch": 1}) + "\n" + json.dumps({"epoch": 2}) + "\n"
    path.write_text(whole)
    assert summarize.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    path.write_bytes(whole.encode() + b'{"epoch": 3, "name": "\xc3')   # cut inside a UTF-8 character
    assert summarize.read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
    path.write_text(whole + '{"epoch": 3, "val\n')   # ends with a newline: written whole, so corrupt
    with pytest.raises(summarize.ConfigError, match=f"{path}: line 3: not valid JSON"):
        summarize.read_jsonl(path)
    path.write_text('{"epoch": 1, "val\n' + whole)
    with pytest.raises(summarize.ConfigError, match=f"{path}: line 1: not valid JSON"):
        summarize.read_jsonl(path)
    path.write_text(whole + "[3]\n")
    with pytest.raises(summarize.ConfigError, match=f"{path}: line 3: a JSON array, not an object"):
        summarize.read_jsonl(path)
