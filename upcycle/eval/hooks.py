"""Forward hooks on the modules of a model that a predicate selects, for as long as a ``with`` block lasts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def forward_hooks(
    model: nn.Module,
    select: Callable[[str, nn.Module], bool],
    hook: Callable[[int, str, nn.Module], Callable],
    *,
    pre: bool = False,
    with_kwargs: bool = False,
) -> Iterator[list[tuple[str, nn.Module]]]:
    """Register ``hook(index, name, module)`` (the hook function for that module; ``index``: its place among the
    selected modules) on every module of ``model.named_modules()`` (the model itself is named "") that
    ``select(name, module)`` accepts, in model order; yields the selected (name, module) pairs and removes every
    hook on exit, also when the block raises. ``pre``: forward pre-hooks instead of forward hooks;
    ``with_kwargs``: as in ``register_forward_hook`` (the hooks also get the forward's keyword arguments)."""
    selected = [(name, module) for name, module in model.named_modules() if select(name, module)]
    handles: list[RemovableHandle] = []
    try:
        for index, (name, module) in enumerate(selected):
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook(index, name, module), with_kwargs=with_kwargs))
        yield selected
    finally:
        for handle in handles:
            handle.remove()
