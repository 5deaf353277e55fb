"""One dataclass -> command-line flags and environment variables, one rule.

Every field of a config dataclass is a ``--field-name`` flag and an environment
variable ``<PREFIX>FIELD_NAME``. A value comes from the command line, else the
environment, else the field's default. An empty variable is the empty string
for a string field (``PENSIEVE_OPERATOR_LIVENESS=`` turns the probe off) and
counts as unset for every other type.
The engine (``PENSIEVE_``), the router (``PENSIEVE_ROUTER_``) and the operator
(``PENSIEVE_OPERATOR_``, environment only) all load through here.

Field metadata read here: ``help``, ``choices``, ``aliases`` (extra flag names).
Types: str, int, float, bool, their ``| None`` forms, ``list[str]`` (a repeated
flag; comma-separated in the environment) and ``tuple[str, ...]`` (comma-separated).
``parsers`` maps a type to the function that reads it from text (the operator
reads its int fields as Kubernetes quantities: ``4Gi``).
Bad values raise ``ConfigError`` naming the flag or variable.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any, Callable, Mapping

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
Parsers = Mapping[type, Callable[[str], Any]]


class ConfigError(ValueError):
    """A flag or environment variable whose value cannot be read."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _unwrap(hint) -> type:
    """``int | None`` -> int; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _is_sequence(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def env_name(prefix: str, field_name: str) -> str:
    return prefix + field_name.upper()


def _parse_bool(raw: str) -> bool:
    v = raw.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"expected one of {TRUE + FALSE}")


def parse_text(hint, raw: str, parsers: Parsers | None = None):
    """Read one field's value from text (an environment variable)."""
    tp = _unwrap(hint)
    if _is_sequence(tp):
        items = [x.strip() for x in raw.split(",") if x.strip()]
        return tuple(items) if typing.get_origin(tp) is tuple else items
    if parsers and tp in parsers:
        return parsers[tp](raw)
    if tp is bool:
        return _parse_bool(raw)
    return tp(raw.strip()) if tp in (int, float) else tp(raw)


def add_flags(parser: argparse.ArgumentParser, cls, prefix: str) -> None:
    """One flag per field of ``cls``; unset flags stay None so that ``load`` can fall back."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap(hints[f.name])
        names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        default = f.default if f.default is not dataclasses.MISSING else "[]"
        kw: dict = {"dest": f.name, "default": None,
                    # argparse formats help with %: a literal % in a field's help must be doubled
                    "help": f"{f.metadata.get('help', '')} [env {env_name(prefix, f.name)}, default {default!r}]"
                    .replace("%", "%%")}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if _is_sequence(tp):
            kw.update(action="append", type=str)
        elif tp is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        else:
            kw["type"] = tp
        parser.add_argument(*names, **kw)


def load(cls, prefix: str, args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None,
         parsers: Parsers | None = None):
    """Build ``cls``: each field from ``args``, else ``<prefix>FIELD`` in ``environ``, else its default."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None) if args is not None else None
        if value is None:
            raw = environ.get(env_name(prefix, f.name))
            if raw is not None and (raw.strip() != "" or _unwrap(hints[f.name]) is str):
                value = _from_env(hints[f.name], raw, prefix, f, parsers)
        elif typing.get_origin(_unwrap(hints[f.name])) is tuple:
            value = tuple(value)
        if value is not None:
            values[f.name] = value
    return cls(**values)


def _from_env(hint, raw: str, prefix: str, f: dataclasses.Field, parsers: Parsers | None):
    name = env_name(prefix, f.name)
    try:
        value = parse_text(hint, raw, parsers)
    except ValueError as e:
        raise ConfigError(f"environment variable {name}={raw!r}: not a valid {_unwrap(hint).__name__} ({e})",
                          f.name) from None
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"environment variable {name}={raw!r}: must be one of {list(choices)}", f.name)
    return value
