"""Markdown tables from run directories.

    python scripts/summarize.py runs/baselines             # baselines: joint and alone vs Bayes limit
    python scripts/summarize.py --ablation runs/gaal_ablation
    python scripts/summarize.py --coefficients runs/cggm_ablation
    python scripts/summarize.py --paired runs/gaal_paired official no_surgery full_guidance
    python scripts/summarize.py --trace runs/cggm_av/off_s0 runs/cggm_av/official_s0
The first reads <dir>/joint_<flavour>/result.json and <dir>/unimodal_<flavour>/<modality>/result.json
(and the joint run's evaluation.json, for its fused model with only that modality and the modality's
Shapley value);
the second groups <dir>/<config>_s<seed>/result.json by config and prints mean ± std (over seeds)
of the test accuracy of each modality's head (`<m>: head`, the method's own per-modality output:
what it is differs by method, docs/evaluation.md) and of the fused prediction (the model each run
selected on validation: fused accuracy unless the run says `--select_on modality_mean`), for the
weakest modality (lowest Bayes limit) its head's best validation accuracy over all epochs (from
metrics.jsonl): what the method taught that modality at any point, whether or not model selection
kept it, and the two readings that mean the same for every method, from each run's
evaluation.json (train.evaluate): `fused, only <m>`, the fused test accuracy with every other
modality absent, and `Shapley <m>`, m's Shapley contribution to the fused test accuracy (a row
whose runs are not all evaluated shows "-" there, and a line under the table gives the command that
fills it). The third reads CGGM's TensorBoard scalars (each logged
value is the mean over `log_every` steps) and prints, per config, the median over logged values and
seeds of each modality's c_i and the share of steps where the accuracy changes summed to zero.
The fourth compares configs seed by seed: for the seeds that <dir>/<A>_s<seed> and <dir>/<B>_s<seed>
both finished, the weakest modality's test accuracy and best validation accuracy at any epoch of
each, the paired difference A − B per seed, and over seeds the mean ± std of the differences (with
the standard error of the mean, std/√n) and how many seeds A is above, tied with and below B (the first config against each of the others),
then the same for the uniform readings `fused, only <m>` and `Shapley <m>` of that modality when
every compared run has its evaluation.json (else a line saying which runs to evaluate).
The fifth traces CGGM runs epoch by epoch from TensorBoard (best with `--log_every 1`: then every
value is one step's): per modality the median of rho·c_i, the share of steps with c_i < -0.001
(gradient ascent on that encoder when modulation is on), |c_i| <= 0.001 (no gradient: with two
modalities c_1 = d_2 / S, which is 0 up to the 1e-8 in S when the other classifier's batch accuracy
did not change) and rho·c_i < 1 (its gradient shrunk), the classifier's mean batch accuracy and the
standard deviation of its step-to-step change d_i, and the classifier's validation accuracy at the
end of the epoch (metrics.jsonl); a last row `all` covers the whole run.

Every file it reads (result.json, metrics.jsonl, config.yaml, jobs.txt, evaluation.json) goes through
read_result, read_jsonl, read_yaml (train/runfiles.py), jobs_listed or read_evaluation (scripts/report.py
reads them through the same functions, evaluation.json through train.evaluate.stored_evaluation): a
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
from train.runfiles import json_type, read_json, read_jsonl, read_text, read_yaml

RESULT = "a result.json of train/loop.py"
EVALUATION_FILE = "evaluation.json"
EVALUATION = "an evaluation.json of train.evaluate"
#: what the columns of the comparison tables are (summarize --ablation, report.py's summary)
READINGS = ("`<m>: head`: the method's own output for modality m, which differs by method (joint, OGM-GE: m's "
            "block of the fused layer; IGM: m's own head; MLA, GAAL: the shared head on m's features; MMPareto: "
            "its unimodal head; CGGM: its classifier on m's detached features; a unimodal run: the model itself; "
            "docs/evaluation.md). `fused, only <m>`: the fused model with every other modality absent; "
            "`Shapley <m>`: m's Shapley contribution to the fused metric (both from train.evaluate's "
            "evaluation.json): the same reading for every method.")


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


def read_evaluation(run_dir, split: str = "test") -> dict | None:
    """The `split` entry of <run_dir>/evaluation.json (train.evaluate), None without the file or the
    entry; ConfigError naming the file when it is not JSON or the entry not an object (the checks of
    train.evaluate.stored_evaluation, which needs torch)."""
    path = Path(run_dir) / EVALUATION_FILE
    if not path.is_file():
        return None
    entry = read_json(path, EVALUATION).get(split)
    if entry is not None and not isinstance(entry, dict):
        raise ConfigError(f"{path}: its {split!r} entry is a JSON {json_type(entry)}, not an object (not {EVALUATION})")
    return entry


# --------------------------------------------------------------------------------------------------
# The readings that mean the same for every method (docs/evaluation.md): a method's own per-modality
# output ("head") is a block of the fused layer for one method, a separately trained head for
# another, so only the fused model with modalities absent and the Shapley values compare across them.

def uniform_readings(entry: dict, where) -> dict:
    """{"only": {m: the fused metric with m the only modality present}, "shapley": {m: phi_m}, "absent":
    the rule that stood for an absent modality (mean, zero)} of one evaluation.json entry (for
    regression the fused MAE and the Shapley values of −MAE); ConfigError
    naming `where` when the entry is not in train.evaluate's layout."""
    try:
        key = entry["shapley"]["metric"].lstrip("-")
        only = {row["present"][0]: float(row["fused"][key]) for row in entry["subsets"] if len(row["present"]) == 1}
        shapley = {m: float(value) for m, value in entry["shapley"]["values"].items()}
        absent = str(entry.get("rules", {}).get("absent", "?"))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ConfigError(f"{where}: not the layout of train.evaluate ({type(err).__name__}: {err})") from None
    return {"only": only, "shapley": shapley, "absent": absent}


