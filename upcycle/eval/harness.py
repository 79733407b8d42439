"""Benchmarks through EleutherAI's lm-evaluation-harness (``upcycle eval --tasks``): the harness runs on the model
upcycle loaded, so the attention backend applies and head usage is counted beside the scores.

The harness (PyPI ``lm-eval``, the ``upcycle[lmeval]`` extra) is imported only here, on first use.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from upcycle.errors import UpcycleError
from upcycle.tables import figure_text, finite_number, score_text, stderr_key

INSTALL_HINT = "pip install 'upcycle[lmeval]' (or pip install lm-eval)"
# dataset_path values that are datasets' packaged builders reading local files, not Hub datasets
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset", "imagefolder", "audiofolder"}
# the seeds lm_eval.simple_evaluate uses by default, so figures match a `lm_eval` run of the same model
RANDOM_SEED, OTHER_SEED = 0, 1234


@dataclass
class HarnessSettings:
    """How ``upcycle eval --tasks`` runs the harness: the task names (or patterns) and the harness's options."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: float | None = None  # below 1: a fraction of each task's items
    batch_size: str = "4"
    include_paths: list[Path] = field(default_factory=list)
    device: str | None = None
    dtype: str = "auto"
    attention: str = "auto"
    bootstrap_iters: int = 1000
    trust_remote_code: bool = False  # let --include-path YAMLs import the Python files their !function tags name

    def describe(self, version: str) -> dict:
        """The settings as recorded in ``eval.json``."""
        return {
            "lm_eval_version": version,
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "device": self.device,
            "dtype": self.dtype,
            "attention": self.attention,
        }


def parse_task_names(values: Sequence[str]) -> list[str]:
    """``--tasks`` values (repeatable, each comma-separated, as the harness takes them) as a list without
    duplicates."""
    names = [name.strip() for value in values for name in value.split(",")]
    if not any(names) or not all(names):
        raise UpcycleError("--tasks has an empty task name; give names separated by commas, e.g. --tasks a,b")
    return list(dict.fromkeys(names))


def parse_limit(value: str | None) -> float | None:
    """``--limit``: a count of items per task (``100``), or a fraction of them below 1 (``0.1``)."""
    if value is None:
        return None
    try:
        limit = float(value)
    except ValueError:
        limit = math.nan
    if not math.isfinite(limit) or limit <= 0 or (limit >= 1 and limit != int(limit)):
        raise UpcycleError(f"--limit {value}: give a number of items per task (e.g. 100) or a fraction below 1 (0.1)")
    return int(limit) if limit >= 1 else limit


def check_settings(settings: HarnessSettings) -> None:
    """Refuse bad harness options before anything is loaded."""
    if settings.num_fewshot is not None and settings.num_fewshot < 0:
        raise UpcycleError(f"--num-fewshot {settings.num_fewshot} is negative; give 0 or more examples")
    size = settings.batch_size
    if not (size.isdigit() and int(size) > 0) and not (
        size == "auto" or (size.startswith("auto:") and size[5:].isdigit() and int(size[5:]) > 0)
    ):
        raise UpcycleError(f"--batch-size {size}: give a positive number, auto, or auto:N (N re-detections)")
    for folder in settings.include_paths:
        if not Path(folder).expanduser().is_dir():
            raise UpcycleError(f"--include-path {folder} is not a folder; give a folder of lm-eval task YAML files")


