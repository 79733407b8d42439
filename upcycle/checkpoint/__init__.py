"""Streaming reads and writes of Hugging Face checkpoints."""

from upcycle.checkpoint.reader import CheckpointReader, TensorInfo
from upcycle.checkpoint.source import resolve_source
from upcycle.checkpoint.writer import ShardedWriter, TensorSpec, atomic_output, copy_support_files, parse_size

__all__ = [
    "CheckpointReader",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "atomic_output",
    "copy_support_files",
    "parse_size",
    "resolve_source",
]
