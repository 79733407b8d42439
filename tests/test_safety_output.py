"""`upcycle convert` never loses or half-writes anything: inputs inside OUT are refused, killed runs' temp folders are
cleaned up by the next run, SIGTERM cleans up like Ctrl-C, and a full, read-only or impossible destination is one
line."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import build_dense
from typer.testing import CliRunner

from upcycle.checkpoint import writer as writer_module
from upcycle.checkpoint.writer import OWNER_FILE, Terminated, atomic_output, recover_output
from upcycle.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The one stderr line of a refused command (after any `note:` lines)."""
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".upcycle-" in p.name)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def leftover(parent: Path, out: str, tag: str, pid: int | None, size: int = 4096, suffix: str = "deadbeef") -> Path:
    """A temp or old folder as a killed run leaves it (an owner file naming ``pid`` when given)."""
    folder = parent / f".{out}.upcycle-{tag}-{suffix}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    if pid is not None:
        (folder / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return folder


@pytest.fixture
def place(tmp_path: Path, dense: Path) -> Path:
    """tmp/parent holding a model (src), calibration text and a file of the user's; tmp/expert; tmp/afile (a file)."""
    parent = tmp_path / "parent"
    shutil.copytree(dense, parent / "src")
    (parent / "c.txt").write_text("w1 w2 w3 w4\n\nw5 w6 w7\n")
    (parent / "keep.txt").write_text("mine")
    shutil.copytree(dense, tmp_path / "expert")
    (tmp_path / "afile").write_text("not a folder")
    build_dense(tmp_path / "dense4", num_attention_heads=4, num_key_value_heads=2)
    return tmp_path


# (command args, exit code, stderr pattern, paths that must exist afterwards, paths that must not)
CATALOGUE = {
    "SRC inside OUT": (
        ["convert", "{t}/parent/src", "{t}/parent", "--overwrite"],
        1,
        r"SRC .*parent/src is inside OUT .*--overwrite would delete",
        ["parent/src/config.json", "parent/src/model.safetensors", "parent/keep.txt", "parent/c.txt"],
        [],
    ),
    "expert inside OUT": (
        ["convert", "{t}/dense", "{t}/parent", "--overwrite", "--method", "bam", "--expert", "{t}/parent/src"],
        1,
        r"--expert .*parent/src is inside OUT",
        ["parent/src/config.json", "parent/keep.txt"],
        [],
    ),
    "calibration inside OUT": (
        [
            "convert",
            "{t}/dense",
            "{t}/parent",
            "--overwrite",
            "--method",
            "prune-heads",
            "--ratio",
            "0.25",
            "--calibration",
            "{t}/parent/c.txt",
        ],
        1,
        r"--calibration .*parent/c.txt is inside OUT",
        ["parent/c.txt", "parent/keep.txt"],
        [],
    ),
    "calibration is OUT": (
        [
            "convert",
            "{t}/dense",
            "{t}/parent/c.txt",
            "--overwrite",
            "--method",
            "prune-heads",
            "--ratio",
            "0.25",
            "--calibration",
            "{t}/parent/c.txt",
        ],
        1,
        r"--calibration .*is inside OUT",
        ["parent/c.txt"],
        [],
    ),
    "OUT inside an expert": (
        ["convert", "{t}/dense", "{t}/expert/moh", "--method", "bam", "--expert", "{t}/expert"],
        1,
        r"OUT .*expert/moh is inside --expert",
        ["expert/config.json"],
        ["expert/moh"],
    ),
    "parent is a file": (
        ["convert", "{t}/dense", "{t}/afile/out"],
        1,
        r"cannot create .*afile/out: .*afile is a file, not a folder",
        ["afile"],
        [],
    ),
    "ancestor is a file": (
        ["convert", "{t}/dense", "{t}/afile/x/out"],
        1,
        r"afile is a file, not a folder",
        ["afile"],
        [],
    ),
    "shared heads nan": (
        ["convert", "{t}/dense", "{t}/out", "--shared-heads", "nan"],
        1,
        r"--shared-heads 'nan' is not a finite number",
        [],
        ["out"],
    ),
    "shared heads inf": (
        ["convert", "{t}/dense", "{t}/out", "--shared-heads", "inf"],
        1,
        r"--shared-heads 'inf' is not a finite number",
        [],
        ["out"],
    ),
    "active heads nan": (
        ["convert", "{t}/dense", "{t}/out", "--active-heads", "nan"],
        1,
        r"--active-heads nan is not a finite number",
        [],
        ["out"],
    ),
    "ratio inf": (
        ["convert", "{t}/dense", "{t}/out", "--method", "prune-heads", "--ratio", "inf"],
        1,
        r"--ratio inf is not a finite number",
        [],
        ["out"],
    ),
    "all heads shared, active 1.0": (
        ["convert", "{t}/dense4", "{t}/out", "--shared-heads", "4", "--active-heads", "1.0"],
        1,
        r"all 4 heads shared, which leaves no routed head.*--shared-heads 2",
        [],
        ["out"],
    ),
    "all heads shared as a fraction": (
        ["convert", "{t}/dense4", "{t}/out", "--shared-heads", "1.0", "--active-heads", "1.0"],
        1,
        r"no routed head",
        [],
        ["out"],
    ),
}


@pytest.mark.parametrize("case", CATALOGUE)
def test_catalogue(place: Path, case: str) -> None:
    args, code, pattern, present, absent = CATALOGUE[case]
    before = {p.relative_to(place) for p in place.rglob("*")}
    result = run(*[arg.format(t=place) for arg in args])
    assert result.exit_code == code, result.output
    assert re.search(pattern, error_line(result)), result.stderr
    for path in present:
        assert (place / path).exists(), path
    for path in absent:
        assert not (place / path).exists(), path
    assert {p.relative_to(place) for p in place.rglob("*")} == before  # nothing created, nothing deleted
    assert not any(".upcycle-" in p.name for p in place.rglob("*"))


# --- what killed runs leave behind, and what the next run does with it


def test_rerun_removes_temp_folder_of_dead_process_only(tmp_path: Path, dense: Path) -> None:
    stale = leftover(tmp_path, "out", "tmp", dead_pid(), size=1 << 20)
    live = leftover(
        tmp_path, "out", "tmp", os.getppid(), suffix="0a1b2c3d"
    )  # the process that started pytest is alive
    result = run("convert", dense, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"removed {stale}" in result.stderr
    assert hidden(tmp_path) == [live.name] and (live / "model.safetensors").exists()
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / OWNER_FILE).exists()


def test_temp_folder_without_owner_removed_only_when_abandoned(tmp_path: Path, dense: Path) -> None:
    fresh = leftover(tmp_path, "out", "tmp", None)
    result = run("convert", dense, tmp_path / "out")
    assert result.exit_code == 0 and "left" in result.stderr and fresh.exists()
    stale = time.time() - 2 * writer_module.ABANDONED_AFTER_S
    for path in [fresh, *fresh.rglob("*")]:
        os.utime(path, (stale, stale))
    result = run("convert", dense, tmp_path / "out", "--overwrite")
    assert result.exit_code == 0, result.output
    assert hidden(tmp_path) == []


def test_rerun_recovers_out_moved_aside_by_killed_run(tmp_path: Path, dense: Path) -> None:
    old = leftover(tmp_path, "out", "old", None)  # a kill between the two renames: OUT missing, its old copy aside
    (old / "upcycle_report.json").write_text('{"method": "moh", "note": "the previous output"}')
    result = run("convert", dense, tmp_path / "out")
    assert result.exit_code == 1
    assert re.search(r"already exists; pass --overwrite", error_line(result))
    assert re.search(r"note: recovered .*out from \.out\.upcycle-old-", result.stderr)
    assert "the previous output" in (tmp_path / "out" / "upcycle_report.json").read_text()
    assert hidden(tmp_path) == []


def test_rerun_removes_old_copy_when_out_exists(tmp_path: Path, dense: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "upcycle_report.json").write_text('{"method": "moh", "note": "current"}')
    leftover(tmp_path, "out", "old", None)
    result = run("convert", dense, tmp_path / "out")
    assert result.exit_code == 1 and "already exists" in error_line(result)
    assert "current" in (tmp_path / "out" / "upcycle_report.json").read_text() and hidden(tmp_path) == []


def test_old_copy_left_alone_while_a_live_run_writes(tmp_path: Path) -> None:
    old = leftover(tmp_path, "out", "old", None)
    live = leftover(tmp_path, "out", "tmp", os.getppid())
    assert recover_output(tmp_path / "out", log=lambda line: None) == []
    assert hidden(tmp_path) == sorted([old.name, live.name]) and not (tmp_path / "out").exists()


SLOW = """import runpy, sys, time
import upcycle.checkpoint.writer as w
check = w.ShardedWriter._check_next
def slow(self, *args, **kwargs):
    time.sleep(0.5)  # widen the write so the signal lands in it
    return check(self, *args, **kwargs)
w.ShardedWriter._check_next = slow
sys.argv = ["upcycle", *sys.argv[1:]]
runpy.run_module("upcycle", run_name="__main__", alter_sys=True)
"""


def convert_and_signal(tmp_path: Path, dense: Path, signum: int) -> subprocess.CompletedProcess | None:
    """Run `python -m upcycle convert` (writes slowed down), send ``signum`` once its temp folder is being written;
    None when it finished before that (then nothing is asserted about the signal)."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, str(script), "convert", str(dense), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        if any((temp / "model.safetensors").exists() for temp in tmp_path.glob(".out.upcycle-tmp-*")):
            process.send_signal(signum)
            break
        time.sleep(0.02)
    else:
        process.kill()
        process.communicate()
        return None
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_sigterm_mid_write_leaves_nothing(tmp_path: Path, dense: Path) -> None:
    result = convert_and_signal(tmp_path, dense, signal.SIGTERM)
    if result is None:
        pytest.skip("the conversion finished before it could be signalled")
    assert hidden(tmp_path) == []
    if result.returncode == 0:  # the signal landed after the rename: a complete output
        assert (tmp_path / "out" / "config.json").exists()
        return
    assert result.returncode == 143, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["terminated (SIGTERM): nothing was written"], result.stderr
    assert not (tmp_path / "out").exists()


def test_sigkill_mid_write_is_cleaned_by_the_rerun(tmp_path: Path, dense: Path) -> None:
    result = convert_and_signal(tmp_path, dense, signal.SIGKILL)
    if result is None or result.returncode == 0:
        pytest.skip("the conversion finished before it could be killed")
    assert result.returncode == -signal.SIGKILL
    assert hidden(tmp_path), "a SIGKILL cannot clean up: its temp folder is what the rerun must remove"
    again = run("convert", dense, tmp_path / "out")
    assert again.exit_code == 0, again.output
    assert "note: removed" in again.stderr
    assert hidden(tmp_path) == [] and (tmp_path / "out" / "config.json").exists()


def test_sigterm_inside_atomic_output_removes_temp_keeps_old(tmp_path: Path) -> None:
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("SIGTERM already has a handler in this process")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(Terminated):
        with atomic_output(out, overwrite=True) as temp:
            (temp / "new.txt").write_text("new")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"


# --- a destination that cannot take the output


def test_not_enough_free_space(tmp_path: Path, dense: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    result = run("convert", dense, tmp_path / "new" / "deep" / "out")
    assert result.exit_code == 1
    line = error_line(result)
    assert re.search(
        rf"not enough free space for .*new/deep/out: it needs about [\d.]+ MB .* "
        rf"but {re.escape(str(tmp_path))}(/new/deep)? has 1.0 kB free",
        line,
    ), line
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()  # with the space there, the same command makes the missing parents (mkdir -p)
    assert run("convert", dense, tmp_path / "new" / "deep" / "out").exit_code == 0
    assert (tmp_path / "new" / "deep" / "out" / "config.json").exists() and hidden(tmp_path / "new" / "deep") == []


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "Permission denied"),
        (errno.EDQUOT, "quota"),
    ],
)
def test_disk_error_while_writing(
    tmp_path: Path, dense: Path, monkeypatch: pytest.MonkeyPatch, code: int, needle: str
) -> None:
    def failing(self, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self.shard_files[0]))

    monkeypatch.setattr(writer_module.ShardedWriter, "copy_from", failing)
    monkeypatch.setattr(writer_module.ShardedWriter, "write", failing)
    result = run("convert", dense, tmp_path / "a" / "b" / "out")
    assert result.exit_code == 1
    line = error_line(result)
    assert needle.lower() in line.lower() and "model.safetensors" in line and "nothing was written" in line, line
    assert not (tmp_path / "a").exists()  # neither the temp folder nor the parents made for it


def test_unwritable_parent(tmp_path: Path, dense: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "locked"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: make the permission check say no
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda path, mode, **kw: False if Path(path) == parent else real(path, mode, **kw)
        )
    else:
        parent.chmod(0o555)
    try:
        result = run("convert", dense, parent / "out")
    finally:
        parent.chmod(0o755)
    assert result.exit_code == 1
    assert re.search(
        r"cannot create .*locked/out: .*locked is not writable by you .*write OUT to a folder you can write to",
        error_line(result),
    )
    assert list(parent.iterdir()) == []
