"""Config classes of upcycled models: the base family's config plus an ``upcycle`` block.

Each keeps every field of its family and a model_type of its own, so that plain
transformers refuses to load an upcycled folder as a dense model (which would
silently drop the surgery) unless ``trust_remote_code=True`` or ``import upcycle``.
"""

from __future__ import annotations

from transformers import BertConfig, CLIPConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


class UpcycleLlamaConfig(LlamaConfig):
    model_type = "upcycle_llama"


class UpcycleMistralConfig(MistralConfig):
    model_type = "upcycle_mistral"


class UpcycleQwen2Config(Qwen2Config):
    model_type = "upcycle_qwen2"


class UpcycleQwen3Config(Qwen3Config):
    model_type = "upcycle_qwen3"


class UpcycleBertConfig(BertConfig):
    model_type = "upcycle_bert"


class UpcycleCLIPConfig(CLIPConfig):
    model_type = "upcycle_clip"


CONFIG_CLASSES = {
    cls.model_type.removeprefix("upcycle_"): cls
    for cls in (
        UpcycleLlamaConfig,
        UpcycleMistralConfig,
        UpcycleQwen2Config,
        UpcycleQwen3Config,
        UpcycleBertConfig,
        UpcycleCLIPConfig,
    )
}
