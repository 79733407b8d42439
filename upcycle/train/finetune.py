"""``upcycle finetune``: resolve the recipe's model and data, (convert,) train, evaluate, report."""

from __future__ import annotations

import errno
import fnmatch
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from ..checkpoint.source import resolve_model
from ..errors import UpcycleError
from ..files import json_text
from ..paths import output_lock, probe_writable, refuse_inputs_inside
from ..tokenizer import load_tokenizer
from .checkpoints import CHECKPOINTS, TRAINER_STATE, latest_checkpoint, recover_checkpoints, refuse_changed_recipe
from .loop import FINAL, BatchPlan, Trainer, check_stop_after, process_state
from .recipe import ClipRecipe, Recipe, convert_inputs

# what finetune (and a CLIP recipe) writes into its output folder; --overwrite replaces only a folder holding nothing
# else
OUTPUT_ENTRIES = (
    CHECKPOINTS,
    FINAL,
    "converted",
    "metrics.jsonl",
    "eval.json",
    "loss.png",
    "head_usage.png",
    "stage-*",
    ".*.tmp",
    ".*.upcycle-tmp-*",
    ".*.upcycle-old-*",
    ".*.upcycle-lock",
)


def recipe_inputs(recipe: Recipe | ClipRecipe) -> dict[str, str | None]:
    """The local files and folders a recipe reads (label -> path; Hub ids and assets are skipped by the checks)."""
    from ..data.text import as_sources

    inputs: dict[str, str | None] = {"model": recipe.model, "accelerate_config": recipe.accelerate_config}
    for key in ("train", "validation"):
        sources = as_sources(getattr(recipe.data, key))
        inputs |= {
            f"data.{key}" if len(sources) == 1 else f"data.{key}[{i}]": source for i, source in enumerate(sources)
        }
    for key in ("teacher", "compare"):
        value = getattr(recipe, key, None)
        inputs[key] = None if value == "source" else value
    return inputs | dict(convert_inputs(recipe))


def claim_output(
    recipe: Recipe | ClipRecipe,
    state,
    *,
    resume: bool,
    overwrite: bool,
    inputs: dict[str, Path | str | None] | None = None,
) -> None:
    """The output rule: no input inside it; a new folder, or an existing one with ``--overwrite`` (replaced now, if it
    holds only what finetune writes) or ``--resume`` (a complete upcycle checkpoint in it). Checked on every
    process before any of them changes anything."""
    output = Path(recipe.output)
    refuse_inputs_inside(output, recipe_inputs(recipe) | (inputs or {}), what="output")
    if resume and overwrite:
        raise UpcycleError(
            "--resume continues the run in the output folder and --overwrite replaces it; pass one of them"
        )
    if output.exists() and not output.is_dir():
        raise UpcycleError(f"output {output} is a file; choose a folder")
    if resume:
        if state.is_main_process and (output / CHECKPOINTS).is_dir():
            for note in recover_checkpoints(output):  # an unfinished save never blocks --resume
                print(f"note: {note}", file=sys.stderr, flush=True)
        state.wait_for_everyone()
    checkpoint = latest_checkpoint(output)
    if resume and checkpoint is None:
        raise UpcycleError(
            f"--resume: no complete checkpoint in {output / CHECKPOINTS}; start again with --overwrite"
            if output.exists()
            else f"--resume: output {output} does not exist; start without --resume"
        )
    if resume and isinstance(recipe, Recipe):
        recorded = _recorded_state(checkpoint)
        if recorded is not None:  # an unreadable state is refused in one line when the Trainer reads it
            refuse_changed_recipe(checkpoint, recorded, recipe)
    if not resume and (output.exists() or output.is_symlink()):
        if not overwrite and checkpoint is not None:
            raise UpcycleError(
                f"output {output} has checkpoints (last: {checkpoint.name}); pass --resume to continue, "
                "--overwrite to start again, or choose another output"
            )
        if not overwrite:
            raise UpcycleError(
                f"output {output} already exists; pass --overwrite to replace it, or choose another output"
            )
        foreign = sorted(
            e.name for e in output.iterdir() if not any(fnmatch.fnmatch(e.name, p) for p in OUTPUT_ENTRIES)
        )
        if foreign:
            raise UpcycleError(
                f"output {output} holds files finetune does not write ({', '.join(foreign[:3])}), which --overwrite "
                "would delete; move them away or choose another output"
            )
    state.wait_for_everyone()
    if state.is_main_process and overwrite and output.exists():
        try:
            shutil.rmtree(output)
        except OSError as error:
            raise UpcycleError(
                f"--overwrite could not remove output {output} ({error.strerror or error}: {error.filename}); "
                "check its permissions, or choose another output"
            ) from None
    state.wait_for_everyone()


