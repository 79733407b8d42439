"""finetune's safety promises: resume never unpickles, outputs never swallow inputs or foreign folders, non-finite
training fails loudly, interrupted saves and runs leave a way on, and bad settings are one line."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_dense
from test_finetune import write_recipe
from typer.testing import CliRunner

from upcycle.cli import app
from upcycle.errors import UpcycleError
from upcycle.train.checkpoints import latest_checkpoint
from upcycle.train.finetune import run_finetune
from upcycle.train.loop import Trainer
from upcycle.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path, calibration_file):
    return tmp_path, build_dense(tmp_path / "dense"), calibration_file


def finetune(*args: str):
    return CliRunner().invoke(app, ["finetune", *map(str, args)])


def error_line(result) -> str:
    """The one ``error:`` line of a failed command (progress bars and warnings may come before it)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1, (result.exit_code, result.stderr[-2000:], result.exception)
    assert result.stderr.rstrip("\n").endswith(lines[0])
    return lines[0]


def strict_json(line: str):
    """json.loads that refuses NaN / Infinity (not JSON)."""

    def refuse(name):
        raise ValueError(f"{name} in JSON output")

    return json.loads(line, parse_constant=refuse)


class Planted:
    """A pickle whose loading creates ``marker`` (what an attacker's ``__reduce__`` could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ---- 1. resume never unpickles ---------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "optimizer.pt"])
def test_resume_never_runs_a_pickle_planted_in_the_checkpoint(tiny, planted):
    """accelerate's load_state would unpickle custom_checkpoint_0.pkl; upcycle reads only its own files, weights
    only."""
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data, training__eval_every=0)
    assert run_finetune(load_recipe(str(recipe)), stop_after=2) is None
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    marker = tmp_path / "pwned"
    torch.save(Planted(marker), checkpoint / planted)
    result = finetune(recipe, "--resume")
    assert not marker.exists()
    line = error_line(result)
    assert str(checkpoint) in line and "--overwrite" in line
    assert not (tmp_path / "run" / "final").exists()
    (checkpoint / planted).unlink()
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    assert not [
        p for p in files if p.suffix in (".pkl", ".bin")
    ]  # upcycle's own files: JSON, safetensors, weights-only .pt
    for file in files:
        if file.suffix == ".pt":
            torch.load(file, weights_only=True)


# ---- 2 and 3. the output folder ------------------------------------------------------------------


@pytest.mark.parametrize("case", ["model folder", "data inside", "compare inside"])
def test_inputs_inside_the_output_are_refused_even_with_overwrite(tiny, case):
    tmp_path, dense, data = tiny
    if case == "model folder":
        recipe, kept = write_recipe(tmp_path, dense, data, output=str(dense)), dense / "config.json"
    elif case == "data inside":
        (tmp_path / "out").mkdir()
        kept = tmp_path / "out" / "data.txt"
        kept.write_text(data.read_text())
        recipe = write_recipe(tmp_path, dense, kept, output=str(tmp_path / "out"))
    else:
        kept = build_dense(tmp_path / "out" / "reference") / "config.json"
        recipe = write_recipe(tmp_path, dense, data, output=str(tmp_path / "out"), compare=str(kept.parent))
    before = sorted(p.name for p in kept.parent.iterdir())
    line = error_line(finetune(recipe, "--overwrite"))
    assert "inside" in line
    assert (
        kept.is_file() and sorted(p.name for p in kept.parent.iterdir()) == before
    )  # nothing deleted, nothing written


def test_an_existing_output_needs_overwrite_or_resume(tiny):
    tmp_path, dense, data = tiny
    out = tmp_path / "mine"
    out.mkdir()
    (out / "eval.json").write_text('{"mine": true}\n')
    recipe = write_recipe(tmp_path, dense, data, output=str(out))
    assert "already exists" in error_line(finetune(recipe))
    assert "no complete checkpoint" in error_line(finetune(recipe, "--resume"))
    assert "--resume" in error_line(finetune(recipe, "--resume", "--overwrite"))
    (out / "notes.txt").write_text("keep me\n")
    assert "notes.txt" in error_line(
        finetune(recipe, "--overwrite")
    )  # --overwrite would delete what finetune never wrote
    assert (
        sorted(p.name for p in out.iterdir()) == ["eval.json", "notes.txt"]
        and (out / "eval.json").read_text() == '{"mine": true}\n'
    )


# ---- 6. non-finite training ----------------------------------------------------------------------


def test_a_diverging_run_stops_without_a_final_model(tiny):
    tmp_path, dense, data = tiny
    recipe = write_recipe(
        tmp_path,
        dense,
        data,
        training__steps=8,
        training__eval_every=0,
        training__warmup_steps=0,
        training__lr=1e30,
        training__min_lr=1e29,
    )
    assert "'training.lr'" in error_line(finetune(recipe, "training.lr=.inf"))  # not a number a recipe may hold
    result = finetune(recipe)
    line = error_line(result)
    assert "not finite" in line and "step" in line
    assert result.stderr.count("warning: step") == 3
    run = tmp_path / "run"
    assert not (run / "final").exists()
    records = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [r["step"] for r in records][-3:]
    assert all(r["loss"] is None or r["grad_norm"] is None for r in records if r.get("skipped"))  # NaN written as null


def test_non_finite_weights_are_never_saved(tiny, monkeypatch):
    tmp_path, dense, data = tiny
    original = Trainer.save_final

    def poisoned(self):
        with torch.no_grad():
            next(self.accelerator.unwrap_model(self.model).parameters()).view(-1)[0] = float("inf")
        return original(self)

    monkeypatch.setattr(Trainer, "save_final", poisoned)
    recipe = write_recipe(tmp_path, dense, data, training__steps=1, training__eval_every=0)
    with pytest.raises(UpcycleError, match="not finite"):
        run_finetune(load_recipe(str(recipe)))
    assert not (tmp_path / "run" / "final").exists()


# ---- 8 and 9. interrupted saves and runs ---------------------------------------------------------


def interrupt_rename_of(monkeypatch, name: str) -> None:
    """Stand-in for a kill while checkpoint ``name`` is being saved: Ctrl-C arrives just before its rename."""
    rename = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise KeyboardInterrupt
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_kill_during_the_first_checkpoint_save_is_no_dead_end(tiny, monkeypatch):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data, training__eval_every=0, training__save_every=2)
    interrupt_rename_of(monkeypatch, "step-0000002")
    with pytest.raises(KeyboardInterrupt):
        run_finetune(load_recipe(str(recipe)))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert latest_checkpoint(run) is None
    assert "--overwrite" in error_line(finetune(recipe, "--resume"))
    assert "has checkpoints" not in error_line(finetune(recipe))
    assert finetune(recipe, "--overwrite").exit_code == 0 and (run / "final").is_dir()


def test_ctrl_c_says_what_was_kept_and_resume_logs_each_step_once(tiny, monkeypatch):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data, training__steps=6, training__eval_every=0, training__save_every=2)
    interrupt_rename_of(monkeypatch, "step-0000004")  # steps 3 and 4 are logged, their checkpoint never completes
    result = finetune(recipe)
    monkeypatch.undo()
    run = tmp_path / "run"
    assert result.exit_code == 130
    line = result.stderr.strip().splitlines()[-1]
    assert "nothing was written" not in line and "checkpoint step 2" in line and "metrics.jsonl" in line
    assert line.endswith(f"continue with: upcycle finetune {recipe} --resume")
    assert finetune(recipe, "--resume").exit_code == 0
    assert [strict_json(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert not list((run / "checkpoints").glob(".step-*"))  # the interrupted save's leftovers are gone


def test_sigterm_is_handled_like_ctrl_c(tiny):
    tmp_path, dense, data = tiny
    recipe = write_recipe(
        tmp_path,
        dense,
        data,
        training__steps=100000,
        training__eval_every=0,
        training__save_every=1,
        training__log_every=1000,
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "upcycle", "finetune", str(recipe)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while latest_checkpoint(tmp_path / "run") is None and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr[-2000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("terminated (SIGTERM): kept checkpoint step") and line.endswith("--resume")


# ---- 11. one line, not a traceback -----------------------------------------------------------------


@pytest.mark.parametrize(
    "case, needle",
    [
        ("betas", "training.adam_betas"),
        ("batch split", "global_batch_tokens"),
        ("no tokenizer", "tokenizer"),
        ("positions", "max_position_embeddings"),
    ],
)
def test_bad_settings_are_one_line(tiny, case, needle):
    tmp_path, dense, data = tiny
    model, overrides = dense, []
    if case == "betas":
        overrides = ["training.adam_betas=[2,3]"]
    elif case == "batch split":
        overrides = ["training.global_batch_tokens=48"]  # 3 sequences of 16: not whole micro-batches of 2
    elif case == "no tokenizer":
        model = build_dense(tmp_path / "bare")
        for file in model.iterdir():
            if "token" in file.name:
                file.unlink()
    else:
        overrides = ["data.seq_len=512", "training.global_batch_tokens=1024", "data.validation_tokens=1024"]
    recipe = write_recipe(tmp_path, model, data)
    result = finetune(recipe, *overrides)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, (result.stderr[-2000:], result.exception)
    assert needle in result.stderr and result.stderr.startswith("error:")
    assert not (tmp_path / "run").exists()
    if case == "batch split":  # checked with the recipe, before any data is read
        with pytest.raises(UpcycleError, match="global_batch_tokens"):
            load_recipe(str(recipe), overrides)


# ---- 12. one run at a time per output -------------------------------------------------------------------

HOLDER = """
import sys, time
from upcycle.train import loop

