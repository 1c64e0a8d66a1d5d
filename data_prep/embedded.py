"""The embedded benchmark: small multimodal datasets with known modality imbalance (docs/data.md).

Each sample has a label y (C = 8 classes, equal priors) and, per modality m, a latent
``z_m = mu_m[y] + sigma_m * eps`` (eps ~ N(0, I_8)); modalities are conditionally independent
given y. The class means of a modality are a randomly rotated regular simplex with unit norms,
so the Bayes accuracy of a modality depends only on its sigma, not on the seed. The observation
is a fixed, smooth, injective non-linear map of z_m (and, for images, of a label-independent
random shift; the pair (z, shift) is recoverable from the image), so the Bayes-optimal
accuracy from the observation equals the one from the latent. That accuracy is estimated by
Monte Carlo with the true likelihoods, per modality and for all modalities together, and
written to meta.json ``source``. The tabular modality adds categorical columns drawn from
class-conditional distributions, whose exact log-likelihood enters the same computation.

Flavours (modality: kind shape dtype):
  imgtab (GAAL): image: image [3,32,32] uint8 (weak), table: tabular [10] float32 (strong)
  av     (IGM):  audio: spectrogram [64,48] float32 (strong), video: frames [2,3,32,32] uint8 (weak)
  seq3   (CGGM): text: sequence [16,32] (strong), audio: sequence [20,16] (weak),
                 vision: sequence [12,24] (weak) — all float32

Strong modalities are close to linearly decodable (the Bayes rule is linear in z and in the
one-hot categoricals, and their maps are mildly non-linear); weak image/frames modalities move
with a random shift of up to ``shift`` pixels, which a linear read-out of pixels cannot undo but
a convolutional encoder with pooling can.

CLI: python -m data_prep.embedded --flavour imgtab|av|seq3|all --out data [--seed 0] [--overwrite]
     [--set sigma_image=0.7 ...]
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import numpy as np

from data_prep.shards import ShardWriter

FLAVOURS = ("imgtab", "av", "seq3")
NUM_CLASSES = 8
LATENT_DIM = 8
DEFAULT_SIZES = {"train": 8000, "val": 2000, "test": 2000}
SAMPLES_PER_SHARD = 4000
MC_SAMPLES = 200_000
WRITE_BLOCK = 1000
CLASS_NAMES = [f"class_{c}" for c in range(NUM_CLASSES)]

# Per-flavour knobs. sigma_<modality>: latent noise (larger = less label information);
# shift_<modality>: maximal random circular shift in pixels (weak image-like modalities) or in time
# steps (sequences; 0 by default — a knob for making a weak sequence modality slower to learn);
# cat_peak: probability of a class's preferred category in each categorical column.
DEFAULTS = {
    "imgtab": {"sigma_image": 0.60, "shift_image": 10, "sigma_table": 0.38, "cat_peak": 0.75},
    "av": {"sigma_audio": 0.32, "sigma_video": 0.60, "shift_video": 10},
    "seq3": {"sigma_text": 0.34, "sigma_audio": 0.60, "sigma_vision": 0.65, "shift_audio": 0, "shift_vision": 0},
}

# (modality name, kind, shape, dtype, role) in canonical order
LAYOUT = {
    "imgtab": [("image", "image", [3, 32, 32], "uint8", "weak"),
               ("table", "tabular", [10], "float32", "strong")],
    "av": [("audio", "spectrogram", [64, 48], "float32", "strong"),
           ("video", "frames", [2, 3, 32, 32], "uint8", "weak")],
    "seq3": [("text", "sequence", [16, 32], "float32", "strong"),
             ("audio", "sequence", [20, 16], "float32", "weak"),
             ("vision", "sequence", [12, 24], "float32", "weak")],
}
TABLE_CONTINUOUS = ["length", "width", "height", "wheelbase", "engine_size", "power", "mileage", "price"]
TABLE_CATEGORICAL = {"colour": 5, "body": 4}
# plausible raw units for the continuous columns: (offset, scale); the shards hold them z-scored
TABLE_UNITS = np.array([[4500, 300], [1800, 80], [1500, 120], [2700, 150],
                        [2.0, 0.5], [150, 40], [40000, 15000], [20000, 6000]], dtype=np.float64)

_STRUCT, _DATA, _MC = 11, 22, 33   # rng stream tags


# ----------------------------------------------------------------------------------- structure


def _rng(seed, flavour, *tags):
    return np.random.default_rng([seed, FLAVOURS.index(flavour), *tags])


def _simplex_means(rng):
    """C unit-norm class means forming a regular simplex, randomly rotated in R^LATENT_DIM."""
    e = np.eye(NUM_CLASSES)[:, :LATENT_DIM] - 1.0 / NUM_CLASSES
    if LATENT_DIM != NUM_CLASSES:
        raise ValueError("the simplex construction assumes LATENT_DIM == NUM_CLASSES")
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    q, r = np.linalg.qr(rng.standard_normal((LATENT_DIM, LATENT_DIM)))
    return e @ (q * np.sign(np.diag(r)))


def _smooth_fields(rng, count, shape, width):
    """``count`` random fields of ``shape`` (last two axes spatial, periodic), Gaussian-smoothed with
    ``width`` pixels and standardised to zero mean, unit std per field."""
    noise = rng.standard_normal((count, *shape))
    h, w = shape[-2:]
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    wy, wx = (width, width) if np.isscalar(width) else width
    kernel = np.exp(-2 * (math.pi ** 2) * ((fy * wy) ** 2 + (fx * wx) ** 2))
    fields = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(h, w))
    axes = tuple(range(1, fields.ndim))
    fields -= fields.mean(axis=axes, keepdims=True)
    fields /= fields.std(axis=axes, keepdims=True)
    return fields


def _categorical_probs(rng, peak):
    """p(category | class) per categorical column: each class prefers one category (prob ``peak``),
    the rest share 1 - peak. Preferred (colour, body) pairs differ between all classes."""
    perm = rng.permutation(NUM_CLASSES)
    probs = {}
    for j, (name, card) in enumerate(TABLE_CATEGORICAL.items()):
        pref = perm % card if j == 0 else perm // 2 % card
        p = np.full((NUM_CLASSES, card), (1 - peak) / (card - 1))
        p[np.arange(NUM_CLASSES), pref] = peak
        probs[name] = p
    return probs


def _structure(flavour, seed, knobs):
    """Everything fixed by (flavour, seed): class means, sigmas and rendering parameters."""
    mods = {}
    for m_idx, (name, kind, shape, dtype, role) in enumerate(LAYOUT[flavour]):
        rng = _rng(seed, flavour, _STRUCT, m_idx)
        s = {"kind": kind, "shape": shape, "dtype": dtype, "role": role,
             "mu": _simplex_means(rng), "sigma": float(knobs[f"sigma_{name}"])}
        k = LATENT_DIM
        if kind in ("image", "frames"):
            frames = shape[0] if kind == "frames" else 1
            img = shape[-3:]
            s["patterns"] = _smooth_fields(rng, frames * k, img, 3.0).reshape(frames, k, -1) / math.sqrt(k)
            s["bias"] = 0.6 * _smooth_fields(rng, frames, img, 5.0).reshape(frames, -1)
            s["gain"] = 1.4
            s["shift"] = int(knobs[f"shift_{name}"])
        elif kind == "spectrogram":
            s["patterns"] = _smooth_fields(rng, k, shape, (3.0, 2.0)).reshape(k, -1) / math.sqrt(k)
            s["bias"] = 1.5 + 0.3 * _smooth_fields(rng, 1, shape, (6.0, 4.0)).reshape(-1)
            s["gain"] = 1.0
        elif kind == "sequence":
            t_len, d = shape
            drift = _smooth_fields(rng, d * k, (t_len, 1), (2.0, 1.0)).reshape(d, k, t_len)
            base = rng.standard_normal((d, k))
            s["mix"] = (base[None] + 0.5 * drift.transpose(2, 0, 1)) / math.sqrt(k)   # (T, d, k)
            pos = np.arange(t_len)[:, None] / t_len
            freq = rng.uniform(0.5, 3.0, d)[None, :]
            s["pos"] = 0.3 * np.sin(2 * math.pi * freq * pos + rng.uniform(0, 2 * math.pi, d))
            s["shift"] = int(knobs.get(f"shift_{name}", 0))
        elif kind == "tabular":
            q, _ = np.linalg.qr(rng.standard_normal((k, k)))
            s["mix"] = q * 1.2      # orthogonal: well conditioned, injective
            s["cat_probs"] = _categorical_probs(rng, float(knobs["cat_peak"]))
            s["continuous"] = list(TABLE_CONTINUOUS)
            s["categorical"] = dict(TABLE_CATEGORICAL)
        mods[name] = s
    return mods


# ----------------------------------------------------------------------------------- rendering


def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _render(s, z, rng):
    """Observation of latents ``z`` (n, k) for modality structure ``s``; ``rng`` draws nuisances
    (image shifts, categorical codes need the label and are drawn by the caller)."""
    n = len(z)
    kind, shape = s["kind"], s["shape"]
    if kind in ("image", "frames"):
        frames = s["patterns"].shape[0]
        field = np.einsum("nk,fkp->nfp", z.astype(np.float32), s["patterns"].astype(np.float32))
        field = field * np.float32(s["gain"]) + s["bias"][None].astype(np.float32)
        pixels = np.rint(_sigmoid(field) * np.float32(255.0)).astype(np.uint8)
        pixels = pixels.reshape(n, frames, *shape[-3:])
        if s["shift"]:   # circular shift of every frame by the sample's (dy, dx); label-independent
            dy, dx = rng.integers(-s["shift"], s["shift"] + 1, (2, n))
            for sy, sx in sorted(set(zip(dy.tolist(), dx.tolist()))):
                rows = np.nonzero((dy == sy) & (dx == sx))[0]
                pixels[rows] = np.roll(pixels[rows], (sy, sx), axis=(-2, -1))
        return pixels.reshape(n, *shape)
    if kind == "spectrogram":
        u = (z @ s["patterns"] * s["gain"] + s["bias"][None]).astype(np.float32)
        spec = np.log(np.logaddexp(np.float32(0.0), u) + np.float32(1e-3))
        return spec.reshape(n, *shape).astype(np.float32)
    if kind == "sequence":
        x = np.tanh(np.einsum("tdk,nk->ntd", s["mix"], z) + s["pos"][None])
        if s["shift"]:   # circular time shift per sample (label-independent), as the images' shifts
            t_len = x.shape[1]
            offsets = rng.integers(-s["shift"], s["shift"] + 1, len(x))
            idx = (np.arange(t_len)[None, :] - offsets[:, None]) % t_len
            x = np.take_along_axis(x, idx[:, :, None], axis=1)
        return x.astype(np.float32)
    if kind == "tabular":
        u = z @ s["mix"].T
        warped = u + 0.2 * np.tanh(u)    # monotone, mildly non-linear
        return TABLE_UNITS[:, 0] + TABLE_UNITS[:, 1] * warped
    raise ValueError(f"no renderer for kind {kind!r}")


def _sample_split(structure, y, rng_for):
    """All modality arrays for labels ``y``; ``rng_for(m_idx)`` gives each modality its stream."""
    out = {}
    for m_idx, (name, s) in enumerate(structure.items()):
        rng = rng_for(m_idx)
        z = s["mu"][y] + s["sigma"] * rng.standard_normal((len(y), LATENT_DIM))
        x = _render(s, z, rng)
        if s["kind"] == "tabular":
            codes = [_draw_categorical(rng, s["cat_probs"][c], y) for c in s["categorical"]]
            x = np.concatenate([x, np.stack(codes, 1)], axis=1).astype(np.float32)
        out[name] = x
    return out


def _draw_categorical(rng, probs, y):
    cdf = np.cumsum(probs, axis=1)[y]
    u = rng.random(len(y))[:, None]
    return np.minimum((u > cdf).sum(1), probs.shape[1] - 1).astype(np.float64)


# ----------------------------------------------------------------------------------- Bayes


def _knobs(flavour, overrides):
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r} (expected one of {FLAVOURS})")
    unknown = sorted(set(overrides) - set(DEFAULTS[flavour]))
    if unknown:
        raise ValueError(f"unknown settings {unknown} for flavour {flavour!r} "
                         f"(known: {sorted(DEFAULTS[flavour])})")
    return {**DEFAULTS[flavour], **overrides}


def bayes_accuracy(flavour, seed=0, mc_samples=MC_SAMPLES, **overrides):
    """Monte-Carlo Bayes-optimal accuracy of each modality alone and of all together.

    Draws (y, z, categorical codes) from the true model and classifies with the true
    log-likelihoods (Gaussian: -|z - mu_c|^2 / 2 sigma^2; categoricals: log p(code | c)), summed
    over modalities for "all". Returns ({name: acc, ..., "all": acc}, {same keys: stderr}).
    An upper bound for the stored data (uint8 quantisation is ignored)."""
    structure = _structure(flavour, seed, _knobs(flavour, overrides))
    rng = _rng(seed, flavour, _MC)
    y = rng.integers(0, NUM_CLASSES, mc_samples)
    total = np.zeros((mc_samples, NUM_CLASSES))
    acc = {}
    for name, s in structure.items():
        z = s["mu"][y] + s["sigma"] * rng.standard_normal((mc_samples, LATENT_DIM))
        mu = s["mu"]   # -|z - mu_c|^2 / 2 sigma^2 up to a per-sample constant
        loglik = (z @ mu.T - 0.5 * (mu ** 2).sum(1)[None]) / s["sigma"] ** 2
        if s["kind"] == "tabular":
            for probs in s["cat_probs"].values():
                codes = _draw_categorical(rng, probs, y).astype(int)
                loglik += np.log(probs.T[codes])
        total += loglik
        acc[name] = float((loglik.argmax(1) == y).mean())
    acc["all"] = float((total.argmax(1) == y).mean())
    stderr = {k: float(math.sqrt(max(v * (1 - v), 1e-12) / mc_samples)) for k, v in acc.items()}
    return acc, stderr


# ----------------------------------------------------------------------------------- writing


def _split_blocks(structure, seed, flavour, split_idx, n):
    """A split's (start, labels, modality arrays) in write blocks; the same every time it is called."""
    y = _rng(seed, flavour, _DATA, split_idx).integers(0, NUM_CLASSES, n)
    mod_rngs = [_rng(seed, flavour, _DATA, split_idx, m + 1) for m in range(len(structure))]
    for start in range(0, n, WRITE_BLOCK):
        yb = y[start:start + WRITE_BLOCK]
        yield start, yb, _sample_split(structure, yb, lambda m: mod_rngs[m])