def _recorded_state(checkpoint: Path) -> dict | None:
    """A checkpoint's ``trainer_state.json`` when it is a readable JSON object, else None."""
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) else None


@contextmanager
def output_held(recipe: Recipe | ClipRecipe, state) -> Iterator[None]:
    """While a run writes its output: the output's parent folder exists (created when missing, and removed again if
    the run fails with nothing in it), the output can be written, and the main process holds the output's lock, so
    that a second run into the same output fails at once with one line. Other processes take no lock: the main
    process stands for the run."""
    from ..checkpoint.writer import output_parent

    output = Path(recipe.output)
    if not state.is_main_process:
        yield
        return
    with output_parent(output):
        _check_writable(output)
        with output_lock(output, what="output"):
            yield


def _check_writable(output: Path) -> None:
    """One line when the output cannot be written (a read-only or unwritable folder), tried with a probe file."""
    folder = output if output.is_dir() else output.absolute().parent
    try:
        probe_writable(folder)
    except OSError as error:
        raise UpcycleError(_unwritable(output, error, folder)) from None


def _unwritable(output: Path, error: OSError, where: Path | None = None) -> str:
    """Why ``output`` cannot be created or written (``where``: the folder tried, else the error's file), and the
    fix."""
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        file = next((p for p in output.absolute().parents if p.exists() and not p.is_dir()), output.parent)
        return f"cannot create output {output}: {file} is a file, not a folder; choose an output under a folder"
    where = where or error.filename or output.parent
    if error.errno == errno.EROFS:
        return (
            f"cannot write output {output}: {where} is on a read-only file system; choose an output on a writable disk"
        )
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write output {output}: no space left in {where}; free some space or choose another disk"
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot write output {output}: {where} is not writable by you; choose an output in a folder you can "
            "write to"
        )
    return f"cannot write output {output} ({error.strerror or error}: {where}); choose another output"


def refuse_folder_code(recipe: Recipe | ClipRecipe, role: str, folder: Path) -> None:
    """A model, teacher or compare folder whose auto_map names code of its own is refused before anything is written,
    unless the recipe sets ``trust_remote_code`` (that code is still never run: the family's standard classes load
    it)."""
    from ..checkpoint.reader import refuse_remote_code

    try:
        refuse_remote_code(
            folder,
            trust_remote_code=recipe.trust_remote_code,
            fix="set trust_remote_code: true in the recipe (or pass the override trust_remote_code=true) to tune it "
            "anyway with the family's standard classes, or remove that auto_map; nothing was written",
        )
    except UpcycleError as error:
        raise UpcycleError(f"{role} {error}") from None


def refuse_pickled_code(role: str, folder: Path) -> None:
    """transformers reads a folder's ``pytorch_model*.bin`` (when it has no safetensors) with
    ``torch.load(weights_only=True)``; each is read that way here first, so that one holding more than tensors is one
    line naming the fix (convert it to safetensors) before anything is written."""
    from ..checkpoint.reader import load_pickled_weights

    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    for file in sorted(folder.glob("pytorch_model*.bin")):
        try:
            load_pickled_weights(file)
        except UpcycleError as error:
            raise UpcycleError(f"{role} {error}") from None


def check_model_folder(recipe: Recipe, source: Path):
    """The model's tokenizer loads and ``data.seq_len`` fits its positions; returns the tokenizer."""
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config = config.get("text_config") or config
        limit = next(
            (
                config[key]
                for key in ("max_position_embeddings", "n_positions", "max_sequence_length")
                if isinstance(config.get(key), int)
            ),
            None,
        )
        if limit is not None and recipe.data.seq_len > limit:
            raise UpcycleError(
                f"data.seq_len {recipe.data.seq_len} is above the model's max_position_embeddings {limit}; "
                f"pass data.seq_len={limit} or less"
            )
    return load_tokenizer(source)


def prepare_model(recipe: Recipe, state, source: Path | None = None) -> Path:
    """The folder to tune: the recipe's model (``source``: already resolved), converted first into OUTPUT/converted
    when asked."""
    source = source or resolve_model(recipe.model)
    if recipe.convert is None:
        return source
    converted = Path(recipe.output) / "converted"
    with state.main_process_first():
        if state.is_main_process and not (converted / "config.json").exists():
            from ..convert import convert_checkpoint
            from ..methods import method_spec

            options = recipe.convert.model_dump(exclude={"method"})  # calibration assets resolve in the method
            method = recipe.convert.method
            convert_checkpoint(str(source), converted, method, method_spec(method).options(**options), overwrite=False)
    return converted


