"""MHE projection (Xue and Aletras 2023, "Pit One Against Many"): one shared projection plus one embedding per head.

It stands in for a family's q/k/v ``nn.Linear`` and returns the same ``[..., heads * head_dim]``
output, so the family's attention forward runs unchanged:

- ``mul``: head ``i`` is ``(x W^T + b) * e_i``
- ``add``: head ``i`` is ``(x W^T + b) + e_i``

``W`` is ``[head_dim, in_features]`` (one head's projection), ``b`` its optional bias and
``e`` the ``[heads, head_dim]`` head embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_INIT = {"mul": torch.ones, "add": torch.zeros}  # per variant: the head embeddings that make every head equal
VARIANTS = tuple(EMBEDDING_INIT)  # the plan's MHE.variant values (plan.MHE_VARIANTS; a test keeps the two equal)


class MHEProjection(nn.Module):
    """Shared ``[d -> head_dim]`` projection plus per-head embeddings; output ``[..., heads * head_dim]``."""

    trains_fully_under_lora = True  # not an nn.Linear, so LoRA cannot adapt it: it trains whole beside the adapters

    def __init__(
        self,
        in_features: int,
        head_dim: int,
        num_heads: int,
        variant: str = "mul",
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"MHE variant {variant!r} is unknown; choose one of: {', '.join(VARIANTS)}")
        self.in_features, self.head_dim, self.num_heads, self.variant = in_features, head_dim, num_heads, variant
        self.out_features = num_heads * head_dim
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(head_dim, in_features, **factory))
        self.bias = nn.Parameter(torch.zeros(head_dim, **factory)) if bias else None
        self.head_embedding = nn.Parameter(EMBEDDING_INIT[variant](num_heads, head_dim, **factory))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shared = F.linear(hidden_states, self.weight, self.bias)  # [..., d_h]
        if self.variant == "mul":
            heads = shared.unsqueeze(-2) * self.head_embedding  # [..., H, d_h]
        else:
            heads = shared.unsqueeze(-2) + self.head_embedding  # [..., H, d_h]
        return heads.flatten(-2)  # [..., H * d_h]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, head_dim={self.head_dim}, num_heads={self.num_heads}, "
            f"variant={self.variant}, bias={self.bias is not None}"
        )
