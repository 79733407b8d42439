"""BAM, Branch-Attend-Mix (Zhang et al. 2024), and its baseline BTX: mix dense models branched from one seed.

Inputs: the seed (expert 0) and N-1 branch-trained models of the same architecture. Per layer:

- FFN: each model's MLP becomes one expert behind a top-k router (``--ffn-top-k``: 1 for BAM,
  2 for BTX by default).
- Attention, ``--attention``:
  - ``expert-kv``: every expert keeps its own Q, K, V, O. The soft mixture
    ``sum_j g_j(x) MHA_j(x)`` is one attention with N*h query heads and N*g KV heads
    (expert-major), o_proj the experts' o_proj side by side, and each head gated by its
    expert's router weight ``g = softmax(W x)``: the head-gated attention of MoH, one KV cache.
  - ``shared-kv``: per-expert Q and O, one K and V (the experts' mean): N*h query heads in
    KV-group-major order over g KV heads.
  - ``average``: the experts' attention averaged (BTX).
- Everything else (embeddings, norms, q/k norms, LM head, an o_proj bias) is the uniform average.

BTX from llama or mistral models (averaged attention, sequential block) is written as a plain
Mixtral checkpoint; everything else is an upcycle checkpoint. Routers start random (normal,
std ``initializer_range``, the paper) or zero (``--router-init zero``: a uniform mixture, so N
identical experts reproduce the dense model). The N checkpoints are read one tensor at a time;
averages are computed in row chunks and expert FFN tensors are copied file to file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..arch import DecoderSpec, decoder_spec
from ..checkpoint.compare import checkpoint_differences
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.source import open_source
from ..checkpoint.writer import TensorSpec
from ..errors import UpcycleError
from ..modeling.plan import AttentionExperts, LayerPlan, MoEFFN, ParallelBlock
from .base import ChunkedTensor, Conversion, SourceTensor, check_source, native_refusal, runtime_config
from .spec import DATA_PANEL, MethodCard, MethodSpec, option

if TYPE_CHECKING:
    import torch
else:
    from ..lazy import torch


AttentionMode = Literal["expert-kv", "shared-kv", "average"]
RouterInit = Literal["random", "zero"]
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
)
CHUNK_BYTES = 64 * 2**20


@dataclass
class BAMOptions:
    """The BAM/BTX flags of ``upcycle convert``."""

    experts: list[str] = option(
        flag="--expert",
        role="experts",
        default_factory=list,
        help="a model branched from SRC (the seed, expert 0) and trained further. Repeat for each expert.",
    )
    attention: AttentionMode = option(
        "expert-kv",
        help="expert-kv (per-expert Q, K, V, O), shared-kv (per-expert Q, O; K, V averaged) or average (BTX).",
    )
    ffn_top_k: int | None = option(
        None, help="FFN experts per token (default 1; 2 with --attention average, as in BTX)."
    )
    router_init: RouterInit = option(
        "random",
        help="random (the paper; normal with the model's initializer_range, "
        "--seed) or zero (uniform mixture at first).",
    )
    parallel_block: bool = option(
        False, help="parallel attention+FFN blocks, x + A(LN x) + F(LN x) (changes a sequential seed's function)."
    )
    seed: int = option(0, panel=DATA_PANEL, help="seed of the random routers.")
    trust_remote_code: bool = (
        False  # use the checkpoints although their config names code of their own (never run nor copied)
    )


def open_experts(reader: CheckpointReader, options: BAMOptions) -> list[CheckpointReader]:
    """The seed's reader followed by one reader per ``--expert`` (an upcycle model is refused in one line)."""
    readers = [reader]
    for path in options.experts:
        expert = open_source(path, role="--expert").reader
        check_source(expert, decoder_spec(expert.config, path), options)
        readers.append(expert)
    return readers


