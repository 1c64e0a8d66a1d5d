"""A Markdown report with PNG figures from several runs (e.g. an ablation directory: rows x seeds).

    python scripts/report.py runs/gaal_ablation --out runs/gaal_ablation/report
    python scripts/report.py runs/ab/joint_s0 runs/ab/gaal_s0 runs/ab/gaal_s1 --out /tmp/report --split val

Each argument is a run directory (it holds result.json) or a directory of them (<dir>/*/result.json,
in the order of <dir>/jobs.txt when there is one). Runs are grouped by their name without the
`_s<seed>` suffix; the group named by --reference (default `joint`) is the baseline of the paired
differences (same seed). Runs of different data sets (their config.yaml's `data`, named by its
meta.json) are refused: report each data set on its own.
Writes <out>/report.md and beside it:
  val_curves.png     per-modality and fused validation metric over epochs (metrics.jsonl), mean and
                     a band of ± one standard deviation over seeds, one line per group;
  diag_<name>.png    the method diagnostics over training steps (TensorBoard scalars of tb/, the
                     families of DIAGNOSTICS: GAAL conflict rate and projection coefficient v, CGGM
                     c_i, IGM's T statistics, the plasticity cosine of IGM and MLA, joint's gradient
                     cosines, OGM-GE's coefficients and ratios, MLA's kept gradient share,
                     MMPareto's conflict rate and cosines);
  shapley.png        the Shapley contribution of each modality (train.evaluate), mean ± std over seeds;
  missing.png        the fused metric with each subset of modalities present, the others absent;
  noise.png          the fused metric against the noise level added to one modality;
and the summary table: test metrics mean ± std over seeds and the paired difference against joint,
each with, per modality m, the method's own output (`m: head`: what it is differs by method,
docs/evaluation.md), the fused prediction, and the two readings that mean the same for every method:
the fused model with only m present (`fused, only m`) and m's Shapley value (`Shapley m`).
The Shapley, missing and noise parts read <run>/evaluation.json; a run without an entry for the
split is evaluated first (train.evaluate with its default rules, written to its evaluation.json).

Every file is read before any evaluation or figure: jobs.txt, result.json and metrics.jsonl through
summarize's readers (summarize.read_result, read_jsonl, jobs_listed; train/runfiles.py), evaluation.json through
train.evaluate.stored_evaluation. A file that is not UTF-8, not JSON, or not of the layout's type
(a truncated result.json, a corrupt evaluation.json, a cut metrics.jsonl line that is not the last)
ends the program with ONE line, `error: <file>: <what is wrong>`, and exit status 2; a cut LAST line
of metrics.jsonl (a run killed while writing it) is skipped with a warning (summarize.read_jsonl).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import statistics
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

import summarize
from data_prep.shards import ShardFormatError
from train import evaluate
from train.checkpoint import CheckpointError
from train.config import ConfigError

#: (file name, title, TensorBoard tag pattern, y label): the method diagnostics plotted over training
#: steps, one subplot per matching tag. Tags no pattern matches are not plotted.
#: (file name, title, the method that logs it (result.json "method"; None: any), tag pattern, y label): a
#: family is drawn from the runs of its method only (several methods log e.g. <m>/conflict or <m>/coeff)
DIAGNOSTICS = [
    ("gaal_conflict", "GAAL: head-gradient conflict rate", "GAAL", "*/conflict", "share of steps in conflict"),
    ("gaal_v", "GAAL: projection coefficient v", "GAAL", "*/v", "v (0 when no conflict)"),
    ("cggm_coeff", "CGGM: gradient coefficient c_i per modality", "CGGM", "*/coeff", "c_i"),
    ("igm_effective_rank", "IGM: effective rank of the moments Y behind T", "IGM", "T/*/effective_rank", "effective rank"),
    ("igm_damped_share", "IGM: share of directions T damps by more than half", "IGM", "T/*/damped_share", "share"),
    ("igm_top_energy", "IGM: energy share of the top direction of Y", "IGM", "T/*/top_energy_share", "share"),
    ("plasticity", "Plasticity: cosine of consecutive stages' head gradients (IGM: stages; MLA, IGM paper: turns)",
     None, "plasticity/*", "cosine"),
    ("joint_cos", "Joint: cosine of a head's own-loss and fused-loss gradients", "joint",
     "*/cos_head_grad_own_vs_fused", "cosine"),
    ("ogm_ge_coeff", "OGM-GE: modulation coefficient k per modality", "OGM-GE", "*/coeff", "k (1 = not damped)"),
    ("ogm_ge_ratio", "OGM-GE: discrepancy ratio per modality", "OGM-GE", "*/ratio", "ratio of scores"),
    ("mla_grad_kept", "MLA: share of the head gradient the projection keeps", "MLA", "*/grad_kept", "|g P^T| / |g|"),
    ("mmpareto_conflict", "MMPareto: multimodal vs unimodal gradient conflict rate", "MMPareto", "*/conflict",
     "share of steps in conflict"),
    ("mmpareto_cos", "MMPareto: cosine of the multimodal and unimodal encoder gradients", "MMPareto",
     "*/cos_mm_uni", "cosine"),
]
MAX_SUBPLOTS = 12
SEED_NAME = re.compile(r"^(?P<group>.+)_s(?P<seed>\d+)$")


# --------------------------------------------------------------------------------------------------
# Runs

def find_runs(paths: list) -> list[Path]:
    """The run directories named, or found one level under the directories named."""
    runs = []
    for path in map(Path, paths):
        if (path / "result.json").is_file():
            found = [path]
        else:
            found = sorted(p.parent for p in path.glob("*/result.json"))
            listed = summarize.jobs_listed(path)
            if listed is not None:   # the ablation's own order of rows
                found.sort(key=lambda p: listed.index(p.name) if p.name in listed else len(listed))
        if not found:
            raise ConfigError(f"{path}: no result.json in it or in a directory under it")
        runs += [p for p in found if p not in runs]
    return runs


def group_runs(runs: list[Path]) -> dict:
    """{group: [(seed or None, run_dir, result)]} in first-seen order; group = name without _s<seed>."""
    groups = defaultdict(list)
    for run in runs:
        match = SEED_NAME.match(run.name)
        group, seed = (match["group"], int(match["seed"])) if match else (run.name, None)
        groups[group].append((seed, run, summarize.read_result(run / "result.json")))
    return dict(groups)


def metric_of(result: dict) -> str:
    """The metric the report shows: accuracy; regression: MAE; segmentation: mean Dice."""
    fused = result["test"]["fused"]
    return "acc" if "acc" in fused else "mae" if "mae" in fused else "dice_mean"


def mean_std(values: list) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list) -> str:
    return summarize.cell(values, digits=4)


def read_records(run_dir: Path) -> list:
    """metrics.jsonl's records ([] without one); summarize.read_jsonl: a cut last line is skipped with
    a warning, any other line that is not a JSON object is refused (ConfigError naming file and line)."""
    path = run_dir / "metrics.jsonl"
    return summarize.read_jsonl(path) if path.is_file() else []


# --------------------------------------------------------------------------------------------------
# Figures

def colour(groups: dict, group: str) -> str:
    """One colour per group in every figure (a group absent from a subplot does not shift the others);
    tab10 up to 10 groups, tab20 beyond (an ablation with 11 rows would repeat a colour)."""
    i = list(groups).index(group)
    return f"C{i}" if len(groups) <= 10 else plt.get_cmap("tab20")(i % 20)


def plot_band(ax, xs: list, series: list, label: str, color: str) -> None:
    """Mean over the series (aligned by x; a shorter series, e.g. stopped early, counts where it
    has values) and a band of ± one standard deviation."""
    points = []
    for i, x in enumerate(xs):
        values = [s[i] for s in series if i < len(s) and s[i] is not None]
        if values:
            points.append((x, *mean_std(values)))
    if not points:
        return
    x, mean, std = zip(*points)
    ax.plot(x, mean, marker="o", markersize=3, label=label, color=color)
    if len(series) > 1:
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.2)


def subplot_grid(n: int, title: str):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(textwrap.fill(title, width=int(11 * 4.2 * cols)))   # a one-plot figure is narrow
    return fig, list(axes.flat[:n])


def save(fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def legend_once(fig, axes) -> None:
    """One legend (in the first subplot) naming every group drawn in any subplot."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        axes[0].legend(list(entries.values()), list(entries), fontsize=8)


