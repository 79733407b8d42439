"""Gate producers: small modules that turn a block's input into per-(token, head) gates.

A router returns ``gates[B, T, h]`` over all query heads of its layer. Shared heads
get gate 1 (query-norm, fitted) or a learned weight (learned router); routed heads that a
token did not select get exactly 0, which is what lets a kernel skip them.
During training each router keeps ``aux_loss`` (its load-balance term) from the
latest forward, for the trainer to collect.
"""

from __future__ import annotations

import torch
from torch import nn


def _load_balance(probs: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """Switch-style balance ``E * sum_i P_i f_i`` over routed heads; probs, hard: [B, T, E]."""
    num_experts = probs.shape[-1]
    mean_prob = probs.reshape(-1, num_experts).mean(0)  # P_i
    choose_frac = hard.reshape(-1, num_experts).mean(0)  # f_i
    return num_experts * (mean_prob * choose_frac).sum()


class _HeadRouter(nn.Module):
    """Shared bookkeeping: which query heads are shared, which are routed, and top-k."""

    def __init__(self, num_heads: int, shared_heads: list[int], routed_heads: list[int], top_k: int):
        super().__init__()
        if sorted(shared_heads + routed_heads) != list(range(num_heads)):
            raise ValueError("shared and routed heads must partition the query heads")
        if not 0 <= top_k <= len(routed_heads):
            raise ValueError(f"top_k={top_k} must be within [0, {len(routed_heads)}]")
        self.num_heads = num_heads
        self.top_k = top_k
        self.shared_heads = list(shared_heads)
        self.routed_heads = list(routed_heads)
        self.aux_loss: torch.Tensor | None = None
        # Index tensors per device, kept out of the state dict: built lazily because
        # transformers materialises models from the meta device, which would leave
        # non-persistent buffers uninitialised.
        self._index_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(shared, routed) head indices as long tensors on ``device``."""
        if device not in self._index_cache:
            self._index_cache[device] = (
                torch.tensor(self.shared_heads, dtype=torch.long, device=device),
                torch.tensor(self.routed_heads, dtype=torch.long, device=device),
            )
        return self._index_cache[device]

    def _assemble(self, shared: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """Scatter shared [B, T, hs] and routed [B, T, hr] gates into [B, T, h]."""
        shared_index, routed_index = self._indices(shared.device)
        gates = shared.new_zeros(*shared.shape[:2], self.num_heads)
        gates = gates.index_copy(-1, shared_index, shared)
        return gates.index_copy(-1, routed_index, routed)

    def _top_k_mask(self, probs: torch.Tensor) -> torch.Tensor:
        """0/1 mask [B, T, hr] with ones at each token's top-k routed heads."""
        top = probs.topk(self.top_k, dim=-1).indices
        return torch.zeros_like(probs).scatter(-1, top, 1.0)


class QueryNormRouter(_HeadRouter):
    """Parameter-free router of MoH-LLaMA3: routed heads ranked by the L2 norm of their query.

    Scores are divided by their (unbiased) std across routed heads, softmaxed, and the
    top-k heads get gate 1, the others 0. The 0/1 mask trains through a straight-through
    estimator: the forward value is the hard mask, the gradient is the softmax's.
    RoPE is a rotation, so the norm of the query after RoPE equals the norm before it.
    """

    def forward(self, hidden_states: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor:
        # query: [B, h, T, d] -> gates [B, T, h]
        batch, _, seq, _ = query.shape
        shared = query.new_ones(batch, seq, len(self.shared_heads), dtype=torch.float32)
        if not self.routed_heads:
            self.aux_loss = None
            return self._assemble(shared, shared[..., :0])
        scores = (
            query.index_select(1, self._indices(query.device)[1]).float().norm(dim=-1).transpose(1, 2)
        )  # [B, T, hr]
        if scores.shape[-1] > 1:
            scores = scores / scores.std(dim=-1, keepdim=True).clamp_min(1e-6)
        probs = scores.softmax(dim=-1)
        hard = self._top_k_mask(probs)
        routed = hard + (probs - probs.detach())  # value: exactly `hard`; gradient: softmax's
        self.aux_loss = _load_balance(probs, hard) if self.training else None
        return self._assemble(shared, routed)


class LearnedRouter(_HeadRouter):
    """The MoH paper's two-stage router (bias-free linears on the block input).

    Routed: ``p = softmax(W_r x)``, top-k kept, renormalised, times k. Shared:
    ``h_s * softmax(W_s x)``. Mix: ``[a1, a2] = 2 * softmax(W_h x)``. With all three
    zero-initialised every active head's gate is exactly 1 (the dense model's heads).
    """

    def __init__(self, hidden_size: int, num_heads: int, shared_heads: list[int], routed_heads: list[int], top_k: int):
        super().__init__(num_heads, shared_heads, routed_heads, top_k)
        self.shared_proj = nn.Linear(hidden_size, len(shared_heads), bias=False) if shared_heads else None
        self.routed_proj = nn.Linear(hidden_size, len(routed_heads), bias=False) if routed_heads else None
        self.mix_proj = nn.Linear(hidden_size, 2, bias=False) if shared_heads and routed_heads else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.shared_proj, self.routed_proj, self.mix_proj):
            if proj is not None:
                nn.init.zeros_(proj.weight)

    def forward(self, hidden_states: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        # hidden_states: [B, T, D] -> gates [B, T, h]
        batch, seq, _ = hidden_states.shape
        shared = hidden_states.new_zeros(batch, seq, 0, dtype=torch.float32)
        routed = shared
        self.aux_loss = None
        if self.shared_proj is not None:
            shared = len(self.shared_heads) * self.shared_proj(hidden_states).float().softmax(dim=-1)
        if self.routed_proj is not None:
            probs = self.routed_proj(hidden_states).float().softmax(dim=-1)  # [B, T, hr]
            hard = self._top_k_mask(probs)
            kept = probs * hard
            routed = self.top_k * kept / kept.sum(dim=-1, keepdim=True)
            self.aux_loss = _load_balance(probs, hard) if self.training else None
        if self.mix_proj is not None:
            mix = 2 * self.mix_proj(hidden_states).float().softmax(dim=-1)  # [B, T, 2]
            shared, routed = shared * mix[..., :1], routed * mix[..., 1:]
        return self._assemble(shared, routed)


class FittedRouter(_HeadRouter):
    """Routed heads ranked by a linear score of the block input, ``s = W_s x + b_s``, fitted at conversion
    (on calibration text) to pick the heads whose output matters most for each token.

    Like query-norm, the gates are binary: shared heads and the top-k routed heads get exactly 1, the others
    0, and training goes through a straight-through estimator (forward: the 0/1 mask, gradient: the softmax of
    the scores). Its tensors are zero-initialised: unfitted, every routed head ties.
    """

    def __init__(self, hidden_size: int, num_heads: int, shared_heads: list[int], routed_heads: list[int], top_k: int):
        super().__init__(num_heads, shared_heads, routed_heads, top_k)
        self.score_proj = nn.Linear(hidden_size, len(routed_heads)) if routed_heads else None
        if self.score_proj is not None:
            nn.init.zeros_(self.score_proj.weight)
            nn.init.zeros_(self.score_proj.bias)

    def forward(self, hidden_states: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        # hidden_states: [B, T, D] -> gates [B, T, h]
        batch, seq, _ = hidden_states.shape
        shared = hidden_states.new_ones(batch, seq, len(self.shared_heads), dtype=torch.float32)
        self.aux_loss = None
        if self.score_proj is None:
            return self._assemble(shared, shared[..., :0])
        probs = self.score_proj(hidden_states).float().softmax(dim=-1)  # [B, T, hr]
        hard = self._top_k_mask(probs)
        routed = hard + (probs - probs.detach())  # value: exactly `hard`; gradient: softmax's
        self.aux_loss = _load_balance(probs, hard) if self.training else None
        return self._assemble(shared, routed)


ROUTERS = {"query-norm": QueryNormRouter, "learned": LearnedRouter, "fitted": FittedRouter}


def build_router(
    kind: str, hidden_size: int, num_heads: int, shared_heads: list[int], routed_heads: list[int], top_k: int
) -> _HeadRouter:
    """Build the router named in a layer's plan."""
    if kind in ("learned", "fitted"):
        return ROUTERS[kind](hidden_size, num_heads, shared_heads, routed_heads, top_k)
    if kind == "query-norm":
        return QueryNormRouter(num_heads, shared_heads, routed_heads, top_k)
    raise ValueError(f"unknown router {kind!r}; expected one of {sorted(ROUTERS)}")
