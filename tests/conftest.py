"""Tiny models of every supported family, built from a config (no downloads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

if (
    shutil.which("nvidia-smi") is None
):  # no GPU: Triton kernels run in its interpreter (set before anything imports triton)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(125)]
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=len(VOCAB),
    max_position_embeddings=256,
    eos_token_id=1,
    pad_token_id=0,
    bos_token_id=None,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. w124``."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (``<pad>``, ``</s>``, then one token per byte, no merges): any text, real distinctions
    between texts, a vocabulary of 258 for tiny models."""
    from tokenizers import decoders
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1} | {symbol: i + 2 for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>")


BYTE_VOCAB = 258


def build_dense(folder: Path, family: str = "llama", seed: int = 0, *, text: bool = False, **overrides) -> Path:
    """Save a tiny random dense model (and a tokenizer) of ``family`` into ``folder``; ``text``: with the byte-level
    tokenizer (any English text) instead of the ``w0 .. w124`` word tokenizer."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    size = {"vocab_size": BYTE_VOCAB, "max_position_embeddings": 1024} if text else {}
    model = model_cls(config_cls(**(COMMON | extra | size | overrides)))
    model.save_pretrained(folder)
    (byte_tokenizer() if text else tiny_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture
def dense(tmp_path: Path) -> Path:
    return build_dense(tmp_path / "dense")


@pytest.fixture
def calibration_file(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(1)
    words = torch.randint(3, len(VOCAB), (4000,), generator=generator).tolist()
    docs = [" ".join(VOCAB[w] for w in words[i : i + 200]) for i in range(0, len(words), 200)]
    path = tmp_path / "calibration.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(125)]
BERT_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    vocab_size=len(BERT_VOCAB),
    max_position_embeddings=256,
    type_vocab_size=2,
    pad_token_id=0,
)


def tiny_bert_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer over ``w0 .. w124`` with [CLS], [SEP] and [MASK]."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(BERT_VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_bert(folder: Path, mlm: bool = False, seed: int = 0, **overrides) -> Path:
    """Save a tiny random BERT.

    BertModel (tensors without prefix, like all-MiniLM-L6-v2) or BertForMaskedLM (``bert.`` prefix)."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(**(BERT_COMMON | overrides))
    model = BertForMaskedLM(config) if mlm else BertModel(config)
    model.save_pretrained(folder)
    tiny_bert_tokenizer().save_pretrained(folder)
    return folder


CLIP_TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CLIP_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
)


def build_clip(folder: Path, seed: int = 0, ffn_noise: float = 0.0, base: Path | None = None, **overrides) -> Path:
    """Save a tiny random CLIPModel.

    With ``base``, a copy of that model whose FFN weights get ``ffn_noise`` (an MCL-stage stand-in)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    if base is not None:
        model = CLIPModel.from_pretrained(base)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".mlp." in name:
                    param.add_(ffn_noise * torch.randn_like(param))
    else:
        text, vision = CLIP_TEXT | overrides.pop("text", {}), CLIP_VISION | overrides.pop("vision", {})
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, **overrides))
    model.save_pretrained(folder)
    return folder


# --- the methods, from the registry ---------------------------------------------------------------------------

# flags that make a method's conversion quick and valid on the tiny models above, where its defaults need more
# (a method not named here converts with its defaults)
QUICK_FLAGS = {"prune-heads": ["--ratio", "0.5", "--importance", "random", "--uniform"], "gqa": ["--kv-heads", "1"]}


def decoder_methods() -> list[str]:
    """Every registered method that converts one dense decoder into a causal LM (its spec says it ``tunes``)."""
    from upcycle.methods import all_specs

    return [spec.name for spec in all_specs() if spec.tunes]


def expert_methods() -> list[str]:
    """Every registered method that mixes ``--expert`` decoders (BAM and its BTX baseline)."""
    from upcycle.methods import all_specs

    return [spec.name for spec in all_specs() if spec.merges_experts and "decoder" in spec.sources]


def quick_args(method: str) -> list[str]:
    """``--method NAME`` and its quick flags."""
    return ["--method", method, *QUICK_FLAGS.get(method, [])]


def calibrated_methods() -> list[str]:
    """Every registered method that can read ``--calibration`` text."""
    from upcycle.methods import all_specs

    return [spec.name for spec in all_specs() if spec.reads_calibration]
