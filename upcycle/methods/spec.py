"""A conversion method as one object: name, summary, citation, options, convert, card and plan table.

Each method module exports ``SPEC``, a :class:`MethodSpec`. Everything else is derived from it: the flags and
``--help`` groups of ``upcycle convert`` (one flag per field of ``options`` that carries ``help``), the check that a
flag belongs to the chosen method, a recipe's ``convert:`` section, the card's method paragraph, citation and plan
table, and ``upcycle inspect``'s plan summary (from the typed plan in ``modeling/plan.py``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

DATA_PANEL = "Seeds and calibration data"  # the --help group of the options several methods share
CALIBRATION_HELP = (
    "Calibration text for data-driven choices: a .txt or .jsonl file, a folder of them, or a text asset "
    "(asset:kjv-train, asset:python-train, ...). Repeat for a mix (see --calibration-weights)."
)
CALIBRATION_WEIGHTS_HELP = (
    "The share of --calibration-tokens each --calibration text gets, one per text in the same order "
    "(default: equal shares)."
)
CALIBRATION_TOKENS_HELP = "Tokens of calibration text to use (all texts together)."


# What an option's value names, for the code that checks and records inputs (option(role=...)):
#   input: local files or folders the conversion reads (refused as or inside OUT, checked to exist in a recipe);
#   experts: models mixed with SRC (inputs too; their Hub ids are the card's base models);
#   calibration: calibration texts, files, folders or asset:NAME (inputs too; named on the card).
ROLES = ("input", "experts", "calibration")


def option(
    default: Any = MISSING,
    *,
    help: str,
    panel: str | None = None,
    example: str | None = None,
    flag: str | None = None,
    requires: str | None = None,
    role: str | None = None,
    default_factory: Callable[[], Any] | Any = MISSING,
) -> Any:
    """A field of a method's ``Options`` that is also an ``upcycle convert`` flag and a recipe key.

    ``help``: the flag's help text; ``panel``: its ``--help`` group (default: the method's); ``example``: a valid
    value, named in the one-line error for a non-finite number; ``flag``: the flag when not ``--field-name`` (a list
    field is a repeatable flag, e.g. ``--expert`` for ``experts``); ``requires``: the field this one only applies
    with (``calibration`` for the calibration budget): given without it, it is refused in one line; ``role``: what
    the value names when it names inputs (one of :data:`ROLES`): the input checks, the recipe's file checks and the
    card find inputs by it, never by a field's name."""
    if role is not None and role not in ROLES:
        raise ValueError(f"option role {role!r} is unknown; use one of {', '.join(ROLES)}")
    metadata = {"help": help, "panel": panel, "example": example, "flag": flag, "requires": requires, "role": role}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def calibration_option() -> Any:
    """The ``calibration`` field of a method's options: a list of texts (a mix when several)."""
    return option(default_factory=list, panel=DATA_PANEL, help=CALIBRATION_HELP, role="calibration")


def calibration_weights_option() -> Any:
    """The ``calibration_weights`` field: the texts' shares of the calibration budget."""
    return option(default_factory=list, panel=DATA_PANEL, help=CALIBRATION_WEIGHTS_HELP, requires="calibration")


def calibration_tokens_option() -> Any:
    """The ``calibration_tokens`` field: the calibration budget in tokens."""
    return option(16384, panel=DATA_PANEL, help=CALIBRATION_TOKENS_HELP, requires="calibration")


def option_roles(options: Any) -> dict[str, str]:
    """Field name -> role of every option of ``options`` (a method's ``Options`` dataclass or an instance) that has
    one (:func:`option`'s ``role``)."""
    fields = dataclasses.fields(options) if dataclasses.is_dataclass(options) else ()
    return {f.name: f.metadata["role"] for f in fields if f.metadata.get("role")}


def option_flag(options: Any, name: str) -> str:
    """The ``upcycle convert`` flag of the option ``name`` (``flag=``, else ``--name-with-dashes``)."""
    found = {f.name: f for f in dataclasses.fields(options)}.get(name)
    return (found and found.metadata.get("flag")) or f"--{name.replace('_', '-')}"


