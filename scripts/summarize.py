"""Markdown table of baseline runs: per modality, joint-trained and alone, beside the Bayes limit.

    python scripts/summarize.py runs/baselines
reads <dir>/joint_<flavour>/result.json and <dir>/unimodal_<flavour>/<modality>/result.json.
"""
import json
import sys
from pathlib import Path


def main(root: str) -> None:
    root = Path(root)
    print("| flavour | modality | Bayes limit | joint: test acc | alone: test acc | joint gap to limit |")
    print("|---|---|---|---|---|---|")
    for joint_dir in sorted(root.glob("joint_*")):
        flavour = joint_dir.name[len("joint_"):]
        joint = json.loads((joint_dir / "result.json").read_text())
        bayes = joint["bayes_accuracy"]
        for name, metrics in joint["test"].items():
            limit = bayes["all" if name == "fused" else name]
            alone_file = root / f"unimodal_{flavour}" / name / "result.json"
            alone = json.loads(alone_file.read_text())["test"][name]["acc"] if alone_file.exists() else None
            print(f"| {flavour} | {name} | {limit:.3f} | {metrics['acc']:.3f} | "
                  f"{'-' if alone is None else f'{alone:.3f}'} | {limit - metrics['acc']:+.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/baselines")
