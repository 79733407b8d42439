"""The per-layer plan of ``config.json``'s ``upcycle`` block, typed: one dataclass per change, each applying itself.

The plan is the contract between conversion (whose method builds these objects and writes them), loading (which
calls each change's :meth:`Change.apply` on the freshly built layer) and the tools that show it (``upcycle inspect``,
the model card). On disk it stays plain JSON, one object per layer whose keys name the changes; :func:`parse_layers`
turns it into these classes and refuses, in one line, a change or a field this runtime does not know (a checkpoint
written by a newer upcycle). A new change is a :class:`Change` subclass given to :func:`register_change`: in its
own module under ``modeling/``, imported below the built-in changes here, or outside the package. Importing this file
needs only the standard library (``apply`` imports torch and the modules that build the change when it runs): it
travels with checkpoints, and ``upcycle inspect`` reads plans without torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from .change import CHANGES, UPGRADE, Change, PlanError, register_change

ROUTER_KINDS = ("query-norm", "learned", "fitted")  # HeadGate.router: the classes are in routers.py
MHE_VARIANTS = ("mul", "add")  # MHE.variant: how a head's embedding meets the shared projection (mhe_projection.py)


def _heads(indices: list[int]) -> str:
    return " ".join(str(i) for i in indices)


@dataclass(frozen=True)
class HeadGate(Change):
    """MoH: shared heads always on, ``top_k`` of the routed heads per token, chosen by ``router``."""

    KEY = "head_gate"
    COLUMNS = ("shared heads (always on)", "routed heads", "active heads per token", "router")
    router: str
    shared_heads: list[int]
    routed_heads: list[int]
    top_k: int

    def apply(self, layer, config) -> None:
        from .gated_attention import attach_head_router
        from .layer_parts import attention_of
        from .routers import build_router

        attention = attention_of(layer)
        heads = (config.hidden_size, config.num_attention_heads, self.shared_heads, self.routed_heads, self.top_k)
        router = build_router(self.router, *heads)
        weight = next(attention.parameters())
        router.to(device=weight.device, dtype=weight.dtype if weight.is_floating_point() else None)
        attach_head_router(attention, router)

    def describe(self) -> str:
        active = len(self.shared_heads) + self.top_k
        total = len(self.shared_heads) + len(self.routed_heads)
        return (
            f"{self.router} router, shared {self.shared_heads}, top-{self.top_k} of {self.routed_heads} "
            f"({active}/{total} active)"
        )

    def cells(self) -> tuple:
        return (
            _heads(self.shared_heads),
            _heads(self.routed_heads),
            f"{len(self.shared_heads)} + top-{self.top_k} of {len(self.routed_heads)}",
            self.router,
        )


@dataclass(frozen=True)
class AttentionHeads(Change):
    """Head pruning: only these query heads and key/value heads remain."""

    KEY = "attention_heads"
    COLUMNS = ("query heads kept", "kept heads", "kept KV heads")
    kept_heads: list[int]
    kept_kv_heads: list[int]

    def apply(self, layer, config) -> None:
        """q/k/v rows and o_proj columns of the dropped heads sliced away."""
        from .layer_parts import attention_of, head_dim_of, head_rows, projections_of, sliced_linear

        attention = attention_of(layer)
        head_dim = head_dim_of(attention)
        heads, kv_heads = list(self.kept_heads), list(self.kept_kv_heads)
        for proj, (parent, name) in projections_of(layer).items():
            rows = head_rows(heads if proj in ("q_proj", "o_proj") else kv_heads, head_dim)
            setattr(parent, name, sliced_linear(getattr(parent, name), rows, 1 if proj == "o_proj" else 0))
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = len(heads) // len(kv_heads)
        if hasattr(attention, "num_attention_heads"):  # BERT
            attention.num_attention_heads = len(heads)
            attention.all_head_size = len(heads) * head_dim

    def describe(self) -> str:
        return (
            f"{len(self.kept_heads)} query heads kept {self.kept_heads}, "
            f"{len(self.kept_kv_heads)} KV heads {self.kept_kv_heads}"
        )

    def cells(self) -> tuple:
        return (len(self.kept_heads), _heads(self.kept_heads), _heads(self.kept_kv_heads) or "-")


@dataclass(frozen=True)
class MHE(Change):
    """Multi-head embedding: each named projection is one shared projection plus per-head embeddings."""

    KEY = "mhe"
    COLUMNS = ("variant", "Q heads", "K heads", "V heads")
    variant: str
    heads: dict[str, int]

    def apply(self, layer, config) -> None:
        """The q/k/v projections named in ``heads`` become MHE projections of that many heads."""
        from .layer_parts import attention_of, head_dim_of, projections_of
        from .mhe_projection import MHEProjection

        head_dim = head_dim_of(attention_of(layer))
        projections = projections_of(layer)
        for proj, heads in self.heads.items():
            parent, name = projections[proj]
            old = getattr(parent, name)
            factory = {"bias": old.bias is not None, "device": old.weight.device, "dtype": old.weight.dtype}
            new = MHEProjection(old.in_features, head_dim, heads, self.variant, **factory)
            new.requires_grad_(old.weight.requires_grad)
            setattr(parent, name, new)

    def describe(self) -> str:
        counts = ", ".join(
            f"{proj[0].upper()} over {self.heads[proj]} heads"
            for proj in ("q_proj", "k_proj", "v_proj")
            if proj in self.heads
        )
        return f"MHE-{self.variant}, one shared projection each: {counts}"

    def cells(self) -> tuple:
        return (self.variant, *(self.heads.get(proj, "-") for proj in ("q_proj", "k_proj", "v_proj")))


@dataclass(frozen=True)
class MoEFFN(Change):
    """The FFN becomes ``experts`` copies behind a top-k router."""

    KEY = "moe_ffn"
    COLUMNS = ("FFN experts", "FFN routing")
    experts: int
    top_k: int

    def apply(self, layer, config) -> None:
        """The layer's MLP becomes ``experts`` copies of itself (filled from the checkpoint) behind a top-k router."""
        import copy

        from .experts import MoEFeedForward

        copies = [copy.deepcopy(layer.mlp) for _ in range(self.experts)]
        layer.mlp = MoEFeedForward(copies, config.hidden_size, self.top_k)

    def describe(self) -> str:
        return f"FFN {self.experts} experts, top-{self.top_k}"

    def cells(self) -> tuple:
        return (self.experts, f"top-{self.top_k}")


