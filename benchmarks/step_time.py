"""Step time of a method against its baseline, same model, same batch, same process.

    python benchmarks/step_time.py --method gaal                  # embedded-sized model, CPU
    python benchmarks/step_time.py --method gaal --shape dvm --device cuda
    python benchmarks/step_time.py --method igm                   # embedded audio-visual shape
    python benchmarks/step_time.py --method igm --shape crema_d --device cuda

Prints, per method and baseline: median step time, samples/s, peak memory (CUDA) and the ratio,
beside the floor the algorithm itself imposes. The two are timed in alternation (baseline block,
method block, repeated) so that a machine whose speed drifts affects both alike.

gaal: baseline = plain alternating training of the same encoders and shared head (two updates per
batch, no reference gradient, no surgery). GAAL adds one no-grad forward of each encoder and a
head-only backward per update; with a backward costing about two forwards the floor is
(3 + 1) / 3 ≈ 1.33x.

igm: baseline = plain alternating training of the same encoders and IGM heads (per step one update of
each modality: forward, CE, backward, optimiser step). IGM official adds mixup, the released "SAM" as
one re-weighted backward (its exact form at the released rho) and the projection of the three head
weight gradients by T: floor 1.0x. IGM paper adds Foret SAM (a second forward and backward at
theta + eps) and the hooks that keep the moments Y: floor 2.0x.
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

from methods import flat_sam  # noqa: E402
from models.fusion import IGMModel, SharedHeadModel  # noqa: E402
from train.gaal import DEFAULTS as GAAL_DEFAULTS  # noqa: E402
from train.gaal import gaal_step  # noqa: E402
from train import igm  # noqa: E402

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


IGM_SHAPES = {
    # name: (audio spectrogram, video frames, classes, batch, audio encoder, video encoder)
    "av": ([64, 48], [2, 3, 32, 32], 8, 128, {"arch": "resnet10", "base_width": 16},
           {"arch": "resnet10", "base_width": 16, "small_input": True}),
    "crema_d": ([257, 188], [1, 3, 224, 224], 6, 64, {"arch": "resnet18"}, {"arch": "resnet18"}),
}
SHAPE_BATCH = {**{k: v[4] for k, v in SHAPES.items()}, **{k: v[3] for k, v in IGM_SHAPES.items()}}


def igm_meta_and_batch(shape, device, generator):
    spec, frames, classes, batch, audio_cfg, video_cfg = IGM_SHAPES[shape]
    meta = {"num_classes": classes, "modalities": {
        "audio": {"kind": "spectrogram", "shape": spec, "dtype": "float32"},
        "video": {"kind": "frames", "shape": frames, "dtype": "uint8"}}}
    data = {"audio": torch.randn(batch, *spec, generator=generator),
            "video": torch.randint(0, 256, (batch, *frames), dtype=torch.uint8, generator=generator),
            "label": torch.randint(0, classes, (batch,), generator=generator)}
    return meta, {k: v.to(device) for k, v in data.items()}, {"audio": audio_cfg, "video": video_cfg}


def plain_alternating_step(encoders, head, optimizer, batch, order):
    """One update per modality in turn; `head` is shared (GAAL) or a ModuleDict of per-modality heads."""
    for m in order:
        h = head[m] if isinstance(head, torch.nn.ModuleDict) else head
        loss = F.cross_entropy(h(encoders[m](batch[m])), batch["label"])
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


def bench_igm(args, device):
    generator = torch.Generator().manual_seed(0)
    meta, batch, encoder_cfgs = igm_meta_and_batch(args.shape, device, generator)
    order = ["audio", "video"]
    runs = {}
    for name in ("plain alternating", "igm official", "igm paper"):
        torch.manual_seed(0)
        model = IGMModel(meta, encoder_cfgs, order).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
        if name == "plain alternating":
            step = lambda m=model, o=optimizer: plain_alternating_step(m.encoders, m.heads, o, batch, order)  # noqa: E731
        else:
            variant = name.split()[1]
            cfg = dict(igm.DEFAULTS, variant=variant, rho=0.05 if variant == "paper" else 1e-10)
            projections = {}
            for m in order:   # T of the other modality's head-input moments, all three layers
                Y = {i: torch.outer(v, v) + 1e-3 * torch.eye(v.numel()) for i, v in
                     enumerate(torch.randn(d, generator=generator) for d in (model.encoders[m].out_dim, 256, 64))}
                projections[m] = {i: t.to(device) for i, t in igm.projections_from_moments(Y, cfg["tau"]).items()}

            def step(m=model, o=optimizer, c=cfg, p=projections):
                for mod in order:
                    hooks = igm.HeadInputSums(m.heads[mod], [0, 1, 2]) if c["variant"] == "paper" else None
                    igm.igm_step(m, mod, batch, o, p[mod], c, head_hooks=hooks)
                    if hooks is not None:
                        sums, n = hooks.reduced(1)
                        hooks.close()
                        for i, total in sums.items():
                            flat_sam.accumulate_input_moment_from_sum(None, total[0], n[0])
        runs[name] = {"step": step, "times": [], "peak": 0}
    floors = {"plain alternating": "1.000x", "igm official": "~1.0x", "igm paper": "~2.0x"}
    return time_runs(runs, args, device, batch, floors)


def time_runs(runs, args, device, batch, floors):
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
                     f"{t / base:.3f}x", floors[name]])
    return rows


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
    floors = {"plain alternating": "1.000x", "gaal official": "~1.33x", "gaal paper": "~1.33x"}
    return time_runs(runs, args, device, batch, floors)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=["gaal", "igm"], default="gaal")
    parser.add_argument("--shape", choices=sorted(SHAPE_BATCH), default=None,
                        help="gaal: imgtab (default) | dvm; igm: av (default) | crema_d")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes = SHAPES if args.method == "gaal" else IGM_SHAPES
    args.shape = args.shape or next(iter(shapes))
    if args.shape not in shapes:
        parser.error(f"--shape {args.shape} is not a {args.method} shape (choose from {', '.join(shapes)})")
    rows = (bench_gaal if args.method == "gaal" else bench_igm)(args, device)
    header = ["step", "ms/step", "samples/s", "peak memory", "ratio", "floor"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"{args.method}, shape {args.shape}, batch {SHAPE_BATCH[args.shape]}, device {device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}; median of {args.repeats} x {args.steps} steps")
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