def val_curves(groups: dict, records: dict, metric: str, out: Path) -> str | None:
    """records: {run_dir: its metrics.jsonl records (read_records)}."""
    names = []
    for runs in groups.values():
        for _, run, _ in runs:
            for rec in records[run][:1]:
                names += [n for n in rec["val"] if n not in names]
    if not names:
        return None
    names = [n for n in names if n != "fused"] + ["fused"]
    fig, axes = subplot_grid(len(names), f"Validation {metric} per epoch (mean ± std over seeds)")
    for ax, name in zip(axes, names):
        for group, runs in groups.items():
            series = [{rec["epoch"]: rec["val"][name][metric] for rec in records[run] if name in rec["val"]}
                      for _, run, _ in runs]
            epochs = sorted({e for s in series for e in s})
            if epochs:
                plot_band(ax, epochs, [[s.get(e) for e in epochs] for s in series], group, colour(groups, group))
        ax.set(title=name, xlabel="epoch", ylabel=f"validation {metric}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend_once(fig, axes)
    return save(fig, out, "val_curves.png")


def diagnostics(groups: dict, out: Path) -> list[tuple[str, str]]:
    """[(title, file)] of the diagnostic families found in the runs' TensorBoard scalars."""
    scalars = {}   # run_dir -> {tag: [(step, value)]}
    for runs in groups.values():
        for _, run, _ in runs:
            tb = run / "tb"
            scalars[run] = summarize.read_scalars(tb, lambda tag: True) if tb.is_dir() else {}
    figures = []
    for name, title, method, pattern, ylabel in DIAGNOSTICS:
        runs_of = {group: [r for r in runs if method in (None, r[2].get("method"))] for group, runs in groups.items()}
        runs_of = {group: runs for group, runs in runs_of.items() if runs}
        tags = sorted({t for runs in runs_of.values() for _, run, _ in runs for t in scalars[run]
                       if fnmatch.fnmatchcase(t, pattern)})[:MAX_SUBPLOTS]
        if not tags:
            continue
        fig, axes = subplot_grid(len(tags), f"{title} (mean ± std over seeds)")
        for ax, tag in zip(axes, tags):
            for group, runs in runs_of.items():
                series = [dict(scalars[run].get(tag, [])) for _, run, _ in runs]
                steps = sorted({s for d in series for s in d})
                if steps:
                    plot_band(ax, steps, [[d.get(s) for s in steps] for d in series], group, colour(groups, group))
            ax.set(title=tag, xlabel="training step", ylabel=ylabel)
            ax.grid(alpha=0.3)
        legend_once(fig, axes)
        figures.append((title, save(fig, out, f"diag_{name}.png")))
    return figures


def shapley_figure(groups: dict, evaluations: dict, out: Path) -> str:
    modalities = list(dict.fromkeys(m for e in evaluations.values() for m in e["shapley"]["values"]))
    metric = next(iter(evaluations.values()))["shapley"]["metric"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * len(modalities)), 3.8))
    width = 0.8 / max(1, len(modalities))
    for j, m in enumerate(modalities):
        means, stds = [], []
        for runs in groups.values():
            values = [evaluations[run]["shapley"]["values"][m] for _, run, _ in runs
                      if m in evaluations[run]["shapley"]["values"]]
            mean, std = mean_std(values) if values else (float("nan"), 0.0)
            means.append(mean)
            stds.append(std)
        ax.bar([i + (j - (len(modalities) - 1) / 2) * width for i in range(len(groups))], means, width,
               yerr=stds, capsize=3, label=m)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set(title=f"Shapley contribution of each modality to the fused {metric} (mean ± std over seeds)",
           xlabel="run", ylabel=f"contribution to fused {metric}")
    ax.legend(title="modality", fontsize=8)
    return save(fig, out, "shapley.png")


