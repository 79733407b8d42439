"""A card's text: front matter, the method's paragraph and plan table, the recipe, data and evaluations, the loading
snippet; read from the folder's records only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from upcycle.card.model_index import HARNESS_URL, metric_name, model_index
from upcycle.card.records import EVAL_FILE, REPORT_FILE, evaluation_records, is_stderr, read_json, user_evaluations
from upcycle.checkpoint.source import LICENSE_KEYS
from upcycle.checkpoint.source import local_name as _local_name
from upcycle.errors import UpcycleError
from upcycle.methods import MethodCard, all_specs, method_names, method_spec
from upcycle.methods.spec import option_roles
from upcycle.modeling.plan import plan_layers, plan_rows
from upcycle.tables import figure_text, finite_number, layer_ranges, markdown_table, score_text

UPCYCLE_URL = "https://pypi.org/project/upcycle/"


def method_card(report: dict) -> tuple[str, MethodCard | None]:
    """(the card's method key, its card): the method's variant for this report (``MethodSpec.variants``), the method,
    or ``dense`` (no card) for a tuned dense model; an unknown method keeps its name and has no card."""
    method = str(report.get("method", "dense"))
    if method == "dense" or method not in method_names():
        return method, None
    return method_spec(method).card_for(report)


def merges_experts(method: str) -> bool:
    """Whether ``method`` (a card key) mixes expert checkpoints, whose names are base models too."""
    return any(spec.merges_experts and (method == spec.name or method in spec.variants) for spec in all_specs())


def _front_matter(fields: dict) -> str:
    """The YAML front matter: a line per scalar, an item per line for a list of scalars, nested values (the
    ``model-index``) in YAML's block style."""
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(i, (dict, list)) for i in value)):
            lines.append(yaml.safe_dump({key: value}, sort_keys=False, width=1000).rstrip())
        elif isinstance(value, list):
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


def _option_roles(report: dict) -> dict[str, str]:
    """Option name -> role (``option(role=...)``) of the report's method ({} for a method this upcycle lacks)."""
    method = report.get("method")
    return option_roles(method_spec(method).options) if method in method_names() else {}


def _role_options(report: dict, role: str) -> list[str]:
    """The report's recorded values of its method's options of ``role``, as one list."""
    options = report.get("options") or {}
    return [v for name, r in _option_roles(report).items() if r == role for v in _as_list(options.get(name))]


def _local_names(report: dict) -> dict[str, str]:
    """Local paths the report mentions -> their folder or file name (a card does not publish local paths)."""
    options = report.get("options") or {}
    paths = [
        report.get("source"),
        *(report.get("experts") or []),
        *(value for name in _option_roles(report) for value in _as_list(options.get(name))),
    ]
    return {
        str(p): _local_name(str(p))
        for p in paths
        if p and (str(p).startswith(("/", ".", "~")) or Path(str(p)).exists())
    }


def _as_list(value: object) -> list:
    """A report's calibration: a list of texts (an older report's single path, or nothing, as a list)."""
    if not value:
        return []
    return [str(item) for item in value] if isinstance(value, list) else [str(value)]


def _hide_local_paths(value: object, names: dict[str, str]) -> str:
    """``value`` as text, each local path in ``names`` replaced by its folder or file name."""
    text = str(value)
    for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
        text = text.replace(path, name)
    return text


def _unpublished_bases(report: dict, method: str, names: dict[str, str]) -> list[str]:
    """``base_model`` when no Hub id is known (local folders): their names, which say what the model came from
    but which the Hub refuses; ``upcycle push`` asks for the ids (``upcycle card PATH --base-model OWNER/NAME``)."""
    bases = [report.get("base_model")]
    if merges_experts(method):
        bases += report.get("experts") or []
    return list(dict.fromkeys(_hide_local_paths(b, names) for b in bases if b))


def card_plan_table(method: str, report: dict, config: dict) -> list[str]:
    """The plan as a compact markdown table (layers with the same plan merged), or [] when there is none: the
    method's own table where its spec has one, else the typed plan's columns (``modeling.plan``), per tower for
    CLIP."""
    spec = method_spec(report["method"]) if report.get("method") in method_names() else None
    if spec is not None and spec.card_table is not None:
        return spec.card_table(report, config)
    plan = report.get("plan") or config.get("upcycle") or {}
    if not plan:
        return []
    stacks = plan_layers(plan)
    if "layers" in stacks:
        header, rows = plan_rows(stacks["layers"])
        return markdown_table(("layers", *header), layer_ranges(rows)) if header else []
    table_rows, header = [], ()
    for tower, layers in stacks.items():
        header, rows = plan_rows(layers)
        table_rows += [(tower, *row) for row in layer_ranges(rows)]
    return markdown_table(("tower", "layers", *header), table_rows) if header else []


