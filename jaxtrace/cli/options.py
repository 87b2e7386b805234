"""Command-line options derived from the config dataclasses (`jaxtrace.core.options.option` fields): one flag per
field, with its default, choices and help, and the record rebuilt from the parsed flags."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

_SCALARS = {"int": int, "float": float, "str": str}


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _dest(cls: type, field: dataclasses.Field) -> str:
    return f"{cls.__name__}.{field.name}"


def _parser(field: dataclasses.Field, default: Any):
    """The function turning the flag's text into the field's value, with argparse's error on bad text."""
    parse = field.metadata.get("parse")
    if parse is None:
        if default is not None:
            parse = type(default)
        else:  # an optional field: the scalar type of its annotation, e.g. "int | None"
            names = [t.strip() for t in str(field.type).split("|") if t.strip() != "None"]
            parse = _SCALARS.get(names[0], str) if len(names) == 1 else str

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            message = str(error) if parse not in _SCALARS.values() else f"expected {parse.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def add_options(parser: argparse.ArgumentParser, cls: type, title: str, defaults: dict | None = None,
                exclude: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass `cls`, in an argument group `title`. `defaults` overrides field defaults
    (an override of None makes the flag optional); a field whose default is None although its type does not admit
    None is a required flag."""
    group = parser.add_argument_group(title)
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        default = defaults.get(field.name, field.default)
        help_text = field.metadata.get("help", "")
        if default is not None and not isinstance(default, bool):
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        if hints[field.name] is bool:  # --flag, and --no-flag where it is on by default
            group.add_argument(_flag(field), dest=_dest(cls, field), default=default, help=help_text,
                               action=argparse.BooleanOptionalAction if default else "store_true")
            continue
        required = default is None and type(None) not in typing.get_args(hints[field.name]) \
            and field.name not in defaults
        choices = field.metadata.get("choices")
        group.add_argument(_flag(field), dest=_dest(cls, field), default=default, required=required,
                           type=_parser(field, field.default), choices=choices, help=help_text,
                           metavar=None if choices else field.name.upper())


def from_args(cls: type, args: argparse.Namespace, **overrides):
    """The record of class `cls` from the parsed flags (fields without a flag keep their defaults)."""
    values = {f.name: getattr(args, _dest(cls, f)) for f in dataclasses.fields(cls) if hasattr(args, _dest(cls, f))}
    return cls(**{**values, **overrides})


def given(cls: type, args: argparse.Namespace, name: str) -> Any:
    """The value of one field's flag."""
    return getattr(args, f"{cls.__name__}.{name}")
