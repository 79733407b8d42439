"""Head pruning by importance (Michel, Levy, Neubig 2019), for LLaMA-family decoders and BERT encoders.

Units: single heads for MHA models; whole KV groups (one KV head and its h/g query heads)
for GQA models. Importance is ``E_x |dL/dxi|`` for a gate ``xi`` on each unit, the absolute
value taken per token, averaged over calibration tokens and (``--normalize layer``, the paper's
choice) normalised per layer with the L2 norm. ``--normalize auto`` (the default) normalises only
when a layer has at least 8 units: with few units per layer (SmolLM2: 3 KV groups) per-layer
normalisation makes the weaker units of a layer with one dominant unit look unimportant
globally, and on SmolLM2 at ratio 0.1 it gave perplexity 53 against 21 with raw scores and
29 for random importance; the gates are attached through the runtime's head-gated attention (a gate producer
returning ones [B, T, h], one leaf per unit, shared by the unit's query heads). ``--importance
random`` is the control. ``--iterative N`` removes the units in N cumulative steps and
recomputes importance (with the removed units' gates at zero) before each step.

The loss L: decoders use the causal LM loss; BERT checkpoints with a masked-LM head the MLM
loss (15% of tokens masked, seeded). BERT without a head (sentence-embedding models such as
all-MiniLM-L6-v2) has no task loss, and the distance of the gated output to the ungated one is
zero with zero gradient at gates = 1, so we use the objective those models were trained with:
an in-batch contrastive (InfoNCE / multiple-negatives ranking) loss where the two halves of each
calibration block are a positive pair and the other blocks' halves the negatives, on the cosine
similarity (scale 20) of mean-pooled last hidden states. A head matters when it helps tell a
text's continuation from other texts.

Pruned rows and columns are physically removed (q/k/v rows and biases of the removed heads,
o_proj / attention.output.dense columns), streamed one tensor at a time; untouched tensors
pass through unchanged. A decoder pruned uniformly is written as a plain checkpoint of its
family (fewer heads, explicit ``head_dim``). BERT's config derives the head size as
hidden_size / num_attention_heads, so plain BERT cannot express fewer heads of the same size:
a pruned BERT is always an upcycle checkpoint, like a non-uniformly pruned decoder
(per-layer ``attention_heads`` plan entries applied by the runtime's surgery).

``--refit rescale|lstsq`` then refits the o_proj of every layer that lost heads on the
calibration text, so that its attention output matches the dense layer's (see ``refit.py``);
the refitted o_proj is written instead of the sliced one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..arch import DecoderSpec, EncoderSpec, attention_spec
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import TensorSpec
from ..errors import UpcycleError
from ..modeling.plan import AttentionHeads, LayerPlan
from .base import (
    Conversion,
    SourceTensor,
    check_source,
    native_refusal,
    plain_config,
    progress,
    recorded_options,
    runtime_config,
    source_parameters,
)
from .refit import REFIT_HELP, RIDGE_HELP, check_refit, parse_ridge, refit_conversion, refit_plan_line
from .spec import (
    DATA_PANEL,
    MethodCard,
    MethodSpec,
    calibration_option,
    calibration_tokens_option,
    calibration_weights_option,
    option,
)

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import nn
else:
    from ..lazy import F, nn, torch

Importance = Literal["gradient", "random"]
ATTENTION_TENSORS = (
    ("q_proj", "weight"),
    ("q_proj", "bias"),
    ("k_proj", "weight"),
    ("k_proj", "bias"),
    ("v_proj", "weight"),
    ("v_proj", "bias"),
    ("o_proj", "weight"),
)


@dataclass
class PruneHeadsOptions:
    """The head-pruning flags of ``upcycle convert`` (and keys of a recipe's ``convert:`` section)."""

    ratio: float | None = option(
        None,
        example="0.25",
        help="fraction of prunable units removed, 0 <= R < 1 (units: heads for MHA, KV groups for GQA models).",
    )
    importance: Importance = option(
        "gradient", help="gradient (E|dL/dgate| per unit on --calibration text) or random (the control, with --seed)."
    )
    seed: int = option(0, panel=DATA_PANEL, help="seed of --importance random and of the masked-LM masking.")
    iterative: int = option(1, help="prune in N cumulative steps, recomputing importance before each (1: score once).")
    min_heads_per_layer: int = option(1, help="query heads every layer keeps at least.")
    uniform: bool = option(
        False, help="remove the same number of units in every layer (decoders: a plain base-architecture checkpoint)."
    )
    calibration: list[str] = calibration_option()
    calibration_weights: list[float] = calibration_weights_option()
    calibration_tokens: int = calibration_tokens_option()
    calibration_seq_len: int = 512
    normalize: Literal["auto", "layer", "none"] = option(
        "auto",
        help="L2-normalise gradient importance per layer: layer (the paper), none, or auto (layer only with "
        ">= 8 units per layer).",
    )
    encoder_batch: int = 8  # blocks per backward pass for encoders (the contrastive proxy needs >= 2)
    refit: Literal["none", "rescale", "lstsq"] = option("none", help=REFIT_HELP)
    refit_ridge: str = option("auto", help=RIDGE_HELP, example="0.01")
    trust_remote_code: bool = False  # use SRC although its config names code of its own (never run nor copied)


def round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def units_of(spec: DecoderSpec | EncoderSpec) -> tuple[int, int, str]:
    """(prunable units per layer, query heads per unit, unit name): heads for MHA, KV groups for GQA."""
    if spec.num_kv_heads == spec.num_heads:
        return spec.num_heads, 1, "heads"
    return spec.num_kv_heads, spec.num_heads // spec.num_kv_heads, "KV groups"


def removal_targets(spec: DecoderSpec | EncoderSpec, options: PruneHeadsOptions) -> tuple[int, int]:
    """(units removed in all, minimum units kept per layer), validated against the flags."""
    ratio, (count, group, unit_name) = options.ratio, units_of(spec)
    if ratio is None:
        raise UpcycleError("--method prune-heads needs --ratio R, the fraction of heads to remove (0 <= R < 1)")
    if not 0 <= ratio < 1:
        raise UpcycleError(f"--ratio {ratio} is outside [0, 1); give the fraction of heads to remove, e.g. 0.25")
    if not 1 <= options.min_heads_per_layer <= spec.num_heads:
        raise UpcycleError(
            f"--min-heads-per-layer {options.min_heads_per_layer} is outside [1, {spec.num_heads}]; "
            "give a head count in that range"
        )
    if options.iterative < 1:
        raise UpcycleError(
            f"--iterative {options.iterative} must be at least 1 (1 scores once); give the number of pruning steps"
        )
    min_units = math.ceil(options.min_heads_per_layer / group)
    if options.uniform:
        per_layer = round_half_up(ratio * count)
        total, where, fits = (
            per_layer * spec.num_layers,
            f"{per_layer} of {count} {unit_name} in every layer",
            per_layer <= count - min_units,
        )
    else:
        total = round_half_up(ratio * count * spec.num_layers)
        where, fits = (
            f"{total} of {count * spec.num_layers} {unit_name}",
            total <= (count - min_units) * spec.num_layers,
        )
    if not fits:
        raise UpcycleError(
            f"--ratio {ratio} removes {where}, which leaves a layer with fewer than --min-heads-per-layer "
            f"{options.min_heads_per_layer} heads ({group} per unit); lower --ratio or --min-heads-per-layer"
        )
    return total, min_units


NORMALIZATIONS = ("auto", "layer", "none")
AUTO_NORMALIZE_MIN_UNITS = 8


def normalize_per_layer(mode: str, units_per_layer: int) -> bool:
    """Whether importance is L2-normalised per layer (``auto``: only with at least 8 units per layer)."""
    if mode not in NORMALIZATIONS:
        raise UpcycleError(f"--normalize {mode!r} is unknown; choose one of: {', '.join(NORMALIZATIONS)}")
    return mode == "layer" or (mode == "auto" and units_per_layer >= AUTO_NORMALIZE_MIN_UNITS)


def choose_removals(
    scores: torch.Tensor, removed: list[set[int]], target: int, min_units: int, uniform: bool
) -> list[set[int]]:
    """Remove the lowest-scored kept units until ``target`` are removed in all (per layer when uniform)."""
    removed = [set(layer) for layer in removed]
    layers, count = scores.shape
    if uniform:
        for layer in range(layers):
            order = [u for u in scores[layer].argsort(stable=True).tolist() if u not in removed[layer]]
            removed[layer] |= set(order[: target // layers - len(removed[layer])])
        return removed
    order = [
        (layer, u)
        for layer, u in sorted(((i, u) for i in range(layers) for u in range(count)), key=lambda lu: scores[lu].item())
        if u not in removed[layer]
    ]
    for layer, unit in order:
        if sum(map(len, removed)) >= target:
            break
        if count - len(removed[layer]) > min_units:
            removed[layer].add(unit)
    return removed


class UnitGates:
    """Gate producer with one gate per prunable unit, shared by its query heads (the head router the calibration pass
    attaches; a plain callable: it holds no parameters).

    Each forward makes a fresh leaf ``ones[B, T, units]`` (its ``.grad`` is the per-token
    dL/dxi, the unit's query heads' gradients summed) and returns it times ``keep``,
    repeated over each unit's heads: gates [B, T, h], 0 for removed units.
    """

    def __init__(self, keep: list[float], heads_per_unit: int):
        self.keep = torch.tensor(keep, dtype=torch.float32)  # [units]
        self.heads_per_unit = heads_per_unit
        self.leaf: torch.Tensor | None = None

    def __call__(self, hidden_states: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
        # query: [B, h, T, d] -> gates [B, T, h]
        batch, _, seq, _ = query.shape
        self.leaf = torch.ones(
            batch, seq, self.keep.numel(), device=query.device, requires_grad=torch.is_grad_enabled()
        )
        return (self.leaf * self.keep.to(query.device)).repeat_interleave(self.heads_per_unit, dim=-1)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each layer's attention module (the one that calls the attention function)."""
    from ..modeling.layer_parts import attention_of, layers_of

    return [attention_of(layer) for layer in layers_of(model)]


def attach_unit_gates(model: nn.Module, removed: list[set[int]], units: int, heads_per_unit: int) -> list[UnitGates]:
    """Gate every layer's units through the runtime's head-gated attention (removed units at 0)."""
    from ..modeling.gated_attention import ATTENTION_NAME, attach_head_router

    gates = []
    for attention, layer_removed in zip(attention_modules(model), removed):
        gate = UnitGates([0.0 if u in layer_removed else 1.0 for u in range(units)], heads_per_unit)
        attach_head_router(attention, gate)
        gates.append(gate)
    model.config._attn_implementation = ATTENTION_NAME
    return gates


def calibration_batches(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, options: PruneHeadsOptions
) -> tuple[list[torch.Tensor], str]:
    """Calibration token batches (the calibration blocks of every method that looks at data) and the loss they feed."""
    from ..data.calibration import contrastive_pairs, options_calibration_blocks

    decoder = isinstance(spec, DecoderSpec)
    blocks = options_calibration_blocks(reader, options, encoder=not decoder)  # [N, T]; encoders: [CLS] ... [SEP]
    if decoder:
        return list(blocks.split(1)), "causal-lm"  # [1, T] each
    if spec.mlm_head:
        return list(blocks.split(options.encoder_batch)), "masked-lm"
    if blocks.shape[0] < 2:
        size = blocks.shape[1] - 2
        raise UpcycleError(
            f"the contrastive importance proxy needs at least 2 calibration blocks of {size} tokens, "
            f"got {blocks.shape[0]}; give more text or raise --calibration-tokens"
        )
    chunks = blocks.split(options.encoder_batch)  # each pair batch [2B, 2 + (T - 2) // 2]: first halves, second halves
    return [contrastive_pairs(chunk) for chunk in chunks if chunk.shape[0] >= 2], "contrastive"


def batch_loss(
    model: nn.Module, batch: torch.Tensor, loss: str, mask_token: int | None, generator: torch.Generator
) -> torch.Tensor:
    """The importance loss of one calibration batch."""
    batch = batch.to(model.device)
    if loss == "causal-lm":
        return model(batch, labels=batch).loss
    if loss == "masked-lm":
        chosen = torch.rand(batch.shape, generator=generator) < 0.15  # [B, T]
        chosen[:, [0, -1]] = False
        chosen[:, 1] |= ~chosen.any(dim=1)  # at least one masked token per row
        chosen = chosen.to(batch.device)
        labels = torch.where(chosen, batch, -100)
        return model(input_ids=torch.where(chosen, mask_token, batch), labels=labels).loss
    hidden = model(input_ids=batch).last_hidden_state  # [2B, T, D]
    pooled = F.normalize(hidden.mean(dim=1).float(), dim=-1)  # [2B, D]
    first, second = pooled.chunk(2)
    logits = 20.0 * first @ second.T  # [B, B]
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def activation_bytes(spec: DecoderSpec | EncoderSpec, batch: torch.Tensor, vocab: int, decoder: bool) -> int:
    """Rough fp32 activation memory of one forward + backward (Korthikanti et al.'s per-layer estimate, plus
    logits)."""
    tokens, seq = batch.numel(), batch.shape[-1]
    per_layer = 2 * tokens * (34 * spec.hidden_size + 5 * spec.num_heads * seq)
    return spec.num_layers * per_layer + (12 * tokens * vocab if decoder or getattr(spec, "mlm_head", False) else 0)


class GradientScorer:
    """Loads the model once (saying first how much memory that needs) and scores units on calibration text."""

    def __init__(self, reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, options: PruneHeadsOptions):
        from ..checkpoint.load import load_for_analysis

        self.batches, self.loss = calibration_batches(reader, spec, options)
        decoder = isinstance(spec, DecoderSpec)
        auto_class = "AutoModelForCausalLM" if decoder else "AutoModelForMaskedLM" if spec.mlm_head else "AutoModel"
        num_parameters = source_parameters(reader)
        extra = activation_bytes(spec, self.batches[0], int(reader.config.get("vocab_size") or 0), decoder)
        self.model = load_for_analysis(
            reader.folder,
            num_parameters,
            f"gradient importance ({self.loss} loss)",
            auto_class=auto_class,
            activation_bytes=extra,
        )
        self.model.requires_grad_(False)
        self.spec, self.options = spec, options
        from transformers import AutoTokenizer

        self.mask_token = (
            AutoTokenizer.from_pretrained(reader.folder).mask_token_id if self.loss == "masked-lm" else None
        )

    def __call__(self, removed: list[set[int]]) -> torch.Tensor:
        """Importance [layers, units] with the ``removed`` units gated off (normalised per ``--normalize``)."""
        units, heads_per_unit, _ = units_of(self.spec)
        gates = attach_unit_gates(self.model, removed, units, heads_per_unit)
        sums = torch.zeros(self.spec.num_layers, units, dtype=torch.float64)
        tokens = 0
        generator = torch.Generator().manual_seed(self.options.seed)
        with torch.enable_grad():
            for batch in progress(self.batches, "gradient importance", unit="batch"):
                batch_loss(self.model, batch, self.loss, self.mask_token, generator).backward()
                for layer, gate in enumerate(gates):
                    sums[layer] += gate.leaf.grad.abs().sum(dim=(0, 1)).double().cpu()  # [units]
                tokens += batch.numel()
        scores = sums / tokens
        if not normalize_per_layer(self.options.normalize, units):
            return scores
        return scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-30)


def kept_heads(spec: DecoderSpec | EncoderSpec, removed: list[set[int]]) -> list[AttentionHeads]:
    """Per layer, its plan's change: the query and KV heads kept."""
    units, heads_per_unit, _ = units_of(spec)
    plans = []
    for layer_removed in removed:
        kept_units = [u for u in range(units) if u not in layer_removed]
        heads = [u * heads_per_unit + i for u in kept_units for i in range(heads_per_unit)]
        kv_heads = heads if heads_per_unit == 1 else kept_units
        plans.append(AttentionHeads(kept_heads=heads, kept_kv_heads=kv_heads))
    return plans


def apply_plans(model: nn.Module, plans: list[AttentionHeads], layers: list[int]) -> None:
    """Slice the ``layers`` of a loaded dense model in memory as the files are sliced (for the refit)."""
    from ..modeling.layer_parts import layers_of

    for layer in layers:
        plans[layer].apply(layers_of(model)[layer], model.config)


def head_rows(tensor: torch.Tensor, kept: list[int], head_dim: int, dim: int) -> torch.Tensor:
    """Keep the heads ``kept`` of a projection: rows (dim 0: q/k/v weight or bias) or columns (dim 1: o_proj)."""
    return (
        tensor.unflatten(dim, (-1, head_dim)).index_select(dim, torch.tensor(kept)).flatten(dim, dim + 1).contiguous()
    )


def sliced_tensors(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, plans: list[AttentionHeads]
) -> dict[str, tuple[list[int], int]]:
    """name -> (kept heads, dim) for every attention tensor that loses heads."""
    edits, names = {}, set(reader.names())
    for layer, plan in enumerate(plans):
        heads, kv_heads = plan.kept_heads, plan.kept_kv_heads
        if len(heads) == spec.num_heads:
            continue
        for proj, kind in ATTENTION_TENSORS:
            name = spec.attention(layer, proj, kind)
            if name in names:
                edits[name] = (kv_heads if proj in ("k_proj", "v_proj") else heads, 1 if proj == "o_proj" else 0)
    return edits


def output_config(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, plans: list[AttentionHeads]
) -> tuple[dict, bool, str, str]:
    """(config, uses the runtime, Auto class, why): native for uniform decoders that transformers accepts, else the
    upcycle format."""
    config = plain_config(reader.config)  # runtime_config below replaces what it drops
    heads = {len(p.kept_heads) for p in plans}
    kv_heads = {len(p.kept_kv_heads) for p in plans}
    if isinstance(spec, DecoderSpec):
        config["head_dim"] = spec.head_dim
        why = "per-layer head counts differ"
        if len(heads) == 1:
            native = config | {"num_attention_heads": min(heads), "num_key_value_heads": min(kv_heads)}
            refusal = native_refusal(native)
            if refusal is None:
                return native, False, "AutoModelForCausalLM", "uniform"
            why = f"transformers refuses the plain {spec.model_type} config: {refusal}"
    else:
        why = (
            "BertConfig derives the head size from hidden_size / num_attention_heads, "
            "so plain BERT cannot hold fewer heads of the same size"
        )
    config, auto_class, _ = runtime_config(config, spec, "prune-heads", [LayerPlan.of(p) for p in plans])
    return config, True, auto_class, why


def choose_heads(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, options: PruneHeadsOptions
) -> tuple[list[set[int]], torch.Tensor]:
    """(per layer the units removed, the last importance scores [layers, units]): random, or gradient importance in
    ``--iterative`` steps, each removing its share of the target on the scores of the model pruned so far."""
    total, min_units = removal_targets(spec, options)
    units, _, _ = units_of(spec)
    if total and options.importance == "gradient" and not options.calibration:
        raise UpcycleError(
            "--importance gradient needs calibration text; pass --calibration FILE or use --importance random"
        )
    removed: list[set[int]] = [set() for _ in range(spec.num_layers)]
    scores = torch.zeros(spec.num_layers, units, dtype=torch.float64)
    steps = options.iterative if total else 0
    if total and options.importance == "random":
        scores = torch.rand(
            spec.num_layers, units, generator=torch.Generator().manual_seed(options.seed), dtype=torch.float64
        )
        removed = choose_removals(scores, removed, total, min_units, options.uniform)
    elif total:
        scorer: Callable[[list[set[int]]], torch.Tensor] = GradientScorer(reader, spec, options)
        for step in range(1, steps + 1):
            scores = scorer(removed)
            target = (
                round_half_up(total * step / steps)
                if not options.uniform
                else round_half_up(total // spec.num_layers * step / steps) * spec.num_layers
            )
            removed = choose_removals(scores, removed, target, min_units, options.uniform)
        del scorer
    return removed, scores


def pruned_layout(
    reader: CheckpointReader, spec: DecoderSpec | EncoderSpec, edits: dict[str, tuple[list[int], int]]
) -> list[TensorSpec]:
    """Every tensor of the source with the sliced ones' new shapes (``edits``: name -> (kept heads, dim))."""
    layout = []
    for name in reader.names():
        info = reader.info(name)
        shape = list(info.shape)
        if name in edits:
            kept, dim = edits[name]
            shape[dim] = len(kept) * spec.head_dim
        layout.append(TensorSpec(name, info.dtype, tuple(shape)))
    return layout


def describe(
    spec: DecoderSpec | EncoderSpec,
    options: PruneHeadsOptions,
    plans: list[AttentionHeads],
    removed: int,
    refitted: bool,
    form: str,
) -> str:
    """The card's one-paragraph description of the pruning (``removed``: units removed in all)."""
    units, _, unit_name = units_of(spec)
    kept_per_layer = [len(p.kept_heads) for p in plans]
    return (
        f"Attention-head pruning ({options.importance} importance"
        f"{', ' + str(options.iterative) + ' steps' if options.iterative > 1 else ''}): "
        f"{removed} of {units * spec.num_layers} {unit_name} removed "
        f"({'the same number in every layer' if len(set(kept_per_layer)) == 1 else 'per-layer counts'}), "
        f"{sum(kept_per_layer)} of {spec.num_heads * spec.num_layers} query heads kept"
        f"{f'; o_proj refitted ({options.refit}) on calibration text' if refitted else ''}; written as {form}."
    )


def convert(reader: CheckpointReader, options: PruneHeadsOptions) -> Conversion:
    """Plan the head pruning of the dense decoder or BERT encoder behind ``reader``."""
    check_refit(options.refit, options.calibration, options.refit_ridge)
    ridge = parse_ridge(options.refit_ridge)
    normalize_per_layer(options.normalize, 0)  # validate the flag before any work
    spec = attention_spec(reader.config, reader.names(), str(reader.folder))
    check_source(reader, spec, options)
    units, heads_per_unit, unit_name = units_of(spec)
    removed, scores = choose_heads(reader, spec, options)
    plans = kept_heads(spec, removed)
    config, uses_runtime, auto_class, why = output_config(reader, spec, plans)
    edits = sliced_tensors(reader, spec, plans)
    refits, refit_report = {}, None
    if options.refit != "none":
        changed = [layer for layer, plan in enumerate(plans) if len(plan.kept_heads) < spec.num_heads]
        refits, refit_report = refit_conversion(
            reader, spec, options.refit, changed, lambda model: apply_plans(model, plans, changed), options, ridge
        )
    layout = pruned_layout(reader, spec, edits)

    def tensors():
        for item in layout:
            if item.name in refits:
                yield item.name, refits[item.name]
            elif item.name in edits:
                kept, dim = edits[item.name]
                yield item.name, head_rows(reader.get(item.name), kept, spec.head_dim, dim)
            else:
                yield item.name, SourceTensor(item.name)

    plain = "a plain checkpoint of the base architecture"
    form = "an upcycle checkpoint with per-layer head counts" if uses_runtime else plain
    return Conversion(
        method="prune-heads",
        config=config,
        layout=layout,
        tensors=tensors,
        plan_lines=plan_printout(spec, plans, options, unit_name, why)
        + ([refit_plan_line(refit_report)] if refit_report else []),
        report={
            "options": recorded_options(options),
            "units": {
                "kind": unit_name,
                "per_layer": units,
                "heads_per_unit": heads_per_unit,
                "removed": sum(map(len, removed)),
            },
            "heads_kept_per_layer": [len(p.kept_heads) for p in plans],
            "kept": [p.to_json() for p in plans],
            "kv_heads_kept_per_layer": [len(p.kept_kv_heads) for p in plans],
            "head_scores": scores.tolist(),
            "output_format": "native" if not uses_runtime else f"upcycle ({why})",
        }
        | ({"refit": refit_report} if refit_report else {}),
        tags=["pruned", "head-pruning"],
        description=describe(spec, options, plans, sum(map(len, removed)), bool(refits), form),
        uses_runtime=uses_runtime,
        auto_class=auto_class,
        pipeline_tag="text-generation"
        if isinstance(spec, DecoderSpec)
        else "fill-mask"
        if spec.mlm_head
        else "feature-extraction",
    )


def plan_printout(
    spec: DecoderSpec | EncoderSpec, plans: list[AttentionHeads], options: PruneHeadsOptions, unit_name: str, why: str
) -> list[str]:
    """One line per layer: query heads and KV heads kept."""
    kept = [len(p.kept_heads) for p in plans]
    lines = [
        f"head pruning plan: {spec.num_layers} layers x {spec.num_heads} query heads "
        f"({spec.num_kv_heads} KV heads, head_dim {spec.head_dim}); "
        f"units: {unit_name}; importance {options.importance}; ratio {options.ratio}",
        f"query heads kept: {sum(kept)}/{spec.num_heads * spec.num_layers}; output: "
        + (
            "plain base-architecture checkpoint"
            if why == "uniform"
            else f"upcycle checkpoint with per-layer head counts ({why})"
        ),
        f"{'layer':>5}  {'kept':>4}  kept heads (KV heads)",
    ]
    for layer, plan in enumerate(plans):
        heads, kv_heads = plan.kept_heads, plan.kept_kv_heads
        kv = "" if kv_heads == heads else f"  ({' '.join(map(str, kv_heads))})"
        lines.append(f"{layer:>5}  {len(heads):>4}  {' '.join(map(str, heads))}{kv}")
    return lines


def card_table(report: dict, config: dict) -> list[str]:
    """The card's plan: query heads kept per layer (from the report: a uniform output is a plain checkpoint)."""
    from ..tables import layer_ranges, markdown_table

    if not report.get("kept"):
        return []
    units = report.get("units") or {}
    total = (units.get("per_layer") or 0) * (units.get("heads_per_unit") or 0) or "?"
    rows = []
    for index, kept in enumerate(report["kept"]):
        count, heads, kv_heads = AttentionHeads(kept["kept_heads"], kept.get("kept_kv_heads") or []).cells()
        rows.append((index, f"{count} of {total}", heads, kv_heads))
    return markdown_table(("layers", *AttentionHeads.COLUMNS), layer_ranges(rows))


CITATION = """@inproceedings{michel2019sixteen,
  title = {Are Sixteen Heads Really Better than One?},
  author = {Michel, Paul and Levy, Omer and Neubig, Graham},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2019},
  eprint = {1905.10650},
  archivePrefix = {arXiv}
}"""

SPEC = MethodSpec(
    name="prune-heads",
    summary="Remove the least important attention heads (gradient importance).",
    panel="Head pruning",
    options=PruneHeadsOptions,
    convert=convert,
    sources=("decoder", "encoder"),
    example="upcycle convert SRC OUT --method prune-heads --ratio 0.25 --calibration text.txt [--uniform]",
    card=MethodCard(
        "attention-head pruning",
        "Many attention heads can be removed with little loss (Michel et al. 2019): removing the least important "
        "ones, ranked by the gradient of a gate on each head, gives a smaller model with a smaller KV cache.",
        (CITATION,),
    ),
    card_table=card_table,
)
