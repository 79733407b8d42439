"""Every command, and every conversion option that loads data, run once as a user runs it: the installed ``upcycle``
program in a new process, spelled as the README spells it. In-process tests share one interpreter whose imports are
already warm; a new process is where start-up order, background imports and exit codes show (a calibrated
conversion once failed only there)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_clip, build_dense

from upcycle.methods import method_names, method_spec


def upcycle_program() -> Path:
    """The ``upcycle`` script installed beside the interpreter running the tests (a venv's, or the system's)."""
    beside = Path(sys.executable).parent / "upcycle"
    found = beside if beside.is_file() else shutil.which("upcycle")
    assert found, "no upcycle program is installed for this Python: run `bash install.sh`"
    return Path(found)


UPCYCLE = upcycle_program()


def upcycle(*args, cwd: Path, timeout: int = 600, expect: int = 0) -> subprocess.CompletedProcess:
    """Run ``upcycle ARGS`` in a new process; its exit code must be ``expect`` and it never prints a traceback."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [str(UPCYCLE), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    shown = f"upcycle {' '.join(map(str, args))}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert result.returncode == expect, shown
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, shown
    return result


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """A folder with a tiny text model (byte-level tokenizer), a copy as a BAM expert, and English calibration text."""
    root = tmp_path_factory.mktemp("as-users-run-it")
    build_dense(root / "dense", text=True)
    build_dense(root / "expert", seed=1, text=True)
    words = "in the beginning was the word and the word was with god and the word was god".split()
    documents = [" ".join(words[(i + j) % len(words)] for j in range(80)) for i in range(60)]
    (root / "cal.txt").write_text("\n\n".join(documents) + "\n")
    return root


CALIBRATION = ["--calibration", "cal.txt", "--calibration-tokens", "1024"]
# every conversion option that reads calibration text, per method that has a --calibration option
DATA_OPTIONS = {
    "moh": [
        ["--router", "learned", *CALIBRATION],
        ["--router", "fitted", "--rescale", "channel", *CALIBRATION],
        ["--shared-selection", "contribution", "--rescale", "layer", *CALIBRATION],
    ],
    "prune-heads": [
        ["--ratio", "0.5", *CALIBRATION],
        ["--ratio", "0.5", "--refit", "lstsq", *CALIBRATION],
        ["--ratio", "0.5", "--refit", "rescale", "--iterative", "2", *CALIBRATION],
    ],
    "gqa": [
        ["--kv-heads", "1", "--refit", "lstsq", *CALIBRATION],
        ["--kv-heads", "1", "--refit", "rescale", *CALIBRATION],
    ],
    "mhe": [["--init", "calibrated", *CALIBRATION]],
}
CASES = [(method, options) for method, variants in DATA_OPTIONS.items() for options in variants]


def test_every_method_that_reads_calibration_text_is_exercised() -> None:
    readers = {name for name in method_names() if method_spec(name).reads_calibration}
    assert readers == set(DATA_OPTIONS), "add the new method's data-loading options to DATA_OPTIONS"


@pytest.mark.parametrize(
    ("method", "options"), CASES, ids=[" ".join([m, *o[: o.index("--calibration")]]) for m, o in CASES]
)
def test_conversions_that_read_calibration_text(place: Path, method: str, options: list[str]) -> None:
    out = "out-" + "-".join([method, *options[: options.index("--calibration")]]).replace("--", "")
    upcycle("convert", "dense", out, "--method", method, *options, cwd=place)
    report = json.loads((place / out / "upcycle_report.json").read_text())
    assert report["method"] == method and report["options"]["calibration"] == ["cal.txt"]
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(place / out, trust_remote_code=True).num_hidden_layers == 2


