"""The per-layer plan of ``config.json``'s ``upcycle`` block, typed: one dataclass per change.

The plan is the contract between conversion (which writes it), loading (whose surgery applies it) and the tools that
show it (``upcycle inspect``, the model card). On disk it stays plain JSON, one object per layer whose keys name the
changes; :func:`parse_layers` turns it into these classes and refuses, in one line, a change or a field this runtime
does not know (a checkpoint written by a newer upcycle). Standard library only: this file travels with checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ROUTER_KINDS = ("query-norm", "learned", "fitted")  # HeadGate.router: the classes are in routers.py
MHE_VARIANTS = ("mul", "add")  # MHE.variant: how a head's embedding meets the shared projection (mhe_projection.py)


class PlanError(ValueError):
    """A plan this runtime cannot apply."""


UPGRADE = (
    "the checkpoint was written by a newer upcycle than the runtime loading it: upgrade upcycle "
    "(pip install -U upcycle) or load it with its own runtime files (trust_remote_code=True)"
)


def _heads(indices: list[int]) -> str:
    return " ".join(str(i) for i in indices)


@dataclass(frozen=True)
class Change:
    """One change of a layer (``KEY`` and ``COLUMNS`` are class attributes, not fields). ``KEY`` names it in the JSON
    plan; ``COLUMNS`` / :meth:`cells` are its columns in the card's plan table, :meth:`describe` its line in
    ``upcycle inspect``."""

    KEY = ""
    COLUMNS = ()

    @classmethod
    def from_json(cls, value: object, where: str) -> Change:
        if not isinstance(value, dict):
            raise PlanError(f"{where}: {cls.KEY} must be a JSON object, got {type(value).__name__}; {UPGRADE}")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown, missing = sorted(set(value) - names), sorted(names - set(value))
        if unknown or missing:
            problem = f"unknown field(s) {unknown}" if unknown else f"missing field(s) {missing}"
            raise PlanError(f"{where}: {cls.KEY} has {problem}; {UPGRADE}")
        return cls(**value)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        raise NotImplementedError

    def cells(self) -> tuple:
        raise NotImplementedError


@dataclass(frozen=True)
class HeadGate(Change):
    """MoH: shared heads always on, ``top_k`` of the routed heads per token, chosen by ``router``."""

    KEY = "head_gate"
    COLUMNS = ("shared heads (always on)", "routed heads", "active heads per token", "router")
    router: str
    shared_heads: list[int]
    routed_heads: list[int]
    top_k: int

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

    def describe(self) -> str:
        return "parallel block"

    def cells(self) -> tuple:
        return ("parallel",)


CHANGES: dict[str, type[Change]] = {
    cls.KEY: cls for cls in (HeadGate, AttentionHeads, MHE, MoEFFN, AttentionExperts, ParallelBlock)
}
ORDER = ("moe_ffn", "attention_experts", "parallel_block", "mhe", "attention_heads", "head_gate")  # how a layer reads


@dataclass(frozen=True)
class LayerPlan:
    """The changes of one layer, by key (a layer without changes has none)."""

    changes: dict[str, Change]

    def get(self, change: type[Change]) -> Change | None:
        return self.changes.get(change.KEY)

    def describe(self) -> str:
        """One line: the layer's changes in reading order, or "" for an unchanged layer."""
        return "; ".join(self.changes[key].describe() for key in ORDER if key in self.changes)

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
    keys = [key for key in ORDER if any(key in layer.changes for layer in layers)]
    header = tuple(column for key in keys for column in CHANGES[key].COLUMNS)
    rows = []
    for index, layer in enumerate(layers):
        cells: list = []
        for key in keys:
            change = layer.changes.get(key)
            cells += list(change.cells()) if change else ["-"] * len(CHANGES[key].COLUMNS)
        rows.append((index, *cells))
    return header, rows