def _parameters_lines(parameters: dict) -> list[str]:
    before, after = parameters.get("before"), parameters.get("after")
    if not before or after is None:
        return []
    change = after - before
    return markdown_table(
        ("", "parameters"), [("before", f"{before:,}"), ("after", f"{after:,} ({change:+,}, {change / before:+.1%})")]
    ) + [""]


def _options_rows(options: dict, names: dict[str, str], listed: set[str]) -> list[tuple]:
    """(option, value) rows of the recorded options, but for ``listed`` (shown in a list of their own)."""
    rows = []
    for key, value in options.items():
        if value is None or key in listed:
            continue
        rows.append((f"`{key}`", f"`{_hide_local_paths(value, names)}`"))
    return rows


def _conversion_lines(report: dict, method: str, names: dict[str, str]) -> list[str]:
    options = report.get("options") or {}
    lines = ["## Recipe and data", ""]
    if merges_experts(method) and report.get("experts"):
        lines += ["Experts (expert 0 is the seed / base model):", ""]
        lines += [f"{i}. `{_hide_local_paths(path, names)}`" for i, path in enumerate(report["experts"])] + [""]
    if options:
        lines += [f"Conversion options (`upcycle convert --method {report.get('method')}`):", ""]
        experts = {name for name, role in _option_roles(report).items() if role == "experts"}
        lines += markdown_table(("option", "value"), _options_rows(options, names, experts)) + [""]
    calibration = _role_options(report, "calibration")
    if calibration:
        tokens = options.get("calibration_tokens")
        shares = options.get("calibration_weights") or []
        texts = [f"`{_hide_local_paths(text, names)}`" for text in calibration]
        if len(shares) == len(texts):
            total = sum(shares) or 1
            texts = [f"{text} ({share / total:.0%})" for text, share in zip(texts, shares)]
        lines += [
            f"Calibration data: {', '.join(texts)}" + (f", {tokens:,} tokens." if tokens else "."),
            "",
        ]
    elif method in method_names() and method_spec(method).reads_calibration:
        lines += ["Calibration data: none; the conversion used the weights only.", ""]
    return lines if len(lines) > 2 else []


def _finetune_lines(finetune: dict) -> list[str]:
    recipe = finetune.get("recipe") or {}
    data = recipe.get("data") or {}
    if finetune.get("type", "causal-lm") == "causal-lm":
        first = (
            f"Tuned with `upcycle finetune` for {finetune['steps']} steps, {finetune['tokens']:,} tokens "
            f"({finetune['trainable']} parameters trainable, {finetune['seconds']:.0f} s on {finetune['device']}"
            + (f", {finetune['processes']} processes" if (finetune.get("processes") or 1) > 1 else "")
            + ")."
        )
    else:
        stage = (
            f", stage {finetune['stage']} of {finetune['stages']}: feed-forward layers only, on cluster-pure batches"
            if finetune.get("stage")
            else ""
        )
        first = (
            f"Tuned with `upcycle finetune` (a `{finetune['type']}` recipe{stage}) "
            f"on {finetune.get('pairs', 0):,} image-text pairs"
            + (
                f", {finetune['trainable_parameters']:,} parameters trainable"
                if finetune.get("trainable_parameters")
                else ""
            )
            + "."
        )
    lines = ["## Fine-tuning", "", first, ""]
    if data.get("train"):

        def names(sources) -> str:  # one source or a list of them, by file or asset name
            return ", ".join(
                f"`{Path(str(source)).name.removeprefix('asset:')}`"
                for source in (sources if isinstance(sources, list) else [sources])
            )

        held_out = (
            names(data["validation"])
            if data.get("validation")
            else (
                f"{data['validation_fraction']:.0%} of the training documents"
                if data.get("validation_fraction")
                else "none"
            )
        )
        lines += [
            f"Training data: {names(data['train'])}"
            + (f", sequences of {data['seq_len']} tokens" if data.get("seq_len") else "")
            + f"; held out: {held_out}.",
            "",
        ]
    losses = recipe.get("losses") or {}
    if recipe.get("teacher") and (losses.get("distill") or losses.get("distill_hidden")):
        terms = [
            f"{losses.get('lm', 1.0):g} x LM loss" if losses.get("lm", 1.0) else None,
            f"{losses['distill']:g} x KL to the teacher (T = {losses.get('distill_temperature', 1.0):g})"
            if losses.get("distill")
            else None,
            (
                f"{losses['distill_hidden']:g} x per-layer "
                f"{losses.get('distill_hidden_on', 'hidden_states').replace('_', ' ')} matched to the teacher's"
            )
            if losses.get("distill_hidden")
            else None,
        ]
        teacher = (
            "the model it was converted from"
            if recipe["teacher"] == "source"
            else f"`{_local_name(str(recipe['teacher']))}`"
        )
        lines += [f"Distilled from {teacher}: the objective is {' + '.join(t for t in terms if t)}.", ""]
    if recipe:
        lines += [
            "Recipe:",
            "",
            "```yaml",
            yaml.safe_dump(_without_paths(recipe), sort_keys=False).rstrip(),
            "```",
            "",
        ]
    return lines