def resolve_references(
    recipe: Recipe, model_path: Path, *, check_tokenizer: bool = True
) -> tuple[Path | None, Path | None]:
    """(teacher folder, reference folder) of a recipe; ``source`` is the model ``model_path`` was converted from.
    A teacher must share the student's tokenizer (one line otherwise; ``check_tokenizer=False``: checked later)."""
    from .distill import check_same_tokenizer, resolve_reference

    converted_from = str(resolve_model(recipe.model)) if recipe.convert is not None else None
    teacher = resolve_reference(recipe.teacher, model_path, "teacher", converted_from) if recipe.teacher else None
    if teacher is not None and check_tokenizer:
        check_same_tokenizer(model_path, teacher)
    reference = recipe.reference()
    if reference is None:
        return teacher, None
    if reference == recipe.teacher:
        return teacher, teacher
    return teacher, resolve_reference(reference, model_path, "compare", converted_from)


def build_data(recipe: Recipe, tokenizer, state):
    from ..data.corpus import DataConfig, build_corpus

    config = DataConfig(**recipe.data.model_dump(), seed=recipe.training.seed)
    with state.main_process_first():  # the main process tokenises and caches, the others read the cache
        return build_corpus(config, tokenizer)


def run_finetune(
    recipe: Recipe, *, resume: bool = False, stop_after: int | None = None, overwrite: bool = False
) -> Path | None:
    """Run a whole recipe; returns OUTPUT/final, or None when stopped early by ``stop_after``."""
    check_stop_after(stop_after)
    state = process_state()
    output = Path(recipe.output)
    BatchPlan.from_recipe(recipe, state.num_processes)  # the step splits over these processes: before any work
    source = resolve_model(recipe.model)
    refuse_folder_code(recipe, "model", source)
    refuse_pickled_code("model", source)
    check_model_folder(recipe, source)
    # a converting recipe tunes OUTPUT/converted (written below); the teacher and compare models resolve without it
    teacher, reference = resolve_references(
        recipe, source if recipe.convert is None else output / "converted", check_tokenizer=False
    )
    for role, folder in (("teacher", teacher), ("compare", reference)):
        if folder is not None:
            refuse_folder_code(recipe, role, folder)
            refuse_pickled_code(role, folder)
    with output_held(recipe, state):
        claim_output(
            recipe,
            state,
            resume=resume,
            overwrite=overwrite,
            inputs={"model": source, "teacher": teacher, "compare": reference},
        )
        return _tune(recipe, state, source, teacher, reference, resume=resume, stop_after=stop_after)


def _tune(
    recipe: Recipe,
    state,
    source: Path,
    teacher: Path | None,
    reference: Path | None,
    *,
    resume: bool,
    stop_after: int | None,
) -> Path | None:
    """The run in a claimed output: (convert,) read the data, train, evaluate and report."""
    from .distill import check_same_tokenizer

    model_path = prepare_model(recipe, state, source)
    tokenizer = load_tokenizer(model_path)
    if teacher is not None:
        load_tokenizer(teacher, "teacher")
        check_same_tokenizer(model_path, teacher)
    corpus = build_data(recipe, tokenizer, state)
    started = time.time()
    trainer = Trainer(
        recipe, model_path, corpus, resume=resume, stop_after=stop_after, teacher=teacher, reference=reference
    )
    final = trainer.run()
    if final is None or not state.is_main_process:
        return final
    seconds = time.time() - started
    summary = {
        "steps": recipe.training.steps,
        "tokens": recipe.training.steps * trainer.plan.sequences_per_step * recipe.data.seq_len,
        "trainable": recipe.trainable,
        "trainable_parameters": trainer.trainable_parameters,
        "processes": trainer.plan.world_size,
        "device": str(trainer.accelerator.device),
        "seconds": seconds,
        "recipe_yaml": yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),
    }
    sets = corpus.validation_sets or {"validation": corpus.validation}
    finish_outputs(recipe, model_path, final, sets, summary, reference)
    return final


