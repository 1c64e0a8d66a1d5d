"""Shared pytest configuration and helpers for tests/ (each block below is one concern)."""

# ====================================================================================================
# Test tiers: unit and integration (pytest.ini registers both markers; scripts/test.sh --unit |
# --integration selects one, plain scripts/test.sh and CI run both).
#
# A test is `integration` when it starts another program or process group: a training or other
# script, a launcher (accelerate, torchrun), a shell script, a SLURM job, torch.multiprocessing.spawn.
# It is found from the source, so nobody has to remember the marker: the test calls such a starter
# (subprocess.*, os.system, torch.multiprocessing.spawn) itself, through a function of its module or
# one it imports from another test module (e.g. tests.test_train.run_script), or uses a fixture that
# does. `@pytest.mark.integration` marks one by hand. Every other test is `unit`: it runs in the
# pytest process, and a unit test that starts a Python interpreter, a shell, a launcher or a SLURM
# command fails (the guard below), so the tiers cannot drift from the rule. Small probes that
# libraries make (uname, git, ldconfig) are allowed.
import ast
import multiprocessing.util
import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PROCESS_CALLS = ("subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "torch.multiprocessing.spawn",
                 "torch.multiprocessing.start_processes", "mp.spawn")
CODE_RUNNERS = {"sh", "bash", "dash", "accelerate", "torchrun", "deepspeed", "srun", "sbatch", "salloc", "scontrol",
                "squeue", "scancel", "sinfo"}
_starters: dict[Path, set[str]] = {}


def _dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def process_starters(path: Path) -> set[str]:
    """The names, in test module `path`, of the functions (tests, helpers, fixtures) that start another
    program or process group directly or through each other, and of such functions it imports from
    other test modules."""
    if path in _starters:
        return _starters[path]
    starters = _starters[path] = set()   # an import cycle between test modules sees the partial set
    calls: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tests."):
            imported = process_starters(TESTS.joinpath(*node.module.split(".")[1:]).with_suffix(".py"))
            starters |= {alias.asname or alias.name for alias in node.names if alias.name in imported}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls.setdefault(node.name, set()).update(
                _dotted(n.func) for n in ast.walk(node) if isinstance(n, ast.Call))
    while new := {name for name, called in calls.items() if name not in starters
                  and any(c.startswith(PROCESS_CALLS) or c in starters for c in called)}:
        starters |= new
    return starters


@pytest.hookimpl(tryfirst=True)   # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    shared = process_starters(TESTS / "conftest.py")
    for item in items:
        if item.get_closest_marker("integration") is None:
            starters = shared | process_starters(Path(str(item.path)))
            if getattr(item, "originalname", item.name) in starters or starters & set(getattr(item, "fixturenames", ())):
                item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


_unit_test_running: list[str] = []   # the node id while a unit test (setup, call, teardown) runs


def _refuse_in_unit_test(program) -> None:
    program = os.fsdecode(program)
    name = os.path.basename(program)
    if _unit_test_running and (name.startswith("python") or name in CODE_RUNNERS or program == sys.executable):
        raise RuntimeError(f"{_unit_test_running[0]}: a unit test started {name}; a test that starts a program "
                           "or process group is an integration test (tests/conftest.py: mark it "
                           "@pytest.mark.integration, or start it through a helper the rule sees)")


def _audit(event: str, args: tuple) -> None:
    if event == "subprocess.Popen":
        _refuse_in_unit_test(args[0])     # the executable, set by Popen (the shell under shell=True)
    elif event == "os.system":
        _refuse_in_unit_test("sh")


sys.addaudithook(_audit)
_spawnv_passfds = multiprocessing.util.spawnv_passfds   # how the spawn and forkserver start methods start Python


def _guarded_spawnv_passfds(path, args, passfds):
    _refuse_in_unit_test(path)
    return _spawnv_passfds(path, args, passfds)


multiprocessing.util.spawnv_passfds = _guarded_spawnv_passfds


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("unit") is not None:
        _unit_test_running.append(item.nodeid)
    try:
        yield
    finally:
        _unit_test_running.clear()
# ==================================================================================== end: test tiers


# ====================================================================================================
# Converter test helpers (tests/test_converters_*.py, tests/test_from_arrays.py): read back what a
# converter wrote, and write small CSV inputs. Imported as `from tests.conftest import ...`; the
# shard reader is imported inside, so collecting the other tests does not load it.
import csv


def read_shards(root, standardize=False):
    """Validate the dataset ``root`` -> (meta, {split: {field: numpy array of every sample}})."""
    from data_prep.shards import ShardDataset, validate
    meta = validate(root)
    out = {}
    for split in meta["splits"]:
        ds = ShardDataset(root, split, meta=meta, standardize=standardize)
        out[split] = {k: v.numpy() for k, v in ds[list(range(len(ds)))].items()}
    return meta, out


def read_samples(root):
    """``<root>/samples.csv`` -> {sample_id: row as a dict}."""
    with open(Path(root) / "samples.csv", newline="", encoding="utf-8") as f:
        return {int(r["sample_id"]): r for r in csv.DictReader(f)}


def write_csv(path, header, rows):
    """A CSV file (folders created); ``header`` None: no header row, as some raw lists have none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
# ========================================================================== end: converter helpers


# ====================================================================================================
# In-process data parallelism (the DDP equivalence tests of each method, tests/test_reliability.py):
# one function run on two gloo ranks, each rank's return value handed back to the test.
def run_on_gloo_ranks(compute, tmp_path, *args, world=2):
    """``[compute(world, rank, *args) for each rank]``, each rank a spawned process in one gloo group."""
    import torch
    torch.multiprocessing.spawn(_gloo_rank, args=(world, str(tmp_path), compute, args), nprocs=world)
    return [torch.load(Path(tmp_path, f"gloo_rank{rank}.pt")) for rank in range(world)]


def _gloo_rank(rank, world, folder, compute, args):
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{folder}/gloo_init", rank=rank, world_size=world)
    torch.save(compute(world, rank, *args), Path(folder, f"gloo_rank{rank}.pt"))
    dist.barrier()
    # gloo's teardown (destroy_process_group, or the interpreter's exit) has aborted a rank under load
    # ("terminate called without an active exception") after its work was done and written: the result
    # is on disk and every rank passed the barrier, so leave without tearing anything down.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
# =================================================================================== end: gloo ranks