save = loop.Trainer.save_checkpoint


def save_then_hang(self):
    path = save(self)
    time.sleep(600)  # a run still writing its output (killed by the test)
    return path


loop.Trainer.save_checkpoint = save_then_hang
from upcycle.cli import main

sys.exit(main(["finetune", sys.argv[1]]))
"""


def test_a_second_run_into_the_same_output_fails_at_once_and_a_killed_run_leaves_no_stuck_lock(tiny):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data, training__eval_every=0, training__save_every=2)
    run = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(recipe)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 300
        while latest_checkpoint(run) is None and holder.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert latest_checkpoint(run) is not None, holder.stderr.read().decode()[-2000:] if holder.poll() else ""
        metrics = (run / "metrics.jsonl").read_bytes()
        for flags in (["--resume"], ["--overwrite"]):
            line = error_line(finetune(recipe, *flags))
            assert f"another upcycle process (pid {holder.pid}) is writing output {run}" in line
        assert (run / "metrics.jsonl").read_bytes() == metrics and latest_checkpoint(run).name == "step-0000002"
        assert not (run / "final").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.communicate(timeout=60)
    result = finetune(recipe, "--resume")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert [strict_json(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (run / "final" / "config.json").is_file() and not list(tmp_path.glob(".run.*"))


def test_a_clip_recipe_takes_the_output_lock_too(tmp_path):
    from upcycle.paths import output_lock

    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "text": "a"}\n')
    (tmp_path / "clip").mkdir()
    recipe = tmp_path / "clip.yaml"
    recipe.write_text(
        f"type: clip\nmodel: {tmp_path / 'clip'}\noutput: {tmp_path / 'run'}\n"
        f"data: {{train: {tmp_path / 'pairs.jsonl'}}}\n"
    )
    with output_lock(tmp_path / "run", what="output"):
        line = error_line(finetune(recipe))
    assert f"is writing output {tmp_path / 'run'}" in line and not (tmp_path / "run").exists()


def test_missing_parent_folders_of_the_output_are_created(tiny):
    tmp_path, dense, data = tiny
    output = tmp_path / "runs" / "new" / "run"
    recipe = write_recipe(tmp_path, dense, data, training__steps=1, training__eval_every=0, output=str(output))
    result = finetune(recipe)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert (output / "final" / "config.json").is_file()


def refuse_writes_under(monkeypatch, folder: Path, code: int) -> None:
    """Stand-in for a read-only mount at ``folder``: creating a folder or a file inside it fails with ``code``."""
    mkdir, open_ = os.mkdir, os.open

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).absolute().is_relative_to(folder)

    def refused_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return mkdir(path, *args, **kwargs)

    def refused_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return open_(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refused_mkdir)
    monkeypatch.setattr(os, "open", refused_open)


@pytest.mark.parametrize("case", ["parent is a file", "deeper under a file", "read-only", "read-only, new parent"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tiny, monkeypatch, case):
    tmp_path, dense, data = tiny
    (tmp_path / "notes.txt").write_text("keep me\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    output = {
        "parent is a file": tmp_path / "notes.txt" / "run",
        "deeper under a file": tmp_path / "notes.txt" / "a" / "run",
        "read-only": ro / "run",
        "read-only, new parent": ro / "new" / "run",
    }[case]
    recipe = write_recipe(tmp_path, dense, data, training__steps=1, training__eval_every=0, output=str(output))
    if case.startswith("read-only"):
        refuse_writes_under(monkeypatch, ro, errno.EROFS)
    line = error_line(finetune(recipe))
    assert str(output) in line
    assert ("read-only" in line) if case.startswith("read-only") else ("is a file" in line)
    assert (tmp_path / "notes.txt").read_text() == "keep me\n" and list(ro.iterdir()) == []


# ---- 13. a full disk, leftovers of a failed save ---------------------------------------------------------


def test_a_full_disk_at_a_checkpoint_save_is_one_line_and_leaves_no_temp_folder(tiny, monkeypatch):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data, training__steps=6, training__eval_every=0, training__save_every=2)
    save = torch.save

    def full_at_step_4(obj, path, *args, **kwargs):
        if ".step-0000004" in str(path):
            Path(path).write_bytes(b"PK\x03\x04 partial")  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_4)
    line = error_line(finetune(recipe))
    monkeypatch.undo()
    run = tmp_path / "run"
    assert "No space left on device" in line and "step 4" in line and "--resume" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]
    result = finetune(recipe, "--resume")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert [strict_json(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("leftover", [".step-0000004.tmp", ".step-0000002.tmp", ".step-0000002.old"])
def test_resume_cleans_up_what_an_unfinished_save_left_and_says_so(tiny, leftover):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data, training__eval_every=0)
    assert run_finetune(load_recipe(str(recipe)), stop_after=2) is None
    checkpoints = tmp_path / "run" / "checkpoints"
    if leftover == ".step-0000004.tmp":  # a later save that never finished, beside a complete checkpoint
        (checkpoints / leftover).mkdir()
        (checkpoints / leftover / "model.safetensors").write_bytes(b"partial")
    elif leftover == ".step-0000002.tmp":  # the first save never finished: nothing to resume from
        os.replace(checkpoints / "step-0000002", checkpoints / leftover)
    else:  # killed between the two renames of a save of the same step: the complete checkpoint moved aside
        os.replace(checkpoints / "step-0000002", checkpoints / leftover)
    result = finetune(recipe, "--resume")
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and leftover in notes[0], result.stderr[-2000:]
    assert not list(checkpoints.glob(".step-*"))
    if leftover == ".step-0000002.tmp":
        assert "no complete checkpoint" in error_line(result) and "--overwrite" in error_line(result)
        assert "note:" not in finetune(recipe, "--resume").stderr  # nothing left to clean up
    else:
        assert result.exit_code == 0, result.stderr[-2000:]
        assert (tmp_path / "run" / "final" / "config.json").is_file()


# ---- 14. pickled weights, recipe files ---------------------------------------------------------------------


def with_pickled_weights(folder: Path, planted: Path | None = None) -> Path:
    """``folder``'s weights as a pytorch_model.bin; with ``planted``: a pickle that would create that file."""
    from safetensors.torch import load_file

    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights | ({"extra": Planted(planted)} if planted else {}), folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize("role", ["model", "teacher", "compare"])
