"""NVGesture -> shards: IGM's 25-class gesture task (depth, RGB and optical-flow clips as frames).

CLI:
  python -m data_prep.nvgesture --raw DIR --out DIR [--name nvgesture] [--train-list FILE]
      [--test-list FILE] [--flow-root DIR] [--frames 80] [--size 256] [--flow-channel 0]
      [--flow-dtype uint8|float16] [--flow-bound 20] [--val-frac 0.1] [--seed 2022]
      [--workers N] [--block 8] [--samples-per-shard N] [--overwrite]

Raw layout (under --raw, the dataset root):
  nvgesture_train_correct_v2.lst, nvgesture_test_correct_v2.lst   (or --train-list/--test-list):
      one clip per non-blank line, whitespace-separated fields
        path:<dir> depth:<name>:<start>:<end> color:<name>:<start>:<end> duo_left:... label:<1-25>
      (order free; other fields such as duo_left are ignored). <dir> is relative to the dataset
      root, a leading "./" allowed; start/end are 0-based frame numbers. A line without path,
      depth, color or label, a malformed sensor field, a negative start, end < start or a label
      outside 1..25 is an error naming the file, the line and the field.
  <dir>/<name>.avi     the depth (sk_depth) and colour (sk_color) videos, decoded with PyAV.
  flow_data/{train,test}/<index>.npy   (or --flow-root): the precomputed optical flow of a clip,
      <index> = 0-based position of the clip among the clip lines of its split file. Accepted
      arrays: (T, H, W), (T, H, W, C) or (T, C, H, W) with C <= 3 (the axis of size <= 3 is the
      channel axis; both ambiguous -> error naming the file). Already cut to the clip: frames
      are taken from index 0.
Every video and flow file is checked to exist before any is decoded (error naming the first
missing ones).

Output <out>/<name>/ (default name nvgesture), modalities in the official order depth, rgb, of:
  depth  kind frames uint8 [T, 1, S, S]   T = --frames (80), S = --size (256)
  rgb    kind frames uint8 [T, 3, S, S]
  of     kind frames uint8 [T, 1, S, S]   (float16 with --flow-dtype float16)
  label  the .lst label minus 1 (0..24)
  splits train / val (carved from the train list) / test (the test list): 1,050 - val / val / 482
  samples.csv  sample_id, split, list, index, path, label

Choices the paper and the released loader leave open:
- Frames: the video's frames number start .. start+T-1 (decode order, 0-based), whatever `end`
  says (clips whose end - start != T are counted in source.counts). Each frame is stretched to
  S x S with PIL bilinear (antialiased) resampling, the rule of data_prep.image_io.
- A video with fewer than start+T frames is padded by repeating its last decoded frame; a flow
  array with fewer than T frames likewise (clips and frames padded are counted per modality in
  source.counts.padded). A video without any frame at or after `start` is an error.
- Depth: one channel = the rounded mean of the decoded R, G, B ((R+G+B+1)//3; the depth videos
  are grey, so this is the grey value whatever the codec's colour conversion does per channel).
- Flow: ONE channel, --flow-channel (default 0: the horizontal component of (dx, dy) flow) of a
  multi-channel array. It is resized to S x S in float32 (PIL bilinear, mode F), then
  - uint8 (default): a uint8 input array is stored as is (resized in 8 bits); any other numeric
    array is clipped to [-B, B] (B = --flow-bound, default 20 pixels, the usual I3D/TSN flow
    range) and mapped linearly to 0..255: round((v + B) * 255 / (2B)).
  - float16: the resized values as float16 (no clipping, no scaling).
  Non-finite values (NaN -> 0, +-inf -> +-B) are replaced before resizing and counted.
- Validation: --val-frac (default 0.1) of the train list, stratified by label (per class
  floor(frac * n_c) topped up by largest remainder to ceil(frac * N); a class with >= 2 clips
  keeps at least one in train and gives at least one to val), class members permuted with
  numpy default_rng([seed, 1]); seed 2022. The test list is never used for selection.
  --val-frac 0 writes no val split.
- sample_id = position in the train list for train/val clips, N_train + position in the test
  list for test clips.
- --workers N decodes clips in N processes, one block (--block clips) ahead of the writer
  (order and output unchanged).
"""
from __future__ import annotations

