"""The run config: the script's DEFAULTS dict < a YAML file < command-line flags, checked before any
compute. Unknown keys (with the closest known ones suggested), wrong types, out-of-range numbers and
unknown choices are refused with one line naming the file or flag and the key (ConfigError).
`--help` / `-h` prints the script's usage and every key with its default and comment, then exits."""
from __future__ import annotations

import ast
import copy
import difflib
import io
import math
import os
import re
import sys
import textwrap
import tokenize
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMAND_LINE = "command line"


class ConfigLoader(yaml.SafeLoader):
    """YAML as the config files and flags are read: only true/false (any case) are booleans. PyYAML
    follows YAML 1.1, where yes/no/on/off are booleans too, so `mixed_precision: no` (or
    `--mixed_precision no`) would arrive as False instead of the string "no"."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_yaml(text: str):
    """yaml.safe_load with ConfigLoader's booleans."""
    return yaml.load(text, Loader=ConfigLoader)


class ConfigError(ValueError):
    """A config file or command-line flag is wrong; raised before any compute is spent."""


class _Replace(dict):
    """A mapping given as a VALUE on the command line (`--encoders '{audio: {...}}'`): it replaces
    the entry instead of being merged into it. Only lives inside load_config (see _plain)."""


def _plain(value):
    """`value` with every _Replace marker turned back into a dict (deep copy)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _type_name(value) -> str:
    return type(value).__name__


def _deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and not isinstance(value, _Replace) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = _plain(value)
    return merged


def suggest(key: str, known) -> list[str]:
    """The known keys closest to a mistyped `key` (at most 3, closest first): difflib's close matches,
    then keys that share a whole `_`-separated prefix with it (`lr_rate` -> `lr`)."""
    known = [k for k in known if isinstance(k, str)]
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    prefix = [k for k in known if k not in close and (key.startswith(k + "_") or k.startswith(key + "_"))]
    prefix.sort(key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio())
    return (close + prefix)[:3]


def _unknown_key(where: str, name: str, key: str, known) -> ConfigError:
    close = suggest(key, known)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return ConfigError(f"{where}: unknown config key '{name}'{hint}")


def _check_and_merge(base: dict, update: dict, where: str, prefix: str = "", schema: dict | None = None) -> dict:
    """Merge `update` into a copy of `base`, rejecting unknown keys and wrong types.

    Rules: a key must exist in `base`; a value must have the type of the default (an int is
    accepted for a float; a default of None accepts any value); a dict is checked key by key,
    except where the script's DEFAULTS (`schema`) holds an empty dict: such a mapping is free
    (its keys depend on the dataset and are validated by whoever consumes them, e.g.
    models.build_encoder) and is deep-merged. A mapping given as a value on the command line
    (_Replace) is not merged: it replaces the entry (a checked mapping starts again from DEFAULTS).
    """
    schema = base if schema is None else schema
    merged = copy.deepcopy(base)
    for key, value in update.items():
        name = prefix + key
        if key not in base:
            raise _unknown_key(where, name, key, base)
        default = base[key]
        free = isinstance(schema.get(key), dict) and not schema[key]
        replace = isinstance(value, _Replace)
        if default is None:
            merged[key] = _plain(value)
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{name}' must be a mapping, got {_type_name(value)} {value!r}")
            if free:
                merged[key] = _plain(value) if replace else _deep_merge(default, value)
            else:
                start = copy.deepcopy(schema.get(key, default)) if replace else default
                merged[key] = _check_and_merge(start, dict(value), where, name + ".", schema.get(key))
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: '{name}' must be true or false, got {value!r}")
            merged[key] = value
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: '{name}' must be a number, got {_type_name(value)} {value!r}")
            merged[key] = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: '{name}' must be an integer, got {_type_name(value)} {value!r}")
            merged[key] = value
        elif isinstance(default, list):
            if not isinstance(value, list):
                raise ConfigError(f"{where}: '{name}' must be a list, got {_type_name(value)} {value!r}")
            merged[key] = _plain(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: '{name}' must be a string, got {_type_name(value)} {value!r}")
            merged[key] = value
        else:
            merged[key] = _plain(value)
    return merged


def _parse_cli_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001 (YAML 1.1 would keep it a string), 'true' -> True, '[1,2]' -> list,
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


def _cli_to_nested(argv: list[str]) -> tuple[str | None, dict]:
    """Parse `--config F --a.b 3 --c=x --flag` into (F, {"a": {"b": 3}, "c": "x", "flag": True})."""
    config_path, nested, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: expected --key value, got {arg!r} (--help lists the keys)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # a bare flag, e.g. --resume
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            config_path = value
            continue
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: --{key} conflicts with another flag")
        node[parts[-1]] = _parse_cli_value(value)
    return config_path, nested


def _paths(tree: dict, prefix: str = "") -> set[str]:
    """The dotted paths a nested dict of settings sets: its leaves, its empty mappings and the
    mappings given as a value on the command line (they set everything below them); not the
    inner nodes of dotted flags: {'a': {'b': 1}, 'c': _Replace(d=1)} -> {'a.b', 'c'}."""
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value and not isinstance(value, _Replace):
            out |= _paths(value, f"{prefix}{key}.")
        else:
            out.add(prefix + str(key))
    return out


def _overlaps(key: str, paths) -> bool:
    """`key` (dotted) or a key above or below it is in `paths`: 'encoders.image' is set by
    --encoders '{...}', by --encoders.image '{...}' and by --encoders.image.base_width 8."""
    return any(p == key or p.startswith(key + ".") or key.startswith(p + ".") for p in paths)


def _get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()
#: What the last load_config of this process resolved: where each key was set (source_of).
_LAST = {"cfg": None, "cli": set(), "file": None, "file_paths": set()}
_WARNED: set[str] = set()


def is_main_process() -> bool:
    """Rank 0 (or a single process), from the launcher's environment: no process group needed."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "")) in ("", "0")


