"""Expert layers of mixed models (BAM, BTX): a routed MoE feed-forward and a soft attention-expert router.

- :class:`MoEFeedForward`: a list of the family's own MLP modules plus a linear router;
  each token goes to its top-k experts. With top-1 the chosen expert's weight is exactly 1
  in the forward pass and carries the router probability's gradient (``p / stop_grad(p)``),
  so identical experts reproduce the dense FFN and the router still learns from the LM loss;
  with top-k > 1 the chosen probabilities are renormalised to sum to 1 (Mixtral's rule).
- :class:`SoftExpertRouter`: soft mixture of attention experts, ``A(x) = sum_j g_j(x) MHA_j(x)``
  with ``g = softmax(W x)``. The N experts' heads are one attention with N*h query heads, so
  this router only maps ``g`` to per-head gates ``[B, T, N*h]`` for the head-gated attention.

Both keep, after a training forward, ``z_loss`` (mean squared logsumexp of the router logits)
and the FFN also ``aux_loss`` (``N * sum_i f_i P_i``); after every forward, ``expert_weights``
``[tokens, N]`` (the FFN: 1 for chosen experts; attention: the soft weights) for usage statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (logits [..., N])."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def load_balance(probs: torch.Tensor, selected: torch.Tensor, top_k: int) -> torch.Tensor:
    """``N * sum_i f_i P_i``: f_i the share of routing slots given to expert i, P_i its mean probability
    (probs, selected: [tokens, N]; selected counts 1 per chosen expert)."""
    fraction = selected.mean(dim=0) / top_k
    return probs.shape[-1] * (fraction * probs.mean(dim=0)).sum()


class MoEFeedForward(nn.Module):
    """Top-k routed mixture of feed-forward experts; input and output ``[B, T, D]``."""

    def __init__(self, experts: list[nn.Module], hidden_size: int, top_k: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_experts, self.top_k = len(experts), top_k
        weight = next(experts[0].parameters())
        self.router = nn.Linear(hidden_size, self.num_experts, bias=False, device=weight.device, dtype=weight.dtype)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.expert_weights: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # [N_tok, D]
        logits = self.router(tokens).float()  # [N_tok, E]
        probs = logits.softmax(dim=-1)
        chosen_probs, chosen = probs.topk(self.top_k, dim=-1)  # [N_tok, k]
        if self.top_k == 1:
            weights = chosen_probs / chosen_probs.detach()  # value 1, gradient of p
        else:
            weights = chosen_probs / chosen_probs.sum(dim=-1, keepdim=True)
        selected = F.one_hot(chosen, self.num_experts).sum(dim=1).to(probs.dtype)  # [N_tok, E]
        if self.training:
            self.aux_loss = load_balance(probs, selected, self.top_k)
            self.z_loss = z_loss(logits)
        self.expert_weights = selected.detach()
        output = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            token, slot = (chosen == index).nonzero(as_tuple=True)
            if token.numel():
                output.index_add_(0, token, expert(tokens[token]) * weights[token, slot, None].to(tokens.dtype))
        return output.reshape(shape)


class SoftExpertRouter(nn.Module):
    """Gate producer of a soft mixture of attention experts: ``softmax(W x)`` weight of each head's expert.

    ``head_experts[i]`` is the expert of query head ``i`` (expert-major ``[0]*h + [1]*h + ...``
    with per-expert KV heads; KV-group-major with shared KV heads, see ``head_expert_order``).
    """

    def __init__(self, hidden_size: int, head_experts: list[int]):
        super().__init__()
        self.num_experts = max(head_experts) + 1
        self.weight = nn.Parameter(torch.zeros(self.num_experts, hidden_size))
        self.head_experts = list(head_experts)  # a list, not a tensor: models are built on the meta device
        self._cached: dict[torch.device, torch.Tensor] = {}
        self.z_loss: torch.Tensor | None = None
        self.expert_weights: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        # hidden_states: [B, T, D] (the block input) -> gates [B, T, N*h]
        logits = F.linear(hidden_states, self.weight).float()  # [B, T, N]
        if self.training:
            self.z_loss = z_loss(logits)
        probs = logits.softmax(dim=-1)
        self.expert_weights = probs.detach().reshape(-1, self.num_experts)
        if hidden_states.device not in self._cached:
            self._cached[hidden_states.device] = torch.tensor(
                self.head_experts, dtype=torch.long, device=hidden_states.device
            )  # [N*h]
        return probs.index_select(-1, self._cached[hidden_states.device]).to(query.dtype)


def head_expert_order(experts: int, heads: int, kv_heads: int, shared_kv: bool) -> list[tuple[int, int]]:
    """(expert, head of that expert) of each query head of the mixed attention, in order.

    Per-expert KV heads: expert-major (expert e's heads, then e+1's), so that query head
    ``e*h + j`` reads KV head ``e*g + j // (h/g)``, GQA's usual ``i // (h/g)``. Shared KV
    heads: KV-group-major (for each KV head, every expert's query heads of that group), so
    that query head ``i`` reads KV head ``i // (N*h/g)``.
    """
    if not shared_kv:
        return [(expert, head) for expert in range(experts) for head in range(heads)]
    group = heads // kv_heads
    return [(expert, kv * group + r) for kv in range(kv_heads) for expert in range(experts) for r in range(group)]


def parallel_block_forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """``x + A(LN1 x) + F(LN2 x)``: attention and FFN read the same input (the parallel block)."""
    attention, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
    return hidden_states + attention + self.mlp(self.post_attention_layernorm(hidden_states))


_PARALLEL_CLASSES: dict[type, type] = {}


def make_parallel_block(layer: nn.Module) -> None:
    """Turn a family decoder layer into a parallel block, in place (parameter names kept)."""
    cls = type(layer)
    if cls not in _PARALLEL_CLASSES:
        _PARALLEL_CLASSES[cls] = type(f"Parallel{cls.__name__}", (cls,), {"forward": parallel_block_forward})
    layer.__class__ = _PARALLEL_CLASSES[cls]