def missing_figure(groups: dict, evaluations: dict, key: str, out: Path) -> str:
    """One subplot per subset of modalities present (the others absent), a bar per group. Subsets are
    named in one modality order whatever order a run listed its modalities in (GAAL: weak first)."""
    order = list(dict.fromkeys(m for e in evaluations.values() for m in e["modalities"]))

    def label(row):
        return "+".join(sorted(row["present"], key=order.index)) or "none"
    labels = list(dict.fromkeys(label(row) for e in evaluations.values() for row in e["subsets"]))
    labels.sort(key=lambda lb: (0 if lb == "none" else lb.count("+") + 1, lb))
    fig, axes = subplot_grid(len(labels), f"Fused {key} with only the named modalities present, the others "
                                          "absent (mean ± std over seeds)")
    names = list(groups)
    for ax, lb in zip(axes, labels):
        for i, (group, runs) in enumerate(groups.items()):
            values = [row["fused"][key] for _, run, _ in runs for row in evaluations[run]["subsets"] if label(row) == lb]
            if values:
                mean, std = mean_std(values)
                ax.bar(i, mean, 0.8, yerr=std, capsize=2, color=colour(groups, group), label=group)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set(title=f"present: {lb}", ylabel=f"fused test {key}", ylim=(0, 1) if key != "mae" else None)
        ax.grid(axis="y", alpha=0.3)
    return save(fig, out, "missing.png")