def warn(message: str) -> None:
    """`warning: <message>` on stderr, once per process and on the main process only."""
    if message not in _WARNED and is_main_process():
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def source_of(cfg: dict, key: str) -> str | None:
    """Where `key` (dotted: 'epochs', 'encoders.image') of `cfg` was set: "command line", the YAML
    file's path, or None (a default, or a value that is not what the last load_config of this
    process resolved: a config built or changed by hand). A key counts as set where it, a key above
    it or a key below it was given (--encoders.image.base_width 8 sets 'encoders.image')."""
    last = _LAST["cfg"]
    if last is None or _get(cfg, key) is _MISSING or _get(cfg, key) != _get(last, key):
        return None
    if _overlaps(key, _LAST["cli"]):
        return COMMAND_LINE
    if _LAST["file"] is not None and _overlaps(key, _LAST["file_paths"]):
        return _LAST["file"]
    return None


def wants_help(argv: list[str]) -> bool:
    return any(arg in ("--help", "-h") for arg in argv)


def load_config(defaults: dict, argv: list[str] | None = None, default_config: str | None = None,
                ignored=None) -> dict:
    """Resolve the run config: DEFAULTS, then the YAML (`--config`, else `default_config`), then flags.

    Every key may be overridden from the command line (`--lr 3e-4`, `--encoders.image.base_width 32`);
    unknown keys (the closest known ones are suggested) and wrong types raise ConfigError naming the
    file or flag and the key. `--help` / `-h` prints the script's usage and every key with its
    default and comment (print_help) and exits 0 before anything else happens.

    Merging: the YAML is deep-merged into DEFAULTS. On the command line a dotted leaf flag sets one
    key inside its entry (`--encoders.image.base_width 32` keeps the file's other image keys), while
    a mapping given as a VALUE replaces the whole entry it names (`--encoders '{audio: {arch:
    resnet18}}'` replaces every encoder entry of the file, `--encoders.image '{arch: resnet18}'` the
    image one; a checked mapping given so starts again from DEFAULTS). Flags apply left to right:
    a leaf flag after such a mapping sets a key inside it, a mapping after leaf flags replaces them.

    `ignored(cfg) -> {key: reason}`: the keys the resolved config makes meaningless (e.g. IGM's
    official variant ignores `epochs`). `reason` completes "<key> is ignored ...", e.g. "by
    variant=official (its length is the sum of stage_epochs); drop it or set --variant paper". A
    key set on the command line is refused (ConfigError "--epochs: ignored by ..."); one set only in
    the YAML gives one warning line on stderr ("warning: <file>: 'epochs' is ignored by ...",
    main process only); a key set nowhere is fine. A dotted key counts where it or a key above or
    below it was set.

    Where each key was set is kept for `source_of(cfg, key)` (nothing is added to the config).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        try:
            print_help(defaults, default_config=default_config, config_path=_help_config_path(argv))
        except BrokenPipeError:   # `--help | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    config_path, cli = _cli_to_nested(argv)
    config_path = config_path or default_config
    cfg = copy.deepcopy(defaults)
    from_file, file_name = {}, None
    if config_path is not None:
        path = _find_config(config_path)
        try:
            from_file = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        from_file.pop("config_file", None)  # a run directory's config.yaml records where it came from
        try:
            cfg = _check_and_merge(cfg, from_file, str(path), schema=defaults)
        except ConfigError as err:
            raise ConfigError(f"{err}{_owner_hint(path)}") from None
        cfg["config_file"] = file_name = str(path)
    cfg = _check_and_merge(cfg, cli, COMMAND_LINE, schema=defaults)
    check_ranges(cfg)
    cli_paths, file_paths = _paths(cli), _paths(from_file)
    _LAST.update(cfg=copy.deepcopy(cfg), cli=cli_paths, file=file_name, file_paths=file_paths)
    if ignored is not None:
        for key, reason in (ignored(cfg) or {}).items():
            if _overlaps(key, cli_paths):
                raise ConfigError(f"--{key}: ignored {reason}")
            if file_name is not None and _overlaps(key, file_paths):
                warn(f"{file_name}: '{key}' is ignored {reason}")
    return cfg


def _owner_hint(path: Path) -> str:
    """'; <file> is a config of train/<script>.py: ...' when the file's name says it belongs to another
    training script than the one running (configs are named <script>_<data set>.yaml), else ''."""
    from train import SCRIPTS
    owners = [s for s in SCRIPTS if path.stem.startswith(s + "_")]
    owner = max(owners, key=len) if owners else None
    running = main_script()
    if owner is None or (running is not None and running.stem == owner):
        return ""
    return (f"; {path.name} is a config of train/{owner}.py (configs are named <script>_<data set>.yaml): run "
            f"train/{owner}.py with it" + (f", or give train/{running.stem}.py one of its own" if running else ""))


def _find_config(config_path: str) -> Path:
    path = Path(config_path)
    if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {config_path}")
    return path


# Numeric keys shared by the scripts and the range each must lie in (a script checks its own
# method's knobs in its check_config). A key a script does not have is skipped.
POSITIVE_KEYS = ("lr", "clf_lr", "epochs", "batch_size", "eval_batch_size", "log_every", "eval_every",
                 "keep_checkpoints", "preempt_check_every", "step_size", "gamma")


NON_NEGATIVE_KEYS = ("weight_decay", "clf_weight_decay", "momentum", "grad_clip", "num_workers", "plateau_patience",
                     "ckpt_every_steps", "stop_after_steps", "patience", "min_delta", "warmup_epochs",
                     "warmup_start_lr", "min_lr", "data_seed", "seed")


def check_ranges(cfg: dict) -> None:
    """Refuse a negative (or zero, where it must be positive) or non-finite learning rate, weight
    decay, epoch count, batch size, ... before anything runs: the key and its value in one line."""
    for keys, ok, what in ((POSITIVE_KEYS, lambda v: v > 0, "> 0"), (NON_NEGATIVE_KEYS, lambda v: v >= 0, ">= 0")):
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    not (math.isfinite(value) and ok(value)):
                raise ConfigError(f"{key}={value}: must be {what if math.isfinite(value) else 'finite'}")


def check_choice(key: str, value, allowed) -> None:
    """Refuse a config value that is not one of the `allowed` names: ConfigError naming the key."""
    if value not in allowed:
        raise ConfigError(f"{key}='{value}': choose {' or '.join(allowed)}")


# --------------------------------------------------------------------------------------------------
# Encoders for the dataset at hand

def resolve_encoders(cfg: dict, meta: dict, modalities: list[str], feature_dim: int | None = None) -> dict:
    """cfg["encoders"] fitted to the dataset (models.encoders.resolve_encoder_configs) and returned:
    an entry that does not fit it (a modality the dataset lacks, an entry written for another kind
    of encoder) is refused (ConfigError, one line) when the command line set it, and dropped with
    one warning line when it came from a file; every used modality left without an entry gets the
    default encoder of its kind (width `feature_dim`, else the common width of the kept entries,
    else models.encoders.AUTO_WIDTH). ConfigError for what resolve_encoder_configs refuses."""
    from models.encoders import ModelConfigError, resolve_encoder_configs   # torch: not for --help

    try:
        configs, dropped = resolve_encoder_configs(meta["modalities"], modalities, cfg.get("encoders") or {},
                                                   feature_dim)
    except ModelConfigError as err:
        raise ConfigError(str(err) if str(err).startswith("encoders.") else f"encoders: {err}") from None
    if not dropped:
        return configs
    data, has = cfg.get("data", "the dataset"), ", ".join(meta["modalities"])
    absent = [m for m in dropped if m not in meta["modalities"]]
    why = {m: f"{data} has no modality {m!r} (it has {has})" for m in absent}
    why |= {m: f"{reason} ({data})" for m, reason in dropped.items() if m not in absent}
    on_cli = [m for m in dropped if source_of(cfg, f"encoders.{m}") == COMMAND_LINE]
    if on_cli:
        raise ConfigError(f"--encoders.{on_cli[0]}: {why[on_cli[0]]}")
    parts = [f"encoders for {', '.join(absent)} dropped: {data} has no modality "
             f"{' or '.join(map(repr, absent))} (it has {has})"] if absent else []
    parts += [f"encoders.{m} dropped ({m} gets the default encoder of its kind): {why[m]}"
              for m in dropped if m not in absent]
    where = next((s for m in dropped if (s := source_of(cfg, f"encoders.{m}"))), None)
    warn((f"{where}: " if where else "") + "; ".join(parts))
    return configs


# --------------------------------------------------------------------------------------------------
# --help: the script's usage and every key with its default and its comment in the source

def _help_config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.partition("=")[2]
    return None


def main_script() -> Path | None:
    """The running script (`python train/gaal.py`, `python -m train.gaal`), or None (e.g. pytest)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path:
        return None
    path = Path(path).resolve()
    return path if path.suffix == ".py" and path.is_file() else None