def run_readings(run_dirs: list, split: str = "test") -> tuple[list, list]:
    """(uniform_readings of each run directory that has an evaluation.json entry for `split`, the
    run directories that have none)."""
    readings, missing = [], []
    for run_dir in run_dirs:
        entry = read_evaluation(run_dir, split)
        if entry is None:
            missing.append(Path(run_dir))
        else:
            readings.append(uniform_readings(entry, Path(run_dir) / EVALUATION_FILE))
    return readings, missing


def uniform_headings(modalities: list) -> list[str]:
    return [f"fused, only {m}" for m in modalities] + [f"Shapley {m}" for m in modalities]


def uniform_cells(readings: list, missing: list, modalities: list, format_cell) -> list[str]:
    """The cells under uniform_headings for one row of runs: format_cell(values over the runs), "-"
    where some run has no evaluation (`missing`) or lacks the modality (a unimodal run)."""
    cells = []
    for kind in ("only", "shapley"):
        for m in modalities:
            values = [r[kind][m] for r in readings if m in r[kind]]
            cells.append(format_cell(values) if values and not missing and len(values) == len(readings) else "-")
    return cells


def fill_hint(missing: list) -> str:
    """The line saying which runs lack an evaluation.json and the command that fills them."""
    dirs = list(dict.fromkeys(str(d) for d in missing))
    return (f"{len(dirs)} run(s) without an evaluation.json: fill them with `python -m train.evaluate "
            f"{' '.join(dirs)}`, then run this again.")


def cell(values: list, digits: int = 3) -> str:
    """mean ± sample std over seeds (0 for one value); "-" for none."""
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


# --------------------------------------------------------------------------------------------------


def bayes_limit(result: dict, name: str):
    """The Bayes accuracy of modality `name` (fused: all modalities) recorded in result.json, None when
    the dataset's meta.json has none (any dataset but the embedded benchmark)."""
    limits = result.get("bayes_accuracy") or {}
    return limits.get("all" if name == "fused" else name)


