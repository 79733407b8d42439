"""Apply a conversion plan (the ``upcycle`` block of a config) to a freshly built model.

The plan is per layer; each key of a layer entry names one change, applied here by
a small function. Conversion writes the plan, loading reads it back and calls this:
the same surgery both ways.
"""

from __future__ import annotations

from torch import nn

from .gated_attention import attach_head_router
from .routers import build_router


def _apply_head_gate(attention: nn.Module, spec: dict, hidden_size: int, num_heads: int) -> None:
    router = build_router(spec["router"], hidden_size, num_heads, spec["shared_heads"], spec["routed_heads"], spec["top_k"])
    weight = attention.q_proj.weight
    router.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
    attach_head_router(attention, router)


def apply_plan(decoder_layers: nn.ModuleList, plan: dict, hidden_size: int, num_heads: int) -> None:
    """Apply ``plan["layers"][i]`` to ``decoder_layers[i]``; unknown keys are an error."""
    layers = plan.get("layers", [])
    if len(layers) != len(decoder_layers):
        raise ValueError(f"upcycle plan has {len(layers)} layers, the model has {len(decoder_layers)}")
    for layer, spec in zip(decoder_layers, layers):
        for key, value in spec.items():
            if key == "head_gate":
                _apply_head_gate(layer.self_attn, value, hidden_size, num_heads)
            else:
                raise ValueError(f"unknown change {key!r} in the upcycle plan; upgrade upcycle")
