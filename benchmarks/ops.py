"""Host overhead: the ATen operators each method's step dispatches, against its plain baseline.

    python benchmarks/perf.py --sections ops            # the table (counts, tiny-shape step times, ratios)
    python benchmarks/ops.py                            # every row's count and its most frequent operators
    python benchmarks/ops.py --rows "gaal official" --top 30
    python benchmarks/ops.py --foreach --top 0          # the optimisers' foreach path on CPU too, as on CUDA

On a GPU a step of small kernels is bound by the host issuing them (docs/performance.md, GPU path:
~1,900 kernels per GAAL step on an H200), so the number of operators a step dispatches is what a
method costs there beyond its arithmetic. Every row of step_time.BENCHES (each method's variants and
the plain baseline they are compared with, same model and batch) is built at step_time's "tiny" shape
(batch 2, the narrowest encoders of the default depth) and:

- counted (count_ops): 2 warm-up steps, then one step under a TorchDispatchMode that counts every
  operator call reaching the ATen dispatcher's Python key: the forward, autograd's backward (on CPU
  it runs on the calling thread; on CUDA the engine carries the mode to its device threads with the
  rest of the thread-local state) and the optimiser step, split into what runs
  inside ``optimizer.step()`` and the rest. An operator that another operator's kernel calls
  internally is not seen (the mode is off while an operator runs), so this counts the calls the step
  makes (on a GPU most of them launch a kernel; views, detach and the like do not). The count is
  deterministic. Note that on CPU torch's optimisers loop over the parameters (a few operators per
  tensor) while on CUDA they default to the foreach (multi-tensor) implementation: the optimiser's
  share is lower on a GPU.
- timed (step_time.time_runs, the steps section's scheme): alternating chunks of OPS_STEPS steps per
  row, the order reversed every round, OPS_REPEATS rounds, twice; the median per-step time. At this
  shape the arithmetic is negligible and the time is the host's.

Both are reported as the ratio method / plain baseline; the target is <= TARGET for both.
OPS_BUDGET pins each row's count (tests/test_perf.py) so that it cannot creep back up.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import statistics

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import step_time

SHAPE = "tiny"
TARGET = 1.5              # method / plain, for both the operator count and the tiny-shape step time
OPS_STEPS, OPS_REPEATS = 10, 5   # per chunk, rounds per repetition (step_time.REPETITIONS repetitions)

#: row -> operators per step it may dispatch (CPU, "tiny" shape, as count_ops counts them).
#: Each is the count measured before any cut (2026-12-06, torch 2.14.1) x 1.05, rounded up to tens;
#: lower a budget when a change cuts a count. The ATen count does not depend on the thread count.
OPS_BUDGET = {
    "gaal plain alternating": 740,              # measured 703
    "gaal official": 1400,                      # measured 1326 (1486 before the cuts)
    "gaal paper": 940,                          # measured 893 (965 before the cuts)
    "igm plain alternating": 800,               # measured 756
    "igm official": 870,                        # measured 824 (858 before issue 25's cuts)
    "igm paper": 1420,                          # measured 1350 (1718 before issue 25's cuts)
    "cggm joint": 2840,                         # measured 2701
    "cggm joint + classifiers": 3960,           # measured 3764
    "cggm official": 4130,                      # measured 3925 (4258 before issue 25's cuts)
    "cggm paper": 4150,                         # measured 3949 (4232 before issue 25's cuts)
    "ogm_ge joint": 700,                        # measured 665
    "ogm_ge official": 810,                     # measured 767 (887 before issue 25's cuts)
    "ogm_ge paper": 850,                        # measured 807 (1215 before issue 25's cuts)
    "mla plain alternating": 710,               # measured 668
    "mla official": 1030,                       # measured 980
    "mla paper": 790,                           # measured 750
    "mmpareto joint + unimodal losses": 740,    # measured 701
    "mmpareto official": 950,                   # measured 902 (flat buffers; before: 1688)
    "mmpareto paper": 950,                      # measured 904 (flat buffers; before: 1694)
}

HEADER = ["method", "step", "ops/step", "in optimizer.step", "ops ratio", "ratio w/o optimizer.step",
          "tiny ms/step", "spread", "time ratio", "target", "met"]


def row_key(method, name):
    """The budget's name of a row: its own name when it names the method, else '<method> <name>'."""
    return name if name.startswith(method + " ") else f"{method} {name}"


class OpCounter(TorchDispatchMode):
    """Counts every ATen operator call that reaches the Python dispatch key, by operator name
    ('aten::mm', 'aten::add_', ...), in counts['model'] or, while an optimiser's step() runs,
    counts['optimizer']."""

    def __init__(self):
        super().__init__()
        self.counts = {"model": collections.Counter(), "optimizer": collections.Counter()}
        self.phase = "model"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.phase][func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(*_):
            self.phase = "optimizer"

        def post(*_):
            self.phase = "model"
        self._hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)


def count_ops(step, warmup=2, steps=1):
    """Operators per step of `step` (a no-argument callable: forward, backward, optimiser step):
    `warmup` uncounted calls, then `steps` calls counted. Returns {'model': Counter, 'optimizer':
    Counter} per step (totals divided by `steps`, rounded)."""
    for _ in range(warmup):
        step()
    with OpCounter() as counter:
        for _ in range(steps):
            step()
    return {phase: collections.Counter({op: round(n / steps) for op, n in c.items()})
            for phase, c in counter.counts.items()}


