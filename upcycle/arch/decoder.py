"""LLaMA-family decoders: llama, mistral, qwen2, qwen3 share one tensor layout."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UpcycleError

DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class AttentionShape:
    """The attention shapes every family spec has."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    qk_norm: bool


@dataclass(frozen=True)
class DecoderSpec(AttentionShape):
    """Shapes and tensor names of a LLaMA-family decoder read from its config.json."""

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def attention(self, layer: int, proj: str, kind: str = "weight") -> str:
        """Name of an attention projection's weight (or bias): proj in q_proj, k_proj, v_proj, o_proj."""
        return f"model.layers.{layer}.self_attn.{proj}.{kind}"

    def layer_of(self, tensor_name: str) -> int | None:
        """The decoder layer a tensor belongs to, or None for embeddings, final norm, head."""
        if not tensor_name.startswith("model.layers."):
            return None
        return int(tensor_name.split(".")[2])


def decoder_spec(config: dict, source: str = "the model") -> DecoderSpec:
    """Read a supported decoder's spec, or fail naming the supported families."""
    model_type = config.get("model_type")
    if model_type not in DECODER_FAMILIES:
        raise UpcycleError(
            f"{source} has model_type {model_type!r}, which upcycle cannot convert yet; supported: {', '.join(DECODER_FAMILIES)}"
        )
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return DecoderSpec(
        model_type=model_type,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        hidden_size=hidden,
        qk_norm=model_type == "qwen3",
    )
