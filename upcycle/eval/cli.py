"""``upcycle eval``: score a model, and optionally the model it is compared with, on one or more held-out corpora."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from ..errors import UpcycleError
from .harness import HarnessSettings

SOURCE = "source"  # --compare source: the dense model PATH was converted from
DEFAULT_WINDOW = 512  # --window when not given (or the model's max_position_embeddings, when smaller)


def run_eval(
    path: str,
    data: list[str] | None,
    *,
    compare: str | None,
    tokens: int,
    window: int | None,
    stride: int | None,
    output: Path | None,
    attention: str = "auto",
    harness: HarnessSettings | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> dict:
    """Score PATH (and ``compare``; ``source``: PATH's recorded source) on every ``--data`` corpus, each tokenised with
    PATH's tokenizer and cut to ``tokens``, and on the ``harness`` tasks (lm-evaluation-harness); print the tables,
    write ``output`` (JSON) when given; returns the evaluation (``results``, ``recovery`` and, with tasks,
    ``benchmarks``). ``window`` None: 512, or the models' ``max_position_embeddings`` when smaller. Every input, the
    output's folder and the tasks' data are checked before any model is scored."""
    from ..train.finetune import resolve_model
    from .evaluate import (
        eval_tokens_from_text,
        evaluate_corpora,
        format_recovery_table,
        json_text,
        load_tokenizer,
        recovery,
    )

    if not data and harness is None:
        raise UpcycleError(
            "give --data (held-out text for perplexity) or --tasks (lm-evaluation-harness benchmarks), or both"
        )
    if output is not None:
        check_writable(output)
    folder = resolve_model(path)
    reference = recorded_source(folder) if compare == SOURCE else resolve_model(compare) if compare else None
    for model in [folder, reference]:
        if model is not None and not (model / "config.json").exists():
            raise UpcycleError(f"{model} is not a model folder: no config.json; pass the folder that holds the model")
    window = check_window(window, [model for model in [folder, reference] if model is not None])
    files = corpus_files(data) if data else {}
    if harness is not None:
        from .harness import prepare_tasks

        harness = replace(harness, attention=attention, device=device, dtype=dtype)  # this evaluation's settings
        tasks = prepare_tasks(harness)  # unknown names and data that cannot be fetched fail here
    evaluation: dict = {"results": [], "recovery": None}
    if files:
        tokenizer = load_tokenizer(folder)
        corpora = {name: eval_tokens_from_text(file, tokenizer, tokens) for name, file in files.items()}
        kwargs = {"window": window, "stride": stride, "attention": attention, "device": device, "dtype": dtype}
        if reference is None:
            evaluation = {"results": evaluate_corpora(folder, corpora, **kwargs), "recovery": None}
        else:
            evaluation = recovery(folder, reference, corpora, **kwargs)
        print(format_recovery_table(evaluation))
    if harness is not None:
        from .harness import format_benchmark_table, run_benchmarks

        evaluation["benchmarks"] = run_benchmarks(folder, reference, harness, tasks)
        print(("\n" if files else "") + format_benchmark_table(evaluation["benchmarks"]))
    if output:  # for the model card (upcycle card)
        from ..checkpoint.card import write_text_atomic

        try:
            write_text_atomic(output.expanduser(), json_text(evaluation))
        except OSError as error:
            raise UpcycleError(
                f"--json {output}: cannot write it ({error.strerror or error}); free space or pick another path "
                "(the results are printed above)"
            ) from None
    return evaluation


def check_writable(output: Path) -> None:
    """Refuse ``--json PATH`` up front when PATH cannot be written: a folder, a missing folder above it, a parent that
    is a file, or a folder this user may not write in (tried with a temporary file, so it also holds for root)."""
    path = Path(output).expanduser()
    if path.is_dir():
        raise UpcycleError(f"--json {output} is a folder; give a file path, e.g. {Path(output) / 'eval.json'}")
    parent = path.absolute().parent
    if not parent.exists():
        above = next((p for p in parent.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise UpcycleError(f"--json {output}: {above} is a file, not a folder; give a path in an existing folder")
        raise UpcycleError(
            f"--json {output}: the folder {parent} does not exist; "
            "create it first or give a path in an existing folder"
        )
    if not parent.is_dir():
        raise UpcycleError(f"--json {output}: {parent} is a file, not a folder; give a path in an existing folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as error:
        raise UpcycleError(
            f"--json {output}: cannot write in {parent} ({error.strerror or error}); "
            "give a path in a folder you may write to"
        ) from None
    os.close(handle)
    os.unlink(probe)


def max_positions(folder: Path) -> int | None:
    """The ``max_position_embeddings`` of a model folder's config.json (or of its ``text_config``), when it says
    one."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    value = config.get("max_position_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_window(window: int | None, folders: list[Path]) -> int:
    """``window``, refused above a model's ``max_position_embeddings``; None: 512, or the smallest of them when
    below."""
    limits = [(limit, folder) for folder in folders if (limit := max_positions(folder)) is not None]
    if window is None:
        return min([DEFAULT_WINDOW, *(limit for limit, _ in limits)])
    if window < 1:
        raise UpcycleError(f"--window {window} must be at least 1; give a positive number of tokens")
    for limit, folder in limits:
        if window > limit:
            raise UpcycleError(
                f"--window {window} is above the max_position_embeddings ({limit}) of {folder}; "
                f"pass --window {limit} or less"
            )
    return window


def corpus_files(data: list[str]) -> dict[str, Path]:
    """Corpus name -> text file or folder for each ``--data``: a path (named by its file name) or ``asset:NAME``
    (named NAME)."""
    from ..train.finetune import resolve_text

    if not data:
        raise UpcycleError("give at least one --data: a .txt/.jsonl file, a folder of them, or asset:NAME")
    files: dict[str, Path] = {}
    for reference in data:
        name = reference.removeprefix("asset:") if reference.startswith("asset:") else Path(reference).name
        file = Path(resolve_text(reference)).expanduser()
        if not file.exists():
            raise UpcycleError(
                f"--data {reference} does not exist: give a .txt/.jsonl file, a folder of them, or asset:NAME"
            )
        if name in files:
            same = files[name].resolve() == file.resolve()
            raise UpcycleError(
                f"--data {reference} is given twice: give each corpus once"
                if same
                else f"two --data corpora are named {name} ({files[name]} and {file}): rename one"
            )
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
        raise UpcycleError(
            f"--compare source: {folder} has no upcycle_report.json, so its source is not known; {hint}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UpcycleError(
            f"--compare source: {report_path} is not valid JSON ({' '.join(str(error).split())}); {hint}"
        ) from None
    source = report.get("source") if isinstance(report, dict) else None
    if not source:
        raise UpcycleError(f"--compare source: {report_path} records no source (not a conversion); {hint}")
    if not Path(source).expanduser().exists() and not (HUB_ID.match(source) and not source.startswith((".", "~"))):
        raise UpcycleError(f"--compare source: the source {source} recorded in {report_path} no longer exists; {hint}")
    return resolve_model(str(source))
