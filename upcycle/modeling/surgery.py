"""Apply a conversion plan (the ``upcycle`` block of a config) to a freshly built model.

The plan is per layer; each change of a layer applies itself (:meth:`plan.Change.apply`). Conversion writes the
plan, loading reads it back and calls this: the same surgery both ways.
"""

from __future__ import annotations

from torch import nn

from .plan import PlanError, parse_layers


def apply_plan(layers: nn.ModuleList, plan: dict, config) -> None:
    """Apply ``plan["layers"][i]`` to ``layers[i]`` (decoder, BERT or CLIP-tower layers; ``config``: the model's or
    the tower's). The plan is validated first (:func:`plan.parse_layers`): a change or field this runtime does not
    know is one ``PlanError`` line."""
    plans = parse_layers(plan.get("layers", []))
    if len(plans) != len(layers):
        raise PlanError(f"upcycle plan has {len(plans)} layers, the model has {len(layers)}")
    for layer, layer_plan in zip(layers, plans):
        layer_plan.apply(layer, config)