def _without_paths(value):
    """``value`` (a recipe) with every local path replaced by its file or folder name (a card does not publish
    them)."""
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_paths(item) for item in value]
    if isinstance(value, str) and (
        value.startswith(("/", "./", "../", "~")) or (os.sep in value and Path(value).exists())
    ):
        return _local_name(value)
    return value


def _data_name(data: str | None) -> str:
    """A data file by its name (a card does not publish local paths); a description as it is."""
    if not data:
        return "-"
    return f"`{Path(data).name}`" if " " not in data else data


def _recovery_lines(block: dict) -> list[str]:
    """A recovery block (``upcycle eval --compare``) as a table: per corpus the perplexity, the reference's, their
    ratio."""
    corpora = block["corpora"]
    model = f" of `{_local_name(str(block['model']))}`" if block.get("model") else ""
    rows = [
        (
            _data_name(name),
            figure_text(c.get("perplexity")),
            figure_text(c.get("reference_perplexity")),
            figure_text(c.get("ratio")),
        )
        for name, c in corpora.items()
    ]
    if len(corpora) > 1:
        rows.append(("geometric mean", "", "", figure_text(block.get("mean_ratio"))))
    return [
        f"Recovery{model} against `{_local_name(str(block.get('reference', '?')))}` on held-out text: "
        "ratio = perplexity / the "
        "reference's perplexity (1.00 is full recovery, above 1 is worse).",
        "",
        *markdown_table(("corpus", "perplexity", "reference perplexity", "ratio"), rows),
        "",
    ]


