"""Model cards (README.md with Hub front matter) for upcycle outputs."""

from __future__ import annotations

import json
from pathlib import Path


def _front_matter(fields: dict) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def _training_lines(training: dict) -> list[str]:
    return [
        "## Fine-tuning", "",
        f"Tuned with `upcycle finetune` for {training['steps']} steps, {training['tokens']:,} tokens "
        f"({training['trainable']} parameters trainable, {training['seconds']:.0f} s on {training['device']}).", "",
        "Recipe:", "", "```yaml", training["recipe_yaml"].rstrip(), "```", "",
    ]


def _evaluation_lines(evaluation: list[dict]) -> list[str]:
    lines = ["## Evaluation", "", "| model | perplexity | tokens | active heads |", "|---|---|---|---|"]
    for row in evaluation:
        lines.append(f"| {row['name']} | {row['perplexity']:.3f} | {row['tokens']:,} | {row.get('active_fraction', 1.0):.3f} |")
    return lines + [""]


def write_model_card(folder: Path, *, base_model: str, method: str, tags: list[str], description: str,
                     plan_lines: list[str], parameters: dict, checks: list[dict], custom_code: bool,
                     training: dict | None = None, evaluation: list[dict] | None = None,
                     auto_class: str = "AutoModelForCausalLM", pipeline_tag: str = "text-generation",
                     name: str | None = None) -> Path:
    """Write ``folder/README.md`` describing what was done to ``base_model`` (and how it was tuned);
    ``name``: the model's name in the card (default: the folder's, wrong while writing into a temporary folder)."""
    fields = {"base_model": base_model, "library_name": "transformers", "pipeline_tag": pipeline_tag,
              "tags": list(dict.fromkeys(["upcycle", method, *tags]))}
    name = name or folder.name
    load = (
        f"from transformers import {auto_class}\n"
        f"model = {auto_class}.from_pretrained(\"{name}\", trust_remote_code=True)\n"
        "# or, with upcycle installed and no remote code:\n"
        "import upcycle\n"
        f"model = {auto_class}.from_pretrained(\"{name}\")"
        if custom_code
        else f"from transformers import {auto_class}\nmodel = {auto_class}.from_pretrained(\"{name}\")"
    )
    check_lines = [f"- {'passed' if c['passed'] else 'FAILED'}: {c['name']} ({c['detail']})" for c in checks]
    body = [
        f"# {name}",
        "",
        f"Converted from `{base_model}` by [upcycle](https://pypi.org/project/upcycle/) with the `{method}` method.",
        "",
        description,
        "",
        *(_training_lines(training) if training else [
            "It has not been fine-tuned since the conversion: expect it to need a short continue-tuning to recover quality.", ""]),
        *(_evaluation_lines(evaluation) if evaluation else []),
        "## Plan",
        "",
        "```",
        *plan_lines,
        "```",
        "",
        "## Parameters",
        "",
        f"- before: {parameters['before']:,}",
        f"- after: {parameters['after']:,} ({parameters['after'] - parameters['before']:+,})",
        "",
        "## Checks run at conversion",
        "",
        *check_lines,
        "",
        "## How to load",
        "",
        "```python",
        load,
        "```",
        "",
        "The full conversion record is in `upcycle_report.json`.",
        "",
    ]
    path = folder / "README.md"
    path.write_text(_front_matter(fields) + "\n".join(body))
    return path
