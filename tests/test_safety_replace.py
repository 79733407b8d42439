"""What `upcycle convert` may write over: only a missing OUT, an empty folder, or (with --overwrite) a folder a
conversion wrote and nothing else; the check holds until the rename; one process at a time writes an OUT; the
current folder is never OUT; unreadable or inconsistent sources are one line before anything is written."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import calibrated_methods, quick_args
from test_safety_output import error_line, run

from upcycle.checkpoint import reader as reader_module
from upcycle.checkpoint.writer import ShardedWriter
from upcycle.paths import lock_file, output_lock


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with the bytes of its regular files (None for folders and other kinds)."""
    return {
        str(path.relative_to(folder)): path.read_bytes() if path.is_file() and not path.is_symlink() else None
        for path in sorted(folder.rglob("*"))
    }


@pytest.fixture
def converted(tmp_path: Path, dense: Path) -> Path:
    out = tmp_path / "out"
    assert run("convert", dense, out).exit_code == 0
    return out


@pytest.mark.parametrize("kind", ["file", "fifo", "symlink to a folder", "symlink to a file"])
def test_out_that_is_not_a_folder_is_never_replaced(tmp_path: Path, dense: Path, kind: str) -> None:
    out = tmp_path / "out"
    target = tmp_path / "target"
    if kind == "file":
        out.write_text("my notes")
    elif kind == "fifo":
        os.mkfifo(out)
    elif kind == "symlink to a folder":
        target.mkdir()
        (target / "thesis.tex").write_text("mine")
        out.symlink_to(target)
    else:
        target.write_text("mine")
        out.symlink_to(target)
    before = snapshot(tmp_path)
    line = error_line(run("convert", dense, out, "--overwrite"))
    assert ("symbolic link" if "symlink" in kind else "is a file, not a folder upcycle wrote") in line, line
    assert snapshot(tmp_path) == before
    assert out.is_symlink() if "symlink" in kind else (out.is_fifo() if kind == "fifo" else out.is_file())


