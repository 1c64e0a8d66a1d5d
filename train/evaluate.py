"""Evaluate finished runs: per-modality and fused metrics, the Shapley contribution of each
modality, and the fused metric with modalities absent or noisy at test time.

    python -m train.evaluate runs/joint_imgtab                         # test split, absent = training mean
    python -m train.evaluate 'runs/gaal_ablation/*_s*' --split val     # a glob (quoted or expanded)
    python -m train.evaluate RUN --absent zero --noise_levels 0,0.5,1,2,4 --device cuda

For each run directory the model is rebuilt exactly as the run built it: the run's own script's
`build` (result.json `script`; older runs: train.<method lowercased>), the run's config.yaml and
data, through loop.prepare, then best.pt (the model selected on validation) is loaded into it. On
the chosen split it computes:
  metrics   per modality and fused, as result.json (the same numbers, in float32);
  subsets   the fused metric with each subset S of the modalities present and the others absent;
  shapley   phi_m = sum_{S not containing m} |S|! (M-|S|-1)! / M! (v(S + m) - v(S)), with v(S) the
            fused value metric of subset S (accuracy; regression: -MAE; segmentation: mean Dice),
            exact over the 2^M subsets (M <= 4; more is refused); sum_m phi_m = v(all) - v(none);
  noise     per modality, the fused metric as Gaussian noise of increasing level is added to that
            modality's input alone.
Both rules act on the INPUT, so they work for every model without knowing its internals:
  absent mean  the modality's input replaced by its training-split mean, per element (one pass
               over the training split); zero: by zeros (ABSENT_RULES below says what that means
               for uint8 images and tabular codes);
  noise        x + level * std * N(0, 1), std the training-split standard deviation of each element
               (NOISE_RULE below).
Results go to <run>/evaluation.json, keyed by split, with the rules used and best.pt's SHA-256: a
second call with the same rules on the same best.pt skips the run (--force recomputes). The layout:
docs/evaluation.md. Bad input (a directory without result.json, best.pt or config.yaml, a script
that has no build, a result.json, config.yaml or evaluation.json that is not UTF-8, not JSON/YAML or
not a mapping: read_json, read_yaml) is refused in one line naming the path, exit status 2, before
any compute.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import importlib
import itertools
import json
import math
import sys
from pathlib import Path

import torch

from data_prep import shards
from models.encoders import to_float   # the encoders' own uint8 -> [0, 1] conversion
from train import checkpoint, distributed, loop, metrics
from train.checkpoint import CheckpointError
from train.config import ConfigError, load_config
from train.data import make_loader, to_device
from train.runfiles import json_type, read_json, read_yaml

SPLITS = ("test", "val")
ABSENT_RULES = {
    "mean": "each absent modality's input is replaced by its training-split mean, per element (uint8 pixels "
            "as the encoders read them, x/255; tabular categorical columns: the most frequent training code "
            "of each column, a mean code having no meaning)",
    "zero": "each absent modality's input is replaced by zeros (uint8 pixels: 0.0, a black image; tabular "
            "categorical columns: code -1, which the tabular encoder one-hot encodes as an all-zero block)",
}
NOISE_RULE = ("x + level * std * N(0, 1) on one modality's input, std = the training-split standard deviation of "
              "each element (per element; uint8 pixels as x/255, neither clipped nor re-quantised; tabular: the "
              "continuous columns only, categorical codes unchanged); the draws come from a generator seeded "
              "with noise_seed, the same draws at every level; level 0 is the clean evaluation")
DEFAULT_NOISE_LEVELS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
MAX_EXACT_MODALITIES = 4
EVALUATION_FILE = "evaluation.json"


# --------------------------------------------------------------------------------------------------
# Shapley values (pure maths)

def subsets(players: list) -> list[tuple]:
    """Every subset of `players` (as tuples in the players' order), by size: (), (a,), (b,), (a, b), ..."""
    return [s for k in range(len(players) + 1) for s in itertools.combinations(players, k)]


def shapley_values(value: dict, players: list) -> dict:
    """Exact Shapley values of a cooperative game given on every subset.

        phi_m = sum over S subset of players without m of |S|! (M - |S| - 1)! / M! * (v(S + {m}) - v(S))

    (Shapley, 1953; the weight is the share of the M! orderings in which exactly S precedes m).
    `value`: {frozenset(S): v(S)} for every subset S of `players` (M = len(players)). Efficiency:
    sum_m phi_m = v(all) - v(empty); a player whose presence never changes v gets 0; an additive
    game v(S) = sum_{m in S} a_m gives phi_m = a_m."""
    total = math.factorial(len(players))
    phi = {}
    for m in players:
        others = [p for p in players if p != m]
        phi[m] = sum(math.factorial(len(s)) * math.factorial(len(players) - len(s) - 1) / total
                     * (value[frozenset(s) | {m}] - value[frozenset(s)]) for s in subsets(others))
    return phi


def value_metric(task: str) -> tuple[str, float]:
    """(the fused metric v(S) reads, its sign): higher v is better."""
    return {"classification": ("acc", 1.0), "regression": ("mae", -1.0), "segmentation": ("dice_mean", 1.0)}[task]


# --------------------------------------------------------------------------------------------------
# The input rules

def categorical_columns(spec: dict) -> tuple[int, int]:
    """(first categorical column, number of them) of a modality's input: tabular codes follow the
    continuous columns; other kinds have none."""
    if spec["kind"] != "tabular":
        return 0, 0
    return len(spec.get("continuous", [])), len(spec.get("categorical", {}))


@torch.no_grad()
def input_stats(loader, meta: dict, modalities: list, device) -> dict:
    """One pass over a (training) loader: per modality the per-element mean and standard deviation
    of the input as the encoders read it (float64 sums), and for tabular modalities the most
    frequent code of each categorical column. {m: {"mean", "std", "mode" (or None)}}."""
    sums, squares, counts, n = {}, {}, {}, 0
    for batch in loader:
        batch = to_device(batch, device)
        n += batch["label"].shape[0]
        for m in modalities:
            x = to_float(batch[m]).double()
            sums[m] = sums.get(m, 0) + x.sum(0)
            squares[m] = squares.get(m, 0) + (x * x).sum(0)
            start, num = categorical_columns(meta["modalities"][m])
            if num:
                cards = list(meta["modalities"][m]["categorical"].values())
                codes = batch[m][:, start:start + num].round().long()
                counts[m] = [counts.get(m, [0] * num)[j] + torch.bincount(codes[:, j], minlength=cards[j])
                             for j in range(num)]
    stats = {}
    for m in modalities:
        mean = sums[m] / n
        std = (squares[m] / n - mean * mean).clamp_min(0).sqrt()
        mode = torch.stack([c.argmax() for c in counts[m]]).float() if m in counts else None
        stats[m] = {"mean": mean.float(), "std": std.float(), "mode": mode}
    return stats


def absent_input(x: torch.Tensor, stats: dict, spec: dict, rule: str) -> torch.Tensor:
    """The input that stands for an absent modality, shaped like the batch `x` (ABSENT_RULES)."""
    filled = (stats["mean"] if rule == "mean" else torch.zeros_like(stats["mean"])).expand(x.shape).clone()
    start, num = categorical_columns(spec)
    if num:
        filled[:, start:start + num] = stats["mode"] if rule == "mean" else -1.0
    return filled


def noisy_input(x: torch.Tensor, stats: dict, spec: dict, level: float, generator) -> torch.Tensor:
    """x + level * std * N(0, 1) per element (NOISE_RULE); tabular codes unchanged."""
    noise = torch.randn(x.shape, generator=generator, device=x.device) * stats["std"] * level
    start, num = categorical_columns(spec)
    if num:
        noise[:, start:start + num] = 0
    return to_float(x) + noise


class EditedLoader:
    """A loader whose batches (moved to `device`) pass through `edit(batch)` before the model."""

    def __init__(self, loader, device, edit):
        self.loader, self.device, self.edit = loader, device, edit

    def __iter__(self):
        for batch in self.loader:
            yield self.edit(to_device(batch, self.device))


# --------------------------------------------------------------------------------------------------
# Reading a run's files: every JSON and YAML file this program (and scripts/report.py, for
# evaluation.json) reads goes through read_json / read_yaml, which turn an unreadable file into ONE
# ConfigError naming it (main: `error: <file>: ...`, exit status 2), never a traceback.

def stored_evaluation(run_dir: Path) -> dict:
    """<run_dir>/evaluation.json ({} when there is none), its split entries checked to be objects,
    or ConfigError naming the file."""
    path = Path(run_dir) / EVALUATION_FILE
    if not path.exists():
        return {}
    stored = read_json(path, "an evaluation.json of train.evaluate")
    for split in SPLITS:
        if split in stored and not isinstance(stored[split], dict):
            raise ConfigError(f"{path}: its {split!r} entry is a JSON {json_type(stored[split])}, not an object "
                              "(not an evaluation.json of train.evaluate)")
    return stored


# --------------------------------------------------------------------------------------------------
# One run

def check_run_dir(run_dir: Path) -> dict:
    """result.json of a finished run directory, or ConfigError naming what is missing or unreadable:
    result.json, best.pt and config.yaml must be there, result.json and config.yaml readable, and
    evaluation.json, when there is one, too (checked here, before any compute)."""
    for name in ("result.json", "best.pt", "config.yaml"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: no {name} (not a finished run directory)")
    result = read_json(run_dir / "result.json", "a result.json of train/loop.py", keys=("method", "test"))
    read_yaml(run_dir / "config.yaml")
    stored_evaluation(run_dir)
    return result


def run_script(run_dir: Path, result: dict, script: str | None = None):
    """The module that made the run (its `build` and `CONFIG`): `script` if given, else
    result.json's `script`, else train.<method lowercased> (runs from before `script` was recorded)."""
    name = script or result.get("script") or f"train.{result['method'].lower()}"
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"{run_dir}: its script {name} cannot be imported ({err}); pass --script") from None
    if not callable(getattr(module, "build", None)) or not isinstance(getattr(module, "CONFIG", None), dict):
        raise ConfigError(f"{run_dir}: {name} has no build(cfg, ctx) and CONFIG (pass --script, e.g. "
                          "--script train.joint for a unimodal run)")
    return module


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rebuild(run_dir: Path, module, device: str):
    """(ctx, model, fuse) of a finished run: its config.yaml, its data, its script's build (through
    loop.prepare), best.pt loaded into the unwrapped model. Evaluated in float32."""
    cfg = load_config(module.CONFIG, argv=["--config", str(run_dir / "config.yaml")])
    if not (Path(cfg["data"]) / shards.META_NAME).is_file():
        raise ConfigError(f"{run_dir}: its data {cfg['data']} has no {shards.META_NAME} (run from the directory "
                          "the run was trained from)")
    cfg = dict(cfg, cpu=device == "cpu", mixed_precision="no", resume=False)
    accelerator = distributed.setup_accelerator(cfg)
    cfg, ctx, setup = loop.prepare(cfg, accelerator, method=str(module.__name__), build=module.build, tasks=None,
                                    quiet=True)   # a method's build-time lines (IGM's stage 1) are training's
    model = accelerator.unwrap_model(setup.model)
    try:
        model.load_state_dict(checkpoint.load_trusted(run_dir / "best.pt"))
    except RuntimeError as err:
        raise ConfigError(f"{run_dir / 'best.pt'}: does not fit the model its config builds "
                          f"({str(err).splitlines()[0]})") from None
    return ctx, setup.model, setup.fuse or model.fuse


def evaluate_split(ctx, model, fuse, split: str, absent: str, noise_levels: list, noise_seed: int) -> dict:
    """metrics, subsets, shapley and noise of one split (the module docstring)."""
    modalities, meta, device, task = ctx.modalities, ctx.meta, ctx.device, ctx.task
    if len(modalities) > MAX_EXACT_MODALITIES:
        raise ConfigError(f"modalities={modalities}: exact Shapley values over 2^M subsets are computed for "
                          f"M <= {MAX_EXACT_MODALITIES} modalities only")
    train_loader, _ = make_loader(ctx.cfg, meta, "train", ctx.accelerator, modalities, train=False)
    stats = input_stats(train_loader, meta, modalities, device)
    loader = ctx.loaders[split]
    key, sign = value_metric(task)

    def run(edit=None):
        return metrics.evaluate(model, loader if edit is None else EditedLoader(loader, device, edit),
                                ctx.accelerator, task, fuse)

    clean = run()
    rows, value = [], {}
    for present in subsets(modalities):
        gone = [m for m in modalities if m not in present]

        def drop(batch, gone=gone):
            return batch | {m: absent_input(batch[m], stats[m], meta["modalities"][m], absent) for m in gone}
        fused = clean["fused"] if not gone else run(drop)["fused"]
        rows.append({"present": list(present), "absent": gone, "fused": fused})
        value[frozenset(present)] = sign * fused[key]
    phi = shapley_values(value, modalities)
    noise = {}
    for m in modalities:
        curve = []
        for level in noise_levels:
            generator = torch.Generator(device).manual_seed(noise_seed)   # the same draws at every level

            def perturb(batch, m=m, level=level, generator=generator):
                return batch | {m: noisy_input(batch[m], stats[m], meta["modalities"][m], level, generator)}
            curve.append({"level": level, "fused": clean["fused"] if level == 0 else run(perturb)["fused"]})
        noise[m] = curve
    return {"modalities": modalities, "metrics": clean, "subsets": rows,
            "shapley": {"metric": ("-" if sign < 0 else "") + key, "values": phi,
                        "v_all": value[frozenset(modalities)], "v_empty": value[frozenset()]},
            "noise": noise}


def evaluate_run(run_dir: Path, split: str = "test", absent: str = "mean", noise_levels=DEFAULT_NOISE_LEVELS,
                 noise_seed: int = 0, device: str | None = None, script: str | None = None,
                 force: bool = False) -> dict:
    """Evaluate one finished run and write <run_dir>/evaluation.json[split]; returns that entry.
    Skips (returns the stored entry) when it holds the same rules for the same best.pt.
    device: cpu | cuda (default: cuda where available)."""
    run_dir = Path(run_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = check_run_dir(run_dir)
    module = run_script(run_dir, result, script)
    rules = {"absent": absent, "absent_rule": ABSENT_RULES[absent], "noise_rule": NOISE_RULE,
             "noise_levels": [float(x) for x in noise_levels], "noise_seed": noise_seed,
             "model": "best.pt (selected on validation)", "precision": "float32"}
    path = run_dir / EVALUATION_FILE
    stored = stored_evaluation(run_dir)
    digest = sha256(run_dir / "best.pt")
    entry = stored.get(split)
    if not force and entry and entry.get("rules") == rules and entry.get("best_pt_sha256") == digest:
        print(f"[evaluate] {run_dir}: {split} up to date ({path})")
        return entry
    ctx, model, fuse = rebuild(run_dir, module, device)
    entry = {"rules": rules, "best_pt_sha256": digest,
             **evaluate_split(ctx, model, fuse, split, absent, rules["noise_levels"], noise_seed)}
    stored = {"run_dir": str(run_dir), "method": result["method"], "script": module.__name__, **stored, split: entry}
    checkpoint.atomic_write_text(path, json.dumps(stored, indent=2))
    print_entry(run_dir, split, entry)
    return entry


def print_entry(run_dir: Path, split: str, entry: dict) -> None:
    shapley = entry["shapley"]
    metric = shapley["metric"]
    print(f"\n[evaluate] {run_dir} ({split}, absent = {entry['rules']['absent']}): fused {metric} "
          f"{shapley['v_all']:.4f}, all absent {shapley['v_empty']:.4f}")
    print("  Shapley " + "  ".join(f"{m} {v:+.4f}" for m, v in shapley["values"].items()))
    key = metric.lstrip("-")
    for row in entry["subsets"]:
        print(f"  present {'+'.join(row['present']) or '(none)':<24} fused {key} {row['fused'][key]:.4f}")
    for m, curve in entry["noise"].items():
        print(f"  noise on {m:<12} " + "  ".join(f"{p['level']:g}: {p['fused'][key]:.4f}" for p in curve))
    print(f"  -> {run_dir / EVALUATION_FILE}", flush=True)


# --------------------------------------------------------------------------------------------------

def run_dirs(patterns: list) -> list[Path]:
    """The run directories named (globs expanded here too, for quoted patterns), in order, once each."""
    found = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise ConfigError(f"{pattern}: matches no path")
        found += [Path(p) for p in matches if Path(p) not in found]
    return found


def noise_levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--noise_levels {text}: comma-separated numbers, e.g. 0,0.5,1,2") from None
    if not levels or any(x < 0 or not math.isfinite(x) for x in levels):
        raise argparse.ArgumentTypeError(f"--noise_levels {text}: one or more finite numbers >= 0")
    return levels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run directories (globs accepted)")
    parser.add_argument("--split", choices=SPLITS, default="test")
    parser.add_argument("--absent", choices=sorted(ABSENT_RULES), default="mean",
                        help="what replaces an absent modality's input")
    parser.add_argument("--noise_levels", type=noise_levels, default=list(DEFAULT_NOISE_LEVELS),
                        help="noise std in units of each element's training-split std (default 0,0.25,0.5,1,2,4)")
    parser.add_argument("--noise_seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--script", default=None, help="the module whose build made the runs (default: result.json)")
    parser.add_argument("--force", action="store_true", help="recompute even when evaluation.json is up to date")
    args = parser.parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device here")
        dirs = run_dirs(args.runs)
        for run_dir in dirs:   # every directory checked before any compute
            run_script(run_dir, check_run_dir(run_dir), args.script)
        for run_dir in dirs:
            evaluate_run(run_dir, args.split, args.absent, args.noise_levels, args.noise_seed, args.device,
                         args.script, args.force)
    except (ConfigError, CheckpointError, shards.ShardFormatError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