import multiprocessing
import pathlib
import sys
import time

import numpy as np
from PIL import Image

from data_prep import converter
from data_prep.image_io import find_missing

LISTS = {"train": "nvgesture_train_correct_v2.lst", "test": "nvgesture_test_correct_v2.lst"}
FLOW_DIR = "flow_data"
NUM_CLASSES = 25
FRAMES = 80
SIZE = 256
FLOW_BOUND = 20.0
VAL_FRAC = 0.1
SEED = 2022
SENSORS = {"depth": "depth", "color": "rgb"}       # .lst field -> modality
MODALITIES = ("depth", "rgb", "of")                # the official order


class VideoError(ValueError):
    """A video or flow file exists but cannot be decoded / has no usable frames."""


# ------------------------------------------------------------------------------------ parsing


def _sensor(value, where, key):
    parts = value.split(":")
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"{where}: field '{key}': expected {key}:<name>:<start>:<end>, got "
                         f"{key}:{value!r}")
    try:
        start, end = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"{where}: field '{key}': start/end {parts[1]!r}:{parts[2]!r} are not "
                         "integers") from None
    if start < 0 or end < start:
        raise ValueError(f"{where}: field '{key}': need 0 <= start <= end, got {start}:{end}")
    return parts[0], start, end


def _fields(where, line):
    """The ``key:value`` fields of one clip line; path, depth, color and label are required."""
    fields = {}
    for token in line.split():
        key, sep, value = token.partition(":")
        if not sep or not key:
            raise ValueError(f"{where}: field {token!r} is not <key>:<value>")
        if key in fields:
            raise ValueError(f"{where}: field '{key}' appears twice")
        fields[key] = value
    for key in ("path", "depth", "color", "label"):
        if key not in fields:
            raise ValueError(f"{where}: missing field '{key}'")
    return fields


def _clip(where, n, fields):
    """One clip line's fields -> {line, path, label (0-based), depth, color}."""
    rel = fields["path"].strip()
    while rel.startswith("./"):
        rel = rel[2:]
    if not rel:
        raise ValueError(f"{where}: field 'path' is empty")
    try:
        label = int(fields["label"])
    except ValueError:
        raise ValueError(f"{where}: field 'label' = {fields['label']!r} is not an integer") from None
    if not 1 <= label <= NUM_CLASSES:
        raise ValueError(f"{where}: field 'label' = {label} is outside 1..{NUM_CLASSES}")
    clip = {"line": n, "path": rel, "label": label - 1}
    for key in SENSORS:
        clip[key] = _sensor(fields[key], where, key)
    return clip


