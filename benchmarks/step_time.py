"""Step time of a method against its baseline, same model, same batch, same process.

    python benchmarks/step_time.py --method gaal                  # embedded-sized model, CPU
    python benchmarks/step_time.py --method gaal --shape dvm --device cuda

Prints, per method and baseline: median step time, samples/s, peak memory (CUDA) and the ratio,
beside the floor the algorithm itself imposes. The two are timed in alternation (baseline block,
method block, repeated) so that a machine whose speed drifts affects both alike.

gaal: baseline = plain alternating training of the same encoders and shared head (two updates per
batch, no reference gradient, no surgery). GAAL adds one no-grad forward of each encoder and a
head-only backward per update; with a backward costing about two forwards the floor is
(3 + 1) / 3 ≈ 1.33x.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.fusion import SharedHeadModel  # noqa: E402
from train.gaal import DEFAULTS as GAAL_DEFAULTS  # noqa: E402
from train.gaal import gaal_step  # noqa: E402

SHAPES = {
    # name: (image shape, n_continuous, categorical, classes, batch, image encoder, table encoder)
    "imgtab": ([3, 32, 32], 8, {"colour": 5, "body": 4}, 8, 128,
               {"arch": "resnet10", "base_width": 16, "small_input": True}, {"hidden": 256, "out_dim": 128}),
    "dvm": ([3, 128, 128], 13, {"Color": 22, "Bodytype": 13, "Gearbox": 3, "Fuel_type": 12}, 286, 256,
            {"arch": "resnet50"}, {"hidden": 2048, "out_dim": 2048}),
}


def synthetic_meta_and_batch(shape, device, generator):
    image, n_cont, cats, classes, batch, image_cfg, table_cfg = SHAPES[shape]
    meta = {"num_classes": classes, "modalities": {
        "image": {"kind": "image", "shape": image, "dtype": "uint8"},
        "table": {"kind": "tabular", "shape": [n_cont + len(cats)], "dtype": "float32",
                  "continuous": [f"c{i}" for i in range(n_cont)], "categorical": cats}}}
    codes = torch.stack([torch.randint(0, c, (batch,), generator=generator) for c in cats.values()], 1).float()
    data = {"image": torch.randint(0, 256, (batch, *image), dtype=torch.uint8, generator=generator),
            "table": torch.cat([torch.randn(batch, n_cont, generator=generator), codes], 1),
            "label": torch.randint(0, classes, (batch,), generator=generator)}
    return meta, {k: v.to(device) for k, v in data.items()}, {"image": image_cfg, "table": table_cfg}


def plain_alternating_step(encoders, head, optimizer, batch, order):
    for m in order:
        loss = F.cross_entropy(head(encoders[m](batch[m])), batch["label"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def timed(fn, steps, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bench_gaal(args, device):
    generator = torch.Generator().manual_seed(0)
    meta, batch, encoder_cfgs = synthetic_meta_and_batch(args.shape, device, generator)
    order = ["image", "table"]
    runs = {}
    for name in ("plain alternating", "gaal official", "gaal paper"):
        torch.manual_seed(0)
        model = SharedHeadModel(meta, encoder_cfgs, order).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        if name == "plain alternating":
            step = lambda m=model, o=optimizer: plain_alternating_step(m.encoders, m.head, o, batch, order)  # noqa: E731
        else:
            cfg = dict(GAAL_DEFAULTS, variant=name.split()[1])
            step = lambda m=model, o=optimizer, c=cfg: gaal_step(m.encoders, m.head, o, batch, order, c)  # noqa: E731
        runs[name] = {"step": step, "times": [], "peak": 0}
    for run in runs.values():           # warm-up (allocations, cudnn autotune)
        timed(run["step"], 2, device)
    for _ in range(args.repeats):
        for run in runs.values():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            run["times"].append(timed(run["step"], args.steps, device))
            if device.type == "cuda":
                run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated())
    base = statistics.median(runs["plain alternating"]["times"])
    rows = []
    for name, run in runs.items():
        t = statistics.median(run["times"])
        rows.append([name, f"{t * 1e3:.1f}", f"{batch['label'].shape[0] / t:.0f}",
                     f"{run['peak'] / 2**20:.0f} MiB" if device.type == "cuda" else "-",
                     f"{t / base:.3f}x", "1.000x" if name == "plain alternating" else "~1.33x"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["gaal"], default="gaal")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="imgtab")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = bench_gaal(args, device)
    header = ["step", "ms/step", "samples/s", "peak memory", "ratio", "floor"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"{args.method}, shape {args.shape}, batch {SHAPES[args.shape][4]}, device {device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}; median of {args.repeats} x {args.steps} steps")
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
