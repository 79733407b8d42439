"""What a change of a layer is, and the registry of the changes a plan may name (standard library only).

:mod:`.plan` defines upcycle's own changes and reads plans; a change defined elsewhere (in its own module under
``modeling/`` or outside the package) subclasses :class:`Change` and is given to :func:`register_change`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class PlanError(ValueError):
    """A plan this runtime cannot apply."""


UPGRADE = (
    "the checkpoint was written by a newer upcycle than the runtime loading it: upgrade upcycle "
    "(pip install -U upcycle) or load it with its own runtime files (trust_remote_code=True)"
)


@dataclass(frozen=True)
class Change:
    """One change of a layer (``KEY`` and ``COLUMNS`` are class attributes, not fields). ``KEY`` names it in the JSON
    plan; :meth:`apply` makes it on a layer; ``COLUMNS`` / :meth:`cells` are its columns in the card's plan table,
    :meth:`describe` its line in ``upcycle inspect``."""

    KEY = ""
    COLUMNS = ()

    @classmethod
    def from_json(cls, value: object, where: str) -> Change:
        if not isinstance(value, dict):
            raise PlanError(f"{where}: {cls.KEY} must be a JSON object, got {type(value).__name__}; {UPGRADE}")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown, missing = sorted(set(value) - names), sorted(names - set(value))
        if unknown or missing:
            problem = f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}"
            raise PlanError(f"{where}: {cls.KEY} has {problem}; {UPGRADE}")
        return cls(**value)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def apply(self, layer, config) -> None:
        """Rebuild ``layer`` (a decoder, BERT or CLIP-tower layer of a freshly built model, on any device, meta
        included) with this change; ``config`` is the model's config (a tower's for CLIP). The weights of the new
        modules come from the checkpoint afterwards, or from the method that converts."""
        raise NotImplementedError  # every registered change defines it (register_change checks)

    def describe(self) -> str:
        """One line for ``upcycle inspect``."""
        raise NotImplementedError  # every registered change defines it (register_change checks)

    def cells(self) -> tuple:
        """The change's cells in the card's plan table, one per ``COLUMNS`` entry."""
        raise NotImplementedError  # every registered change defines it (register_change checks)


REQUIRED = ("apply", "cells", "describe")  # what a change defines (abc and inspect stay out of the runtime's imports)


CHANGES: dict[str, type[Change]] = {}  # KEY -> class, in reading order: the FFN, the block, then the attention


def register_change(change: type[Change]) -> type[Change]:
    """Make ``change`` (a :class:`Change` subclass with its own ``KEY``) known to plans: parsed, applied, shown.
    It comes after the changes registered before it in a layer's reading order. Usable as a class decorator."""
    if not (isinstance(change, type) and issubclass(change, Change)) or not change.KEY:
        raise TypeError(f"{change!r} is not a Change subclass with a KEY; subclass upcycle.modeling.plan.Change")
    if CHANGES.get(change.KEY, change) is not change:
        raise ValueError(f"a change named {change.KEY!r} is registered already ({CHANGES[change.KEY].__qualname__})")
    missing = ", ".join(name for name in REQUIRED if getattr(change, name) is getattr(Change, name))
    if missing:
        raise TypeError(f"{change.__qualname__} does not define {missing}; a change defines apply, describe and cells")
    CHANGES[change.KEY] = change
    return change
