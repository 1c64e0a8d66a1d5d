"""The run config. Each script DECLARES its keys once (`declare`: a default, a help text and what a
value must be: its type, choices, range); a run resolves them as declaration < YAML file < flags,
and refuses an unknown key (the closest ones suggested), a wrong type, a value out of range or not
among the choices in one line naming the file or flag and the key (ConfigError), before any
compute. `--help` prints the script's usage and every key from the declaration, before torch is
imported. Stdlib dataclasses + PyYAML, no config library: the resolved config stays the plain dict
that checkpoints, config.yaml and every step read, and the errors, the dotted flags and the YAML
booleans (only true/false) stay ours instead of a library's grammar."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMAND_LINE = "command line"


class ConfigError(ValueError):
    """A config file or command-line flag is wrong; raised before any compute is spent."""


class ConfigLoader(yaml.SafeLoader):
    """YAML with only true/false (any case) as booleans: YAML 1.1's yes/no/on/off stay strings, so
    `mixed_precision: no` is the string "no", not False."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_yaml(text: str):
    """yaml.safe_load with ConfigLoader's booleans."""
    return yaml.load(text, Loader=ConfigLoader)


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key. `type`: what a value must be (default: the default's type; a None default
    without a type takes anything, with one takes null or that type). `choices`: the allowed values.
    `above` / `at_least`: a number's bound (exclusive / inclusive; it must also be finite). A mapping
    default is checked key by key, except an empty one: its keys depend on the data set and whoever
    reads them checks them (e.g. models.build_encoder). `where`: the declaring file (--help's groups)."""
    default: Any
    help: str = ""
    type: type | None = None
    choices: tuple = ()
    above: float | None = None
    at_least: float | None = None
    where: str = ""


def declare(base: dict | None = None, **keys) -> dict[str, Key]:
    """`base`'s keys, then `keys` in order. A Key declares a key, or redeclares one of `base` (what it
    leaves unset — help, type, choices, bounds — stays base's); a bare value declares a key by its
    default alone, or changes only the default of base's key."""
    frame_file = sys._getframe(1).f_globals.get("__file__") or ""
    where = _relative(Path(frame_file)) if frame_file else ""
    declared = dict(base or {})
    for name, key in keys.items():
        key = key if isinstance(key, Key) else Key(key)
        if name in declared:
            old = declared[name]
            key = dataclasses.replace(key, **{f: getattr(old, f) for f in ("help", "type", "choices", "above", "at_least")
                                              if getattr(key, f) in ("", None, ())})
        declared[name] = dataclasses.replace(key, where=where)
    return declared


def defaults(declared: dict) -> dict:
    """The declared keys' default values (a fresh copy)."""
    return {name: copy.deepcopy(key.default if isinstance(key, Key) else key) for name, key in declared.items()}


class Config(dict):
    """A resolved config: the plain dict of values, plus where each was set (`source_of`)."""
    sources: dict = {}      # "command line" / the file's path -> the dotted paths it set
    resolved: dict = {}     # the values as resolved (a later change makes source_of answer None)

    def __or__(self, other: dict) -> Config:
        """The config with `other`'s values, still knowing where the others were set."""
        out = Config(dict(self), **other)
        out.sources, out.resolved = self.sources, self.resolved
        return out


yaml.SafeDumper.add_representer(Config, yaml.SafeDumper.represent_dict)


class _Replace(dict):
    """A mapping given as a VALUE on the command line: it replaces the entry instead of merging."""


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, list) else copy.deepcopy(value)


def _deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for k, value in update.items():
        free = isinstance(value, dict) and not isinstance(value, _Replace) and isinstance(merged.get(k), dict)
        merged[k] = _deep_merge(merged[k], value) if free else _plain(value)
    return merged


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _typed(key: Key, value, where: str, name: str):
    """`value` if it has the declared type (an int is a float too), else ConfigError."""
    want = key.type or (None if key.default is None else type(key.default))
    if want is None or (value is None and key.default is None):
        return _plain(value)
    ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if ok:
        return _plain(value)
    got = repr(value) if want is bool else f"{type(value).__name__} {value!r}"
    raise ConfigError(f"{where}: '{name}' must be {_TYPE_WORDS.get(want, want.__name__)}, got {got}")