def validate(options: BAMOptions, experts: int) -> int:
    """Check the flags; returns the FFN top-k."""
    if not options.experts:
        raise UpcycleError(
            "--method bam needs at least one --expert PATH: "
            "a model branched from SRC (the seed, expert 0) and trained further"
        )
    top_k = options.ffn_top_k if options.ffn_top_k is not None else (2 if options.attention == "average" else 1)
    if not 1 <= top_k <= experts:
        raise UpcycleError(
            f"--ffn-top-k {top_k} is outside [1, {experts}] for {experts} experts; choose a value in that range"
        )
    return top_k


def distinct(readers: list[CheckpointReader]) -> list[tuple[CheckpointReader, int]]:
    """The distinct checkpoints among ``readers`` (same folder on disk) with how often each occurs."""
    groups: dict[Path, list] = {}
    for reader in readers:
        groups.setdefault(Path(reader.folder).resolve(), [reader, 0])[1] += 1
    return [(reader, count) for reader, count in groups.values()]


def mean_tensor(readers: list[CheckpointReader], name: str, dtype: torch.dtype) -> ChunkedTensor | SourceTensor:
    """The element-wise mean of one tensor over the readers, in float32 row chunks; a file-to-file copy
    when every reader is the same checkpoint (sparse upcycling of one model)."""
    groups = distinct(readers)
    if len(groups) == 1:
        return SourceTensor(name, groups[0][0])
    shape = tuple(readers[0].info(name).shape)
    rows = shape[0] if shape else 1
    step = max(1, CHUNK_BYTES // (4 * math.prod(shape[1:])))  # rows per float32 chunk

    def chunks():
        if not shape:
            yield (sum(count * reader.get(name).float() for reader, count in groups) / len(readers)).to(dtype)
            return
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            total = torch.zeros(stop - start, *shape[1:])
            for reader, count in groups:
                total += count * reader.get_rows(name, start, stop).float()
            yield (total / len(readers)).to(dtype)

    return ChunkedTensor(dtype, shape, chunks)


def mixed_attention(
    readers: list[CheckpointReader], spec: DecoderSpec, layer: int, proj: str, kind: str, shared_kv: bool
) -> torch.Tensor | ChunkedTensor:
    """One attention tensor of the mixed layer: experts side by side (heads in the mixed order), or the mean."""
    from ..modeling.experts import head_expert_order

    name = spec.attention(layer, proj, kind)
    dtype = readers[0].info(name).dtype
    if proj in ("k_proj", "v_proj") and shared_kv or proj == "o_proj" and kind == "bias":
        return mean_tensor(readers, name, dtype)
    parts = [reader.get(name) for reader in readers]
    if proj in ("k_proj", "v_proj"):
        return torch.cat(parts, dim=0).contiguous()  # [N*g*d, D] expert-major
    order = head_expert_order(len(readers), spec.num_heads, spec.num_kv_heads, shared_kv)
    dim = 1 if proj == "o_proj" else 0
    heads = [part.unflatten(dim, (spec.num_heads, spec.head_dim)) for part in parts]  # [h, d, D] or [D, h, d]
    picked = [heads[expert].select(dim, head) for expert, head in order]  # each [d, D] / [d] / [D, d]
    return torch.stack(picked, dim=dim).flatten(dim, dim + 1).contiguous()  # [N*h*d, D] or [D, N*h*d]


def native_mixtral(
    spec: DecoderSpec, config: dict, options: BAMOptions, experts: int, top_k: int
) -> tuple[dict | None, str]:
    """(Mixtral config, '') when the mix is BTX from llama/mistral that Mixtral expresses exactly, else (None, why
    not)."""
    if options.attention != "average":
        return None, "soft attention experts need the upcycle runtime"
    if spec.model_type not in ("llama", "mistral"):
        return None, f"Mixtral holds llama/mistral layers, not {spec.model_type}"
    if options.parallel_block:
        return None, "Mixtral has no parallel block"
    if config.get("attention_bias") or config.get("mlp_bias"):
        return None, "Mixtral has no attention or MLP biases"
    mixtral = {
        key: value
        for key, value in config.items()
        if key not in ("attention_bias", "mlp_bias", "pretraining_tp", "auto_map")
    }
    mixtral.update(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        head_dim=spec.head_dim,
        router_aux_loss_coef=0.01,
        output_router_logits=False,
        sliding_window=config.get("sliding_window"),
    )
    refusal = native_refusal(mixtral)
    return (None, f"transformers refuses the Mixtral config: {refusal}") if refusal else (mixtral, "")


def mixtral_file_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Mixtral's fused in-memory experts (``mlp.experts.gate_up_proj``) as the per-expert tensors it saves."""
    files = {}
    for name, shape in shapes.items():
        prefix, _, leaf = name.rpartition(".mlp.")
        if not prefix:
            files[name] = shape
        elif leaf == "gate.weight":
            files[f"{prefix}.block_sparse_moe.gate.weight"] = shape
        elif leaf == "experts.gate_up_proj":  # [E, 2I, D]
            for expert in range(shape[0]):
                for proj in ("w1", "w3"):
                    files[f"{prefix}.block_sparse_moe.experts.{expert}.{proj}.weight"] = (shape[1] // 2, shape[2])
        elif leaf == "experts.down_proj":  # [E, D, I]
            for expert in range(shape[0]):
                files[f"{prefix}.block_sparse_moe.experts.{expert}.w2.weight"] = (shape[1], shape[2])
        else:
            files[name] = shape
    return files


def matching_experts(reader: CheckpointReader, options: BAMOptions) -> tuple[list[CheckpointReader], list[str]]:
    """(readers, labels) of the seed and every ``--expert``, after one line when their architectures differ."""
    readers = open_experts(reader, options)
    labels = ["seed"] + [f"expert {i} ({path})" for i, path in enumerate(options.experts, 1)]
    problems = checkpoint_differences(
        readers, labels, lambda config: {key: config.get(key) for key in ARCHITECTURE_KEYS}
    )
    if problems:
        raise UpcycleError(
            f"the experts do not match the seed {reader.folder}: {'; '.join(problems)}. "
            "Mix models branched from the same seed"
        )
    return readers, labels


@dataclass
class MixLayout:
    """The output's tensors in order, and where each comes from (a tensor, a SourceTensor, a ChunkedTensor or a
    callable that makes it)."""

    items: list[TensorSpec]
    sources: dict[str, object]

    def add(self, name: str, shape: tuple, source, dtype: torch.dtype) -> None:
        self.items.append(TensorSpec(name, dtype, tuple(shape)))
        self.sources[name] = source

    def tensors(self):
        for item in self.items:
            source = self.sources[item.name]
            yield item.name, source() if callable(source) else source


def mix_layout(
    reader: CheckpointReader,
    readers: list[CheckpointReader],
    spec: DecoderSpec,
    options: BAMOptions,
    mixtral: bool,
    dtype: torch.dtype,
) -> MixLayout:
    """Every output tensor of the mix: attention experts (or the mean), FFN experts with their routers, and the
    mean of everything else, in the seed's tensor order."""
    experts, mode = len(readers), options.attention
    shared_kv = mode == "shared-kv"
    generator = torch.Generator().manual_seed(options.seed)
    std = float(reader.config.get("initializer_range") or 0.02)

    def router(rows: int) -> torch.Tensor:
        if options.router_init == "zero":
            return torch.zeros(rows, spec.hidden_size, dtype=dtype)
        return (torch.randn(rows, spec.hidden_size, generator=generator) * std).to(dtype)

    attention_names = {
        spec.attention(layer, proj, kind): (layer, proj, kind)
        for layer in range(spec.num_layers)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
        for kind in ("weight", "bias")
    }
    mlp_names = {
        f"{spec.layer_prefix(layer)}mlp.{proj}.{kind}": (layer, proj, kind)
        for layer in range(spec.num_layers)
        for proj in MLP_PROJECTIONS
        for kind in ("weight", "bias")
    }
    layout = MixLayout([], {})
    for name in reader.names():
        info = reader.info(name)
        if name in attention_names and mode != "average":
            layer, proj, kind = attention_names[name]

            def source(layer=layer, proj=proj, kind=kind):
                return mixed_attention(readers, spec, layer, proj, kind, shared_kv)

            layout.add(name, mixed_shape(spec, proj, kind, experts, shared_kv, tuple(info.shape)), source, info.dtype)
            if proj == "o_proj" and kind == "weight":
                gate = f"{spec.layer_prefix(layer)}self_attn.head_router.weight"
                layout.add(gate, (experts, spec.hidden_size), lambda: router(experts), dtype)
        elif name in mlp_names:
            layer, proj, kind = mlp_names[name]
            for expert, expert_reader in enumerate(readers):
                if mixtral:
                    if kind == "bias":
                        continue
                    out = f"{spec.layer_prefix(layer)}block_sparse_moe.experts.{expert}.{MIXTRAL_NAMES[proj]}.weight"
                else:
                    out = f"{spec.layer_prefix(layer)}mlp.experts.{expert}.{proj}.{kind}"
                layout.add(out, info.shape, SourceTensor(name, expert_reader), info.dtype)
            if proj == "down_proj" and kind == "weight":
                gate = f"{spec.layer_prefix(layer)}{'block_sparse_moe.gate' if mixtral else 'mlp.router'}.weight"
                layout.add(gate, (experts, spec.hidden_size), lambda: router(experts), dtype)
        else:
            layout.add(name, info.shape, mean_tensor(readers, name, info.dtype), info.dtype)
    return layout


def mix_report(
    reader: CheckpointReader,
    readers: list[CheckpointReader],
    spec: DecoderSpec,
    options: BAMOptions,
    layout: MixLayout,
    top_k: int,
    dtype: torch.dtype,
    output_format: str,
) -> dict:
    """The report: options, experts, attention parameters and KV cache per layer before and after."""
    prefix = f"{spec.layer_prefix(0)}self_attn."
    per_layer_before = sum(math.prod(reader.info(n).shape) for n in reader.names() if n.startswith(prefix))
    per_layer_after = sum(math.prod(item.shape) for item in layout.items if item.name.startswith(prefix))
    kv_heads = len(readers) * spec.num_kv_heads if options.attention == "expert-kv" else spec.num_kv_heads
    return {
        "options": {
            "experts": list(options.experts),
            "attention": options.attention,
            "ffn_top_k": top_k,
            "router_init": options.router_init,
            "parallel_block": options.parallel_block,
            "seed": options.seed,
        },
        "experts": [str(r.folder) for r in readers],
        "attention_parameters_per_layer": {"before": per_layer_before, "after": per_layer_after},
        "kv_cache_bytes_per_token_per_layer": {
            "before": 2 * spec.num_kv_heads * spec.head_dim * dtype.itemsize,
            "after": 2 * kv_heads * spec.head_dim * dtype.itemsize,
        },
        "output_format": output_format,
    }


def convert(reader: CheckpointReader, options: BAMOptions) -> Conversion:
    """Plan the BAM (or BTX) mix of the seed behind ``reader`` and the ``--expert`` models."""
    spec = decoder_spec(reader.config, str(reader.folder))
    check_source(reader, spec, options)
    top_k = validate(options, len(options.experts) + 1)
    readers, labels = matching_experts(reader, options)
    experts, mode = len(readers), options.attention
    mixtral, why = native_mixtral(spec, reader.config, options, experts, top_k)
    dtype = reader.info(spec.attention(0, "q_proj")).dtype
    layout = mix_layout(reader, readers, spec, options, mixtral is not None, dtype)
    plans = [layer_plan(mode, experts, top_k, options.parallel_block) for _ in range(spec.num_layers)]
    if mixtral:
        config, auto_class, pipeline_tag = mixtral, "AutoModelForCausalLM", "text-generation"
    else:
        config, auto_class, pipeline_tag = runtime_config(reader.config, spec, "bam", plans)
    report = mix_report(
        reader, readers, spec, options, layout, top_k, dtype, "mixtral" if mixtral else f"upcycle ({why})"
    )
    name = "BTX" if mode == "average" else f"BAM ({mode})"
    return Conversion(
        method="bam",
        config=config,
        layout=layout.items,
        tensors=layout.tensors,
        plan_lines=plan_printout(
            spec, name, experts, top_k, mode, options, labels, readers, report, mixtral is not None, why
        ),
        report=report,
        tags=["bam", "moe", "mixture-of-experts"]
        if mode != "average"
        else ["btx", "moe", "mixture-of-experts", "mixtral"],
        description=(
            f"{name} mix of {experts} dense {spec.model_type} models branched from one seed: "
            f"every FFN is {experts} experts (top-{top_k}); attention is "
            f"{'averaged' if mode == 'average' else f'a soft mixture of {experts} attention experts ({mode})'}; "
            "embeddings, norms and the LM head are averaged. "
            f"Routers start {options.router_init}; tune the mix before use."
        ),
        uses_runtime=mixtral is None,
        auto_class=auto_class,
        pipeline_tag=pipeline_tag,
        file_names=mixtral_file_shapes if mixtral else None,
    )


def mixed_shape(spec: DecoderSpec, proj: str, kind: str, experts: int, shared_kv: bool, shape: tuple) -> tuple:
    """Shape of a mixed attention tensor (``mixed_attention``'s output)."""
    if proj in ("k_proj", "v_proj"):
        return shape if shared_kv else (experts * shape[0], *shape[1:])
    if proj == "o_proj":
        return shape if kind == "bias" else (shape[0], experts * shape[1])
    return (experts * shape[0], *shape[1:])


def layer_plan(mode: str, experts: int, top_k: int, parallel_block: bool) -> LayerPlan:
    """One layer's plan: FFN experts, attention experts unless the attention is averaged, the parallel block."""
    attention = None if mode == "average" else AttentionExperts(experts, "shared" if mode == "shared-kv" else "expert")
    return LayerPlan.of(MoEFFN(experts=experts, top_k=top_k), attention, ParallelBlock() if parallel_block else None)


def plan_printout(
    spec: DecoderSpec,
    name: str,
    experts: int,
    top_k: int,
    mode: str,
    options: BAMOptions,
    labels: list[str],
    readers: list[CheckpointReader],
    report: dict,
    native: bool,
    why: str,
) -> list[str]:
    """What the mix is made of and what it costs per layer."""
    kv = report["kv_cache_bytes_per_token_per_layer"]
    attention = report["attention_parameters_per_layer"]
    lines = [
        f"{name} plan: {experts} experts x {spec.num_layers} layers ({spec.model_type}, {spec.num_heads} query heads, "
        f"{spec.num_kv_heads} KV heads, head_dim {spec.head_dim})"
    ]
    lines += [
        f"  expert {index}: {reader.folder}{' (the seed)' if index == 0 else ''}"
        for index, reader in enumerate(readers)
    ]
    attention_line = {
        "expert-kv": (
            f"soft mixture, {experts * spec.num_heads} query heads over {experts * spec.num_kv_heads} KV heads "
            "(each expert its own Q, K, V, O)"
        ),
        "shared-kv": (
            f"soft mixture, {experts * spec.num_heads} query heads over {spec.num_kv_heads} shared KV heads "
            "(the experts' mean K, V)"
        ),
        "average": "averaged (BTX)",
    }[mode]
    lines += [
        f"FFN: {experts} experts, top-{top_k}; attention: {attention_line}; routers: {options.router_init} init"
        + ("; parallel attention+FFN block" if options.parallel_block else ""),
        f"attention parameters per layer: {attention['before']:,} -> {attention['after']:,}; "
        f"KV cache per token per layer: {kv['before']:,} -> {kv['after']:,} bytes",
        "output: "
        + (
            "plain Mixtral checkpoint (loads in transformers with no custom code)"
            if native
            else f"upcycle checkpoint ({why})"
        ),
    ]
    return lines


def card_variant(report: dict) -> str | None:
    """BAM with averaged attention is BTX: its own card."""
    return "btx" if (report.get("options") or {}).get("attention") == "average" else None


def card_table(report: dict, config: dict) -> list[str]:
    """The card's plan: attention and FFN experts per layer (BTX as plain Mixtral: from its config)."""
    from ..modeling.plan import parse_layers
    from ..tables import layer_ranges, markdown_table

    router = (report.get("options") or {}).get("router_init", "?")
    count = config.get("num_hidden_layers") or 0
    if card_variant(report) == "btx" and config.get("num_local_experts"):
        return markdown_table(
            ("layers", "attention", *MoEFFN.COLUMNS, "router init"),
            [
                (
                    f"0-{count - 1}",
                    "averaged",
                    config["num_local_experts"],
                    f"top-{config.get('num_experts_per_tok', '?')}",
                    router,
                )
            ],
        )
    layers = parse_layers((report.get("plan") or config.get("upcycle") or {}).get("layers") or [])
    rows = [
        (index, *layer.get(AttentionExperts).cells(), *layer.get(MoEFFN).cells(), router)
        for index, layer in enumerate(layers)
        if layer.get(AttentionExperts) and layer.get(MoEFFN)
    ]
    if not rows:
        return []
    return markdown_table(("layers", *AttentionExperts.COLUMNS, *MoEFFN.COLUMNS, "router init"), layer_ranges(rows))


BAM_CITATION = """@article{zhang2024bam,
  title = {{BAM}! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts},
  author = {Zhang, Qizhen and Gritsch, Nikolas and Gnaneshwar, Dwaraknath and Guo, Simon and Cairuz, David and
    Venkitesh, Bharat and Foerster, Jakob and Blunsom, Phil and Ruder, Sebastian and {\\"U}st{\\"u}n, Ahmet and
    Locatelli, Acyr},
  journal = {arXiv preprint arXiv:2408.08274},
  year = {2024}
}"""
BTX_CITATION = """@article{sukhbaatar2024btx,
  title = {Branch-Train-MiX: Mixing Expert {LLMs} into a Mixture-of-Experts {LLM}},
  author = {Sukhbaatar, Sainbayar and Golovneva, Olga and Sharma, Vasu and Xu, Hu and Lin, Xi Victoria and
    Rozi{\\`e}re, Baptiste and Kahn, Jacob and Li, Daniel and Yih, Wen-tau and Weston, Jason and Li, Xian},
  journal = {arXiv preprint arXiv:2403.07816},
  year = {2024}
}"""

SPEC = MethodSpec(
    name="bam",
    summary="Branch-Attend-Mix: dense models branched from one seed mixed into an MoE (FFN and attention experts).",
    panel="BAM / BTX",
    options=BAMOptions,
    convert=convert,
    example="upcycle convert SEED OUT --method bam --expert ./code-branch --expert ./law-branch --attention expert-kv",
    tunes=False,
    card=MethodCard(
        "Branch-Attend-Mix (BAM)",
        "BAM turns dense models branched from one seed and trained on different data into a mixture of experts that "
        "reuses both their feed-forward layers (routed FFN experts) and their attention (a soft mixture of attention "
        "experts), instead of averaging the attention as BTX does (Zhang et al. 2024).",
        (BAM_CITATION, BTX_CITATION),
    ),
    card_table=card_table,
    variants={
        "btx": MethodCard(
            "Branch-Train-MiX (BTX)",
            "BTX mixes dense models branched from one seed and trained on different data: their feed-forward layers "
            "become the experts of a routed MoE and everything else is averaged (Sukhbaatar et al. 2024). It is the "
            "baseline of BAM.",
            (BTX_CITATION,),
        )
    },
    variant=card_variant,
)
