"""One module per conversion method, each exporting ``SPEC`` (a :class:`MethodSpec`): the registry.

Adding a method is one file in this package and one line in ``MODULES``; a method defined elsewhere (a plugin, a test)
joins with :func:`register`.
"""

from __future__ import annotations

import importlib

from .base import ChunkedTensor, Conversion, SourceTensor
from .spec import MethodCard, MethodSpec, option

MODULES = {
    "moh": "moh",
    "prune-heads": "prune_heads",
    "gqa": "gqa",
    "mhe": "mhe",
    "bam": "bam",
    "clip-moe": "clip_moe",
}
METHODS = tuple(MODULES)
_REGISTERED: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method defined outside this package (its flags, recipe section and card follow from ``spec``)."""
    _REGISTERED[spec.name] = spec
    return spec


def method_names() -> tuple[str, ...]:
    """Every method: the bundled ones, then the registered ones."""
    return METHODS + tuple(name for name in _REGISTERED if name not in MODULES)


def method_spec(method: str) -> MethodSpec:
    """The spec of ``method`` (its module is imported on first use, so a conversion loads only its own method)."""
    from ..errors import UpcycleError

    if method in _REGISTERED:
        return _REGISTERED[method]
    if method not in MODULES:
        raise UpcycleError(f"--method {method!r} is unknown; choose one of: {', '.join(method_names())}")
    return importlib.import_module(f".{MODULES[method]}", __name__).SPEC


def all_specs() -> list[MethodSpec]:
    """The specs of every method, in :func:`method_names` order."""
    return [method_spec(name) for name in method_names()]


__all__ = [
    "ChunkedTensor",
    "Conversion",
    "METHODS",
    "MethodCard",
    "MethodSpec",
    "SourceTensor",
    "all_specs",
    "method_names",
    "method_spec",
    "option",
    "register",
]
