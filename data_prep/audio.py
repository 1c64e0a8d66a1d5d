"""Helpers shared by the audio-visual converters (data_prep.crema_d, data_prep.kinetics_sounds).

Audio (the log-spectrogram recipe of docs/data.md, as the released IGM/OGM-GE loaders compute it):
- :func:`read_wav`: scipy.io.wavfile; int16 / int32 (also 24-bit, which scipy left-justifies into
  int32) / int64 / uint8 / float -> float32 in [-1, 1] scale (int: divided by 2^(bits-1); uint8:
  (x - 128) / 128; float: as stored); several channels -> their mean (librosa's mono=True).
- :func:`resample`: ``scipy.signal.resample_poly`` with the exact rational ratio target/rate
  (reduced by their gcd), computed in float64. librosa.load (the released loaders) resamples with
  soxr; the two differ by a small amount near the band edge, not in content.
- :func:`fit_length`: tile the waveform (np.tile) then cut to exactly n samples; an empty
  waveform becomes one zero sample first (as the released Kinetics-Sounds loader does). The
  released CREMA-D loader tiles exactly 3 times (``np.tile(x, 3)[:3 * sr]``), which leaves clips
  under 1 s shorter than 3 s; here a clip is repeated as often as needed, which is the same for
  every clip of 1 s or more. The released Kinetics-Sounds loader doubles until >= 10 s: the same.
- clip to [-1, 1], then :func:`log_spectrogram`: ``torch.stft`` with n_fft 512, hop 353, win 512,
  periodic Hann window, center=True with reflect padding (librosa.stft's conventions before
  librosa 0.10, which switched the default padding to zeros; only the first and last frame
  differ), one-sided, unnormalised -> ``log(|S| + 1e-7)`` float32 of shape
  (257, 1 + n // 353): 257x188 for 3 s at 22,050 Hz, 257x1003 for 10 s at 35,400 Hz.

Frames:
- :func:`list_frames`: the image files (.jpg/.jpeg, any case; hidden files ignored) of a clip's
  frame directory in natural order (digit runs compare as numbers, so frame_10 follows frame_9).
- :func:`frame_indices`: k frames evenly spaced over the n sorted files: the centres of k equal
  segments, index floor((2i + 1) n / (2k)) (k=1: the middle frame; repeats when k > n). The
  released loaders take the first k names in os.listdir order (arbitrary, and the same frames
  every epoch, while their own random/strided sampling is computed and then ignored); the
  converters here sample properly.
- frames are decoded by :func:`data_prep.image_io.load_image` (PIL, RGB, stretched to S x S with
  bilinear antialiased resampling, or --crop center) and stored as kind "frames" [k, 3, S, S] uint8.

- :class:`ClipLoader`: turns clips (wav path + frame paths) into (spectrogram, frames) arrays in
  blocks, optionally on a multiprocessing pool that works on the next block while the caller
  writes the current one (each worker runs torch with one thread, like DataLoader workers).
- :func:`add_av_args`, :func:`check_common`, :func:`missing_message`, :func:`av_batches`: what both
  converters share.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import pathlib
import warnings

import numpy as np
import scipy.io.wavfile
import scipy.signal
import torch

from data_prep.dvm import natural_key
from data_prep.image_io import CROPS, ImageLoadError, decoded_blocks, load_image, resize_rule

N_FFT = 512
HOP = 353
EPS = 1e-7
FREQ_BINS = N_FFT // 2 + 1          # 257
FRAME_SUFFIXES = (".jpg", ".jpeg")
_WINDOW = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32)


class AudioLoadError(ValueError):
    """A WAV file exists but cannot be read."""


# --------------------------------------------------------------------------------------- audio


def read_wav(path):
    """``path`` -> (float32 mono waveform, sample rate). Raises FileNotFoundError or AudioLoadError
    naming the path."""
    path = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.io.wavfile.WavFileWarning)   # unknown chunks
            rate, data = scipy.io.wavfile.read(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: WAV file not found") from None
    except (ValueError, OSError, EOFError, IndexError) as e:
        raise AudioLoadError(f"{path}: cannot read WAV ({type(e).__name__}: {e})") from e
    data = np.asarray(data)
    if data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    elif data.dtype.kind == "i":
        x = data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    elif data.dtype.kind == "f":
        x = data.astype(np.float32)
    else:
        raise AudioLoadError(f"{path}: unsupported WAV sample type {data.dtype}")
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    elif x.ndim != 1:
        raise AudioLoadError(f"{path}: unexpected WAV data shape {data.shape}")
    if rate <= 0:
        raise AudioLoadError(f"{path}: invalid sample rate {rate}")
    return np.ascontiguousarray(x), int(rate)


def resample(x, rate, target):
    """Resample ``x`` from ``rate`` to ``target`` Hz (polyphase, exact ratio); float32 out."""
    rate, target = int(rate), int(target)
    if rate == target or len(x) == 0:
        return np.asarray(x, dtype=np.float32)
    g = math.gcd(rate, target)
    y = scipy.signal.resample_poly(np.asarray(x, dtype=np.float64), target // g, rate // g)
    return y.astype(np.float32)


def fit_length(x, n):
    """Tile ``x`` (np.tile) as often as needed, then cut to exactly ``n`` samples."""
    x = np.asarray(x, dtype=np.float32)
    if len(x) == 0:
        x = np.zeros(1, dtype=np.float32)
    reps = -(-n // len(x))
    return np.tile(x, reps)[:n] if reps > 1 else x[:n]


def num_frames(num_samples):
    """STFT frames of a centred STFT with hop 353: 1 + n // 353."""
    return 1 + num_samples // HOP


