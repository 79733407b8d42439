"""Where a layer keeps its parts (attention, projections, the layer list) in the decoder and BERT families, and
Linear layers resized or sliced for a change: what the plan's changes build on (torch only)."""

from __future__ import annotations

import torch
from torch import nn


def attention_of(layer: nn.Module) -> nn.Module:
    """The module whose forward calls the attention function: ``self_attn`` (decoders) or ``attention.self`` (BERT)."""
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attention.self


def head_dim_of(attention: nn.Module) -> int:
    """Per-head width of a decoder (``head_dim``) or BERT (``attention_head_size``) attention module."""
    return getattr(attention, "head_dim", None) or attention.attention_head_size


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


def sliced_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A Linear keeping the output rows (dim 0) or input columns (dim 1) at ``index``; works on meta too."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))  # [out', in] or [out, in']
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        bias = linear.bias.detach()
        bias = bias.clone() if dim == 1 else bias.index_select(0, index.to(bias.device))
        new.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return new


def resized_linear(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised Linear of a new size on ``linear``'s device and dtype (filled when the checkpoint loads)."""
    weight = linear.weight
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """The rows (or columns) of ``heads`` in a projection of ``head_dim``-wide heads: [len(heads) * head_dim]."""
    return (torch.tensor(heads, dtype=torch.long)[:, None] * head_dim + torch.arange(head_dim)).flatten()