def read_list(path):
    """-> list of dicts (line, path, depth=(name, start, end), color=(...), label 0-based)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split list not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e
    clips = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            where = f"{path}, line {n}"
            clips.append(_clip(where, n, _fields(where, line)))
    if not clips:
        raise ValueError(f"{path}: no clip lines")
    return clips


# ----------------------------------------------------------------------------------- decoding


def _resize(arr, size):
    """(H, W) or (H, W, 3) uint8/float32 -> (size, size[, 3]) with PIL bilinear (antialiased)."""
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))


def read_video(path, start, frames, size, grey):
    """-> (uint8 (frames, C, size, size) with C = 1 if grey else 3, frames padded)."""
    import av
    out = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            decoded = 0
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                if i < start:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                if grey:
                    img = ((rgb.astype(np.uint16).sum(axis=2) + 1) // 3).astype(np.uint8)
                    out.append(_resize(img, size)[None])
                else:
                    out.append(_resize(rgb, size).transpose(2, 0, 1))
                if len(out) == frames:
                    break
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: video file not found") from None
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    if not out:
        raise VideoError(f"{path}: the video has {decoded} frames; the clip starts at frame {start}")
    padded = frames - len(out)
    out.extend([out[-1]] * padded)
    return np.ascontiguousarray(np.stack(out)), padded


def _flow_layout(shape, path):
    if len(shape) == 3:
        return "THW"
    if len(shape) == 4:
        c_last, c_second = shape[3] <= 3, shape[1] <= 3
        if c_last and not c_second:
            return "THWC"
        if c_second and not c_last:
            return "TCHW"
        raise VideoError(f"{path}: flow array of shape {tuple(shape)}: cannot tell the channel "
                         "axis (expected (T, H, W), (T, H, W, C) or (T, C, H, W) with C <= 3)")
    raise VideoError(f"{path}: flow array of shape {tuple(shape)}: expected (T, H, W), "
                     "(T, H, W, C) or (T, C, H, W)")


def _flow_channel(arr, path, channel):
    """The (T, H, W) array of ``channel`` (a (T, H, W) array is its own single channel)."""
    layout = _flow_layout(arr.shape, path)
    if arr.dtype.kind not in "uif":
        raise VideoError(f"{path}: flow array has dtype {arr.dtype}, expected a numeric type")
    if layout != "THW":
        c = arr.shape[3] if layout == "THWC" else arr.shape[1]
        if not 0 <= channel < c:
            raise VideoError(f"{path}: --flow-channel {channel} but the array has {c} channels "
                             f"(shape {tuple(arr.shape)}, layout {layout})")
        arr = arr[..., channel] if layout == "THWC" else arr[:, channel]
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise VideoError(f"{path}: flow array of shape {tuple(arr.shape)} has no frames")
    return arr


def _flow_store(arr, size, dtype, bound):
    """(T, H, W) flow -> (T, size, size) in the stored dtype (module doc), non-finite count."""
    keep_uint8 = arr.dtype == np.uint8 and dtype == "uint8"
    nonfinite = 0
    if not keep_uint8:
        arr = arr.astype(np.float32)
        nonfinite = int((~np.isfinite(arr)).sum())
        if nonfinite:
            arr = np.nan_to_num(arr, nan=0.0, posinf=bound, neginf=-bound)
    out = np.stack([_resize(np.ascontiguousarray(f), size) for f in arr])
    if keep_uint8:
        return out, nonfinite
    if dtype == "uint8":
        out = np.round((np.clip(out, -bound, bound) + bound) * (255.0 / (2 * bound)))
        return out.astype(np.uint8), nonfinite
    return out.astype(np.float16), nonfinite


def read_flow(path, frames, size, channel=0, dtype="uint8", bound=FLOW_BOUND):
    """-> (array (frames, 1, size, size) uint8|float16, frames padded, NaNs replaced)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: flow file not found") from None
    except (OSError, ValueError, EOFError) as e:
        raise VideoError(f"{path}: cannot read the flow array ({e})") from e
    arr = _flow_channel(arr, path, channel)
    try:
        arr = np.array(arr[:frames])
    except (OSError, ValueError) as e:
        raise VideoError(f"{path}: cannot read the flow array ({e})") from e
    out, nonfinite = _flow_store(arr, size, dtype, bound)
    padded = frames - len(out)
    if padded:
        out = np.concatenate([out, np.repeat(out[-1:], padded, axis=0)])
    return np.ascontiguousarray(out[:, None]), padded, nonfinite


def load_clip(clip, frames, size, flow_channel=0, flow_dtype="uint8", flow_bound=FLOW_BOUND):
    """One clip -> ({depth, rgb, of} arrays, {modality: frames padded}, NaN count)."""
    depth, pd = read_video(clip["depth_file"], clip["depth"][1], frames, size, grey=True)
    rgb, pr = read_video(clip["color_file"], clip["color"][1], frames, size, grey=False)
    flow, pf, nonfinite = read_flow(clip["flow_file"], frames, size, flow_channel, flow_dtype, flow_bound)
    return {"depth": depth, "rgb": rgb, "of": flow}, {"depth": pd, "rgb": pr, "of": pf}, nonfinite


