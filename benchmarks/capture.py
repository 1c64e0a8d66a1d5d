"""Which method steps torch.compile takes as a whole, and what it changes (the `compile: step` opt-in).

    python benchmarks/capture.py                       # every row of step_time.BENCHES, CPU, tiny shape
    python benchmarks/capture.py --methods gaal igm    # some methods
    python benchmarks/capture.py --device cuda --methods gaal --rows "gaal official" --shape dvm

For each row (a method variant or its plain baseline, built twice from the same seed at
step_time's shape): the eager step and torch.compile of the same step (train.capture.compiled_step:
mode "reduce-overhead" on CUDA) run --steps steps side by side; printed: the largest parameter
difference between the two models afterwards (compiled kernels reorder float operations, and
Adam's first steps turn tiny gradient differences into differences of order lr), the graphs and
graph breaks dynamo makes of the step (torch._dynamo.explain; each backward call is a break), the
seconds the first compiled call took (compilation) and the median eager and compiled step times
after it. A row whose compiled step raises prints the error instead. Slow on CPU: compilation
takes about a minute per row on 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo as dynamo

from benchmarks import ops, step_time
from train.capture import compiled_step


def row_parameters(step) -> list[torch.Tensor]:
    """The parameters a bench row's step updates: those of the optimisers its closure holds."""
    found = []
    for value in step.__defaults__ or ():
        optimizers = value.values() if isinstance(value, dict) else [value]
        for opt in optimizers:
            if isinstance(opt, torch.optim.Optimizer):
                found += [p for group in opt.param_groups for p in group["params"]]
    return found


def median_time(fn, device, steps):
    return statistics.median(step_time.timed(fn, 1, device) for _ in range(steps))


def capture_row(method, name, device, shape, steps) -> list:
    eager = ops.build_rows(method, device, shape)[name]["step"]
    twin = ops.build_rows(method, device, shape)[name]["step"]
    dynamo.reset()
    compiled = compiled_step(twin, device)
    start = time.perf_counter()
    compiled()
    first = time.perf_counter() - start
    eager()
    for _ in range(steps - 1):
        eager()
        compiled()
    diff = max(((a - b).abs().max().item() for a, b in zip(row_parameters(eager), row_parameters(twin))),
               default=float("nan"))
    explained = dynamo.explain(twin)()
    times = [median_time(f, device, steps) * 1e3 for f in (eager, compiled)]
    return [method, name, f"{diff:.1e}", explained.graph_count, explained.graph_break_count, f"{first:.0f}",
            f"{times[0]:.2f}", f"{times[1]:.2f}", f"{times[0] / times[1]:.2f}x"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="*", default=list(step_time.BENCHES), choices=list(step_time.BENCHES))
    parser.add_argument("--rows", nargs="*", default=None, help="only these rows (e.g. 'gaal official')")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default=ops.SHAPE)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"# torch {torch.__version__}, {device}, shape {args.shape}, {args.steps} steps, {args.threads} thread(s)")
    print("method | row | max param diff | graphs | breaks | first call s | eager ms | compiled ms | speed-up")
    for method in args.methods:
        for name in step_time.BENCHES[method][2]:
            if args.rows is not None and name not in args.rows:
                continue
            try:
                row = capture_row(method, name, device, args.shape, args.steps)
            except Exception as err:   # a step dynamo/inductor cannot take: reported, not fatal
                row = [method, name, f"FAILED: {type(err).__name__}: {' '.join(str(err).split())[:160]}"]
            print(" | ".join(str(c) for c in row), flush=True)


if __name__ == "__main__":
    main()