def harness_version() -> str:
    """The installed lm-evaluation-harness version; one line with the install command when it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        import lm_eval  # noqa: F401

        return version("lm_eval")
    except (ImportError, PackageNotFoundError):
        raise UpcycleError(f"--tasks runs EleutherAI's lm-evaluation-harness, which is not installed: {INSTALL_HINT}")


# ---- tasks ----------------------------------------------------------------------------------------

IGNORED_FOLDERS = {"__pycache__", ".ipynb_checkpoints"}  # the folders the harness's task index skips too


def check_task_folders(settings: HarnessSettings) -> list[Path]:
    """Read every task YAML of the ``--include-path`` folders, and the files they ``include:``, before the harness
    does: one line for a file that does not parse (the harness would skip it silently) and, unless
    ``settings.trust_remote_code``, for a ``!function`` tag, with which the harness imports and runs a Python file
    beside the YAML. Returns the local data files the YAMLs name (``dataset_kwargs.data_files``, a local
    ``dataset_path``)."""
    check_settings(settings)
    data: list[Path] = []
    seen: set[Path] = set()
    for folder in settings.include_paths:
        root = Path(folder).expanduser()
        for file in sorted(root.glob("**/*.yaml"), key=lambda p: p.as_posix()):
            if not any(part in IGNORED_FOLDERS for part in file.relative_to(root).parts):
                data += _check_task_file(file, root, settings.trust_remote_code, seen)
    return data


def _check_task_file(file: Path, root: Path, trusted: bool, seen: set[Path]) -> list[Path]:
    """:func:`check_task_folders` on one YAML file of the folder ``root`` and on what it includes (each file once:
    ``seen``); returns the local data files they name."""
    import yaml

    file = file.resolve()
    if file in seen:
        return []
    seen.add(file)
    functions: list[str] = []
    base = yaml.CSafeLoader if getattr(yaml, "__with_libyaml__", False) else yaml.SafeLoader

    class TaskLoader(base):  # type: ignore[misc, valid-type]
        """The harness's YAML dialect; a ``!function`` tag is recorded, never imported."""

    def record(loader, node) -> str:
        functions.append(str(loader.construct_scalar(node)))
        return functions[-1]

    TaskLoader.add_constructor("!function", record)
    fix = f"fix it or move it out of --include-path {root}"
    try:
        config = yaml.load(file.read_text(encoding="utf-8"), Loader=TaskLoader)  # noqa: S506 (a safe loader)
    except (OSError, UnicodeDecodeError) as error:
        raise UpcycleError(f"cannot read the task file {file} ({_first_line(error)}); {fix}") from None
    except yaml.YAMLError as error:
        raise UpcycleError(f"the task file {file} is not valid YAML ({_yaml_problem(error)}); {fix}") from None
    if functions and not trusted:
        spec = functions[0]
        module = file.parent / f"{spec.rpartition('.')[0].replace('.', '/')}.py"
        code = f"imports and runs {module}" if module.is_file() else f"imports the Python module of {spec}"
        raise UpcycleError(
            f"the task file {file} has `!function {spec}`, with which lm-evaluation-harness {code}; pass "
            "--trust-remote-code if you trust that code, or remove the tag"
        )
    if not isinstance(config, dict):
        return []
    data = _local_data(config)
    includes = config.get("include")
    for include in includes if isinstance(includes, list) else [includes] if includes else []:
        included = Path(str(include)).expanduser()
        included = included if included.is_absolute() else file.parent / included
        if not included.is_file():
            raise UpcycleError(f"the task file {file} includes {include}, which is not a file; {fix}")
        data += _check_task_file(included, root, trusted, seen)
    return data


