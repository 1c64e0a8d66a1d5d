"""Markdown tables from run directories.

    python scripts/summarize.py runs/baselines             # baselines: joint and alone vs Bayes limit
    python scripts/summarize.py --ablation runs/gaal_ablation
    python scripts/summarize.py --coefficients runs/cggm_ablation
    python scripts/summarize.py --paired runs/gaal_paired official no_surgery full_guidance
    python scripts/summarize.py --trace runs/cggm_av/off_s0 runs/cggm_av/official_s0
The first reads <dir>/joint_<flavour>/result.json and <dir>/unimodal_<flavour>/<modality>/result.json;
the second groups <dir>/<config>_s<seed>/result.json by config and prints mean ± std (over seeds)
of the test accuracy of each modality and of the fused prediction (the model each run selected on
validation: fused accuracy unless the run says `--select_on modality_mean`), and, for the weakest modality (lowest Bayes limit), its best validation
accuracy over all epochs (from metrics.jsonl): what the method taught that modality at any point,
whether or not model selection kept it. The third reads CGGM's TensorBoard scalars (each logged
value is the mean over `log_every` steps) and prints, per config, the median over logged values and
seeds of each modality's c_i and the share of steps where the accuracy changes summed to zero.
The fourth compares configs seed by seed: for the seeds that <dir>/<A>_s<seed> and <dir>/<B>_s<seed>
both finished, the weakest modality's test accuracy and best validation accuracy at any epoch of
each, the paired difference A − B per seed, and over seeds the mean ± std of the differences (with
the standard error of the mean, std/√n) and how many seeds A is above, tied with and below B (the first config against each of the others).
The fifth traces CGGM runs epoch by epoch from TensorBoard (best with `--log_every 1`: then every
value is one step's): per modality the median of rho·c_i, the share of steps with c_i < -0.001
(gradient ascent on that encoder when modulation is on), |c_i| <= 0.001 (no gradient: with two
modalities c_1 = d_2 / S, which is 0 up to the 1e-8 in S when the other classifier's batch accuracy
did not change) and rho·c_i < 1 (its gradient shrunk), the classifier's mean batch accuracy and the
standard deviation of its step-to-step change d_i, and the classifier's validation accuracy at the
end of the epoch (metrics.jsonl); a last row `all` covers the whole run.

Every file it reads (result.json, metrics.jsonl, config.yaml, jobs.txt) goes through read_result,
read_jsonl, read_yaml (train/runfiles.py) or jobs_listed (scripts/report.py reads them through the same functions): a
file that is not UTF-8, not JSON/YAML, or of the wrong top-level type ends the program with ONE line
on stderr, `error: <file>: <what is wrong>` (metrics.jsonl: with the line number), and exit status
2, as train/loop.py refuses bad input. A metrics.jsonl whose LAST line is cut short (a run killed
while writing it) is read without that line, with one warning (read_jsonl says why). The imports stay
the standard library and train.config (no torch): train.evaluate has the same readers for its files.
"""
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from train.config import ConfigError
from train.runfiles import read_json, read_jsonl, read_text, read_yaml

RESULT = "a result.json of train/loop.py"


# --------------------------------------------------------------------------------------------------
# Reading run files: one error line naming the file instead of a traceback

def read_result(path) -> dict:
    """A run's result.json (it must hold `test`): runfiles.read_json."""
    return read_json(path, RESULT, ("test",))