def main(root: str) -> None:
    root = Path(root)
    print("| flavour | modality | Bayes limit | joint: head, test acc | alone: test acc | joint gap to limit "
          "| joint: fused, only modality | joint: Shapley |")
    print("|---|---|---|---|---|---|---|---|")
    unevaluated = []
    for joint_dir in sorted(root.glob("joint_*")):
        flavour = joint_dir.name[len("joint_"):]
        joint = read_result(joint_dir / "result.json")
        readings, missing = run_readings([joint_dir])
        unevaluated += missing
        for name, metrics in joint["test"].items():
            limit = bayes_limit(joint, name)
            alone_file = root / f"unimodal_{flavour}" / name / "result.json"
            alone = read_result(alone_file)["test"][name]["acc"] if alone_file.exists() else None
            gap = "-" if limit is None else f"{limit - metrics['acc']:+.3f}"
            uniform = uniform_cells(readings, missing, [name], lambda values: f"{values[0]:.3f}")
            print(f"| {flavour} | {name} | {'-' if limit is None else f'{limit:.3f}'} | {metrics['acc']:.3f} | "
                  f"{'-' if alone is None else f'{alone:.3f}'} | {gap} | " + " | ".join(uniform) + " |")
    print("\njoint: its modality's head (its block of the late-fusion layer; the fused row: the fused prediction); "
          "alone: the unimodal model; joint: fused, only modality / Shapley: the joint model with every other "
          "modality absent / the modality's Shapley value (train.evaluate's evaluation.json), the readings that "
          "compare with other methods (docs/evaluation.md).")
    if unevaluated:
        print("`-` in the last two columns: " + fill_hint(unevaluated))


def in_listed_order(groups: dict, root: str) -> dict:
    """Keep the order the runs were listed in (<root>/jobs.txt), when known."""
    listed = jobs_listed(root)
    if listed is None:
        return groups
    listed = [name.rsplit("_s", 1)[0] for name in listed]
    return dict(sorted(groups.items(), key=lambda kv: listed.index(kv[0]) if kv[0] in listed else len(listed)))


def ablation_runs(root: str) -> dict:
    """{config: [(run directory, its result.json)]} of <root>/<config>_s<seed>, in the listed order."""
    groups = defaultdict(list)
    for result_file in sorted(Path(root).glob("*_s*/result.json")):
        config = result_file.parent.name.rsplit("_s", 1)[0]
        groups[config].append((result_file.parent, read_result(result_file)))
    if not groups:
        raise SystemExit(f"no <config>_s<seed>/result.json under {root}")
    return in_listed_order(groups, root)


def ablation_head_cells(runs: list, names: list, weak: str) -> list[str]:
    """The cells of one row's own readings: each modality's head and the fused prediction (test
    accuracy; "-" where a run lacks the modality: a unimodal reference row), then the weak modality's
    head's best validation accuracy at any epoch."""
    cells = [cell([r["test"][n]["acc"] for _, r in runs]) if all(n in r["test"] for _, r in runs) else "-"
             for n in names]
    return cells + [cell([best_val_any_epoch(run_dir, weak) for run_dir, r in runs if weak in r["test"]])]