def parse_defaults_source(path: Path) -> tuple[list[tuple[str, str]], list[str], str]:
    """Read the module-level `DEFAULTS = ...` assignment of a Python file without importing it.

    Returns ([(key, comment)] in source order, the modules whose DEFAULTS it extends (`loop` for
    `loop.DEFAULTS | dict(...)`, `joint` for `dict(joint.DEFAULTS, ...)`), the module docstring).
    An entry's comment is the line comment at the end of the entry, joined with the comment-only
    lines right under it (up to the next entry). ([], [], "") where the file cannot be parsed."""
    try:
        source = Path(path).read_text()
        tree = ast.parse(source)
    except (OSError, SyntaxError, ValueError):
        return [], [], ""
    docstring = ast.get_docstring(tree) or ""
    value = None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "DEFAULTS" for t in targets) and node.value is not None:
            value = node.value
    if value is None:
        return [], [], docstring
    entries, refs = [], []   # entries: (key, first line, last line)

    def visit(n):
        if isinstance(n, ast.BinOp):
            visit(n.left)
            visit(n.right)
        elif isinstance(n, ast.Call):
            for arg in n.args:
                visit(arg)
            for kw in n.keywords:
                if kw.arg is None:
                    visit(kw.value)
                else:
                    entries.append((kw.arg, kw.lineno, kw.value.end_lineno))
        elif isinstance(n, ast.Dict):
            for k, v in zip(n.keys, n.values):
                if k is None:
                    visit(v)
                elif isinstance(k, ast.Constant) and isinstance(k.value, str):
                    entries.append((k.value, k.lineno, v.end_lineno))
        elif isinstance(n, ast.Attribute) and n.attr == "DEFAULTS" and isinstance(n.value, ast.Name):
            refs.append(n.value.id)

    visit(value)
    inline, whole = {}, {}   # line -> comment after code / comment alone on its line
    lines = source.splitlines()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                text = tok.string.lstrip("#").strip()
                (whole if not lines[row - 1][:col].strip() else inline)[row] = text
    except (tokenize.TokenError, IndentationError):
        pass
    starts = sorted(first for _, first, _ in entries)
    result = []
    for key, first, last in entries:
        parts = [inline[last]] if last in inline else [inline[first]] if first in inline else []
        following = [s for s in starts if s > last]
        stop = following[0] if following else value.end_lineno + 1
        row = last + 1
        while row < stop and row in whole:
            parts.append(whole[row])
            row += 1
        result.append((key, " ".join(p for p in parts if p)))
    return result, refs, docstring


