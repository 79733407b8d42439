"""What every method hands the conversion pipeline."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..checkpoint.reader import CheckpointReader, refuse_remote_code
from ..checkpoint.writer import TensorSpec

if TYPE_CHECKING:
    import torch

    from ..modeling.plan import LayerPlan
else:
    from ..lazy import torch


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
    file_names: Callable[[dict[str, tuple]], dict[str, tuple]] | None = (
        None  # model parameter shapes -> file tensor shapes, when they differ (Mixtral)
    )
    description: str = ""
    uses_runtime: bool = True
    auto_class: str = "AutoModelForCausalLM"  # how the output loads (model card)
    pipeline_tag: str = "text-generation"
    # work that decides only config, plan_lines and report (no tensor), run beside the tensor copies: the pipeline
    # calls settle() once the tensors are written (at once for --dry-run) and only then prints the plan
    settle: Callable[[], None] | None = None


def progress(items: Iterable, label: str, *, unit: str = "it") -> Iterable:
    """``items`` with a tqdm bar on stderr (``label: 40%|...| 2/5 layers``): what every calibration pass, fit and
    scoring loop of a method reports while it runs, in logs too."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=label, unit=f" {unit}s", file=sys.stderr)


def source_layout(reader: CheckpointReader) -> list[TensorSpec]:
    """Every tensor of the source as it is (name, dtype, shape): the layout a method starts from."""
    return [TensorSpec(name, reader.info(name).dtype, tuple(reader.info(name).shape)) for name in reader.names()]


def source_parameters(reader: CheckpointReader) -> int:
    """How many parameters the source holds (what loading it for a calibration pass needs room for)."""
    return sum(math.prod(reader.info(name).shape) for name in reader.names())


def check_source(reader: CheckpointReader, spec, options=None) -> None:
    """What every method runs at plan time on each checkpoint it reads (SRC, each expert), before reading a weight.

    A config.json or tokenizer_config.json whose ``auto_map`` names code other than upcycle's runtime is refused
    unless the options say ``trust_remote_code`` (the code is never run, nor copied into the output); every standard
    tensor must have the shape config.json implies, and every layer the tensors it must have
    (``arch.shapes.check_shapes``), so that a corrupted tensor or an edited config is one line naming the tensor and
    both shapes instead of a silently wrong model.
    """
    from ..arch.shapes import check_shapes

    refuse_remote_code(reader.folder, reader.config, bool(getattr(options, "trust_remote_code", False)))
    check_shapes(reader, spec)
    if getattr(options, "calibration", None) or getattr(options, "calibration_weights", None):
        from ..data.calibration import check_calibration

        check_calibration(options.calibration, options.calibration_weights)


def recorded_options(options) -> dict:
    """The options as the report (and the card) record them: the method's settings, not the permission flags (paths
    as text; no calibration text is None)."""
    from dataclasses import asdict

    recorded = {key: value for key, value in asdict(options).items() if key != "trust_remote_code"}
    if "calibration" in recorded:
        from ..data.calibration import calibration_texts

        recorded["calibration"] = calibration_texts(recorded["calibration"]) or None
    return recorded


AUTO_MAPPINGS = {
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModel": "MODEL_MAPPING_NAMES",
}


def plain_config(config: dict, auto_class: str = "AutoModelForCausalLM") -> dict:
    """The config of a plain checkpoint of the base family (loads with transformers alone): no ``auto_map``, which
    would name code the output does not have, and ``architectures`` a transformers class (the family's, when the source
    named its own)."""
    import transformers
    from transformers.models.auto import modeling_auto

    config = {key: value for key, value in config.items() if key != "auto_map"}
    names = config.get("architectures") or []
    if any(not hasattr(transformers, str(name)) for name in names):
        mapping = getattr(modeling_auto, AUTO_MAPPINGS.get(auto_class, "MODEL_MAPPING_NAMES"), {})
        family = mapping.get(config.get("model_type"))
        config["architectures"] = (
            [family] if isinstance(family, str) else [name for name in names if hasattr(transformers, str(name))]
        )
    return config


def runtime_config(
    config: dict, spec, method: str, layers: list[LayerPlan] | dict[str, list[LayerPlan]]
) -> tuple[dict, str, str]:
    """(config, Auto class, pipeline tag) of an upcycle-format checkpoint of ``spec``'s family.

    The family config plus its ``upcycle_<family>`` model_type, the runtime classes in
    ``auto_map`` (decoders: causal LM; encoders: base model, plus masked LM when the
    checkpoint has that head; CLIP: CLIPModel) and the per-layer plan the runtime's surgery
    applies (for CLIP, one per tower: ``{"text": [...], "vision": [...]}``).
    """
    from ..arch import DecoderSpec
    from ..arch.clip import ClipSpec
    from ..auto_registration import RUNTIME_CLASSES
    from ..modeling.plan import plans_json

    family = "clip" if isinstance(spec, ClipSpec) else spec.model_type
    config_class, models = RUNTIME_CLASSES[family]
    if isinstance(spec, ClipSpec):
        classes, auto_class, tag = dict(models), "AutoModel", "zero-shot-image-classification"
        plan = {"base_model_type": "clip", "towers": {name: plans_json(tower) for name, tower in layers.items()}}
    elif isinstance(spec, DecoderSpec):
        classes, auto_class, tag = dict(models), "AutoModelForCausalLM", "text-generation"
    else:
        classes, auto_class, tag = {"AutoModel": models["AutoModel"]}, "AutoModel", "feature-extraction"
        if spec.mlm_head:
            classes["AutoModelForMaskedLM"] = models["AutoModelForMaskedLM"]
            auto_class, tag = "AutoModelForMaskedLM", "fill-mask"
    if not isinstance(spec, ClipSpec):
        plan = {"base_model_type": spec.model_type, "layers": plans_json(layers)}
    config = dict(config)
    config.update(
        model_type=f"upcycle_{family}",
        architectures=[classes[auto_class]],
        auto_map={"AutoConfig": f"configuration_upcycle.{config_class}"}
        | {auto: f"modeling_upcycle.{name}" for auto, name in classes.items()},
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
