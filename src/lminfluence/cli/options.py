"""Command-line flags made from the configuration dataclasses' fields: one definition per option.

Each field of a section's dataclasses becomes a flag (``--key`` with dashes, or
the name the field or section gives it) whose help is the field's help text
plus its default. Values given on the command line come back as a dict of
YAML keys per section, to be overlaid on the defaults and the ``--config`` file.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from ..workflow.config import (
    Composite,
    CorpusSection,
    FitSection,
    IndexSection,
    ModelSection,
    ScoreSection,
    flag_of,
    key_of,
)

SECTION_TYPES: dict[str, type] = {"model": ModelSection, "corpus": CorpusSection, "fit": FitSection, "score": ScoreSection, "index": IndexSection}
SHARED = frozenset({"memory_gib"})  # keys of several sections that one flag sets in each


@dataclass(frozen=True)
class Flag:
    """One option of one section on the command line."""

    section: str
    key: str  # the YAML key
    flag: str
    field: dataclasses.Field
    annotation: Any

    @property
    def dest(self) -> str:
        # an option of several sections (the memory budget) is one flag setting all of them
        return f"*:{self.key}" if self.key in SHARED else f"{self.section}:{self.key}"


def section_flags(section: str) -> list[Flag]:
    """The flags of a section, in the order its dataclasses declare their fields."""
    cls = SECTION_TYPES[section]
    if issubclass(cls, Composite):
        owners = {attr: part for attr, (part, _) in cls.PARTS.items()}
        items = [(key, f, owners[attr]) for key, (attr, f) in cls.fields().items()]
        overrides = cls.FLAGS
    else:
        items = [(key_of(f), f, cls) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        overrides = {}
    out = []
    for key, f, owner in items:
        if f.metadata.get("cli", True):
            out.append(Flag(section, key, flag_of(f, overrides), f, typing.get_type_hints(owner)[f.name]))
    return out


def _base_type(annotation: Any) -> Any:
    """The type inside ``X | None``."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1 else annotation


def _default_text(value: Any) -> str:
    if value is None or value == "" or value is False:
        return ""
    return f" (default: {','.join(value) if isinstance(value, tuple) else value})"


def _number(kind: type) -> Any:
    """Argparse's type for int/float flags, with a message naming what was expected."""

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None

    return parse


def add_section(parser: argparse.ArgumentParser, section: str) -> None:
    """Add a section's flags to ``parser`` as one argument group; unset flags stay None."""
    group = parser.add_argument_group(section)
    for fl in section_flags(section):
        if fl.key in SHARED and fl.flag in parser._option_string_actions:  # already added by another section
            continue
        base = _base_type(fl.annotation)
        default = fl.field.default
        help_text = fl.field.metadata.get("help", "") + _default_text(default)
        if base is bool:
            help_text = fl.field.metadata.get("help", "") + (f" (default: on; --no-{fl.flag[2:]} turns it off)" if default else "")
            group.add_argument(fl.flag, dest=fl.dest, action="store_true", default=None, help=help_text)
            group.add_argument("--no-" + fl.flag[2:], dest=fl.dest, action="store_false", default=None, help=argparse.SUPPRESS)
        elif get_origin(base) is Literal:  # checked by the dataclass, so the error names the option like any other
            choices = ", ".join(get_args(base))
            group.add_argument(fl.flag, dest=fl.dest, default=None, metavar="{" + choices.replace(", ", ",") + "}", help=help_text)
        elif base in (int, float):
            group.add_argument(fl.flag, dest=fl.dest, type=_number(base), default=None, metavar=base.__name__.upper(), help=help_text)
        else:  # str, and tuples of str given comma-separated (the dataclass splits them)
            group.add_argument(fl.flag, dest=fl.dest, default=None, metavar=fl.key.upper(), help=help_text)


def given(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The values of a section's flags that were given on the command line, by YAML key."""
    prefix = f"{section}:"
    keys = {fl.key for fl in section_flags(section)}
    return {
        dest.split(":", 1)[1]: value
        for dest, value in vars(args).items()
        if value is not None and (dest.startswith(prefix) or (dest.startswith("*:") and dest[2:] in keys))
    }


__all__ = ["Flag", "section_flags", "add_section", "given", "SECTION_TYPES"]