def aten_ops(counter):
    """ATen operator calls in a Counter of operator names (leaves out e.g. the profiler's
    record_function markers that optimizer.step and zero_grad dispatch: no kernel behind them)."""
    return sum(n for op, n in counter.items() if op.startswith("aten::"))


def total(counts):
    """ATen operators per step, forward, backward and optimiser step together."""
    return aten_ops(counts["model"]) + aten_ops(counts["optimizer"])


def build_rows(method, device, shape=SHAPE):
    """{row name: {'step', 'times', 'peak'}} of one method's bench (step_time.BENCHES), every row,
    untimed, at `shape`."""
    bench, _, names = step_time.BENCHES[method]
    args = argparse.Namespace(shape=shape, steps=1, repeats=1)
    runs = {}
    for name in names:
        runs.update(bench(args, device, only=name))
    return runs


def count_all(device=torch.device("cpu"), shape=SHAPE, methods=None):
    """{row key: {'model': Counter, 'optimizer': Counter}} for every row of every method."""
    out = {}
    for method in methods or step_time.BENCHES:
        for name, run in build_rows(method, device, shape).items():
            out[row_key(method, name)] = count_ops(run["step"])
    return out


def ops_section(device, steps=OPS_STEPS, repeats=OPS_REPEATS, shape=SHAPE, time_steps=True):
    """The table rows (HEADER): per method and row, its operators per step (all, and those inside
    optimizer.step()), their ratio to the method's plain baseline (its first row), the tiny-shape
    step time (median of alternating chunks), its spread (IQR) and ratio, the target and whether both
    ratios meet it (method rows only; the baseline and CGGM's 'joint + classifiers' floor have none)."""
    rows = []
    for method, (_, _, names) in step_time.BENCHES.items():
        runs = build_rows(method, device, shape)
        counts = {name: count_ops(run["step"]) for name, run in runs.items()}
        if time_steps:
            step_time.time_runs(runs, argparse.Namespace(steps=steps, repeats=repeats), device,
                                {"label": torch.empty(step_time.SHAPE_BATCH[shape])}, {k: "" for k in runs},
                                base_name=names[0])
        base_ops = total(counts[names[0]])
        base_model_ops = aten_ops(counts[names[0]]["model"])
        base_t = statistics.median(runs[names[0]]["times"]) if time_steps else None
        for name in names:
            n = total(counts[name])
            ops_ratio = n / base_ops
            if time_steps:
                t, lo, hi = step_time.summarise(runs[name]["times"])
                ms, spread, t_ratio = f"{t * 1e3:.2f}", f"{lo * 1e3:.2f}–{hi * 1e3:.2f}", t / base_t
            else:
                ms = spread = "-"
                t_ratio = None
            is_method = name.startswith(method + " ")
            if not is_method:
                target = met = ""
            else:
                target = f"<= {TARGET:.2f}x"
                bad = [what for what, r in (("ops", ops_ratio), ("time", t_ratio)) if r is not None and r > TARGET]
                met = "yes" if not bad else "no (" + ", ".join(bad) + ")"
            model_ratio = aten_ops(counts[name]["model"]) / base_model_ops
            rows.append([method, name, n, aten_ops(counts[name]["optimizer"]), f"{ops_ratio:.2f}x",
                         f"{model_ratio:.2f}x", ms, spread,
                         f"{t_ratio:.2f}x" if t_ratio is not None else "-", target, met])
            print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)   # kept if a later method runs past a limit
    return rows


@contextlib.contextmanager
def foreach_optimizers_on_cpu():
    """torch's optimisers built with foreach=None take their multi-tensor (foreach) path on CPU
    parameters too, as they do on CUDA by default: a step then dispatches the operators it would on a
    GPU (a patch of torch.optim.optimizer's private device list, undone on exit; diagnostics only)."""
    import torch.optim.optimizer as optimizer_module
    original = optimizer_module._get_foreach_kernels_supported_devices
    optimizer_module._get_foreach_kernels_supported_devices = lambda: [*original(), "cpu"]
    try:
        yield
    finally:
        optimizer_module._get_foreach_kernels_supported_devices = original


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default=None, help="comma-separated row keys (e.g. 'gaal official,gaal plain alternating')")
    parser.add_argument("--top", type=int, default=15, help="operators listed per row, most frequent first")
    parser.add_argument("--foreach", action="store_true",
                        help="count with the optimisers' foreach path on CPU too (CUDA's default): the GPU's count")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    wanted = [r.strip() for r in args.rows.split(",")] if args.rows else None
    for method in step_time.BENCHES:
        for name, run in build_rows(method, device).items():
            key = row_key(method, name)
            if wanted and key not in wanted:
                continue
            with foreach_optimizers_on_cpu() if args.foreach else contextlib.nullcontext():
                c = count_ops(run["step"])
            both = c["model"] + c["optimizer"]
            print(f"{key}: {total(c)} ATen ops/step ({aten_ops(c['optimizer'])} in optimizer.step"
                  + ("; optimisers' foreach path)" if args.foreach else f"; budget {OPS_BUDGET.get(key, '-')})"))
            for op, n in both.most_common(args.top):
                print(f"  {n:6d}  {op}" + (f"  ({c['optimizer'][op]} in optimizer.step)" if c["optimizer"][op] else ""))


if __name__ == "__main__":
    main()