def _yaml_problem(error: Exception) -> str:
    """Where and what a YAML error is, on one line: ``line 3, column 5: expected ',' or ']'``."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or _first_line(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def _local_data(config: dict) -> list[Path]:
    """The local files a task YAML reads: its ``dataset_kwargs.data_files`` and a ``dataset_path`` that exists."""
    kwargs = config.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    values = list(files.values()) if isinstance(files, dict) else [files]
    names = [name for value in values for name in (value if isinstance(value, list) else [value]) if name]
    path = config.get("dataset_path")
    if isinstance(path, str) and path not in LOCAL_BUILDERS:
        names.append(path)
    return [Path(str(name)).expanduser() for name in names if Path(str(name)).expanduser().exists()]


def load_tasks(settings: HarnessSettings) -> dict:
    """The harness's loaded tasks (``TaskManager.load``'s dict: tasks, groups, group_map) for ``settings.tasks``,
    their data fetched: upcycle's bundled tasks, the ``--include-path`` folders and the harness's own tasks. One
    line for an unknown name or data that cannot be fetched."""
    from lm_eval.tasks import TaskManager

    from upcycle.data.bundled_tasks import bundled_task_folder

    folders = [str(bundled_task_folder()), *(str(Path(p).expanduser()) for p in settings.include_paths)]
    # the harness's own index takes seconds to build: only when a name is not in the local folders
    manager = TaskManager(include_defaults=False, include_path=folders)
    if _unknown(manager, settings.tasks):
        manager = TaskManager(include_path=folders)
    unknown = _unknown(manager, settings.tasks)
    if unknown:
        raise UpcycleError(
            f"unknown task {', '.join(map(repr, unknown))}: not a task, group or tag of lm-evaluation-harness nor "
            "in --include-path; list them with `lm_eval ls tasks`, or give --include-path FOLDER with its YAML"
        )
    names = manager.match_tasks(settings.tasks)
    refuse_unsafe(
        [name for name in names if (getattr(manager.task_index.get(name), "cfg", None) or {}).get("unsafe_code")]
    )
    built: list = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (ConnectionError, FileNotFoundError) as error:  # offline, or a dataset the Hub does not have
            raise UpcycleError(
                f"task {name}: its data{_data_source(manager, name, ' (', ')')} cannot be fetched "
                f"({_first_line(error)}); with network access run it once to cache it (HF_HUB_OFFLINE=1 then "
                "reads the cache), or point --include-path at a folder with a task YAML that reads local files "
                "(dataset_path: json, dataset_kwargs: {data_files: ...})"
            ) from None
        except (KeyError, ValueError, TypeError) as error:
            raise UpcycleError(
                f"task {name} cannot be loaded by lm-evaluation-harness ({_first_line(error)})"
            ) from None
        groups = loaded.get("groups") or {}
        built += [groups[name]] if name in groups else list(loaded["tasks"].values())
    try:
        return manager.load(built)
    except ValueError as error:  # a task asked for twice, e.g. alone and inside a group
        raise UpcycleError(f"--tasks: {_first_line(error)}; give each task once") from None


def _unknown(manager, names: list[str]) -> list[str]:
    return [name for name in names if not manager.match_tasks([name])]


def _data_source(manager, name: str, before: str, after: str) -> str:
    entry = manager.task_index.get(name)
    path = (getattr(entry, "cfg", None) or {}).get("dataset_path")
    if not path or path in LOCAL_BUILDERS:
        return ""
    return f"{before}{path} from the Hugging Face Hub{after}" if not Path(path).exists() else f"{before}{path}{after}"


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()).strip("\"'")
    return (text[:240] + "...") if len(text) > 240 else text or type(error).__name__


def configure_tasks(loaded: dict, num_fewshot: int | None) -> None:
    """Set each task's few-shot count as ``lm_eval.simple_evaluate`` does: ``num_fewshot`` overrides a task's own
    unless the task fixes 0; without it a task without a default runs 0-shot. The few-shot sampler is seeded."""
    for task in loaded["tasks"].values():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif num_fewshot is None and default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=OTHER_SEED)


# ---- running a model -------------------------------------------------------------------------------


def _harness_model(model, tokenizer, batch_size: str, usage, name: str = "the model"):
    """The harness's HF causal-LM wrapper around an already loaded ``model``, with ``usage`` (a HeadUsage) told which
    positions of each right-padded loglikelihood batch are real tokens. Its ``max_length`` is the model's
    ``max_position_embeddings``; an answer longer than that is one line naming the model (``name``), where the
    harness would fail an assertion."""
    from lm_eval.models import huggingface

    class UsageCountingLM(huggingface.HFLM):
        """HFLM whose loglikelihood batches mark their padding for the head-usage count: the harness pads each
        batch on the right with token 0 and passes no attention mask, so the lengths are taken where it pads.
        Other calls of the model here (the batch-size search) count no token; generation passes its own mask."""

        _lengths: list[int] | None = None
        _count_every_position = False
        _items: dict[tuple, tuple[str, int]] = {}  # (context, answer) -> (task, item) of the requests being run

        def loglikelihood(self, requests, *args, **kwargs):
            self._items = {tuple(request.args): (request.task_name, request.doc_id) for request in requests}
            try:
                return super().loglikelihood(requests, *args, **kwargs)
            finally:
                self._items = {}

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            for pair, _, continuation in requests:
                if len(continuation) > self.max_length:
                    task, item = self._items.get(tuple(pair), (None, None))
                    raise UpcycleError(too_long(task, item, len(continuation), self.max_length, name))
            pad_and_concat = getattr(huggingface, "pad_and_concat", None)
            if pad_and_concat is None:  # another harness version: every position counts, padding too
                self._count_every_position = True
                return super()._loglikelihood_tokens(requests, *args, **kwargs)

            def recording(max_length, tensors, *rest, **options):
                self._lengths = [int(t.shape[-1]) for t in tensors]
                return pad_and_concat(max_length, tensors, *rest, **options)

            huggingface.pad_and_concat = recording
            try:
                return super()._loglikelihood_tokens(requests, *args, **kwargs)
            finally:
                huggingface.pad_and_concat = pad_and_concat
                self._lengths = None

        def _model_call(self, inps, attn_mask=None, labels=None):
            lengths, self._lengths = self._lengths, None
            if usage is not None and not self._count_every_position:
                import torch

                positions = torch.arange(inps.shape[1], device=inps.device)  # [T]
                if lengths is not None and len(lengths) == inps.shape[0]:
                    real = torch.tensor(lengths, device=inps.device)[:, None]  # [B, 1]
                else:  # not a batch of requests: the batch-size search of --batch-size auto
                    real = torch.zeros(inps.shape[0], 1, dtype=torch.long, device=inps.device)
                usage.set_mask(positions[None, :] < real)  # [B, T]
            try:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            finally:
                if usage is not None:
                    usage.set_mask(None)

    size = int(batch_size) if batch_size.isdigit() else batch_size
    harness_log = logging.getLogger("lm_eval")
    level = harness_log.level
    harness_log.setLevel(logging.ERROR)  # its warnings about an already-loaded model are what upcycle intends
    try:
        return UsageCountingLM(
            pretrained=model, tokenizer=tokenizer, batch_size=size, backend="causal", max_length=model_positions(model)
        )
    finally:
        harness_log.setLevel(level)


def model_positions(model) -> int | None:
    """A loaded model's ``max_position_embeddings`` (of its ``text_config`` for a composite model), when it has
    one."""
    config = getattr(model.config, "text_config", None) or model.config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def run_model(model_path: str | Path, loaded: dict, settings: HarnessSettings) -> dict:
    """Load ``model_path`` with upcycle's loader (``settings``' device, dtype and attention backend) and run the
    loaded tasks on it. Returns ``{"model", "method", "seconds", "active_fraction", "head_usage", "scores",
    "results"}``: ``scores`` per task name ``{metric: value, metric_stderr: value}``, ``results`` the harness's
    own results dict (for :func:`describe_tasks`)."""
    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate

    from upcycle.eval.evaluate import load_model
    from upcycle.eval.usage import HeadUsage
    from upcycle.modeling.gated_attention import set_attention_backend
    from upcycle.tokenizer import load_tokenizer

    model = load_model(model_path, settings.device, settings.dtype)
    try:
        set_attention_backend(model, settings.attention)
    except ValueError as error:  # kernel asked for without Triton or CUDA
        raise UpcycleError(str(error)) from None
    method = (getattr(model.config, "upcycle", None) or {}).get("method", "dense")
    tokenizer = load_tokenizer(model_path)
    random.seed(RANDOM_SEED)
    np.random.seed(OTHER_SEED)
    torch.manual_seed(OTHER_SEED)
    print(f"running {', '.join(loaded['tasks'])} on {model_path}", file=sys.stderr, flush=True)
    with HeadUsage(model) as usage:
        harness_model = _harness_model(model, tokenizer, settings.batch_size, usage, str(model_path))
        start = time.perf_counter()
        results = evaluate(
            lm=harness_model,
            task_dict=loaded,
            limit=settings.limit,
            bootstrap_iters=settings.bootstrap_iters,
            log_samples=False,
            verbosity="WARNING",
        )
        seconds = time.perf_counter() - start
    fraction, active = usage.fraction(), usage.active_fraction()
    device, dtype = str(model.device), str(model.dtype).removeprefix("torch.")
    del model, harness_model
    return {
        "model": str(model_path),
        "method": method,
        "device": device,
        "dtype": dtype,
        "seconds": seconds,
        "active_fraction": 1.0 if active is None else active,
        "head_usage": fraction.tolist() if fraction.numel() else None,
        "scores": scores(results),
        "results": results,
    }


def metric_key(name: str, filter_name: str) -> str:
    """``acc`` for the harness's ``acc,none``; ``exact_match,strict-match`` keeps its filter."""
    return name if filter_name == "none" else f"{name},{filter_name}"