def test_the_other_commands(place: Path) -> None:
    assert upcycle("--version", cwd=place).stdout.startswith("upcycle ")
    assert "convert" in upcycle("--help", cwd=place).stdout
    assert "smollm2-moh-heal-cpu" in upcycle("recipes", cwd=place).stdout
    assert "kjv_next_verse" in upcycle("tasks", cwd=place).stdout
    assert "dry run: nothing written" in upcycle("convert", "dense", "moh", "--dry-run", cwd=place).stdout
    assert not (place / "moh").exists()

    upcycle("convert", "dense", "moh", cwd=place)
    upcycle("convert", "dense", "bam", "--method", "bam", "--expert", "expert", cwd=place)
    assert json.loads((place / "bam" / "config.json").read_text())["upcycle"]["method"] == "bam"
    assert "moh" in upcycle("inspect", "moh", cwd=place).stdout
    assert json.loads(upcycle("inspect", "moh", "--json", cwd=place).stdout)["plan"]

    upcycle(
        "eval",
        "moh",
        "--data",
        "cal.txt",
        "--tokens",
        "256",
        "--compare",
        "source",
        "--json",
        "moh/eval.json",
        cwd=place,
    )
    upcycle("eval", "moh", "--tasks", "kjv_next_verse", "--limit", "4", "--json", "moh/eval.json", cwd=place)
    assert json.loads((place / "moh" / "eval.json").read_text())["benchmarks"]
    upcycle("card", "moh", "--base-model", "HuggingFaceTB/SmolLM2-135M", cwd=place)
    assert "HuggingFaceTB/SmolLM2-135M" in (place / "moh" / "README.md").read_text()
    assert "dry run: nothing was uploaded" in upcycle("push", "moh", "me/moh", "--dry-run", cwd=place).stdout


@pytest.mark.parametrize(
    "args",
    [["convert", "dense", "x", "--no-such-flag"], ["convert", "dense", "x", "--method", "nope"], ["evaluate"]],
    ids=["unknown flag", "bad choice", "unknown command"],
)
def test_a_usage_error_is_one_line_and_exit_1(place: Path, args: list[str]) -> None:
    result = upcycle(*args, cwd=place, expect=1)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], result.stderr


def test_clip_moe_conversion(tmp_path: Path) -> None:
    build_clip(tmp_path / "clip")
    for stage in (1, 2):
        build_clip(tmp_path / f"stage-{stage}", base=tmp_path / "clip", ffn_noise=0.01, seed=stage)
    upcycle(
        "convert",
        "clip",
        "clip-moe",
        "--method",
        "clip-moe",
        "--expert",
        "stage-1",
        "--expert",
        "stage-2",
        cwd=tmp_path,
    )
    assert json.loads((tmp_path / "clip-moe" / "config.json").read_text())["upcycle"]["method"] == "clip-moe"


