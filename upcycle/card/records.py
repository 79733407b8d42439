"""The records a card is made from: ``upcycle_report.json`` and ``eval.json`` (what ``upcycle eval --json`` wrote),
read and checked for their shape."""

from __future__ import annotations

import json
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.tables import is_figure, stderr_key

REPORT_FILE = "upcycle_report.json"


EVAL_FILE = "eval.json"


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UpcycleError(f"{path.parent} has no {path.name}; {what}") from None
    except OSError as error:
        raise UpcycleError(
            f"{path} cannot be read ({error.strerror or error}); make it readable and run again"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UpcycleError(f"{path} is not valid JSON ({' '.join(str(error).split())}); fix or delete it") from None


def user_evaluations(folder: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """(rows, recovery blocks, benchmark blocks) of ``eval.json``: what ``upcycle eval --json`` writes
    (``{"results": [...], "recovery": ..., "benchmarks": ...}``, ``results`` empty when only ``--tasks`` ran) or
    the plain list of rows that earlier versions wrote."""
    path = folder / EVAL_FILE
    if not path.exists():
        return [], [], []
    value = read_json(path, "")
    records = evaluation_records(value)
    benchmarks = value.get("benchmarks") if isinstance(value, dict) else None
    if not (
        records
        and (records[0] or benchmarks is not None)
        and all(isinstance(r, dict) and "perplexity" in r and "tokens" in r for r in records[0])
        and all(isinstance(b, dict) and isinstance(b.get("corpora"), dict) for b in records[1])
    ):
        raise UpcycleError(
            f"{path} is not the output of `upcycle eval --json` (results with perplexity and tokens, or benchmarks "
            "from --tasks); move it away or write it again with upcycle eval"
        )
    if benchmarks is None:
        return records[0], records[1], []
    problem = benchmarks_problem(benchmarks)
    if problem:
        raise UpcycleError(
            f"{path} is not the output of `upcycle eval --json` ({problem}); "
            "move it away or write it again with upcycle eval --tasks"
        )
    return records[0], records[1], [benchmarks]


def is_stderr(metric: str) -> bool:
    return metric.split(",", 1)[0].endswith("_stderr")


def _task_problem(name: str, task: object) -> str | None:
    where = f"benchmarks.tasks.{name}"
    if not isinstance(task, dict):
        return f"{where} is not an object"
    metrics = task.get("metrics")
    if not (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)):
        return f"{where}.metrics is not a list of metric names"
    dataset = task.get("dataset")
    if dataset is not None and not (
        isinstance(dataset, dict)
        and all(dataset.get(k) is None or isinstance(dataset[k], str) for k in ("type", "name", "config", "split"))
    ):
        return f"{where}.dataset is not an object of type, name, config and split"
    for key in ("num_fewshot", "samples"):
        if not (task.get(key) is None or (isinstance(task[key], int) and not isinstance(task[key], bool))):
            return f"{where}.{key} is not a whole number"
    if not isinstance(task.get("top_level", True), bool) or not isinstance(task.get("alias") or "", str):
        return f"{where}.top_level is not true or false, or its alias is not text"
    if not isinstance(task.get("higher_is_better") or {}, dict):
        return f"{where}.higher_is_better is not an object"
    return None


def _model_problem(index: int, model: object, tasks: dict) -> str | None:
    where = f"benchmarks.models[{index}]"
    if not isinstance(model, dict) or not isinstance(model.get("model"), str):
        return f"{where} is not an object with the model's path"
    scores = model.get("scores")
    if not isinstance(scores, dict) or not all(isinstance(s, dict) for s in scores.values()):
        return f"{where}.scores is not an object of task -> metric -> number"
    for task, values in scores.items():
        metrics = (tasks.get(task) or {}).get("metrics") or []
        if not all(is_figure(values.get(m)) and is_figure(values.get(stderr_key(m))) for m in metrics):
            return f"{where}.scores.{task} holds a score that is not a number or null"
    if not is_figure(model.get("active_fraction")):
        return f"{where}.active_fraction is not a number or null"
    return None


def benchmarks_problem(block: object) -> str | None:
    """What is wrong with the shape of a ``benchmarks`` block of eval.json, or None when it is fine."""
    if not isinstance(block, dict):
        return "benchmarks is not an object"
    harness, tasks, models = block.get("harness"), block.get("tasks"), block.get("models")
    if not (harness is None or (isinstance(harness, dict) and is_figure(harness.get("limit")))):
        return "benchmarks.harness is not an object (with a number or null as limit)"
    if not isinstance(tasks, dict):
        return "benchmarks.tasks is not an object of tasks"
    problem = next(filter(None, (_task_problem(name, task) for name, task in tasks.items())), None)
    if problem:
        return problem
    if not (isinstance(models, list) and models):
        return "benchmarks.models is not a list of the evaluated models"
    problem = next(filter(None, (_model_problem(i, model, tasks) for i, model in enumerate(models))), None)
    if problem:
        return problem
    recovery = block.get("recovery")
    if recovery is None:
        return None
    if not (
        isinstance(recovery, dict)
        and isinstance(recovery.get("tasks"), dict)
        and is_figure(recovery.get("mean_ratio"))
        and all(
            isinstance(t, dict)
            and isinstance(t.get("metric"), str)
            and all(is_figure(t.get(k)) for k in ("value", "reference_value", "ratio"))
            for t in recovery["tasks"].values()
        )
    ):
        return "benchmarks.recovery is not null or an object of tasks with metric, value, reference_value and ratio"
    return None


def evaluation_records(value) -> tuple[list, list] | None:
    """(rows, recovery blocks) of an evaluation record: a list of rows, or an object with ``results`` and ``recovery``
    (None when it is neither)."""
    if isinstance(value, list):
        return value, []
    if isinstance(value, dict) and isinstance(value.get("results"), list):
        blocks = value.get("recovery")
        return value["results"], [] if blocks is None else list(blocks) if isinstance(blocks, list) else [blocks]
    return None