def _load_safe(args):
    """Pool worker: never raises (exceptions do not always pickle)."""
    try:
        return True, load_clip(*args)
    except FileNotFoundError as e:
        return False, ("missing", str(e))
    except Exception as e:   # noqa: BLE001 - re-raised in the parent with the file named
        return False, ("decode", str(e) if isinstance(e, VideoError) else f"{type(e).__name__}: {e}")


def _unwrap(result):
    ok, value = result
    if not ok:
        what, message = value
        raise (FileNotFoundError if what == "missing" else VideoError)(message)
    return value


def _blocks(clips, args, block, pool):
    """Yield (start, results) per block of ``block`` clips; with a pool the next block decodes
    while the caller writes the current one (at most two blocks in memory)."""
    starts = list(range(0, len(clips), block))
    jobs = lambda s: [(c, *args) for c in clips[s:s + block]]
    if pool is None:
        for s in starts:
            yield s, [(True, load_clip(*j)) for j in jobs(s)]
        return
    pending = pool.map_async(_load_safe, jobs(starts[0]), chunksize=1) if starts else None
    for i, s in enumerate(starts):
        results = pending.get()
        pending = (pool.map_async(_load_safe, jobs(starts[i + 1]), chunksize=1)
                   if i + 1 < len(starts) else None)
        yield s, results


# ---------------------------------------------------------------------------------------- read


def _check_options(frames, size, flow_channel, flow_dtype, flow_bound, val_frac, workers, block):
    if frames < 1 or size < 1 or block < 1 or workers < 0:
        raise ValueError(f"need --frames >= 1, --size >= 1, --block >= 1, --workers >= 0 "
                         f"(got {frames}, {size}, {block}, {workers})")
    if flow_dtype not in ("uint8", "float16"):
        raise ValueError(f"--flow-dtype must be uint8 or float16, got {flow_dtype!r}")
    if not flow_bound > 0:
        raise ValueError(f"--flow-bound must be > 0, got {flow_bound}")
    if flow_channel < 0:
        raise ValueError(f"--flow-channel must be >= 0, got {flow_channel}")
    if not 0 <= val_frac < 1:
        raise ValueError(f"--val-frac must be in [0, 1), got {val_frac}")


def _read_clips(raw, lists, flow_root):
    """Both split lists -> {train|test: [clip dicts]}, each with its list, index and file paths;
    every video and flow file checked to exist (error naming the first missing ones)."""
    clips = {s: read_list(p) for s, p in lists.items()}
    for split, split_clips in clips.items():
        for i, c in enumerate(split_clips):
            c["list"], c["index"] = split, i
            for key in SENSORS:
                c[f"{key}_file"] = raw / c["path"] / f"{c[key][0]}.avi"
            c["flow_file"] = flow_root / split / f"{i}.npy"
    everything = [c for s in clips.values() for c in s]
    for kind, key in (("video", "depth_file"), ("video", "color_file"), ("flow", "flow_file")):
        files = [c[key] for c in everything]
        missing = find_missing(files)
        if missing:
            c = everything[missing[0]]
            shown = ", ".join(str(files[i]) for i in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{lists[c['list']]}, line {c['line']}: {len(missing)} {kind} "
                                    f"file(s) not found: {shown}{more}")
    return clips


# --------------------------------------------------------------------------------------- split


def _split(clips, val_frac, seed):
    """-> split -> clips in writing order; each clip gets its split and sample_id (module doc)."""
    n_train = len(clips["train"])
    train_labels = np.array([c["label"] for c in clips["train"]], dtype=np.int64)
    train, val = converter.carve_val(np.arange(n_train), train_labels, val_frac, seed)
    order = {"train": [clips["train"][i] for i in train]}
    if len(val):
        order["val"] = [clips["train"][i] for i in val]
    order["test"] = clips["test"]
    first_id = {"train": 0, "test": n_train}
    for split, split_clips in order.items():
        for c in split_clips:
            c["split"] = split
            c["sample_id"] = first_id[c["list"]] + c["index"]
    return order


