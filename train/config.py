"""The run config: the script's DEFAULTS dict < a YAML file < command-line flags, checked before any
compute. Unknown keys, wrong types, out-of-range numbers and unknown choices are refused with one
line naming the file or flag and the key (ConfigError)."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A config file or command-line flag is wrong; raised before any compute is spent."""


def _type_name(value) -> str:
    return type(value).__name__


def _deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_and_merge(base: dict, update: dict, where: str, prefix: str = "", schema: dict | None = None) -> dict:
    """Merge `update` into a copy of `base`, rejecting unknown keys and wrong types.

    Rules: a key must exist in `base`; a value must have the type of the default (an int is
    accepted for a float; a default of None accepts any value); a dict is checked key by key,
    except where the script's DEFAULTS (`schema`) holds an empty dict: such a mapping is free
    (its keys depend on the dataset and are validated by whoever consumes them, e.g.
    models.build_encoder) and is deep-merged.
    """
    schema = base if schema is None else schema
    merged = copy.deepcopy(base)
    for key, value in update.items():
        name = prefix + key
        if key not in base:
            close = [k for k in base if k.split("_")[0] == key.split("_")[0] or k in key or key in k]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown config key '{name}'{hint}")
        default = base[key]
        free = isinstance(schema.get(key), dict) and not schema[key]
        if default is None:
            merged[key] = value
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{name}' must be a mapping, got {_type_name(value)} {value!r}")
            merged[key] = (_deep_merge(default, value) if free else
                           _check_and_merge(default, value, where, name + ".", schema.get(key)))
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
            merged[key] = value
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: '{name}' must be a string, got {_type_name(value)} {value!r}")
            merged[key] = value
        else:
            merged[key] = value
    return merged


def _parse_cli_value(text: str):
    """'3' -> 3, '1e-3' -> 0.001 (YAML 1.1 would keep it a string), 'true' -> True, '[1,2]' -> list."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: cannot parse value {text!r}: {err}") from None


def _cli_to_nested(argv: list[str]) -> tuple[str | None, dict]:
    """Parse `--config F --a.b 3 --c=x --flag` into (F, {"a": {"b": 3}, "c": "x", "flag": True})."""
    config_path, nested, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
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


def load_config(defaults: dict, argv: list[str] | None = None, default_config: str | None = None,
                ignored=None) -> dict:
    """Resolve the run config: DEFAULTS, then the YAML (`--config`, else `default_config`), then flags.

    Every key may be overridden from the command line (`--lr 3e-4`, `--encoders.image.base_width 32`);
    unknown keys and wrong types raise ConfigError naming the file or flag and the key.
    """
    argv = sys.argv[1:] if argv is None else argv
    config_path, cli = _cli_to_nested(argv)
    config_path = config_path or default_config
    cfg = copy.deepcopy(defaults)
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file() and not path.is_absolute() and (REPO_ROOT / path).is_file():
            path = REPO_ROOT / path
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {config_path}")
        try:
            from_file = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
        from_file.pop("config_file", None)  # a run directory's config.yaml records where it came from
        cfg = _check_and_merge(cfg, from_file, str(path), schema=defaults)
        cfg["config_file"] = str(path)
    cfg = _check_and_merge(cfg, cli, "command line", schema=defaults)
    check_ranges(cfg)
    return cfg


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
                raise ConfigError(f"{key}={value}: must be {what}")


def check_choice(key: str, value, allowed) -> None:
    """Refuse a config value that is not one of the `allowed` names: ConfigError naming the key."""
    if value not in allowed:
        raise ConfigError(f"{key}='{value}': choose {' or '.join(allowed)}")
