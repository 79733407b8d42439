"""What every method hands the conversion pipeline."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import TensorSpec


@dataclass(frozen=True)
class SourceTensor:
    """Stands for a source tensor that goes to the output unchanged (copied file to file).

    ``reader``: the checkpoint it comes from when not the conversion's source (e.g. another expert).
    """

    name: str
    reader: CheckpointReader | None = None


@dataclass(frozen=True)
class ChunkedTensor:
    """A new tensor produced as consecutive row chunks, so that it is never whole in memory."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]


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
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor | SourceTensor | ChunkedTensor]]]
    plan_lines: list[str]
    report: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    file_names: Callable[[dict[str, tuple]], dict[str, tuple]] | None = None  # model parameter shapes -> file tensor shapes, when they differ (Mixtral)
    description: str = ""
    uses_runtime: bool = True
    auto_class: str = "AutoModelForCausalLM"  # how the output loads (model card)
    pipeline_tag: str = "text-generation"


def runtime_config(config: dict, spec, method: str, layers: list[dict]) -> tuple[dict, str, str]:
    """(config, Auto class, pipeline tag) of an upcycle-format checkpoint of ``spec``'s family.

    The family config plus its ``upcycle_<family>`` model_type, the runtime classes in
    ``auto_map`` (decoders: causal LM; encoders: base model, plus masked LM when the
    checkpoint has that head) and the per-layer plan the runtime's surgery applies.
    """
    from ..arch import DecoderSpec
    from ..modeling.modeling_upcycle import CAUSAL_LM_CLASSES, ENCODER_CLASSES

    if isinstance(spec, DecoderSpec):
        classes, tag = {"AutoModelForCausalLM": CAUSAL_LM_CLASSES[spec.model_type]}, "text-generation"
    else:
        classes, tag = {"AutoModel": ENCODER_CLASSES[spec.model_type]["AutoModel"]}, "feature-extraction"
        if spec.mlm_head:
            classes["AutoModelForMaskedLM"], tag = ENCODER_CLASSES[spec.model_type]["AutoModelForMaskedLM"], "fill-mask"
    auto_class, main = list(classes.items())[-1]
    config = dict(config)
    config.update(
        model_type=main.config_class.model_type,
        architectures=[main.__name__],
        auto_map={"AutoConfig": f"configuration_upcycle.{main.config_class.__name__}"} | {auto: f"modeling_upcycle.{cls.__name__}" for auto, cls in classes.items()},
        upcycle={"method": method, "base_model_type": spec.model_type, "layers": layers},
    )
    return config, auto_class, tag
