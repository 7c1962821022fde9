"""Experiment configs: load ``experiments/<name>.py:<arg>``, apply ``--config.key=value`` overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``. Overrides are applied
with the type of the existing field, and every key must already exist: a typo fails here, before
any data is read or any device is touched, with a message that names the key and suggests the
closest valid ones.

The override parser is written here rather than taken from ``ml_collections.config_flags``
because that module is bound to absl's global FLAGS (one config per process, absl error output);
the CLI has sub-commands and wants errors that name the key and the fix.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from etils import epath
from ml_collections import ConfigDict


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it and says what to do."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads ``path/to/config.py[:arg]`` and applies ``key=value`` overrides.

    Args:
      spec: a config file path, optionally followed by ``:arg`` passed to ``get_config``.
      overrides: strings ``"a.b=value"`` (the ``--config.`` prefix already stripped).
    Returns:
      The config, locked (no new keys can be added by mistake later).
    """
    path, _, arg = spec.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"Config file {path!r} not found; pass --config experiments/<name>.py "
                          "(see experiments/ for the available configs).")
    module_spec = importlib.util.spec_from_file_location(f"_vlm_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # A broken config file: name it.
        raise ConfigError(f"Config file {path} failed to import: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {path} defines no get_config(arg=None) function.")
    config = module.get_config(arg or None) if arg else module.get_config()
    if not isinstance(config, ConfigDict):
        config = ConfigDict(config)
    for item in overrides:
        apply_override(config, item)
    config.lock()
    return config


def load_json_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads the ``config.json`` a run wrote into its workdir (for ``vlm-jax eval``); local or
    in cloud storage (``gs://bucket/run/config.json``)."""
    from vlm_jax import paths  # pylint: disable=import-outside-toplevel

    problem = paths.remote_problem(path)
    if problem:
        raise ConfigError(problem)
    try:
        text = epath.Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError) as e:
        raise ConfigError(f"{path} not found: pass --config experiments/<name>.py, or a --workdir "
                          "that a `vlm-jax train` run wrote.") from e
    try:
        config = ConfigDict(json.loads(text))
    except ValueError as e:
        raise ConfigError(f"{path} is not a valid config JSON ({e}); pass --config "
                          "experiments/<name>.py.") from e
    for item in overrides:
        apply_override(config, item)
    config.lock()
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # A bare string such as --config.model.dtype=bfloat16.


def apply_override(config: ConfigDict, item: str) -> None:
    """Sets ``config.a.b = value`` from ``"a.b=value"``, keeping the field's type."""
    if "=" not in item:
        raise ConfigError(f"Override {item!r} has no '='; write --config.{item}=<value>.")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        keys = list(node.keys()) if isinstance(node, (ConfigDict, dict)) else []
        if part not in keys:
            near = difflib.get_close_matches(part, keys, n=3)
            hint = f" Did you mean {', '.join(repr('.'.join(parts[:depth] + [n])) for n in near)}?" \
                if near else ""
            where = f"config.{prefix}" if prefix else "config"
            raise ConfigError(
                f"Unknown config key {key!r}: {where} has no field {part!r}.{hint} "
                f"Valid keys there: {', '.join(sorted(keys))}.")
        if depth < len(parts) - 1:
            node = node[part]
    last = parts[-1]
    old = node[last]
    value = _parse_value(text)
    value = _coerce(key, old, value, text)
    try:
        node[last] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Config key {key!r}: cannot set {text!r}: {e}") from e


def _coerce(key: str, old: Any, value: Any, text: str) -> Any:
    """Converts an override to the type of the field it replaces, or raises ConfigError."""
    if old is None or isinstance(old, ConfigDict):
        if isinstance(old, ConfigDict) and not isinstance(value, dict):
            raise ConfigError(f"Config key {key!r} is a group of settings; set one of its fields, "
                              f"e.g. --config.{key}.{next(iter(old.keys()), 'x')}=...")
        return value
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
        if text.lower() in ("true", "false", "1", "0"):
            return text.lower() in ("true", "1")
    elif isinstance(old, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(old, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(old, str):
        return text if not isinstance(value, str) else value
    elif isinstance(old, (tuple, list)):
        if isinstance(value, (tuple, list)):
            return type(old)(value)
        if isinstance(value, (str, int, float)):
            return type(old)([value])
    else:
        return value
    raise ConfigError(f"Config key {key!r} expects {type(old).__name__} (current value {old!r}); "
                      f"got {text!r}.")


def to_json(config: ConfigDict) -> str:
    """The config as JSON (tuples become lists)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def diff(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two config dicts, as ``(key, saved, current)``."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<missing>"), current.get(k, "<missing>")
        key = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, key + ".")
        elif _norm(a) != _norm(b):
            out.append((key, a, b))
    return out


def _norm(x):
    return json.loads(json.dumps(x, default=str))