def _modality_specs(structure) -> dict:
    """meta.json's modalities entry of the generated structure."""
    modalities = {}
    for name, s in structure.items():
        modalities[name] = {"kind": s["kind"], "shape": s["shape"], "dtype": s["dtype"]}
        if s["kind"] == "tabular":
            modalities[name]["continuous"] = s["continuous"]
            modalities[name]["categorical"] = s["categorical"]
    return modalities


def _source(flavour, seed, sizes, knobs, structure) -> dict:
    """meta.json's source entry: how the set was generated and its Bayes accuracy."""
    acc, stderr = bayes_accuracy(flavour, seed, **knobs)
    return {
        "generator": "data_prep.embedded", "flavour": flavour, "seed": int(seed), "sizes": sizes,
        "settings": knobs,
        "sigmas": {name: s["sigma"] for name, s in structure.items()},
        "latent_dim": LATENT_DIM,
        "bayes_accuracy": acc, "bayes_stderr": stderr, "mc_samples": MC_SAMPLES,
        "note": "upper bound: uint8 quantisation ignored",
        "strong_modality": next(n for n, s in structure.items() if s["role"] == "strong"),
        "weak_modalities": [n for n, s in structure.items() if s["role"] == "weak"],
    }


def _zscore_stats(structure, seed, flavour, n_train, source) -> dict:
    """{table modality: (mean, std, continuous columns)} of the training split's continuous columns,
    also recorded in `source` (the converters' standardisation: the shards hold what a model is fed;
    one extra pass over train)."""
    zscore = {}
    for name, s in structure.items():
        if s["kind"] == "tabular":
            n_cont = len(s["continuous"])
            cont = np.concatenate([b[name][:, :n_cont] for _, _, b in _split_blocks(structure, seed, flavour, 0, n_train)]
                                  ).astype(np.float64)
            zscore[name] = (cont.mean(0), cont.std(0) + 1e-12, n_cont)
            source.setdefault("standardisation", {})[name] = {
                "fitted_on": "train", "mean": cont.mean(0).tolist(), "std": cont.std(0).tolist()}
    return zscore