def noise_figure(groups: dict, evaluations: dict, key: str, out: Path) -> str:
    modalities = list(dict.fromkeys(m for e in evaluations.values() for m in e["noise"]))
    fig, axes = subplot_grid(len(modalities),
                             f"Fused {key} with Gaussian noise on one modality (mean ± std over seeds)")
    for ax, m in zip(axes, modalities):
        for group, runs in groups.items():
            curves = [{p["level"]: p["fused"][key] for p in evaluations[run]["noise"].get(m, [])} for _, run, _ in runs]
            levels = sorted({lv for c in curves for lv in c})
            if levels:
                plot_band(ax, levels, [[c.get(lv) for lv in levels] for c in curves], group, colour(groups, group))
        ax.set(title=f"noise on {m}", xlabel=f"noise std / training std of {m} (per element)",
               ylabel=f"fused {key}")
        ax.grid(alpha=0.3)
    legend_once(fig, axes)
    return save(fig, out, "noise.png")


# --------------------------------------------------------------------------------------------------
# Tables

def columns(groups: dict, evaluations: dict, metric: str, split: str) -> list[tuple[str, object]]:
    """[(heading, value(run, result) or None)] of the comparison tables: each modality's head (the
    method's own per-modality output), the fused prediction, then the readings that mean the same for
    every method (summarize.uniform_headings: the fused model with only m present, m's Shapley value)."""
    names = list(dict.fromkeys(n for runs in groups.values() for _, _, r in runs for n in r[split]))
    modalities = [n for n in names if n != "fused"]
    readings = {run: summarize.uniform_readings(evaluations[run], run / evaluate.EVALUATION_FILE)
                for runs in groups.values() for _, run, _ in runs}

    def own(n):
        return lambda run, result: result[split][n][metric] if n in result[split] else None

    def uniform(kind, m):
        return lambda run, result: readings[run][kind].get(m)
    return ([(f"{n}: head", own(n)) for n in modalities] + [("fused", own("fused"))]
            + list(zip(summarize.uniform_headings(modalities),
                       [uniform(kind, m) for kind in ("only", "shapley") for m in modalities])))