# --------------------------------------------------------------------------------------- write


def _source(raw, lists, flow_root, options, counts):
    frames, flow_dtype, flow_bound = options["frames"], options["flow_dtype"], options["flow_bound"]
    return {
        "converter": "data_prep.nvgesture", "raw": str(raw.resolve()),
        "lists": {s: str(p.resolve()) for s, p in lists.items()}, "flow_root": str(flow_root.resolve()),
        "options": options,
        "frames": {"rule": f"video frames start .. start+{frames - 1} (decode order, 0-based), "
                           "`end` ignored; short videos padded by repeating the last frame",
                   "resize": "stretched to size x size, PIL bilinear (antialiased)",
                   "depth": "one channel: (R + G + B + 1) // 3 of the decoded RGB frame",
                   "rgb": "decoded as rgb24 by PyAV"},
        "flow": {"file": "<flow_root>/<train|test>/<index>.npy, index = position in the split list",
                 "frames": f"array frames 0 .. {frames - 1}; short arrays padded by repeating the "
                           "last frame",
                 "channel": options["flow_channel"],
                 "layouts": "(T,H,W), (T,H,W,C), (T,C,H,W) with C <= 3",
                 "resize": "float32, PIL bilinear (antialiased) to size x size",
                 "store": ("uint8: uint8 arrays as is; others clipped to [-bound, bound] and mapped "
                           "to round((v + bound) * 255 / (2 * bound))"
                           if flow_dtype == "uint8" else "float16 of the resized values"),
                 "nonfinite": "NaN -> 0, +-inf -> +-bound, before resizing (counted)",
                 "bound": flow_bound},
        "labels": ".lst label minus 1",
        "split": {"rule": "val = val_frac of the train list, stratified by label (per class "
                          "floor(frac*n_c) topped up by largest remainder to ceil(frac*N); >= 1 "
                          "per class in val and in train when the class has >= 2 clips); class "
                          "members permuted with numpy default_rng([seed, 1]); test = the test list",
                  "seed": options["seed"], "val_frac": options["val_frac"]},
        "counts": counts,
        "sample_id": "position in the train list (train and val), n_train + position in the test list",
    }


def _tally(loaded, padded, nonfinite):
    """Add a block's padded frames and non-finite flow values to the counts in meta.json source."""
    for _, pads, bad in loaded:
        for m, p in pads.items():
            padded[m]["clips"] += p > 0
            padded[m]["frames"] += p
        nonfinite["clips"] += bad > 0
        nonfinite["values"] += bad


def _batches(order, args, block, workers, counts, log):
    """The batches of every split; with ``workers`` > 0 a pool decodes the next block meanwhile."""
    pool = multiprocessing.get_context().Pool(workers) if workers > 0 else None
    try:
        for split, split_clips in order.items():
            for start, results in _blocks(split_clips, args, block, pool):
                batch = split_clips[start:start + len(results)]
                loaded = [_unwrap(r) for r in results]
                _tally(loaded, counts["padded"], counts["flow_nonfinite"])
                yield split, {**{m: np.stack([a[m] for a, _, _ in loaded]) for m in MODALITIES},
                              "label": np.array([c["label"] for c in batch], dtype=np.int64),
                              "sample_id": np.array([c["sample_id"] for c in batch], dtype=np.int64)}
                log(f"{split}: {start + len(batch)}/{len(split_clips)} clips written")
        if any(p["clips"] for p in counts["padded"].values()):
            log(f"padded clips (repeating the last frame): {counts['padded']}")
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()


def _index(order):
    return {"samples.csv": (["sample_id", "split", "list", "index", "path", "label"],
                            sorted([c["sample_id"], c["split"], c["list"], c["index"], c["path"], c["label"]]
                                   for s in order.values() for c in s))}


