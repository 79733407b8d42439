"""Per-family specs: tensor names per layer, head counts, which classes to operate on."""

from __future__ import annotations

from ..errors import UpcycleError
from .decoder import DECODER_FAMILIES, DecoderSpec, decoder_spec
from .encoder import ENCODER_FAMILIES, EncoderSpec, encoder_spec

ATTENTION_FAMILIES = DECODER_FAMILIES + ENCODER_FAMILIES


def attention_spec(config: dict, names: list[str], source: str = "the model") -> DecoderSpec | EncoderSpec:
    """The spec of any family whose attention heads upcycle can edit (decoders and BERT-style encoders)."""
    model_type = config.get("model_type")
    if model_type in ENCODER_FAMILIES:
        return encoder_spec(config, names, source)
    if model_type in DECODER_FAMILIES:
        return decoder_spec(config, source)
    raise UpcycleError(
        f"{source} has model_type {model_type!r}, which upcycle cannot convert yet; "
        f"supported: {', '.join(ATTENTION_FAMILIES)}"
    )


__all__ = [
    "ATTENTION_FAMILIES",
    "DECODER_FAMILIES",
    "DecoderSpec",
    "ENCODER_FAMILIES",
    "EncoderSpec",
    "attention_spec",
    "decoder_spec",
    "encoder_spec",
]
