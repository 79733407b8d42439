"""MHA to GQA/MQA (Shazeer 2019; Ainslie et al. 2023): fewer key/value heads, merged from the source's.

Each new KV head replaces ``g / G`` consecutive original KV heads, and query head ``i`` keeps reading the
merge of the KV heads it read before, since ``i // (h / G) == (i // (h / g)) // (g / G)``. ``--merge mean`` (the
paper) averages their k/v rows and biases, query and output projections unchanged; ``--merge aligned`` fits the
merge on the calibration text's layer inputs and folds per-head transforms into q_proj and o_proj
(``kv_merge.py``). G = 1 is multi-query attention. The output is a plain checkpoint of the base architecture
(``num_key_value_heads = G``, explicit ``head_dim``); the paper uptrains it for about 5% of the pre-training steps.
``--refit rescale|lstsq`` then refits every layer's o_proj on calibration text so that its attention output matches
the dense layer's (see ``refit.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from ..arch import DecoderSpec, decoder_spec
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import TensorSpec
from ..errors import UpcycleError
from ..lazy import no_grad
from .base import Conversion, SourceTensor, check_source, plain_config, recorded_options
from .refit import REFIT_HELP, RIDGE_HELP, check_refit, parse_ridge, refit_conversion, refit_plan_line
from .spec import (
    MethodCard,
    MethodSpec,
    calibration_option,
    calibration_tokens_option,
    calibration_weights_option,
    option,
)

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    from ..lazy import nn, torch


MERGES = ("auto", "mean", "aligned")
MERGE_HELP = (
    "how each group of KV heads becomes one: mean (average their k/v rows), aligned (fitted on --calibration "
    "text: per frequency pair a complex scale of the keys, a PCA of the values weighted by o_proj, folded into "
    "q_proj and o_proj; exact when the heads are such transforms of one another; far closer to the source), or "
    "auto: aligned when --calibration is given and the family allows it, else mean."
)


@dataclass
class GQAOptions:
    """The GQA flags of ``upcycle convert`` (and keys of a recipe's ``convert:`` section)."""

    kv_heads: int | None = option(None, help="new number of key/value heads, a divisor of the current count (1: MQA).")
    merge: Literal[MERGES] = option("auto", help=MERGE_HELP)
    refit: Literal["none", "rescale", "lstsq"] = option("none", help=REFIT_HELP)
    refit_ridge: str = option("auto", help=RIDGE_HELP, example="0.01")
    calibration: list[str] = calibration_option()
    calibration_weights: list[float] = calibration_weights_option()
    calibration_tokens: int = calibration_tokens_option()
    calibration_seq_len: int = 512
    trust_remote_code: bool = False  # use SRC although its config names code of its own (never run nor copied)


def mean_kv_heads(tensor: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """[g*d, ...] k/v weight or bias -> [G*d, ...], each new head the mean of the g/G heads it replaces."""
    grouped = tensor.float().unflatten(0, (kv_heads, -1, head_dim))  # [G, g/G, d, ...]
    return grouped.mean(dim=1).flatten(0, 1).to(tensor.dtype).contiguous()


def pool_in_memory(model: nn.Module, kv_heads: int, head_dim: int) -> None:
    """Mean-pool the k/v projections of a loaded dense model in memory as the files are pooled (for the refit)."""
    from ..modeling.layer_parts import attention_of, layers_of

    for layer in layers_of(model):
        attention = attention_of(layer)
        for proj in ("k_proj", "v_proj"):
            old = getattr(attention, proj)
            new = nn.Linear(old.in_features, kv_heads * head_dim, bias=old.bias is not None, device="meta")
            new.weight = nn.Parameter(mean_kv_heads(old.weight.detach(), kv_heads, head_dim), requires_grad=False)
            if old.bias is not None:
                new.bias = nn.Parameter(mean_kv_heads(old.bias.detach(), kv_heads, head_dim), requires_grad=False)
            setattr(attention, proj, new)
        attention.num_key_value_groups = model.config.num_attention_heads // kv_heads


@no_grad
def attention_input_covariances(
    reader: CheckpointReader, spec: DecoderSpec, options: GQAOptions
) -> list[torch.Tensor]:
    """Per layer, ``E[x x^T]`` [D+1, D+1] (float64) of the attention's input ``x`` (after the input norm, with a
    trailing 1) on the calibration text, from one pass of the dense model."""
    from ..checkpoint.load import load_for_analysis
    from ..data.calibration import options_calibration_blocks
    from ..modeling.layer_parts import attention_of, layers_of
    from .base import progress, source_parameters
    from .refit import BATCH_BLOCKS

    blocks = options_calibration_blocks(reader, options, encoder=False)  # [N, T]
    width = spec.hidden_size + 1
    model = load_for_analysis(
        reader.folder,
        source_parameters(reader),
        f"--merge aligned ({blocks.numel()} calibration tokens)",
        auto_class="AutoModel",
        activation_bytes=spec.num_layers * width * width * 8,
    )
    sums = [torch.zeros(width, width, dtype=torch.float64) for _ in range(spec.num_layers)]

    def accumulate(index: int):
        def hook(_module, args):
            x = args[0].reshape(-1, spec.hidden_size).double()  # [tokens, D]
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            sums[index] += (x.T @ x).cpu()

        return hook

    handles = [
        attention_of(layer).k_proj.register_forward_pre_hook(accumulate(index))
        for index, layer in enumerate(layers_of(model))
    ]
    try:
        for batch in progress(list(blocks.split(BATCH_BLOCKS)), "--merge aligned: layer inputs", unit="batch"):
            model(input_ids=batch.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [total / blocks.numel() for total in sums]


def aligned_tensors(reader: CheckpointReader, spec: DecoderSpec, options: GQAOptions) -> tuple[dict, dict]:
    """(tensor name -> merged tensor in the source dtype for every layer's q/k/v/o projections, the report entry with
    the fits' relative errors per layer)."""
    from .kv_merge import merge_layer

    covariances = attention_input_covariances(reader, spec, options)
    tensors, per_layer = {}, []
    for layer, covariance in enumerate(covariances):

        def source(proj: str, kind: str = "weight") -> torch.Tensor | None:
            name = spec.attention(layer, proj, kind)
            return reader.get(name).double() if name in reader else None

        merged = merge_layer(
            (source("q_proj"), source("q_proj", "bias")),
            (source("k_proj"), source("k_proj", "bias")),
            (source("v_proj"), source("v_proj", "bias")),
            source("o_proj"),
            covariance,
            spec.num_kv_heads,
            options.kv_heads,
            spec.head_dim,
        )
        for proj, kind, tensor in (
            ("q_proj", "weight", merged.q_weight),
            ("q_proj", "bias", merged.q_bias),
            ("k_proj", "weight", merged.k_weight),
            ("k_proj", "bias", merged.k_bias),
            ("v_proj", "weight", merged.v_weight),
            ("v_proj", "bias", merged.v_bias),
            ("o_proj", "weight", merged.o_weight),
        ):
            if tensor is not None:
                name = spec.attention(layer, proj, kind)
                tensors[name] = tensor.to(reader.info(name).dtype).contiguous()
        per_layer.append(
            {"layer": layer, "key_error": round(merged.key_error, 6), "value_error": round(merged.value_error, 6)}
        )
    keys = sum(e["key_error"] for e in per_layer) / len(per_layer)
    values = sum(e["value_error"] for e in per_layer) / len(per_layer)
    return tensors, {"mean_key_error": round(keys, 6), "mean_value_error": round(values, 6), "per_layer": per_layer}


def load_merged(model: nn.Module, tensors: dict[str, torch.Tensor], spec: DecoderSpec, kv_heads: int) -> None:
    """Put the merged projections into a loaded dense base model in memory (for the refit), as the files get them."""
    from ..modeling.layer_parts import attention_of, layers_of

    for index, layer in enumerate(layers_of(model)):
        attention = attention_of(layer)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            old = getattr(attention, proj)
            weight = tensors[spec.attention(index, proj)].float()
            bias = tensors.get(spec.attention(index, proj, "bias"))
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            new.weight = nn.Parameter(weight.to(old.weight.device), requires_grad=False)
            if bias is not None:
                new.bias = nn.Parameter(bias.float().to(old.weight.device), requires_grad=False)
            setattr(attention, proj, new)
        attention.num_key_value_groups = model.config.num_attention_heads // kv_heads


def merged_shape(reader: CheckpointReader, spec: DecoderSpec, name: str, edits: set[str], target: int) -> tuple:
    """The output shape of tensor ``name``: ``target`` KV heads for the k/v projections in ``edits``."""
    shape = reader.info(name).shape
    return (target * spec.head_dim, *shape[1:]) if name in edits else tuple(shape)


def checked_kv_heads(reader: CheckpointReader, spec: DecoderSpec, options: GQAOptions) -> int:
    """``--kv-heads``, after one line when it is missing or does not divide the source's KV heads."""
    target = options.kv_heads
    if target is None:
        raise UpcycleError("--method gqa needs --kv-heads G, the new number of key/value heads (1 for MQA)")
    if target < 1 or spec.num_kv_heads % target:
        divisors = [d for d in range(1, spec.num_kv_heads + 1) if spec.num_kv_heads % d == 0]
        raise UpcycleError(
            f"--kv-heads {target} does not divide the {spec.num_kv_heads} KV heads of {reader.folder}; "
            f"choose one of: {', '.join(map(str, divisors))}"
        )
    check_refit(options.refit, options.calibration, options.refit_ridge)
    if options.calibration_tokens < 1:
        raise UpcycleError(f"--calibration-tokens {options.calibration_tokens} must be positive")
    return target


def checked_merge(spec: DecoderSpec, options: GQAOptions) -> str:
    """The merge that runs (``auto``: aligned wherever it can be fitted, which keeps far more of the source, else
    the mean), after one line for an aligned merge without calibration text or on a family with k_norm."""
    if options.merge == "aligned" and not options.calibration:
        raise UpcycleError(
            "--merge aligned is fitted on calibration text; pass --calibration FILE or use --merge mean"
        )
    if options.merge == "aligned" and spec.qk_norm:
        raise UpcycleError(
            f"--merge aligned needs keys that are linear in the layer input, but {spec.model_type} normalises each "
            "key head (k_norm) before the rotary embedding; use --merge mean"
        )
    if options.merge == "auto":
        return "aligned" if options.calibration and not spec.qk_norm else "mean"
    return options.merge


def convert(reader: CheckpointReader, options: GQAOptions) -> Conversion:
    """Plan the GQA conversion of the dense decoder behind ``reader``."""
    spec = decoder_spec(reader.config, str(reader.folder))
    check_source(reader, spec, options)
    target = checked_kv_heads(reader, spec, options)
    ridge = parse_ridge(options.refit_ridge)
    merge = checked_merge(spec, options)
    names = set(reader.names())
    edits, merged, merge_report = set(), {}, None
    if target != spec.num_kv_heads:
        edits = {
            spec.attention(layer, proj, kind)
            for layer in range(spec.num_layers)
            for proj in ("k_proj", "v_proj")
            for kind in ("weight", "bias")
        } & names
        if merge == "aligned":
            merged, merge_report = aligned_tensors(reader, spec, options)

    def convert_in_memory(model: nn.Module) -> None:  # the same change as the files get, for the refit
        if merged:
            load_merged(model, merged, spec, target)
        else:
            pool_in_memory(model, target, spec.head_dim)

    refits, refit_report = {}, None
    if options.refit != "none":
        changed = list(range(spec.num_layers)) if target != spec.num_kv_heads else []
        refits, refit_report = refit_conversion(
            reader, spec, options.refit, changed, convert_in_memory, options, ridge
        )
    layout = [
        TensorSpec(name, reader.info(name).dtype, tuple(merged_shape(reader, spec, name, edits, target)))
        for name in reader.names()
    ]

    def tensors():
        for item in layout:
            if item.name in refits:
                yield item.name, refits[item.name]
            elif item.name in merged:
                yield item.name, merged[item.name]
            elif item.name in edits:
                yield item.name, mean_kv_heads(reader.get(item.name), target, spec.head_dim)
            else:
                yield item.name, SourceTensor(item.name)

    config = plain_config(reader.config) | {"num_key_value_heads": target, "head_dim": spec.head_dim}
    kind = "MQA" if target == 1 else "GQA"
    return Conversion(
        method="gqa",
        config=config,
        layout=layout,
        tensors=tensors,
        plan_lines=plan_printout(spec, target, merge)
        + ([merge_plan_line(merge_report)] if merge_report else [])
        + ([refit_plan_line(refit_report)] if refit_report else []),
        report={
            "options": recorded_options(replace(options, merge=merge)),
            "kv_heads": {"before": spec.num_kv_heads, "after": target, "query_heads": spec.num_heads},
        }
        | ({"merge": merge_report} if merge_report else {})
        | ({"refit": refit_report} if refit_report else {}),
        tags=["gqa", "mqa"] if target == 1 else ["gqa"],
        description=(
            f"{kind}: the {spec.num_kv_heads} key/value heads of every layer were "
            + (
                f"merged into {target} on calibration text ({spec.num_kv_heads // target} per new head), the "
                "per-head key scales and value maps folded into q_proj and o_proj"
                if merged
                else f"mean-pooled into {target} ({spec.num_kv_heads // target} per new head); the "
                f"{spec.num_heads} query heads are unchanged"
            )
            + f"{f', o_proj refitted ({options.refit}) on calibration text' if refits else ''}. "
            "A plain checkpoint of the base architecture; uptrain it briefly to recover quality."
        ),
        uses_runtime=False,
    )


def plan_printout(spec: DecoderSpec, target: int, merge: str = "mean") -> list[str]:
    """The KV heads each new KV head merges."""
    per = spec.num_kv_heads // target
    how = "mean" if merge == "mean" else "aligned merge"
    lines = [
        f"GQA plan: {spec.num_layers} layers x {spec.num_heads} query heads; KV heads {spec.num_kv_heads} -> {target} "
        f"(query heads per KV head {spec.num_heads // spec.num_kv_heads} -> {spec.num_heads // target}); "
        "output: plain base-architecture checkpoint"
    ]
    lines += [f"  new KV head {j}: {how} of KV heads {list(range(j * per, (j + 1) * per))}" for j in range(target)]
    return lines


def merge_plan_line(report: dict) -> str:
    """The plan's one-line summary of the aligned merge's fits."""
    return (
        f"aligned merge on calibration text, {len(report['per_layer'])} layers: mean relative error of the merged "
        f"keys {report['mean_key_error']:.4f} (query-weighted), of the values {report['mean_value_error']:.4f} "
        "(o_proj-weighted)"
    )


def card_table(report: dict, config: dict) -> list[str]:
    """The card's plan: KV heads before and after (the output is a plain checkpoint, without a plan)."""
    from ..tables import markdown_table

    kv = report.get("kv_heads")
    if not kv:
        return []
    count = config.get("num_hidden_layers") or 0
    return markdown_table(
        ("layers", "query heads", "KV heads", "query heads per KV head"),
        [
            (
                f"0-{count - 1}",
                kv["query_heads"],
                f"{kv['before']} -> {kv['after']}",
                f"{kv['query_heads'] // kv['before']} -> {kv['query_heads'] // kv['after']}",
            )
        ],
    )


GQA_CITATION = """@inproceedings{ainslie2023gqa,
  title = {{GQA}: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints},
  author = {Ainslie, Joshua and Lee-Thorp, James and de Jong, Michiel and Zemlyanskiy, Yury and
    Lebr{\\'o}n, Federico and Sanghai, Sumit},
  booktitle = {Proceedings of the 2023 Conference on Empirical Methods in Natural Language Processing},
  year = {2023},
  eprint = {2305.13245},
  archivePrefix = {arXiv}
}"""
MQA_CITATION = """@article{shazeer2019mqa,
  title = {Fast Transformer Decoding: One Write-Head is All You Need},
  author = {Shazeer, Noam},
  journal = {arXiv preprint arXiv:1911.02150},
  year = {2019}
}"""

SPEC = MethodSpec(
    name="gqa",
    summary="Multi-head to grouped-query (or multi-query) attention by mean-pooling key/value heads.",
    panel="GQA",
    options=GQAOptions,
    convert=convert,
    example="upcycle convert SRC OUT --method gqa --kv-heads 1 [--refit lstsq --calibration text.txt]",
    card=MethodCard(
        "multi-head to grouped-query attention (GQA/MQA)",
        "Fewer key/value heads shrink the KV cache and the memory traffic of decoding. Each new key/value head is "
        "the mean of the heads it replaces, and a short uptraining recovers most of the quality "
        "(Ainslie et al. 2023).",
        (GQA_CITATION, MQA_CITATION),
    ),
    card_table=card_table,
)
