"""MoH, Mixture-of-Head attention (Jin et al. 2024): heads become experts.

Per layer, ``shared`` query heads are always on and ``top_k`` of the ``routed`` ones
are chosen per token by a router (query-norm: parameter-free; learned: the paper's
two-stage router, zero-initialised). Every existing tensor passes through unchanged;
the learned router adds three small zero matrices per layer.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..arch import DecoderSpec, decoder_spec
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import TensorSpec
from ..errors import UpcycleError
from ..modeling.routers import ROUTERS
from .base import Conversion, SourceTensor, runtime_config

SELECTIONS = ("first", "weight-norm", "contribution")


@dataclass
class MoHOptions:
    """The MoH flags of ``upcycle convert``."""

    router: str = "query-norm"
    shared_heads: str = "0.5"
    active_heads: float = 0.75
    shared_selection: str | None = None  # None: contribution with calibration text, else weight-norm
    calibration: Path | None = None
    calibration_tokens: int = 16384
    calibration_seq_len: int = 512


Options = MoHOptions


def head_counts(num_heads: int, shared_heads: str, active_heads: float) -> tuple[int, int]:
    """(shared count, routed top-k) from the flags, rounding fractions to the nearest head."""
    text = str(shared_heads).strip()
    try:
        value = float(text)
    except ValueError:
        raise UpcycleError(f"--shared-heads {text!r} is not a number; give a fraction like 0.5 or a head count like 4") from None
    if "." in text or value < 1:
        if not 0 <= value <= 1:
            raise UpcycleError(f"--shared-heads {text} is not a fraction in [0, 1]; give a fraction or a head count")
        shared = math.floor(value * num_heads + 0.5)
    else:
        shared = int(value)
        if value != shared or not 0 <= shared <= num_heads:
            raise UpcycleError(f"--shared-heads {text} is not a head count in [0, {num_heads}]; give a count or a fraction")
    if not 0 < active_heads <= 1:
        raise UpcycleError(f"--active-heads {active_heads} is outside (shared fraction, 1]; give a fraction like 0.75")
    active = math.floor(active_heads * num_heads + 0.5)
    if active_heads < 1 and shared >= num_heads:
        raise UpcycleError(
            f"--shared-heads {text} makes all {num_heads} heads shared, which leaves no routed head for --active-heads {active_heads}; share fewer heads or use --active-heads 1.0"
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


@torch.no_grad()
def contribution_scores(reader: CheckpointReader, spec: DecoderSpec, options: MoHOptions) -> list[list[float]]:
    """Per layer and query head: mean L2 norm of the head's output through o_proj on calibration text."""
    from ..checkpoint.load import load_for_analysis
    from ..data.calibration import calibration_blocks

    blocks = calibration_blocks(reader.folder, reader.config, options.calibration, options.calibration_tokens,
                                options.calibration_seq_len, encoder=False)  # [N, T]
    num_parameters = sum(math.prod(reader.info(name).shape) for name in reader.names())
    model = load_for_analysis(reader.folder, num_parameters, "contribution scores")
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
        for index, block in enumerate(blocks):
            print(f"\rcontribution scores: block {index + 1}/{len(blocks)}", end="", file=sys.stderr, flush=True)
            model(block.unsqueeze(0).to(model.device))
        print(file=sys.stderr)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / blocks.numel()).tolist()


def layer_plans(spec: DecoderSpec, router: str, shared_count: int, top_k: int, scores: list[list[float]] | None) -> list[dict]:
    """Per-layer ``head_gate`` entries: the top-scored heads shared (or the first ones)."""
    plans = []
    for layer in range(spec.num_layers):
        if scores is None:
            order = list(range(spec.num_heads))
        else:
            order = sorted(range(spec.num_heads), key=lambda head: -scores[layer][head])
        shared = sorted(order[:shared_count])
        routed = sorted(order[shared_count:])
        gate = {"router": router, "shared_heads": shared, "routed_heads": routed, "top_k": top_k}
        plans.append({"head_gate": gate})
    return plans


def router_tensors(spec: DecoderSpec, plans: list[dict], dtype: torch.dtype) -> list[TensorSpec]:
    """The new tensors of the learned router (none for query-norm)."""
    new = []
    for layer, plan in enumerate(plans):
        gate = plan["head_gate"]
        if gate["router"] != "learned":
            continue
        prefix = f"{spec.layer_prefix(layer)}self_attn.head_router."
        sizes = {"shared_proj": len(gate["shared_heads"]), "routed_proj": len(gate["routed_heads"])}
        if sizes["shared_proj"] and sizes["routed_proj"]:
            sizes["mix_proj"] = 2
        new += [TensorSpec(f"{prefix}{proj}.weight", dtype, (rows, spec.hidden_size)) for proj, rows in sizes.items() if rows]
    return new


