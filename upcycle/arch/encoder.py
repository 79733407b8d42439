"""BERT-style encoders: per-layer attention tensor names, with or without the ``bert.`` prefix.

BertModel checkpoints (e.g. sentence-transformers' all-MiniLM-L6-v2) name their tensors
``encoder.layer.{i}...``; checkpoints with a task head (BertForMaskedLM, ...) prefix them
with ``bert.``. The projections are called by the decoder names (q_proj, k_proj, v_proj,
o_proj) so that methods handle both kinds of model the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UpcycleError
from .decoder import AttentionShape, config_int

ENCODER_FAMILIES = ("bert",)
PROJECTIONS = {
    "q_proj": "attention.self.query",
    "k_proj": "attention.self.key",
    "v_proj": "attention.self.value",
    "o_proj": "attention.output.dense",
}


@dataclass(frozen=True)
class EncoderSpec(AttentionShape):
    """Shapes and tensor names of a BERT-style encoder read from its config.json and tensor names."""

    prefix: str = ""  # "bert." or ""
    mlm_head: bool = False  # the checkpoint has a masked-LM head (cls.predictions.*)

    def layer_prefix(self, layer: int) -> str:
        return f"{self.prefix}encoder.layer.{layer}."

    def attention(self, layer: int, proj: str, kind: str = "weight") -> str:
        """Name of an attention projection's weight (or bias): proj in q_proj, k_proj, v_proj, o_proj."""
        return f"{self.layer_prefix(layer)}{PROJECTIONS[proj]}.{kind}"

    def layer_of(self, tensor_name: str) -> int | None:
        """The encoder layer a tensor belongs to, or None for embeddings, pooler, heads."""
        if not tensor_name.startswith(f"{self.prefix}encoder.layer."):
            return None
        return int(tensor_name.removeprefix(self.prefix).split(".")[2])


def encoder_spec(config: dict, names: list[str], source: str = "the model") -> EncoderSpec:
    """Read a supported encoder's spec from its config and tensor names, or fail naming the families."""
    model_type = config.get("model_type")
    if model_type not in ENCODER_FAMILIES:
        raise UpcycleError(
            f"{source} has model_type {model_type!r}, which is not a BERT-style encoder; "
            f"supported: {', '.join(ENCODER_FAMILIES)}"
        )
    prefix = "bert." if any(name.startswith("bert.encoder.layer.") for name in names) else ""
    if not any(name.startswith(f"{prefix}encoder.layer.") for name in names):
        raise UpcycleError(
            f"{source} is a bert config without encoder.layer.* tensors; "
            "pass a BERT checkpoint saved with save_pretrained"
        )
    heads = config_int(config, "num_attention_heads", source)
    hidden = config_int(config, "hidden_size", source)
    if hidden % heads:
        raise UpcycleError(
            f"{source}: config.json's hidden_size {hidden} is not a multiple of num_attention_heads {heads}; "
            "fix config.json or re-download the checkpoint"
        )
    return EncoderSpec(
        model_type=model_type,
        num_layers=config_int(config, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        hidden_size=hidden,
        qk_norm=False,
        prefix=prefix,
        mlm_head=any(name.startswith("cls.predictions.") for name in names),
    )
