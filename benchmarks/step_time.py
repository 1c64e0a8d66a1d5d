"""Step time of a method against its baseline, same model, same batch, same process.

    python benchmarks/step_time.py --method gaal                  # embedded-sized model, CPU
    python benchmarks/step_time.py --method gaal --threads 2      # torch threads (default 1, printed)
    python benchmarks/step_time.py --method gaal --shape dvm --device cuda
    python benchmarks/step_time.py --method igm                   # embedded audio-visual shape
    python benchmarks/step_time.py --method igm --shape crema_d --device cuda
    python benchmarks/step_time.py --method cggm                  # embedded three-sequence shape
    python benchmarks/step_time.py --method cggm --shape mosi
    python benchmarks/step_time.py --method ogm_ge                # embedded audio-visual shape (also mmpareto)
    python benchmarks/step_time.py --method cggm --memory_row "cggm official"   # one row's peak memory (bytes)
    python benchmarks/step_time.py --method cggm --shape mosi --profile --steps 4   # operator time per row
    python benchmarks/step_time.py --method gaal --shape tiny     # batch 2, narrowest encoders: host overhead

Prints, per method and baseline: median step time, its spread, samples/s, peak memory (CUDA) and the
ratio, beside the floor the algorithm itself imposes.

Timing scheme (time_runs; also the GPU rows of time_fast_path). The thread count is pinned
(--threads, default 1: torch.set_num_threads) and printed in the header. Every row is built first and
warmed up (2 untimed steps each). Then the rows are timed in CHUNKS of --steps steps, alternating
between rows, and the order is reversed every round: with rows A (the baseline), B, C the chunks run
A B C, C B A, A B C, ... for --repeats rounds. That whole measurement is done TWICE (REPETITIONS), so
each row has 2 x --repeats chunk times (a chunk's wall time / its steps; on CUDA the device is
synchronised before and after each chunk, and peak memory is the maximum over the chunks). The table
gives each row's MEDIAN per-step time over those chunks, the spread as the interquartile range of the
chunk times (25th-75th percentile, ms/step), and the ratio of the medians (row / baseline). Short
chunks, taken in turn and in both orders, put a machine whose speed drifts or is shared with other
work on every row alike; a few chunks that a burst of other work lands on barely move the median
and the IQR.

Shape "tiny" (every method): the default shape's modalities, depths and heads at batch 2 with the
narrowest encoder widths (ResNet base width 4, tabular MLP width 32, sequence width 8), so a step costs
what the host spends issuing its operators: the shape benchmarks/ops.py counts and times (perf.py
--sections ops).

gaal: baseline = plain alternating training of the same encoders and shared head (two updates per
batch, no reference gradient, no surgery). GAAL adds one no-grad forward of each encoder and a
head-only backward per update; with a backward costing about two forwards the floor is
(3 + 1) / 3 ≈ 1.33x.

igm: baseline = plain alternating training of the same encoders and IGM heads (per step one update of
each modality: forward, CE, backward, optimiser step). IGM official adds mixup, the released "SAM" as
one re-weighted backward (its exact form at the released rho) and the projection of the three head
weight gradients by T: floor 1.0x. IGM paper adds Foret SAM (a second forward and backward at
theta + eps) and the hooks that keep the moments Y: floor 2.0x.

cggm: baseline = joint training of the same encoders, fusion transformer and residual head (one
forward, fused loss, backward, clipping, step). CGGM adds the per-modality classifiers (forward and
backward on detached features, their optimiser step) and cheap bookkeeping (batch metrics,
coefficients, the direction loss on one weight matrix): its floor is "joint + classifiers", printed as
its own row, and the classifiers' parameter bytes are printed below the table.

ogm_ge (audio-visual shapes): baseline = joint training of the same concat-fusion model (fused CE,
backward, step). OGM-GE adds the per-modality scores and, on each modulated gradient tensor, its
standard deviation, one Gaussian draw of its size and a multiply-add: floor ~1.0x (official: the
Conv2d weights; paper: every encoder parameter).

mla (audio-visual shapes): baseline = plain alternating training of the same encoders and shared head
(one update per modality per batch). MLA official adds nothing that costs (its released projection
never runs; the zero-filled gradients step the earlier turns' encoders again: an optimiser pass);
MLA paper adds the projector update and one (out, d) x (d, d) product per turn: floor ~1.0x.

mmpareto (audio-visual shapes): baseline = joint training of the same model with the multimodal and
the unimodal losses summed (one backward). MMPareto needs the two gradients of each encoder apart:
a backward of L_mm and one of sum_m L_m, each through every encoder, so with a backward costing about
two forwards the floor is (1 + 2 + 2) / (1 + 2) ≈ 1.67x; the integration itself is a few norms.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks import tables
from methods import flat_sam
from models.fusion import CGGMModel, ConcatAndUnimodalHeadsModel, ConcatFusionModel, IGMModel, SharedHeadModel
from train import cggm, mla, mmpareto, ogm_ge
from train.config import defaults
from train.gaal import CONFIG as GAAL_CONFIG
from train.gaal import gaal_step
from train import igm

SHAPES = {
    # name: (image shape, n_continuous, categorical, classes, batch, image encoder, table encoder)
    "imgtab": ([3, 32, 32], 8, {"colour": 5, "body": 4}, 8, 128,
               {"arch": "resnet10", "base_width": 16, "small_input": True}, {"hidden": 256, "out_dim": 128}),
    "dvm": ([3, 128, 128], 13, {"Color": 22, "Bodytype": 13, "Gearbox": 3, "Fuel_type": 12}, 286, 256,
            {"arch": "resnet50"}, {"hidden": 2048, "out_dim": 2048}),
    # host overhead (benchmarks/ops.py): imgtab's modalities and depths, batch 2, the narrowest widths
    "tiny": ([3, 16, 16], 8, {"colour": 5, "body": 4}, 8, 2,
             {"arch": "resnet10", "base_width": 4, "small_input": True}, {"hidden": 32, "out_dim": 32}),
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
    "tiny": ([32, 32], [2, 3, 16, 16], 8, 2, {"arch": "resnet10", "base_width": 4},
             {"arch": "resnet10", "base_width": 4, "small_input": True}),
}
CGGM_SHAPES = {
    # name: ({modality: (T, d)}, classes, batch, d_model, encoder layers)
    "seq3": ({"text": (16, 32), "audio": (20, 16), "vision": (12, 24)}, 8, 64, 64, 2),
    "mosi": ({"text": (50, 300), "audio": (50, 5), "vision": (50, 20)}, 1, 64, 64, 2),
    "tiny": ({"text": (4, 8), "audio": (4, 4), "vision": (4, 6)}, 8, 2, 8, 2),
}
SHAPE_BATCH = {**{k: v[4] for k, v in SHAPES.items()}, **{k: v[3] for k, v in IGM_SHAPES.items()},
               **{k: v[2] for k, v in CGGM_SHAPES.items()}}


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


REPETITIONS = 2   # the whole alternating measurement is done this many times; chunks pooled


def timed(fn, steps, device, clock=time.perf_counter):
    """Seconds per step of `steps` calls of fn (one chunk), the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - start) / steps


