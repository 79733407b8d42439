"""The runtime that travels with converted checkpoints (torch + transformers only).

Importing this package is light (``upcycle.modeling.plan`` is stdlib only); the names below import their module on
first use, and the model classes register with the Auto classes (``import upcycle`` arranges it on the first Auto
lookup of an upcycled model type; ``register_auto_classes()`` does it at once).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CAUSAL_LM_CLASSES": "modeling_upcycle",
    "CONFIG_CLASSES": "configuration_upcycle",
    "ENCODER_CLASSES": "modeling_upcycle",
    "LearnedRouter": "routers",
    "QueryNormRouter": "routers",
    "register_auto_classes": "modeling_upcycle",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