def ablation(root: str) -> None:
    groups = ablation_runs(root)
    results = [r for runs in groups.values() for _, r in runs]
    first = max(results, key=lambda r: len(r["test"]))
    names = list(first["test"])
    modalities = [n for n in names if n != "fused"]
    weak = weakest_modality(first, results)

    def heading(n):
        limit = bayes_limit(first, n)
        label = n if n == "fused" else f"{n}: head"
        return label if limit is None else f"{label} (Bayes {limit:.3f})"
    rows, unevaluated, absent = [], [], set()   # every file read before the table is printed (a corrupt one: no half table)
    for config, runs in groups.items():
        readings, missing = run_readings([run_dir for run_dir, _ in runs])
        unevaluated += missing
        absent |= {r["absent"] for r in readings}
        cells = ablation_head_cells(runs, names, weak) + uniform_cells(readings, missing, modalities, cell)
        rows.append(f"| {config} | {len(runs)} | " + " | ".join(cells) + " |")
    print("| run | seeds | " + " | ".join(heading(n) for n in names) + f" | {weak}: head, best val, any epoch | "
          + " | ".join(uniform_headings(modalities)) + " |")
    print("|---|---|" + "---|" * (len(names) + 1 + 2 * len(modalities)))
    print("\n".join(rows))
    rule = f" (train.evaluate --absent {', '.join(sorted(absent))})" if absent else ""
    print(f"\n{READINGS} Test accuracy, mean ± std over seeds; absent modalities{rule}: ABSENT_RULES of "
          f"train/evaluate.py; `{weak}: head, best val, any epoch` from metrics.jsonl.")
    if unevaluated:
        print("`-` under `fused, only <m>` / `Shapley <m>`: " + fill_hint(unevaluated))


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


def paired_uniform_rows(root: str, a: str, b: str, modality: str, seeds: list) -> tuple[list, list]:
    """([(seed, fused_only_a, fused_only_b, shapley_a, shapley_b)] of `modality` over `seeds`, from the
    runs' evaluation.json, and the run directories without one (then no rows)."""
    dirs = [Path(root) / f"{config}_s{seed}" for seed in seeds for config in (a, b)]
    readings, missing = run_readings(dirs)
    if missing:
        return [], missing
    for run_dir, reading in zip(dirs, readings):
        if modality not in reading["only"] or modality not in reading["shapley"]:
            raise ConfigError(f"{run_dir / EVALUATION_FILE}: no {modality} among its modalities (its result.json has it)")
    return [(seed, ra["only"][modality], rb["only"][modality], ra["shapley"][modality], rb["shapley"][modality])
            for seed, ra, rb in zip(seeds, readings[0::2], readings[1::2])], []


def print_paired(a: str, b: str, readings: list, rows: list) -> None:
    """A seed-by-seed table of two readings (a value of A, of B and A − B each); rows: (seed, a_1, b_1,
    a_2, b_2). Under it, per reading, the paired_stats of A − B."""
    print("| seed | " + " | ".join(f"{a}: {r} | {b}: {r} | {r}: {a} − {b}" for r in readings) + " |")
    print("|---|" + "---|---|---|" * len(readings))
    for seed, *values in rows:
        pairs = list(zip(values[0::2], values[1::2]))
        print(f"| {seed} | " + " | ".join(f"{va:.4f} | {vb:.4f} | {va - vb:+.4f}" for va, vb in pairs) + " |")
    stats = [paired_stats([row[1 + 2 * i] - row[2 + 2 * i] for row in rows]) for i in range(len(readings))]
    # each reading's statistic goes under its A − B column (the third of its three)
    print(f"| mean ± std (standard error), {stats[0]['n']} pairs "
          + "".join(f"| | | {s['mean']:+.4f} ± {s['std']:.4f} ({s['se']:.4f}) " for s in stats) + "|")
    print(f"| {a} above / tied / below " + "".join(f"| | | {s['above']} / {s['tied']} / {s['below']} " for s in stats) + "|")


def paired(root: str, configs: list, modality: str | None = None) -> None:
    if len(configs) < 2:
        raise SystemExit("--paired DIR A B [C ...]: at least two configs")
    a = configs[0]
    for b in configs[1:]:
        m, rows = paired_rows(root, a, b, modality)
        uniform, missing = paired_uniform_rows(root, a, b, m, [row[0] for row in rows])
        print(f"\n{m}: head, {a} against {b} (same seed), accuracy:\n")
        print_paired(a, b, ["test", "best val"], rows)
        print(f"\n{m}: the readings the same for every method (evaluation.json), {a} against {b} (same seed):\n")
        if missing:
            print(fill_hint(missing))
        else:
            print_paired(a, b, [f"fused, only {m}", f"Shapley {m}"], uniform)


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