def round_orders(names, rounds):
    """The order the rows' chunks run in, round by round: as listed, reversed, as listed, ..."""
    names = list(names)
    return [names if r % 2 == 0 else names[::-1] for r in range(rounds)]


def percentile(values, q):
    """q-th percentile (0..100) by linear interpolation between the order statistics."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarise(chunk_times):
    """(median, 25th percentile, 75th percentile) of a row's per-step chunk times."""
    return statistics.median(chunk_times), percentile(chunk_times, 25), percentile(chunk_times, 75)


def bench_igm(args, device, only=None):
    generator = torch.Generator().manual_seed(0)
    meta, batch, encoder_cfgs = igm_meta_and_batch(args.shape, device, generator)
    order = ["audio", "video"]
    runs = {}
    for name in ("plain alternating", "igm official", "igm paper"):
        if only not in (None, name):
            continue
        torch.manual_seed(0)
        model = IGMModel(meta, encoder_cfgs, order).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)
        if name == "plain alternating":
            step = lambda m=model, o=optimizer: plain_alternating_step(m.encoders, m.heads, o, batch, order)  # noqa: E731
        else:
            variant = name.split()[1]
            cfg = dict(defaults(igm.CONFIG), variant=variant, rho=0.05 if variant == "paper" else 1e-10)
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
    return runs if only else time_runs(runs, args, device, batch, floors)


