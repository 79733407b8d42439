"""CLIP: a text tower and a vision tower of encoder layers, each with a CLIPMLP feed-forward (fc1, fc2)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UpcycleError

TOWERS = ("text", "vision")
TOWER_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_act")


@dataclass(frozen=True)
class ClipTower:
    """One tower's shapes."""

    name: str  # "text" or "vision"
    num_layers: int
    hidden_size: int
    intermediate_size: int

    def ffn(self, layer: int, proj: str, kind: str = "weight") -> str:
        """Name of a feed-forward tensor: proj in fc1, fc2; kind weight or bias."""
        return f"{self.name}_model.encoder.layers.{layer}.mlp.{proj}.{kind}"

    def layer_prefix(self, layer: int) -> str:
        return f"{self.name}_model.encoder.layers.{layer}."


@dataclass(frozen=True)
class ClipSpec:
    """Both towers of a CLIPModel checkpoint."""

    text: ClipTower
    vision: ClipTower

    @property
    def towers(self) -> tuple[ClipTower, ClipTower]:
        return self.text, self.vision


def clip_spec(config: dict, source: str = "the model") -> ClipSpec:
    """The towers of a CLIPModel config, or one line saying the model is not CLIP."""
    if config.get("model_type") != "clip":
        raise UpcycleError(
            f"{source} has model_type {config.get('model_type')!r}, not 'clip'; "
            "--method clip-moe needs a CLIPModel checkpoint"
        )
    from transformers import CLIPConfig

    try:
        parsed = CLIPConfig.from_dict(config)  # fills the towers' defaults
    except Exception as error:  # ValueError, TypeError, or huggingface_hub's strict-dataclass validation error
        raise UpcycleError(
            f"{source}: transformers refuses its CLIP config.json ({' '.join(str(error).split())[:200]}); "
            "fix config.json or re-download the checkpoint"
        ) from None
    towers = {}
    for name in TOWERS:
        sub = getattr(parsed, f"{name}_config")
        values = {}
        for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
            value = getattr(sub, key, None)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UpcycleError(
                    f"{source}: config.json's {name}_config.{key} is {value!r}, not a positive whole number; "
                    "fix config.json or re-download the checkpoint"
                )
            values[key] = value
        towers[name] = ClipTower(name, values["num_hidden_layers"], values["hidden_size"], values["intermediate_size"])
    return ClipSpec(**towers)


def clip_architecture(config: dict) -> dict:
    """The values two CLIP checkpoints must share to be experts of one another (for comparisons)."""
    found = {"model_type": config.get("model_type"), "projection_dim": config.get("projection_dim")}
    for name in TOWERS:
        sub = config.get(f"{name}_config") or {}
        found |= {f"{name}_config.{key}": sub.get(key) for key in TOWER_KEYS}
    return found