def log_spectrogram(x):
    """``log(|STFT(x)| + 1e-7)`` (n_fft 512, hop 353, periodic Hann, centred, reflect padding)
    -> float32 (257, 1 + len(x) // 353)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    spec = torch.stft(t, n_fft=N_FFT, hop_length=HOP, win_length=N_FFT, window=_WINDOW,
                      center=True, pad_mode="reflect", normalized=False, onesided=True,
                      return_complex=True)
    return torch.log(spec.abs() + EPS).numpy().astype(np.float32, copy=False)


def wav_spectrogram(path, rate, seconds):
    """The whole recipe for one file -> (spectrogram (257, T) float32, info dict)."""
    x, source_rate = read_wav(path)
    info = {"rate": source_rate, "seconds": len(x) / source_rate, "empty": len(x) == 0}
    x = resample(x, source_rate, rate)
    n = int(round(rate * seconds))
    info["tiled"] = len(x) < n
    x = np.clip(fit_length(x, n), -1.0, 1.0)
    return log_spectrogram(x), info


# -------------------------------------------------------------------------------------- frames


def list_frames(directory):
    """The frame image files of ``directory`` in natural order ([] if it holds none).
    Raises FileNotFoundError naming the directory when it does not exist."""
    directory = pathlib.Path(directory)
    try:
        names = [e.name for e in os.scandir(directory)
                 if not e.name.startswith(".") and e.name.lower().endswith(FRAME_SUFFIXES) and e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{directory}: frame directory not found") from None
    return [directory / n for n in sorted(names, key=natural_key)]


def frame_indices(n, k):
    """k indices evenly spaced over n items: the centres of k equal segments."""
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 frames and k >= 1 (got n={n}, k={k})")
    return [((2 * i + 1) * n) // (2 * k) for i in range(k)]


def pick_frames(frame_paths, k):
    """The k evenly spaced files of a clip's sorted ``frame_paths`` (see :func:`frame_indices`)."""
    return [frame_paths[i] for i in frame_indices(len(frame_paths), k)]


# --------------------------------------------------------------------------------- clip loading


def process_clip(wav_path, frame_paths, rate, seconds, size, crop="none"):
    """-> (spectrogram (257, T) float32, frames (k, 3, S, S) uint8, audio info dict)."""
    spec, info = wav_spectrogram(wav_path, rate, seconds)
    frames = np.stack([load_image(p, size, crop) for p in frame_paths])
    return spec, frames, info