def summary_table(groups: dict, columns_: list) -> list[str]:
    """Per group and column (columns()): mean ± std over its seeds."""
    lines = ["| run | seeds | " + " | ".join(h for h, _ in columns_) + " |", "|---|---|" + "---|" * len(columns_)]
    for group, runs in groups.items():
        cells = [cell([v for _, run, r in runs if (v := value(run, r)) is not None]) for _, value in columns_]
        lines.append(f"| {group} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def paired_table(groups: dict, columns_: list, baseline: str = "joint") -> list[str]:
    """Per group and column (columns()): mean ± std of group − baseline over the seeds both finished, and
    how many of those pairs lie above / below zero (a sign that holds in every pair reads 3/0 or 0/3)."""
    if baseline not in groups:
        return [f"No `{baseline}` group among the runs: no paired differences."]
    base = {seed: (run, r) for seed, run, r in groups[baseline] if seed is not None}
    lines = [f"| run − {baseline} | pairs | " + " | ".join(h for h, _ in columns_) + " |",
             "|---|---|" + "---|" * len(columns_)]
    for group, runs in groups.items():
        if group == baseline:
            continue
        pairs = [((run, r), base[seed]) for seed, run, r in runs if seed in base]
        cells = []
        for _, value in columns_:
            diffs = [va - vb for a, b in pairs if (va := value(*a)) is not None and (vb := value(*b)) is not None]
            if diffs:
                stats = summarize.paired_stats(diffs)
                cells.append(f"{stats['mean']:+.4f} ± {stats['std']:.4f} ({stats['above']}/{stats['below']})")
            else:
                cells.append("-")
        lines.append(f"| {group} | {len(pairs)} | " + " | ".join(cells) + " |")
    return lines


def shapley_table(groups: dict, evaluations: dict) -> list[str]:
    modalities = list(dict.fromkeys(m for e in evaluations.values() for m in e["shapley"]["values"]))
    lines = ["| run | " + " | ".join(modalities) + " | v(all) | v(none) |", "|---|" + "---|" * (len(modalities) + 2)]
    for group, runs in groups.items():
        entries = [evaluations[run]["shapley"] for _, run, _ in runs]
        cells = [cell([e["values"][m] for e in entries if m in e["values"]]) for m in modalities]
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {cell([e['v_all'] for e in entries])} "
                     f"| {cell([e['v_empty'] for e in entries])} |")
    return lines


# --------------------------------------------------------------------------------------------------