def generate(out_dir, flavour, seed=0, n_train=None, n_val=None, n_test=None, overwrite=False,
             **snr_overrides) -> pathlib.Path:
    """Write ``<out_dir>/embedded_<flavour>/`` (shard format) and return its path.

    Deterministic from the arguments: the structure depends on (flavour, seed, settings) only,
    and each split draws from its own stream, so changing one split's size leaves the others
    unchanged. ``snr_overrides``: any key of DEFAULTS[flavour] (e.g. sigma_image=0.7)."""
    knobs = _knobs(flavour, snr_overrides)
    sizes = dict(DEFAULT_SIZES)
    sizes.update({split: int(n) for split, n in (("train", n_train), ("val", n_val), ("test", n_test)) if n is not None})
    structure = _structure(flavour, seed, knobs)
    source = _source(flavour, seed, sizes, knobs, structure)
    zscore = _zscore_stats(structure, seed, flavour, sizes["train"], source)
    first_id = 0
    with ShardWriter(out_dir, f"embedded_{flavour}", "classification", NUM_CLASSES, _modality_specs(structure),
                     samples_per_shard=SAMPLES_PER_SHARD, class_names=CLASS_NAMES, source=source,
                     overwrite=overwrite) as writer:
        for split_idx, split in enumerate(("train", "val", "test")):
            for start, yb, batch in _split_blocks(structure, seed, flavour, split_idx, sizes[split]):
                for name, (mean, std, n_cont) in zscore.items():
                    cont = (batch[name][:, :n_cont].astype(np.float64) - mean) / std
                    batch[name][:, :n_cont] = cont.astype(np.float32)
                batch["label"] = yb.astype(np.int64)
                batch["sample_id"] = np.arange(first_id + start, first_id + start + len(yb), dtype=np.int64)
                writer.append(split, batch)
            first_id += sizes[split]
    return writer.root


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavour", required=True, choices=[*FLAVOURS, "all"])
    parser.add_argument("--out", required=True, help="output directory (datasets go to <out>/embedded_<flavour>)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-val", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a DEFAULTS setting, e.g. --set sigma_image=0.7 (repeatable)")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = float(value) if "sigma" in key or "peak" in key else int(value)
    flavours = FLAVOURS if args.flavour == "all" else (args.flavour,)
    if len(flavours) > 1 and overrides:
        parser.error("--set applies to one flavour at a time")
    for flavour in flavours:
        t0 = time.perf_counter()
        root = generate(args.out, flavour, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                        n_test=args.n_test, overwrite=args.overwrite, **overrides)
        from data_prep.shards import load_meta
        src = load_meta(root)["source"]
        bayes = ", ".join(f"{k} {v:.3f}±{src['bayes_stderr'][k]:.3f}" for k, v in src["bayes_accuracy"].items())
        print(f"{root}: {time.perf_counter() - t0:.1f}s; Bayes accuracy: {bayes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
