"""Reading a run directory's files (result.json, evaluation.json, metrics.jsonl, config.yaml) for the
programs that look at finished runs (train.evaluate, scripts/report.py, scripts/summarize.py): a file
that cannot be used becomes ONE ConfigError naming it (the programs print `error: <file>: ...` and
exit 2), never a traceback. No torch here: summarize.py stays light."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from train.config import ConfigError, load_yaml


def json_type(value) -> str:
    """The JSON name of a parsed value's type."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def read_text(path) -> str:
    """`path` as UTF-8 text, or ConfigError naming it (unreadable, not UTF-8)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None


def read_json(path, what: str, keys: tuple = ()) -> dict:
    """The JSON object in `path`, or ConfigError naming the file: unreadable, not UTF-8, not JSON (cut
    short), not an object, or without one of `keys` (`what` says what the file should have been, e.g.
    "a result.json of train/loop.py"). result.json and evaluation.json are written whole
    (atomically), so a cut one is corruption."""
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: its top level is a JSON {json_type(value)}, not an object (not {what})")
    missing = [key for key in keys if key not in value]
    if missing:
        raise ConfigError(f"{path}: no {' or '.join(missing)} (not {what})")
    return value


def read_jsonl(path) -> list:
    """The records of a JSON-lines file (a run's metrics.jsonl), one JSON object a line; blank lines
    are skipped.

    A cut LAST line is skipped, with one warning line on stderr (`warning: <file>: line N is cut
    short ...`): the training loop appends one whole line per epoch (record and newline in one
    write), so a run killed while writing leaves a last line that is not valid JSON (or UTF-8) and
    has no newline after it. That is a normal state of a run directory (train.checkpoint drops such a
    line when the run resumes), and every line before it is whole, so the report and the tables use
    them. Any other line that is not a JSON object — one in the middle, or a last line that ends in a
    newline (written whole, so not cut by a kill) — is corruption: ConfigError naming the file and
    the line number."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err})") from None
    lines = data.split(b"\n")   # a newline after the last line leaves b"" last
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if number == len(lines):   # the last line, no newline after it: cut short by a kill
                print(f"warning: {path}: line {number} is cut short (a run killed while writing it); skipped",
                      file=sys.stderr, flush=True)
                break
            what = (f"not UTF-8 ({err.reason} at byte {err.start})" if isinstance(err, UnicodeDecodeError)
                    else f"not valid JSON ({err.msg}: column {err.colno})")
            raise ConfigError(f"{path}: line {number}: {what}") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: line {number}: a JSON {json_type(record)}, not an object (a record)")
        records.append(record)
    return records


def read_yaml(path) -> dict:
    """The mapping in a YAML file (a run's config.yaml), read as train.config reads it, or
    ConfigError naming the file: unreadable, not UTF-8, not YAML, a top level that is not a mapping."""
    try:
        value = load_yaml(read_text(path))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{path}: its top level is a {type(value).__name__}, not a mapping of config keys")
    return value or {}