def scores(results: dict) -> dict[str, dict[str, float | None]]:
    """Task name -> {metric: value, metric_stderr: value} from the harness's ``results["results"]``."""
    table: dict[str, dict[str, float | None]] = {}
    for task, entries in (results.get("results") or {}).items():
        row: dict[str, float | None] = {}
        for key, value in entries.items():
            name, comma, filter_name = key.partition(",")
            if not comma:  # alias, name, sample_len
                continue
            row[
                stderr_key(metric_key(name[: -len("_stderr")], filter_name))
                if name.endswith("_stderr")
                else metric_key(name, filter_name)
            ] = finite_number(value)
        table[task] = row
    return table


def describe_tasks(results: dict, requested: list[str]) -> dict[str, dict]:
    """Task name -> what the card and the table need of it: alias, output type, few-shot count, items scored,
    dataset (type, name, config, split), metrics (primary first), their direction, and whether it is top-level
    (asked for, not a subtask of a reported group)."""
    configs = results.get("configs") or {}
    children = {child for subtasks in (results.get("group_subtasks") or {}).values() for child in subtasks}
    described = {}
    for task, entries in (results.get("results") or {}).items():
        config = configs.get(task) or {}
        metrics = [
            metric_key(name, filter_name)
            for key in entries
            for name, comma, filter_name in [key.partition(",")]
            if comma and not name.endswith("_stderr")
        ]
        listed = [item.get("metric") for item in config.get("metric_list") or [] if isinstance(item, dict)]
        metrics.sort(key=lambda m: listed.index(m) if m in listed else len(listed))
        directions = (results.get("higher_is_better") or {}).get(task) or {}
        path = config.get("dataset_path")
        local = not path or path in LOCAL_BUILDERS or Path(str(path)).exists()
        split = config.get("test_split") or config.get("validation_split")
        title = (config.get("metadata") or {}).get("title")
        samples = (results.get("n-samples") or {}).get(task) or {}
        described[task] = {
            "alias": str(entries.get("alias", task)).strip(" -") or task,
            "output_type": config.get(
                "output_type", "group" if task in (results.get("group_subtasks") or {}) else None
            ),
            "num_fewshot": (results.get("n-shot") or {}).get(task),
            "samples": samples.get("effective", entries.get("sample_len")),
            "dataset": {
                "type": task if local else str(path),
                "name": str(title or (task if local else path)),
                "config": None if local else config.get("dataset_name"),
                "split": split,
            },
            "metrics": metrics,
            "primary_metric": metrics[0] if metrics else None,
            "higher_is_better": {m: bool(directions.get(m.partition(",")[0], True)) for m in metrics},
            "top_level": task not in children or task in requested,
        }
    return described


