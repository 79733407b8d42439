"""The runtime that travels with converted checkpoints (torch + transformers only)."""

from .configuration_upcycle import CONFIG_CLASSES
from .modeling_upcycle import CAUSAL_LM_CLASSES, ENCODER_CLASSES, register_auto_classes
from .routers import LearnedRouter, QueryNormRouter

register_auto_classes()

__all__ = [
    "CAUSAL_LM_CLASSES",
    "CONFIG_CLASSES",
    "ENCODER_CLASSES",
    "LearnedRouter",
    "QueryNormRouter",
    "register_auto_classes",
]