@dataclass(frozen=True)
class AttentionExperts(Change):
    """BAM: the attention is a soft mixture of ``experts`` attention experts (``kv``: per-expert or shared K/V)."""

    KEY = "attention_experts"
    COLUMNS = ("attention experts (soft)", "keys and values")
    experts: int
    kv: str

    def apply(self, layer, config) -> None:
        """N attention experts as one attention of N*h query heads (N*g or g KV heads), softly gated per expert."""
        from .experts import SoftExpertRouter, head_expert_order
        from .gated_attention import attach_head_router
        from .layer_parts import resized_linear

        attention, hidden_size = layer.self_attn, config.hidden_size
        experts, shared_kv, head_dim = self.experts, self.kv == "shared", attention.head_dim
        heads, kv_heads = attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim
        attention.q_proj = resized_linear(attention.q_proj, hidden_size, experts * heads * head_dim)
        attention.o_proj = resized_linear(attention.o_proj, experts * heads * head_dim, attention.o_proj.out_features)
        if not shared_kv:
            attention.k_proj = resized_linear(attention.k_proj, hidden_size, experts * kv_heads * head_dim)
            attention.v_proj = resized_linear(attention.v_proj, hidden_size, experts * kv_heads * head_dim)
        attention.num_key_value_groups = heads // kv_heads if not shared_kv else experts * heads // kv_heads
        order = head_expert_order(experts, heads, kv_heads, shared_kv)
        router = SoftExpertRouter(hidden_size, [expert for expert, _ in order])
        router.to(device=attention.q_proj.weight.device, dtype=attention.q_proj.weight.dtype)
        attach_head_router(attention, router)

    def describe(self) -> str:
        return f"attention {self.experts} soft experts ({self.kv} KV)"

    def cells(self) -> tuple:
        return (self.experts, f"{self.kv} K/V")


@dataclass(frozen=True)
class ParallelBlock(Change):
    """x + A(LN x) + F(LN x) instead of the sequential block. On disk: ``"parallel_block": true``."""

    KEY = "parallel_block"
    COLUMNS = ("block",)

    @classmethod
    def from_json(cls, value: object, where: str) -> ParallelBlock | None:
        if not isinstance(value, bool):
            raise PlanError(f"{where}: parallel_block must be true or false, got {value!r}; {UPGRADE}")
        return cls() if value else None

    def to_json(self) -> bool:
        return True

    def apply(self, layer, config) -> None:
        from .experts import make_parallel_block

        make_parallel_block(layer)

    def describe(self) -> str:
        return "parallel block"

    def cells(self) -> tuple:
        return ("parallel",)