def task_recovery(model: dict, reference: dict, tasks: dict[str, dict]) -> dict:
    """The ``recovery`` entry of the benchmarks block: per top-level task, its primary metric's value, the
    reference's and their ratio, oriented so that 1.0 is full recovery and below 1 is worse (value / reference
    for higher-is-better metrics, reference / value otherwise); ``mean_ratio`` is the ratios' geometric mean."""
    block = {}
    for task, info in tasks.items():
        metric = info["primary_metric"]
        if not info["top_level"] or metric is None:
            continue
        value = model["scores"].get(task, {}).get(metric)
        reference_value = reference["scores"].get(task, {}).get(metric)
        block[task] = {
            "metric": metric,
            "value": value,
            "reference_value": reference_value,
            "ratio": ratio(value, reference_value, info["higher_is_better"].get(metric, True)),
        }
    ratios = [entry["ratio"] for entry in block.values()]
    usable = [r for r in ratios if r is not None and r > 0]
    mean = math.exp(math.fsum(map(math.log, usable)) / len(usable)) if usable and len(usable) == len(ratios) else None
    return {"model": model["model"], "reference": reference["model"], "tasks": block, "mean_ratio": mean}


def ratio(value: float | None, reference: float | None, higher_is_better: bool) -> float | None:
    """Recovery of one figure: 1.0 is full, below 1 is worse; None where it cannot be computed."""
    if value is None or reference is None:
        return None
    top, bottom = (value, reference) if higher_is_better else (reference, value)
    return top / bottom if bottom > 0 else None