def test_pickled_weights_load_as_tensors_only_and_a_pickle_with_code_is_one_line(tiny, role):
    tmp_path, dense, data = tiny
    marker = tmp_path / "pwned"
    hostile = with_pickled_weights(build_dense(tmp_path / "hostile"), marker)
    extra = {"teacher": str(hostile), "losses__distill": 1.0} if role == "teacher" else {}
    extra |= {"compare": str(hostile)} if role == "compare" else {}
    recipe = write_recipe(
        tmp_path, hostile if role == "model" else dense, data, training__steps=1, training__eval_every=0, **extra
    )
    line = error_line(finetune(recipe))
    assert line.startswith(f"error: {role} ") and str(hostile / "pytorch_model.bin") in line
    assert "safetensors" in line and not marker.exists() and not (tmp_path / "run").exists()
    plain = with_pickled_weights(build_dense(tmp_path / "plain"))
    result = finetune(recipe, f"{role}={plain}")
    assert result.exit_code == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("description: caf\u00e9\nmodel: x\n".encode("latin-1"))
    line = error_line(finetune(recipe))
    assert str(recipe) in line and "UTF-8" in line
    with pytest.raises(UpcycleError, match="UTF-8"):
        load_recipe(str(recipe))


def test_the_trust_remote_code_hint_is_an_override_finetune_takes(tiny):
    tmp_path, dense, data = tiny
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModelForCausalLM": "evil.Evil"}}))
    recipe = write_recipe(tmp_path, dense, data)
    line = error_line(finetune(recipe))
    assert "trust_remote_code=true" in line and "--set" not in line


