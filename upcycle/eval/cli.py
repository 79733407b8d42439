"""``upcycle eval``: score a model, and optionally the model it is compared with, on one or more held-out corpora."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UpcycleError

SOURCE = "source"  # --compare source: the dense model PATH was converted from


def run_eval(path: str, data: list[str], *, compare: str | None, tokens: int, window: int, stride: int | None, output: Path | None,
             attention: str = "auto") -> dict:
    """Score PATH (and ``compare``; ``source``: PATH's recorded source) on every ``--data`` corpus, each tokenised with
    PATH's tokenizer and cut to ``tokens``; print the table, write ``output`` (JSON) when given; returns the evaluation."""
    from transformers import AutoTokenizer

    from ..train.finetune import resolve_model
    from .evaluate import eval_tokens_from_text, evaluate_corpora, evaluation_json, format_recovery_table, recovery

    folder = resolve_model(path)
    reference = recorded_source(folder) if compare == SOURCE else resolve_model(compare) if compare else None
    for model in [folder, reference]:
        if model is not None and not (model / "config.json").exists():
            raise UpcycleError(f"{model} is not a model folder: no config.json; pass the folder that holds the model")
    files = corpus_files(data)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    corpora = {name: eval_tokens_from_text(file, tokenizer, tokens) for name, file in files.items()}
    kwargs = {"window": window, "stride": stride, "attention": attention}
    if reference is None:
        evaluation = {"results": evaluate_corpora(folder, corpora, **kwargs), "recovery": None}
    else:
        evaluation = recovery(folder, reference, corpora, **kwargs)
    print(format_recovery_table(evaluation))
    if output:  # for the model card (upcycle card)
        output.write_text(evaluation_json(evaluation))
    return evaluation


def corpus_files(data: list[str]) -> dict[str, Path]:
    """Corpus name -> text file or folder for each ``--data``: a path (named by its file name) or ``asset:NAME`` (named NAME)."""
    from ..train.finetune import resolve_text

    if not data:
        raise UpcycleError("give at least one --data: a .txt/.jsonl file, a folder of them, or asset:NAME")
    files: dict[str, Path] = {}
    for reference in data:
        name = reference.removeprefix("asset:") if reference.startswith("asset:") else Path(reference).name
        file = Path(resolve_text(reference)).expanduser()
        if not file.exists():
            raise UpcycleError(f"--data {reference} does not exist: give a .txt/.jsonl file, a folder of them, or asset:NAME")
        if name in files:
            same = files[name].resolve() == file.resolve()
            raise UpcycleError(f"--data {reference} is given twice: give each corpus once" if same else
                               f"two --data corpora are named {name} ({files[name]} and {file}): rename one")
        files[name] = file
    return files


def recorded_source(folder: Path) -> Path:
    """The dense model ``folder`` was converted from: the ``source`` of its upcycle_report.json, as a model folder."""
    from ..checkpoint.card import HUB_ID
    from ..train.finetune import resolve_model

    report_path = folder / "upcycle_report.json"
    hint = "pass --compare FOLDER with the dense model instead"
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UpcycleError(f"--compare source: {folder} has no upcycle_report.json, so its source is not known; {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UpcycleError(f"--compare source: {report_path} is not valid JSON ({' '.join(str(error).split())}); {hint}") from None
    source = report.get("source") if isinstance(report, dict) else None
    if not source:
        raise UpcycleError(f"--compare source: {report_path} records no source (not a conversion); {hint}")
    if not Path(source).expanduser().exists() and not (HUB_ID.match(source) and not source.startswith((".", "~"))):
        raise UpcycleError(f"--compare source: the source {source} recorded in {report_path} no longer exists; {hint}")
    return resolve_model(str(source))