def bench_cggm(args, device, only=None):
    generator = torch.Generator().manual_seed(0)
    mods, classes, batch_size, d_model, layers = CGGM_SHAPES[args.shape]
    task = "classification" if classes > 1 else "regression"
    meta = {"num_classes": classes, "task": task,
            "modalities": {m: {"kind": "sequence", "shape": list(s)} for m, s in mods.items()}}
    batch = {m: torch.randn(batch_size, *s, generator=generator) for m, s in mods.items()}
    batch["label"] = (torch.randint(0, classes, (batch_size,), generator=generator) if task == "classification"
                      else torch.rand(batch_size, generator=generator) * 6 - 3)
    batch = {k: v.to(device) for k, v in batch.items()}
    encoders = {m: {"n_layers": layers} for m in mods}
    runs, clf_bytes = {}, 0
    for name in ("joint", "joint + classifiers", "cggm official", "cggm paper"):
        if only not in (None, name):
            continue
        torch.manual_seed(0)
        model = CGGMModel(meta, encoders, list(mods), d_model).to(device)
        clf_bytes = sum(p.numel() * p.element_size() for p in model.classifiers.parameters())
        opt = torch.optim.Adam(model.model_parameters(), lr=1e-3)
        clf_opt = torch.optim.Adam(model.classifiers.parameters(), lr=5e-4)
        if name.startswith("joint"):
            def step(m=model, o=opt, co=clf_opt, with_clf=name != "joint"):
                from train.metrics import task_loss
                out = m(batch) if with_clf else {k: (m.encode(k, batch[k]), None) for k in m.modalities}
                loss = task_loss(task, m.fuse(out), batch["label"])
                if with_clf:
                    loss = loss + sum(task_loss(task, logits, batch["label"]) for _, logits in out.values())
                    co.zero_grad(set_to_none=True)
                o.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.model_parameters(), 0.8)
                o.step()
                if with_clf:
                    co.step()
        else:
            cfg = dict(defaults(cggm.CONFIG), variant=name.split()[1])
            state = {"metric_prev": torch.zeros(len(mods), dtype=torch.float64, device=device), "direction_prev": None}

            def step(m=model, o=opt, co=clf_opt, c=cfg, s=state):
                cggm.cggm_step(m, batch, o, co, s, c, task)
        runs[name] = {"step": step, "times": [], "peak": 0}
    if only:
        return runs
    floors = {"joint": "1.000x", "joint + classifiers": "floor", "cggm official": "~floor", "cggm paper": "~floor"}
    rows = time_runs(runs, args, device, batch, floors, base_name="joint")
    floor_ratio = float(rows[1][5].rstrip("x"))
    rows[1][6] = f"{floor_ratio:.3f}x"
    rows[2][6] = rows[3][6] = f"{floor_ratio:.3f}x"
    print(f"classifier parameters: {clf_bytes / 2**20:.2f} MiB (plus their Adam state, 2x that)")
    return rows


def time_runs(runs, args, device, batch, floors, base_name="plain alternating", repetitions=REPETITIONS,
              clock=time.perf_counter):
    """Time every run's step by the scheme of the module docstring (chunks of args.steps steps,
    args.repeats rounds, order reversed every round, `repetitions` times) and return the table rows
    [step, ms/step (median), spread (IQR, ms/step), samples/s, peak memory, ratio, floor]."""
    for run in runs.values():           # warm-up (allocations, cudnn autotune)
        timed(run["step"], 2, device, clock)
    for _ in range(repetitions):
        for order in round_orders(runs, args.repeats):
            for name in order:
                run = runs[name]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                run["times"].append(timed(run["step"], args.steps, device, clock))
                if device.type == "cuda":
                    run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated())
    base = statistics.median(runs[base_name]["times"])
    rows = []
    for name, run in runs.items():
        t, lo, hi = summarise(run["times"])
        rows.append([name, f"{t * 1e3:.1f}", f"{lo * 1e3:.1f}–{hi * 1e3:.1f}", f"{batch['label'].shape[0] / t:.0f}",
                     f"{run['peak'] / 2**20:.0f} MiB" if device.type == "cuda" else "-",
                     f"{t / base:.3f}x", floors[name]])
    return rows


def bench_gaal(args, device, only=None):
    generator = torch.Generator().manual_seed(0)
    meta, batch, encoder_cfgs = synthetic_meta_and_batch(args.shape, device, generator)
    order = ["image", "table"]
    runs = {}
    for name in ("plain alternating", "gaal official", "gaal paper"):
        if only not in (None, name):
            continue
        torch.manual_seed(0)
        model = SharedHeadModel(meta, encoder_cfgs, order).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
        if name == "plain alternating":
            step = lambda m=model, o=optimizer: plain_alternating_step(m.encoders, m.head, o, batch, order)  # noqa: E731
        else:
            cfg = dict(defaults(GAAL_CONFIG), variant=name.split()[1])
            step = lambda m=model, o=optimizer, c=cfg: gaal_step(m.encoders, m.head, o, batch, order, c)  # noqa: E731
        runs[name] = {"step": step, "times": [], "peak": 0}
    floors = {"plain alternating": "1.000x", "gaal official": "~1.33x", "gaal paper": "~1.33x"}
    return runs if only else time_runs(runs, args, device, batch, floors)


