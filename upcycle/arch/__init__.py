"""Per-family specs: tensor names per layer, head counts, which classes to operate on."""

from .decoder import DECODER_FAMILIES, DecoderSpec, decoder_spec

__all__ = ["DECODER_FAMILIES", "DecoderSpec", "decoder_spec"]
