"""scripts/report.py on two real tiny runs (joint and GAAL on the three-sequence set, text + audio):
the report and its figures exist, the images decode, the tables hold the runs' numbers."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from data_prep import embedded
from tests.test_evaluate import assert_one_error_line
from tests.test_summarize import evaluation_entry
from tests.test_train import REPO, SEQ_ENCODER, run_script

MODALITIES = ["text", "audio"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = embedded.generate(root / "data", "seq3", seed=3, n_train=256, n_val=128, n_test=128)
    runs = root / "runs"
    for group, script in (("joint", "train/joint.py"), ("gaal", "train/gaal.py")):
        args = ["--data", str(data), "--out_dir", str(runs / f"{group}_s0"), "--modalities", "[text,audio]",
                "--epochs", "2", "--batch_size", "64", "--eval_batch_size", "128", "--log_every", "1",
                "--progress", "false"]
        run_script(script, args + [f"--encoders.{m}.{k}" if i == 0 else str(v) for m in MODALITIES
                                   for k, v in SEQ_ENCODER.items() for i in range(2)])
    (runs / "jobs.txt").write_text("joint_s0 train/joint.py\ngaal_s0 train/gaal.py\n")
    return runs


def rows(markdown: str, heading: str) -> dict:
    """{first cell: [other cells]} of the first table after `heading`."""
    text = markdown.split(heading, 1)[1]
    table = {}
    for line in text.splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set(cells[0]) <= set("-"):
                table[cells[0]] = cells[1:]
        elif table:
            break
    return table


@pytest.mark.slow
def test_report_renders_from_two_runs(ablation, tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "scripts/report.py", str(ablation), "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {out / 'report.md'}" in proc.stdout
    md = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    for name in ("val_curves.png", "shapley.png", "missing.png", "noise.png", "diag_gaal_conflict.png",
                 "diag_gaal_v.png", "diag_joint_cos.png"):
        assert name in images
    for name in images:
        with Image.open(out / name) as image:
            image.load()   # decodes
            assert image.format == "PNG" and image.width > 300 and image.height > 200

    results = {g: json.loads((ablation / f"{g}_s0" / "result.json").read_text()) for g in ("joint", "gaal")}
    evaluations = {g: json.loads((ablation / f"{g}_s0" / "evaluation.json").read_text())["test"] for g in results}
    summary = rows(md, "## Summary")
    assert list(summary) == ["run", "joint", "gaal"]   # jobs.txt order
    assert summary["run"] == ["seeds", *[f"{m}: head" for m in MODALITIES], "fused",
                              *[f"fused, only {m}" for m in MODALITIES], *[f"Shapley {m}" for m in MODALITIES]]

    def readings(g):   # each column's value of the group's one run: its own, then evaluation.json's
        only = {row["present"][0]: row["fused"]["acc"] for row in evaluations[g]["subsets"] if len(row["present"]) == 1}
        return ([results[g]["test"][n]["acc"] for n in [*MODALITIES, "fused"]] + [only[m] for m in MODALITIES]
                + [evaluations[g]["shapley"]["values"][m] for m in MODALITIES])
    for g in results:
        assert summary[g] == ["1", *[f"{v:.4f} ± 0.0000" for v in readings(g)]]
    paired = rows(md, "### Paired difference against joint")
    assert list(paired) == ["run − joint", "gaal"]
    assert paired["gaal"] == ["1", *[f"{a - b:+.4f} ± 0.0000 ({int(a > b)}/{int(a < b)})"
                                     for a, b in zip(readings("gaal"), readings("joint"))]]
    assert "`fused, only <m>`: the fused model with every other modality absent" in md
    shapley = rows(md, "## Modality contribution")
    for g, entry in evaluations.items():
        assert shapley[g][:2] == [f"{entry['shapley']['values'][m]:.4f} ± 0.0000" for m in MODALITIES]
        assert shapley[g][2] == f"{entry['shapley']['v_all']:.4f} ± 0.0000"
        assert entry["metrics"] == results[g]["test"]


@pytest.fixture
def report_module(monkeypatch):
    """scripts/report.py as a module (a script: it imports summarize from its own folder)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("report", REPO / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_and_paired_tables_add_the_uniform_readings(report_module, tmp_path):
    """The comparison tables of the report on hand-written result.json and evaluation.json entries:
    each modality's head, fused, then `fused, only <m>` and `Shapley <m>` for every modality, mean ±
    std over seeds and paired against joint; a unimodal run shows "-" for the modality it lacks."""
    values = {   # (group, seed): (audio head, video head, fused, only audio, only video, Shapley audio, video)
        ("joint", 0): (0.94, 0.50, 0.96, 0.90, 0.42, 0.50, 0.16),
        ("joint", 1): (0.95, 0.52, 0.96, 0.92, 0.44, 0.52, 0.18),
        ("mla", 0): (0.93, 0.55, 0.95, 0.88, 0.52, 0.48, 0.22),
        ("mla", 1): (0.93, 0.57, 0.95, 0.90, 0.54, 0.50, 0.24),
        ("video_alone", 0): (None, 0.56, 0.56, None, 0.56, None, 0.46)}
    groups, evaluations = {}, {}
    for (group, seed), (audio, video, fused, only_a, only_v, phi_a, phi_v) in values.items():
        run = tmp_path / f"{group}_s{seed}"
        test = ({} if audio is None else {"audio": {"acc": audio}}) | {"video": {"acc": video}, "fused": {"acc": fused}}
        groups.setdefault(group, []).append((seed, run, {"test": test}))
        only, phi = {"video": only_v}, {"video": phi_v}
        if audio is not None:
            only, phi = {"audio": only_a, **only}, {"audio": phi_a, **phi}
        evaluations[run] = evaluation_entry(only, phi)
    columns = report_module.columns(groups, evaluations, "acc", "test")
    summary = report_module.summary_table(groups, columns)
    assert summary[0] == ("| run | seeds | audio: head | video: head | fused | fused, only audio | fused, only video "
                          "| Shapley audio | Shapley video |")
    assert summary[2] == ("| joint | 2 | 0.9450 ± 0.0071 | 0.5100 ± 0.0141 | 0.9600 ± 0.0000 | 0.9100 ± 0.0141 "
                          "| 0.4300 ± 0.0141 | 0.5100 ± 0.0141 | 0.1700 ± 0.0141 |")
    assert summary[4] == "| video_alone | 1 | - | 0.5600 ± 0.0000 | 0.5600 ± 0.0000 | - | 0.5600 ± 0.0000 | - | 0.4600 ± 0.0000 |"
    paired = report_module.paired_table(groups, columns)
    assert paired[0] == summary[0].replace("| run | seeds |", "| run − joint | pairs |")
    assert paired[2] == ("| mla | 2 | -0.0150 ± 0.0071 (0/2) | +0.0500 ± 0.0000 (2/0) | -0.0100 ± 0.0000 (0/2) "
                         "| -0.0200 ± 0.0000 (0/2) | +0.1000 ± 0.0000 (2/0) | -0.0200 ± 0.0000 (0/2) "
                         "| +0.0600 ± 0.0000 (2/0) |")
    assert paired[3] == ("| video_alone | 1 | - | +0.0600 ± 0.0000 (1/0) | -0.4000 ± 0.0000 (0/1) | - "
                         "| +0.1400 ± 0.0000 (1/0) | - | +0.3000 ± 0.0000 (1/0) |")


def test_report_refuses_a_directory_without_runs(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/report.py", str(tmp_path), "--out", str(tmp_path / "r")],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path}: no result.json in it or in a directory under it"


def run_report(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "scripts/report.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=env)


def cut(text: str) -> str:
    """A line cut short as by a kill while it was written: its first half, no newline."""
    return text[:len(text) // 2]


@pytest.mark.parametrize("run, name, corrupt", [
    ("gaal_s0", "evaluation.json", lambda text: cut(text) if text else '{"test": {"rules": {"ab'),
    ("gaal_s0", "evaluation.json", lambda text: "[]"),
    ("gaal_s0", "result.json", cut),                                                # truncated
    ("joint_s0", "result.json", lambda text: '{"method": "joint"}'),                 # valid JSON, no test
    ("joint_s0", "metrics.jsonl", lambda text: cut(text.splitlines()[0]) + "\n" + text.split("\n", 1)[1]),
    ("joint_s0", "metrics.jsonl", lambda text: text.replace("\n", "\n[1, 2]\n", 1)),   # a line not an object
])
@pytest.mark.slow
def test_report_refuses_a_corrupt_run_file_in_one_line(ablation, tmp_path, run, name, corrupt):
    """A corrupt evaluation.json, a truncated result.json, a cut metrics.jsonl line that is not the
    last: exit 2, one `error:` line naming the file (and the line), no traceback, no report."""
    runs = tmp_path / "runs"
    shutil.copytree(ablation, runs)
    path = runs / run / name
    path.write_text(corrupt(path.read_text() if path.is_file() else ""))
    proc = run_report(runs, "--out", tmp_path / "report")
    line = assert_one_error_line(proc, path)
    if name == "metrics.jsonl":
        assert "line 1:" in line or "line 2:" in line
    assert not (tmp_path / "report" / "report.md").exists()


@pytest.mark.slow
def test_report_refuses_a_jobs_list_that_is_not_text(ablation, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(ablation, runs)
    (runs / "jobs.txt").write_bytes(b"joint_s0 train/joint.py\n\xffgaal_s0 train/gaal.py\n")
    assert "not UTF-8" in assert_one_error_line(run_report(runs, "--out", tmp_path / "report"), runs / "jobs.txt")


@pytest.mark.slow
def test_report_skips_a_cut_last_metrics_line_with_a_warning(ablation, tmp_path):
    """A run killed while it wrote its last metrics.jsonl line (a normal state of a run directory):
    the report is written from the whole lines, with one warning naming the file and the line."""
    runs = tmp_path / "runs"
    shutil.copytree(ablation, runs)
    path = runs / "joint_s0" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    path.write_text(lines[0] + "\n" + cut(lines[1]))
    proc = run_report(runs, "--out", tmp_path / "report")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {path}: line 2 is cut short (a run killed while writing it); "
                        "skipped"], proc.stderr
    assert (tmp_path / "report" / "val_curves.png").is_file()


def test_report_takes_a_reference_group_and_refuses_mixed_data_sets(ablation, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "scripts/report.py", str(ablation), "--out", str(out), "--reference", "gaal"],
                          cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    paired = rows((out / "report.md").read_text(), "### Paired difference against gaal")
    assert list(paired) == ["run − gaal", "joint"]
    # several references: a table against each, the same differences with the sign turned
    proc = subprocess.run([sys.executable, "scripts/report.py", str(ablation), "--out", str(out), "--reference",
                           "joint,gaal"], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    against_joint, against_gaal = rows(text, "### Paired difference against joint"), rows(text, "### Paired difference against gaal")
    assert list(against_joint) == ["run − joint", "gaal"] and list(against_gaal) == ["run − gaal", "joint"]
    means = lambda cells: [None if c == "-" else float(c.split(" ± ")[0]) for c in cells[1:]]   # after `pairs`
    assert against_joint["gaal"][0] == against_gaal["joint"][0] != "0"
    assert [None if m is None else -m for m in means(against_joint["gaal"])] == means(against_gaal["joint"])
    proc = subprocess.run([sys.executable, "scripts/report.py", str(ablation), "--out", str(out), "--reference", "igm"],
                          cwd=REPO, capture_output=True, text=True, env=env)
    assert "no such group among the runs (joint, gaal)" in assert_one_error_line(proc, "--reference igm")
    # a run of another data set beside them: refused, each data set named
    other = tmp_path / "runs" / "mla_s0"
    shutil.copytree(ablation / "joint_s0", other)
    config = (other / "config.yaml").read_text()
    data = embedded.generate(tmp_path / "data", "av", seed=1, n_train=64, n_val=32, n_test=32)
    (other / "config.yaml").write_text(re.sub(r"(?m)^data: .*$", f"data: {data}", config))
    proc = subprocess.run([sys.executable, "scripts/report.py", str(ablation), str(other), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == ("error: runs of 2 data sets in one report (embedded_seq3: joint_s0, gaal_s0; "
                                   "embedded_av: mla_s0): report each data set on its own"), proc.stderr