# ---- 15. interruptions are not data errors ------------------------------------------------------------------


@pytest.mark.parametrize("signal_kind", ["SIGTERM", "Ctrl-C"])
def test_an_interrupt_while_the_data_is_read_is_an_interruption(tiny, monkeypatch, signal_kind):
    import importlib

    import datasets

    from upcycle.checkpoint.writer import Terminated

    tmp_path, dense, data = tiny
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    text_builder = importlib.import_module("datasets.packaged_modules.text.text").Text

    def interrupted(self, *args, **kwargs):
        raise Terminated(signal.SIGTERM) if signal_kind == "SIGTERM" else KeyboardInterrupt
        yield

    monkeypatch.setattr(text_builder, "_generate_tables", interrupted)
    result = finetune(write_recipe(tmp_path, dense, data))
    assert result.exit_code == (143 if signal_kind == "SIGTERM" else 130), result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("terminated (SIGTERM)" if signal_kind == "SIGTERM" else "interrupted")
    assert "error:" not in result.stderr and "cannot read" not in result.stderr


# ---- 16. resume with the recipe it was written with -----------------------------------------------------------


def test_resume_refuses_a_changed_recipe_naming_the_keys(tiny):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data, training__eval_every=0, training__save_every=2)
    assert run_finetune(load_recipe(str(recipe)), stop_after=2) is None
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    line = error_line(finetune(recipe, "--resume", "training.steps=6", "training.lr=0.002"))
    assert "training.steps" in line and "4" in line and "6" in line
    assert "training.lr" in line and "0.001" in line and "0.002" in line
    assert "--overwrite" in line and "same recipe" in line
    for changed in (["data.seq_len=8", "training.global_batch_tokens=32"], ["data.validation_tokens=64"]):
        line = error_line(finetune(recipe, "--resume", *changed))
        assert all(change.split("=")[0] in line for change in changed)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    # what only changes how often the run logs, evaluates or saves, and where the folder is, may differ
    moved = tmp_path / "moved"
    os.replace(run, moved)
    result = finetune(
        recipe, "--resume", f"output={moved}", "training.log_every=2", "training.eval_every=4", "training.save_every=3"
    )
    assert result.exit_code == 0, result.stderr[-2000:]
    assert (moved / "final" / "config.json").is_file()