def convert(reader: CheckpointReader, options: MoHOptions) -> Conversion:
    """Plan the MoH conversion of the dense decoder behind ``reader``."""
    if options.router not in ROUTERS:
        raise UpcycleError(f"--router {options.router!r} is unknown; choose one of: {', '.join(ROUTERS)}")
    selection = options.shared_selection or ("contribution" if options.calibration else "weight-norm")
    if selection not in SELECTIONS:
        raise UpcycleError(f"--shared-selection {selection!r} is unknown; choose one of: {', '.join(SELECTIONS)}")
    if selection == "contribution" and not options.calibration:
        raise UpcycleError("--shared-selection contribution needs calibration text; pass --calibration FILE or choose weight-norm")
    if options.calibration and not Path(options.calibration).exists():
        raise UpcycleError(f"--calibration {options.calibration} does not exist; pass a text or jsonl file")
    spec = decoder_spec(reader.config, str(reader.folder))
    shared_count, top_k = head_counts(spec.num_heads, options.shared_heads, options.active_heads)

    if selection == "first":
        scores = None
    elif selection == "weight-norm":
        scores = weight_norm_scores(reader, spec)
    else:
        scores = contribution_scores(reader, spec, options)
    plans = layer_plans(spec, options.router, shared_count, top_k, scores)

    dtype = reader.info(spec.attention(0, "q_proj")).dtype
    passthrough = [TensorSpec(name, reader.info(name).dtype, reader.info(name).shape) for name in reader.names()]
    new = router_tensors(spec, plans, dtype)

    def tensors():
        for item in passthrough:
            yield item.name, SourceTensor(item.name)
        for item in new:
            yield item.name, torch.zeros(item.shape, dtype=item.dtype)

    config, _, _ = runtime_config(reader.config, spec, "moh", plans)
    active = shared_count + top_k
    settings = asdict(options) | {"shared_selection": selection, "calibration": str(options.calibration) if options.calibration else None}
    return Conversion(
        method="moh",
        config=config,
        layout=passthrough + new,
        tensors=tensors,
        plan_lines=plan_table(spec, plans, selection),
        report={
            "options": settings,
            "heads": {"total": spec.num_heads, "shared": shared_count, "routed": spec.num_heads - shared_count, "top_k": top_k, "active_fraction": active / spec.num_heads},
            "head_scores": scores,
        },
        tags=["moh", "mixture-of-heads"],
        description=(
            f"Mixture-of-Head attention: in every layer {shared_count} of {spec.num_heads} query heads are shared (always on) "
            f"and each token uses the top {top_k} of the other {spec.num_heads - shared_count} ({options.router} router), "
            f"so {active}/{spec.num_heads} = {active / spec.num_heads:.1%} of the heads are active per token. "
            f"Shared heads chosen by {selection}."
        ),
    )


def plan_table(spec: DecoderSpec, plans: list[dict], selection: str) -> list[str]:
    """One line per layer: shared heads, routed heads and top-k."""
    first = plans[0]["head_gate"]
    active = len(first["shared_heads"]) + first["top_k"]
    lines = [
        f"MoH plan: {spec.num_layers} layers x {spec.num_heads} query heads ({spec.num_kv_heads} KV heads, head_dim {spec.head_dim}); "
        f"router {first['router']}; shared heads by {selection}",
        f"active heads per token: {active}/{spec.num_heads} = {active / spec.num_heads:.4f} "
        f"({len(first['shared_heads'])} shared + top-{first['top_k']} of {len(first['routed_heads'])} routed)",
        f"{'layer':>5}  {'shared heads':<{3 * spec.num_heads}}  {'routed heads':<{3 * spec.num_heads}}  top-k",
    ]
    for layer, plan in enumerate(plans):
        gate = plan["head_gate"]
        shared = " ".join(str(h) for h in gate["shared_heads"])
        routed = " ".join(str(h) for h in gate["routed_heads"])
        lines.append(f"{layer:>5}  {shared:<{3 * spec.num_heads}}  {routed:<{3 * spec.num_heads}}  {gate['top_k']}")
    return lines