def prepare_tasks(settings: HarnessSettings, models: Mapping[Path | str, int | None] | None = None) -> dict:
    """Check the harness, the settings, the task files and names, fetch the tasks' data, set their few-shot counts
    and check them against the data and ``models`` (model folder -> its ``max_position_embeddings``, None when not
    known): everything that can fail before a model is loaded. Returns the loaded tasks for
    :func:`run_benchmarks`."""
    harness_version()
    check_task_folders(settings)
    loaded = load_tasks(settings)
    refuse_unsafe([name for name, task in loaded["tasks"].items() if getattr(task, "UNSAFE_CODE", False)])
    configure_tasks(loaded, settings.num_fewshot)
    check_fewshot(loaded, settings, models or {})
    check_context(loaded, settings, models or {})
    return loaded


def check_fewshot(loaded: dict, settings: HarnessSettings, models: Mapping[Path | str, int | None]) -> None:
    """Refuse a few-shot count that a task's examples cannot provide, or that cannot fit in a model's context (each
    example takes a token at least, and the item itself another)."""
    for name, task in loaded["tasks"].items():
        shots = task.get_config("num_fewshot") or 0
        if not shots:
            continue
        given = f"--num-fewshot {shots}" if settings.num_fewshot == shots else f"the {shots}-shot default of {name}"
        sampler = getattr(task, "sampler", None)
        pool = len(sampler.fewshot_docs()) if sampler is not None else 0
        fewshot_split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
        # drawn from the scored split, each item is left out of its own examples
        available = pool - 1 if fewshot_split is not None and fewshot_split == task.config.test_split else pool
        if shots > available:
            raise UpcycleError(
                f"{given}: task {name} has {pool} few-shot examples to draw from"
                f"{' (less the item itself)' if available < pool else ''}; give --num-fewshot {max(available, 0)} "
                "or fewer"
            )
        for model, positions in models.items():
            if positions is not None and shots >= positions:
                raise UpcycleError(
                    f"{given}: {shots} examples and the item cannot fit in the {positions} positions "
                    f"(max_position_embeddings) of {model}; give --num-fewshot {positions - 1} or fewer"
                )


DEFAULT_MAX_GEN_TOKS = 256  # HFLM's max_gen_toks, for tasks whose generation_kwargs set none
GENERATION_BUDGET_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def check_context(loaded: dict, settings: HarnessSettings, models: Mapping[Path | str, int | None]) -> None:
    """Refuse a task a model's context cannot run, which the harness would only find out with the model loaded: an
    answer choice longer than the model's positions (multiple choice) or a generation budget that leaves no room
    for the prompt."""
    from upcycle.tokenizer import load_tokenizer

    for model, positions in models.items():
        if positions is None:
            continue
        tokenizer = None
        for name, task in loaded["tasks"].items():
            if task.OUTPUT_TYPE == "generate_until":
                kwargs = task.config.generation_kwargs or {}
                budget = next((kwargs[key] for key in GENERATION_BUDGET_KEYS if key in kwargs), DEFAULT_MAX_GEN_TOKS)
                if isinstance(budget, int) and budget >= positions:
                    raise UpcycleError(
                        f"task {name} generates up to {budget} tokens, which leaves no room for its prompt in the "
                        f"{positions} positions (max_position_embeddings) of {model}; leave the task out for this "
                        "model"
                    )
            elif task.OUTPUT_TYPE == "multiple_choice" and not getattr(task, "multiple_input", False):
                tokenizer = tokenizer or load_tokenizer(model)
                _check_choices(name, task, settings.limit, tokenizer, model, positions)


CHOICE_BATCH = 256  # items whose answers are tokenised in one call


def _check_choices(name: str, task, limit: float | None, tokenizer, model, positions: int) -> None:
    """One line when an answer choice of the items the harness will score is longer than ``positions`` tokens (the
    answer tokenised alone; the harness model checks the count of the harness's own tokenisation again)."""
    docs = task.eval_docs
    count = len(docs) if limit is None else min(len(docs), math.ceil(len(docs) * limit) if limit < 1 else int(limit))
    delimiter = task.config.target_delimiter
    for start in range(0, count, CHOICE_BATCH):
        answers = [
            (index, f"{delimiter}{choice}")
            for index in range(start, min(start + CHOICE_BATCH, count))
            for choice in task.doc_to_choice(docs[index])
        ]
        encoded = tokenizer([text for _, text in answers], add_special_tokens=False)["input_ids"] if answers else []
        for (index, _), ids in zip(answers, encoded):
            if len(ids) > positions:
                raise UpcycleError(too_long(name, index, len(ids), positions, model))