def jobs_listed(root) -> list | None:
    """The run names <root>/jobs.txt lists (the first word of each line), in its order; None
    without a jobs.txt; ConfigError naming it when it is not UTF-8 text."""
    jobs = Path(root) / "jobs.txt"
    if not jobs.is_file():
        return None
    return [line.split()[0] for line in read_text(jobs).splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------


def bayes_limit(result: dict, name: str):
    """The Bayes accuracy of modality `name` (fused: all modalities) recorded in result.json, None when
    the dataset's meta.json has none (any dataset but the embedded benchmark)."""
    limits = result.get("bayes_accuracy") or {}
    return limits.get("all" if name == "fused" else name)


def main(root: str) -> None:
    root = Path(root)
    print("| flavour | modality | Bayes limit | joint: test acc | alone: test acc | joint gap to limit |")
    print("|---|---|---|---|---|---|")
    for joint_dir in sorted(root.glob("joint_*")):
        flavour = joint_dir.name[len("joint_"):]
        joint = read_result(joint_dir / "result.json")
        for name, metrics in joint["test"].items():
            limit = bayes_limit(joint, name)
            alone_file = root / f"unimodal_{flavour}" / name / "result.json"
            alone = read_result(alone_file)["test"][name]["acc"] if alone_file.exists() else None
            gap = "-" if limit is None else f"{limit - metrics['acc']:+.3f}"
            print(f"| {flavour} | {name} | {'-' if limit is None else f'{limit:.3f}'} | {metrics['acc']:.3f} | "
                  f"{'-' if alone is None else f'{alone:.3f}'} | {gap} |")


def in_listed_order(groups: dict, root: str) -> dict:
    """Keep the order the runs were listed in (<root>/jobs.txt), when known."""
    listed = jobs_listed(root)
    if listed is None:
        return groups
    listed = [name.rsplit("_s", 1)[0] for name in listed]
    return dict(sorted(groups.items(), key=lambda kv: listed.index(kv[0]) if kv[0] in listed else len(listed)))


def ablation(root: str) -> None:
    groups = defaultdict(list)
    for result_file in sorted(Path(root).glob("*_s*/result.json")):
        config = result_file.parent.name.rsplit("_s", 1)[0]
        groups[config].append(read_result(result_file))
    if not groups:
        raise SystemExit(f"no <config>_s<seed>/result.json under {root}")
    groups = in_listed_order(groups, root)
    first = max((r for results in groups.values() for r in results), key=lambda r: len(r["test"]))
    names = list(first["test"])
    weak = weakest_modality(first, [r for results in groups.values() for r in results])

    def heading(n):
        limit = bayes_limit(first, n)
        return n if limit is None else f"{n} (Bayes {limit:.3f})"

    def cell(values):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {std:.3f}"
    rows = []   # every metrics.jsonl read before the table is printed (a corrupt one: no half table)
    for config, results in groups.items():
        # a run without some modality (a unimodal reference row) shows "-" there
        cells = [cell([r["test"][n]["acc"] for r in results]) if all(n in r["test"] for r in results) else "-"
                 for n in names]
        best_val = []
        for r in results:
            if weak in r["test"]:
                best_val.append(best_val_any_epoch(Path(r["run_dir"]), weak))
        rows.append(f"| {config} | {len(results)} | " + " | ".join(cells)
                    + f" | {cell(best_val) if best_val else '-'} |")
    print("| run | seeds | " + " | ".join(heading(n) for n in names) + f" | {weak}: best val, any epoch |")
    print("|---|---|" + "---|" * (len(names) + 1))
    print("\n".join(rows))


def weakest_modality(result: dict, runs: list | None = None) -> str:
    """The modality (not fused) with the lowest Bayes limit; on a dataset without known limits, the
    one with the lowest mean test accuracy over `runs` (default: this result alone)."""
    names = [n for n in result["test"] if n != "fused"]
    if all(bayes_limit(result, n) is not None for n in names):
        return min(names, key=lambda n: bayes_limit(result, n))
    runs = runs or [result]

    def mean_test(n):
        values = [r["test"][n]["acc"] for r in runs if n in r["test"]]
        return statistics.mean(values) if values else float("inf")
    return min(names, key=mean_test)


def best_val_any_epoch(run_dir: Path, modality: str) -> float:
    records = read_jsonl(run_dir / "metrics.jsonl")
    return max(rec["val"][modality]["acc"] for rec in records)


def paired_rows(root: str, a: str, b: str, modality: str | None = None) -> tuple[str, list]:
    """[(seed, test_a, test_b, bestval_a, bestval_b)] over the seeds where both <a>_s<seed> and
    <b>_s<seed> have a result.json, sorted by seed, and the modality compared (default: weakest)."""
    root = Path(root)

    def finished(config):
        runs = {}
        for result_file in root.glob(f"{config}_s*/result.json"):
            seed = result_file.parent.name[len(config) + 2:]
            if seed.isdigit():
                runs[int(seed)] = (result_file.parent, read_result(result_file))
        return runs
    runs_a, runs_b = finished(a), finished(b)
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        raise SystemExit(f"no seed with both {a}_s<seed>/result.json and {b}_s<seed>/result.json under {root}")
    modality = modality or weakest_modality(runs_a[seeds[0]][1])
    rows = []
    for seed in seeds:
        (dir_a, res_a), (dir_b, res_b) = runs_a[seed], runs_b[seed]
        rows.append((seed, res_a["test"][modality]["acc"], res_b["test"][modality]["acc"],
                     best_val_any_epoch(dir_a, modality), best_val_any_epoch(dir_b, modality)))
    return modality, rows


def paired_stats(diffs: list) -> dict:
    """mean, sample std, standard error of the mean (std/√n) and the sign count (above, tied, below
    zero) of paired differences."""
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return {"n": len(diffs), "mean": statistics.mean(diffs), "std": std, "se": std / len(diffs) ** 0.5,
            "above": sum(d > 0 for d in diffs), "tied": sum(d == 0 for d in diffs),
            "below": sum(d < 0 for d in diffs)}


def paired(root: str, configs: list, modality: str | None = None) -> None:
    if len(configs) < 2:
        raise SystemExit("--paired DIR A B [C ...]: at least two configs")
    a = configs[0]
    for b in configs[1:]:
        m, rows = paired_rows(root, a, b, modality)
        print(f"\n{m}, {a} against {b} (same seed), accuracy:\n")
        print(f"| seed | {a}: test | {b}: test | test: {a} − {b} | {a}: best val | {b}: best val "
              f"| best val: {a} − {b} |")
        print("|---|---|---|---|---|---|---|")
        for seed, ta, tb, va, vb in rows:
            print(f"| {seed} | {ta:.4f} | {tb:.4f} | {ta - tb:+.4f} | {va:.4f} | {vb:.4f} | {va - vb:+.4f} |")
        test, val = paired_stats([r[1] - r[2] for r in rows]), paired_stats([r[3] - r[4] for r in rows])
        print(f"| mean ± std (standard error), {test['n']} pairs | | | {test['mean']:+.4f} ± {test['std']:.4f} "
              f"({test['se']:.4f}) | | | {val['mean']:+.4f} ± {val['std']:.4f} ({val['se']:.4f}) |")
        print(f"| {a} above / tied / below | | | {test['above']} / {test['tied']} / {test['below']} | | "
              f"| {val['above']} / {val['tied']} / {val['below']} |")


def read_scalars(tb_dir: Path, keep) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard scalars whose tag satisfies keep(tag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if keep(tag)}


def trace_rows(run_dir: Path) -> tuple[list, list]:
    """Per epoch (from metrics.jsonl's step boundaries) and modality: the statistics that
    `--trace` prints, as dicts. Returns (modalities, rows)."""
    cfg = read_yaml(run_dir / "config.yaml")
    rho = float(cfg.get("rho", 1.3))
    scalars = read_scalars(run_dir / "tb", lambda t: t.endswith(("/coeff", "/clf_metric")))
    names = sorted(t.split("/")[0] for t in scalars if t.endswith("/coeff"))
    records = read_jsonl(run_dir / "metrics.jsonl")

    def stats(start, end, val):
        row = {}
        for m in names:
            coeff = [v for step, v in scalars[f"{m}/coeff"] if start < step <= end]
            metric = [v for step, v in scalars[f"{m}/clf_metric"] if start < step <= end]
            change = [b - a for a, b in zip(metric, metric[1:])]
            row[m] = {"median_rho_c": statistics.median(rho * c for c in coeff) if coeff else float("nan"),
                      "neg": sum(c < -1e-3 for c in coeff) / max(len(coeff), 1),
                      "zero": sum(abs(c) <= 1e-3 for c in coeff) / max(len(coeff), 1),
                      "shrunk": sum(rho * c < 1 for c in coeff) / max(len(coeff), 1),
                      "clf_batch_acc": statistics.mean(metric) if metric else float("nan"),
                      "d_std": statistics.stdev(change) if len(change) > 1 else float("nan"),
                      "clf_val_acc": val[m]["acc"] if val else float("nan")}
        return row
    rows, start = [], 0
    for rec in records:
        rows.append({"epoch": rec["epoch"], **stats(start, rec["step"], rec["val"])})
        start = rec["step"]
    if records:
        rows.append({"epoch": "all", **stats(0, records[-1]["step"], None)})
    return names, rows


def trace(run_dirs: list) -> None:
    for run_dir in map(Path, run_dirs):
        cfg = read_yaml(run_dir / "config.yaml")
        names, rows = trace_rows(run_dir)
        note = "" if int(cfg.get("log_every", 25)) == 1 else f" — values are {cfg['log_every']}-step means"
        print(f"\n{run_dir} (modulation {cfg.get('modulation')}, direction {cfg.get('direction')}, "
              f"variant {cfg.get('variant')}{note}):\n")
        cols = ["median ρ·c", "c < 0", "c ≈ 0", "ρ·c < 1", "clf batch acc", "std d", "clf val acc"]
        print("| epoch | " + " | ".join(f"{m}: {c}" for m in names for c in cols) + " |")
        print("|---|" + "---|" * (len(names) * len(cols)))
        for row in rows:
            cells = []
            for m in names:
                r = row[m]
                cells += [f"{r['median_rho_c']:.2f}", f"{r['neg']:.0%}", f"{r['zero']:.0%}", f"{r['shrunk']:.0%}",
                          f"{r['clf_batch_acc']:.3f}", f"{r['d_std']:.3f}",
                          "-" if r["clf_val_acc"] != r["clf_val_acc"] else f"{r['clf_val_acc']:.3f}"]
            print(f"| {row['epoch']} | " + " | ".join(cells) + " |")


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


def cli(argv: list) -> None:
    if len(argv) > 1 and argv[0] == "--ablation":
        ablation(argv[1])
    elif len(argv) > 1 and argv[0] == "--trace":
        trace(argv[1:])
    elif len(argv) > 1 and argv[0] == "--paired":
        paired(argv[1], argv[2:])
    elif len(argv) > 1 and argv[0] == "--coefficients":
        coefficients(argv[1])
    else:
        main(argv[0] if argv else "runs/baselines")


if __name__ == "__main__":
    try:
        cli(sys.argv[1:])
    except ConfigError as err:   # bad input: one line naming the file, exit status 2
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
