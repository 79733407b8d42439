"""Head-gated attention: the family's own attention module, with per-(token, head) gates.

The gated module is the family's attention class (LlamaAttention, Qwen3Attention, ...)
with a ``head_router`` child. Its forward is the family's, unchanged, plus one extra
kwarg, ``router_input`` (the block input), which the family passes on to the attention
function chosen by ``config._attn_implementation``. We register that function under the
name ``"upcycle"``: it asks the router for ``gates[B, T, h]`` and weights each head's
output by them. This module is the reference ("masked") path: every head is computed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .sparse_attention import head_sparse_attention

ATTENTION_NAME = "upcycle"
logger = logging.getLogger(__name__)


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
    path = attention_path(module, query) if hasattr(router, "routed_heads") else "masked"
    if path != "masked":
        causal = getattr(module, "is_causal", True) if kwargs.get("is_causal") is None else kwargs["is_causal"]
        heads = (query, key, value, gates)
        if path == "kernel":
            from .sparse_kernel import head_sparse_attention_kernel

            key_padding, representable = key_padding_of(attention_mask, causal, query.shape[2], key.shape[2])
            if representable and trusted_kernel(module, query, causal, key_padding is not None):
                output = head_sparse_attention_kernel(
                    *heads,
                    key_padding,
                    router.shared_heads,
                    router.routed_heads,
                    causal=causal,
                    scaling=kwargs.get("scaling"),
                )
                return output, None
            if not representable:
                logger.debug("head-sparse kernel: this attention mask is not causal-plus-padding; torch path")
        output = head_sparse_attention(
            *heads,
            attention_mask,
            router.shared_heads,
            router.routed_heads,
            causal=causal,
            scaling=kwargs.get("scaling"),
        )
        return output, None
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return output * gates.unsqueeze(-1).to(output.dtype), weights


_WARNED: set[tuple] = set()


def trusted_kernel(module: nn.Module, query: torch.Tensor, causal: bool, padding: bool) -> bool:
    """Whether this call may use the Triton kernel: its first-use self-check for calls of this kind (dtype, head
    width, causal, padding, training) passed. ``auto`` falls back to the torch path with one warning that says why;
    an explicit ``kernel`` backend raises instead."""
    from .sparse_kernel import REPORT_URL, SELF_CHECK_ENV, self_check

    backward = torch.is_grad_enabled() and query.requires_grad
    verdict = self_check(query.device, query.dtype, query.shape[-1], causal, padding, backward)
    if verdict is None:
        return True
    kind = (str(query.device), str(query.dtype).removeprefix("torch."), query.shape[-1], causal, padding, backward)
    where = f"on {torch.cuda.get_device_name(query.device)}" if query.device.type == "cuda" else f"on {query.device}"
    problem = f"the head-sparse Triton kernel failed its self-check {where} for {kind} ({verdict})"
    if getattr(module, "attention_backend", "auto") == "kernel":
        raise RuntimeError(
            f"attention backend kernel: {problem}; use attention auto, torch or masked, and please report it at "
            f"{REPORT_URL} (set {SELF_CHECK_ENV}=0 to run the kernel without the check)"
        )
    if kind not in _WARNED:
        _WARNED.add(kind)
        logger.warning(
            "%s; using the head-sparse torch path instead (same results, without the kernel's speed). "
            "Please report it at %s with your GPU, torch and triton versions.",
            problem,
            REPORT_URL,
        )
    return False


def key_padding_of(
    attention_mask: torch.Tensor | None, causal: bool, length: int, keys: int
) -> tuple[torch.Tensor | None, bool]:
    """The kernel takes a key-padding mask [B, S] (True: a real key), not a 4-D mask: derive it from a
    [B, 1, T, S] mask and say whether it represents the mask exactly (causal and padding only; not, e.g.,
    sliding windows or packed documents, which then take the torch path)."""
    if attention_mask is None:
        return None, True
    keep = (
        attention_mask
        if attention_mask.dtype == torch.bool
        else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    )
    if keep.shape[1] != 1:
        return None, False
    keep = keep[:, 0].expand(keep.shape[0], length, keys)  # [B, T, S]
    key_padding = keep[:, -1]  # the last query sees every earlier key, so its row is the padding
    expected = key_padding[:, None, :].expand_as(keep)
    if causal:
        positions = torch.arange(keys, device=keep.device)
        expected = expected & (positions[None, :] <= positions[keys - length :, None])[None]
    return key_padding, bool(torch.equal(keep, expected))


BACKENDS = ("auto", "kernel", "torch", "masked")


def auto_prefers_kernel(query: torch.Tensor) -> bool:
    """Where ``auto`` tries the kernel: on CUDA (on the CPU the masked path is as fast end to end)."""
    return query.device.type == "cuda"


def attention_path(module: nn.Module, query: torch.Tensor) -> str:
    """How this call runs: ``kernel`` (Triton, only the selected pairs), ``torch`` (SDPA on gathered queries,
    only the selected pairs) or ``masked`` (every head, times the gates; the reference).

    ``auto`` takes the kernel on CUDA with Triton, else the masked path: on the CPU the torch path matches it
    but measured no faster end to end (per-window SDPA calls with explicit masks), so it is opt-in there.
    Calls the kernel does not take (Triton missing, a head width that is not a power of two >= 16, a dtype other
    than fp32/fp16/bf16) take the torch path with a debug-level note. A skipped head has no output, so its zero gate
    gets no gradient: the straight-through router gradient through unselected heads exists only on the masked path.
    """
    backend = getattr(module, "attention_backend", "auto")
    if backend not in ("auto", "kernel"):
        return backend
    if backend == "auto" and not auto_prefers_kernel(query):
        return "masked"
    from .sparse_kernel import kernel_unavailable_reason

    reason = kernel_unavailable_reason(query)
    if reason is None:
        return "kernel"
    logger.debug("head-sparse kernel not used: %s; torch path", reason)
    return "torch"


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Choose how head-gated attention runs: auto, kernel (Triton, skip unselected heads), torch (skip them in
    plain torch), masked (all heads, times the gates); returns how many attention modules were set. ``kernel``
    is checked here (Triton installed, the model on CUDA) so a wrong choice fails before any work."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if backend == "kernel":
        from .sparse_kernel import kernel_environment_reason

        parameter = next(model.parameters(), None)
        reason = kernel_environment_reason(parameter.device if parameter is not None else torch.device("cpu"))
        if reason:  # calls the kernel does not take (head width, dtype, mask) take the torch path one by one
            raise ValueError(f"attention backend kernel: {reason}; use torch, masked or auto")
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

        _GATED_CLASSES[attention_cls] = type(
            f"HeadGated{attention_cls.__name__}", (attention_cls,), {"forward": forward}
        )
    return _GATED_CLASSES[attention_cls]


def attach_head_router(attention: nn.Module, router: nn.Module) -> None:
    """Turn a family attention module into a head-gated one, in place (parameter names kept)."""
    attention.__class__ = gated_attention_class(type(attention))
    attention.head_router = router


def register_attention() -> None:
    """Register the head-gated attention function (and SDPA's mask builder) with transformers."""
    AttentionInterface.register(ATTENTION_NAME, head_gated_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
