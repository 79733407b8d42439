"""Compare checkpoints that must share one architecture (the experts of a mix)."""

from __future__ import annotations

from collections.abc import Callable

from .reader import CheckpointReader


def checkpoint_differences(
    readers: list[CheckpointReader], labels: list[str], architecture: Callable[[dict], dict]
) -> list[str]:
    """One entry per reader after the first that differs from it: the differing ``architecture(config)`` values and
    the tensors missing, extra, or of another shape or dtype."""
    first, found = readers[0], []
    first_arch = architecture(first.config)
    first_infos = {name: first.info(name) for name in first.names()}
    for label, other in zip(labels[1:], readers[1:]):
        arch = architecture(other.config)
        items = [
            f"{key} {arch.get(key)!r} ({labels[0]}: {first_arch.get(key)!r})"
            for key in first_arch | arch
            if first_arch.get(key) != arch.get(key)
        ]
        names = set(other.names())
        missing, extra = sorted(set(first_infos) - names), sorted(names - set(first_infos))
        if missing:
            items.append(f"lacks {len(missing)} tensor(s) such as {missing[0]}")
        if extra:
            items.append(f"has {len(extra)} extra tensor(s) such as {extra[0]}")
        other_shape = [
            name
            for name in sorted(names & set(first_infos))
            if tuple(first_infos[name].shape) != tuple(other.info(name).shape)
            or first_infos[name].code != other.info(name).code
        ]
        if other_shape:
            mine, theirs = other.info(other_shape[0]), first_infos[other_shape[0]]
            items.append(
                f"{len(other_shape)} tensor(s) of another shape or dtype such as {other_shape[0]} {tuple(mine.shape)} "
                f"{mine.dtype_name} "
                f"({labels[0]}: {tuple(theirs.shape)} {theirs.dtype_name})"
            )
        if items:
            found.append(f"{label}: {', '.join(items)}")
    return found