def convert(raw, out, name="nvgesture", train_list=None, test_list=None, flow_root=None,
            frames=FRAMES, size=SIZE, flow_channel=0, flow_dtype="uint8", flow_bound=FLOW_BOUND,
            val_frac=VAL_FRAC, seed=SEED, workers=0, block=8, samples_per_shard=None,
            overwrite=False, log=None) -> pathlib.Path:
    """Convert NVGesture (layout of the module docstring) into ``<out>/<name>/``."""
    log = log or converter.no_log
    _check_options(frames, size, flow_channel, flow_dtype, flow_bound, val_frac, workers, block)
    converter.check_output(out, name, overwrite)
    raw = pathlib.Path(raw)
    lists = {"train": pathlib.Path(train_list) if train_list else raw / LISTS["train"],
             "test": pathlib.Path(test_list) if test_list else raw / LISTS["test"]}
    flow_root = pathlib.Path(flow_root) if flow_root else raw / FLOW_DIR
    t0 = time.perf_counter()
    clips = _read_clips(raw, lists, flow_root)
    order = _split(clips, val_frac, seed)
    splits = {s: len(c) for s, c in order.items()}
    log(f"read lists: {splits} clips ({time.perf_counter() - t0:.1f}s)")

    modalities = {
        "depth": {"kind": "frames", "shape": [frames, 1, size, size], "dtype": "uint8"},
        "rgb": {"kind": "frames", "shape": [frames, 3, size, size], "dtype": "uint8"},
        "of": {"kind": "frames", "shape": [frames, 1, size, size], "dtype": flow_dtype},
    }
    options = {"frames": frames, "size": size, "flow_channel": flow_channel, "flow_dtype": flow_dtype,
               "flow_bound": flow_bound, "val_frac": val_frac, "seed": seed}
    off_length = sum(1 for s in clips.values() for c in s for k in SENSORS if c[k][2] - c[k][1] != frames)
    counts = {"lists": {s: len(c) for s, c in clips.items()}, "splits": splits,
              "clip_sensors_with_end_minus_start_not_frames": off_length,
              "padded": {m: {"clips": 0, "frames": 0} for m in MODALITIES},   # filled while writing
              "flow_nonfinite": {"clips": 0, "values": 0}}
    meta = converter.Meta("classification", NUM_CLASSES, modalities,
                          _source(raw, lists, flow_root, options, counts))
    batches = _batches(order, (frames, size, flow_channel, flow_dtype, flow_bound), block, workers, counts, log)
    return converter.write(out, name, meta, batches, lambda: _index(order),
                           samples_per_shard=samples_per_shard, overwrite=overwrite, log=log, started=t0)


# ---------------------------------------------------------------------------------------- CLI


def _arguments(parser):
    parser.add_argument("--raw", required=True, help="dataset root (the .lst files, Video_data/, flow_data/)")
    parser.add_argument("--train-list", help=f"default <raw>/{LISTS['train']}")
    parser.add_argument("--test-list", help=f"default <raw>/{LISTS['test']}")
    parser.add_argument("--flow-root", help=f"default <raw>/{FLOW_DIR}")
    parser.add_argument("--frames", type=int, default=FRAMES, help="frames per clip from `start`")
    parser.add_argument("--size", type=int, default=SIZE, help="frames resized to size x size")
    parser.add_argument("--flow-channel", type=int, default=0, help="flow channel stored (multi-channel arrays)")
    parser.add_argument("--flow-dtype", choices=("uint8", "float16"), default="uint8")
    parser.add_argument("--flow-bound", type=float, default=FLOW_BOUND,
                        help="float flow clipped to [-bound, bound] before the uint8 mapping")
    parser.add_argument("--val-frac", type=float, default=VAL_FRAC, help="fraction of train carved as val")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--workers", type=int, default=0, help="clip decoding processes (0: in-process)")
    parser.add_argument("--block", type=int, default=8, help="clips per write")


def main(argv=None):
    return converter.main(argv, prog="nvgesture", doc=__doc__, arguments=_arguments, convert=convert,
                          name_default="nvgesture", name_help="dataset name (default nvgesture)")


if __name__ == "__main__":
    sys.exit(main())
