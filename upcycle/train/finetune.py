"""``upcycle finetune``: resolve the recipe's model and data, (convert,) train, evaluate, report."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import yaml

from ..errors import UpcycleError
from .loop import Trainer, process_state
from .recipe import Recipe


def resolve_model(reference: str) -> Path:
    """A model folder from a path, a Hub id, or ``asset:smollm2-135m``."""
    if reference == "asset:smollm2-135m":
        from ..assets import smollm2_135m

        return smollm2_135m()
    if reference.startswith("asset:"):
        raise UpcycleError(f"model {reference} is not a known asset; the only model asset is asset:smollm2-135m")
    from ..checkpoint.reader import resolve_source

    return resolve_source(reference)


def resolve_text(reference: str | None) -> str | None:
    """Turn ``asset:kjv-train`` and the other text assets into files (for calibration); pass others through."""
    if reference in ("asset:kjv-train", "asset:kjv-heldout"):
        from ..assets import cache_root, write_kjv_files

        train, heldout = write_kjv_files(cache_root() / "kjv")
        return str(train if reference == "asset:kjv-train" else heldout)
    if reference is not None and reference.startswith("asset:"):
        from ..assets import text_asset_file

        return str(text_asset_file(reference.removeprefix("asset:")))
    return reference


def prepare_model(recipe: Recipe, state) -> Path:
    """The folder to tune: the recipe's model, converted first into OUTPUT/converted when asked."""
    source = resolve_model(recipe.model)
    if recipe.convert is None:
        return source
    converted = Path(recipe.output) / "converted"
    with state.main_process_first():
        if state.is_main_process and not (converted / "config.json").exists():
            from ..convert import convert_checkpoint, options_class

            options = recipe.convert.model_dump(exclude={"method"})
            if options.get("calibration") is not None:
                options["calibration"] = Path(resolve_text(str(options["calibration"])))
            method = recipe.convert.method
            convert_checkpoint(str(source), converted, method, options_class(method)(**options), overwrite=False)
    return converted


def resolve_references(recipe: Recipe, model_path: Path) -> tuple[Path | None, Path | None]:
    """(teacher folder, reference folder) of a recipe; ``source`` is the model ``model_path`` was converted from.
    A teacher must share the student's tokenizer (one line otherwise)."""
    from .distill import check_same_tokenizer, resolve_reference

    converted_from = str(resolve_model(recipe.model)) if recipe.convert is not None else None
    teacher = resolve_reference(recipe.teacher, model_path, "teacher", converted_from) if recipe.teacher else None
    if teacher is not None:
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


def run_finetune(recipe: Recipe, *, resume: bool = False, stop_after: int | None = None, overwrite: bool = False) -> Path | None:
    """Run a whole recipe; returns OUTPUT/final, or None when stopped early by ``stop_after``."""
    from transformers import AutoTokenizer

    state = process_state()
    output = Path(recipe.output)
    if not resume and not overwrite and (output / "checkpoints").exists():
        raise UpcycleError(f"{output} already has checkpoints; pass --resume to continue, --overwrite to start again, or choose another output")
    if not resume and not overwrite and (output / "final").exists():
        raise UpcycleError(f"{output}/final already exists; pass --overwrite to replace it or choose another output")
    if overwrite and not resume and state.is_main_process and (output / "checkpoints").exists():
        shutil.rmtree(output / "checkpoints")
    model_path = prepare_model(recipe, state)
    teacher, reference = resolve_references(recipe, model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    corpus = build_data(recipe, tokenizer, state)
    started = time.time()
    trainer = Trainer(recipe, model_path, corpus, resume=resume, stop_after=stop_after, teacher=teacher, reference=reference)
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


def finish_outputs(recipe: Recipe, model_path: Path, final: Path, validation_sets: dict[str, torch.Tensor], summary: dict,
                   reference: Path | None = None) -> None:
    """Evaluate tuned vs untuned on every validation corpus (and the reference model, ``compare`` or the teacher,
    when there is one: the recovery before and after tuning), draw the plots, write the card and report."""
    from ..eval.evaluate import evaluate_corpora, evaluation_json, format_recovery_table, recovery_block
    from ..eval.plots import plot_head_usage, plot_loss_curve

    output = Path(recipe.output)
    corpora = {name: blocks.reshape(-1) for name, blocks in validation_sets.items()}  # name -> token stream [N]
    window = recipe.data.seq_len
    before = [row | {"name": "before tuning"} for row in evaluate_corpora(model_path, corpora, window=window)]
    after = [row | {"name": "after tuning"} for row in evaluate_corpora(final, corpora, window=window)]
    rows, blocks = before + after, None
    if reference is not None:
        reference_rows = [row | {"name": "reference"} for row in evaluate_corpora(reference, corpora, window=window)]
        blocks = [recovery_block(final, reference, list(corpora), after, reference_rows),
                  recovery_block(model_path, reference, list(corpora), before, reference_rows)]
        rows += reference_rows
        print(format_recovery_table({"results": after + reference_rows, "recovery": blocks[0]}))
    (output / "eval.json").write_text(evaluation_json({"results": rows, "recovery": blocks}))
    plot_loss_curve(output / "metrics.jsonl", output / "loss.png")
    if after[0].get("head_usage"):
        plot_head_usage(after[0]["head_usage"], output / "head_usage.png", title="head usage after tuning (fraction of tokens)")

    keep = ("name", "perplexity", "tokens", "window", "active_fraction", "data")
    evaluation = {"results": [{k: r[k] for k in keep if k in r} for r in rows],
                  "recovery": None if blocks is None else [b | {"model": name} for b, name in zip(blocks, ("after tuning", "before tuning"))]}
    finetune = {k: v for k, v in summary.items() if k != "recipe_yaml"} | {"recipe": recipe.model_dump(mode="json")}
    record_tuning(final, model_path, recipe.model, name=output.name, finetune=finetune, evaluation=evaluation)
    print(f"wrote {final}")


def record_tuning(final: Path, source: Path, reference: str, *, name: str, finetune: dict, evaluation: dict | list[dict]) -> None:
    """Write the tuned folder's ``upcycle_report.json`` (the source's conversion record, or a dense one, plus the
    fine-tuning and its evaluation) and its model card. ``reference``: the model as the recipe names it."""
    from ..checkpoint.card import REPORT_FILE, hub_model_id, source_license, write_card, write_text_atomic

    final, source = Path(final), Path(source)
    report_path = next((p for p in (final / REPORT_FILE, source / REPORT_FILE) if p.exists()), None)
    if report_path is not None:
        report = json.loads(report_path.read_text())
    else:
        from ..checkpoint.reader import CheckpointReader

        reader = CheckpointReader(final)
        total = sum(math.prod(reader.info(n).shape) for n in reader.names())
        hub_id = hub_model_id(reference, source, reader.config)
        report = {"method": "dense", "base_model": hub_id or source.name, "base_models": [hub_id] if hub_id else [],
                  "base_license": source_license(source), "parameters": {"before": total, "after": total},
                  "description": "A dense model continue-tuned with upcycle."}
    report |= {"name": name, "finetune": finetune, "evaluation": evaluation}
    write_text_atomic(final / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    write_card(final)