def _benchmark_lines(block: dict) -> list[str]:
    """A benchmark block (``upcycle eval --tasks``) as a table: per top-level task and metric each model's score
    ± its standard error, and with a reference the recovery ratio of the task's main metric."""
    harness, models, recovery = block.get("harness") or {}, block["models"], block.get("recovery")
    names = [_local_name(m["model"]) for m in models]
    header = [*names[:1], *(f"{n} (reference)" if recovery else n for n in names[1:])]
    tasks = {name: task for name, task in block["tasks"].items() if task.get("top_level", True)} or block["tasks"]
    ratios = (recovery or {}).get("tasks") or {}
    rows = []
    for name, task in tasks.items():
        lower = {m for m, higher in (task.get("higher_is_better") or {}).items() if higher is False}
        for metric in dict.fromkeys(m for m in task["metrics"] if not is_stderr(m)):
            ratio = ratios.get(name) or {}
            rows.append(
                (
                    task.get("alias") or name,
                    "-" if task.get("num_fewshot") is None else task["num_fewshot"],
                    "-" if task.get("samples") is None else f"{task['samples']:,}",
                    metric_name(metric) + (" (lower is better)" if metric in lower else ""),
                    *(score_text(m["scores"].get(name) or {}, metric) for m in models),
                    *([figure_text(ratio.get("ratio")) if ratio.get("metric") == metric else ""] if recovery else []),
                )
            )
    if recovery and len(ratios) > 1:
        rows.append(("geometric mean", "", "", "", *("" for _ in models), figure_text(recovery.get("mean_ratio"))))
    run = {key: models[0].get(key) or harness.get(key) for key in ("dtype", "device", "batch_size")}
    settings = ", ".join(
        f"{label} {run[key]}"
        for key, label in (("dtype", "in"), ("device", "on"), ("batch_size", "batch size"))
        if run[key] not in (None, "", "auto")
    )
    version = f" {harness['lm_eval_version']}" if harness.get("lm_eval_version") else ""
    lines = [
        f"Benchmarks scored with [lm-evaluation-harness]({HARNESS_URL}){version} by `upcycle eval --tasks`"
        + (f" ({settings})" if settings else "")
        + ".",
        "",
    ]
    limit = harness.get("limit")
    if limit is not None:
        share = f"{limit:.0%} of its samples" if limit < 1 else f"{limit:g} samples"
        lines += [
            f"Each task was cut to at most {share} (`--limit`): the scores are indicative, and stay out of the "
            "model-index.",
            "",
        ]
    if recovery:
        lines += [
            f"Recovery of `{_local_name(str(recovery.get('model') or models[0]['model']))}` against "
            f"`{_local_name(str(recovery.get('reference') or models[-1]['model']))}`: ratio = the score / the "
            "reference's score on each task's main metric, inverted for a lower-is-better one (1.00 is full recovery, "
            "below 1 is worse).",
            "",
        ]
    lines += markdown_table(
        ("task", "shots", "samples", "metric", *header, *(["ratio"] if recovery else [])), rows
    ) + [""]
    subtasks = len(block["tasks"]) - len(tasks)
    if subtasks:
        lines += [f"The scores of their {subtasks} subtask{'s' if subtasks != 1 else ''} are in `{EVAL_FILE}`.", ""]
    usage = [(n, finite_number(m.get("active_fraction"))) for n, m in zip(names, models)]
    if any(fraction is not None and fraction < 1 for _, fraction in usage):
        lines += [
            "Attention heads active per token: "
            + ", ".join(f"`{n}` {figure_text(fraction)}" for n, fraction in usage if fraction is not None)
            + ".",
            "",
        ]
    return lines


def _row_name(row: dict) -> str:
    """A result row by its ``name``, else by the model folder's name."""
    return str(row.get("name") or _local_name(str(row.get("model", "?"))))


def _evaluation_lines(rows: list[dict], blocks: list[dict], benchmarks: list[dict], pipeline_tag: str) -> list[str]:
    lines = ["## Evaluation", ""]
    for block in blocks:
        lines += _recovery_lines(block)
    perplexity = [r for r in rows if "perplexity" in r]
    retrieval = [r for r in rows if "image_to_text_r1" in r]
    if perplexity:
        lines += markdown_table(
            ("model", "perplexity", "tokens", "window", "active heads", "data"),
            [
                (
                    _row_name(r),
                    figure_text(r["perplexity"]),
                    f"{r['tokens']:,}",
                    r.get("window", "-"),
                    f"{r.get('active_fraction', 1.0):.3f}",
                    _data_name(r.get("data")),
                )
                for r in perplexity
            ],
        ) + [""]
    if retrieval:
        lines += markdown_table(
            ("model", "image-to-text recall@1", "text-to-image recall@1"),
            [(_row_name(r), f"{r['image_to_text_r1']:.3f}", f"{r['text_to_image_r1']:.3f}") for r in retrieval],
        ) + [""]
    for block in benchmarks:
        lines += _benchmark_lines(block)
    if not perplexity and not retrieval and not blocks and not benchmarks:
        if pipeline_tag in ("text-generation", "fill-mask"):
            lines += [
                "No evaluation recorded yet. Measure perplexity with "
                "`upcycle eval PATH --data heldout.txt --compare source --json PATH/eval.json` "
                "(benchmark scores with `--tasks`), then refresh this card with `upcycle card PATH`.",
                "",
            ]
        else:
            lines += [
                "No evaluation recorded yet (a `clip` recipe of `upcycle finetune` records retrieval recall "
                "on its held-out pairs).",
                "",
            ]
    return lines


def _load_snippet(auto_class: str, name: str, custom_code: bool) -> str:
    if not custom_code:
        return f'from transformers import {auto_class}\nmodel = {auto_class}.from_pretrained("{name}")'
    return (
        f"from transformers import {auto_class}\n"
        f'model = {auto_class}.from_pretrained("{name}", trust_remote_code=True)\n'
        "# or, with upcycle installed and no remote code:\n"
        "import upcycle\n"
        f'model = {auto_class}.from_pretrained("{name}")'
    )


