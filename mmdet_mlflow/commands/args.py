"""What every command's arguments share: a strict boolean, and options made from a dataclass.

Azure ML passes booleans as text (``true``/``false``/``True``); a typo such as ``ture`` must be an
error, never silently false (that would turn a dry run into a real registration).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Mapping

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def boolean(text: Any) -> bool:
    """``true``/``false`` (and 1/0, yes/no, on/off, any case) -> bool; anything else is an
    argparse error naming the value."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use true or false)")


boolean.__name__ = "boolean"  # argparse names the type in its error message


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def field_type(field: dataclasses.Field, owner: type):
    """The argparse type of a dataclass field: int, float, str, boolean or json_object."""
    hint = typing.get_type_hints(owner).get(field.name, str)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), str)
    if typing.get_origin(hint) in (dict, Mapping) or hint is dict:
        return json_object
    return {bool: boolean, int: int, float: float}.get(hint, str)


def has_default(field: dataclasses.Field) -> bool:
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING


def add_dataclass_arguments(parser, cls, helps: Mapping[str, str] | None = None,
                            skip: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> None:
    """One ``--option`` per field of ``cls``: typed from the annotation, required when the field
    has no default (unless named in ``optional``), default None so that only given values
    override the dataclass's own defaults (see ``dataclass_values``)."""
    helps = helps or {}
    instance_defaults = {f.name: f.default for f in dataclasses.fields(cls)
                         if f.default is not dataclasses.MISSING}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = field_type(f, cls)
        text = helps.get(f.name, f.name.replace("_", " "))
        default = instance_defaults.get(f.name)
        if default is not None and "default" not in text:
            text = f"{text} (default: {default})"
        metavar = {int: "N", float: "F", boolean: "BOOL", json_object: "JSON"}.get(kind, "S")
        required = not has_default(f) and f.name not in optional
        parser.add_argument(option_name(f.name), dest=f.name, type=kind, default=None,
                            required=required, metavar=metavar, help=text)


def dataclass_values(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}
