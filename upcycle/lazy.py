"""torch, imported on first use: the command line (``--help``, ``recipes``, ``inspect``) starts without it.

Library modules that the command line imports write ``from upcycle.lazy import torch`` (under ``TYPE_CHECKING``:
``import torch``) and use it as usual; the first attribute read imports the real module. Nothing in this module
imports torch by itself; ``tests/test_startup.py`` checks that the light commands never do.
"""

from __future__ import annotations

import functools
import importlib
import types
from collections.abc import Callable
from typing import TypeVar

Function = TypeVar("Function", bound=Callable)


class LazyModule(types.ModuleType):
    """A stand-in for the module ``name``: the first attribute read imports it and copies its namespace in."""

    def __getattr__(self, attribute: str):
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads are plain lookups
        return getattr(module, attribute)


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
F = LazyModule("torch.nn.functional")


def no_grad(function: Function) -> Function:
    """``@torch.no_grad()`` that imports torch when ``function`` is called, not when it is defined."""

    @functools.wraps(function)
    def without_gradients(*args, **kwargs):
        with torch.no_grad():
            return function(*args, **kwargs)

    return without_gradients  # type: ignore[return-value]