def bench_ogm_ge(args, device, only=None):
    generator = torch.Generator().manual_seed(0)
    meta, batch, encoder_cfgs = igm_meta_and_batch(args.shape, device, generator)
    order = ["audio", "video"]
    runs = {}
    for name in ("joint", "ogm_ge official", "ogm_ge paper"):
        if only not in (None, name):
            continue
        torch.manual_seed(0)
        model = ConcatFusionModel(meta, encoder_cfgs, order).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        if name == "joint":
            def step(m=model, o=optimizer):
                loss = F.cross_entropy(m.fuse(m(batch)), batch["label"])
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()
        else:
            cfg = dict(defaults(ogm_ge.CONFIG), variant=name.split()[1])
            params = {m: ogm_ge.modulated_parameters(model.encoders[m], "conv" if cfg["variant"] == "official" else "all")
                      for m in order}
            noise = torch.Generator(device).manual_seed(0)
            step = lambda m=model, o=optimizer, c=cfg, p=params, g=noise: ogm_ge.ogm_ge_step(  # noqa: E731
                m, o, batch, c, 0, p, generator=g)
        runs[name] = {"step": step, "times": [], "peak": 0}
    floors = {"joint": "1.000x", "ogm_ge official": "~1.0x", "ogm_ge paper": "~1.0x"}
    return runs if only else time_runs(runs, args, device, batch, floors, base_name="joint")


def bench_mla(args, device, only=None):
    generator = torch.Generator().manual_seed(0)
    meta, batch, encoder_cfgs = igm_meta_and_batch(args.shape, device, generator)
    order = ["audio", "video"]
    runs = {}
    for name in ("plain alternating", "mla official", "mla paper"):
        if only not in (None, name):
            continue
        torch.manual_seed(0)
        model = SharedHeadModel(meta, encoder_cfgs, order).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        if name == "plain alternating":
            step = lambda m=model, o=optimizer: plain_alternating_step(m.encoders, m.head, o, batch, order)  # noqa: E731
        else:
            cfg = mla.resolve_switches(dict(defaults(mla.CONFIG), variant=name.split()[1]))
            state = dict(P=torch.eye(model.head.in_features, device=device), turns=0, prev_mean=None, prev_grad=None)
            step = lambda m=model, o=optimizer, c=cfg, s=state: mla.mla_step(  # noqa: E731
                m.encoders, m.head, o, batch, order, s, c, batch_in_epoch=0, batches_per_epoch=10)
        runs[name] = {"step": step, "times": [], "peak": 0}
    floors = {"plain alternating": "1.000x", "mla official": "~1.0x", "mla paper": "~1.0x"}
    return runs if only else time_runs(runs, args, device, batch, floors)


def bench_mmpareto(args, device, only=None):
    generator = torch.Generator().manual_seed(0)
    meta, batch, encoder_cfgs = igm_meta_and_batch(args.shape, device, generator)
    order = ["audio", "video"]
    runs = {}
    for name in ("joint + unimodal losses", "mmpareto official", "mmpareto paper"):
        if only not in (None, name):
            continue
        torch.manual_seed(0)
        model = ConcatAndUnimodalHeadsModel(meta, encoder_cfgs, order).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9, weight_decay=1e-4)
        if name.startswith("joint"):
            def step(m=model, o=optimizer):
                out = m(batch)
                loss = F.cross_entropy(m.fuse(out), batch["label"]) + sum(
                    F.cross_entropy(logits, batch["label"]) for _, logits in out.values())
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()
        else:
            cfg = dict(defaults(mmpareto.CONFIG), variant=name.split()[1])
            step = lambda m=model, o=optimizer, c=cfg: mmpareto.mmpareto_step(m, o, batch, c)  # noqa: E731
        runs[name] = {"step": step, "times": [], "peak": 0}
    floors = {"joint + unimodal losses": "1.000x", "mmpareto official": "~1.67x", "mmpareto paper": "~1.67x"}
    return runs if only else time_runs(runs, args, device, batch, floors, base_name="joint + unimodal losses")


