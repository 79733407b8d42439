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


def config_int(config: dict, key: str, source: str, default: int | None = None) -> int:
    """A positive integer of config.json (``default`` when the key is absent or null), or one line naming the key."""
    value = config.get(key)
    if value is None:
        if default is not None:
            return default
        raise UpcycleError(f"{source}: config.json has no {key}; fix config.json or re-download the checkpoint")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise UpcycleError(
            f"{source}: config.json's {key} is {value!r}, not a positive whole number; "
            "fix config.json or re-download the checkpoint"
        )
    return int(value)


def decoder_spec(config: dict, source: str = "the model") -> DecoderSpec:
    """Read a supported decoder's spec, or fail naming the supported families (or the config value that is wrong)."""
    model_type = config.get("model_type")
    if model_type not in DECODER_FAMILIES:
        raise UpcycleError(
            f"{source} has model_type {model_type!r}, which upcycle cannot convert yet; "
            f"supported: {', '.join(DECODER_FAMILIES)}"
        )
    heads = config_int(config, "num_attention_heads", source)
    hidden = config_int(config, "hidden_size", source)
    kv_heads = config_int(config, "num_key_value_heads", source, default=heads)
    if heads % kv_heads:
        raise UpcycleError(
            f"{source}: config.json's num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}; "
            "fix config.json or re-download the checkpoint"
        )
    if config.get("head_dim") is None and hidden % heads:
        raise UpcycleError(
            f"{source}: config.json's hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
            "and there is no "
            "head_dim; fix config.json or re-download the checkpoint"
        )
    return DecoderSpec(
        model_type=model_type,
        num_layers=config_int(config, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=config_int(config, "head_dim", source, default=hidden // heads),
        hidden_size=hidden,
        qk_norm=model_type == "qwen3",
    )