def _merge(current: dict, update: dict, shape: dict, where: str, prefix: str = "") -> dict:
    """`update` merged into a copy of `current`; `shape`: each known key's Key (top level) or default
    (inside a checked mapping). Unknown keys and wrong types raise ConfigError naming `where`."""
    merged = copy.deepcopy(current)
    for k, value in update.items():
        if k not in shape:
            raise unknown_key(f"{where}: unknown config key '{prefix}{k}'", k, shape)
        key, name = shape[k] if isinstance(shape[k], Key) else Key(shape[k]), prefix + k
        if not isinstance(key.default, dict):
            merged[k] = _typed(key, value, where, name)
        elif not isinstance(value, dict):
            raise ConfigError(f"{where}: '{name}' must be a mapping, got {type(value).__name__} {value!r}")
        elif not key.default:    # free: its keys are checked by whoever reads them
            merged[k] = _plain(value) if isinstance(value, _Replace) else _deep_merge(merged[k], value)
        else:                    # checked; a mapping given as a value starts again from the default
            start = key.default if isinstance(value, _Replace) else merged[k]
            merged[k] = _merge(start, dict(value), key.default, where, name + ".")
    return merged


def unknown_key(message: str, key: str, known) -> ConfigError:
    """ConfigError(message + ' (did you mean <the closest known keys>?)')."""
    from models.encoders import suggest   # the one did-you-mean; torch only on this error path
    close = suggest(key, known)
    return ConfigError(message + (f" (did you mean {' or '.join(close)}?)" if close else ""))


def check_declared(cfg: dict, declared: dict) -> None:
    """Refuse a value out of its declared choices or bounds (non-finite included): one line."""
    for name, key in declared.items():
        value = cfg.get(name)
        if key.choices and value is not None:
            check_choice(name, value, key.choices)
        for bound, ok, text in ((key.above, lambda v, b: v > b, ">"), (key.at_least, lambda v, b: v >= b, ">=")):
            if bound is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and not (math.isfinite(value) and ok(value, bound)):
                raise ConfigError(f"{name}={value}: must be " + (f"{text} {bound:g}" if math.isfinite(value) else "finite"))


def check_choice(key: str, value, allowed) -> None:
    """Refuse a config value that is not one of the `allowed` names: ConfigError naming the key."""
    if value not in allowed:
        raise ConfigError(f"{key}='{value}': choose {' or '.join(map(str, allowed))}")


def _parse_cli_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001 (YAML 1.1 would keep a string), 'true' -> True, '[1,2]' -> a list,
    '{a: 1}' -> a mapping marked to replace the entry it is given for."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        value = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: cannot parse value {text!r}: {' '.join(str(err).split())}") from None
    return _Replace(value) if isinstance(value, dict) else value


def _cli_pairs(argv: list[str], strict: bool = True) -> list[tuple[str, str]]:
    """`--a.b 3 --c=x --flag` -> [("a.b", "3"), ("c", "x"), ("flag", "true")]: the --key value pairs,
    values as typed. A token that is no --key is a ConfigError when `strict`, else skipped (--help must
    still find --config on a line it would refuse: `-h`, a stray value)."""
    pairs, i = [], 0
    while i < len(argv):
        if not argv[i].startswith("--") or argv[i] == "--":
            if strict:
                raise ConfigError(f"command line: expected --key value, got {argv[i]!r} (--help lists the keys)")
            i += 1
            continue
        key, eq, value = argv[i][2:].partition("=")
        if not eq:
            bare = i + 1 >= len(argv) or argv[i + 1].startswith("--")
            value, i = ("true", i) if bare else (argv[i + 1], i + 1)   # a bare flag: --resume
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def _cli_to_nested(argv: list[str]) -> tuple[str | None, dict]:
    """`--config F --a.b 3 --c=x --flag` -> (F, {"a": {"b": 3}, "c": "x", "flag": True})."""
    config_path, nested = None, {}
    for key, value in _cli_pairs(argv):
        if key == "config":
            config_path = value
            continue
        node, *parts = [nested] + key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: --{key} conflicts with another flag")
        node[parts[-1]] = _parse_cli_value(value)
    return config_path, nested


