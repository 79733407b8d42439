"""One module per conversion method; each exposes ``convert(reader, options) -> Conversion``."""

from .base import Conversion, SourceTensor

METHODS = ("moh", "prune-heads", "gqa", "mhe")

__all__ = ["Conversion", "METHODS", "SourceTensor"]
