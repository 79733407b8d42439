"""MoH, Mixture-of-Head attention (Jin et al. 2024): heads become experts.

Per layer, ``shared`` query heads are always on and ``top_k`` of the ``routed`` ones
are chosen per token by a router (query-norm: parameter-free; learned: the paper's
two-stage router, zero-initialised; fitted: a linear scorer fitted on calibration text to
pick the heads that contribute most). Every existing tensor passes through unchanged, except
o_proj with ``rescale``; the learned router adds three small zero matrices per layer, the
fitted one a scorer per layer.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..arch import DecoderSpec, decoder_spec
from ..background import in_background
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import TensorSpec
from ..errors import UpcycleError
from ..lazy import no_grad
from ..modeling.plan import ROUTER_KINDS, HeadGate, LayerPlan
from .base import (
    Conversion,
    SourceTensor,
    check_source,
    progress,
    recorded_options,
    runtime_config,
    source_layout,
    source_parameters,
)
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
else:
    from ..lazy import torch

Selection = Literal["first", "weight-norm", "contribution"]
Rescale = Literal["none", "layer", "channel"]
FIT_STEPS = 300  # Adam steps of the fitted router's scorer, per layer
FIT_CHUNK = 256  # tokens per chunk when expanding per-head outputs [chunk, heads, D]


@dataclass
class MoHOptions:
    """The MoH flags of ``upcycle convert`` (and keys of a recipe's ``convert:`` section)."""

    router: Literal[ROUTER_KINDS] = option(
        "query-norm",
        help="query-norm (parameter-free, MoH-LLaMA3), learned (two-stage, zero-initialised) or fitted "
        "(a linear scorer fitted on --calibration text to pick the heads that contribute most; binary gates).",
    )
    shared_heads: str = option("0.5", help="query heads always on, as a fraction (0.5) or a count (4).")
    active_heads: float = option(
        0.75, help="fraction of query heads active per token, in (shared fraction, 1].", example="0.75"
    )
    shared_selection: Selection | None = option(
        None, help="which heads are shared. Default: contribution with --calibration, else weight-norm."
    )
    calibration: list[str] = calibration_option()
    calibration_weights: list[float] = calibration_weights_option()
    calibration_tokens: int = calibration_tokens_option()
    calibration_seq_len: int = 512
    rescale: Rescale = option(
        "none",
        help="scale o_proj by one factor per layer (layer) or per output channel (channel), fitted layer after "
        "layer by least squares so the attention output best matches dense on --calibration text; none keeps o_proj.",
    )
    trust_remote_code: bool = False  # use SRC although its config names code of its own (never run nor copied)


def head_counts(num_heads: int, shared_heads: str, active_heads: float) -> tuple[int, int]:
    """(shared count, routed top-k) from the flags, rounding fractions to the nearest head."""
    text = str(shared_heads).strip()
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UpcycleError(
            f"--shared-heads {text!r} is not a finite number; give a fraction like 0.5 or a head count like 4"
        ) from None
    if "." in text or value < 1:
        if not 0 <= value <= 1:
            raise UpcycleError(f"--shared-heads {text} is not a fraction in [0, 1]; give a fraction or a head count")
        shared = math.floor(value * num_heads + 0.5)
    else:
        shared = int(value)
        if value != shared or not 0 <= shared <= num_heads:
            raise UpcycleError(
                f"--shared-heads {text} is not a head count in [0, {num_heads}]; give a count or a fraction"
            )
    if not 0 < active_heads <= 1:
        raise UpcycleError(f"--active-heads {active_heads} is outside (shared fraction, 1]; give a fraction like 0.75")
    active = math.floor(active_heads * num_heads + 0.5)
    if active_heads < 1 and shared >= num_heads:
        raise UpcycleError(
            f"--shared-heads {text} makes all {num_heads} heads shared, "
            f"which leaves no routed head for --active-heads {active_heads}; "
            "share fewer heads or use --active-heads 1.0"
        )
    if active <= shared and active < num_heads:
        raise UpcycleError(
            f"--active-heads {active_heads} ({active} of {num_heads} heads) is outside (shared fraction, 1]: "
            f"with {shared} shared heads it must keep more than {shared}; raise --active-heads or lower --shared-heads"
        )
    return shared, active - shared


def weight_norm_scores(reader: CheckpointReader, spec: DecoderSpec) -> list[list[float]]:
    """Per layer and query head: ||o_proj slice|| * ||v_proj slice of its KV head|| (no data)."""
    group = spec.num_heads // spec.num_kv_heads
    scores = []
    for layer in range(spec.num_layers):
        o_proj = reader.get(spec.attention(layer, "o_proj")).float()  # [D, h*d]
        v_proj = reader.get(spec.attention(layer, "v_proj")).float()  # [g*d, D]
        o_norm = o_proj.view(o_proj.shape[0], spec.num_heads, spec.head_dim).norm(dim=(0, 2))  # [h]
        v_norm = v_proj.view(spec.num_kv_heads, spec.head_dim, -1).norm(dim=(1, 2))  # [g]
        scores.append((o_norm * v_norm.repeat_interleave(group)).tolist())
    return scores


def calibration_model(
    reader: CheckpointReader, options: MoHOptions, purpose: str
) -> tuple[torch.Tensor, torch.nn.Module]:
    """The calibration blocks [N, T] and the dense model loaded for a pass over them (``purpose`` names it)."""
    from ..checkpoint.load import load_for_analysis
    from ..data.calibration import options_calibration_blocks

    blocks = options_calibration_blocks(reader, options, encoder=False)
    return blocks, load_for_analysis(reader.folder, source_parameters(reader), purpose)


@no_grad
def contribution_scores(reader: CheckpointReader, spec: DecoderSpec, options: MoHOptions) -> list[list[float]]:
    """Per layer and query head: mean L2 norm of the head's output through o_proj on calibration text."""
    blocks, model = calibration_model(reader, options, "contribution scores")  # blocks [N, T]
    sums = torch.zeros(spec.num_layers, spec.num_heads, dtype=torch.float64)

    def hook(layer: int):
        def accumulate(o_proj: torch.nn.Linear, args: tuple) -> None:
            heads = args[0].float().unflatten(-1, (spec.num_heads, spec.head_dim))  # [B, T, h, d]
            weight = o_proj.weight.float().view(-1, spec.num_heads, spec.head_dim)  # [D, h, d]
            per_head = torch.einsum("bthd,Dhd->bthD", heads, weight)  # [B, T, h, D]
            sums[layer] += per_head.norm(dim=-1).sum(dim=(0, 1)).double().cpu()

        return accumulate

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        for block in progress(blocks, "contribution scores", unit="block"):
            model(block.unsqueeze(0).to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    return (sums / blocks.numel()).tolist()


@dataclass
class LayerFit:
    """What the calibration fit made for one layer."""

    router: dict[str, torch.Tensor]  # the fitted router's tensors by name under head_router. (empty for other routers)
    o_scale: torch.Tensor | None  # factor on o_proj's rows: [D] (channel) or [1] (layer); None: o_proj unchanged
    report: dict


class _Stop(Exception):
    """Ends a forward once layer 0's input is captured."""


def _layer_inputs(model: torch.nn.Module, blocks: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Layer 0's input for every block [N, T, D], and each decoder layer's keyword arguments
    (mask, positions: the same for every block of T tokens)."""
    layers = model.model.layers
    kwargs: list[dict] = [{} for _ in layers]

    def keep(index: int):
        return lambda module, args, kw: kwargs[index].update(kw)

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(blocks[:1].to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    inputs = []

    def stop(module, args, kw):
        inputs.append(args[0])
        raise _Stop

    handle = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for block in blocks:
            try:
                model(block[None].to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(inputs), kwargs


def _run_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The decoder layer's output for every block: [N, T, D] -> [N, T, D]."""
    return torch.cat([layer(block[None], **kwargs) for block in hidden])


def _record_dense(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
    """Run the layer over every block with every head on, recording per token (M = N*T) the router's input
    ``x`` [M, D] and its ``gates`` [M, h] (what it would choose), o_proj's input ``heads`` [M, h*d] and output
    ``o`` [M, D]."""
    attention = layer.self_attn
    seen: dict[str, list[torch.Tensor]] = {"x": [], "gates": [], "heads": [], "o": []}

    def router_hook(module, args, gates):
        seen["x"].append(args[0].flatten(0, 1).float())
        seen["gates"].append(gates.flatten(0, 1))
        return torch.ones_like(gates)

    handles = [
        attention.head_router.register_forward_hook(router_hook),
        attention.o_proj.register_forward_pre_hook(
            lambda module, args: seen["heads"].append(args[0].flatten(0, 1).float())
        ),
        attention.o_proj.register_forward_hook(lambda module, args, out: seen["o"].append(out.flatten(0, 1).float())),
    ]
    try:
        _run_layer(layer, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(values) for name, values in seen.items()}


def _routed_contributions(
    heads: torch.Tensor, o_weight: torch.Tensor, routed: list[int], head_dim: int
) -> torch.Tensor:
    """||H_i W_o^i|| per token of each routed head: heads [M, h*d], o_weight [D, h*d] -> [M, hr]."""
    index = torch.tensor(routed)
    weight = o_weight.float().unflatten(1, (-1, head_dim))[:, index]  # [D, hr, d]
    norms = []
    for chunk in heads.split(FIT_CHUNK):
        per_head = chunk.unflatten(1, (-1, head_dim))[:, index]  # [m, hr, d]
        norms.append(torch.einsum("mhd,Dhd->mhD", per_head, weight).norm(dim=-1))
    return torch.cat(norms)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask [M, hr] of each token's k largest scores."""
    return torch.zeros_like(scores).scatter(-1, scores.topk(k, dim=-1).indices, 1.0)


def fit_scorer(
    x: torch.Tensor, contributions: torch.Tensor, steps: int = FIT_STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``s = W x + b`` so that softmax(s) matches each token's distribution of routed-head contributions
    (cross-entropy, full-batch Adam); x [M, D], contributions [M, hr] -> (W [hr, D], b [hr])."""
    target = contributions / contributions.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # [M, hr]
    scale = x.pow(2).mean().sqrt().clamp_min(1e-6)  # fit on x / scale, so one learning rate suits every model
    x = x / scale  # once: every step reads all of x, and a division per step makes the fit three times slower
    with torch.enable_grad():
        weight = torch.zeros(contributions.shape[1], x.shape[1], requires_grad=True)
        bias = torch.zeros(contributions.shape[1], requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
        for _ in range(steps):
            logits = x @ weight.T + bias  # [M, hr]
            loss = -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return weight.detach() / scale, bias.detach()


def _rescale(o_moh: torch.Tensor, o_dense: torch.Tensor, mode: str) -> torch.Tensor:
    """o_proj row factors a, [1] (layer) or [D] (channel), minimising ||a o_moh - o_dense|| (least squares).

    Matching the RMS instead (LLaMA-MoE-v2's criterion) overshoots where the skipped heads' output is not
    along the kept heads' one; the least-squares factor never raises the error (a = 1 is a candidate).
    """
    dims = (0, 1) if mode == "layer" else (0,)
    return ((o_moh * o_dense).sum(dims) / o_moh.pow(2).sum(dims).clamp_min(1e-12)).reshape(-1)


def _relative_error(o_moh: torch.Tensor, o_dense: torch.Tensor) -> float:
    """||o_moh - o_dense|| / ||o_dense|| over all calibration tokens."""
    return ((o_moh - o_dense).norm() / o_dense.norm().clamp_min(1e-12)).item()


@no_grad
def calibration_fit(
    reader: CheckpointReader, spec: DecoderSpec, options: MoHOptions, plans: list[HeadGate]
) -> list[LayerFit]:
    """Fit, layer after layer on calibration text, the fitted router's scorer and/or the o_proj scale (``rescale``).

    Layer l is measured on the hidden states of the converted layers < l (routers and scales already in
    place), against the same layer with every head on.
    """
    from ..modeling.gated_attention import ATTENTION_NAME, attach_head_router, register_attention
    from ..modeling.routers import build_router

    blocks, model = calibration_model(reader, options, "MoH calibration fit")  # blocks [N, T]
    register_attention()
    model.config._attn_implementation = ATTENTION_NAME  # attention without a head_router stays plain SDPA
    hidden, layer_kwargs = _layer_inputs(model, blocks)
    fits = []
    for index, (layer, gate) in enumerate(
        progress(list(zip(model.model.layers, plans)), "MoH calibration fit", unit="layer")
    ):
        heads = (spec.hidden_size, spec.num_heads, gate.shared_heads, gate.routed_heads, gate.top_k)
        attention = layer.self_attn
        attach_head_router(attention, build_router("query-norm", *heads))
        dense = _record_dense(layer, hidden, layer_kwargs[index])
        routed = torch.tensor(gate.routed_heads)
        contributions = _routed_contributions(
            dense["heads"], attention.o_proj.weight, gate.routed_heads, spec.head_dim
        )
        oracle = _top_k(contributions, gate.top_k)  # [M, hr]

        def agreement(gates: torch.Tensor) -> float:
            return (gates[:, routed] == oracle).all(dim=-1).float().mean().item()

        def gated_output(gates: torch.Tensor) -> torch.Tensor:  # [M, h] -> [M, D]: the output of the gated heads only
            skipped = (dense["heads"].unflatten(1, (spec.num_heads, spec.head_dim)) * (1 - gates)[..., None]).flatten(
                1
            )  # [M, h*d]
            return dense["o"] - skipped @ attention.o_proj.weight.float().T

        o_moh = gated_output(dense["gates"])
        report = {
            "layer": index,
            "oracle_match": {"query-norm": agreement(dense["gates"])},
            "attention_error": {"query-norm": _relative_error(o_moh, dense["o"])},
        }
        tensors = {}
        if options.router == "fitted":
            weight, bias = fit_scorer(dense["x"], contributions)
            tensors = {"score_proj.weight": weight, "score_proj.bias": bias}
            router = build_router("fitted", *heads)
            router.load_state_dict(tensors)
            gates = router(dense["x"][None])[0]  # [M, h]
            o_moh = gated_output(gates)
            report["oracle_match"]["fitted"] = agreement(gates)
            report["attention_error"]["fitted"] = _relative_error(o_moh, dense["o"])
            attach_head_router(attention, router.to(attention.o_proj.weight))
        scale = None
        if options.rescale != "none":
            scale = _rescale(o_moh, dense["o"], options.rescale)
            report["attention_error"]["rescaled"] = _relative_error(o_moh * scale, dense["o"])
            report["o_scale_mean"] = scale.mean().item()
            attention.o_proj.weight.mul_(scale[:, None].to(attention.o_proj.weight))
            if attention.o_proj.bias is not None:
                attention.o_proj.bias.mul_(scale.to(attention.o_proj.bias))
        fits.append(LayerFit(tensors, scale, report))
        hidden = _run_layer(layer, hidden, layer_kwargs[index])
    return fits


def fit_summary(fits: list[LayerFit]) -> dict:
    """The report's ``calibration_fit``: per-layer figures and their means over layers."""
    mean = {}
    for key in ("oracle_match", "attention_error"):
        names = fits[0].report[key]
        mean[key] = {name: sum(f.report[key][name] for f in fits) / len(fits) for name in names}
    print(
        "MoH calibration fit, mean over layers: "
        + "; ".join(
            f"{key.replace('_', ' ')} " + ", ".join(f"{name} {value:.3f}" for name, value in values.items())
            for key, values in mean.items()
        ),
        file=sys.stderr,
    )
    return {"mean": mean, "layers": [f.report for f in fits]}


def layer_plans(
    spec: DecoderSpec, router: str, shared_count: int, top_k: int, scores: list[list[float]] | None
) -> list[HeadGate]:
    """Per layer, its head gate: the top-scored heads shared (or the first ones)."""
    plans = []
    for layer in range(spec.num_layers):
        if scores is None:
            order = list(range(spec.num_heads))
        else:
            order = sorted(range(spec.num_heads), key=lambda head: -scores[layer][head])
        shared = sorted(order[:shared_count])
        routed = sorted(order[shared_count:])
        plans.append(HeadGate(router=router, shared_heads=shared, routed_heads=routed, top_k=top_k))
    return plans


def router_tensors(spec: DecoderSpec, plans: list[HeadGate], dtype: torch.dtype) -> list[TensorSpec]:
    """The new tensors of the learned and fitted routers (none for query-norm)."""
    new = []
    for layer, gate in enumerate(plans):
        prefix = f"{spec.layer_prefix(layer)}self_attn.head_router."
        routed = len(gate.routed_heads)
        if gate.router == "fitted" and routed:
            new += [
                TensorSpec(f"{prefix}score_proj.weight", dtype, (routed, spec.hidden_size)),
                TensorSpec(f"{prefix}score_proj.bias", dtype, (routed,)),
            ]
        if gate.router != "learned":
            continue
        sizes = {"shared_proj": len(gate.shared_heads), "routed_proj": routed}
        if sizes["shared_proj"] and sizes["routed_proj"]:
            sizes["mix_proj"] = 2
        new += [
            TensorSpec(f"{prefix}{proj}.weight", dtype, (rows, spec.hidden_size))
            for proj, rows in sizes.items()
            if rows
        ]
    return new


def checked_selection(options: MoHOptions) -> str:
    """How the shared heads are chosen (``--shared-selection``, or its default), after one line for a choice that
    needs calibration text given without it."""
    selection = options.shared_selection or ("contribution" if options.calibration else "weight-norm")
    if selection == "contribution" and not options.calibration:
        raise UpcycleError(
            "--shared-selection contribution needs calibration text; pass --calibration FILE or choose weight-norm"
        )
    for flag, needed, other in (
        ("--router fitted", options.router == "fitted", "--router query-norm"),
        (f"--rescale {options.rescale}", options.rescale != "none", "--rescale none"),
    ):
        if needed and not options.calibration:
            raise UpcycleError(f"{flag} is fitted on calibration text; pass --calibration FILE or use {other}")
    return selection


def checked_head_counts(spec: DecoderSpec, options: MoHOptions) -> tuple[int, int]:
    """(shared heads, routed heads per token), after one line when every head would be shared."""
    shared_count, top_k = head_counts(spec.num_heads, options.shared_heads, options.active_heads)
    if shared_count >= spec.num_heads:  # head_counts allows it (--active-heads 1.0 is the dense model in MoH form)
        raise UpcycleError(
            f"--shared-heads {options.shared_heads} makes all {spec.num_heads} heads shared, "
            "which leaves no routed head "
            "(the output would only be the dense model); "
            f"share fewer heads, e.g. --shared-heads {spec.num_heads // 2} or 0.5"
        )
    return shared_count, top_k


def output_tensors(
    reader: CheckpointReader,
    spec: DecoderSpec,
    options: MoHOptions,
    plans: list[HeadGate],
    layout: tuple[list[TensorSpec], list[TensorSpec]],
    report: dict,
    fit: bool,
):
    """(name, tensor) of the output: the source's tensors (o_proj rescaled where fitted), then the routers' (fitted,
    or zero-initialised). ``layout``: (the source's tensors, the routers'). The fit runs here, when the output is
    written (not for --dry-run); with every head active it is skipped: no routed head is ever off, so the fitted
    router is all ties and o_proj keeps the dense output's scale."""
    passthrough, new = layout
    fits = calibration_fit(reader, spec, options, plans) if fit else []
    scales = {
        spec.attention(i, "o_proj", part): f.o_scale
        for i, f in enumerate(fits)
        if f.o_scale is not None
        for part in ("weight", "bias")
    }
    fitted = {
        f"{spec.layer_prefix(i)}self_attn.head_router.{name}": tensor
        for i, f in enumerate(fits)
        for name, tensor in f.router.items()
    }
    if fits:
        report["calibration_fit"] = fit_summary(fits)
    for item in passthrough:
        if item.name in scales:
            original = reader.get(item.name).float()  # o_proj weight [D, h*d] or bias [D]
            yield item.name, (original * scales[item.name].view(-1, *[1] * (original.dim() - 1))).to(item.dtype)
        else:
            yield item.name, SourceTensor(item.name)
    for item in new:
        yield (
            item.name,
            fitted[item.name].to(item.dtype) if item.name in fitted else torch.zeros(item.shape, dtype=item.dtype),
        )


def describe(spec: DecoderSpec, options: MoHOptions, shared_count: int, top_k: int, selection: str) -> str:
    """The card's one-paragraph description of the conversion."""
    active = shared_count + top_k
    return (
        f"Mixture-of-Head attention: in every layer {shared_count} of {spec.num_heads} query heads "
        "are shared (always on) "
        f"and each token uses the top {top_k} of the other {spec.num_heads - shared_count} "
        f"({options.router} router), "
        f"so {active}/{spec.num_heads} = {active / spec.num_heads:.1%} of the heads are active per token. "
        f"Shared heads chosen by {selection}."
        + (
            f" o_proj rescaled per {options.rescale} to match the dense attention output on calibration text."
            if options.rescale != "none"
            else ""
        )
    )


def convert(reader: CheckpointReader, options: MoHOptions) -> Conversion:
    """Plan the MoH conversion of the dense decoder behind ``reader``."""
    selection = checked_selection(options)
    spec = decoder_spec(reader.config, str(reader.folder))
    shared_count, top_k = checked_head_counts(spec, options)
    check_source(reader, spec, options)

    fit = top_k < spec.num_heads - shared_count and (options.router == "fitted" or options.rescale != "none")
    scoring = None
    if selection == "first":
        scores = None
    elif selection == "weight-norm" and not fit:
        # the scores pick the shared heads, which changes config.json and no tensor (the router tensors' shapes
        # depend on the head counts only): they are computed beside the copies, and the plan is settled after them
        scoring = in_background(lambda: weight_norm_scores(reader, spec), "moh-weight-norm")
        scores = None
    elif selection == "weight-norm":
        scores = weight_norm_scores(reader, spec)
    else:
        scores = contribution_scores(reader, spec, options)
    plans = layer_plans(spec, options.router, shared_count, top_k, scores)  # with scoring: the shapes, for now

    dtype = reader.info(spec.attention(0, "q_proj")).dtype
    passthrough = source_layout(reader)
    new = router_tensors(spec, plans, dtype)
    report = {
        "options": recorded_options(options) | {"shared_selection": selection},
        "heads": {
            "total": spec.num_heads,
            "shared": shared_count,
            "routed": spec.num_heads - shared_count,
            "top_k": top_k,
            "active_fraction": (shared_count + top_k) / spec.num_heads,
        },
        "head_scores": scores,
    }
    config, _, _ = runtime_config(reader.config, spec, "moh", [LayerPlan.of(gate) for gate in plans])
    conversion = Conversion(
        method="moh",
        config=config,
        layout=passthrough + new,
        tensors=lambda: output_tensors(reader, spec, options, plans, (passthrough, new), report, fit),
        plan_lines=plan_printout(spec, plans, selection),
        report=report,
        tags=["moh", "mixture-of-heads"],
        description=describe(spec, options, shared_count, top_k, selection),
    )
    if scoring is not None:

        def settle() -> None:
            scored = scoring.result()
            plans[:] = layer_plans(spec, options.router, shared_count, top_k, scored)
            report["head_scores"] = scored
            conversion.config = runtime_config(reader.config, spec, "moh", [LayerPlan.of(gate) for gate in plans])[0]
            conversion.plan_lines = plan_printout(spec, plans, selection)

        conversion.settle = settle
    return conversion


def plan_printout(spec: DecoderSpec, plans: list[HeadGate], selection: str) -> list[str]:
    """One line per layer: shared heads, routed heads and top-k."""
    first = plans[0]
    active = len(first.shared_heads) + first.top_k
    lines = [
        f"MoH plan: {spec.num_layers} layers x {spec.num_heads} query heads "
        f"({spec.num_kv_heads} KV heads, head_dim {spec.head_dim}); "
        f"router {first.router}; shared heads by {selection}",
        f"active heads per token: {active}/{spec.num_heads} = {active / spec.num_heads:.4f} "
        f"({len(first.shared_heads)} shared + top-{first.top_k} of {len(first.routed_heads)} routed)",
        f"{'layer':>5}  {'shared heads':<{3 * spec.num_heads}}  {'routed heads':<{3 * spec.num_heads}}  top-k",
    ]
    for layer, gate in enumerate(plans):
        shared = " ".join(str(h) for h in gate.shared_heads)
        routed = " ".join(str(h) for h in gate.routed_heads)
        lines.append(f"{layer:>5}  {shared:<{3 * spec.num_heads}}  {routed:<{3 * spec.num_heads}}  {gate.top_k}")
    return lines


CITATION = """@article{jin2024moh,
  title = {{MoH}: Multi-Head Attention as Mixture-of-Head Attention},
  author = {Jin, Peng and Zhu, Bo and Yuan, Li and Yan, Shuicheng},
  journal = {arXiv preprint arXiv:2410.11842},
  year = {2024}
}"""

SPEC = MethodSpec(
    name="moh",
    summary="Mixture-of-Head attention: shared heads always on, routed heads top-k per token.",
    panel="MoH",
    options=MoHOptions,
    convert=convert,
    example="upcycle convert ./SmolLM2-135M ./smollm2-moh --active-heads 0.75",
    card=MethodCard(
        "Mixture-of-Head attention (MoH)",
        "Heads are treated as experts: shared heads are always on and each token adds only the routed heads its "
        "router selects, so a head-sparse attention computes fewer heads per token. The MoH paper reports that "
        "LLaMA3-8B, continue-tuned with 75% of its heads active, stays close to the dense model (64.0 against 64.7 "
        "on average over 14 benchmarks).",
        (CITATION,),
    ),
)
