"""The Hub's ``model-index`` of a card: the benchmark scores of ``upcycle eval --tasks`` as huggingface_hub's
``EvalResult`` entries, and the repository ids the Hub accepts."""

from __future__ import annotations

from pathlib import Path

from upcycle.card.records import is_stderr
from upcycle.tables import finite_number

HARNESS_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


METRIC_NAMES = {
    "acc": "accuracy",
    "acc_norm": "normalized accuracy",
    "acc_mutual_info": "mutual-information accuracy",
    "exact_match": "exact match",
    "em": "exact match",
    "f1": "F1",
    "mcc": "Matthews correlation",
    "bleu": "BLEU",
    "chrf": "chrF",
    "ter": "TER",
    "brier_score": "Brier score",
    "word_perplexity": "word perplexity",
    "byte_perplexity": "byte perplexity",
    "bits_per_byte": "bits per byte",
}


def metric_name(metric: str) -> str:
    """A readable name of an lm-evaluation-harness metric key (``exact_match,strict-match``: "exact match
    (strict-match)")."""
    name, _, variant = metric.partition(",")
    readable = METRIC_NAMES.get(name, name.replace("_", " "))
    return f"{readable} ({variant})" if variant and variant != "none" else readable


def repo_id_problem(repo_id: str) -> str | None:
    """Why huggingface_hub's ``validate_repo_id`` (what its client checks before any request) refuses ``repo_id``,
    on one line and without the id itself; None for a valid id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        return " ".join(str(error).split(": '", 1)[0].split()).rstrip(".:")
    return None


def _another_folder(model: str, folder: Path) -> bool:
    """Whether ``model`` (a path eval.json records) is an existing folder other than ``folder``."""
    path = Path(model).expanduser()
    try:
        return path.exists() and path.resolve() != Path(folder).resolve()
    except OSError:
        return False


def _harness_source(block: dict) -> str:
    version = (block.get("harness") or {}).get("lm_eval_version")
    return f"lm-evaluation-harness {version} via upcycle eval" if version else "lm-evaluation-harness via upcycle eval"


def model_index(name: str, pipeline_tag: str, blocks: list[dict], folder: Path) -> list[dict] | None:
    """The Hub ``model-index`` of the card's own model from eval.json's benchmark blocks (None without a score):
    one result per top-level task with a dataset, a metric per finite score of ``models[0]`` (the evaluated model,
    left out when its path is another existing folder or when ``--limit`` scored only part of each task), built by
    huggingface_hub's ``EvalResult``. The Hub groups
    results by task and dataset, so a later task on the same dataset (type, config and split) is left out."""
    if not blocks:
        return None
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    results: list[EvalResult] = []
    seen: set[tuple] = set()
    for block in blocks:
        model = block["models"][0]
        if _another_folder(model["model"], folder) or (block.get("harness") or {}).get("limit") is not None:
            continue  # another model's scores, or scores of a subset of the items (--limit)
        for task_name, task in block["tasks"].items():
            dataset = task.get("dataset") or {}
            if not task.get("top_level", True) or not dataset.get("type"):
                continue
            scores = model["scores"].get(task_name) or {}
            shots = task.get("num_fewshot")
            entries = [
                EvalResult(
                    task_type=pipeline_tag,
                    task_name=pipeline_tag.replace("-", " ").title(),
                    dataset_type=dataset["type"],
                    dataset_name=dataset.get("name") or dataset["type"],
                    dataset_config=dataset.get("config"),
                    dataset_split=dataset.get("split"),
                    dataset_args=None if shots is None else {"num_few_shot": shots},
                    metric_type=metric,
                    metric_name=metric_name(metric),
                    metric_value=value,
                    source_name=_harness_source(block),
                    source_url=HARNESS_URL,
                )
                for metric in dict.fromkeys(task["metrics"])
                if not is_stderr(metric) and (value := finite_number(scores.get(metric))) is not None
            ]
            if entries and entries[0].unique_identifier not in seen:
                seen.add(entries[0].unique_identifier)
                results += entries
    return eval_results_to_model_index(name, results) if results else None