#: method -> (its bench function, its shapes, its rows in order; the first is the baseline)
BENCHES = {
    "gaal": (bench_gaal, SHAPES, ("plain alternating", "gaal official", "gaal paper")),
    "igm": (bench_igm, IGM_SHAPES, ("plain alternating", "igm official", "igm paper")),
    "cggm": (bench_cggm, CGGM_SHAPES, ("joint", "joint + classifiers", "cggm official", "cggm paper")),
    "ogm_ge": (bench_ogm_ge, IGM_SHAPES, ("joint", "ogm_ge official", "ogm_ge paper")),
    "mla": (bench_mla, IGM_SHAPES, ("plain alternating", "mla official", "mla paper")),
    "mmpareto": (bench_mmpareto, IGM_SHAPES, ("joint + unimodal losses", "mmpareto official", "mmpareto paper")),
}


def fast_path_runs(method, shape, device, compile_encoders=False):
    """The steps the GPU-path rows time: GAAL official at an image-table shape, IGM official at an
    audio-visual shape, as an fp32 eager reference and with bf16 autocast + channels_last weights for
    the CNNs + the fused optimiser (CUDA; CPU since torch 2.4), optionally also torch.compile of the
    encoders. Returns ({setting: {"step", "times", "peak"}}, batch)."""
    generator = torch.Generator().manual_seed(0)
    if method == "gaal":
        meta, batch, encoder_cfgs = synthetic_meta_and_batch(shape, device, generator)
        order = ["image", "table"]
    else:
        meta, batch, encoder_cfgs = igm_meta_and_batch(shape, device, generator)
        order = ["audio", "video"]
    bf16 = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    settings = {"fp32 eager": dict(autocast=contextlib.nullcontext, channels_last=False, fused=False),
                "bf16 + channels_last + fused": dict(autocast=bf16, channels_last=True, fused=True)}
    if compile_encoders:
        settings["... + torch.compile"] = dict(autocast=bf16, channels_last=True, fused=True, compile=True)
    runs = {}
    for name, opt in settings.items():
        torch.manual_seed(0)
        model = (SharedHeadModel if method == "gaal" else IGMModel)(meta, encoder_cfgs, order).to(device)
        if opt["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        if opt.get("compile"):
            for m in order:
                model.encoders[m] = torch.compile(model.encoders[m])
        if method == "gaal":
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=opt["fused"] or None)
            cfg = dict(defaults(GAAL_CONFIG), variant="official")
            step = lambda m=model, o=optimizer, c=cfg, a=opt["autocast"]: gaal_step(m.encoders, m.head, o, batch, order, c, autocast=a)  # noqa: E731
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4, fused=opt["fused"] or None)
            cfg = dict(defaults(igm.CONFIG), variant="official", rho=1e-10)
            proj = {m: {i: torch.eye(d, device=device) for i, d in enumerate((model.encoders[m].out_dim, 256, 64))}
                    for m in order}

            def step(m=model, o=optimizer, c=cfg, a=opt["autocast"], p=proj):
                for mod in order:
                    igm.igm_step(m, mod, batch, o, p[mod], c, autocast=a)
        runs[name] = {"step": step, "times": [], "peak": 0}
    return runs, batch


def time_fast_path(runs, batch, device, steps=3, repeats=3):
    """fast_path_runs' steps against their fp32 eager reference, timed by time_runs' scheme
    (alternating chunks of `steps` steps, order reversed every round, `repeats` rounds, twice; the
    device synchronised around every chunk). Returns rows [step, ms/step, spread, samples/s, peak
    memory, speed-up]."""
    args = argparse.Namespace(steps=steps, repeats=repeats)
    rows = time_runs(runs, args, device, batch, {k: "" for k in runs}, base_name="fp32 eager")
    for r in rows:   # ratio of times -> speed-up of the reference time
        r[5] = f"{1 / float(r[5].rstrip('x')):.2f}x"
    return [r[:6] for r in rows]


def scheme_line(repeats, steps, repetitions=REPETITIONS):
    return (f"median of {repetitions} x {repeats} alternating chunks of {steps} steps per row "
            f"(order reversed every round); spread = IQR of the chunks, ms/step")