def too_long(task: str | None, index: int | None, tokens: int, positions: int, model) -> str:
    """The message for an answer the model's context cannot hold."""
    where = f"item {index} of task {task}" if task is not None else "an item"
    return (
        f"{where} has an answer of {tokens} tokens, more than the {positions} positions (max_position_embeddings) "
        f"of {model} can score; leave the task out for this model or evaluate it on a model with a longer context"
    )


def refuse_unsafe(names: list[str]) -> None:
    """One line for tasks that execute what the model writes (the harness's ``unsafe_code``): checked on the task
    index before any data is fetched, and on the loaded tasks for those inside groups."""
    if names:
        raise UpcycleError(
            f"task {', '.join(names)} runs the code the model writes (the harness marks it unsafe), which upcycle "
            "eval does not do; run it with `lm_eval ... --confirm_run_unsafe_code` in a sandbox"
        )


def run_benchmarks(
    model_path: str | Path, reference_path: str | Path | None, settings: HarnessSettings, loaded: dict | None = None
) -> dict:
    """The ``benchmarks`` block of ``eval.json``: the tasks run on ``model_path`` and, when given, on
    ``reference_path`` (same tasks, items and settings), with the accuracy ratios. ``loaded``: what
    :func:`prepare_tasks` returned (prepared here when None)."""
    from upcycle.eval.evaluate import max_positions

    version = harness_version()
    if loaded is None:
        paths = [model_path] if reference_path is None else [model_path, reference_path]
        loaded = prepare_tasks(settings, {path: max_positions(path) for path in paths})
    models = [run_model(model_path, loaded, settings)]
    if reference_path is not None:
        models.append(run_model(reference_path, loaded, settings))
    tasks = describe_tasks(models[0]["results"], settings.tasks)
    for entry in models:
        del entry["results"]
    return {
        "harness": settings.describe(version),
        "tasks": tasks,
        "models": models,
        "recovery": task_recovery(models[0], models[1], tasks) if len(models) > 1 else None,
    }


# ---- printing ------------------------------------------------------------------------------------------


def format_benchmark_table(block: dict) -> str:
    """The benchmarks block as text: per task and metric the value ± stderr (and the compare model's and the ratio),
    the mean ratio, then time, active heads and head usage per model."""
    from upcycle.checkpoint.source import local_name
    from upcycle.eval.evaluate import _columns, _head_usage_lines

    models, tasks, recovery = block["models"], block["tasks"], block.get("recovery")
    header = ["task", "metric", "n-shot", "items", local_name(models[0]["model"])]
    if len(models) > 1:
        header += [f"compare: {local_name(models[1]['model'])}", "ratio"]
    rows = [tuple(header)]
    for task, info in tasks.items():
        for metric in info["metrics"]:
            arrow = "↑" if info["higher_is_better"].get(metric, True) else "↓"
            values = [score_text(m["scores"].get(task, {}), metric) for m in models]
            row = [
                info["alias"] if info["top_level"] else f" - {info['alias']}",
                f"{metric} {arrow}",
                _figure_int(info["num_fewshot"]),
                _figure_int(info["samples"]),
                values[0],
            ]
            if len(models) > 1:
                a, b = (m["scores"].get(task, {}).get(metric) for m in models)
                row += [values[1], figure_text(ratio(a, b, info["higher_is_better"].get(metric, True)))]
            rows.append(tuple(row))
    harness = block.get("harness") or {}
    lines = [f"benchmarks (lm-evaluation-harness {harness.get('lm_eval_version', '?')})", *_columns(rows, 2)]
    if recovery:
        lines.append(f"mean ratio (first metric of each task, geometric mean): {figure_text(recovery['mean_ratio'])}")
        lines.append(
            "ratio = value / compare's value (compare's / value for ↓ metrics): "
            "1.00 is full recovery, below 1 is worse"
        )
    summary = [("model", "method", "seconds", "active")]
    summary += [
        (local_name(m["model"]), m["method"], f"{m['seconds']:.1f}", f"{m['active_fraction']:.3f}") for m in models
    ]
    lines += ["", *_columns(summary, 2)]
    for entry in models:
        if entry.get("head_usage"):
            lines += _head_usage_lines(local_name(entry["model"]), entry["head_usage"], ", over the benchmark tokens")
    return "\n".join(lines)


def _figure_int(value) -> str:
    return "-" if value is None else str(value)
