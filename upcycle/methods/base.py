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


def runtime_config(config: dict, spec, method: str, layers: list[dict] | dict[str, list[dict]]) -> tuple[dict, str, str]:
    """(config, Auto class, pipeline tag) of an upcycle-format checkpoint of ``spec``'s family.

    The family config plus its ``upcycle_<family>`` model_type, the runtime classes in
    ``auto_map`` (decoders: causal LM; encoders: base model, plus masked LM when the
    checkpoint has that head; CLIP: CLIPModel) and the per-layer plan the runtime's surgery
    applies (for CLIP, one per tower: ``{"text": [...], "vision": [...]}``).
    """
    from ..arch import DecoderSpec
    from ..arch.clip import ClipSpec
    from ..modeling.modeling_upcycle import CAUSAL_LM_CLASSES, CLIP_CLASSES, ENCODER_CLASSES

    if isinstance(spec, ClipSpec):
        classes, auto_class, tag = dict(CLIP_CLASSES["clip"]), "AutoModel", "zero-shot-image-classification"
        plan = {"base_model_type": "clip", "towers": layers}
    elif isinstance(spec, DecoderSpec):
        classes, auto_class, tag = {"AutoModelForCausalLM": CAUSAL_LM_CLASSES[spec.model_type]}, "AutoModelForCausalLM", "text-generation"
    else:
        classes, auto_class, tag = {"AutoModel": ENCODER_CLASSES[spec.model_type]["AutoModel"]}, "AutoModel", "feature-extraction"
        if spec.mlm_head:
            classes["AutoModelForMaskedLM"] = ENCODER_CLASSES[spec.model_type]["AutoModelForMaskedLM"]
            auto_class, tag = "AutoModelForMaskedLM", "fill-mask"
    if not isinstance(spec, ClipSpec):
        plan = {"base_model_type": spec.model_type, "layers": layers}
    main = classes[auto_class]
    config = dict(config)
    config.update(
        model_type=main.config_class.model_type,
        architectures=[main.__name__],
        auto_map={"AutoConfig": f"configuration_upcycle.{main.config_class.__name__}"} | {auto: f"modeling_upcycle.{cls.__name__}" for auto, cls in classes.items()},
        upcycle={"method": method, **plan},
    )
    return config, auto_class, tag


def native_refusal(config: dict) -> str | None:
    """Why transformers' own config class refuses ``config`` (None when it accepts it).

    LlamaConfig (transformers 5) insists on hidden_size % num_attention_heads == 0 even with
    an explicit head_dim; Mistral, Qwen2 and Qwen3 accept any head count.
    """
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(**config)
    except Exception as error:  # ValueError, or huggingface_hub's StrictDataclassClassValidationError
        return " ".join(str(error).split())[-200:]
    return None
