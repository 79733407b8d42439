"""One module per conversion method; each exposes ``convert(reader, options) -> Conversion``."""

from .base import ChunkedTensor, Conversion, SourceTensor

METHODS = ("moh", "prune-heads", "gqa", "mhe", "bam", "clip-moe")

__all__ = ["ChunkedTensor", "Conversion", "METHODS", "SourceTensor"]