for _change in (MoEFFN, AttentionExperts, ParallelBlock, MHE, AttentionHeads, HeadGate):
    register_change(_change)
# a change in a module of its own registers here, one line each, after the built-ins in reading order:
# from .<change> import <Class>  # noqa: F401  (transformers copies a checkpoint's files by these import lines)


@dataclass(frozen=True)
class LayerPlan:
    """The changes of one layer, by key (a layer without changes has none)."""

    changes: dict[str, Change]

    @classmethod
    def of(cls, *changes: Change | None) -> LayerPlan:
        """The plan of a layer with these changes (``None`` entries skipped)."""
        return cls({change.KEY: change for change in changes if change is not None})

    def get(self, change: type[Change]) -> Change | None:
        return self.changes.get(change.KEY)

    def in_order(self) -> list[Change]:
        """The layer's changes in reading order (the order of :data:`CHANGES`)."""
        return [self.changes[key] for key in CHANGES if key in self.changes]

    def apply(self, layer, config) -> None:
        """Every change of this layer applied to ``layer``, in reading order (see :meth:`Change.apply`)."""
        for change in self.in_order():
            change.apply(layer, config)

    def describe(self) -> str:
        """One line: the layer's changes in reading order, or "" for an unchanged layer."""
        return "; ".join(change.describe() for change in self.in_order())

    def to_json(self) -> dict:
        return {key: change.to_json() for key, change in self.changes.items()}


def parse_layer(value: object, where: str) -> LayerPlan:
    """One layer's JSON object as a :class:`LayerPlan`; an unknown change or field is one :class:`PlanError` line."""
    if not isinstance(value, dict):
        raise PlanError(f"{where} must be a JSON object, got {type(value).__name__}; {UPGRADE}")
    changes = {}
    for key, item in value.items():
        if key not in CHANGES:
            raise PlanError(f"{where}: unknown change {key!r}; {UPGRADE}")
        change = CHANGES[key].from_json(item, where)
        if change is not None:
            changes[key] = change
    return LayerPlan(changes)


def plans_json(layers: list[LayerPlan]) -> list[dict]:
    """The JSON of a list of layer plans, as ``config.json`` holds it."""
    return [layer.to_json() for layer in layers]


def parse_layers(layers: object, where: str = "upcycle plan") -> list[LayerPlan]:
    """A list of per-layer JSON objects (``config["upcycle"]["layers"]`` or one tower's) as :class:`LayerPlan` s."""
    if not isinstance(layers, list):
        raise PlanError(f"{where}: the layers must be a JSON list; {UPGRADE}")
    return [parse_layer(layer, f"{where}, layer {index}") for index, layer in enumerate(layers)]


def plan_layers(plan: dict) -> dict[str, list[LayerPlan]]:
    """Every layer list of an ``upcycle`` block, by name: ``{"layers": [...]}`` for one stack, one entry per tower
    for CLIP (``{"text": [...], "vision": [...]}``)."""
    if not isinstance(plan, dict):
        raise PlanError(f"the upcycle block of config.json must be a JSON object; {UPGRADE}")
    if "towers" in plan:
        towers = plan["towers"]
        if not isinstance(towers, dict):
            raise PlanError(f"upcycle plan: towers must be a JSON object; {UPGRADE}")
        return {name: parse_layers(layers, f"upcycle plan, {name} tower") for name, layers in towers.items()}
    return {"layers": parse_layers(plan.get("layers", []))}


def plan_rows(layers: list[LayerPlan]) -> tuple[tuple[str, ...], list[tuple]]:
    """(header, rows) of a plan table: one column group per change the layers have, one row per layer
    (``(layer, *cells)``; "-" where a layer lacks a change others have)."""
    keys = [key for key in CHANGES if any(key in layer.changes for layer in layers)]
    header = tuple(column for key in keys for column in CHANGES[key].COLUMNS)
    rows = []
    for index, layer in enumerate(layers):
        cells: list = []
        for key in keys:
            change = layer.changes.get(key)
            cells += list(change.cells()) if change else ["-"] * len(CHANGES[key].COLUMNS)
        rows.append((index, *cells))
    return header, rows