def test_a_folder_upcycle_did_not_write_is_never_replaced(tmp_path: Path, dense: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    (out / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    line = error_line(run("convert", dense, out, "--overwrite"))
    assert "is a folder upcycle did not write (it has no upcycle_report.json)" in line
    assert snapshot(tmp_path) == before


def test_user_files_in_a_conversion_block_overwrite(converted: Path, dense: Path) -> None:
    (converted / "notes.txt").write_text("mine")
    (converted / "plots").mkdir()
    before = snapshot(converted.parent)
    line = error_line(run("convert", dense, converted, "--overwrite"))
    assert "holds files a conversion does not write (notes.txt, plots)" in line and "move them out" in line
    assert snapshot(converted.parent) == before


def test_eval_results_in_a_conversion_do_not_block_overwrite(converted: Path, dense: Path) -> None:
    (converted / "eval.json").write_text('{"results": []}')
    result = run("convert", dense, converted, "--overwrite", "--active-heads", "1.0")
    assert result.exit_code == 0, result.output
    assert not (converted / "eval.json").exists()  # the results of the model it replaced
    assert json.loads((converted / "upcycle_report.json").read_text())["options"]["active_heads"] == 1.0


def test_an_empty_folder_is_written_without_overwrite(tmp_path: Path, dense: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = run("convert", dense, out)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / "upcycle_report.json").is_file()


def test_files_put_into_out_while_converting_are_kept(
    converted: Path, dense: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    close = ShardedWriter.close

    def user_writes_meanwhile(self):
        (converted / "written-meanwhile.txt").write_text("mine")
        return close(self)

    monkeypatch.setattr(ShardedWriter, "close", user_writes_meanwhile)
    before_report = (converted / "upcycle_report.json").read_bytes()
    line = error_line(run("convert", dense, converted, "--overwrite"))
    assert "written-meanwhile.txt" in line and "changed while this run wrote its output" in line
    assert (converted / "written-meanwhile.txt").read_text() == "mine"
    assert (converted / "upcycle_report.json").read_bytes() == before_report
    assert [p.name for p in converted.parent.iterdir() if ".upcycle-" in p.name] == []


def test_out_created_while_converting_is_kept(tmp_path: Path, dense: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    close = ShardedWriter.close

    def user_creates_out_meanwhile(self):
        out.mkdir()
        (out / "mine.txt").write_text("mine")
        return close(self)

    monkeypatch.setattr(ShardedWriter, "close", user_creates_out_meanwhile)
    line = error_line(run("convert", dense, out))
    assert "changed while this run wrote its output" in line or "appeared while this run wrote" in line
    assert snapshot(out) == {"mine.txt": b"mine"}


def test_out_locked_by_another_process_is_refused(tmp_path: Path, dense: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out):
        line = error_line(run("convert", dense, out))
    assert f"another upcycle process (pid {os.getpid()}) is writing OUT {out}" in line
    assert not out.exists()
    assert not lock_file(out).exists()  # the holder removes it
    assert run("convert", dense, out).exit_code == 0  # free again


SLOW_CONVERT = """import sys, time
import upcycle.checkpoint.writer as w
check = w.ShardedWriter._check_next
def slow(self, *args, **kwargs):
    time.sleep(0.05)
    return check(self, *args, **kwargs)
w.ShardedWriter._check_next = slow
from upcycle.cli import run
sys.argv = ["upcycle", *sys.argv[1:]]
run()
"""


def test_two_processes_converting_into_one_out(tmp_path: Path, dense: Path) -> None:
    script = tmp_path / "slow.py"
    script.write_text(SLOW_CONVERT)
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, str(script), "convert", str(dense), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not lock_file(out).exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, first.communicate()
    second = subprocess.run(
        [sys.executable, "-m", "upcycle", "convert", str(dense), str(out)], capture_output=True, text=True
    )
    _, first_stderr = first.communicate(timeout=300)
    assert first.returncode == 0, first_stderr
    assert second.returncode == 1, second.stderr
    assert [line for line in second.stderr.splitlines() if line.strip()] == [
        f"error: another upcycle process (pid {first.pid}) is writing OUT {out}; wait for it to finish, or write to "
        "another output"
    ]
    assert (out / "upcycle_report.json").is_file() and not lock_file(out).exists()


def test_killed_holder_leaves_no_stuck_lock(tmp_path: Path, dense: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from upcycle.paths import output_lock\n"
            f"with output_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert lock_file(out).exists()  # a SIGKILL cannot remove it; the kernel released the lock
    result = run("convert", dense, out)
    assert result.exit_code == 0, result.output
    assert not lock_file(out).exists()


@pytest.mark.parametrize("spelling", [".", "{t}", "{t}/.."])
def test_the_current_folder_is_never_out(tmp_path: Path, dense: Path, monkeypatch, spelling: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "upcycle_report.json").write_text("{}")  # even one that looks like upcycle's
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    line = error_line(run("convert", dense, spelling.format(t=work), "--overwrite"))
    assert "is the current folder" in line
    assert snapshot(tmp_path) == before


def test_unreadable_source_file_is_one_line(tmp_path: Path, dense: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open

    def refusing(file, *args, **kwargs):
        if str(file).endswith("model.safetensors"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(reader_module, "open", refusing, raising=False)
    line = error_line(run("convert", dense, tmp_path / "out"))
    assert f"cannot read {dense / 'model.safetensors'} (Permission denied)" in line
    assert not (tmp_path / "out").exists()


def rewrite_header(file: Path, edit) -> None:
    """Apply ``edit`` to a safetensors file's JSON header in place (same length, padded with spaces)."""
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    assert len(encoded) <= length
    file.write_bytes(data[:8] + encoded.ljust(length) + data[8 + length :])


def test_overlapping_tensor_data_is_refused(tmp_path: Path, dense: Path) -> None:
    def alias_head_to_embeddings(header: dict) -> None:
        head, embed = header["lm_head.weight"], header["model.embed_tokens.weight"]
        start = min(head["data_offsets"][0], embed["data_offsets"][0])
        size = head["data_offsets"][1] - head["data_offsets"][0]
        head["data_offsets"] = embed["data_offsets"] = [start, start + size]

    rewrite_header(dense / "model.safetensors", alias_head_to_embeddings)
    line = error_line(run("convert", dense, tmp_path / "out"))
    assert "model.safetensors is truncated or corrupted" in line and "overlaps the tensor before it" in line


def test_integer_weight_is_refused(tmp_path: Path, dense: Path) -> None:
    def as_int32(header: dict) -> None:
        header["model.layers.0.self_attn.q_proj.weight"]["dtype"] = "I32"  # same bytes per element as F32

    from safetensors.torch import load_file, save_file

    tensors = load_file(dense / "model.safetensors")
    save_file({k: v.float() for k, v in tensors.items()}, dense / "model.safetensors", metadata={"format": "pt"})
    rewrite_header(dense / "model.safetensors", as_int32)
    line = error_line(run("convert", dense, tmp_path / "out"))
    assert "tensor model.layers.0.self_attn.q_proj.weight has dtype int32" in line and "floating point" in line


def test_missing_head_and_extra_tensor_are_refused_before_writing(tmp_path: Path, dense: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(dense / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "lm_head.weight"}, dense / "model.safetensors")
    line = error_line(run("convert", dense, tmp_path / "out"))
    assert "lacks tensor lm_head.weight" in line and "tie_word_embeddings false" in line
    assert "report this as a bug" not in line and not (tmp_path / "out").exists()

    save_file(
        tensors | {"model.layers.0.mlp.extra.weight": tensors["lm_head.weight"].clone()}, dense / "model.safetensors"
    )
    line = error_line(run("convert", dense, tmp_path / "out"))
    assert "holds tensor model.layers.0.mlp.extra.weight, which a llama model does not have" in line
    assert not (tmp_path / "out").exists()


def test_ffn_top_k_zero_is_refused(tmp_path: Path, dense: Path) -> None:
    line = error_line(
        run("convert", dense, tmp_path / "out", "--method", "bam", "--expert", dense, "--ffn-top-k", "0")
    )
    assert "--ffn-top-k 0 is outside [1, 2]" in line


@pytest.mark.parametrize("method", calibrated_methods())
def test_calibration_budget_without_calibration_is_refused(tmp_path: Path, dense: Path, method: str) -> None:
    result = run("convert", dense, tmp_path / "out", *quick_args(method), "--calibration-tokens", "512")
    assert error_line(result) == (
        "error: --calibration-tokens applies only with --calibration; pass --calibration too, or drop "
        "--calibration-tokens"
    )


@pytest.mark.parametrize("method", ["moh --router fitted", "prune-heads --ratio 0.5", "mhe --init calibrated"])
def test_calibration_that_is_not_a_file_is_named_so(tmp_path: Path, dense: Path, method: str) -> None:
    args = ["convert", dense, tmp_path / "out", "--method", *method.split(), "--calibration", "/dev/null"]
    line = error_line(run(*args))
    assert line == "error: --calibration /dev/null is not a regular file or folder; pass a .txt/.jsonl file"
