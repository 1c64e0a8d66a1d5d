"""Every performance figure of the repository from one command.

    python benchmarks/perf.py                          # CPU: embedded shapes + MOSI, data path, scaling
    python benchmarks/perf.py --shapes full            # the issue's shapes (DVM ResNet-50, CREMA-D, MOSI)
    python benchmarks/perf.py --device cuda --shapes full --fast   # + the GPU path against fp32 eager
    python benchmarks/perf.py --markdown perf.md       # also write the tables as Markdown (README)
    python benchmarks/perf.py --threads 2              # torch threads (default 1; pinned and printed)
    python benchmarks/perf.py --sections ops           # host overhead only: ATen operators per step

Sections
1. Steps (benchmarks/step_time.py): for each method and its baseline on the same model and batch in
   the same process: ms/step (median), its spread, samples/s, peak memory (CUDA: max allocated;
   CPU: growth of the resident high-water mark over setup, each row built alone in a fresh process),
   the ratio to the baseline, the floor the algorithm imposes, the target and whether it is met.
2. GPU path (--fast; benchmarks/step_time.fast_path_runs, time_fast_path): GAAL official at the DVM shape and IGM
   official at the CREMA-D shape, bf16 + channels_last + fused optimiser (+ torch.compile with
   --compile) against the fp32 eager reference of the same step. Target >= 2x on an H100.
3. Data path (benchmarks/data_path.py): shard reads against raw h5py reads of the same bytes, the
   chunking/compression sweep, and DataLoader samples/s per worker count against the step's.
4. Scaling (benchmarks/scaling.py): bytes per sample, storage, read bandwidth and all-reduce bytes per
   step at 1, 8 and 64 GPUs for the full DVM and Kinetics-Sounds workloads.
5. Host overhead (--sections ops; benchmarks/ops.py; not in the default sections): for every row of
   the steps section's benches (each method's variants and the plain baseline they are compared with)
   at step_time's "tiny" shape (batch 2, narrowest encoders), the ATen operators one step dispatches
   (forward, backward and optimiser step, counted with a TorchDispatchMode after 2 warm-up steps;
   also those inside optimizer.step()), the tiny-shape ms/step (alternating chunks of
   ops.OPS_STEPS steps, ops.OPS_REPEATS rounds, twice), and the ratio method / baseline of both.
   Target <= 1.5x for both.

Timing (sections 1 and 2; step_time.time_runs). The thread count is pinned (--threads, default 1)
and printed in the machine line and the section headers. After 2 untimed warm-up steps of every row,
the rows are timed in alternating chunks of --steps steps, the order reversed every round (baseline
first, then last, then first, ...: A B C, C B A, A B C, ...) for --repeats rounds; the whole
measurement is done twice and the chunks of both pooled. Each row reports the MEDIAN per-step time of
its 2 x --repeats chunks, the spread as their interquartile range (ms/step), and the ratio of the
medians (section 2: its speed-up, the inverse; it uses chunks of 3 steps and 3 rounds,
FAST_STEPS/FAST_REPEATS). On CUDA the device is synchronised before and after every chunk, and peak
memory is the maximum over a row's chunks. A machine shared with other
work (or one whose clock drifts) then slows every row alike instead of whichever row's fixed block it
happened to overlap.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import data_path, ops, scaling, step_time, tables

STEP_CASES = {
    # --shapes: [(method, shape)]; "cpu" keeps every step under a second on two cores
    "cpu": [("gaal", "imgtab"), ("igm", "av"), ("cggm", "seq3"), ("cggm", "mosi"), ("ogm_ge", "av"), ("mla", "av"), ("mmpareto", "av")],
    "full": [("gaal", "dvm"), ("igm", "crema_d"), ("cggm", "mosi"), ("ogm_ge", "crema_d"), ("mla", "crema_d"), ("mmpareto", "crema_d")],
}
TARGETS = {"gaal official": 1.40, "gaal paper": 1.40, "igm official": 1.10, "igm paper": 2.05,
           "cggm official": 1.20, "cggm paper": 1.20}
BENCH = {method: bench for method, (bench, _, _) in step_time.BENCHES.items()}
STEP_HEADER = ["method", "shape", "step", "ms/step", "spread", "samples/s", "peak memory", "ratio", "floor", "target", "met"]


def row_memory_in_fresh_process(method, shape, name, steps, device):
    """CPU peak memory of one row, measured in its own process so rows do not share an allocator."""
    out = subprocess.run([sys.executable, str(Path(step_time.__file__)), "--method", method, "--shape", shape,
                          "--device", str(device), "--steps", str(steps), "--memory_row", name,
                          "--threads", str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def step_section(device, shapes, steps, repeats):
    rows = []
    for method, shape in STEP_CASES[shapes]:
        args = argparse.Namespace(shape=shape, steps=steps, repeats=repeats)
        for name, ms, spread, sps, peak, ratio, floor in BENCH[method](args, device):
            if device.type != "cuda":
                peak = f"{row_memory_in_fresh_process(method, shape, name, 2, device) / 2**20:.0f} MiB"
            r = float(ratio.rstrip("x"))
            target = TARGETS.get(name)
            if target is None:
                met = ""
            elif method == "cggm":   # <= 1.20x, and never above the classifiers' own cost (its floor)
                met = "yes" if r <= target else ("no; <= floor" if r <= float(floor.rstrip("x")) else "no")
            else:
                met = "yes" if r <= target else "no"
            rows.append([method, shape, name, ms, spread, sps, peak, ratio, floor,
                         f"<= {target:.2f}x" if target else "", met])
    return rows


FAST_STEPS, FAST_REPEATS = 3, 3   # GPU-path section: steps per chunk, rounds per repetition


def fast_section(device, shapes, compile_encoders, profile=False):
    """The GPU-path rows of each case and, with `profile`, torch.profiler lines of the same steps."""
    cases = [("gaal", "dvm"), ("igm", "crema_d")] if shapes == "full" else [("gaal", "imgtab"), ("igm", "av")]
    rows, profiles = [], []
    for method, shape in cases:
        runs, batch = step_time.fast_path_runs(method, shape, device, compile_encoders)
        for r in step_time.time_fast_path(runs, batch, device, steps=FAST_STEPS, repeats=FAST_REPEATS):
            rows.append([method, shape, *r])
            print("  " + " | ".join(str(c) for c in rows[-1]), flush=True)   # kept if a later case runs past a limit
        if profile:
            profiles += ["", f"Profile, {method} official at {shape} (torch.profiler, {FAST_STEPS} steps after 2 warm-up):",
                         *step_time.profile_table({k: r["step"] for k, r in runs.items()}, FAST_STEPS, device)]
    return rows, profiles


# the training step each data shape feeds: (method, step_time shape, row)
FED_STEP = {"dvm": ("gaal", "dvm", "gaal official"), "crema_d": ("igm", "crema_d", "igm official")}
READER_HEADER = ["data shape", "order", "ShardDataset samples/s", "raw h5py samples/s", "ours/raw", ">= 0.90"]
LOADER_HEADER = ["data shape", "workers", "loader samples/s", "fed step", "step samples/s", "loader/step", "loader outpaces"]


def step_samples_per_s(method, shape, row, device, step_rows):
    """samples/s of one training step at a data shape: from the step section when it ran that shape,
    else measured here (one warm-up step, then the median of 3)."""
    for r in step_rows:
        if r[0] == method and r[1] == shape and r[2] == row:
            return float(r[STEP_HEADER.index("samples/s")])
    args = argparse.Namespace(shape=shape, steps=1, repeats=1)
    step = BENCH[method](args, device, only=row)[row]["step"]
    step_time.timed(step, 1, device)
    seconds = sorted(step_time.timed(step, 1, device) for _ in range(3))[1]
    return step_time.SHAPE_BATCH[shape] / seconds


def data_section_rows(results, device, step_rows):
    reader, loader = [], []
    for shape, res in results.items():
        for order in ("sequential", "shuffled"):
            rows = [r for r in res["reader"] if r["order"] == order]
            ours = next(r for r in rows if r["reader"] == "ShardDataset")
            raw = next(r for r in rows if r["raw"])
            reader.append([shape, order, f"{ours['samples_per_s']:.0f}", f"{raw['samples_per_s']:.0f}",
                           f"{ours['ratio']:.3f}", "yes" if ours["ratio"] >= 0.90 else "no"])
        method, step_shape, row = FED_STEP[shape]
        step_rate = step_samples_per_s(method, step_shape, row, device, step_rows)
        for r in res["loader"]:
            ratio = r["samples_per_s"] / step_rate
            loader.append([shape, r["workers"], f"{r['samples_per_s']:.0f}", f"{row} ({step_shape}, {device.type})",
                           f"{step_rate:.1f}", f"{ratio:.1f}x", "yes" if ratio > 1 else "no"])
    return reader, loader


def machine_line(device):
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    return (f"{what}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
            f"{datetime.date.today().isoformat()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=sorted(STEP_CASES), default="cpu")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=5,
                        help=f"rounds of alternating chunks per repetition ({step_time.REPETITIONS} repetitions)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (pinned, printed)")
    parser.add_argument("--sections", default="steps,data,scaling",
                        help="comma-separated: steps, fast, data, scaling, ops (default: steps, data, scaling)")
    parser.add_argument("--fast", action="store_true", help="add the GPU-path section (bf16, channels_last, fused)")
    parser.add_argument("--compile", action="store_true", help="GPU-path section: also torch.compile the encoders")
    parser.add_argument("--profile_fast", action="store_true",
                        help="GPU-path section: also profile each of its steps (torch.profiler: CPU and kernel "
                             "time per step, top kernels), to say why a speed-up target is missed")
    parser.add_argument("--data_samples", type=int, default=None, help="data section: samples per synthetic dataset")
    parser.add_argument("--workers", default="0,1,2", help="data section: DataLoader worker counts")
    parser.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.fast and "fast" not in sections:
        sections.insert(1, "fast")
    unknown = set(sections) - {"steps", "fast", "data", "scaling", "ops"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)} (choose from steps, fast, data, scaling, ops)")
    command = "python benchmarks/perf.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"Machine: {machine_line(device)}. Command: `{command.strip()}`."]
    print(md[0])

    step_rows = []
    if "steps" in sections:
        step_rows = step_section(device, args.shapes, args.steps, args.repeats)
        print(f"\n== steps: method vs baseline, same model and batch, {torch.get_num_threads()} threads; "
              f"{step_time.scheme_line(args.repeats, args.steps)}\n")
        print(tables.text(STEP_HEADER, step_rows))
        md += ["", tables.markdown(STEP_HEADER, step_rows)]
    if "fast" in sections:
        rows, profiles = fast_section(device, args.shapes, args.compile, args.profile_fast)
        header = ["method", "shape", "step", "ms/step", "spread", "samples/s", "peak memory", "speed-up"]
        print("\n== GPU path: bf16 autocast + channels_last + fused optimiser against fp32 eager (target >= 2x on H100); "
              f"{torch.get_num_threads()} threads; {step_time.scheme_line(FAST_REPEATS, FAST_STEPS)}\n")
        print(tables.text(header, rows))
        md += ["", tables.markdown(header, rows)]
        if profiles:
            print("\n".join(profiles))
            # Markdown: each step's headline a list item, its kernels the indented items under it
            md += [line if not line or line.startswith((" ", "Profile")) else f"- {line}" for line in profiles]
    if "data" in sections:
        print("\n== data path (benchmarks/data_path.py)")
        results = data_path.main(["--workers", args.workers] + (["--samples", str(args.data_samples)]
                                                                 if args.data_samples else []))
        reader, loader = data_section_rows(results, device, step_rows)
        print("\n== data path summary\n")
        print(tables.text(READER_HEADER, reader))
        print()
        print(tables.text(LOADER_HEADER, loader))
        md += ["", tables.markdown(READER_HEADER, reader), "", tables.markdown(LOADER_HEADER, loader)]
    if "scaling" in sections:
        text, md_text = scaling.report()
        print("\n== scaling\n")
        print(text)
        md += ["", md_text]
    if "ops" in sections:
        print(f"\n== host overhead: ATen operators per step and step time at the tiny shape (batch "
              f"{step_time.SHAPE_BATCH[ops.SHAPE]}, narrowest encoders), method / plain baseline, target <= "
              f"{ops.TARGET:.2f}x for both; {torch.get_num_threads()} threads; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start; "
              f"{step_time.scheme_line(ops.OPS_REPEATS, ops.OPS_STEPS)}\n", flush=True)
        rows = ops.ops_section(device, ops.OPS_STEPS, ops.OPS_REPEATS)
        print()
        print(tables.text(ops.HEADER, rows))
        md += ["", tables.markdown(ops.HEADER, rows)]
    if args.markdown:
        Path(args.markdown).write_text("\n".join(md) + "\n")
        print(f"\nMarkdown written to {args.markdown}")


if __name__ == "__main__":
    main()
