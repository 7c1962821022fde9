"""Experiment configs: load ``experiments/<name>.py:<arg>``, apply ``--config.key=value`` overrides.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``, normally starting
from :func:`vlm_jax.configs.base_config` (the defaults and meaning of every key outside ``model``
and ``eval``). What a file or a run's ``config.json`` gives is merged onto that base, so a key it
lacks takes its default. Overrides are applied with the type of the existing field, and every key
must already exist: a typo fails here, before any data is read or any device is touched, with a
message that names the key and suggests the closest valid ones.

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
      The config merged onto :func:`vlm_jax.configs.base_config`, locked (no new keys can be
      added by mistake later).
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
    return _finish(with_base(config, f"config file {path}"), overrides)


def load_json_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads the ``config.json`` a run wrote into its workdir (for ``vlm-jax eval``); local or
    in cloud storage (``gs://bucket/run/config.json``). Merged onto the base config, as
    :func:`load_config`: a key added since the run was written takes its default."""
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
        values = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path} is not a valid config JSON ({e}); pass --config "
                          "experiments/<name>.py.") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path} holds a JSON {type(values).__name__}, not a config object; "
                          "pass --config experiments/<name>.py.")
    return _finish(with_base(values, str(path)), overrides)


def _finish(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Applies the overrides, checks that the required keys are set and locks the config."""
    from vlm_jax import configs  # pylint: disable=import-outside-toplevel

    for item in overrides:
        apply_override(config, item)
    unset = [k for k in configs.REQUIRED if config[k] is None]
    if unset:
        raise ConfigError(f"config.{unset[0]} is not set: every experiment states "
                          f"{', '.join(configs.REQUIRED)} (set it in the config file or with "
                          f"--config.{unset[0]}=...).")
    config.lock()
    return config


def with_base(config: ConfigDict | dict, source: str) -> ConfigDict:
    """``config`` merged onto :func:`vlm_jax.configs.base_config`: the base's keys that
    ``config`` lacks keep their defaults; sections the base does not hold (``model``, ``evals``,
    ...: :data:`vlm_jax.configs.OPEN_SECTIONS`) are taken as they are.

    Values are copied into the base: a ``FieldReference`` between keys of ``config`` is
    resolved here, so a later override of one key does not reach the other.

    Raises ConfigError naming ``source`` and the key when ``config`` has a key the base does not
    know, or a value of another type than the default's.
    """
    from vlm_jax import configs  # pylint: disable=import-outside-toplevel

    old_eval = dict(config.get("eval") or {})
    if "evaluators" in old_eval and "evals" not in config:  # A run's config.json of before.
        raise ConfigError(
            f"{source} lists its evaluations in the former layout (config.eval.evaluators="
            f"{list(old_eval['evaluators'])}); evaluations are now named entries, config.evals. "
            "Pass the experiment file (--config experiments/<name>.py) or add config.evals (see "
            "README, Evaluating checkpoints).")
    base = configs.base_config()
    _merge(base, config, "", source, configs.OPEN_SECTIONS)
    return base


def _merge(node: ConfigDict, values, prefix: str, source: str, open_sections) -> None:
    for key, value in values.items():
        path = prefix + key
        if key not in node:
            if not prefix and key in open_sections:  # model, evals...: not in the base.
                node[key] = value
                continue
            keys = list(node.keys())
            near = difflib.get_close_matches(key, keys, n=3)
            hint = f" Did you mean {', '.join(repr(prefix + n) for n in near)}?" if near else ""
            where = f"config.{prefix[:-1]}" if prefix else "config"
            raise ConfigError(
                f"Unknown config key {path!r} in {source}: {where} has no field {key!r}.{hint} "
                f"Valid keys there: {', '.join(sorted(keys))} (the defaults and their meaning: "
                "vlm_jax/configs.py).")
        if (isinstance(node[key], ConfigDict) and isinstance(value, (dict, ConfigDict))
                and path not in open_sections):
            _merge(node[key], value, path + ".", source, open_sections)
            continue
        try:
            node[key] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"Config key {path!r} in {source}: {value!r} does not fit the "
                              f"default {node[key]!r} (vlm_jax/configs.py): {e}") from e


def fill_defaults(saved: dict) -> dict:
    """A saved config dict (a checkpoint's or ``config.json``'s, as JSON) with the base config's
    keys it lacks added at their defaults; nothing else is checked or changed.

    A run written before a key was added to the base ran with that key's default, so comparing
    ``fill_defaults(saved)`` with the current config (:func:`diff`) reports only real changes.
    """
    from vlm_jax import configs  # pylint: disable=import-outside-toplevel

    def fill(base: dict, values: dict) -> dict:
        out = dict(values)
        for k, v in base.items():
            if k not in out:
                out[k] = v
            elif isinstance(v, dict) and v and isinstance(out[k], dict):  # {}: a free section.
                out[k] = fill(v, out[k])
        return out

    return fill(json.loads(to_json(configs.base_config())), saved)


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
