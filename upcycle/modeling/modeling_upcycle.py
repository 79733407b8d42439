"""Model classes of upcycled checkpoints: the family's model with the plan applied.

These files travel inside every converted checkpoint (``auto_map``), so they import
only torch, transformers and their siblings.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForZeroShotImageClassification,
    BertForMaskedLM,
    BertModel,
    CLIPModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .configuration_upcycle import (
    UpcycleBertConfig,
    UpcycleCLIPConfig,
    UpcycleLlamaConfig,
    UpcycleMistralConfig,
    UpcycleQwen2Config,
    UpcycleQwen3Config,
)
from .gated_attention import ATTENTION_NAME, register_attention
from .layer_parts import layers_of
from .surgery import apply_plan

register_attention()


def router_losses(model: nn.Module, attribute: str) -> list[torch.Tensor]:
    """The ``attribute`` (``aux_loss``: load balance, ``z_loss``) of every module of ``model`` that set one in the
    latest training forward, in module order; works through wrappers (peft, DDP) and on parts of a model."""
    return [getattr(m, attribute) for m in model.modules() if getattr(m, attribute, None) is not None]


class _UpcycleModel:
    """Mixin: build the family model, then apply the plan in ``config.upcycle``."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_plan(layers_of(self), config.upcycle, config)
        self.config._attn_implementation = ATTENTION_NAME

    def router_aux_losses(self) -> list:
        """Load-balance terms of every router from the latest training forward."""
        return router_losses(self, "aux_loss")

    def router_z_losses(self) -> list:
        """z-loss terms of every expert router from the latest training forward."""
        return router_losses(self, "z_loss")


class UpcycleLlamaForCausalLM(_UpcycleModel, LlamaForCausalLM):
    config_class = UpcycleLlamaConfig


class UpcycleMistralForCausalLM(_UpcycleModel, MistralForCausalLM):
    config_class = UpcycleMistralConfig


class UpcycleQwen2ForCausalLM(_UpcycleModel, Qwen2ForCausalLM):
    config_class = UpcycleQwen2Config


class UpcycleQwen3ForCausalLM(_UpcycleModel, Qwen3ForCausalLM):
    config_class = UpcycleQwen3Config


class UpcycleBertModel(_UpcycleModel, BertModel):
    config_class = UpcycleBertConfig


class UpcycleBertForMaskedLM(_UpcycleModel, BertForMaskedLM):
    config_class = UpcycleBertConfig


class UpcycleCLIPModel(CLIPModel):
    """CLIPModel with the plan applied to both towers (``config.upcycle["towers"]``: per-layer plans of each)."""

    config_class = UpcycleCLIPConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        towers = config.upcycle["towers"]
        for name, tower, tower_config in (
            ("text", self.text_model, config.text_config),
            ("vision", self.vision_model, config.vision_config),
        ):
            apply_plan(tower.encoder.layers, {"layers": towers[name]}, tower_config)

    def router_aux_losses(self) -> list:
        """Load-balance terms of every expert router from the latest training forward."""
        return router_losses(self, "aux_loss")


CAUSAL_LM_CLASSES = {
    cls.config_class.model_type.removeprefix("upcycle_"): cls
    for cls in (UpcycleLlamaForCausalLM, UpcycleMistralForCausalLM, UpcycleQwen2ForCausalLM, UpcycleQwen3ForCausalLM)
}
ENCODER_CLASSES = {"bert": {"AutoModel": UpcycleBertModel, "AutoModelForMaskedLM": UpcycleBertForMaskedLM}}
CLIP_CLASSES = {"clip": {"AutoModel": UpcycleCLIPModel, "AutoModelForZeroShotImageClassification": UpcycleCLIPModel}}


def register_auto_classes() -> None:
    """Make the Auto classes load upcycled folders without ``trust_remote_code``."""
    for cls in CAUSAL_LM_CLASSES.values():
        AutoConfig.register(cls.config_class.model_type, cls.config_class, exist_ok=True)
        AutoModelForCausalLM.register(cls.config_class, cls, exist_ok=True)
    autos = {
        "AutoModel": AutoModel,
        "AutoModelForMaskedLM": AutoModelForMaskedLM,
        "AutoModelForZeroShotImageClassification": AutoModelForZeroShotImageClassification,
    }
    for classes in (*ENCODER_CLASSES.values(), *CLIP_CLASSES.values()):
        AutoConfig.register(
            classes["AutoModel"].config_class.model_type, classes["AutoModel"].config_class, exist_ok=True
        )
        for auto, cls in classes.items():
            autos[auto].register(cls.config_class, cls, exist_ok=True)