def test_a_hostile_optimizer_state_is_named_without_torch_advice(tiny):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data, training__eval_every=0)
    assert run_finetune(load_recipe(str(recipe)), stop_after=2) is None
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    torch.save({"state": Planted(tmp_path / "pwned")}, checkpoint / "optimizer.pt")
    line = error_line(finetune(recipe, "--resume"))
    assert not (tmp_path / "pwned").exists()
    assert "optimizer.pt is not a plain tensor file" in line and "pickled objects" in line and "--overwrite" in line
    assert "weights_only" not in line and "Re-running" not in line and "torch.load" not in line


# ---- 17. values a run cannot use -----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [-3, 0])
def test_stop_after_below_one_step_is_refused(tiny, steps):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data)
    line = error_line(finetune(recipe, "--stop-after", str(steps)))
    assert f"--stop-after {steps}" in line and not (tmp_path / "run").exists()
    with pytest.raises(UpcycleError, match="--stop-after"):
        run_finetune(load_recipe(str(recipe)), stop_after=steps)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.validation_tokens=0", "validation_tokens"),
        ("data.validation_fraction=0", "validation_fraction"),
        ("data.validation_tokens=8", "validation_tokens"),  # less than one block of 16
    ],
)
def test_a_recipe_without_validation_text_is_refused_before_training(tiny, override, key):
    tmp_path, dense, data = tiny
    recipe = write_recipe(tmp_path, dense, data)
    line = error_line(finetune(recipe, override))
    assert key in line and not (tmp_path / "run").exists()
    with pytest.raises(UpcycleError, match=key):
        load_recipe(str(recipe), [override])


def test_a_calibration_budget_without_calibration_text_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    (tmp_path / "x.txt").write_text("w1 w2 w3\n")
    recipe.write_text(
        f"model: {tmp_path}\noutput: {tmp_path / 'out'}\ndata:\n  train: {tmp_path / 'x.txt'}\n"
        "training:\n  steps: 2\n  global_batch_tokens: 1024\n  micro_batch_size: 2\n"
    )
    with pytest.raises(UpcycleError) as refused:
        load_recipe(str(recipe), ["convert.method=moh", "convert.calibration_tokens=4096"])
    assert str(refused.value) == (
        "recipe key 'convert.calibration_tokens' applies only with convert.calibration; set convert.calibration too, "
        "or drop convert.calibration_tokens"
    )
    loaded = load_recipe(
        str(recipe),
        ["convert.method=moh", "convert.calibration_tokens=4096", f"convert.calibration={tmp_path / 'x.txt'}"],
    )
    assert loaded.convert.calibration_tokens == 4096