def _usage(docstring: str) -> str:
    """The docstring's opening paragraphs up to and including the first indented one (the usage
    lines); the first paragraph alone where none of the first three is indented."""
    paragraphs = [p for p in docstring.strip("\n").split("\n\n") if p.strip()]
    for i, p in enumerate(paragraphs[:3]):
        if any(line.startswith((" ", "\t")) for line in p.splitlines()):
            return "\n\n".join(paragraphs[:i + 1])
    return paragraphs[0] if paragraphs else ""


def _show(value) -> str:
    """A value as one would type it on the command line (YAML flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        return value if value.strip() and value == value.strip() else repr(value)
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    return str(value)


def _module_file(name: str, near: Path) -> Path | None:
    for candidate in (near.parent / f"{name}.py", REPO_ROOT / "train" / f"{name}.py"):
        if candidate.is_file():
            return candidate
    return None


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def print_help(defaults: dict, default_config: str | None = None, script: str | Path | None = None,
               config_path: str | None = None, file=None) -> None:
    """Print the script's usage (its docstring's opening paragraphs) and every config key with its
    default value and its comment, grouped: the script's own keys, then those of each module whose
    DEFAULTS it extends (e.g. train/loop.py). The comments are read from the sources (the running
    script, `script`, found via __main__, and the modules it extends) without importing anything;
    the values are those of `defaults`. Keys the config file (`config_path`, else `default_config`)
    sets are marked with the file's value."""
    file = sys.stdout if file is None else file
    script = Path(script) if script is not None else main_script()
    groups, comments, seen_files = [], {}, set()

    def collect(path: Path):
        path = Path(path).resolve()
        if path in seen_files:
            return ""
        seen_files.add(path)
        entries, refs, docstring = parse_defaults_source(path)
        groups.append((_relative(path), [k for k, _ in entries]))
        for key, comment in entries:
            if comment and key not in comments:
                comments[key] = comment
        for ref in refs:
            ref_file = _module_file(ref, path)
            if ref_file is not None:
                collect(ref_file)
        return docstring

    docstring = collect(script) if script is not None else ""
    loop_file = REPO_ROOT / "train" / "loop.py"
    if loop_file.resolve() not in seen_files and loop_file.is_file():
        collect(loop_file)
    from_file, file_label = {}, None
    try:
        if config_path or default_config:
            found = _find_config(config_path or default_config)
            loaded = load_yaml(found.read_text()) or {}
            if isinstance(loaded, dict):
                from_file, file_label = loaded, _relative(found)
    except (ConfigError, OSError, yaml.YAMLError):
        pass

    out = []
    usage = _usage(docstring)
    if usage:
        out += [usage, ""]
    name = script.name if script is not None else "the script"
    intro = (f"Config keys of {name}: default value, then what it does. Set any of them in a YAML file "
             "(--config FILE" + (f"; default {default_config}" if default_config else "") + ") or on the "
             "command line: --key value, --a.b value (one key inside a mapping); a mapping given as a value "
             "(--encoders '{image: {arch: resnet18}}') replaces the whole entry.")
    if file_label:
        intro += f" [{file_label}: value] marks a key that file sets."
    out.append(textwrap.fill(intro, width=100, break_on_hyphens=False, break_long_words=False))
    shown = set()
    width = max((len(k) for k in defaults), default=0) + 3
    for label, keys in groups + [("other keys", list(defaults))]:
        keys = [k for k in dict.fromkeys(keys) if k in defaults and k not in shown]
        if not keys:
            continue
        shown |= set(keys)
        out += ["", f"{label}:"]
        for key in keys:
            value = _show(defaults[key])
            line = f"  --{key:<{width}}{value}"
            note = comments.get(key, "")
            if key in from_file and from_file[key] != defaults[key]:
                note = (note + "  " if note else "") + f"[{file_label}: {_show(from_file[key])}]"
            if note:
                line = f"{line:<{width + 24}}  # {note}" if len(value) <= 20 else f"{line}  # {note}"
            out.append(line)
    print("\n".join(out), file=file, flush=True)
