"""Markdown tables from run directories.

    python scripts/summarize.py runs/baselines             # baselines: joint and alone vs Bayes limit
    python scripts/summarize.py --ablation runs/gaal_ablation
    python scripts/summarize.py --coefficients runs/cggm_ablation
The first reads <dir>/joint_<flavour>/result.json and <dir>/unimodal_<flavour>/<modality>/result.json;
the second groups <dir>/<config>_s<seed>/result.json by config and prints mean ± std (over seeds)
of the test accuracy of each modality and of the fused prediction (the model each run selected on
validation: fused accuracy unless the run says `--select_on modality_mean`), and, for the weakest modality (lowest Bayes limit), its best validation
accuracy over all epochs (from metrics.jsonl): what the method taught that modality at any point,
whether or not model selection kept it. The third reads CGGM's TensorBoard scalars (each logged
value is the mean over `log_every` steps) and prints, per config, the median over logged values and
seeds of each modality's c_i and the share of steps where the accuracy changes summed to zero.
"""
import json
import statistics
import sys
from collections import defaultdict
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


def in_listed_order(groups: dict, root: str) -> dict:
    """Keep the order the runs were listed in (<root>/jobs.txt), when known."""
    jobs = Path(root) / "jobs.txt"
    if not jobs.exists():
        return groups
    listed = [line.split()[0].rsplit("_s", 1)[0] for line in jobs.read_text().splitlines() if line.strip()]
    return dict(sorted(groups.items(), key=lambda kv: listed.index(kv[0]) if kv[0] in listed else len(listed)))


def ablation(root: str) -> None:
    groups = defaultdict(list)
    for result_file in sorted(Path(root).glob("*_s*/result.json")):
        config = result_file.parent.name.rsplit("_s", 1)[0]
        groups[config].append(json.loads(result_file.read_text()))
    if not groups:
        raise SystemExit(f"no <config>_s<seed>/result.json under {root}")
    groups = in_listed_order(groups, root)
    first = next(iter(groups.values()))[0]
    names = list(first["test"])
    bayes = first["bayes_accuracy"]
    weak = min((n for n in names if n != "fused"), key=lambda n: bayes[n])
    print("| run | seeds | " + " | ".join(f"{n} (Bayes {bayes['all' if n == 'fused' else n]:.3f})" for n in names)
          + f" | {weak}: best val, any epoch |")
    print("|---|---|" + "---|" * (len(names) + 1))

    def cell(values):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {std:.3f}"
    for config, results in groups.items():
        cells = [cell([r["test"][n]["acc"] for r in results]) for n in names]
        best_val = []
        for r in results:
            records = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            best_val.append(max(rec["val"][weak]["acc"] for rec in records))
        print(f"| {config} | {len(results)} | " + " | ".join(cells) + f" | {cell(best_val)} |")


def coefficients(root: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    groups = defaultdict(list)
    for tb in sorted(Path(root).glob("*_s*/tb")):
        groups[tb.parent.name.rsplit("_s", 1)[0]].append(tb)
    rows = []
    for config, dirs in in_listed_order(groups, root).items():
        values = defaultdict(list)
        for tb in dirs:
            acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                if tag.endswith("/coeff") or tag == "train/coeff_degenerate":
                    values[tag] += [e.value for e in acc.Scalars(tag)]
        coeff_tags = sorted(t for t in values if t.endswith("/coeff"))
        if not coeff_tags:
            continue
        if not rows:
            print("| run | seeds | " + " | ".join(f"{t.split('/')[0]}: median c_i" for t in coeff_tags)
                  + " | steps with Σd = 0 |")
            print("|---|---|" + "---|" * (len(coeff_tags) + 1))
        cells = [f"{statistics.median(values[t]):.2f}" for t in coeff_tags]
        degenerate = statistics.mean(values["train/coeff_degenerate"])
        rows.append(config)
        print(f"| {config} | {len(dirs)} | " + " | ".join(cells) + f" | {degenerate:.1%} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--ablation":
        ablation(sys.argv[2])
    elif len(sys.argv) > 2 and sys.argv[1] == "--coefficients":
        coefficients(sys.argv[2])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "runs/baselines")
