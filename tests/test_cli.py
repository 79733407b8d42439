"""The command line: every bad input is one clear line, a non-zero exit, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from upcycle.checkpoint import writer as writer_module
from upcycle.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "upcycle" in p.name or p.name == "out")


def test_missing_path(tmp_path):
    result = run("convert", tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("convert", tmp_path / "empty", tmp_path / "out"), "config.json")
    assert leftovers(tmp_path) == []


def test_unsupported_architecture(tmp_path, dense):
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    assert_one_line_error(run("convert", dense, tmp_path / "out"), "'gpt2'", "llama, mistral, qwen2, qwen3")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("active", ["0.4", "0.5", "1.5", "0"])
def test_active_heads_outside_range(tmp_path, dense, active):
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--active-heads", active), "--active-heads", "(shared fraction, 1]"
    )
    assert leftovers(tmp_path) == []


def test_shared_heads_leaving_no_routed_head(tmp_path, dense):
    result = run("convert", dense, tmp_path / "out", "--shared-heads", "8", "--active-heads", "0.75")
    assert_one_line_error(result, "no routed head")
    assert leftovers(tmp_path) == []


def test_out_exists_without_overwrite_then_with(tmp_path, dense):
    out = tmp_path / "out"
    assert run("convert", dense, out).exit_code == 0
    first = (out / "upcycle_report.json").read_text()
    assert_one_line_error(run("convert", dense, out), "already exists", "--overwrite")
    assert (out / "upcycle_report.json").read_text() == first
    assert run("convert", dense, out, "--overwrite", "--active-heads", "1.0").exit_code == 0
    assert json.loads((out / "upcycle_report.json").read_text())["options"]["active_heads"] == 1.0
    assert leftovers(tmp_path) == ["out"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors(tmp_path, dense, damage):
    weights = dense / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 64 + data[64:])
    assert_one_line_error(run("convert", dense, tmp_path / "out"), "model.safetensors")
    assert leftovers(tmp_path) == []


def test_already_converted(tmp_path, dense):
    assert run("convert", dense, tmp_path / "moh").exit_code == 0
    assert_one_line_error(
        run("convert", tmp_path / "moh", tmp_path / "again"), "already an upcycle moh model", "llama"
    )
    assert not (tmp_path / "again").exists()


def test_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run("convert", "some-org/some-model", tmp_path / "out"), "some-org/some-model")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_nothing(tmp_path, dense, monkeypatch, failure):
    calls = []

    def failing(original):
        def method(self, *args):
            calls.append(args[0])
            if len(calls) == 5:
                raise failure
            return original(self, *args)

        return method

    for name in ["write", "copy_from"]:
        monkeypatch.setattr(writer_module.ShardedWriter, name, failing(getattr(writer_module.ShardedWriter, name)))
    result = run("convert", dense, tmp_path / "out")
    assert result.exit_code != 0 and len(calls) == 5
    assert leftovers(tmp_path) == []
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, dense):
    result = run("convert", dense, tmp_path / "out", "--dry-run", "--router", "learned")
    assert result.exit_code == 0
    assert "active heads per token: 6/8 = 0.7500 (4 shared + top-2 of 4 routed)" in result.stdout
    assert "+1,280 new" in result.stdout and "output size" in result.stdout and "nothing written" in result.stdout
    assert leftovers(tmp_path) == []


def test_inspect_dense_and_converted(tmp_path, dense):
    dense_info = run("inspect", dense)
    assert dense_info.exit_code == 0
    assert "family llama" in dense_info.stdout and "heads: 8  kv heads: 2  head dim: 8" in dense_info.stdout
    assert (
        "86,336" in dense_info.stdout and "float32" in dense_info.stdout and "model.safetensors" in dense_info.stdout
    )
    assert run("convert", dense, tmp_path / "moh").exit_code == 0
    converted = run("inspect", tmp_path / "moh", "--json")
    info = json.loads(converted.stdout)
    assert info["method"] == "moh" and info["family"] == "llama" and len(info["plan"]) == 2
    assert "query-norm router" in run("inspect", tmp_path / "moh").stdout
    assert_one_line_error(run("inspect", tmp_path / "nope"), "does not exist")


def test_report_says_where_the_conversion_spent_its_time(tmp_path, dense):
    assert run("convert", dense, tmp_path / "moh").exit_code == 0
    report = json.loads((tmp_path / "moh" / "upcycle_report.json").read_text())
    phases = report["timings"]
    assert [name.split()[0] for name in phases] == ["plan", "write", "plan,", "config,", "checks"]  # weight-norm:
    # the scores are computed beside the copies
    assert all(seconds >= 0 for seconds in phases.values())
    assert len(report["checks"]) == 3 and all(check["seconds"] >= 0 for check in report["checks"])
    assert (
        sum(check["seconds"] for check in report["checks"])
        <= phases["checks (each check's seconds are beside it)"] + 0.01
    )


def test_help_explains_every_command():
    top = run("--help")
    assert top.exit_code == 0 and "LLaMA-family decoders, BERT encoders, CLIP" in " ".join(top.stdout.split())
    assert run("--version").stdout.startswith("upcycle 0.")
    help_text = run("convert", "--help").stdout
    for option in [
        "--router",
        "--shared-heads",
        "--active-heads",
        "--shared-selection",
        "--calibration",
        "--shard-size",
        "--overwrite",
        "--dry-run",
    ]:
        assert option in help_text


def test_unknown_shared_selection_needs_calibration(tmp_path, dense):
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--shared-selection", "contribution"), "--calibration"
    )
    assert leftovers(tmp_path) == []


def test_eval_compares_two_models_on_the_same_tokens(tmp_path, dense, calibration_file):
    assert run("convert", dense, tmp_path / "moh").exit_code == 0
    result = run(
        "eval",
        tmp_path / "moh",
        "--data",
        calibration_file,
        "--compare",
        dense,
        "--tokens",
        "600",
        "--window",
        "64",
        "--json",
        tmp_path / "eval.json",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["moh", "dense"] and rows[0]["tokens"] == rows[1]["tokens"] == 599
    assert rows[0]["active_fraction"] == 0.75 and rows[1]["active_fraction"] == 1.0
    assert "ratio = perplexity / compare's perplexity" in result.stdout
    assert_one_line_error(run("eval", tmp_path / "nope", "--data", calibration_file), "does not exist")
