"""finetune's safety promises: resume never unpickles, outputs never swallow inputs or foreign folders, non-finite
training fails loudly, interrupted saves and runs leave a way on, and bad settings are one line."""

from __future__ import annotations

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
from upcycle.train.finetune import run_finetune
from upcycle.train.loop import Trainer, latest_checkpoint
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