def render_card(folder: Path, *, report: dict | None = None) -> str:
    """The model card of ``folder`` from its config.json, upcycle_report.json (or ``report``, the one about to be
    written) and eval.json."""
    folder = Path(folder)
    config = read_json(folder / "config.json", "it is not a model folder")
    if report is None:
        report = read_json(folder / REPORT_FILE, "it is not an upcycle output (convert and finetune write one)")
    if not isinstance(config, dict) or not isinstance(report, dict):
        raise UpcycleError(f"{folder}: config.json and {REPORT_FILE} must hold JSON objects; fix or re-create them")
    name = report.get("name") or folder.name
    method, info = method_card(report)
    names = _local_names(report)
    finetune = report.get("finetune")
    auto_class, pipeline_tag = _loading(config, report)
    custom_code = "auto_map" in config
    base = _hide_local_paths(report.get("base_model") or "a dense model", names)
    recorded_rows, recorded_blocks = evaluation_records(report.get("evaluation") or []) or ([], [])
    user_rows, user_blocks, benchmarks = user_evaluations(folder)

    fields: dict = {}
    base_models = list(dict.fromkeys(report.get("base_models") or [])) or _unpublished_bases(report, method, names)
    if base_models:
        fields["base_model"] = base_models[0] if len(base_models) == 1 and not merges_experts(method) else base_models
    fields["library_name"] = "transformers"
    fields |= {key: value for key, value in (report.get("base_license") or {}).items() if key in LICENSE_KEYS}
    fields["pipeline_tag"] = pipeline_tag
    fields["tags"] = list(
        dict.fromkeys(
            [
                "upcycle",
                *([method] if method != "dense" else []),
                *report.get("tags", []),
                *(["finetuned"] if finetune else []),
            ]
        )
    )

    index = model_index(str(name), pipeline_tag, benchmarks, folder)
    if index:
        fields["model-index"] = index

    converted = method != "dense"
    intro = (
        f"`{base}` converted by [upcycle]({UPCYCLE_URL}) with {info.title if info else f'the `{method}` method'}"
        if converted
        else f"`{base}` continue-tuned by [upcycle]({UPCYCLE_URL})"
    )
    body = [
        f"# {name}",
        "",
        f"{intro}" + (", then fine-tuned with `upcycle finetune`." if finetune and converted else "."),
        "",
    ]
    body += [
        "## What was changed and why",
        "",
        _hide_local_paths(report.get("description") or "A dense model continue-tuned with upcycle.", names),
        "",
    ]
    if info:
        body += [info.why, ""]
    if converted and not finetune:
        body += [
            "It has not been fine-tuned since the conversion: "
            "expect it to need a short continue-tuning to recover quality.",
            "",
        ]

    table = card_plan_table(method, report, config)
    plan_lines = [_hide_local_paths(line, names) for line in report.get("plan_lines") or []]
    if table or plan_lines:
        body += ["## Plan", ""] + (table + [""] if table else [])
        if plan_lines and table:  # the table says it compactly; the full printout stays one click away
            body += [
                "<details><summary>The plan as <code>upcycle convert</code> printed it</summary>",
                "",
                "```",
                *plan_lines,
                "```",
                "",
                "</details>",
                "",
            ]
        elif plan_lines:
            body += ["As printed by `upcycle convert`:", "", "```", *plan_lines, "```", ""]
    if report.get("parameters"):
        body += ["## Parameters", ""] + _parameters_lines(report["parameters"])
    body += _conversion_lines(report, method, names)
    if finetune:
        body += _finetune_lines(finetune)
    body += _evaluation_lines([*recorded_rows, *user_rows], [*recorded_blocks, *user_blocks], benchmarks, pipeline_tag)
    if report.get("checks"):
        body += ["## Checks run at conversion", ""]
        body += [
            f"- {'passed' if c['passed'] else 'FAILED'}: {c['name']} ({_hide_local_paths(c['detail'], names)})"
            for c in report["checks"]
        ] + [""]
    body += ["## How to load", "", "```python", _load_snippet(auto_class, name, custom_code), "```", ""]
    if info:
        body += ["## Citation", "", f"{info.title}:", "", "```bibtex", "\n\n".join(info.citations), "```", ""]
    body += [f"The full {'conversion ' if converted else ''}record is in `{REPORT_FILE}`.", ""]
    return _front_matter(fields) + "\n".join(body)