def _paths(tree: dict, prefix: str = "") -> set[str]:
    """The dotted paths a nested dict of settings sets: leaves, empty mappings and mappings given as a
    value ({'a': {'b': 1}, 'c': _Replace(d=1)} -> {'a.b', 'c'}), not the inner nodes of dotted flags."""
    out = set()
    for k, value in tree.items():
        deeper = isinstance(value, dict) and value and not isinstance(value, _Replace)
        out |= _paths(value, f"{prefix}{k}.") if deeper else {prefix + str(k)}
    return out


def _overlaps(key: str, paths) -> bool:
    """`key` or a key above or below it is in `paths` (--encoders.image.base_width sets 'encoders.image')."""
    return any(p == key or p.startswith(key + ".") or key.startswith(p + ".") for p in paths)


def _get(cfg: dict, key: str):
    for part in key.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return _MISSING
        cfg = cfg[part]
    return cfg


_MISSING = object()


def source_of(cfg: dict, key: str) -> str | None:
    """Where `key` (dotted) of a resolved `cfg` was set: "command line", the YAML file's path, or None
    (a default, a config built by hand, or a value changed since it was resolved)."""
    resolved = getattr(cfg, "resolved", {})
    if _get(cfg, key) is _MISSING or _get(cfg, key) != _get(resolved, key):
        return None
    return next((where for where, paths in getattr(cfg, "sources", {}).items() if _overlaps(key, paths)), None)


def load_config(declared: dict, argv: list[str] | None = None, default_config: str | None = None,
                ignored=None) -> Config:
    """The run config: the declaration's defaults, then the YAML (`--config`, else `default_config`),
    then the flags, checked (ConfigError). `--help` prints the keys and exits 0 first.

    The YAML is deep-merged into the defaults. A dotted flag sets one key inside its entry
    (`--encoders.image.base_width 32`), a mapping given as a value replaces the entry it names
    (`--encoders '{audio: {arch: resnet18}}'`; a checked mapping so given starts from its default);
    flags apply left to right. `ignored(cfg) -> {key: reason}`: keys the resolved config makes
    meaningless (reason completes "<key> is ignored ..."): refused when a flag sets them, one warning
    when only the file does. The returned Config knows where each key was set (source_of)."""
    declared = {name: key if isinstance(key, Key) else Key(key) for name, key in declared.items()}
    argv = sys.argv[1:] if argv is None else list(argv)
    exit_on_help(declared, default_config, argv)
    config_path, cli = _cli_to_nested(argv)
    cfg, from_file, sources = defaults(declared), {}, {}
    if config_path or default_config:
        path = _find_config(config_path or default_config)
        from_file = _read_config_file(path)
        try:
            cfg = _merge(cfg, from_file, declared, str(path))
        except ConfigError as err:
            raise ConfigError(f"{err}{_owner_hint(path)}") from None
        cfg["config_file"], sources[str(path)] = str(path), _paths(from_file)
    cfg = Config(_merge(cfg, cli, declared, COMMAND_LINE))
    check_declared(cfg, declared)
    cfg.sources = {COMMAND_LINE: _paths(cli), **sources}
    cfg.resolved = copy.deepcopy(dict(cfg))
    for key, reason in ((ignored or (lambda c: {}))(cfg) or {}).items():
        where = source_of(cfg, key)
        if where == COMMAND_LINE:
            raise ConfigError(f"--{key}: ignored {reason}")
        if where is not None:
            warn(f"{where}: '{key}' is ignored {reason}")
    return cfg


def _read_config_file(path: Path) -> dict:
    try:
        loaded = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config keys")
    loaded.pop("config_file", None)   # a run directory's config.yaml records where it came from
    return loaded


