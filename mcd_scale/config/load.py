"""Loading the config tree: YAML files (later override earlier), ``--set section.key=value`` overrides, coercion
to the schema's types, serialisation. Validation: :mod:`mcd_scale.config.validate`."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

import yaml

from mcd_scale.config.schema import CHOICES, Config
from mcd_scale.config.validate import validate_fields
from mcd_scale.errors import ConfigError


def _nearest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(options))}."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the dataclass field type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(eval_fraction(value))
            except (ValueError, ZeroDivisionError):
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}.")
    raise ConfigError(f"{where}: unsupported field type {tp!r}.")


def eval_fraction(text: str) -> float:
    """Parse '0.5', '1e-3' or a fraction like '1/512'."""
    text = text.strip()
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{where}'.{_nearest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), value if value is not None else {}, where + ".", source)
        else:
            word = "on" if value is True else "off"
            if tp is str and isinstance(value, bool) and word in CHOICES.get(where, ()):
                # YAML 1.1 reads a bare off/on as a boolean; where that word is a valid choice
                # (distill.temperature.schedule: off) the user meant the word.
                value = word
            setattr(obj, key, _coerce(value, tp, f"{source}: '{where}'"))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value (e.g. --set parallel.tp=2).")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(exc).split())}); "
                          f"quote it, e.g. --set 'run.name=\"my run\"'.") from None
    return key.strip().split("."), value


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from YAML files (later override earlier) and 'a.b=c' overrides.

    Field-level validation (types, choices, ranges) happens here; layout rules that need the world
    size happen in :func:`validate_layout`.
    """
    cfg = Config()
    for path in files:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist (pass --config with a YAML file, "
                              f"e.g. configs/tiny/teacher.yaml).")
        with open(path, "r", encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                # PyYAML's message spans lines (mark, snippet): the contract is one line.
                raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
        _apply(cfg, data, "", path)
    for text in overrides:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "", f"--set {text}")
    validate_fields(cfg)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = Config()
    _apply(cfg, data, "", source)
    validate_fields(cfg)
    return cfg


def save_resolved(cfg: Config, path: str) -> None:
    """Write the resolved YAML atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(to_yaml(cfg))
    os.replace(tmp, path)
