"""What a user meets first (train/config.py, models.encoders.resolve_encoder_configs): --help, the
suggestion for a mistyped key, keys the config makes meaningless, a command-line mapping replacing
a whole entry, and a script pointed at another dataset than its default config's."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_prep import embedded
from models.encoders import AUTO_WIDTH, ModelConfigError, encoder_out_dim, resolve_encoder_configs
from models.fusion import CGGMModel, IGMModel, LateFusionModel, SharedHeadModel
from train import SCRIPTS, config, loop   # SCRIPTS: every training script

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = dict(data="d", lr=1e-3, min_lr=0.0, epochs=3, variant="official", resume=False, modalities=[],
                encoders={}, fusion={}, nested=dict(a=1, b="x"), maybe=None)
REASON = "by variant=official (its length is the sum of stage_epochs); drop it or set --variant paper"


def official_ignores_epochs(cfg):
    return {"epochs": REASON} if cfg["variant"] == "official" else {}


def run(script, *args, cwd=REPO, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return subprocess.run([sys.executable, str(REPO / "train" / f"{script}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- 1. --help

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_key_with_its_default_and_help(script, monkeypatch, capsys):
    module = importlib.import_module(f"train.{script}")
    path = REPO / "train" / f"{script}.py"
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(path), raising=False)
    monkeypatch.setattr(sys.modules["__main__"], "__doc__", module.__doc__, raising=False)
    with pytest.raises(SystemExit) as exit_:
        config.load_config(module.CONFIG, ["--lr", "oops", "--help"], default_config=module.DEFAULT_CONFIG)
    assert exit_.value.code == 0   # --help wins over anything else on the line
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == module.__doc__.strip().splitlines()[0]
    assert f"accelerate launch train/{script}.py" in out   # the usage lines of the docstring
    key_lines = {line.split()[0][2:]: line for line in lines if line.startswith("  --")}
    assert set(key_lines) == set(module.CONFIG)
    for key, declared in module.CONFIG.items():
        assert key_lines[key].split(None, 1)[1].startswith(config.show(declared.default)), key
        assert declared.help and declared.help in key_lines[key], key   # every key says what it does
    assert "seed of the embedded generator" in key_lines["data_seed"]
    # grouped by the file that declared them: the script's own keys first, the loop's last
    groups = [line for line in lines if line.endswith(":") and line.startswith("train/")]
    assert groups[0] == f"train/{script}.py:" and groups[-1] == "train/loop_config.py:"
    assert lines.index(groups[-1]) > max(lines.index(key_lines[k]) for k in ("out_dir", "data"))


@pytest.mark.parametrize("argv", [["--config", "{f}", "stray", "-h"], ["-h", "--config={f}"],
                                  ["--lr", "oops", "--config", "{f}", "--help"], ["--config", "other.yaml", "--config", "{f}", "-h"]])
def test_help_reads_the_config_the_line_names(argv, tmp_path, capsys):
    """--help marks what the --config file sets, found by the same token walk as loading (the last
    --config wins), on a line loading would refuse (a stray value, -h)."""
    from train import joint
    f = tmp_path / "mine.yaml"
    f.write_text("lr: 0.5\n")
    with pytest.raises(SystemExit) as exit_:
        config.exit_on_help(joint.CONFIG, "train/configs/joint_imgtab.yaml", [a.format(f=f) for a in argv])
    assert exit_.value.code == 0
    lr_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  --lr "))
    assert lr_line.endswith(f"[{f}: 0.5]")


def test_a_redeclared_key_keeps_what_it_does_not_change():
    from train import gaal
    from train.loop_config import LOOP_CONFIG
    assert gaal.CONFIG["lr"].above == 0 and gaal.CONFIG["lr"].help == LOOP_CONFIG["lr"].help   # default only
    assert gaal.CONFIG["lr"].where == "train/gaal.py" and LOOP_CONFIG["seed"].where == "train/loop_config.py"
    assert gaal.CONFIG["scheduler"].help == "StepLR(10, 0.1) per epoch" and gaal.CONFIG["scheduler"].default == "step"
    assert list(gaal.CONFIG)[:len(LOOP_CONFIG)] == list(LOOP_CONFIG)   # the loop's order, then the script's keys


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "unimodal"])   # unimodal reads joint's declaration
def test_help_is_answered_before_torch_is_imported(script):
    code = (f"import runpy, sys\nsys.argv = ['train/{script}.py', '--help']\ntry:\n"
            f"    runpy.run_path('train/{script}.py', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO TORCH") and "--lr" in proc.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.slow
def test_help_from_the_command_line_exits_0_before_anything_happens(flag, tmp_path):
    proc = run("gaal", "--out_dir", "x", flag, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("GAAL: ") and "--channels_last" in proc.stdout and "--progress" in proc.stdout
    assert "[train/configs/gaal_imgtab.yaml: 15]" in proc.stdout   # what the default config sets
    assert proc.stderr == "" and list(tmp_path.iterdir()) == []      # nothing created, no data generated


# ------------------------------------------------------------------------------------- 2. did you mean

@pytest.mark.parametrize("argv, message", [
    (["--lr_rate", "1"], "command line: unknown config key 'lr_rate' (did you mean lr?)"),
    (["--epoch", "1"], "unknown config key 'epoch' (did you mean epochs?)"),
    (["--encoder.image.arch", "resnet18"], "unknown config key 'encoder' (did you mean encoders?)"),
    (["--nested.bb", "1"], "unknown config key 'nested.bb' (did you mean b?)"),
    (["--zzz", "1"], "unknown config key 'zzz'"),   # nothing close: no suggestion
])
def test_unknown_key_suggests_the_closest(argv, message):
    with pytest.raises(config.ConfigError) as err:
        config.load_config(DEFAULTS, argv)
    assert str(err.value).endswith(message) and str(err.value).startswith("command line: unknown config key")
    assert "\n" not in str(err.value)


def test_unknown_key_in_a_file_names_the_file_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 0.1\nmodality: [a]\n")
    with pytest.raises(config.ConfigError, match=r"c\.yaml: unknown config key 'modality' \(did you mean modalities\?\)"):
        config.load_config(dict(DEFAULTS, learning_rate=0.1), ["--config", str(f)])


def test_unknown_encoder_key_suggests_the_closest():
    spec = {"kind": "image", "shape": [3, 32, 32], "dtype": "uint8"}
    with pytest.raises(ModelConfigError, match=r"'cam'.*\['base_widht'\] \(did you mean base_width\?\)"):
        from models.encoders import build_encoder
        build_encoder("cam", spec, {"base_widht": 8})


# ------------------------------------------------------------------------------ 3. ignored(cfg) -> {key: why}

def test_ignored_key_on_the_command_line_is_refused():
    with pytest.raises(config.ConfigError) as err:
        config.load_config(DEFAULTS, ["--epochs", "5"], ignored=official_ignores_epochs)
    assert str(err.value) == f"--epochs: ignored {REASON}"
    assert config.load_config(DEFAULTS, ["--epochs", "5", "--variant", "paper"], ignored=official_ignores_epochs)["epochs"] == 5
    assert config.load_config(DEFAULTS, [], ignored=official_ignores_epochs)["epochs"] == 3   # set nowhere: fine
    # a nested key counts by the entry it belongs to
    with pytest.raises(config.ConfigError, match="^--fusion: ignored because"):
        config.load_config(DEFAULTS, ["--fusion.n_layers", "2"], ignored=lambda cfg: {"fusion": "because"})


def test_ignored_key_in_the_file_warns_once_on_the_main_process(tmp_path, capsys, monkeypatch):
    f = tmp_path / "official.yaml"
    f.write_text("epochs: 4\n")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for _ in range(2):
        cfg = config.load_config(DEFAULTS, ["--config", str(f)], ignored=official_ignores_epochs)
    assert cfg["epochs"] == 4
    assert capsys.readouterr().err == f"warning: {f}: 'epochs' is ignored {REASON}\n"
    g = tmp_path / "other_rank.yaml"
    g.write_text("epochs: 4\n")
    monkeypatch.setenv("RANK", "1")
    config.load_config(DEFAULTS, ["--config", str(g)], ignored=official_ignores_epochs)
    assert capsys.readouterr().err == ""
    with pytest.raises(config.ConfigError, match="^--epochs: ignored"):   # the command line over the file
        config.load_config(DEFAULTS, ["--config", str(g), "--epochs", "2"], ignored=official_ignores_epochs)


# --------------------------------------------------------------- 4. a mapping value replaces the whole entry

@pytest.fixture
def encoders_file(tmp_path):
    f = tmp_path / "enc.yaml"
    f.write_text("encoders:\n  image: {width: 8, depth: 2}\n  text: {d: 4}\nnested: {a: 5, b: y}\n")
    return str(f)


@pytest.mark.parametrize("argv, encoders", [
    ([], {"image": {"width": 8, "depth": 2}, "text": {"d": 4}}),
    (["--encoders.image.width", "16"], {"image": {"width": 16, "depth": 2}, "text": {"d": 4}}),   # a leaf
    (["--encoders.image", "{arch: resnet18}"], {"image": {"arch": "resnet18"}, "text": {"d": 4}}),
    (["--encoders", "{audio: {arch: resnet18}}"], {"audio": {"arch": "resnet18"}}),
    (["--encoders={}"], {}),
    (["--encoders", "{audio: {a: 1}}", "--encoders.audio.b", "2"], {"audio": {"a": 1, "b": 2}}),
    (["--encoders.image.width", "16", "--encoders.image", "{a: 1}"], {"image": {"a": 1}, "text": {"d": 4}}),
])
def test_command_line_mapping_replaces_the_entry_a_dotted_flag_sets_one_key(encoders_file, argv, encoders):
    cfg = config.load_config(DEFAULTS, ["--config", encoders_file, *argv])
    assert cfg["encoders"] == encoders
    yaml.safe_dump(cfg)   # plain dicts only: the run directory's config.yaml can be written


def test_checked_mapping_given_as_a_value_starts_again_from_defaults(encoders_file):
    assert config.load_config(DEFAULTS, ["--config", encoders_file])["nested"] == {"a": 5, "b": "y"}
    assert config.load_config(DEFAULTS, ["--config", encoders_file, "--nested.a", "2"])["nested"] == {"a": 2, "b": "y"}
    assert config.load_config(DEFAULTS, ["--config", encoders_file, "--nested", "{a: 2}"])["nested"] == {"a": 2, "b": "x"}
    with pytest.raises(config.ConfigError, match="unknown config key 'nested.c'"):
        config.load_config(DEFAULTS, ["--nested", "{c: 2}"])


def test_source_of_tells_where_a_key_was_set(encoders_file):
    cfg = config.load_config(DEFAULTS, ["--config", encoders_file, "--encoders.text.d", "5", "--lr", "0.1"])
    assert config.source_of(cfg, "lr") == config.COMMAND_LINE
    assert config.source_of(cfg, "encoders.text") == config.COMMAND_LINE
    assert config.source_of(cfg, "encoders.image") == encoders_file
    assert config.source_of(cfg, "epochs") is None and config.source_of(cfg, "nope") is None
    assert config.source_of(dict(cfg, lr=0.5), "lr") is None   # changed since: not what was resolved
    assert "_" not in "".join(k[0] for k in cfg)                # nothing added to the config itself


# ------------------------------------------------------------------- 5. encoders fitted to the dataset

def embedded_meta(flavour):
    """meta.json of an embedded flavour, from its layout (no data generated)."""
    modalities = {}
    for name, kind, shape, dtype, _ in embedded.LAYOUT[flavour]:
        spec = {"kind": kind, "shape": shape, "dtype": dtype}
        if kind == "tabular":
            spec |= {"continuous": list(embedded.TABLE_CONTINUOUS), "categorical": dict(embedded.TABLE_CATEGORICAL)}
        modalities[name] = spec
    return {"task": "classification", "num_classes": embedded.NUM_CLASSES, "modalities": modalities}


def fake_batch(meta, modalities, n=4):
    batch = {}
    for m in modalities:
        spec = meta["modalities"][m]
        shape = [n, *spec["shape"]]
        if spec["dtype"] == "uint8":
            batch[m] = torch.randint(0, 256, shape, dtype=torch.uint8)
        elif spec["kind"] == "tabular":
            n_cont = len(spec["continuous"])
            batch[m] = torch.cat([torch.randn(n, n_cont), torch.zeros(n, spec["shape"][0] - n_cont)], 1)
        else:
            batch[m] = torch.randn(shape)
    return batch


GAAL_YAML = yaml.safe_load((REPO / "train/configs/gaal_imgtab.yaml").read_text())["encoders"]


@pytest.mark.parametrize("flavour", embedded.FLAVOURS)
def test_resolve_encoder_configs_on_the_embedded_metas(flavour):
    meta = embedded_meta(flavour)
    names = list(meta["modalities"])
    configs, dropped = resolve_encoder_configs(meta["modalities"], None, GAAL_YAML)
    assert dropped == ({} if flavour == "imgtab" else {"image": "not in the dataset", "table": "not in the dataset"})
    assert list(configs) == names
    if flavour == "imgtab":
        assert configs == GAAL_YAML                          # given entries are kept as they are
    widths = {encoder_out_dim(meta["modalities"][m], c) for m, c in configs.items()}
    assert widths == {AUTO_WIDTH if flavour != "imgtab" else 128}   # one width: a shared head fits
    # every model builds and runs on the resolved encoders
    pair = names[:2]
    for model in (LateFusionModel(meta, configs, names), IGMModel(meta, configs, names),
                  SharedHeadModel(meta, {m: configs[m] for m in pair}, pair)):
        out = model(fake_batch(meta, model.modalities))
        assert model.fuse(out).shape == (4, meta["num_classes"])
    # CGGM: every encoder width follows d_model, whatever the entry leaves unset
    given = {names[0]: {"n_layers": 1} if flavour == "seq3" else {}}
    configs, _ = resolve_encoder_configs(meta["modalities"], names, given, feature_dim=32)
    model = CGGMModel(meta, configs, names, d_model=32)
    assert model.fuse(model(fake_batch(meta, names))).shape == (4, meta["num_classes"])
    if flavour == "seq3":
        assert configs["text"] == {"n_layers": 1, "d_model": 32}


def test_resolve_encoder_configs_edges():
    meta = embedded_meta("av")["modalities"]
    # auto entries follow the width the given ones agree on; unused given entries stay as they are
    configs, dropped = resolve_encoder_configs(meta, ["video"], {"audio": {"arch": "resnet18"}, "x": {}})
    assert dropped == {"x": "not in the dataset"} and configs["audio"] == {"arch": "resnet18"}
    assert configs["video"] == {"arch": "resnet10", "base_width": 16, "small_input": True}
    configs, _ = resolve_encoder_configs(meta, None, {"audio": {"arch": "resnet18"}})
    assert encoder_out_dim(meta["video"], configs["video"]) == 512   # resnet18's width, for a shared head
    with pytest.raises(ModelConfigError, match=r"encoders.audio: a resnet10 gives 8 \* base_width features"):
        resolve_encoder_configs(meta, None, {}, feature_dim=36)
    with pytest.raises(ModelConfigError, match="'image' is not in the dataset"):
        resolve_encoder_configs(meta, ["image"], {})
    with pytest.raises(ModelConfigError, match="encoders.audio: must be a mapping"):
        resolve_encoder_configs(meta, None, {"audio": 3})
    # an entry written for another kind of encoder is dropped (the modality gets its kind's default);
    # a key allowed for no kind is a typo: kept, for build_encoder to refuse
    seq = embedded_meta("seq3")["modalities"]
    resnet = {"arch": "resnet10", "base_width": 16, "small_input": False}
    configs, dropped = resolve_encoder_configs(seq, None, {"audio": resnet, "text": {"d_model": 32}})
    assert list(dropped) == ["audio"] and "audio is sequence here" in dropped["audio"]
    assert configs["audio"] == {"d_model": 32, "n_heads": 4} and configs["text"] == {"d_model": 32}
    configs, dropped = resolve_encoder_configs(seq, None, {"text": {"d_modle": 8}})
    assert dropped == {} and configs["text"] == {"d_modle": 8}
    with pytest.raises(ModelConfigError, match="'scan'.*has no encoder"):
        resolve_encoder_configs({"scan": {"kind": "graph", "shape": [3]}}, None, {})


def test_resolve_encoders_warns_for_a_file_entry_and_refuses_a_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    meta = embedded_meta("av")
    f = tmp_path / "imgtab_encoders.yaml"
    f.write_text(yaml.safe_dump({"encoders": GAAL_YAML}))
    cfg = config.load_config(DEFAULTS, ["--config", str(f), "--data", "data/embedded_av"])
    encoders = loop.resolve_encoders(cfg, meta, ["audio", "video"])
    assert set(encoders) == {"audio", "video"}
    err = capsys.readouterr().err
    assert err == (f"warning: {f}: encoders for image, table dropped: data/embedded_av has no modality "
                   "'image' or 'table' (it has audio, video)\n")
    cfg = config.load_config(DEFAULTS, ["--config", str(f), "--encoders.table.out_dim", "64"])
    with pytest.raises(config.ConfigError, match=r"^--encoders.table: d has no modality 'table' \(it has audio, video\)$"):
        loop.resolve_encoders(cfg, meta, ["audio", "video"])
    # an entry for another kind (the image/audio names of another dataset): warned from a file
    seq3 = embedded_meta("seq3")
    g = tmp_path / "av_encoders.yaml"
    g.write_text("encoders:\n  audio: {arch: resnet10, base_width: 16}\n  video: {arch: resnet10}\n")
    cfg = config.load_config(DEFAULTS, ["--config", str(g), "--data", "seq3"])
    assert loop.resolve_encoders(cfg, seq3, ["text", "audio", "vision"])["audio"]["d_model"] == AUTO_WIDTH
    assert capsys.readouterr().err == (
        f"warning: {g}: encoders for video dropped: seq3 has no modality 'video' (it has text, audio, vision); "
        "encoders.audio dropped (audio gets the default encoder of its kind): its keys (arch, base_width) are for "
        "another kind of encoder; audio is sequence here (seq3)\n")
    with pytest.raises(config.ConfigError, match=r"^encoders.audio: a resnet10 gives 8 \* base_width features, so it cannot give 12"):
        loop.resolve_encoders(config.load_config(DEFAULTS, []), meta, ["audio"], feature_dim=12)


# ------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {f: embedded.generate(root, f, seed=1, n_train=256, n_val=64, n_test=64) for f in ("imgtab", "av")}


@pytest.mark.slow
@pytest.mark.parametrize("script, flavour, extra", [
    ("gaal", "av", ["--epochs", "1"]),
    ("igm", "imgtab", ["--stage_epochs", "[1, 1]"]),
    ("cggm", "av", ["--epochs", "1"]),
])
def test_script_trains_on_another_flavour_with_its_default_config(script, flavour, extra, small_data, tmp_path):
    proc = run(script, "--data", str(small_data[flavour]), "--out_dir", str(tmp_path / "run"), "--batch_size", "64",
               "--progress", "false", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "result.json").is_file()
    if script == "gaal":   # the default config's image/table encoders: dropped, in one warning line
        assert "encoders for image, table dropped" in proc.stderr


def test_yes_no_on_off_stay_strings(tmp_path):
    """Only true/false are booleans: `--mixed_precision no` and `mixed_precision: no` in a YAML are the
    string "no" (PyYAML's YAML 1.1 reading made them False, refused as 'must be a string')."""
    from train import igm
    f = tmp_path / "c.yaml"
    f.write_text("mixed_precision: no\nprojection: false\n")
    cfg = config.load_config(igm.CONFIG, ["--config", str(f)])
    assert cfg["mixed_precision"] == "no" and cfg["projection"] is False
    cfg = config.load_config(igm.CONFIG, ["--mixed_precision", "no", "--sam", "False", "--projection", "TRUE"])
    assert cfg["mixed_precision"] == "no" and cfg["sam"] is False and cfg["projection"] is True


# ------------------------------------------------------------------ declared bounds: non-finite values
@pytest.mark.parametrize("key, value, message", [
    ("lr", "inf", "lr=inf: must be finite"),
    ("lr", "-inf", "lr=-inf: must be finite"),
    ("lr", "nan", "lr=nan: must be finite"),
    ("weight_decay", "inf", "weight_decay=inf: must be finite"),
    ("weight_decay", "nan", "weight_decay=nan: must be finite"),
    ("lr", "-1.0", "lr=-1.0: must be > 0"),               # finite values keep their range message
    ("weight_decay", "-0.5", "weight_decay=-0.5: must be >= 0"),
])
def test_declared_bounds_say_finite_for_inf_and_nan(key, value, message):
    from train.loop_config import LOOP_CONFIG
    with pytest.raises(config.ConfigError) as err:
        config.load_config(LOOP_CONFIG, [f"--{key}", value])
    assert str(err.value) == message
    config.load_config(LOOP_CONFIG, ["--lr", "1e-3", "--weight_decay", "0", "--epochs", "3"])   # in range


def test_a_config_of_another_script_says_whose_it_is():
    proc = run("gaal", "--config", "train/configs/igm_av.yaml", "--progress", "false")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "unknown config key 'stage_epochs'" in line and "igm_av.yaml is a config of train/igm.py" in line, line
    proc = run("igm", "--epochs", "3")
    assert proc.returncode == 2 and "--stage_epochs '[2, 4]'" in proc.stderr and "--variant paper" in proc.stderr
