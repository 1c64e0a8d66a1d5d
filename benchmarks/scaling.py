"""Sizing a job: storage, read bandwidth and all-reduce traffic for the full DVM and Kinetics-Sounds.

    python benchmarks/scaling.py                       # the table, from shapes and parameter counts
    python benchmarks/scaling.py --samples_per_s 2000  # + the read bandwidth at that per-GPU rate

Bytes per sample are exact: the shard format stores each modality raw (uint8 images/frames, float32
spectrograms and tables, int64 label and sample_id; chunking adds < 0.1%). The gradient bytes that
one step all-reduces are counted from the models the configs build (fp32 gradients):
- GAAL (train/configs/gaal_dvm.yaml): two updates per batch; update m all-reduces the gradients of
  encoder m and of the shared head (one bucket each), so a step moves image+head and table+head.
- IGM (train/configs/igm_kinetics_sounds.yaml, official): one modality per stage; a step all-reduces
  that modality's encoder and head.
A ring all-reduce of B bytes sends and receives 2(N-1)/N * B bytes per GPU, whatever N is, so the
traffic per GPU per step is almost flat from 8 to 64 GPUs; what grows is the number of steps per
second the fabric must sustain if the per-GPU batch stays fixed, or the share of the step spent
communicating if the global batch stays fixed (the released recipes fix it: 256 for DVM, 64 for
Kinetics-Sounds) — at 64 GPUs that is 4 and 1 samples per GPU, where BatchNorm statistics per rank
stop meaning anything and the GPU idles: the published recipes stop scaling there.
"""
from __future__ import annotations

import argparse
import math

import numpy as np

from benchmarks import tables

WORKLOADS = {
    # name: (samples, {modality: (shape, dtype)}, global batch of the released recipe, method)
    "DVM, all 1.45 M images": (1_450_000, {"image": ([3, 128, 128], "uint8"), "table": ([17], "float32")}, 256, "gaal"),
    "DVM, one image per advert (176,414)": (176_414, {"image": ([3, 128, 128], "uint8"), "table": ([17], "float32")}, 256, "gaal"),
    "Kinetics-Sounds (~18.8 k clips)": (18_800, {"audio": ([257, 1003], "float32"), "video": ([3, 3, 224, 224], "uint8")}, 64, "igm"),
}
GPUS = (1, 8, 64)


def sample_bytes(modalities):
    """Bytes of one stored sample: every modality raw, plus int64 label and sample_id."""
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in modalities.values()) + 16


def gradient_bytes(method):
    """fp32 gradient bytes all-reduced per step by the method at its full-size config."""
    import torch  # noqa: F401  (the models need it; imported here so --help stays fast)
    from models.fusion import IGMModel, SharedHeadModel

    def count(module):
        return sum(p.numel() for p in module.parameters()) * 4
    if method == "gaal":
        meta = {"num_classes": 286, "modalities": {
            "image": {"kind": "image", "shape": [3, 128, 128], "dtype": "uint8"},
            "table": {"kind": "tabular", "shape": [17], "dtype": "float32",
                      "continuous": [f"c{i}" for i in range(13)],
                      "categorical": {"Color": 22, "Bodytype": 13, "Gearbox": 3, "Fuel_type": 12}}}}
        model = SharedHeadModel(meta, {"image": {"arch": "resnet50"}, "table": {"hidden": 2048, "out_dim": 2048}},
                                ["image", "table"])
        head = count(model.head)
        return {"image+head": count(model.encoders["image"]) + head, "table+head": count(model.encoders["table"]) + head}
    meta = {"num_classes": 31, "modalities": {
        "audio": {"kind": "spectrogram", "shape": [257, 1003], "dtype": "float32"},
        "video": {"kind": "frames", "shape": [3, 3, 224, 224], "dtype": "uint8"}}}
    model = IGMModel(meta, {"audio": {"arch": "resnet18"}, "video": {"arch": "resnet18"}}, ["audio", "video"])
    return {m: count(model.encoders[m]) + count(model.heads[m]) for m in ("audio", "video")}


def rows(samples_per_s=None):
    out = []
    for name, (n, mods, batch, method) in WORKLOADS.items():
        per = sample_bytes(mods)
        grads = gradient_bytes(method)
        step_bytes = sum(grads.values()) if method == "gaal" else max(grads.values())
        for g in GPUS:
            ring = 0.0 if g == 1 else 2 * (g - 1) / g * step_bytes
            bandwidth = "" if samples_per_s is None else f"{g * samples_per_s * per / 1e9:.2f} GB/s"
            out.append([name, f"{per / 1e3:.1f} kB", f"{n * per / 1e9:.1f} GB", g,
                        f"{batch / g:g}", f"{step_bytes / 1e6:.1f} MB", f"{ring / 1e6:.1f} MB",
                        f"{per * batch / 1e6:.1f} MB", bandwidth])
    return out


HEADER = ["workload", "bytes/sample", "storage", "GPUs", "samples/GPU/step", "grad bytes/step",
          "ring all-reduce/GPU/step", "read/step (global)", "read at --samples_per_s"]


def report(samples_per_s=None):
    """(plain text, Markdown) of the scaling table."""
    r = rows(samples_per_s)
    header = HEADER if samples_per_s else HEADER[:-1]
    r = r if samples_per_s else [x[:-1] for x in r]
    return tables.text(header, r), tables.markdown(header, r)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples_per_s", type=float, default=None,
                        help="measured training samples/s of one GPU: adds the read bandwidth the job needs")
    args = parser.parse_args(argv)
    print(report(args.samples_per_s)[0])


if __name__ == "__main__":
    main()
