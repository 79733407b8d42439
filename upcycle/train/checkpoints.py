"""upcycle's training checkpoints: what a checkpoint folder holds, how it is written, checked and read back.

Checkpoints are upcycle's own files, never pickles: ``trainer_state.json`` (step, scheduler state, the file list, the
recipe), ``model.safetensors``, ``optimizer.pt`` (read back with ``torch.load(weights_only=True)``),
``rng-RANK.safetensors``; under FSDP accelerate's per-rank ``.bin`` shards (also read with ``weights_only=True``)
instead of the model and optimizer files. Each is written into ``checkpoints/.step-N.tmp`` and renamed into place when
complete; a save that fails (a full disk) removes its temp folder, and ``--resume`` removes what a killed one left.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from ..errors import UpcycleError
from ..files import json_text
from .recipe import Recipe

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_FORMAT = 2  # 1: accelerate's save_state (pickles), no longer read
MODEL_FILE, OPTIMIZER_FILE = "model.safetensors", "optimizer.pt"
FSDP_MODEL, FSDP_OPTIMIZER = "fsdp_model", "fsdp_optimizer"  # folders of accelerate's FSDP state (per-rank .bin)
FSDP_FILE = re.compile(rf"({FSDP_MODEL}|{FSDP_OPTIMIZER})/[A-Za-z0-9_.-]+\.bin")


def rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def latest_checkpoint(output: Path) -> Path | None:
    """The last complete checkpoint (``checkpoints/step-N`` with its ``trainer_state.json``); temp folders of an
    interrupted save (``.step-N.tmp``) never count."""
    found = [
        p
        for p in (Path(output) / CHECKPOINTS).glob("step-*")
        if re.fullmatch(r"step-\d+", p.name) and p.is_dir() and (p / TRAINER_STATE).is_file()
    ]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def recover_checkpoints(output: Path) -> list[str]:
    """Clean up after a save that was killed or failed: remove ``checkpoints/.step-N.tmp`` (never complete), and put
    back a ``.step-N.old`` whose replacement never arrived (else remove it). Returns one line per thing done."""
    notes = []
    for leftover in sorted((Path(output) / CHECKPOINTS).glob(".step-*")):
        whole = leftover.with_name(leftover.name.removeprefix(".").removesuffix(".old"))
        if leftover.name.endswith(".old") and not whole.exists() and (leftover / TRAINER_STATE).is_file():
            os.replace(leftover, whole)
            notes.append(f"recovered checkpoint {whole} from {leftover.name}, left by a save that was stopped")
        else:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            notes.append(f"removed {leftover}, left by a checkpoint save that did not finish")
    return notes


# Recipe keys that may differ between a checkpoint and the run that resumes it: they change how often the run logs,
# evaluates and saves, its description, and where its folder is, never the weights, the data, its order or the LR
# schedule. Everything else (compare and trust_remote_code too, though they do not change the weights) must be as
# recorded, so that a resumed run is the run that was started.
RESUME_MAY_CHANGE = frozenset(
    {"description", "output", "training.log_every", "training.eval_every", "training.save_every"}
)


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    """A recipe's values by dotted key (lists are values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value}
    return flat


def recipe_changes(recorded: dict, given: dict) -> list[tuple[str, object, object]]:
    """(key, recorded value, given value) of every recipe key that differs and may not (:data:`RESUME_MAY_CHANGE`);
    a key one side lacks has the value ``...``."""
    before, after = _flat(json.loads(json_text(recorded))), _flat(json.loads(json_text(given)))
    return [
        (key, before.get(key, ...), after.get(key, ...))
        for key in sorted(before.keys() | after.keys())
        if key not in RESUME_MAY_CHANGE and before.get(key, ...) != after.get(key, ...)
    ]


