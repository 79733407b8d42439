"""Expert routers of mixed models (BAM, BTX): their usage, and their training losses for Mixtral checkpoints.

upcycle's own expert modules (``MoEFeedForward``, ``SoftExpertRouter``) record, after each
forward, ``expert_weights [tokens, N]`` (1 for the chosen FFN experts; the soft weights for
attention) and in training ``aux_loss`` / ``z_loss``. A plain Mixtral checkpoint (BTX) has
transformers' own router, which records nothing: :func:`instrument_mixtral_routers` adds a hook
that computes the same quantities from its logits, so tuning and usage treat both alike.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.eval.hooks import forward_hooks


def _is_mixtral_router(module: nn.Module) -> bool:
    return type(module).__name__.endswith("TopKRouter") and hasattr(module, "num_experts") and hasattr(module, "top_k")


def _mixtral_hook(router: nn.Module, args: tuple, output: tuple) -> None:
    logits, _, chosen = output  # [N_tok, E], [N_tok, k], [N_tok, k]
    logits = logits.float()
    selected = F.one_hot(chosen, router.num_experts).sum(dim=1).to(logits.dtype)  # [N_tok, E]
    router.expert_weights = selected.detach()
    if router.training:
        from ..modeling.experts import load_balance, z_loss

        router.aux_loss = load_balance(logits.softmax(dim=-1), selected, router.top_k)
        router.z_loss = z_loss(logits)


def instrument_mixtral_routers(model: nn.Module) -> int:
    """Give transformers' Mixtral-style routers ``aux_loss``, ``z_loss`` and ``expert_weights`` (once); returns how
    many."""
    count = 0
    for module in model.modules():
        if _is_mixtral_router(module) and not getattr(module, "_upcycle_instrumented", False):
            module.register_forward_hook(_mixtral_hook)
            module._upcycle_instrumented = True
            module.aux_loss = module.z_loss = module.expert_weights = None
            count += 1
    return count


def is_expert_router(name: str, module: nn.Module) -> bool:
    """Whether ``module`` routes tokens to experts (has ``expert_weights`` and ``num_experts``)."""
    return hasattr(module, "expert_weights") and hasattr(module, "num_experts")


def expert_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that routes tokens to experts (FFN or attention), in model order."""
    return [(name, m) for name, m in model.named_modules() if is_expert_router(name, m)]


class ExpertUsage:
    """Context manager averaging, per router, the weight each expert gets per token.

    For top-k FFN routers the figure is the share of tokens sent to the expert (summing to k);
    for soft attention routers the mean softmax weight (summing to 1).
    """

    def __init__(self, model: nn.Module):
        instrument_mixtral_routers(model)
        self.model = model
        self.routers = expert_routers(model)
        self.sums = [torch.zeros(m.num_experts, dtype=torch.float64) for _, m in self.routers]
        self.tokens = [0] * len(self.routers)
        self._hooks: ExitStack | None = None

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            weights = module.expert_weights  # [tokens, N]
            if weights is not None:
                self.sums[index] += weights.sum(dim=0).double().cpu()
                self.tokens[index] += weights.shape[0]

        return hook

    def __enter__(self) -> ExpertUsage:
        with ExitStack() as hooks:
            hooks.enter_context(
                forward_hooks(self.model, is_expert_router, lambda index, _name, _module: self._hook(index))
            )
            self._hooks = hooks.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.close()
        self._hooks = None

    def fraction(self) -> dict[str, list[float]]:
        """Router name -> mean weight per expert over the counted tokens."""
        return {
            name: (total / count if count else total).tolist()
            for (name, _), total, count in zip(self.routers, self.sums, self.tokens)
        }
