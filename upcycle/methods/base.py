"""What every method hands the conversion pipeline."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..checkpoint.writer import TensorSpec


@dataclass(frozen=True)
class SourceTensor:
    """Stands for a source tensor that goes to the output unchanged (copied file to file)."""

    name: str


@dataclass
class Conversion:
    """A planned conversion: the output's config, tensor layout and a tensor stream.

    ``tensors()`` yields ``(name, tensor)`` in ``layout`` order, one at a time, so the
    writer streams them with bounded memory; ``tensor`` is a :class:`SourceTensor` for
    a tensor copied unchanged from the source.
    """

    method: str
    config: dict
    layout: list[TensorSpec]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor | SourceTensor]]]
    plan_lines: list[str]
    report: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    description: str = ""
    uses_runtime: bool = True
    auto_class: str = "AutoModelForCausalLM"  # how the output loads (model card)
    pipeline_tag: str = "text-generation"
