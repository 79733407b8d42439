"""CLIP-MoE (Diversified Multiplet Upcycling): CLIP whose feed-forward layers become experts.

BASE is expert 0 and gives every weight outside the FFN experts; each ``--expert`` (a stage
checkpoint of Multistage Contrastive Learning, i.e. a CLIP whose FFNs were fine-tuned) adds
an expert. In the last ``--layers`` L layers of both towers, the CLIPMLP becomes the experts'
CLIPMLPs behind a bias-free linear router on the post-LN input, softmax in fp32, top-k
renormalised (``--top-k``, default 2). ``--upcycle-copies E`` builds the sparse-upcycling
baseline instead: E copies of the base FFN. Expert tensors are copied file to file from their
checkpoints; routers start random (normal, std 0.02, ``--seed``). The output is a drop-in
CLIPModel (same processor, ``get_image_features``, ``get_text_features``, ``logits_per_image``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..arch.clip import ClipSpec, clip_architecture, clip_spec
from ..checkpoint.compare import checkpoint_differences
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.source import open_source
from ..checkpoint.writer import TensorSpec
from ..errors import UpcycleError
from ..modeling.plan import LayerPlan, MoEFFN
from .base import Conversion, SourceTensor, check_source, runtime_config
from .spec import DATA_PANEL, MethodCard, MethodSpec, option

if TYPE_CHECKING:
    import torch
else:
    from ..lazy import torch


FFN_TENSORS = (("fc1", "weight"), ("fc1", "bias"), ("fc2", "weight"), ("fc2", "bias"))


@dataclass
class ClipMoEOptions:
    """The CLIP-MoE flags of ``upcycle convert``."""

    experts: list[str] = option(
        flag="--expert", role="experts", default_factory=list, help="an MCL stage checkpoint. Repeat for each expert."
    )
    layers: int | None = option(None, help="experts in the last L layers of both towers (default: all).")
    top_k: int = option(2, help="experts per token.")
    upcycle_copies: int | None = option(
        None, help="the sparse-upcycling baseline, E copies of the base FFN (instead of --expert)."
    )
    seed: int = option(0, panel=DATA_PANEL, help="seed of the random routers.")
    trust_remote_code: bool = (
        False  # use the checkpoints although their config names code of their own (never run nor copied)
    )


def expert_readers(
    reader: CheckpointReader, spec: ClipSpec, options: ClipMoEOptions
) -> tuple[list[CheckpointReader], list[str]]:
    """The base followed by the stage checkpoints (or E copies of the base), validated against the base."""
    if options.upcycle_copies is not None:
        if options.experts:
            raise UpcycleError(
                "--upcycle-copies builds the sparse-upcycling baseline from BASE alone; "
                "drop --expert or --upcycle-copies"
            )
        if options.upcycle_copies < 2:
            raise UpcycleError(
                f"--upcycle-copies {options.upcycle_copies} must be at least 2 (copies of the base FFN as experts)"
            )
        return [reader] * options.upcycle_copies, ["base"] + [f"copy {i}" for i in range(1, options.upcycle_copies)]
    if not options.experts:
        raise UpcycleError(
            "--method clip-moe needs --expert STAGE (an MCL stage checkpoint; repeat for each) or --upcycle-copies E"
        )
    readers, labels = [reader], ["base"]
    for index, path in enumerate(options.experts, 1):
        expert = open_source(path, role="--expert").reader  # an upcycle model is refused in one line
        check_source(expert, clip_spec(expert.config, path), options)
        readers.append(expert)
        labels.append(f"expert {index} ({path})")
    problems = checkpoint_differences(readers, labels, clip_architecture)
    if problems:
        raise UpcycleError(
            f"the experts do not match the base {reader.folder}: {'; '.join(problems)}. "
            "Use stage checkpoints of this base"
        )
    return readers, labels


def tower_plans(spec: ClipSpec, experts: int, top_k: int, layers: int | None) -> dict[str, list[LayerPlan]]:
    """Per tower, per layer: FFN experts for the last ``layers`` layers (None: all), nothing for the others."""
    experts_ffn = MoEFFN(experts=experts, top_k=top_k)
    return {
        tower.name: [
            LayerPlan.of(experts_ffn if index >= tower.num_layers - (layers or tower.num_layers) else None)
            for index in range(tower.num_layers)
        ]
        for tower in spec.towers
    }


def checked_layers(spec: ClipSpec, options: ClipMoEOptions) -> int | None:
    """``--layers`` (None: all), after one line when the shallower tower has fewer layers."""
    shallower = min(tower.num_layers for tower in spec.towers)
    layers = options.layers
    if layers is not None and not 1 <= layers <= shallower:
        raise UpcycleError(
            f"--layers {layers} is outside [1, {shallower}] (the shallower tower has {shallower} layers)"
        )
    return layers


def ffn_edits(reader: CheckpointReader, spec: ClipSpec, layers: int | None) -> dict[str, tuple]:
    """FFN tensor -> (tower, layer, proj, kind) of every FFN that becomes experts, after one line when the
    checkpoint lacks one."""
    edits: dict[str, tuple] = {}
    for tower in spec.towers:
        for layer in range(tower.num_layers - (layers or tower.num_layers), tower.num_layers):
            for proj, kind in FFN_TENSORS:
                edits[tower.ffn(layer, proj, kind)] = (tower, layer, proj, kind)
    missing = sorted(set(edits) - set(reader.names()))
    if missing:
        raise UpcycleError(
            f"{reader.folder} lacks CLIP feed-forward tensors such as {missing[0]}; "
            "pass a CLIPModel checkpoint saved with save_pretrained"
        )
    return edits


def convert(reader: CheckpointReader, options: ClipMoEOptions) -> Conversion:
    """Plan the CLIP-MoE assembly of the CLIP behind ``reader`` and its stage experts."""
    spec = clip_spec(reader.config, str(reader.folder))
    check_source(reader, spec, options)
    readers, labels = expert_readers(reader, spec, options)
    experts = len(readers)
    if not 1 <= options.top_k <= experts:
        raise UpcycleError(
            f"--top-k {options.top_k} is outside [1, {experts}] for {experts} experts; lower --top-k or add experts"
        )
    layers = checked_layers(spec, options)
    plans = tower_plans(spec, experts, options.top_k, layers)
    edits = ffn_edits(reader, spec, layers)
    generator = torch.Generator().manual_seed(options.seed)
    dtype = reader.info(next(iter(edits))).dtype
    layout, sources = [], {}
    for name in reader.names():
        info = reader.info(name)
        if name not in edits:
            layout.append(TensorSpec(name, info.dtype, tuple(info.shape)))
            sources[name] = SourceTensor(name)
            continue
        tower, layer, proj, kind = edits[name]
        for expert, expert_reader in enumerate(readers):
            out = f"{tower.layer_prefix(layer)}mlp.experts.{expert}.{proj}.{kind}"
            layout.append(TensorSpec(out, info.dtype, tuple(info.shape)))
            sources[out] = SourceTensor(name, expert_reader)
        if (proj, kind) == ("fc2", "bias"):
            router = f"{tower.layer_prefix(layer)}mlp.router.weight"
            layout.append(TensorSpec(router, dtype, (experts, tower.hidden_size)))
            sources[router] = None

    def tensors():
        for item in layout:
            source = sources[item.name]
            yield (
                item.name,
                source if source is not None else (torch.randn(item.shape, generator=generator) * 0.02).to(item.dtype),
            )

    config, auto_class, pipeline_tag = runtime_config(reader.config, spec, "clip-moe", plans)
    kind = "sparse upcycling (copies of the base FFN)" if options.upcycle_copies else "CLIP-MoE (MCL stage FFNs)"
    return Conversion(
        method="clip-moe",
        config=config,
        layout=layout,
        tensors=tensors,
        plan_lines=[
            f"{kind}: {experts} experts, top-{options.top_k}, "
            f"in {'all' if layers is None else f'the last {layers}'} layers of both towers "
            f"(text {spec.text.num_layers} layers, vision {spec.vision.num_layers} layers)"
        ]
        + [
            f"  expert {index}: {reader.folder}"
            + (" (the base)" if index == 0 else " (a copy of the base FFN)" if options.upcycle_copies else "")
            for index, reader in enumerate(readers)
        ],
        report={
            "options": {
                "experts": list(options.experts),
                "layers": layers,
                "top_k": options.top_k,
                "upcycle_copies": options.upcycle_copies,
                "seed": options.seed,
            },
            "experts": [str(r.folder) for r in readers],
            "moe_layers": {tower.name: tower.num_layers if layers is None else layers for tower in spec.towers},
        },
        tags=["clip", "clip-moe", "moe", "mixture-of-experts"],
        description=(
            f"{kind}: the feed-forward layers of {'all' if layers is None else f'the last {layers}'} layers "
            f"of both towers of a CLIP are {experts} "
            f"experts with a top-{options.top_k} router; everything else is the base model's. A drop-in CLIPModel."
        ),
        auto_class=auto_class,
        pipeline_tag=pipeline_tag,
    )


CITATION = """@article{zhang2024clipmoe,
  title = {{CLIP-MoE}: Towards Building Mixture of Experts for {CLIP} with Diversified Multiplet Upcycling},
  author = {Zhang, Jihai and Qu, Xiaoye and Zhu, Tong and Cheng, Yu},
  journal = {arXiv preprint arXiv:2409.19291},
  year = {2024}
}"""

SPEC = MethodSpec(
    name="clip-moe",
    summary="CLIP whose FFNs become experts (Diversified Multiplet Upcycling).",
    panel="CLIP-MoE",
    options=ClipMoEOptions,
    convert=convert,
    sources=("clip",),
    example="upcycle convert ./clip ./clip-moe --method clip-moe --expert ./mcl/stage-1 --expert ./mcl/stage-2 "
    "--expert ./mcl/stage-3",
    tunes=False,
    card=MethodCard(
        "CLIP-MoE (Diversified Multiplet Upcycling)",
        "CLIP models fine-tuned to capture complementary information (multistage contrastive learning) become the "
        "feed-forward experts of a sparse mixture: a drop-in CLIP with more capacity for little extra compute "
        "(Zhang et al. 2024).",
        (CITATION,),
    ),
)
