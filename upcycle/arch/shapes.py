"""The shape config.json implies for every standard tensor of a family, and the check every method runs at plan time.

A checkpoint whose tensors disagree with its config (a corrupted or hand-edited shard, a config.json whose
``num_attention_heads`` or ``num_hidden_layers`` was edited) would otherwise be sliced as if it matched and written
as a model that loads wrongly, or fail later with a misleading message. :func:`check_shapes` compares every tensor of
the family's standard layout that is present with the shape the config implies, requires the tensors each layer must
have, and refuses tensors of layers the config does not have, before anything is written.
Tensors outside the standard layout (buffers, task heads) are left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UpcycleError
from .clip import ClipSpec
from .decoder import DecoderSpec, config_int
from .encoder import EncoderSpec


@dataclass(frozen=True)
class Expected:
    """The shape one tensor must have, and where it comes from (for the message)."""

    shape: tuple[int, ...]
    why: str
    required: bool = False


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _optional_int(config: dict, key: str, source: str) -> int | None:
    return config_int(config, key, source, default=0) or None


def decoder_shapes(spec: DecoderSpec, config: dict, source: str) -> dict[str, Expected]:
    """LLaMA-family decoders (llama, mistral, qwen2, qwen3): embeddings, per-layer attention, MLP and norms, final
    norm, head."""
    D, h, g, d = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    vocab, inner = _optional_int(config, "vocab_size", source), _optional_int(config, "intermediate_size", source)
    q_rows, kv_rows = f"num_attention_heads {h} x head_dim {d}", f"num_key_value_heads {g} x head_dim {d}"
    shapes: dict[str, Expected] = {}
    if vocab:
        shapes["model.embed_tokens.weight"] = Expected((vocab, D), f"vocab_size {vocab}, hidden_size {D}", True)
    for layer in range(spec.num_layers):
        for proj, rows, why in (("q_proj", h * d, q_rows), ("k_proj", g * d, kv_rows), ("v_proj", g * d, kv_rows)):
            shapes[spec.attention(layer, proj)] = Expected((rows, D), f"{why}, hidden_size {D}", required=True)
            shapes[spec.attention(layer, proj, "bias")] = Expected((rows,), why)
        shapes[spec.attention(layer, "o_proj")] = Expected((D, h * d), f"hidden_size {D}, {q_rows}", required=True)
        shapes[spec.attention(layer, "o_proj", "bias")] = Expected((D,), f"hidden_size {D}")
        prefix = spec.layer_prefix(layer)
        for norm in ("q_norm", "k_norm"):
            shapes[f"{prefix}self_attn.{norm}.weight"] = Expected((d,), f"head_dim {d}", required=spec.qk_norm)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{prefix}{norm}.weight"] = Expected((D,), f"hidden_size {D}", required=True)
        if inner:
            for proj in ("gate_proj", "up_proj"):
                shapes[f"{prefix}mlp.{proj}.weight"] = Expected(
                    (inner, D), f"intermediate_size {inner}, hidden_size {D}", required=True
                )
                shapes[f"{prefix}mlp.{proj}.bias"] = Expected((inner,), f"intermediate_size {inner}")
            shapes[f"{prefix}mlp.down_proj.weight"] = Expected(
                (D, inner), f"hidden_size {D}, intermediate_size {inner}", required=True
            )
            shapes[f"{prefix}mlp.down_proj.bias"] = Expected((D,), f"hidden_size {D}")
    shapes["model.norm.weight"] = Expected((D,), f"hidden_size {D}", required=True)
    if vocab:
        tied = bool(config.get("tie_word_embeddings", False))
        shapes["lm_head.weight"] = Expected(
            (vocab, D), f"vocab_size {vocab}, hidden_size {D}, tie_word_embeddings {str(tied).lower()}", not tied
        )
    return shapes


def encoder_shapes(spec: EncoderSpec, config: dict, source: str) -> dict[str, Expected]:
    """BERT-style encoders: embeddings, per-layer attention and feed-forward, pooler."""
    D, h, d, p = spec.hidden_size, spec.num_heads, spec.head_dim, spec.prefix
    vocab, inner = _optional_int(config, "vocab_size", source), _optional_int(config, "intermediate_size", source)
    positions, types = (
        _optional_int(config, "max_position_embeddings", source),
        _optional_int(config, "type_vocab_size", source),
    )
    shapes: dict[str, Expected] = {}
    for name, rows, key in (
        ("word_embeddings", vocab, "vocab_size"),
        ("position_embeddings", positions, "max_position_embeddings"),
        ("token_type_embeddings", types, "type_vocab_size"),
    ):
        if rows:
            shapes[f"{p}embeddings.{name}.weight"] = Expected((rows, D), f"{key} {rows}, hidden_size {D}")
    heads = f"num_attention_heads {h} x head size {d}"
    for layer in range(spec.num_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            shapes[spec.attention(layer, proj)] = Expected((h * d, D), f"{heads}, hidden_size {D}", required=True)
            shapes[spec.attention(layer, proj, "bias")] = Expected((h * d,), heads)
        shapes[spec.attention(layer, "o_proj")] = Expected((D, h * d), f"hidden_size {D}, {heads}", required=True)
        shapes[spec.attention(layer, "o_proj", "bias")] = Expected((D,), f"hidden_size {D}")
        prefix = spec.layer_prefix(layer)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            for kind in ("weight", "bias"):
                shapes[f"{prefix}{norm}.{kind}"] = Expected((D,), f"hidden_size {D}")
        if inner:
            shapes[f"{prefix}intermediate.dense.weight"] = Expected(
                (inner, D), f"intermediate_size {inner}, hidden_size {D}", required=True
            )
            shapes[f"{prefix}intermediate.dense.bias"] = Expected((inner,), f"intermediate_size {inner}")
            shapes[f"{prefix}output.dense.weight"] = Expected(
                (D, inner), f"hidden_size {D}, intermediate_size {inner}", required=True
            )
            shapes[f"{prefix}output.dense.bias"] = Expected((D,), f"hidden_size {D}")
    shapes[f"{p}pooler.dense.weight"] = Expected((D, D), f"hidden_size {D}")
    shapes[f"{p}pooler.dense.bias"] = Expected((D,), f"hidden_size {D}")
    return shapes


def clip_shapes(spec: ClipSpec, config: dict, source: str) -> dict[str, Expected]:
    """CLIPModel: per tower and layer the attention, layer norms and CLIPMLP; the two projections."""
    from transformers import CLIPConfig

    parsed = CLIPConfig.from_dict(config)
    shapes: dict[str, Expected] = {}
    for tower in spec.towers:
        D, inner = tower.hidden_size, tower.intermediate_size
        hidden = f"{tower.name}_config.hidden_size {D}"
        for layer in range(tower.num_layers):
            prefix = tower.layer_prefix(layer)
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{prefix}self_attn.{proj}.weight"] = Expected((D, D), f"{hidden} x {hidden}", required=True)
                shapes[f"{prefix}self_attn.{proj}.bias"] = Expected((D,), hidden)
            for norm in ("layer_norm1", "layer_norm2"):
                for kind in ("weight", "bias"):
                    shapes[f"{prefix}{norm}.{kind}"] = Expected((D,), hidden)
            mlp = f"{tower.name}_config.intermediate_size {inner}"
            shapes[tower.ffn(layer, "fc1")] = Expected((inner, D), f"{mlp}, {hidden}", required=True)
            shapes[tower.ffn(layer, "fc1", "bias")] = Expected((inner,), mlp)
            shapes[tower.ffn(layer, "fc2")] = Expected((D, inner), f"{hidden}, {mlp}", required=True)
            shapes[tower.ffn(layer, "fc2", "bias")] = Expected((D,), hidden)
        projection = getattr(parsed, "projection_dim", None)
        if projection:
            name = "text_projection.weight" if tower.name == "text" else "visual_projection.weight"
            shapes[name] = Expected((projection, D), f"projection_dim {projection}, {hidden}")
    return shapes


def _layer_prefixes(spec) -> list[tuple[str, int, str]]:
    """(regex of a layer tensor's name, layers the config has, the config key saying so) per stack of layers."""
    if isinstance(spec, ClipSpec):
        return [
            (
                rf"{tower.name}_model\.encoder\.layers\.(\d+)\.",
                tower.num_layers,
                f"{tower.name}_config.num_hidden_layers",
            )
            for tower in spec.towers
        ]
    if isinstance(spec, EncoderSpec):
        return [(rf"{re.escape(spec.prefix)}encoder\.layer\.(\d+)\.", spec.num_layers, "num_hidden_layers")]
    return [(r"model\.layers\.(\d+)\.", spec.num_layers, "num_hidden_layers")]


def expected_shapes(spec, config: dict, source: str = "the model") -> dict[str, Expected]:
    """Name -> the shape config.json implies, for the standard tensors of ``spec``'s family."""
    if isinstance(spec, ClipSpec):
        return clip_shapes(spec, config, source)
    if isinstance(spec, EncoderSpec):
        return encoder_shapes(spec, config, source)
    return decoder_shapes(spec, config, source)


FLOAT_CODES = ("F64", "F32", "F16", "BF16")
DECODER_BUFFERS = (".rotary_emb.inv_freq",)  # non-persistent buffers that older checkpoints still hold
FIX = "the checkpoint is corrupted or its config.json does not match its weights: re-download it, or fix config.json"


def check_shapes(reader, spec, source: str | None = None) -> None:
    """Refuse, in one line naming the tensor, the shape config.json implies and the shape found, a checkpoint whose
    standard tensors disagree with its config; also one that lacks a tensor every layer has, or holds layers the
    config does not have. Reads only the headers."""
    source = source or str(reader.folder)
    names = reader.names()
    present = set(names)
    for pattern, layers, key in _layer_prefixes(spec):
        regex = re.compile(pattern)
        beyond = [
            (int(match.group(1)), name)
            for name in names
            if (match := regex.match(name)) and int(match.group(1)) >= layers
        ]
        if beyond:
            _, name = min(beyond)
            found = max(index for index, _ in beyond) + 1
            raise UpcycleError(
                f"{source} has tensors of {found} layers (e.g. {name}) but config.json's {key} is {layers}; {FIX}"
            )
    expected = expected_shapes(spec, reader.config, source)
    wrong = [
        (name, want)
        for name, want in expected.items()
        if name in present and tuple(reader.info(name).shape) != want.shape
    ]
    if wrong:
        name, want = wrong[0]
        more = (
            f" (and {len(wrong) - 1} more tensor{'s' if len(wrong) > 2 else ''} of another shape)"
            if len(wrong) > 1
            else ""
        )
        raise UpcycleError(
            f"{source}: tensor {name} has shape {_fmt(tuple(reader.info(name).shape))} but config.json implies "
            f"{_fmt(want.shape)} ({want.why}){more}; {FIX}"
        )
    integral = [name for name in expected if name in present and reader.info(name).code not in FLOAT_CODES]
    if integral:
        name = integral[0]
        raise UpcycleError(
            f"{source}: tensor {name} has dtype {reader.info(name).dtype_name}, but a weight of this family is "
            "floating point (bf16, fp16 or fp32; quantized checkpoints are not supported): convert the checkpoint to "
            "bf16/fp16/fp32 first"
        )
    if isinstance(spec, DecoderSpec):
        extra = [name for name in names if name not in expected and not name.endswith(DECODER_BUFFERS)]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise UpcycleError(
                f"{source} holds tensor {extra[0]}{more}, which a {spec.model_type} model does not have (its "
                "transformers class would ignore it, and the output would not match the source); remove it from the "
                "checkpoint, or check that config.json's model_type is right"
            )
    missing = [name for name, want in expected.items() if want.required and name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        layers = [key_layers for pattern, *key_layers in _layer_prefixes(spec) if re.match(pattern, missing[0])]
        implied = f"{layers[0][1]} {layers[0][0]}" if layers else expected[missing[0]].why
        raise UpcycleError(f"{source} lacks tensor {missing[0]}{more}, which config.json implies ({implied}); {FIX}")
