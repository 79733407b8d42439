"""Apply a conversion plan (the ``upcycle`` block of a config) to a freshly built model.

The plan is per layer; each key of a layer entry names one change, applied here by
a small function. Conversion writes the plan, loading reads it back and calls this:
the same surgery both ways.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .experts import MoEFeedForward, SoftExpertRouter, head_expert_order, make_parallel_block
from .gated_attention import attach_head_router
from .mhe_projection import MHEProjection
from .plan import MHE, AttentionExperts, AttentionHeads, HeadGate, MoEFFN, ParallelBlock, PlanError, parse_layers
from .routers import build_router


def attention_of(layer: nn.Module) -> nn.Module:
    """The module whose forward calls the attention function: ``self_attn`` (decoders) or ``attention.self`` (BERT)."""
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention.self


def layers_of(model: nn.Module) -> nn.ModuleList:
    """The decoder layers (LLaMA family) or encoder layers (BERT) of a model."""
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.encoder.layer


def projections_of(layer: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """(parent module, attribute) of the q/k/v/o projections of a decoder or BERT layer."""
    if hasattr(layer, "self_attn"):
        attention = layer.self_attn
        return {proj: (attention, proj) for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}
    attention = layer.attention
    return {
        "q_proj": (attention.self, "query"),
        "k_proj": (attention.self, "key"),
        "v_proj": (attention.self, "value"),
        "o_proj": (attention.output, "dense"),
    }


def _sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A Linear keeping the output rows (dim 0) or input columns (dim 1) at ``index``; works on meta too."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))  # [out', in] or [out, in']
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        bias = bias.clone() if dim == 1 else bias.index_select(0, index.to(bias.device))
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def apply_attention_heads(layer: nn.Module, spec: AttentionHeads) -> None:
    """Keep only ``kept_heads`` (query) and ``kept_kv_heads`` of a layer: q/k/v rows and o columns sliced."""
    attention = attention_of(layer)
    head_dim = getattr(attention, "head_dim", None) or attention.attention_head_size
    heads, kv_heads = list(spec.kept_heads), list(spec.kept_kv_heads)

    def rows(kept: list[int]) -> torch.Tensor:
        return (
            torch.tensor(kept, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)
        ).flatten()  # [len(kept) * d]

    for proj, (parent, name) in projections_of(layer).items():
        kept = heads if proj in ("q_proj", "o_proj") else kv_heads
        setattr(parent, name, _sliced_linear(getattr(parent, name), rows(kept), 1 if proj == "o_proj" else 0))
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = len(heads) // len(kv_heads)
    if hasattr(attention, "num_attention_heads"):  # BERT
        attention.num_attention_heads = len(heads)
        attention.all_head_size = len(heads) * head_dim


def _apply_mhe(layer: nn.Module, spec: MHE) -> None:
    """Replace the q/k/v projections named in ``spec.heads`` by MHE projections of that many heads."""
    attention = attention_of(layer)
    head_dim = getattr(attention, "head_dim", None) or attention.attention_head_size
    projections = projections_of(layer)
    for proj, heads in spec.heads.items():
        parent, name = projections[proj]
        old = getattr(parent, name)
        new = MHEProjection(
            old.in_features,
            head_dim,
            heads,
            spec.variant,
            bias=old.bias is not None,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        new.requires_grad_(old.weight.requires_grad)
        setattr(parent, name, new)


def _resized_linear(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear of a new size on ``linear``'s device and dtype (filled when the checkpoint loads)."""
    weight = linear.weight
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)


def _apply_attention_experts(layer: nn.Module, spec: AttentionExperts, hidden_size: int) -> None:
    """N attention experts as one attention of N*h query heads (N*g or g KV heads), softly gated per expert."""
    attention = layer.self_attn
    experts, shared_kv = spec.experts, spec.kv == "shared"
    head_dim = attention.head_dim
    heads, kv_heads = attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim
    attention.q_proj = _resized_linear(attention.q_proj, hidden_size, experts * heads * head_dim)
    attention.o_proj = _resized_linear(attention.o_proj, experts * heads * head_dim, attention.o_proj.out_features)
    if not shared_kv:
        attention.k_proj = _resized_linear(attention.k_proj, hidden_size, experts * kv_heads * head_dim)
        attention.v_proj = _resized_linear(attention.v_proj, hidden_size, experts * kv_heads * head_dim)
    attention.num_key_value_groups = heads // kv_heads if not shared_kv else experts * heads // kv_heads
    order = head_expert_order(experts, heads, kv_heads, shared_kv)
    router = SoftExpertRouter(hidden_size, [expert for expert, _ in order])
    router.to(device=attention.q_proj.weight.device, dtype=attention.q_proj.weight.dtype)
    attach_head_router(attention, router)


def _apply_moe_ffn(layer: nn.Module, spec: MoEFFN, hidden_size: int) -> None:
    """The layer's MLP becomes N copies of itself (filled from the checkpoint) behind a top-k router."""
    layer.mlp = MoEFeedForward([copy.deepcopy(layer.mlp) for _ in range(spec.experts)], hidden_size, spec.top_k)


def _apply_head_gate(attention: nn.Module, spec: HeadGate, hidden_size: int, num_heads: int) -> None:
    router = build_router(spec.router, hidden_size, num_heads, spec.shared_heads, spec.routed_heads, spec.top_k)
    weight = next(attention.parameters())
    router.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
    attach_head_router(attention, router)


def apply_plan(decoder_layers: nn.ModuleList, plan: dict, hidden_size: int, num_heads: int) -> None:
    """Apply ``plan["layers"][i]`` to ``decoder_layers[i]`` (decoder or BERT layers). The plan is validated first
    (:func:`plan.parse_layers`): a change or field this runtime does not know is one ``PlanError`` line."""
    layers = parse_layers(plan.get("layers", []))
    if len(layers) != len(decoder_layers):
        raise PlanError(f"upcycle plan has {len(layers)} layers, the model has {len(decoder_layers)}")
    for layer, layer_plan in zip(decoder_layers, layers):
        for change in layer_plan.changes.values():
            if isinstance(change, HeadGate):
                _apply_head_gate(attention_of(layer), change, hidden_size, num_heads)
            elif isinstance(change, AttentionHeads):
                apply_attention_heads(layer, change)
            elif isinstance(change, MHE):
                _apply_mhe(layer, change)
            elif isinstance(change, AttentionExperts):
                _apply_attention_experts(layer, change, hidden_size)
            elif isinstance(change, MoEFFN):
                _apply_moe_ffn(layer, change, hidden_size)
            elif isinstance(change, ParallelBlock):
                make_parallel_block(layer)
