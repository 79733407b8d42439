"""``upcycle inspect``: what a checkpoint folder holds, read from its headers only."""

from __future__ import annotations

import math
from collections import Counter

from .arch import ATTENTION_FAMILIES, attention_spec
from .checkpoint.reader import CheckpointReader
from .checkpoint.source import resolve_source
from .errors import UpcycleError
from .modeling.plan import MoEFFN, PlanError, parse_layers, plan_layers


def describe(path: str) -> dict:
    """Family, shapes, parameters, dtypes and shards; the method and plan for converted models."""
    reader = CheckpointReader(resolve_source(path))
    config = reader.config
    plan = config.get("upcycle")
    base_type = plan.get("base_model_type") if plan else config.get("model_type")
    infos = [reader.info(name) for name in reader.names()]
    info = {
        "path": str(reader.folder),
        "model_type": config.get("model_type"),
        "family": base_type,
        "format": reader.format,
        "parameters": sum(math.prod(i.shape) for i in infos),
        "dtypes": dict(Counter(i.dtype_name for i in infos)),
        "shards": [{"file": shard.name, "bytes": shard.stat().st_size} for shard in reader.shards],
    }
    if base_type in ATTENTION_FAMILIES:
        spec = attention_spec(config | {"model_type": base_type}, reader.names())
        info.update(
            layers=spec.num_layers,
            heads=spec.num_heads,
            kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            hidden_size=spec.hidden_size,
        )
    if plan:
        try:
            plan_layers(plan)
        except PlanError as error:
            raise UpcycleError(f"{reader.folder}: {error}") from None
        info["method"] = plan.get("method")
        info["plan"] = plan.get("layers")
        if plan.get("towers"):
            info["towers"] = plan["towers"]
    return info


def plan_summary(layers: list[dict]) -> list[str]:
    """One line per changed layer, each change described by its typed plan class (``modeling.plan``)."""
    described = ((index, layer.describe()) for index, layer in enumerate(parse_layers(layers)))
    return [f"  layer {index:>3}: {text}" for index, text in described if text]


def tower_summary(towers: dict[str, list[dict]]) -> list[str]:
    """One line per CLIP tower with MoE FFNs: experts, top-k and the layers that have them."""
    lines = []
    for tower, layers in plan_layers({"towers": towers}).items():
        moe = [index for index, layer in enumerate(layers) if layer.get(MoEFFN)]
        if moe:
            first = layers[moe[0]].get(MoEFFN)
            lines.append(f"  {tower} tower: {first.describe()}, in layers {moe} of {len(layers)}")
    return lines


def format_description(info: dict) -> str:
    """Human-readable form of :func:`describe`."""
    lines = [f"path:        {info['path']}", f"model_type:  {info['model_type']} (family {info['family']})"]
    if "layers" in info:
        lines.append(
            f"layers:      {info['layers']}  heads: {info['heads']}  kv heads: {info['kv_heads']}  "
            f"head dim: {info['head_dim']}  hidden: {info['hidden_size']}"
        )
    lines.append(f"parameters:  {info['parameters']:,}")
    lines.append("dtypes:      " + ", ".join(f"{k} ({v} tensors)" for k, v in info["dtypes"].items()))
    total = sum(s["bytes"] for s in info["shards"])
    lines.append(f"shards:      {len(info['shards'])} {info['format']} file(s), {total / 1e9:.3f} GB")
    lines += [f"  {s['file']}  {s['bytes'] / 1e6:.1f} MB" for s in info["shards"]]
    if "method" in info:
        lines.append(f"method:      {info['method']}")
        lines += plan_summary(info["plan"] or [])
        lines += tower_summary(info.get("towers") or {})
    return "\n".join(lines)