def data_set_of(run: Path) -> str:
    """The data set a run trained on: its meta.json's name, else the data path of its config.yaml."""
    data = summarize.read_yaml(run / "config.yaml").get("data")
    try:
        return str(json.loads((Path(str(data)) / "meta.json").read_text())["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return str(data)


def check_one_data_set(groups: dict) -> None:
    """Refuse (one line) runs of different data sets in one report: their tables and panels would
    mix numbers that do not compare."""
    by_data = defaultdict(list)
    for group, runs in groups.items():
        for _, run, _ in runs:
            by_data[data_set_of(run)].append(run.name)
    if len(by_data) > 1:
        parts = "; ".join(f"{data}: {', '.join(names[:3])}" + (" ..." if len(names) > 3 else "")
                          for data, names in by_data.items())
        raise ConfigError(f"runs of {len(by_data)} data sets in one report ({parts}): report each data set on its own")


def write_report(paths: list, out: Path, split: str = "test", reference: str = "joint") -> Path:
    """report.md and its figures in `out`; `reference`: the group the paired differences are taken
    against, or several, comma-separated (a table against each: e.g. a method against each baseline)."""
    runs = find_runs(paths)
    groups = group_runs(runs)
    parents = {run.parent for run in runs}
    if len(parents) == 1:   # one ablation directory: its rows in the order its jobs list gives them
        groups = summarize.in_listed_order(groups, str(parents.pop()))
    check_one_data_set(groups)
    references = [name.strip() for name in reference.split(",") if name.strip()] or ["joint"]
    for name in references:
        if name != "joint" and name not in groups:
            raise ConfigError(f"--reference {name}: no such group among the runs ({', '.join(groups)})")
    metric = metric_of(next(iter(groups.values()))[0][2])
    records = {run: read_records(run) for run in runs}   # every file read before any compute
    stored = {run: evaluate.stored_evaluation(run).get(split) for run in runs}
    for run in runs:   # as train.evaluate: every run still to evaluate is checked before any is
        if not stored[run]:
            evaluate.run_script(run, evaluate.check_run_dir(run))
    out.mkdir(parents=True, exist_ok=True)
    evaluations = {run: stored[run] or evaluate.evaluate_run(run, split) for run in runs}
    rules = next(iter(evaluations.values()))["rules"]
    key = next(iter(evaluations.values()))["shapley"]["metric"].lstrip("-")
    md = ["# Report", "", f"Runs ({len(runs)}), grouped by name without `_s<seed>`:", "",
          "| run | seeds | directories |", "|---|---|---|"]
    md += [f"| {g} | {', '.join(str(s) for s, _, _ in rs)} | {', '.join(f'`{r}`' for _, r, _ in rs)} |"
           for g, rs in groups.items()]
    columns_ = columns(groups, evaluations, metric, split)
    md += ["", f"## Summary: {split} {metric} (mean ± std over seeds)", "",
           f"The model each run selected on validation (best.pt). {summarize.READINGS} Absent modalities: "
           f"{rules['absent_rule']}.", "", *summary_table(groups, columns_)]
    for name in references:
        md += ["", f"### Paired difference against {name} ({split} {metric}, same seed; mean ± std over pairs, then the pairs above/below 0)", "",
               *paired_table(groups, columns_, name)]
    curves = val_curves(groups, records, metric, out)
    if curves:
        md += ["", f"## Validation {metric} over epochs", "", f"![validation curves]({curves})"]
        if any(r.get("script") == "train.igm" and r.get("variant") == "official"
               for runs_ in groups.values() for _, _, r in runs_):
            md += ["", "IGM (official): one modality trains per stage while the other's encoder and head stay "
                   "frozen, so the frozen modality's validation line is flat within a stage, and each stage "
                   "restarts from the best model so far (best.pt)."]
    md += ["", "## Modality contribution (Shapley)", "",
           f"Exact Shapley values of the fused {split} {key} over every subset of modalities (absent modalities: "
           f"{rules['absent_rule']}). They add up to v(all) − v(none).", "",
           f"![Shapley values]({shapley_figure(groups, evaluations, out)})",
           "", *shapley_table(groups, evaluations),
           "", "## Missing modalities", "", f"Fused {split} {key} with only the modalities named present.", "",
           f"![missing modalities]({missing_figure(groups, evaluations, key, out)})",
           "", "## Noisy modalities", "", f"Noise rule: {rules['noise_rule']}.", "",
           f"![noise robustness]({noise_figure(groups, evaluations, key, out)})"]
    figures = diagnostics(groups, out)
    if figures:
        md += ["", "## Method diagnostics over training", "",
               "TensorBoard scalars (each value is the mean over the run's `log_every` steps)."]
        for title, name in figures:
            md += ["", f"### {title}", "", f"![{title}]({name})"]
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories, or directories holding them (an ablation)")
    parser.add_argument("--out", required=True, help="directory for report.md and its PNG figures")
    parser.add_argument("--split", choices=evaluate.SPLITS, default="test")
    parser.add_argument("--reference", default="joint",
                        help="the group the paired differences are taken against (default: joint), or several, "
                             "comma-separated: a table against each (e.g. joint,ogm_ge,mla,mmpareto)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.runs, Path(args.out), args.split, args.reference)
    except (ConfigError, CheckpointError, ShardFormatError) as err:   # bad input: one line, as train.evaluate
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