def _proc_status_kib(field):
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def measure_row_memory(method, shape, name, steps, device):
    """Peak memory of one row's step, built alone in this process: CUDA max_memory_allocated, or on
    CPU the growth of the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs
    after setup) over the resident set before the first step: gradients, optimiser state and the
    step's peak activations. Returns bytes. On CPU it is meaningful in a fresh process only (perf.py
    runs each row in its own): a process that already freed memory reuses resident pages."""
    args = argparse.Namespace(shape=shape, steps=steps, repeats=1)
    runs = BENCHES[method][0](args, device, only=name)
    step = runs[name]["step"]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timed(step, steps, device)
        return torch.cuda.max_memory_allocated() - base
    before = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    timed(step, steps, device)
    return max(0, _proc_status_kib("VmHWM") - before) * 1024


def profile_table(steps_by_name, steps, device, top=8):
    """Each step: 2 warm-up calls, then `steps` calls under torch.profiler. Returns lines, per step a
    headline `<name>: ...` and indented `  - ` items: the wall time per step, the operators' total self CPU time per step (near the wall time = the host
    launching kernels is the bound) and, on CUDA, the kernels' total device time and count per step
    (near the wall time = the GPU is busy; far below it = the GPU waits for the host) and the `top`
    kernels by device time (operators by CPU time on a CPU). The wall time is under the profiler,
    which adds host overhead per operator."""
    from torch.profiler import ProfilerActivity, profile
    lines = []
    for name, step in steps_by_name.items():
        timed(step, 2, device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            wall = timed(step, steps, device)
        events = prof.key_averages()
        cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        cpu_ms = sum(e.self_cpu_time_total for e in cpu_events) / steps / 1e3

        def device_us(e):   # named self_cuda_time_total before torch 2.4
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

        # the kernels themselves (an operator's own device time repeats its kernels': counted once)
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        key = device_us if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
        ranked = sorted(kernels if device.type == "cuda" else cpu_events, key=key, reverse=True)
        dev = (f", kernels' device time {sum(device_us(e) for e in kernels) / steps / 1e3:.1f} ms/step "
               f"({sum(e.count for e in kernels) // steps} kernels)") if device.type == "cuda" else ""
        lines.append(f"{name}: wall {wall * 1e3:.1f} ms/step, operators' self CPU time {cpu_ms:.1f} ms/step{dev}")
        lines += [f"  - `{e.key[:90]}` {key(e) / steps / 1e3:.2f} ms/step ({e.count // steps} calls)"
                  for e in ranked[:top] if key(e) > 0]
    return lines


def profile_rows(method, shape, steps, device, top=5):
    """Each row built alone, then profile_table: its wall time, the operators' total self time per
    step (what a wall-clock gap between two rows is made of, or is not) and the `top` operators (on
    CUDA: kernels) by self time."""
    bench, _, names = BENCHES[method]
    args = argparse.Namespace(shape=shape, steps=steps, repeats=1)
    for name in names:
        print("\n".join(profile_table({name: bench(args, device, only=name)[name]["step"]}, steps, device, top)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=list(BENCHES), default="gaal")
    parser.add_argument("--shape", choices=sorted(SHAPE_BATCH), default=None,
                        help="gaal: imgtab (default) | dvm; igm, ogm_ge, mla, mmpareto: av (default) | crema_d; "
                             "cggm: seq3 (default) | mosi; every method: tiny (batch 2, the narrowest encoders "
                             "of the default shape's depth: host overhead, benchmarks/ops.py)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of alternating chunks (one chunk per row, order reversed every round), "
                             f"per repetition ({REPETITIONS} repetitions)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (pinned, printed)")
    parser.add_argument("--memory_row", default=None,
                        help="build only this row (e.g. 'gaal official'), run --steps steps, print its peak memory in bytes")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: each row's operator self time per step under torch.profiler")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = BENCHES[args.method][1]
    args.shape = args.shape or next(iter(shapes))
    if args.shape not in shapes:
        parser.error(f"--shape {args.shape} is not a {args.method} shape (choose from {', '.join(shapes)})")
    if args.memory_row:
        print(measure_row_memory(args.method, args.shape, args.memory_row, args.steps, device))
        return
    if args.profile:
        profile_rows(args.method, args.shape, args.steps, device)
        return
    rows = BENCHES[args.method][0](args, device)
    print(f"{args.method}, shape {args.shape}, batch {SHAPE_BATCH[args.shape]}, device {device} "
          f"({torch.get_num_threads()} threads), torch {torch.__version__}; {scheme_line(args.repeats, args.steps)}")
    print(tables.text(["step", "ms/step", "spread", "samples/s", "peak memory", "ratio", "floor"], rows))


if __name__ == "__main__":
    main()
