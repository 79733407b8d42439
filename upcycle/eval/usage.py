"""How often each attention head is used: counts of tokens whose router gate is non-zero."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from upcycle.errors import UpcycleError
from upcycle.eval.hooks import forward_hooks


def is_head_router(name: str, module: nn.Module) -> bool:
    """Whether ``module`` routes tokens to attention heads (has ``shared_heads`` and ``routed_heads``)."""
    return hasattr(module, "shared_heads") and hasattr(module, "routed_heads")


def routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every head router in ``model`` (modules with ``shared_heads`` and ``routed_heads``), in layer
    order."""
    return [(name, m) for name, m in model.named_modules() if is_head_router(name, m)]


class HeadUsage:
    """Context manager counting, per router (layer) and head, the tokens whose gate is non-zero.

    Padding: a mask [B, T] (1 = real token) set with ``set_mask`` is used for every later forward until it is
    changed or cleared with ``set_mask(None)``; without one, the ``attention_mask`` passed by keyword to
    ``model(...)`` is used (2-D masks only, so ``generate`` with a cache is handled: the last T columns
    belong to the current tokens); with neither, every token counts.
    A model without routers (dense) gives an empty ``fraction()`` of shape (0, 0).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.names = [name for name, _ in routers(model)]
        self._routers = [m for _, m in routers(model)]
        self._hooks: ExitStack | None = None
        self._mask: torch.Tensor | None = None
        self._call_mask: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        """Forget all counts."""
        self.counts = [
            torch.zeros(getattr(r, "num_heads", len(r.shared_heads) + len(r.routed_heads)), dtype=torch.float64)
            for r in self._routers
        ]
        self.tokens = [0] * len(self._routers)

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Count only tokens where ``mask`` [B, T] is non-zero in the following forwards (None: back to the
        default)."""
        self._mask = None if mask is None else mask.detach().bool()

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._call_mask = mask.detach().bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, gates: torch.Tensor) -> None:
            used = gates.detach() != 0  # [B, T, h]
            mask = self._mask if self._mask is not None else self._call_mask
            if mask is not None:
                if mask.shape[0] != used.shape[0] or mask.shape[1] < used.shape[1]:
                    raise UpcycleError(
                        f"head-usage mask of shape {tuple(mask.shape)} does not cover gates of shape "
                        f"{tuple(used.shape[:2])}: pass a [B, T] mask of this batch"
                    )
                keep = mask[:, -used.shape[1] :].to(used.device)  # [B, T]
                used = used & keep.unsqueeze(-1)
                self.tokens[index] += int(keep.sum())
            else:
                self.tokens[index] += used.shape[0] * used.shape[1]
            self.counts[index] += used.sum(dim=(0, 1)).double().cpu()

        return hook

    def __enter__(self) -> HeadUsage:
        with ExitStack() as hooks:
            hooks.enter_context(
                forward_hooks(self.model, is_head_router, lambda index, _name, _module: self._hook(index))
            )
            hooks.enter_context(
                forward_hooks(
                    self.model,
                    lambda _name, module: module is self.model,
                    lambda *_: self._pre_hook,
                    pre=True,
                    with_kwargs=True,
                )
            )
            self._hooks = hooks.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.close()
        self._hooks = None
        self._call_mask = None

    def fraction(self) -> torch.Tensor:
        """[layers, heads] fraction (0..1) of counted tokens that used each head; zeros before any token; (0, 0)
        without routers."""
        if not self._routers:
            return torch.empty(0, 0)
        return torch.stack([c / t if t else torch.zeros_like(c) for c, t in zip(self.counts, self.tokens)])  # float64

    def active_fraction(self) -> float | None:
        """Used (token, head) pairs / all counted (token, head) pairs over every layer; None without routers or
        tokens."""
        total = sum(t * c.numel() for c, t in zip(self.counts, self.tokens))
        return sum(float(c.sum()) for c in self.counts) / total if total else None
