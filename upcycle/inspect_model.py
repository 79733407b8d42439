"""``upcycle inspect``: what a checkpoint folder holds, read from its headers only."""

from __future__ import annotations

import math
from collections import Counter

from .arch import ATTENTION_FAMILIES, attention_spec
from .checkpoint.reader import CheckpointReader, resolve_source


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
        "dtypes": dict(Counter(str(i.dtype).removeprefix("torch.") for i in infos)),
        "shards": [{"file": shard.name, "bytes": shard.stat().st_size} for shard in reader.shards],
    }
    if base_type in ATTENTION_FAMILIES:
        spec = attention_spec(config | {"model_type": base_type}, reader.names())
        info.update(layers=spec.num_layers, heads=spec.num_heads, kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                    hidden_size=spec.hidden_size)
    if plan:
        info["method"] = plan.get("method")
        info["plan"] = plan.get("layers")
        if plan.get("towers"):
            info["towers"] = plan["towers"]
    return info


def _plan_summary(layers: list[dict]) -> list[str]:
    lines = []
    for index, layer in enumerate(layers):
        gate, heads, mhe = layer.get("head_gate"), layer.get("attention_heads"), layer.get("mhe")
        moe, experts = layer.get("moe_ffn"), layer.get("attention_experts")
        if moe or experts:
            parts = [f"FFN {moe['experts']} experts, top-{moe['top_k']}"] if moe else []
            if experts:
                parts.append(f"attention {experts['experts']} soft experts ({experts['kv']} KV)")
            if layer.get("parallel_block"):
                parts.append("parallel block")
            lines.append(f"  layer {index:>3}: {'; '.join(parts)}")
        if mhe:
            counts = ", ".join(f"{proj[0].upper()} over {mhe['heads'][proj]} heads" for proj in ("q_proj", "k_proj", "v_proj") if proj in mhe["heads"])
            lines.append(f"  layer {index:>3}: MHE-{mhe['variant']}, one shared projection each: {counts}")
        if heads:
            lines.append(f"  layer {index:>3}: {len(heads['kept_heads'])} query heads kept {heads['kept_heads']}, "
                         f"{len(heads['kept_kv_heads'])} KV heads {heads['kept_kv_heads']}")
        if gate:
            active = len(gate["shared_heads"]) + gate["top_k"]
            total = active - gate["top_k"] + len(gate["routed_heads"])
            lines.append(f"  layer {index:>3}: {gate['router']} router, shared {gate['shared_heads']}, "
                         f"top-{gate['top_k']} of {gate['routed_heads']} ({active}/{total} active)")
    return lines


def format_description(info: dict) -> str:
    """Human-readable form of :func:`describe`."""
    lines = [f"path:        {info['path']}", f"model_type:  {info['model_type']} (family {info['family']})"]
    if "layers" in info:
        lines.append(f"layers:      {info['layers']}  heads: {info['heads']}  kv heads: {info['kv_heads']}  "
                     f"head dim: {info['head_dim']}  hidden: {info['hidden_size']}")
    lines.append(f"parameters:  {info['parameters']:,}")
    lines.append("dtypes:      " + ", ".join(f"{k} ({v} tensors)" for k, v in info["dtypes"].items()))
    total = sum(s["bytes"] for s in info["shards"])
    lines.append(f"shards:      {len(info['shards'])} {info['format']} file(s), {total / 1e9:.3f} GB")
    lines += [f"  {s['file']}  {s['bytes'] / 1e6:.1f} MB" for s in info["shards"]]
    if "method" in info:
        lines.append(f"method:      {info['method']}")
        lines += _plan_summary(info["plan"] or [])
        for tower, layers in (info.get("towers") or {}).items():
            moe = [index for index, layer in enumerate(layers) if layer.get("moe_ffn")]
            if moe:
                spec = layers[moe[0]]["moe_ffn"]
                lines.append(f"  {tower} tower: FFN {spec['experts']} experts, top-{spec['top_k']}, in layers {moe} of {len(layers)}")
    return "\n".join(lines)