def _find_config(config_path: str) -> Path:
    path = Path(config_path)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {config_path}")
    return path


def _owner_hint(path: Path) -> str:
    """'; <file> is a config of train/<script>.py ...' when the file's name (<script>_<data set>.yaml)
    says it belongs to another script than the running one, else ''."""
    from train import SCRIPTS
    owner = max((s for s in SCRIPTS if path.stem.startswith(s + "_")), key=len, default=None)
    running = main_script()
    if owner is None or (running is not None and running.stem == owner):
        return ""
    return (f"; {path.name} is a config of train/{owner}.py (configs are named <script>_<data set>.yaml): run "
            f"train/{owner}.py with it" + (f", or give train/{running.stem}.py one of its own" if running else ""))


_WARNED: set[str] = set()


def is_main_process() -> bool:
    """Rank 0 (or a single process), from the launcher's environment: no process group needed."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "")) in ("", "0")


def warn(message: str) -> None:
    """`warning: <message>` on stderr, once per process and on the main process only."""
    if message not in _WARNED and is_main_process():
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def main_script() -> Path | None:
    """The running script (`python train/gaal.py`, `python -m train.gaal`), or None (e.g. pytest)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    path = Path(path).resolve() if path else None
    return path if path is not None and path.suffix == ".py" and path.is_file() else None


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def show(value) -> str:
    """A value as one types it on the command line (YAML flow style)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, str):
        return value if value.strip() and value == value.strip() else repr(value)
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    return str(value)


def exit_on_help(declared: dict, default_config: str | None = None, argv: list[str] | None = None) -> None:
    """With --help / -h in `argv` (default sys.argv[1:]): print help_text and exit 0."""
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("--help", "-h") for arg in argv):
        given = [value for key, value in _cli_pairs(argv, strict=False) if key == "config"]
        file_name = (given[-1] if given else None) or default_config
        try:
            print(help_text(declared, file_name, default_config), flush=True)
        except BrokenPipeError:   # `--help | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)


def _file_values(file_name: str | None) -> dict:
    """What the config file sets, for --help ({} where there is none or it cannot be read)."""
    try:
        values = (load_yaml(_find_config(file_name).read_text()) or {}) if file_name else {}
    except (ConfigError, OSError, yaml.YAMLError):
        values = {}
    return values if isinstance(values, dict) else {}


def help_text(declared: dict, file_name: str | None, default_config: str | None) -> str:
    """The running script's usage (its docstring up to the indented usage lines), then every key grouped
    by the file that declared it (the script's first): default, help, and the value `file_name` sets."""
    from_file = _file_values(file_name)
    doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip("\n").split("\n\n")
    usage = next((doc[:i + 1] for i, p in enumerate(doc[:3]) if re.search(r"^[ \t]", p, re.M)), doc[:1])
    intro = ("Config keys: default value, then what it does. Set any of them in a YAML file (--config FILE"
             + (f"; default {default_config}" if default_config else "") + ") or on the command line: --key "
             "value, --a.b value (one key inside a mapping); a mapping given as a value (--encoders '{image: "
             "{arch: resnet18}}') replaces the whole entry." + (f" [{file_name}: value] marks a key that file sets."
                                                                if from_file else ""))
    out = ["\n\n".join(usage), "", textwrap.fill(intro, 100, break_on_hyphens=False, break_long_words=False)]
    script, width = _relative(main_script() or Path("?")), max(map(len, declared), default=0) + 3
    for where in sorted({key.where for key in declared.values()}, key=lambda w: (w != script, w)):
        out += ["", f"{where or 'keys'}:"]
        for name, key in ((n, k) for n, k in declared.items() if k.where == where):
            note = key.help + (f"  [{file_name}: {show(from_file[name])}]" if from_file.get(name, key.default)
                               != key.default else "")
            line = f"  --{name:<{width}}{show(key.default)}"
            out.append(f"{line:<{width + 24}}  # {note.strip()}" if note.strip() else line)
    return "\n".join(out)