def refuse_changed_recipe(checkpoint: Path, state: dict, recipe: Recipe) -> None:
    """One line when the recipe differs from the one ``checkpoint`` records (its ``trainer_state.json`` ``state``) in
    a key that changes the run, naming each key with both values."""

    def shown(value: object) -> str:
        text = "(not set)" if value is ... else json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    recorded = state.get("recipe")
    if not isinstance(recorded, dict):
        raise UpcycleError(
            f"checkpoint {checkpoint} records no recipe in its {TRAINER_STATE}, so it cannot be checked against this "
            "one; start again with --overwrite"
        )
    changes = recipe_changes(recorded, recipe.model_dump(mode="json"))
    if changes:
        listed = "; ".join(f"{key}: {shown(old)} there, {shown(new)} now" for key, old, new in changes[:6])
        more = f"; and {len(changes) - 6} more" if len(changes) > 6 else ""
        raise UpcycleError(
            f"checkpoint {checkpoint} was written with another recipe ({listed}{more}), so the resumed run would not "
            "equal an uninterrupted one; resume with the same recipe and overrides it was written with, or start "
            "again with --overwrite"
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step`` (the checkpoint a run resumes from, which logs the later steps again),
    and drop a line torn by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text("".join(kept))
    os.replace(temp, path)


def read_checkpoint_state(checkpoint: Path, *, processes: int, sharded: bool) -> dict:
    """The checkpoint's ``trainer_state.json``, after checking that the folder holds exactly the files upcycle
    writes for this run's layout (nothing else is ever read: a planted file is refused, not loaded)."""

    def refuse(problem: str, fix: str = "start again with --overwrite") -> UpcycleError:
        return UpcycleError(f"checkpoint {checkpoint} {problem}; {fix}")

    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise refuse(f"has an unreadable {TRAINER_STATE} ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise refuse("was not written by this version of upcycle (an older format, or not upcycle's)")
    step, files = state.get("step"), state.get("files")
    if not isinstance(step, int) or isinstance(step, bool) or step != int(checkpoint.name.split("-")[1]):
        raise refuse(f"records step {step!r}, not the step of its name")
    if state.get("processes") != processes:
        raise refuse(
            f"was written by {state.get('processes')} process(es), this run has {processes}",
            f"resume with {state.get('processes')} process(es)",
        )
    if bool(state.get("sharded")) != sharded:
        raise refuse(
            "was written " + ("with" if state.get("sharded") else "without") + " FSDP",
            "resume with the accelerate configuration it was written with",
        )
    if (
        not isinstance(state.get("scheduler"), dict)
        or not isinstance(files, list)
        or not all(isinstance(f, str) for f in files)
    ):
        raise refuse(f"has an incomplete {TRAINER_STATE}")
    expected = {rng_file(rank) for rank in range(processes)}
    if sharded:
        shards = {f for f in files if FSDP_FILE.fullmatch(f)}
        expected |= shards
        if not any(f.startswith(FSDP_MODEL + "/") for f in shards) or not any(
            f.startswith(FSDP_OPTIMIZER + "/") for f in shards
        ):
            raise refuse("lacks its FSDP model or optimizer shards")
    else:
        expected |= {MODEL_FILE, OPTIMIZER_FILE}
    if set(files) != expected:
        raise refuse(f"lists files upcycle does not write ({', '.join(sorted(set(files) ^ expected)[:3])})")
    folders = {str(Path(f).parent) for f in expected} - {"."}
    present = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*")}
    extra = sorted(present - expected - folders - {TRAINER_STATE})
    missing = sorted(expected - present)
    if extra:
        raise refuse(
            f"holds files upcycle does not write ({', '.join(extra[:3])}), so it was changed after it was written",
            "remove them, or start again with --overwrite",
        )
    if missing:
        raise refuse(f"lacks {', '.join(missing[:3])}")
    return state


class Checkpointing:
    """The trainer's saving and resuming (a mixin of :class:`upcycle.train.loop.Trainer`, which provides
    ``accelerator``, ``model``, ``optimizer``, ``scheduler``, ``recipe``, ``output``, ``step``, ``_sharded`` and
    ``_print``)."""

    def _resume(self) -> None:
        """Load the last complete checkpoint: only the files upcycle writes, tensors only (no pickle is executed)."""
        checkpoint = latest_checkpoint(self.output)
        if checkpoint is None:
            raise UpcycleError(
                f"--resume: no complete checkpoint in {self.output / CHECKPOINTS}; "
                "start again with --overwrite (or without --resume in a new output)"
            )
        from safetensors import SafetensorError

        accelerator = self.accelerator
        state = read_checkpoint_state(checkpoint, processes=accelerator.num_processes, sharded=self._sharded)
        refuse_changed_recipe(checkpoint, state, self.recipe)
        fresh = self.scheduler.state_dict()
        if set(state["scheduler"]) != set(fresh):
            raise UpcycleError(
                f"checkpoint {checkpoint} holds another scheduler state "
                f"({', '.join(sorted(set(state['scheduler']) ^ set(fresh)))}); "
                "start again with --overwrite"
            )
        try:
            if self._sharded:
                from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

                plugin = accelerator.state.fsdp_plugin
                load_fsdp_model(plugin, accelerator, self.model, str(checkpoint / FSDP_MODEL), use_dcp=False)
                load_fsdp_optimizer(
                    plugin, accelerator, self.optimizer, self.model, str(checkpoint / FSDP_OPTIMIZER), use_dcp=False
                )
            else:
                from safetensors.torch import load_model

                device = accelerator.device
                load_model(
                    accelerator.unwrap_model(self.model),
                    str(checkpoint / MODEL_FILE),
                    strict=True,
                    device="cpu" if device.type == "cpu" else str(device),
                )  # safetensors refuses "cpu:0"
                self.optimizer.load_state_dict(
                    torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
                )
            self.scheduler.load_state_dict(state["scheduler"])
            from safetensors.torch import load_file

            rng = load_file(checkpoint / rng_file(accelerator.process_index))
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and accelerator.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], accelerator.device)
        except pickle.UnpicklingError:
            # torch's own message goes on to explain how to load the file without weights_only: never the advice here
            what = f"a file in {FSDP_MODEL}/ or {FSDP_OPTIMIZER}/" if self._sharded else OPTIMIZER_FILE
            raise UpcycleError(
                f"checkpoint {checkpoint}: {what} is not a plain tensor file (it holds pickled objects that upcycle "
                "will not load), so the checkpoint was not written by upcycle or was changed after it was written; "
                "start again with --overwrite"
            ) from None
        except (
            SafetensorError,
            RuntimeError,
            ValueError,
            KeyError,
            TypeError,
            OSError,
        ) as error:
            reason = " ".join(str(error).split())[:200]
            raise UpcycleError(
                f"checkpoint {checkpoint} does not load into this run ({type(error).__name__}: {reason}); "
                "resume with the recipe and model it was written with, or start again with --overwrite"
            ) from None
        self.step = state["step"]
        if accelerator.is_main_process:
            for note in recover_checkpoints(self.output):
                self._print(f"note: {note}")
            truncate_metrics(self.output / "metrics.jsonl", self.step)
        accelerator.wait_for_everyone()
        self._print(f"resumed from {checkpoint} at step {self.step}")

    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler and RNG states into checkpoints/step-N: written into ``.step-N.tmp`` and
        renamed into place once complete, so a kill mid-save never leaves a checkpoint that looks whole."""
        accelerator = self.accelerator
        final = self.output / CHECKPOINTS / f"step-{self.step:07d}"
        temp = final.with_name(f".{final.name}.tmp")
        try:
            self._write_checkpoint(temp)
        except BaseException as error:
            if accelerator.is_main_process:  # a failed or interrupted save leaves nothing behind
                shutil.rmtree(temp, ignore_errors=True)
            if isinstance(error, OSError):
                raise UpcycleError(self._save_failure(error)) from None
            raise
        if accelerator.is_main_process:
            if final.exists():  # the same step saved again (a resumed run stopped at once): swap, never delete first
                old = final.with_name(f".{final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(temp, final)
                shutil.rmtree(old)
            else:
                os.replace(temp, final)
        accelerator.wait_for_everyone()
        return final

    def _save_failure(self, error: OSError) -> str:
        """The one line of a checkpoint save that failed (a full disk, a folder that became read-only)."""
        kept = latest_checkpoint(self.output)
        then = f"continue from {kept.name} with --resume" if kept is not None else "start again with --overwrite"
        return (
            f"could not save the checkpoint of step {self.step} ({error.strerror or error}: "
            f"{error.filename or self.output / CHECKPOINTS}); its unfinished files were removed and training stopped: "
            f"free some space (or make {self.output} writable), then {then}"
        )

    def _write_checkpoint(self, temp: Path) -> None:
        """Every file of a checkpoint into ``temp``, ``trainer_state.json`` last."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            if temp.exists():
                shutil.rmtree(temp)
            for folder in (temp / FSDP_MODEL, temp / FSDP_OPTIMIZER) if self._sharded else (temp,):
                folder.mkdir(parents=True)
        accelerator.wait_for_everyone()
        if self._sharded:  # per-rank files read back with weights_only=True (DCP's metadata would be unpickled)
            from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

            plugin = accelerator.state.fsdp_plugin
            save_fsdp_model(plugin, accelerator, self.model, str(temp / FSDP_MODEL), use_dcp=False)
            save_fsdp_optimizer(
                plugin, accelerator, self.optimizer, self.model, str(temp / FSDP_OPTIMIZER), use_dcp=False
            )
        elif accelerator.is_main_process:  # every process holds the same replica
            from safetensors.torch import save_model

            save_model(accelerator.unwrap_model(self.model), str(temp / MODEL_FILE), force_contiguous=True)
            torch.save(self.optimizer.state_dict(), temp / OPTIMIZER_FILE)
        from safetensors.torch import save_file

        rng = {"cpu": torch.get_rng_state()}
        if accelerator.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(accelerator.device)
        save_file(rng, str(temp / rng_file(accelerator.process_index)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = sorted(str(p.relative_to(temp)) for p in temp.rglob("*") if p.is_file())
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": self.step,
                "processes": accelerator.num_processes,
                "sharded": self._sharded,
                "files": files,
                "scheduler": self.scheduler.state_dict(),
                "recipe": self.recipe.model_dump(mode="json"),
            }
            (temp / TRAINER_STATE).write_text(json_text(state))