def _init_worker():
    torch.set_num_threads(1)   # as DataLoader workers do; also keeps forked OpenMP pools unused


def _process_safe(args):
    """Pool worker: never raises (exceptions do not always pickle); returns (ok, result|error)."""
    try:
        return True, process_clip(*args)
    except FileNotFoundError as e:
        return False, ("missing", str(e))
    except ImageLoadError as e:
        return False, ("image", str(e))
    except AudioLoadError as e:
        return False, ("audio", str(e))
    except Exception as e:   # noqa: BLE001 - re-raised in the parent with the clip's files
        return False, ("other", f"{args[0]}: {type(e).__name__}: {e}")


_ERRORS = {"missing": FileNotFoundError, "image": ImageLoadError, "audio": AudioLoadError,
           "other": RuntimeError}


class ClipLoader:
    """``for start, specs, frames, infos in loader.blocks(clips): ...`` where ``clips`` is a list
    of (wav path, [frame paths]) and the arrays hold clips[start:start + n]: specs (n, 257, T)
    float32, frames (n, k, 3, S, S) uint8, infos a list of audio info dicts.

    ``workers`` = 0 works in this process (torch limited to one thread inside the ``with`` block,
    restored on exit); > 0 uses a multiprocessing pool that processes the next block while the
    caller consumes the current one (at most two blocks in memory)."""

    def __init__(self, rate, seconds, size, crop="none", workers=0, block=64):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if size < 1 or block < 1 or workers < 0:
            raise ValueError(f"need size >= 1, block >= 1, workers >= 0 (got {size}, {block}, {workers})")
        self.rate, self.seconds = int(rate), float(seconds)
        self.size, self.crop, self.workers, self.block = int(size), crop, int(workers), int(block)
        self._pool = None
        self._threads = None

    def __enter__(self):
        if self.workers > 0:
            self._pool = multiprocessing.get_context().Pool(self.workers, initializer=_init_worker)
        else:   # one STFT is ~1 ms: intra-op threads only add contention (30x slower on 2 busy cores)
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._threads is not None:
            torch.set_num_threads(self._threads)
            self._threads = None
        return False

    def _args(self, clips):
        return [(str(w), [str(p) for p in f], self.rate, self.seconds, self.size, self.crop)
                for w, f in clips]

    @staticmethod
    def _stack(results):
        specs, frames, infos = zip(*results)
        return np.stack(specs), np.stack(frames), list(infos)

    def blocks(self, clips):
        clips = list(clips)
        starts = list(range(0, len(clips), self.block))
        if self._pool is None:
            for s in starts:
                yield (s, *self._stack([process_clip(*a) for a in self._args(clips[s:s + self.block])]))
            return
        chunk = max(1, self.block // (4 * self.workers))

        def submit(s):
            return self._pool.map_async(_process_safe, self._args(clips[s:s + self.block]), chunksize=chunk)

        pending = submit(starts[0]) if starts else None
        for i, s in enumerate(starts):
            results = pending.get()
            pending = submit(starts[i + 1]) if i + 1 < len(starts) else None
            out = []
            for ok, value in results:
                if not ok:
                    kind, message = value
                    raise _ERRORS[kind](message)
                out.append(value)
            yield (s, *self._stack(out))


class AudioStats:
    """Counts over the written clips' audio, for meta.json source.counts.audio."""

    def __init__(self):
        self.rates, self.tiled, self.empty, self.longest, self.shortest = {}, 0, 0, 0.0, math.inf

    def add(self, info):
        key = str(info["rate"])
        self.rates[key] = self.rates.get(key, 0) + 1
        self.tiled += bool(info["tiled"])
        self.empty += bool(info["empty"])
        self.longest = max(self.longest, info["seconds"])
        self.shortest = min(self.shortest, info["seconds"])

    def as_dict(self):
        return {"source_rates": dict(sorted(self.rates.items(), key=lambda kv: int(kv[0]))),
                "tiled_clips": self.tiled, "empty_wavs": self.empty,
                "shortest_seconds": None if self.shortest == math.inf else round(self.shortest, 4),
                "longest_seconds": round(self.longest, 4)}


def av_batches(order, clips, labels, sample_ids, counts, rate, seconds, size, crop, workers, block, log):
    """The batches of every split (``order``: split -> clip indices, in writing order; ``clips[i]``
    = (wav path, [chosen frame paths])): spectrograms and frames computed block by block by a
    :class:`ClipLoader`. Once every clip is written, ``counts["audio"]`` = their :class:`AudioStats`."""
    stats = AudioStats()
    with ClipLoader(rate, seconds, size, crop, workers, block) as loader:
        for split, rows, specs, frames, infos in decoded_blocks(order, loader, clips, log, what="clips"):
            yield split, {"audio": specs, "video": frames, "label": labels[rows], "sample_id": sample_ids[rows]}
            for info in infos:
                stats.add(info)
    counts["audio"] = stats.as_dict()


# ------------------------------------------------------------------------------------- shared


def missing_message(what, paths, flag=None):
    """An error text listing up to 5 of ``paths`` (and how many there are)."""
    shown = ", ".join(str(p) for p in paths[:5])
    more = f" (and {len(paths) - 5} more)" if len(paths) > 5 else ""
    hint = f"; pass {flag} to drop those clips instead" if flag else ""
    return f"{what}: {len(paths)} not found: {shown}{more}{hint}"


def add_av_args(parser, frames, image_size=224, seed=0):
    """The command-line options both audio-visual converters share (one definition for both)."""
    parser.add_argument("--frames", type=int, default=frames, help="frames per clip (evenly spaced)")
    parser.add_argument("--image-size", type=int, default=image_size, help="square frame size S")
    parser.add_argument("--crop", choices=CROPS, default="none",
                        help="none: stretch the frame to S x S; center: centred square first")
    parser.add_argument("--val-frac", type=float, default=0.1,
                        help="fraction of train carved out as the validation split")
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--workers", type=int, default=0, help="clip processing processes (0: in-process)")
    parser.add_argument("--block", type=int, default=64, help="clips processed per block")


def check_common(frames, image_size, val_frac, block, workers):
    """Reject bad shared options before any work, naming the flag."""
    if frames < 1:
        raise ValueError(f"--frames must be >= 1, got {frames}")
    if image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {image_size}")
    if not 0 <= val_frac < 1:
        raise ValueError(f"--val-frac must be in [0, 1), got {val_frac}")
    if block < 1 or workers < 0:
        raise ValueError(f"--block must be >= 1 and --workers >= 0 (got {block}, {workers})")


def modalities_spec(freq_frames, frames, image_size):
    return {"audio": {"kind": "spectrogram", "shape": [FREQ_BINS, freq_frames], "dtype": "float32"},
            "video": {"kind": "frames", "shape": [frames, 3, image_size, image_size], "dtype": "uint8"}}


def recipe(rate, seconds, frames, image_size, crop):
    """meta.json source entries describing the audio and video processing."""
    n = int(round(rate * seconds))
    return {
        "audio": {"sample_rate": rate, "seconds": seconds, "samples": n,
                  "read": "scipy.io.wavfile; ints / 2^(bits-1), uint8 (x-128)/128; channels averaged",
                  "resample": "scipy.signal.resample_poly, exact ratio target/rate reduced by gcd",
                  "length": "np.tile as often as needed, then cut to the first `samples` samples "
                            "(empty -> one zero sample)",
                  "clip": [-1.0, 1.0],
                  "stft": {"impl": "torch.stft", "n_fft": N_FFT, "hop_length": HOP, "win_length": N_FFT,
                           "window": "hann periodic", "center": True, "pad_mode": "reflect"},
                  "transform": f"log(|S| + {EPS})", "shape": [FREQ_BINS, num_frames(n)]},
        "video": {"frames": frames, "size": image_size,
                  "sampling": "k frames evenly spaced over the naturally sorted *.jpg files: index "
                              "floor((2i+1)n/(2k)) (segment centres); the released loaders take the "
                              "first k files in os.listdir order instead",
                  "resize": resize_rule(crop),
                  "normalize": "imagenet"},
    }
