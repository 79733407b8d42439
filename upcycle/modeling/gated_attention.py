"""Head-gated attention: the family's own attention module, with per-(token, head) gates.

The gated module is the family's attention class (LlamaAttention, Qwen3Attention, ...)
with a ``head_router`` child. Its forward is the family's, unchanged, plus one extra
kwarg, ``router_input`` (the block input), which the family passes on to the attention
function chosen by ``config._attn_implementation``. We register that function under the
name ``"upcycle"``: it asks the router for ``gates[B, T, h]`` and weights each head's
output by them. This module is the reference ("masked") path: every head is computed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .sparse_attention import head_sparse_attention

ATTENTION_NAME = "upcycle"


def head_gated_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    router_input: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA attention whose per-head outputs are multiplied by the module's router gates.

    query: [B, h, T, d]; key, value: [B, g, S, d]; returns ([B, T, h, d], None).
    A module without a ``head_router`` gets plain SDPA.
    """
    router = getattr(module, "head_router", None)
    if router is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    gates = router(router_input, query)  # [B, T, h]
    if head_sparse(module, query) and hasattr(router, "routed_heads"):
        causal = getattr(module, "is_causal", True) if kwargs.get("is_causal") is None else kwargs["is_causal"]
        output = head_sparse_attention(query, key, value, gates, attention_mask, router.shared_heads, router.routed_heads,
                                       causal=causal, scaling=kwargs.get("scaling"))
        return output, None
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return output * gates.unsqueeze(-1).to(output.dtype), weights


BACKENDS = ("auto", "torch", "masked", "kernel")


def head_sparse(module: nn.Module, query: torch.Tensor) -> bool:
    """Whether this call skips unselected heads (``attention_backend`` torch).

    ``auto`` takes the masked path for now: the torch path matches it but is not faster on the CPU
    (per-window SDPA calls with explicit masks), and the Triton kernel that should be faster on GPUs
    is not written yet. A skipped head has no output, so its zero gate gets no gradient: the
    straight-through router gradient through unselected heads exists only on the masked path.
    """
    backend = getattr(module, "attention_backend", "auto")
    if backend == "kernel":
        raise ValueError("the Triton head-sparse kernel is not available yet; use attention backend torch, masked or auto")
    return backend == "torch"


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Choose how head-gated attention runs: auto, torch (skip unselected heads), masked (all heads, times the gates);
    returns how many attention modules were set."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    count = 0
    for module in model.modules():
        if hasattr(module, "head_router"):
            module.attention_backend = backend
            count += 1
    return count


_GATED_CLASSES: dict[type, type] = {}


def gated_attention_class(attention_cls: type) -> type:
    """The family's attention class with its block input forwarded to the router (cached)."""
    if attention_cls in _GATED_CLASSES.values():
        return attention_cls
    if attention_cls not in _GATED_CLASSES:

        def forward(self, hidden_states, *args, **kwargs):
            return attention_cls.forward(self, hidden_states, *args, router_input=hidden_states, **kwargs)

        _GATED_CLASSES[attention_cls] = type(f"HeadGated{attention_cls.__name__}", (attention_cls,), {"forward": forward})
    return _GATED_CLASSES[attention_cls]


def attach_head_router(attention: nn.Module, router: nn.Module) -> None:
    """Turn a family attention module into a head-gated one, in place (parameter names kept)."""
    attention.__class__ = gated_attention_class(type(attention))
    attention.head_router = router


def register_attention() -> None:
    """Register the head-gated attention function (and SDPA's mask builder) with transformers."""
    AttentionInterface.register(ATTENTION_NAME, head_gated_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
