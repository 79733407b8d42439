"""Model cards (README.md with Hub front matter) for upcycle outputs.

One generator, :func:`render_card`, reads only the folder's own records: ``config.json``,
``upcycle_report.json`` (the conversion, and the fine-tuning when there was one) and
``eval.json`` (what ``upcycle eval --json`` wrote: rows and a recovery block). ``convert`` and ``finetune`` call
:func:`write_card` once their report is written, and ``upcycle card PATH`` calls it again, so a
refreshed card says exactly what a fresh one would, plus any evaluation added since.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from upcycle.errors import UpcycleError

CARD_FILE = "README.md"
REPORT_FILE = "upcycle_report.json"
EVAL_FILE = "eval.json"
UPCYCLE_URL = "https://pypi.org/project/upcycle/"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass(frozen=True)
class MethodCard:
    """What a method is called in a card, why one would use it, and what to cite."""

    title: str
    why: str
    citations: tuple[str, ...]


_MOH = """@article{jin2024moh,
  title = {{MoH}: Multi-Head Attention as Mixture-of-Head Attention},
  author = {Jin, Peng and Zhu, Bo and Yuan, Li and Yan, Shuicheng},
  journal = {arXiv preprint arXiv:2410.11842},
  year = {2024}
}"""
_SIXTEEN_HEADS = """@inproceedings{michel2019sixteen,
  title = {Are Sixteen Heads Really Better than One?},
  author = {Michel, Paul and Levy, Omer and Neubig, Graham},
  booktitle = {Advances in Neural Information Processing Systems},
  year = {2019},
  eprint = {1905.10650},
  archivePrefix = {arXiv}
}"""
_GQA = """@inproceedings{ainslie2023gqa,
  title = {{GQA}: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints},
  author = {Ainslie, Joshua and Lee-Thorp, James and de Jong, Michiel and Zemlyanskiy, Yury and Lebr{\\'o}n, Federico and Sanghai, Sumit},
  booktitle = {Proceedings of the 2023 Conference on Empirical Methods in Natural Language Processing},
  year = {2023},
  eprint = {2305.13245},
  archivePrefix = {arXiv}
}"""
_MQA = """@article{shazeer2019mqa,
  title = {Fast Transformer Decoding: One Write-Head is All You Need},
  author = {Shazeer, Noam},
  journal = {arXiv preprint arXiv:1911.02150},
  year = {2019}
}"""
_MHE = """@inproceedings{xue2023pit,
  title = {Pit One Against Many: Leveraging Attention-head Embeddings for Parameter-efficient Multi-head Attention},
  author = {Xue, Huiyin and Aletras, Nikolaos},
  booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2023},
  year = {2023},
  eprint = {2310.07911},
  archivePrefix = {arXiv}
}"""
_BAM = """@article{zhang2024bam,
  title = {{BAM}! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts},
  author = {Zhang, Qizhen and Gritsch, Nikolas and Gnaneshwar, Dwaraknath and Guo, Simon and Cairuz, David and Venkitesh, Bharat and Foerster, Jakob and Blunsom, Phil and Ruder, Sebastian and {\\"U}st{\\"u}n, Ahmet and Locatelli, Acyr},
  journal = {arXiv preprint arXiv:2408.08274},
  year = {2024}
}"""
_BTX = """@article{sukhbaatar2024btx,
  title = {Branch-Train-MiX: Mixing Expert {LLMs} into a Mixture-of-Experts {LLM}},
  author = {Sukhbaatar, Sainbayar and Golovneva, Olga and Sharma, Vasu and Xu, Hu and Lin, Xi Victoria and Rozi{\\`e}re, Baptiste and Kahn, Jacob and Li, Daniel and Yih, Wen-tau and Weston, Jason and Li, Xian},
  journal = {arXiv preprint arXiv:2403.07816},
  year = {2024}
}"""
_CLIP_MOE = """@article{zhang2024clipmoe,
  title = {{CLIP-MoE}: Towards Building Mixture of Experts for {CLIP} with Diversified Multiplet Upcycling},
  author = {Zhang, Jihai and Qu, Xiaoye and Zhu, Tong and Cheng, Yu},
  journal = {arXiv preprint arXiv:2409.19291},
  year = {2024}
}"""

METHOD_CARDS: dict[str, MethodCard] = {
    "moh": MethodCard(
        "Mixture-of-Head attention (MoH)",
        "Heads are treated as experts: shared heads are always on and each token adds only the routed heads its router "
        "selects, so a head-sparse attention computes fewer heads per token. The MoH paper reports that LLaMA3-8B, "
        "continue-tuned with 75% of its heads active, stays close to the dense model (64.0 against 64.7 on average over 14 benchmarks).",
        (_MOH,)),
    "prune-heads": MethodCard(
        "attention-head pruning",
        "Many attention heads can be removed with little loss (Michel et al. 2019): removing the least important ones, "
        "ranked by the gradient of a gate on each head, gives a smaller model with a smaller KV cache.",
        (_SIXTEEN_HEADS,)),
    "gqa": MethodCard(
        "multi-head to grouped-query attention (GQA/MQA)",
        "Fewer key/value heads shrink the KV cache and the memory traffic of decoding. Each new key/value head is the mean "
        "of the heads it replaces, and a short uptraining recovers most of the quality (Ainslie et al. 2023).",
        (_GQA, _MQA)),
    "mhe": MethodCard(
        "multi-head embedding attention (MHE)",
        "MHE keeps one shared query, key and value projection per layer and tells the heads apart with one small embedding each, "
        "which removes most of the attention projection parameters (Xue and Aletras 2023). The conversion from a dense model is "
        "upcycle's own fit; expect to heal the model with continued training.",
        (_MHE,)),
    "bam": MethodCard(
        "Branch-Attend-Mix (BAM)",
        "BAM turns dense models branched from one seed and trained on different data into a mixture of experts that reuses both "
        "their feed-forward layers (routed FFN experts) and their attention (a soft mixture of attention experts), instead of "
        "averaging the attention as BTX does (Zhang et al. 2024).",
        (_BAM, _BTX)),
    "btx": MethodCard(
        "Branch-Train-MiX (BTX)",
        "BTX mixes dense models branched from one seed and trained on different data: their feed-forward layers become the "
        "experts of a routed MoE and everything else is averaged (Sukhbaatar et al. 2024). It is the baseline of BAM.",
        (_BTX,)),
    "clip-moe": MethodCard(
        "CLIP-MoE (Diversified Multiplet Upcycling)",
        "CLIP models fine-tuned to capture complementary information (multistage contrastive learning) become the feed-forward "
        "experts of a sparse mixture: a drop-in CLIP with more capacity for little extra compute (Zhang et al. 2024).",
        (_CLIP_MOE,)),
}


# ---- what convert records for the card ----------------------------------------------------

def card_metadata(folder: Path) -> dict:
    """The front matter of ``folder/README.md`` (a source checkpoint's card), or {} when absent or unreadable."""
    path = Path(folder) / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def source_license(folder: Path) -> dict[str, str]:
    """The license a source checkpoint's card states (``license``, and ``license_name``/``license_link`` for "other")."""
    metadata = card_metadata(folder)
    return {key: str(metadata[key]) for key in LICENSE_KEYS if isinstance(metadata.get(key), (str, int, float))}


def hub_model_id(reference: str, folder: Path, config: dict | None = None) -> str | None:
    """The Hub id a source came from, when one is known: the reference itself, a Hugging Face cache
    snapshot folder (``models--owner--name/snapshots/...``), the config's ``_name_or_path``, or the one
    ``base_model`` the folder's own card names; else None (a local folder: the Hub refuses ``base_model``
    values that are not model ids)."""
    if HUB_ID.match(reference) and not Path(reference).expanduser().exists() and not reference.startswith((".", "~")):
        return reference
    match = HF_CACHE_SNAPSHOT.search(Path(folder).resolve().as_posix())
    if match:
        return f"{match['owner']}/{match['name']}"
    candidate = str((config or {}).get("_name_or_path") or "")
    if HUB_ID.match(candidate) and not Path(candidate).exists() and not candidate.startswith((".", "/", "~")):
        return candidate
    ancestor = card_metadata(folder).get("base_model")  # a local derivative (e.g. a dequantised GGUF) names its Hub model
    if isinstance(ancestor, str) and HUB_ID.match(ancestor):
        return ancestor
    return None


# ---- reading the folder's records -----------------------------------------------------------

def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UpcycleError(f"{path.parent} has no {path.name}; {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UpcycleError(f"{path} is not valid JSON ({' '.join(str(error).split())}); fix or delete it") from None


def _user_evaluations(folder: Path) -> tuple[list[dict], list[dict]]:
    """(rows, recovery blocks) of ``eval.json``: what ``upcycle eval --json`` writes (``{"results": [...], "recovery": ...}``)
    or the plain list of rows that earlier versions wrote."""
    path = folder / EVAL_FILE
    if not path.exists():
        return [], []
    records = _evaluation_records(_read_json(path, ""))
    if not (records and all(isinstance(r, dict) and "perplexity" in r and "tokens" in r for r in records[0])
            and all(isinstance(b, dict) and isinstance(b.get("corpora"), dict) for b in records[1])):
        raise UpcycleError(f"{path} is not the output of `upcycle eval --json` (results with perplexity and tokens); "
                           "move it away or write it again with upcycle eval")
    return records


def _evaluation_records(value) -> tuple[list, list] | None:
    """(rows, recovery blocks) of an evaluation record: a list of rows, or an object with ``results`` and ``recovery``
    (None when it is neither)."""
    if isinstance(value, list):
        return value, []
    if isinstance(value, dict) and isinstance(value.get("results"), list):
        blocks = value.get("recovery")
        return value["results"], [] if blocks is None else list(blocks) if isinstance(blocks, list) else [blocks]
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, so a reader never sees half of it."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_card(folder: Path, *, name: str | None = None, base_models: list[str] | None = None) -> Path:
    """(Re)write ``folder/README.md`` from the folder's records. ``name``: the model's name in the card (a Hub
    repo id when publishing); ``base_models``: the Hub ids of the base model(s), for a source that was a local
    folder; both are remembered in the report for later refreshes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UpcycleError(f"{folder} is not a folder; pass the folder of an upcycle output")
    for base in base_models or []:
        if not HUB_ID.match(base):
            raise UpcycleError(f"--base-model {base!r} is not a Hub model id; use owner/name, as in HuggingFaceTB/SmolLM2-135M")
    if name is not None or base_models:
        report = _read_json(folder / REPORT_FILE, "it is not an upcycle output (convert or finetune write one)")
        if not isinstance(report, dict):
            raise UpcycleError(f"{folder / REPORT_FILE} must hold a JSON object; fix or re-create it")
        changes = ({"name": name} if name is not None else {}) | ({"base_models": list(dict.fromkeys(base_models))} if base_models else {})
        if any(report.get(key) != value for key, value in changes.items()):
            write_text_atomic(folder / REPORT_FILE, json.dumps(report | changes, indent=2) + "\n")
    text = render_card(folder)
    path = folder / CARD_FILE
    write_text_atomic(path, text)
    return path


# ---- rendering ----------------------------------------------------------------------------

def method_key(report: dict) -> str:
    """The card's method: ``btx`` for a BAM conversion with averaged attention, else the report's method."""
    method = str(report.get("method", "dense"))
    if method == "bam" and (report.get("options") or {}).get("attention") == "average":
        return "btx"
    return method


def _front_matter(fields: dict) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def _loading(config: dict, report: dict) -> tuple[str, str]:
    """(Auto class, pipeline tag) of the folder: from the report, else from the config's architecture."""
    if report.get("auto_class") and report.get("pipeline_tag"):
        return report["auto_class"], report["pipeline_tag"]
    auto_map = config.get("auto_map") or {}
    architecture = (config.get("architectures") or [""])[0]
    if "AutoModelForCausalLM" in auto_map or architecture.endswith("ForCausalLM"):
        return "AutoModelForCausalLM", "text-generation"
    if "AutoModelForMaskedLM" in auto_map or architecture.endswith("ForMaskedLM"):
        return "AutoModelForMaskedLM", "fill-mask"
    if "CLIP" in architecture:
        return "AutoModel", "zero-shot-image-classification"
    return "AutoModel", "feature-extraction"


def _local_names(report: dict) -> dict[str, str]:
    """Local paths the report mentions -> their folder or file name (a card does not publish local paths)."""
    paths = [report.get("source"), *(report.get("experts") or []), *((report.get("options") or {}).get("experts") or []),
             (report.get("options") or {}).get("calibration")]
    return {str(p): _local_name(str(p)) for p in paths if p and (str(p).startswith(("/", ".", "~")) or Path(str(p)).exists())}


def _local_name(path: str) -> str:
    """How a card names a local folder: its Hub id for a Hugging Face cache snapshot, else its name."""
    match = HF_CACHE_SNAPSHOT.search(Path(path).expanduser().resolve().as_posix())
    return f"{match['owner']}/{match['name']}" if match else Path(path).name


def _display(value: object, names: dict[str, str]) -> str:
    text = str(value)
    for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
        text = text.replace(path, name)
    return text


def _unpublished_bases(report: dict, method: str, names: dict[str, str]) -> list[str]:
    """``base_model`` when no Hub id is known (local folders): their names, which say what the model came from
    but which the Hub refuses; ``upcycle push`` asks for the ids (``upcycle card PATH --base-model OWNER/NAME``)."""
    bases = [report.get("base_model")]
    if method in ("bam", "btx", "clip-moe"):
        bases += report.get("experts") or []
    return list(dict.fromkeys(_display(b, names) for b in bases if b))


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _layer_ranges(rows: list[tuple]) -> list[tuple]:
    """Merge consecutive layers with the same row into one ``first-last`` row (rows: (layer, *cells))."""
    merged: list[list] = []
    for layer, *cells in rows:
        if merged and merged[-1][2] == cells and merged[-1][1] == layer - 1:
            merged[-1][1] = layer
        else:
            merged.append([layer, layer, cells])
    return [(str(a) if a == b else f"{a}-{b}", *cells) for a, b, cells in merged]


def _heads(indices: list[int]) -> str:
    return " ".join(str(i) for i in indices)


def plan_table(method: str, report: dict, config: dict) -> list[str]:
    """The plan as a compact markdown table (layers with the same plan merged), or [] for an unknown layout."""
    plan = report.get("plan") or config.get("upcycle") or {}
    layers = plan.get("layers") or []
    count = config.get("num_hidden_layers") or len(layers)
    if method == "moh" and layers:
        rows = [(i, _heads(g["shared_heads"]), _heads(g["routed_heads"]), f"{len(g['shared_heads'])} + top-{g['top_k']} of {len(g['routed_heads'])}", g["router"])
                for i, g in ((i, layer["head_gate"]) for i, layer in enumerate(layers))]
        return _table(("layers", "shared heads (always on)", "routed heads", "active heads per token", "router"), _layer_ranges(rows))
    if method == "prune-heads" and report.get("kept"):
        units = report.get("units") or {}
        total = (units.get("per_layer") or 0) * (units.get("heads_per_unit") or 0) or "?"
        rows = [(i, f"{len(k['kept_heads'])} of {total}", _heads(k["kept_heads"]), _heads(k.get("kept_kv_heads") or []) or "-")
                for i, k in enumerate(report["kept"])]
        return _table(("layers", "query heads kept", "kept heads", "kept KV heads"), _layer_ranges(rows))
    if method == "gqa" and report.get("kv_heads"):
        kv = report["kv_heads"]
        return _table(("layers", "query heads", "KV heads", "query heads per KV head"),
                      [(f"0-{count - 1}", kv["query_heads"], f"{kv['before']} -> {kv['after']}", f"{kv['query_heads'] // kv['before']} -> {kv['query_heads'] // kv['after']}")])
    if method == "mhe" and layers:
        errors = {e["layer"]: e for e in (report.get("reconstruction_error") or {}).get("layers", [])}
        measured = (report.get("reconstruction_error") or {}).get("measured_on", "weights")

        def error(i: int) -> str:
            e = errors.get(i)
            return " / ".join(f"{e[p]:.3f}" for p in ("q_proj", "k_proj", "v_proj")) if e else "-"

        rows = [(i, layer["mhe"]["variant"], *(layer["mhe"]["heads"][p] for p in ("q_proj", "k_proj", "v_proj")), error(i))
                for i, layer in enumerate(layers)]
        return _table(("layers", "variant", "Q heads", "K heads", "V heads", f"relative error Q / K / V (on {measured})"), _layer_ranges(rows))
    if method == "bam" and layers:
        router = (report.get("options") or {}).get("router_init", "?")
        rows = [(i, layer["attention_experts"]["experts"], f"{layer['attention_experts']['kv']} K/V", layer["moe_ffn"]["experts"],
                 f"top-{layer['moe_ffn']['top_k']}", router) for i, layer in enumerate(layers)]
        return _table(("layers", "attention experts (soft)", "keys and values", "FFN experts", "FFN routing", "router init"), _layer_ranges(rows))
    if method == "btx" and config.get("num_local_experts"):
        router = (report.get("options") or {}).get("router_init", "?")
        return _table(("layers", "attention", "FFN experts", "FFN routing", "router init"),
                      [(f"0-{count - 1}", "averaged", config["num_local_experts"], f"top-{config.get('num_experts_per_tok', '?')}", router)])
    if method == "clip-moe" and plan.get("towers"):
        rows = []
        for tower, tower_layers in plan["towers"].items():
            for merged in _layer_ranges([(i, (layer.get("moe_ffn") or {}).get("experts", "dense FFN"),
                                          f"top-{layer['moe_ffn']['top_k']}" if layer.get("moe_ffn") else "-")
                                         for i, layer in enumerate(tower_layers)]):
                rows.append((tower, *merged))
        return _table(("tower", "layers", "FFN experts", "routing"), rows)
    return []


def _parameters_lines(parameters: dict) -> list[str]:
    before, after = parameters.get("before"), parameters.get("after")
    if not before or after is None:
        return []
    change = after - before
    return _table(("", "parameters"), [("before", f"{before:,}"), ("after", f"{after:,} ({change:+,}, {change / before:+.1%})")]) + [""]


def _options_rows(options: dict, names: dict[str, str]) -> list[tuple]:
    rows = []
    for key, value in options.items():
        if value is None or key == "experts":
            continue
        rows.append((f"`{key}`", f"`{_display(value, names)}`"))
    return rows


def _conversion_lines(report: dict, method: str, names: dict[str, str]) -> list[str]:
    options = report.get("options") or {}
    lines = ["## Recipe and data", ""]
    if method in ("bam", "btx", "clip-moe") and report.get("experts"):
        lines += ["Experts (expert 0 is the seed / base model):", ""]
        lines += [f"{i}. `{_display(path, names)}`" for i, path in enumerate(report["experts"])] + [""]
    if options:
        lines += [f"Conversion options (`upcycle convert --method {report.get('method')}`):", ""]
        lines += _table(("option", "value"), _options_rows(options, names)) + [""]
    calibration = options.get("calibration")
    if calibration:
        tokens = options.get("calibration_tokens")
        lines += [f"Calibration data: `{_display(calibration, names)}`" + (f", {tokens:,} tokens." if tokens else "."), ""]
    elif method not in ("bam", "btx", "clip-moe", "dense"):
        lines += ["Calibration data: none; the conversion used the weights only.", ""]
    return lines if len(lines) > 2 else []


def _finetune_lines(finetune: dict) -> list[str]:
    recipe = finetune.get("recipe") or {}
    data = recipe.get("data") or {}
    if finetune.get("type", "causal-lm") == "causal-lm":
        first = (f"Tuned with `upcycle finetune` for {finetune['steps']} steps, {finetune['tokens']:,} tokens "
                 f"({finetune['trainable']} parameters trainable, {finetune['seconds']:.0f} s on {finetune['device']}"
                 + (f", {finetune['processes']} processes" if (finetune.get("processes") or 1) > 1 else "") + ").")
    else:
        stage = f", stage {finetune['stage']} of {finetune['stages']}: feed-forward layers only, on cluster-pure batches" if finetune.get("stage") else ""
        first = (f"Tuned with `upcycle finetune` (a `{finetune['type']}` recipe{stage}) on {finetune.get('pairs', 0):,} image-text pairs"
                 + (f", {finetune['trainable_parameters']:,} parameters trainable" if finetune.get("trainable_parameters") else "") + ".")
    lines = ["## Fine-tuning", "", first, ""]
    if data.get("train"):
        def names(sources) -> str:  # one source or a list of them, by file or asset name
            return ", ".join(f"`{Path(str(source)).name.removeprefix('asset:')}`" for source in (sources if isinstance(sources, list) else [sources]))

        held_out = names(data["validation"]) if data.get("validation") else (
            f"{data['validation_fraction']:.0%} of the training documents" if data.get("validation_fraction") else "none")
        lines += [f"Training data: {names(data['train'])}" + (f", sequences of {data['seq_len']} tokens" if data.get("seq_len") else "")
                  + f"; held out: {held_out}.", ""]
    losses = recipe.get("losses") or {}
    if recipe.get("teacher") and (losses.get("distill") or losses.get("distill_hidden")):
        terms = [f"{losses.get('lm', 1.0):g} x LM loss" if losses.get("lm", 1.0) else None,
                 f"{losses['distill']:g} x KL to the teacher (T = {losses.get('distill_temperature', 1.0):g})" if losses.get("distill") else None,
                 f"{losses['distill_hidden']:g} x per-layer {losses.get('distill_hidden_on', 'hidden_states').replace('_', ' ')} matched to the teacher's"
                 if losses.get("distill_hidden") else None]
        teacher = "the model it was converted from" if recipe["teacher"] == "source" else f"`{_local_name(str(recipe['teacher']))}`"
        lines += [f"Distilled from {teacher}: the objective is {' + '.join(t for t in terms if t)}.", ""]
    if recipe:
        lines += ["Recipe:", "", "```yaml", yaml.safe_dump(_without_paths(recipe), sort_keys=False).rstrip(), "```", ""]
    return lines


def _without_paths(value):
    """``value`` (a recipe) with every local path replaced by its file or folder name (a card does not publish them)."""
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_paths(item) for item in value]
    if isinstance(value, str) and (value.startswith(("/", "./", "../", "~")) or (os.sep in value and Path(value).exists())):
        return _local_name(value)
    return value


def _data_name(data: str | None) -> str:
    """A data file by its name (a card does not publish local paths); a description as it is."""
    if not data:
        return "-"
    return f"`{Path(data).name}`" if " " not in data else data


def _number(value: float | None) -> str:
    """A figure to three decimals; "-" where it could not be computed (null in the JSON)."""
    return "-" if value is None else f"{value:.3f}"


def _recovery_lines(block: dict) -> list[str]:
    """A recovery block (``upcycle eval --compare``) as a table: per corpus the perplexity, the reference's, their ratio."""
    corpora = block["corpora"]
    model = f" of `{_local_name(str(block['model']))}`" if block.get("model") else ""
    rows = [(_data_name(name), _number(c.get("perplexity")), _number(c.get("reference_perplexity")), _number(c.get("ratio")))
            for name, c in corpora.items()]
    if len(corpora) > 1:
        rows.append(("geometric mean", "", "", _number(block.get("mean_ratio"))))
    return [f"Recovery{model} against `{_local_name(str(block.get('reference', '?')))}` on held-out text: ratio = perplexity / the "
            "reference's perplexity (1.00 is full recovery, above 1 is worse).", "",
            *_table(("corpus", "perplexity", "reference perplexity", "ratio"), rows), ""]


def _row_name(row: dict) -> str:
    """A result row by its ``name``, else by the model folder's name."""
    return str(row.get("name") or _local_name(str(row.get("model", "?"))))


def _evaluation_lines(rows: list[dict], blocks: list[dict], pipeline_tag: str) -> list[str]:
    lines = ["## Evaluation", ""]
    for block in blocks:
        lines += _recovery_lines(block)
    perplexity = [r for r in rows if "perplexity" in r]
    retrieval = [r for r in rows if "image_to_text_r1" in r]
    if perplexity:
        lines += _table(("model", "perplexity", "tokens", "window", "active heads", "data"),
                        [(_row_name(r), _number(r["perplexity"]), f"{r['tokens']:,}", r.get("window", "-"), f"{r.get('active_fraction', 1.0):.3f}",
                          _data_name(r.get("data"))) for r in perplexity]) + [""]
    if retrieval:
        lines += _table(("model", "image-to-text recall@1", "text-to-image recall@1"),
                        [(_row_name(r), f"{r['image_to_text_r1']:.3f}", f"{r['text_to_image_r1']:.3f}") for r in retrieval]) + [""]
    if not perplexity and not retrieval and not blocks:
        if pipeline_tag in ("text-generation", "fill-mask"):
            lines += ["No evaluation recorded yet. Measure perplexity with `upcycle eval PATH --data heldout.txt --compare source --json PATH/eval.json`, "
                      "then refresh this card with `upcycle card PATH`.", ""]
        else:
            lines += ["No evaluation recorded yet (a `clip` recipe of `upcycle finetune` records retrieval recall on its held-out pairs).", ""]
    return lines


def _load_snippet(auto_class: str, name: str, custom_code: bool) -> str:
    if not custom_code:
        return f"from transformers import {auto_class}\nmodel = {auto_class}.from_pretrained(\"{name}\")"
    return (f"from transformers import {auto_class}\n"
            f"model = {auto_class}.from_pretrained(\"{name}\", trust_remote_code=True)\n"
            "# or, with upcycle installed and no remote code:\n"
            "import upcycle\n"
            f"model = {auto_class}.from_pretrained(\"{name}\")")


def render_card(folder: Path) -> str:
    """The model card of ``folder`` from its config.json, upcycle_report.json and eval.json."""
    folder = Path(folder)
    config = _read_json(folder / "config.json", "it is not a model folder")
    report = _read_json(folder / REPORT_FILE, "it is not an upcycle output (convert and finetune write one)")
    if not isinstance(config, dict) or not isinstance(report, dict):
        raise UpcycleError(f"{folder}: config.json and {REPORT_FILE} must hold JSON objects; fix or re-create them")
    name = report.get("name") or folder.name
    method = method_key(report)
    info = METHOD_CARDS.get(method)
    names = _local_names(report)
    finetune = report.get("finetune")
    auto_class, pipeline_tag = _loading(config, report)
    custom_code = "auto_map" in config
    base = _display(report.get("base_model") or "a dense model", names)

    fields: dict = {}
    base_models = list(dict.fromkeys(report.get("base_models") or [])) or _unpublished_bases(report, method, names)
    if base_models:
        fields["base_model"] = base_models[0] if len(base_models) == 1 and method not in ("bam", "btx", "clip-moe") else base_models
    fields["library_name"] = "transformers"
    fields |= {key: value for key, value in (report.get("base_license") or {}).items() if key in LICENSE_KEYS}
    fields["pipeline_tag"] = pipeline_tag
    fields["tags"] = list(dict.fromkeys(["upcycle", *([method] if method != "dense" else []), *report.get("tags", []), *(["finetuned"] if finetune else [])]))

    converted = method != "dense"
    intro = (f"`{base}` converted by [upcycle]({UPCYCLE_URL}) with {info.title if info else f'the `{method}` method'}"
             if converted else f"`{base}` continue-tuned by [upcycle]({UPCYCLE_URL})")
    body = [f"# {name}", "", f"{intro}" + (", then fine-tuned with `upcycle finetune`." if finetune and converted else "."), ""]
    body += ["## What was changed and why", "", _display(report.get("description") or "A dense model continue-tuned with upcycle.", names), ""]
    if info:
        body += [info.why, ""]
    if converted and not finetune:
        body += ["It has not been fine-tuned since the conversion: expect it to need a short continue-tuning to recover quality.", ""]

    table = plan_table(method, report, config)
    plan_lines = [_display(line, names) for line in report.get("plan_lines") or []]
    if table or plan_lines:
        body += ["## Plan", ""] + (table + [""] if table else [])
        if plan_lines and table:  # the table says it compactly; the full printout stays one click away
            body += ["<details><summary>The plan as <code>upcycle convert</code> printed it</summary>", "", "```", *plan_lines, "```", "",
                     "</details>", ""]
        elif plan_lines:
            body += ["As printed by `upcycle convert`:", "", "```", *plan_lines, "```", ""]
    if report.get("parameters"):
        body += ["## Parameters", ""] + _parameters_lines(report["parameters"])
    body += _conversion_lines(report, method, names)
    if finetune:
        body += _finetune_lines(finetune)
    recorded_rows, recorded_blocks = _evaluation_records(report.get("evaluation") or []) or ([], [])
    user_rows, user_blocks = _user_evaluations(folder)
    body += _evaluation_lines([*recorded_rows, *user_rows], [*recorded_blocks, *user_blocks], pipeline_tag)
    if report.get("checks"):
        body += ["## Checks run at conversion", ""]
        body += [f"- {'passed' if c['passed'] else 'FAILED'}: {c['name']} ({_display(c['detail'], names)})" for c in report["checks"]] + [""]
    body += ["## How to load", "", "```python", _load_snippet(auto_class, name, custom_code), "```", ""]
    if info:
        body += ["## Citation", "", f"{info.title}:", "", "```bibtex", "\n\n".join(info.citations), "```", ""]
    body += [f"The full {'conversion ' if converted else ''}record is in `{REPORT_FILE}`.", ""]
    return _front_matter(fields) + "\n".join(body)
