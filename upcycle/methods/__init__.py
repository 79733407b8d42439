"""One module per conversion method; each exposes ``convert(reader, options) -> Conversion`` and ``Options``."""

from __future__ import annotations

import importlib
from types import ModuleType

from .base import ChunkedTensor, Conversion, SourceTensor

MODULES = {"moh": "moh", "prune-heads": "prune_heads", "gqa": "gqa", "mhe": "mhe", "bam": "bam", "clip-moe": "clip_moe"}
METHODS = tuple(MODULES)


def method_module(method: str) -> ModuleType:
    """The module of ``method`` (imported on first use, so a conversion loads only its own method)."""
    from ..errors import UpcycleError

    if method not in MODULES:
        raise UpcycleError(f"--method {method!r} is unknown; choose one of: {', '.join(METHODS)}")
    return importlib.import_module(f".{MODULES[method]}", __name__)


__all__ = ["ChunkedTensor", "Conversion", "METHODS", "SourceTensor", "method_module"]
