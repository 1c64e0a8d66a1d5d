"""scripts/report.py on two real tiny runs (joint and GAAL on the three-sequence set, text + audio):
the report and its figures exist, the images decode, the tables hold the runs' numbers."""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from data_prep import embedded
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
    assert summary["run"] == ["seeds", *MODALITIES, "fused"]
    for g, result in results.items():
        assert summary[g] == ["1", *[f"{result['test'][n]['acc']:.4f} ± 0.0000" for n in [*MODALITIES, "fused"]]]
    paired = rows(md, "### Paired difference against joint")
    assert list(paired) == ["run − joint", "gaal"]
    assert paired["gaal"] == ["1", *[f"{results['gaal']['test'][n]['acc'] - results['joint']['test'][n]['acc']:+.4f}"
                                     f" ± 0.0000" for n in [*MODALITIES, "fused"]]]
    shapley = rows(md, "## Modality contribution")
    for g, entry in evaluations.items():
        assert shapley[g][:2] == [f"{entry['shapley']['values'][m]:.4f} ± 0.0000" for m in MODALITIES]
        assert shapley[g][2] == f"{entry['shapley']['v_all']:.4f} ± 0.0000"
        assert entry["metrics"] == results[g]["test"]


def test_report_refuses_a_directory_without_runs(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/report.py", str(tmp_path), "--out", str(tmp_path / "r")],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path}: no result.json in it or in a directory under it"
