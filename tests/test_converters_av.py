"""IGM audio-visual converters (CREMA-D, Kinetics-Sounds) end to end on small files in the raw
formats, and the shared audio/frame helpers of data_prep.audio."""
import csv
import shutil

import numpy as np
import pytest
import scipy.io.wavfile
from PIL import Image

from data_prep import audio, crema_d, kinetics_sounds
from data_prep.image_io import CsvColumnError
from data_prep.shards import validate
from tests.conftest import read_samples, read_shards, write_csv





def _freq(bin_, rate):
    """The frequency that falls exactly on STFT bin ``bin_`` at ``rate`` (n_fft 512)."""
    return bin_ * rate / audio.N_FFT


def _wav(path, freq, seconds, rate=16000, fmt="int16"):
    """A real WAV file holding a sine of ``freq`` Hz (amplitude 0.5) in the given sample format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * rate))) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    if fmt == "int16":
        data = np.round(x * 32767).astype(np.int16)
    elif fmt == "int32":
        data = np.round(x * (2 ** 31 - 1)).astype(np.int32)
    elif fmt == "uint8":
        data = np.round(x * 127 + 128).astype(np.uint8)
    elif fmt == "float32":
        data = x.astype(np.float32)
    elif fmt == "stereo":
        data = np.round(np.stack([x, x], 1) * 32767).astype(np.int16)
    scipy.io.wavfile.write(path, rate, data)


def _colour(clip, j):
    return (20 + 7 * clip % 200, 15 + 20 * j, 90)


def _frames(directory, clip, n, names="frame_{}.jpg"):
    """``n`` real JPEG frames (unpadded names, so natural order matters), frame j coloured by j."""
    directory.mkdir(parents=True, exist_ok=True)
    for j in range(n):
        Image.new("RGB", (12, 9), _colour(clip, j)).save(directory / names.format(j + 1), format="JPEG")


def _peak_bins(spec):
    return np.argmax(spec.mean(axis=-1), axis=-1)


def _assert_colour(frame, colour):
    px = frame.reshape(3, -1).astype(int)
    assert np.abs(px - np.array(colour)[:, None]).max() <= 4, (px[:, 0], colour)


# --------------------------------------------------------------------------------- audio helpers


def test_spectrogram_shapes_and_numpy_reference():
    assert audio.log_spectrogram(np.zeros(22050 * 3, np.float32)).shape == (257, 188)
    assert audio.log_spectrogram(np.zeros(35400 * 10, np.float32)).shape == (257, 1003)
    x = np.random.default_rng(0).uniform(-1, 1, 4000).astype(np.float32)
    got = audio.log_spectrogram(x)
    assert got.dtype == np.float32 and got.shape == (257, 1 + 4000 // 353)
    # librosa.stft conventions written out: reflect-pad n_fft/2, periodic Hann, frames every hop
    padded = np.pad(x.astype(np.float64), 256, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)
    frames = np.stack([padded[t * 353: t * 353 + 512] * window for t in range(got.shape[1])], 1)
    want = np.log(np.abs(np.fft.rfft(frames, axis=0)) + 1e-7)
    np.testing.assert_allclose(got, want, atol=2e-4)


@pytest.mark.parametrize("rate,seconds,bin_", [(22050, 3, 40), (35400, 10, 57)])
def test_sine_peaks_at_its_bin(rate, seconds, bin_):
    t = np.arange(rate * seconds) / rate
    spec = audio.log_spectrogram(np.sin(2 * np.pi * _freq(bin_, rate) * t).astype(np.float32))
    assert (np.argmax(spec, axis=0)[1:-1] == bin_).all()     # edge frames hold reflected halves
    assert _peak_bins(spec) == bin_


@pytest.mark.parametrize("fmt", ["int16", "int32", "uint8", "float32", "stereo"])
def test_read_wav_formats_and_resample(tmp_path, fmt):
    path = tmp_path / f"{fmt}.wav"
    _wav(path, 1000.0, 0.5, rate=16000, fmt=fmt)
    x, rate = audio.read_wav(path)
    assert rate == 16000 and x.dtype == np.float32 and x.ndim == 1 and len(x) == 8000
    want = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(8000) / 16000)
    np.testing.assert_allclose(x, want, atol=0.01 if fmt == "uint8" else 1e-4)
    y = audio.resample(x, 16000, 22050)
    assert len(y) == int(np.ceil(8000 * 441 / 320))                 # exact ratio 22050/16000
    t = np.arange(len(y)) / 22050
    inner = slice(200, -200)                                          # away from the filter edges
    np.testing.assert_allclose(y[inner], 0.5 * np.sin(2 * np.pi * 1000 * t)[inner], atol=0.02)


def test_read_wav_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        audio.read_wav(tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(audio.AudioLoadError, match="bad.wav"):
        audio.read_wav(tmp_path / "bad.wav")


def test_fit_length_and_frame_sampling(tmp_path):
    x = np.arange(4, dtype=np.float32)
    assert audio.fit_length(x, 10).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert audio.fit_length(x, 3).tolist() == [0, 1, 2]
    assert audio.fit_length(np.zeros(0), 3).tolist() == [0, 0, 0]
    assert audio.frame_indices(11, 1) == [5]
    assert audio.frame_indices(6, 3) == [1, 3, 5]
    assert audio.frame_indices(4, 3) == [0, 2, 3]
    assert audio.frame_indices(2, 3) == [0, 1, 1]
    _frames(tmp_path / "clip", 0, 11)
    (tmp_path / "clip" / ".hidden.jpg").write_bytes(b"")
    (tmp_path / "clip" / "notes.txt").write_text("x")
    files = audio.list_frames(tmp_path / "clip")
    assert [p.name for p in files] == [f"frame_{j}.jpg" for j in range(1, 12)]   # natural order
    assert [p.name for p in audio.pick_frames(files, 1)] == ["frame_6.jpg"]
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        audio.list_frames(tmp_path / "missing_dir")


# -------------------------------------------------------------------------------------- CREMA-D

ACTORS = ("1001", "1002", "1003", "1004", "1005")
SENTENCES = ("DFA", "IEO")
FORMATS = ("int16", "float32", "stereo", "uint8", "int32")
RATES = (16000, 16000, 11025, 48000)


def _crema_bin(code):
    return 20 + 12 * crema_d.CLASSES.index(code)


@pytest.fixture(scope="module")
def crema_raw(tmp_path_factory):
    """60 clips (5 actors x 2 sentences x 6 emotions); test = sentence IEO of actors 1001-1002."""
    raw = tmp_path_factory.mktemp("crema_raw")
    train, test, truth = [], [], {}
    k = 0
    for actor in ACTORS:
        for sentence in SENTENCES:
            for code in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD"):
                clip = f"{actor}_{sentence}_{code}_XX"
                rate = RATES[k % len(RATES)]
                _wav(raw / "AudioWAV" / f"{clip}.wav", _freq(_crema_bin(code), 22050),
                     1.2 + 0.1 * (k % 3), rate=rate, fmt=FORMATS[k % len(FORMATS)])
                _frames(raw / "Image-01-FPS" / clip, k, 11)
                (test if sentence == "IEO" and actor in ("1001", "1002") else train).append([clip, code])
                truth[clip] = {"k": k, "code": code, "actor": actor, "rate": rate}
                k += 1
    write_csv(raw / "annotations" / "train.csv", None, train)     # released files: no header
    write_csv(raw / "annotations" / "test.csv", None, test)
    return raw, truth


@pytest.fixture(scope="module")
def crema_out(crema_raw, tmp_path_factory):
    raw, truth = crema_raw
    out = tmp_path_factory.mktemp("crema_out")
    assert crema_d.main(["--raw", str(raw), "--out", str(out), "--image-size", "32"]) == 0
    root = out / "crema_d"
    meta, data = read_shards(root)
    return root, meta, data


def test_crema_d_released_split(crema_raw, crema_out):
    raw, truth = crema_raw
    root, meta, data = crema_out
    assert meta["name"] == "crema_d" and meta["num_classes"] == 6
    assert meta["class_names"] == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert meta["modalities"]["audio"] == {"kind": "spectrogram", "shape": [257, 188], "dtype": "float32"}
    assert meta["modalities"]["video"] == {"kind": "frames", "shape": [1, 3, 32, 32], "dtype": "uint8"}
    n = {s: len(d["label"]) for s, d in data.items()}
    assert n == {"train": 42, "val": 6, "test": 12}      # 48 train rows: 1 per class carved to val
    src = meta["source"]
    assert src["split"]["seed"] == 0 and src["split"]["val_frac"] == 0.1 and src["split"]["mode"] == "released"
    assert src["csv"]["headers"] == {"train": None, "test": None}
    assert src["counts"]["dropped"] == {"missing_wav": 0, "missing_frame_dir": 0, "no_frames": 0}
    assert src["counts"]["audio"]["tiled_clips"] == 60
    assert src["counts"]["audio"]["source_rates"] == {"11025": 15, "16000": 30, "48000": 15}
    index = read_samples(root)
    ids = np.concatenate([d["sample_id"] for d in data.values()])
    assert len(ids) == len(set(ids.tolist())) == 60
    with open(raw / "annotations" / "train.csv") as f:
        train_clips = {r[0] for r in csv.reader(f)}
    val_clips = {index[int(i)]["clip"] for i in data["val"]["sample_id"]}
    tr_clips = {index[int(i)]["clip"] for i in data["train"]["sample_id"]}
    test_clips = {index[int(i)]["clip"] for i in data["test"]["sample_id"]}
    assert val_clips <= train_clips and tr_clips <= train_clips and not val_clips & tr_clips
    assert not test_clips & train_clips
    assert sorted(data["val"]["label"].tolist()) == list(range(6))                # stratified
    for split, d in data.items():
        assert d["audio"].dtype == np.float32 and d["video"].dtype == np.uint8
        for sid, lab, spec, video in zip(d["sample_id"], d["label"], d["audio"], d["video"]):
            clip = index[int(sid)]["clip"]
            t = truth[clip]
            assert meta["class_names"][lab] == t["code"] == index[int(sid)]["emotion"]
            assert index[int(sid)]["actor"] == t["actor"] and index[int(sid)]["split"] == split
            assert _peak_bins(spec) == _crema_bin(t["code"]), clip
            _assert_colour(video[0], _colour(t["k"], 5))      # the middle of 11 naturally sorted
    # stored spectrogram = the documented recipe applied to the wav
    sid = int(data["test"]["sample_id"][0])
    want, info = audio.wav_spectrogram(raw / "AudioWAV" / f"{index[sid]['clip']}.wav", 22050, 3.0)
    np.testing.assert_array_equal(data["test"]["audio"][0], want)


def test_crema_d_actor_split_and_workers(crema_raw, crema_out, tmp_path):
    raw, truth = crema_raw
    root0, _, data0 = crema_out
    root = crema_d.convert(raw, tmp_path, split="actor", image_size=32, frames=3, workers=1, block=7)
    assert root.name == "crema_d_actor"
    meta, data = read_shards(root)
    assert meta["modalities"]["video"]["shape"] == [3, 3, 32, 32]
    index = read_samples(root)
    actors = {s: {index[int(i)]["actor"] for i in d["sample_id"]} for s, d in data.items()}
    assert not actors["train"] & actors["val"] and not actors["train"] & actors["test"]
    assert not actors["val"] & actors["test"]
    assert {s: len(a) for s, a in actors.items()} == {"train": 3, "val": 1, "test": 1}
    assert meta["source"]["split"]["actors"] == {s: sorted(a) for s, a in actors.items()}
    assert sum(len(d["label"]) for d in data.values()) == 60
    # the same clip has the same sample_id under both split modes
    index0 = read_samples(root0)
    assert {i: r["clip"] for i, r in index.items()} == {i: r["clip"] for i, r in index0.items()}
    for d in data.values():
        for sid, video in zip(d["sample_id"], d["video"]):
            k = truth[index[int(sid)]["clip"]]["k"]
            for f, j in zip(video, (1, 5, 9)):           # 3 evenly spaced of 11
                _assert_colour(f, _colour(k, j))
    # the same clips in-process give the same arrays as through the worker pool
    again = crema_d.convert(raw, tmp_path, name="again", split="actor", image_size=32, frames=3)
    _, data2 = read_shards(again)
    for s in data:
        for key in data[s]:
            assert np.array_equal(data[s][key], data2[s][key]), (s, key)


def _copy_crema(raw, dst):
    shutil.copytree(raw, dst)
    return dst


def test_crema_d_header_accepted_and_bad_annotations(crema_raw, tmp_path):
    raw, truth = crema_raw
    bad = _copy_crema(raw, tmp_path / "raw")
    ann = bad / "annotations"
    with open(ann / "train.csv") as f:
        rows = list(csv.reader(f))
    write_csv(ann / "train.csv", ["clip", "emotion"], rows)
    root = crema_d.convert(bad, tmp_path / "o1", image_size=8, val_frac=0.25)
    meta = validate(root)
    assert meta["source"]["csv"]["headers"]["train"] == ["clip", "emotion"]
    assert sum(meta["splits"][s]["num_samples"] for s in ("train", "val")) == 48
    assert meta["splits"]["val"]["num_samples"] == 12
    # the code in column 2 disagrees with the file name
    rows2 = [r[:] for r in rows]
    rows2[3][1] = "SAD" if rows2[3][1] != "SAD" else "HAP"
    write_csv(ann / "train.csv", None, rows2)
    with pytest.raises(ValueError, match=rf"train\.csv, line 4: clip '{rows2[3][0]}'.*does not match"):
        crema_d.convert(bad, tmp_path / "o2", image_size=8)
    # a code that is none of the six; a missing code column
    rows2[3][1] = "XYZ"
    write_csv(ann / "train.csv", None, rows2)
    with pytest.raises(ValueError, match=r"train\.csv, line 4: column 2 \(emotion code\) = 'XYZ'"):
        crema_d.convert(bad, tmp_path / "o2", image_size=8)
    write_csv(ann / "train.csv", None, [r[:1] for r in rows])
    with pytest.raises(ValueError, match=r"train\.csv, line 1: column 2 \(emotion code\) is missing"):
        crema_d.convert(bad, tmp_path / "o2", image_size=8)
    write_csv(ann / "train.csv", None, rows + [rows[0]])
    with pytest.raises(ValueError, match=f"clip '{rows[0][0]}' already listed"):
        crema_d.convert(bad, tmp_path / "o2", image_size=8)
    assert not (tmp_path / "o2").exists()


def test_crema_d_missing_files_and_atomic_output(crema_raw, tmp_path):
    raw, truth = crema_raw
    bad = _copy_crema(raw, tmp_path / "raw")
    with open(bad / "annotations" / "train.csv") as f:
        clip_a, clip_b = [r[0] for r in csv.reader(f)][:2]
    (bad / "AudioWAV" / f"{clip_a}.wav").unlink()
    shutil.rmtree(bad / "Image-01-FPS" / clip_b)
    with pytest.raises(FileNotFoundError, match="--skip-missing") as e:
        crema_d.convert(bad, tmp_path / "o1", image_size=8)
    assert str(bad / "AudioWAV" / f"{clip_a}.wav") in str(e.value)
    assert str(bad / "Image-01-FPS" / clip_b) in str(e.value)
    assert not (tmp_path / "o1").exists()
    assert crema_d.main(["--raw", str(bad), "--out", str(tmp_path / "o1"), "--image-size", "8",
                         "--skip-missing"]) == 0
    meta, data = read_shards(tmp_path / "o1" / "crema_d")
    assert meta["source"]["counts"]["dropped"] == {"missing_wav": 1, "missing_frame_dir": 1, "no_frames": 0}
    assert sum(len(d["label"]) for d in data.values()) == 58
    kept = {r["clip"] for r in read_samples(tmp_path / "o1" / "crema_d").values()}
    assert clip_a not in kept and clip_b not in kept
    # an existing dataset is kept unless --overwrite
    with pytest.raises(FileExistsError, match="overwrite"):
        crema_d.convert(bad, tmp_path / "o1", image_size=8, skip_missing=True)
    # a corrupt wav found while writing: error naming it, nothing half-written left behind
    (bad / "AudioWAV" / f"{clip_b}.wav").write_bytes(b"RIFF....garbage")
    shutil.copytree(raw / "Image-01-FPS" / clip_b, bad / "Image-01-FPS" / clip_b)
    with pytest.raises(audio.AudioLoadError, match=f"{clip_b}.wav"):
        crema_d.convert(bad, tmp_path / "o2", image_size=8, skip_missing=True, block=4)
    assert not (tmp_path / "o2" / "crema_d").exists()
    with pytest.raises(audio.AudioLoadError, match=f"{clip_b}.wav"):
        crema_d.convert(bad, tmp_path / "o1", image_size=8, skip_missing=True, overwrite=True)
    out = tmp_path / "o1" / "crema_d"
    assert not (out / "meta.json").exists() and not list(out.glob("*.h5")) and not list(out.glob(".tmp*"))


# ------------------------------------------------------------------------------ Kinetics-Sounds

KS_CLASSES = ("playing drums", "chopping wood", "tapping pen")   # sorted: chopping, playing, tapping


def _ks_bin(label):
    return 30 + 20 * sorted(KS_CLASSES).index(label)


@pytest.fixture(scope="module")
def ks_raw(tmp_path_factory):
    """train.csv in the Kinetics layout (youtube_id, time_start, time_end; directories named
    <id>_<start:06d>_<end:06d>), test.csv with a `clip` column. 5 train + 2 test clips per class,
    plus clips the skip rules drop."""
    raw = tmp_path_factory.mktemp("ks_raw")
    truth, k = {}, 0
    train_rows, test_rows = [], []

    def add(split, label, n_frames=6, wav=True, frames=True, seconds=1.0, value=None, dirname=None):
        nonlocal k
        yid = f"y_{k:02d}-Ab"                                   # ids contain '_' and '-'
        dirname = dirname or f"{yid}_{k:06d}_{k + 10:06d}"
        if wav:
            _wav(raw / f"{split}_wav" / f"{dirname}.wav", _freq(_ks_bin(label), 35400), seconds,
                 fmt=("int16", "float32", "stereo")[k % 3])
        if frames:
            _frames(raw / f"{split}_img" / "Image-01-FPS" / dirname, k, n_frames)
        if split == "train":
            train_rows.append([label, yid, k, k + 10, "train"])
        else:
            test_rows.append([value if value is not None else dirname, label])
        truth[dirname] = {"k": k, "label": label, "kept": wav and frames and n_frames > 3}
        k += 1

    for label in KS_CLASSES:
        for _ in range(5):
            add("train", label)
        add("test", label)
        add("test", label, seconds=11.0, value=f"y_{k:02d}-Ab")   # bare youtube id -> rule 3
    add("train", "tapping pen", n_frames=3)                        # <= 3 frames: skipped
    add("train", "chopping wood", wav=False)                       # no audio: skipped
    add("train", "playing drums", frames=False)                    # no frames: skipped
    add("test", "chopping wood", n_frames=2)                       # skipped
    write_csv(raw / "annotations" / "train.csv", ["label", "youtube_id", "time_start", "time_end", "split"],
               train_rows)
    write_csv(raw / "annotations" / "test.csv", ["clip", "label"], test_rows)
    return raw, truth


@pytest.fixture(scope="module")
def ks_out(ks_raw, tmp_path_factory):
    raw, truth = ks_raw
    out = tmp_path_factory.mktemp("ks_out")
    assert kinetics_sounds.main(["--raw", str(raw), "--out", str(out), "--image-size", "32",
                                 "--val-frac", "0.2"]) == 0
    root = out / "kinetics_sounds"
    return (root, *read_shards(root))


def test_kinetics_sounds(ks_raw, ks_out):
    raw, truth = ks_raw
    root, meta, data = ks_out
    assert meta["class_names"] == sorted(KS_CLASSES) and meta["num_classes"] == 3
    assert meta["modalities"]["audio"] == {"kind": "spectrogram", "shape": [257, 1003], "dtype": "float32"}
    assert meta["modalities"]["video"] == {"kind": "frames", "shape": [3, 3, 32, 32], "dtype": "uint8"}
    n = {s: len(d["label"]) for s, d in data.items()}
    assert n == {"train": 12, "val": 3, "test": 6}
    src = meta["source"]
    assert src["counts"]["skipped"] == {
        "train": {"missing_audio": 1, "missing_frames": 1, "too_few_frames": 1},
        "test": {"missing_audio": 0, "missing_frames": 0, "too_few_frames": 1}}
    assert src["clip_column"] == {"train": "youtube_id", "test": "clip"}
    assert src["split"]["val_frac"] == 0.2 and src["split"]["seed"] == 0
    assert src["counts"]["audio"]["tiled_clips"] == 18      # the three 11 s test clips are cut
    index = read_samples(root)
    ids = np.concatenate([d["sample_id"] for d in data.values()])
    assert len(set(ids.tolist())) == len(ids) == 21
    kept = {c for c, t in truth.items() if t["kept"]}
    assert {r["clip"] for r in index.values()} == kept
    train_dirs = {p.name for p in (raw / "train_img" / "Image-01-FPS").iterdir()}
    by_split = {s: {index[int(i)]["clip"] for i in d["sample_id"]} for s, d in data.items()}
    assert by_split["val"] <= train_dirs and by_split["train"] <= train_dirs
    assert not by_split["val"] & by_split["train"] and not by_split["test"] & train_dirs
    assert sorted(data["val"]["label"].tolist()) == [0, 1, 2]
    for split, d in data.items():
        for sid, lab, spec, video in zip(d["sample_id"], d["label"], d["audio"], d["video"]):
            t = truth[index[int(sid)]["clip"]]
            assert meta["class_names"][lab] == t["label"]
            assert _peak_bins(spec) == _ks_bin(t["label"])
            for f, j in zip(video, (1, 3, 5)):                  # 3 evenly spaced of 6
                _assert_colour(f, _colour(t["k"], j))


def test_kinetics_sounds_bad_inputs(ks_raw, tmp_path):
    raw, truth = ks_raw
    bad = tmp_path / "raw"
    shutil.copytree(raw, bad)
    test_csv = bad / "annotations" / "test.csv"
    with open(test_csv) as f:
        rows = list(csv.reader(f))
    write_csv(test_csv, ["clip", "class"], rows[1:])
    with pytest.raises(CsvColumnError, match=r"test\.csv: missing column 'label'"):
        kinetics_sounds.convert(bad, tmp_path / "o", image_size=8)
    write_csv(test_csv, ["name", "label"], rows[1:])
    with pytest.raises(CsvColumnError, match=r"test\.csv: no clip column: expected one of clip, youtube_id, id"):
        kinetics_sounds.convert(bad, tmp_path / "o", image_size=8)
    train_csv = bad / "annotations" / "train.csv"
    with open(train_csv) as f:
        train_rows = list(csv.reader(f))
    write_csv(train_csv, [h.replace("youtube_id", "name") for h in train_rows[0]], train_rows[1:])
    root = kinetics_sounds.convert(bad, tmp_path / "o", clip_col="name", image_size=8)   # --clip-column
    write_csv(train_csv, train_rows[0], train_rows[1:])
    assert validate(root)["splits"]["test"]["num_samples"] == 6
    write_csv(test_csv, rows[0], rows[1:] + [[rows[1][0], "tapping pen" if rows[1][1] != "tapping pen" else "x"]])
    with pytest.raises(ValueError, match=r"test\.csv, line 9: clip .* has label"):
        kinetics_sounds.convert(bad, tmp_path / "o2", image_size=8)
    # a corrupt frame found while writing: error naming it, no half-written dataset
    write_csv(test_csv, rows[0], rows[1:])
    frame = bad / "test_img" / "Image-01-FPS" / rows[1][0] / "frame_4.jpg"
    frame.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match="frame_4.jpg"):
        kinetics_sounds.convert(bad, tmp_path / "o2", image_size=8, workers=1)
    assert not (tmp_path / "o2" / "kinetics_sounds").exists()
