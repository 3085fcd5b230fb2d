"""The argument parser behind every ``gam`` command.

On top of argparse: errors are one line that names the flag ("--lr: cannot
read 'abc' as a float"), an unknown option suggests the closest valid ones,
and the fields of a config dataclass become options (``--n-layer 4``) whose
help is the field's one-line meaning and default, so the help cannot drift
from the dataclass. Imports no torch: ``gam --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Callable, Iterable

from gam.config import field_meaning


class UsageError(ValueError):
    """Bad command-line input; ``prog`` is the (sub-)command that rejected it."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


def closest(word: str, options: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(options), n=n, cutoff=0.6)


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors raise UsageError (``gam.cli.main`` prints one
    line and exits 2) and whose leaf commands reject unknown options with suggestions.
    Sub-parsers inherit the class (argparse's add_subparsers default)."""

    def error(self, message: str) -> typing.NoReturn:
        # argparse says "argument --lr: ..."; the flag alone reads better
        message = message.removeprefix("argument ")
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:  # a mistyped command: gam trian -> did you mean train?
            near = closest(choice[1], [c.strip(" '") for c in choice[2].split(",")])
            if near:
                message = message[:choice.start(2) - len("(choose from ")] + f"(did you mean {' or '.join(near)}?)"
        if choice or "the following arguments are required" in message:
            message += f"; see {self.prog} --help"
        raise UsageError(self.prog, message)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        # A parser with sub-commands hands unknown words to the chosen one; a leaf
        # command that takes free-form overrides (``accepts_overrides``) keeps them.
        if extras and self._subparsers is None and not getattr(namespace, "accepts_overrides", False):
            self.error(self.unknown_message(extras))
        return namespace, extras

    def option_names(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings if s.startswith("--")]

    def unknown_message(self, extras: list[str]) -> str:
        options = [t.partition("=")[0] for t in extras if t.startswith("-")]
        if not options:
            return f"unexpected argument(s): {' '.join(extras)}"
        parts = []
        names = {name.removeprefix("--"): name for name in self.option_names()}
        for option in options:
            # compared without the "--", which would make every pair look alike
            near = [names[n] for n in closest(option.lstrip("-"), names)]
            parts.append(f"{option}" + (f" (did you mean {' or '.join(near)}?)" if near else ""))
        return f"unknown option {', '.join(parts)}; see {self.prog} --help"


# --------------------------------------------------------------------------- dataclass fields as options

def _kinds(annotation: Any) -> tuple[type, ...]:
    """``int | None`` -> (int, NoneType); ``float`` -> (float,)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


_KIND_NAMES = {int: "an integer", float: "a float", str: "text", bool: "true or false"}
_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL"}


def _list_of(kind: Any) -> type | None:
    """``tuple[int, ...]`` -> int (a comma-separated list on the command line); else None."""
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        return args[0] if args else str
    return None


def field_value_reader(annotation: Any, choices: tuple[str, ...] | None = None) -> Callable[[str], Any]:
    """The argparse ``type=`` for a field: the text -> the field's type, or a message
    such as "cannot read 'abc' as a float" (argparse puts the flag in front).
    A ``tuple[X, ...]`` field reads comma-separated values of X; ``choices`` limits
    the values (each item of a list) to those names."""
    kinds = _kinds(annotation)

    def check_choice(value: Any) -> Any:
        if choices is not None and value not in choices:
            near = closest(str(value), choices)
            raise argparse.ArgumentTypeError(
                f"{value!r} is not one of {', '.join(choices)}" + (f" (did you mean {' or '.join(near)}?)" if near else ""))
        return value

    def read(text: str) -> Any:
        if text.lower() == "none" and type(None) in kinds:
            return None
        for kind in kinds:
            item = _list_of(kind)
            if item is not None:
                parts = [p.strip() for p in text.split(",") if p.strip()]
                if not parts:
                    raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
                read_item = field_value_reader(item, choices)
                return tuple(read_item(p) for p in parts)
            if kind is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
            elif kind in (int, float, str):
                try:
                    value = kind(text)
                except ValueError:
                    continue
                return check_choice(value)
        wanted = " or ".join(_KIND_NAMES.get(_list_of(k) or k, "none") + (" list" if _list_of(k) else "")
                             if k is not type(None) else "none" for k in kinds)
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as {wanted}")

    return read


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or flag(field.name)


def show(value: Any) -> str:
    """A default as the user would type it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(show(v) for v in value)
    return str(value)


def add_field_arguments(parser: argparse.ArgumentParser, title: str, config_class: type,
                        presets: dict[str, dict[str, Any]] | None = None) -> None:
    """One option per field of ``config_class``, in an argument group ``title``.

    Options default to ``argparse.SUPPRESS``: only the fields the user gives show up in
    the parsed namespace, so they override a preset without being confused with it.
    ``presets``: name -> that preset's values for this class; each field's help names
    the presets that change its default."""
    hints = typing.get_type_hints(config_class)
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(config_class):
        if not field.init or "help" not in field.metadata:
            continue  # set by code, not from the command line
        kinds = _kinds(hints[field.name])
        changed = [f"{name} preset: {show(values[field.name])}" for name, values in (presets or {}).items()
                   if field.name in values and values[field.name] != field.default]
        default = field.default if field.default is not dataclasses.MISSING else None
        choices = field.metadata.get("choices")
        text = f"{field_meaning(field)}" + (f" [{' | '.join(choices)}]" if choices else "")
        if not (default is None and "default" in text and not changed):  # a meaning that says its own default
            text += f" (default: {'; '.join([show(default), *changed])})"
        extra: dict[str, Any] = {"nargs": "?", "const": True} if bool in kinds else {}
        item = _list_of(kinds[0])
        metavar = (_METAVARS.get(item, "VALUE") + ",...") if item else _METAVARS.get(kinds[0], "VALUE")
        group.add_argument(field_flag(field), dest=field.name, type=field_value_reader(hints[field.name], choices),
                           default=argparse.SUPPRESS, metavar=metavar, help=text.replace("%", "%%"), **extra)


def fields_markdown(config_class: type, presets: dict[str, dict[str, Any]]) -> str:
    """The same descriptions as a markdown table (docs/cli.md holds them; a test checks they
    match). A preset's column shows the values it changes; blank is the default."""
    hints = typing.get_type_hints(config_class)
    rows = ["| option | type | default | " + " | ".join(f"`{name}` preset" for name in presets) + " | meaning |",
            "|---|---|---|" + "---|" * len(presets) + "---|"]
    for field in dataclasses.fields(config_class):
        kinds = _kinds(hints[field.name])
        kind = _METAVARS.get(kinds[0], "VALUE").lower() + (" or none" if type(None) in kinds else "")
        in_presets = [f"`{show(values[field.name])}`" if values.get(field.name, field.default) != field.default
                      else "" for values in presets.values()]
        meaning = field_meaning(field).replace("|", "\\|")
        rows.append(f"| `{flag(field.name)}` | {kind} | `{show(field.default)}` | {' | '.join(in_presets)} | {meaning} |")
    return "\n".join(rows)


def given_fields(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The fields of ``config_class`` the user set on the command line."""
    values = vars(args)
    return {f.name: values[f.name] for f in dataclasses.fields(config_class) if f.name in values}
