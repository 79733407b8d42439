"""``upcycle eval``: score a model, and optionally the model it is compared with, on one or more held-out corpora."""

from __future__ import annotations

import json
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
    output (never one of the inputs), the task files and the tasks' data are checked before any model is loaded."""
    from ..checkpoint.source import resolve_model
    from ..files import json_text
    from ..tokenizer import load_tokenizer
    from .evaluate import (
        check_token_budget,
        eval_tokens_from_text,
        evaluate_corpora,
        format_recovery_table,
        max_positions,
        recovery,
    )

    if not data and harness is None:
        raise UpcycleError(
            "give --data (held-out text for perplexity) or --tasks (lm-evaluation-harness benchmarks), or both"
        )
    check_token_budget(tokens, "--tokens")
    if output is not None:
        check_writable(output)
    folder = resolve_model(path)
    reference = recorded_source(folder) if compare == SOURCE else resolve_model(compare) if compare else None
    for model in [folder, reference]:
        if model is not None and not (model / "config.json").exists():
            raise UpcycleError(f"{model} is not a model folder: no config.json; pass the folder that holds the model")
    models = [model for model in [folder, reference] if model is not None]
    window = check_window(window, models)
    check_stride(stride, window)
    files = corpus_files(data) if data else {}
    task_files: list[Path] = []
    if harness is not None:
        from .harness import check_task_folders

        harness = replace(harness, attention=attention, device=device, dtype=dtype)  # this evaluation's settings
        task_files = check_task_folders(harness)  # before lm-eval reads them: !function and YAML errors
    if output is not None:
        check_output_is_no_input(
            output,
            model=folder,
            reference=reference,
            data=list(files.values()),
            harness=harness,
            task_files=task_files,
        )
    if harness is not None:
        from .harness import prepare_tasks

        # unknown names, data that cannot be fetched and what the models' context cannot hold fail here
        tasks = prepare_tasks(harness, {model: max_positions(model) for model in models})
    evaluation: dict = {"results": [], "recovery": None}
    if files:
        tokenizer = load_tokenizer(folder)
        corpora = {
            name: eval_tokens_from_text(file, tokenizer, tokens, budget_name="--tokens")
            for name, file in files.items()
        }
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
        from ..files import write_text_atomic

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
    from ..paths import probe_writable

    try:
        probe_writable(parent)
    except OSError as error:
        raise UpcycleError(
            f"--json {output}: cannot write in {parent} ({error.strerror or error}); "
            "give a path in a folder you may write to"
        ) from None


def check_window(window: int | None, folders: list[Path]) -> int:
    """``window``, refused above a model's ``max_position_embeddings``; None: 512, or the smallest of them when
    below."""
    from .evaluate import max_positions

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


def check_stride(stride: int | None, window: int) -> None:
    """Refuse a ``--stride`` outside 1..``window`` (None: the window, disjoint blocks)."""
    if stride is None:
        return
    if stride < 1:
        raise UpcycleError(f"--stride {stride} must be at least 1; give a stride from 1 to the window ({window})")
    if stride > window:
        raise UpcycleError(
            f"--stride {stride} is above the window ({window}), which would leave tokens unscored; give --stride "
            f"{window} or less, or a larger --window"
        )


RESULT_BYTES = 64 << 20  # an eval result is far smaller: a larger file is not one (and is not read whole)


def is_eval_result(path: Path) -> bool:
    """Whether ``path`` holds what ``upcycle eval --json`` writes: a JSON object with a ``results`` list."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(RESULT_BYTES + 1)
        if len(data) > RESULT_BYTES:
            return False
        value = json.loads(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(value, dict) and isinstance(value.get("results"), list)


def check_output_is_no_input(
    output: Path,
    *,
    model: Path,
    reference: Path | None,
    data: list[Path],
    harness: HarnessSettings | None,
    task_files: list[Path],
) -> None:
    """Refuse ``--json PATH`` (symlinks resolved) where it would replace what this evaluation reads: a ``--data`` file,
    a data file a task YAML names, or anything in the bundled tasks' folder (upcycle rewrites it). An existing file
    at PATH is replaced only when it is an earlier ``upcycle eval`` result (e.g. ``MODEL/eval.json``); any other is
    refused, naming the model, ``--compare``, ``--data`` or ``--include-path`` folder it belongs to."""
    target = Path(output).expanduser().resolve()
    given = f"--json {output}"
    fix = "give --json a new file, or an earlier upcycle eval result"
    files = {file.resolve(): f"the --data file {file}" for file in data if not file.is_dir()}
    files |= {file.resolve(): f"the task data file {file}" for file in task_files if not file.is_dir()}
    if target in files:
        raise UpcycleError(f"{given} is {files[target]}, which this evaluation reads; {fix}")
    if harness is not None:
        from upcycle.assets import cache_root
        from upcycle.data.bundled_tasks import FOLDER_NAME

        bundled = (cache_root() / FOLDER_NAME).resolve()
        if target == bundled or bundled in target.parents:
            raise UpcycleError(
                f"{given} is inside {bundled}, the folder of upcycle's bundled tasks (rewritten on use); {fix}"
            )
    if not target.exists() or is_eval_result(target):
        return
    folders = {model: f"the model folder {model}"}
    if reference is not None:
        folders[reference] = f"the --compare model {reference}"
    folders |= {folder: f"the --data folder {folder}" for folder in data if folder.is_dir()}
    folders |= {folder: f"the task data folder {folder}" for folder in task_files if folder.is_dir()}
    if harness is not None:
        folders |= {Path(p).expanduser(): f"the --include-path folder {p}" for p in harness.include_paths}
    for folder, label in folders.items():
        if folder.resolve() in target.parents or target in _files_below(folder):
            raise UpcycleError(f"{given} is a file of {label}, which this evaluation reads; {fix}")
    raise UpcycleError(
        f'{given} exists and is not an upcycle eval result (a JSON object with a "results" list); give a new file, '
        "or move that one away first"
    )


def _files_below(folder: Path) -> set[Path]:
    """The files in ``folder`` and below, symlinks resolved (so a file linked into a model folder counts)."""
    try:
        return {file.resolve() for file in folder.rglob("*") if file.is_file()}
    except OSError:  # an unreadable subfolder: the caller refuses the file all the same, naming no folder
        return set()


def corpus_files(data: list[str]) -> dict[str, Path]:
    """Corpus name -> text file or folder for each ``--data``: a path (named by its file name) or ``asset:NAME``
    (named NAME)."""
    from ..assets import resolve_text

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
    from ..checkpoint.source import HUB_ID, resolve_model

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