def finish_outputs(
    recipe: Recipe,
    model_path: Path,
    final: Path,
    validation_sets: dict[str, torch.Tensor],
    summary: dict,
    reference: Path | None = None,
) -> None:
    """Evaluate tuned vs untuned on every validation corpus (and the reference model, ``compare`` or the teacher,
    when there is one: the recovery before and after tuning), draw the plots, write the card and report."""
    from ..eval.evaluate import evaluate_corpora, format_recovery_table, recovery_block
    from ..eval.plots import plot_head_usage, plot_loss_curve

    output = Path(recipe.output)
    corpora = {name: blocks.reshape(-1) for name, blocks in validation_sets.items()}  # name -> token stream [N]
    window = recipe.data.seq_len
    before = [row | {"name": "before tuning"} for row in evaluate_corpora(model_path, corpora, window=window)]
    after = [row | {"name": "after tuning"} for row in evaluate_corpora(final, corpora, window=window)]
    rows, blocks = before + after, None
    if reference is not None:
        reference_rows = [row | {"name": "reference"} for row in evaluate_corpora(reference, corpora, window=window)]
        blocks = [
            recovery_block(final, reference, list(corpora), after, reference_rows),
            recovery_block(model_path, reference, list(corpora), before, reference_rows),
        ]
        rows += reference_rows
        print(format_recovery_table({"results": after + reference_rows, "recovery": blocks[0]}))
    (output / "eval.json").write_text(json_text({"results": rows, "recovery": blocks}))
    plot_loss_curve(output / "metrics.jsonl", output / "loss.png")
    if after[0].get("head_usage"):
        plot_head_usage(
            after[0]["head_usage"], output / "head_usage.png", title="head usage after tuning (fraction of tokens)"
        )

    keep = ("name", "perplexity", "tokens", "window", "active_fraction", "data")
    evaluation = {
        "results": [{k: r[k] for k in keep if k in r} for r in rows],
        "recovery": None
        if blocks is None
        else [b | {"model": name} for b, name in zip(blocks, ("after tuning", "before tuning"))],
    }
    finetune = {k: v for k, v in summary.items() if k != "recipe_yaml"} | {"recipe": recipe.model_dump(mode="json")}
    record_tuning(final, model_path, recipe.model, name=output.name, finetune=finetune, evaluation=evaluation)
    print(f"wrote {final}")


def record_tuning(
    final: Path, source: Path, reference: str, *, name: str, finetune: dict, evaluation: dict | list[dict]
) -> None:
    """Write the tuned folder's ``upcycle_report.json`` (the source's conversion record, or a dense one, plus the
    fine-tuning and its evaluation) and its model card. ``reference``: the model as the recipe names it."""
    from ..card import REPORT_FILE, write_card
    from ..checkpoint.source import hub_model_id, source_license
    from ..files import write_text_atomic

    final, source = Path(final), Path(source)
    report_path = next((p for p in (final / REPORT_FILE, source / REPORT_FILE) if p.exists()), None)
    if report_path is not None:
        report = json.loads(report_path.read_text())
    else:
        from ..checkpoint.reader import CheckpointReader

        reader = CheckpointReader(final)
        total = sum(math.prod(reader.info(n).shape) for n in reader.names())
        hub_id = hub_model_id(reference, source, reader.config)
        report = {
            "method": "dense",
            "base_model": hub_id or source.name,
            "base_models": [hub_id] if hub_id else [],
            "base_license": source_license(source),
            "parameters": {"before": total, "after": total},
            "description": "A dense model continue-tuned with upcycle.",
        }
    report |= {"name": name, "finetune": finetune, "evaluation": evaluation}
    write_text_atomic(final / REPORT_FILE, json_text(report))
    write_card(final)


def interruption_report(
    recipe: Recipe | ClipRecipe | None, command: list[str], *, signal_name: str = "interrupted"
) -> str:
    """One line after Ctrl-C or SIGTERM: what the output folder keeps and the exact command that continues."""
    if recipe is None or not Path(recipe.output).exists():
        return f"{signal_name}: nothing was written"
    output = Path(recipe.output)
    kept = []
    checkpoint = latest_checkpoint(output) if isinstance(recipe, Recipe) else None
    if checkpoint is not None:
        kept.append(f"checkpoint step {int(checkpoint.name.split('-')[1])} ({checkpoint})")
    kept += [str(output / name) for name in ("final", "converted", "metrics.jsonl") if (output / name).exists()]
    kept += [str(p) for p in sorted(output.glob("stage-*"))]
    if not kept:
        return (
            f"{signal_name}: nothing was kept in {output}; start again with: {shlex.join([*command, '--overwrite'])}"
        )
    flag = "--resume" if checkpoint is not None else "--overwrite"
    action = "continue" if checkpoint is not None else "start again"
    return f"{signal_name}: kept {', '.join(kept)}; {action} with: {shlex.join([*command, flag])}"
