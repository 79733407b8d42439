"""MHA to GQA/MQA (Shazeer 2019; Ainslie et al. 2023): fewer key/value heads by mean-pooling.

Each new KV head is the mean of the ``g / G`` consecutive original KV heads it replaces
(k/v rows and biases); query heads are unchanged, and query head ``i`` keeps reading the
mean of the KV heads it read before, since ``i // (h / G) == (i // (h / g)) // (g / G)``.
G = 1 is multi-query attention. The output is a plain checkpoint of the base architecture
(``num_key_value_heads = G``, explicit ``head_dim``); the paper uptrains it for about 5%
of the pre-training steps. ``--refit rescale|lstsq`` refits every layer's o_proj on calibration
text so that its attention output matches the dense layer's (see ``refit.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..arch import DecoderSpec, decoder_spec
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import TensorSpec
from ..errors import UpcycleError
from .base import Conversion, SourceTensor, check_source, plain_config, recorded_options
from .refit import REFIT_HELP, check_refit, refit_conversion, refit_plan_line
from .spec import CALIBRATION_HELP, CALIBRATION_TOKENS_HELP, DATA_PANEL, MethodCard, MethodSpec, option

if TYPE_CHECKING:
    import torch
    from torch import nn
else:
    from ..lazy import nn, torch


@dataclass
class GQAOptions:
    """The GQA flags of ``upcycle convert`` (and keys of a recipe's ``convert:`` section)."""

    kv_heads: int | None = option(None, help="new number of key/value heads, a divisor of the current count (1: MQA).")
    refit: Literal["none", "rescale", "lstsq"] = option("none", help=REFIT_HELP)
    calibration: Path | None = option(None, panel=DATA_PANEL, help=CALIBRATION_HELP)
    calibration_tokens: int = option(16384, panel=DATA_PANEL, help=CALIBRATION_TOKENS_HELP, requires="calibration")
    calibration_seq_len: int = 512
    trust_remote_code: bool = False  # use SRC although its config names code of its own (never run nor copied)


Options = GQAOptions


def mean_kv_heads(tensor: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    """[g*d, ...] k/v weight or bias -> [G*d, ...], each new head the mean of the g/G heads it replaces."""
    grouped = tensor.float().unflatten(0, (kv_heads, -1, head_dim))  # [G, g/G, d, ...]
    return grouped.mean(dim=1).flatten(0, 1).to(tensor.dtype).contiguous()


def pool_in_memory(model: nn.Module, kv_heads: int, head_dim: int) -> None:
    """Mean-pool the k/v projections of a loaded dense model in memory as the files are pooled (for the refit)."""
    from ..modeling.surgery import attention_of, layers_of

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


def convert(reader: CheckpointReader, options: GQAOptions) -> Conversion:
    """Plan the GQA conversion of the dense decoder behind ``reader``."""
    spec = decoder_spec(reader.config, str(reader.folder))
    check_source(reader, spec, options)
    target = options.kv_heads
    if target is None:
        raise UpcycleError("--method gqa needs --kv-heads G, the new number of key/value heads (1 for MQA)")
    if target < 1 or spec.num_kv_heads % target:
        divisors = [d for d in range(1, spec.num_kv_heads + 1) if spec.num_kv_heads % d == 0]
        raise UpcycleError(
            f"--kv-heads {target} does not divide the {spec.num_kv_heads} KV heads of {reader.folder}; "
            f"choose one of: {', '.join(map(str, divisors))}"
        )
    check_refit(options.refit, options.calibration)
    if options.calibration_tokens < 1:
        raise UpcycleError(f"--calibration-tokens {options.calibration_tokens} must be positive")
    names = set(reader.names())
    edits = set()
    if target != spec.num_kv_heads:
        edits = {
            spec.attention(layer, proj, kind)
            for layer in range(spec.num_layers)
            for proj in ("k_proj", "v_proj")
            for kind in ("weight", "bias")
        } & names
    refits, refit_report = {}, None
    if options.refit != "none":
        changed = list(range(spec.num_layers)) if target != spec.num_kv_heads else []
        refits, refit_report = refit_conversion(
            reader,
            spec,
            options.refit,
            changed,
            lambda model: pool_in_memory(model, target, spec.head_dim),
            options.calibration,
            options.calibration_tokens,
            options.calibration_seq_len,
        )
    layout = []
    for name in reader.names():
        info = reader.info(name)
        shape = (target * spec.head_dim, *info.shape[1:]) if name in edits else info.shape
        layout.append(TensorSpec(name, info.dtype, tuple(shape)))

    def tensors():
        for item in layout:
            if item.name in refits:
                yield item.name, refits[item.name]
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
        plan_lines=plan_printout(spec, target) + ([refit_plan_line(refit_report)] if refit_report else []),
        report={
            "options": recorded_options(options)
            | {"calibration": str(options.calibration) if options.calibration else None},
            "kv_heads": {"before": spec.num_kv_heads, "after": target, "query_heads": spec.num_heads},
        }
        | ({"refit": refit_report} if refit_report else {}),
        tags=["gqa", "mqa"] if target == 1 else ["gqa"],
        description=(
            f"{kind}: the {spec.num_kv_heads} key/value heads of every layer were mean-pooled into {target} "
            f"({spec.num_kv_heads // target} per new head); the {spec.num_heads} query heads are unchanged"
            f"{f', o_proj refitted ({options.refit}) on calibration text' if refits else ''}. "
            "A plain checkpoint of the base architecture; uptrain it briefly to recover quality."
        ),
        uses_runtime=False,
    )


def plan_printout(spec: DecoderSpec, target: int) -> list[str]:
    """The KV heads each new KV head averages."""
    per = spec.num_kv_heads // target
    lines = [
        f"GQA plan: {spec.num_layers} layers x {spec.num_heads} query heads; KV heads {spec.num_kv_heads} -> {target} "
        f"(query heads per KV head {spec.num_heads // spec.num_kv_heads} -> {spec.num_heads // target}); "
        "output: plain base-architecture checkpoint"
    ]
    lines += [f"  new KV head {j}: mean of KV heads {list(range(j * per, (j + 1) * per))}" for j in range(target)]
    return lines


def card_table(report: dict, config: dict) -> list[str]:
    """The card's plan: KV heads before and after (the output is a plain checkpoint, without a plan)."""
    from ..checkpoint.card import markdown_table

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