def role_values(options: Any, role: str | None = None) -> dict[str, list[str]]:
    """Field name -> the values (as strings, one per path) of every option of the instance ``options`` that has a
    role (only ``role``'s when given); an option holding one path is a list of one."""
    values = {}
    for name, found in option_roles(options).items():
        if role is None or found == role:
            value = getattr(options, name)
            values[name] = [str(value)] if isinstance(value, (str, os.PathLike)) else [str(v) for v in value or []]
    return values


def literal_choices(annotation: Any) -> tuple:
    """The values a ``Literal`` annotation allows (of ``Literal[...] | None`` too); () for any other type."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(c for arg in typing.get_args(annotation) for c in literal_choices(arg))
    return ()


def check_choices(options: Any) -> None:
    """One line for an option of the instance ``options`` whose value is not among its ``Literal`` choices: the one
    check of choices, for every way options are built (flags, a recipe's section, the library)."""
    from ..errors import UpcycleError

    hints = typing.get_type_hints(type(options))
    for found in dataclasses.fields(options):
        choices, value = literal_choices(hints.get(found.name)), getattr(options, found.name)
        if choices and value is not None and value not in choices:
            flag = option_flag(type(options), found.name)
            raise UpcycleError(f"{flag} {value!r} is unknown; choose one of: {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class MethodCard:
    """What a method is called in a model card, why one would use it, and what to cite."""

    title: str
    why: str
    citations: tuple[str, ...]


@dataclass(frozen=True)
class MethodSpec:
    """One conversion method.

    ``convert(reader, options) -> Conversion`` plans the conversion; ``options`` is the dataclass its flags fill;
    ``panel`` groups its flags in ``--help``; ``example`` is one ``upcycle convert`` line; ``tunes`` says whether the
    output is a causal LM a recipe may convert to and tune; ``sources`` which families it converts.
    ``card_table(report, config)`` returns the card's plan table when the typed plan alone does not say it (plain
    outputs without a plan, extra columns); ``variants`` are other cards of the same method, chosen per report by
    ``variant``.
    """

    name: str
    summary: str
    panel: str
    options: type
    convert: Callable[..., Any]
    card: MethodCard
    example: str
    tunes: bool = True
    sources: tuple[str, ...] = ("decoder",)  # the source families it converts: decoder, encoder (BERT), clip
    card_table: Callable[[dict, dict], list[str]] | None = None
    variants: dict[str, MethodCard] = field(default_factory=dict)
    variant: Callable[[dict], str | None] | None = None

    def flags(self) -> dict[str, dataclasses.Field]:
        """The options that are ``upcycle convert`` flags, by field name."""
        return {f.name: f for f in dataclasses.fields(self.options) if "help" in f.metadata}

    def missing_requirements(self, given: set[str]) -> list[tuple[str, str]]:
        """(option, the option it requires) for each option in ``given`` whose ``requires`` is not given too."""
        flags = self.flags()
        return [
            (name, flags[name].metadata["requires"])
            for name in sorted(given)
            if name in flags and flags[name].metadata.get("requires") and flags[name].metadata["requires"] not in given
        ]

    def has_option(self, name: str) -> bool:
        return any(f.name == name for f in dataclasses.fields(self.options))

    @property
    def merges_experts(self) -> bool:
        """Whether the method takes expert checkpoints (an option of role ``experts``: their names go into the card's
        base models)."""
        return "experts" in option_roles(self.options).values()

    @property
    def reads_calibration(self) -> bool:
        """Whether the method can read calibration text (an option of role ``calibration``)."""
        return "calibration" in option_roles(self.options).values()

    def card_for(self, report: dict) -> tuple[str, MethodCard]:
        """(card key, card) of a conversion: its variant's, when ``variant`` names one for this report, else the
        method's."""
        key = self.variant(report) if self.variant else None
        return (key, self.variants[key]) if key in self.variants else (self.name, self.card)