def test_finetune_with_a_calibrated_conversion(place: Path) -> None:
    recipe = {
        "model": "dense",
        "output": "run",
        "convert": {"method": "moh", "router": "fitted", "calibration": "cal.txt", "calibration_tokens": 1024},
        "data": {"train": "cal.txt", "seq_len": 32, "validation_fraction": 0.1, "validation_tokens": 64},
        "training": {"steps": 2, "global_batch_tokens": 64, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 1},
    }
    (place / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    upcycle("finetune", "tiny.yaml", cwd=place)
    assert (place / "run" / "final" / "upcycle_report.json").is_file()
    assert (
        json.loads((place / "run" / "converted" / "upcycle_report.json").read_text())["options"]["router"] == "fitted"
    )


EARLY_SIGNAL = """import os, signal, sys
import upcycle.checkpoint.source as source
opened = source.open_source
def signal_then_open(*args, **kwargs):
    os.kill(os.getpid(), int(os.environ["SEND_SIGNAL"]))  # while the model code is still being imported beside
    return opened(*args, **kwargs)
source.open_source = signal_then_open
import upcycle.convert
upcycle.convert.open_source = signal_then_open
from upcycle.cli import run
sys.argv = ["upcycle", *sys.argv[1:]]
run()
"""


@pytest.mark.parametrize(
    ("signum", "code", "line"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")]
)
def test_an_early_signal_exits_cleanly(tmp_path: Path, dense: Path, signum: int, code: int, line: str) -> None:
    script = tmp_path / "early.py"
    script.write_text(EARLY_SIGNAL)
    env = os.environ | {"SEND_SIGNAL": str(int(signum))}
    result = subprocess.run(
        [sys.executable, str(script), "convert", str(dense), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == code, result.stderr
    assert [text for text in result.stderr.splitlines() if text.strip()] == [f"{line}: nothing was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "early.py"]


def test_an_early_error_exits_1_not_an_abort(tmp_path: Path, dense: Path) -> None:
    """A one-line error while transformers' modeling code is still being imported in the background."""
    script = tmp_path / "no_space.py"
    script.write_text(
        "import collections, shutil, sys\n"
        "usage = collections.namedtuple('usage', 'total used free')\n"
        "shutil.disk_usage = lambda path: usage(10**6, 10**6 - 1000, 1000)\n"
        "from upcycle.cli import run\n"
        "sys.argv = ['upcycle', *sys.argv[1:]]\n"
        "run()\n"
    )
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, str(script), "convert", str(dense), str(tmp_path / "out")], capture_output=True, text=True
        )
        assert result.returncode == 1, result.stderr
        lines = [text for text in result.stderr.splitlines() if text.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: not enough free space"), result.stderr


TERM_WHILE_SCORING = """import importlib, os, signal, sys
evaluate = importlib.import_module("upcycle.eval.evaluate")
tokens = evaluate.eval_tokens_from_text
def terminated_while_reading(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return tokens(*args, **kwargs)
evaluate.eval_tokens_from_text = terminated_while_reading
from upcycle.cli import run
sys.argv = ["upcycle", *sys.argv[1:]]
run()
"""


def test_sigterm_during_eval_is_one_line_and_exit_143(tmp_path: Path, dense: Path, calibration_file: Path) -> None:
    script = tmp_path / "term.py"
    script.write_text(TERM_WHILE_SCORING)
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, str(script), "eval", str(dense), "--data", str(calibration_file), "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 143, result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        "terminated (SIGTERM): nothing was written"
    ]
    assert not out.exists()


SIGNAL_INSIDE_AN_IMPORT = """import os, signal, sys, time
from pathlib import Path
from upcycle.interrupts import sigterm_as_interrupt
sys.path.insert(0, sys.argv[1])
Path(sys.argv[1], "slow_module.py").write_text(
    "import os, signal, time\\n"
    "os.kill(os.getpid(), signal.SIGTERM)\\n"
    "time.sleep(0.3)  # the rest of the module runs all the same\\n"
    "COMPLETE = True\\n"
)
try:
    with sigterm_as_interrupt():
        import slow_module
        time.sleep(5)
    print("not interrupted")
except KeyboardInterrupt as interrupt:
    print(type(interrupt).__name__, getattr(sys.modules.get("slow_module"), "COMPLETE", False))
"""


def test_a_signal_inside_an_import_lands_after_it(tmp_path: Path) -> None:
    """A module whose import a signal cut in half stays broken for every later import of it (numpy, transformers):
    the signal is held until the import is over, then raised."""
    script = tmp_path / "inside_import.py"
    script.write_text(SIGNAL_INSIDE_AN_IMPORT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["Terminated", "True"], result.stdout + result.stderr


SIGNAL_BEFORE_THE_COMMAND_RUNS = """import importlib.abc, os, signal, sys


class SignalOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "upcycle.train.finetune":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), int(os.environ["SEND_SIGNAL"]))  # lands once the import is over
        return None


sys.meta_path.insert(0, SignalOnImport())
from upcycle.cli import run
sys.argv = ["upcycle", *sys.argv[1:]]
run()
"""


@pytest.mark.parametrize(
    ("signum", "code", "line"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")]
)
def test_a_signal_while_a_command_starts_is_one_line(tmp_path: Path, signum: int, code: int, line: str) -> None:
    """The command's own imports run before its body's error handling: typer alone would exit 130 without a word."""
    script = tmp_path / "early.py"
    script.write_text(SIGNAL_BEFORE_THE_COMMAND_RUNS)
    env = os.environ | {"SEND_SIGNAL": str(int(signum))}
    result = subprocess.run(
        [sys.executable, str(script), "finetune", "smollm2-moh-cpu"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == code, result.stderr
    assert [text for text in result.stderr.splitlines() if text.strip()] == [f"{line}: nothing was written"]
