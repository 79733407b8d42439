"""Stream tensors into sharded safetensors files, one tensor in memory at a time."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import socket
import struct
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator

from upcycle.checkpoint.reader import CheckpointReader, dtype_codes
from upcycle.errors import UpcycleError
from upcycle.interrupts import Terminated as Terminated  # re-exported: SIGTERM as an interrupt
from upcycle.interrupts import signals_held, sigterm_as_interrupt

if TYPE_CHECKING:
    import torch
else:
    from ..lazy import torch

SIZE_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}
SUPPORT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.*",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.tiktoken",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "image_processor_config.json",
)


def parse_size(text: str | int) -> int:
    """Parse a byte size such as 5GB (10**9), 1GiB (2**30), 500MB or 1024."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", str(text), re.IGNORECASE)
    if match:
        size = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])
        if size > 0:
            return size
    raise UpcycleError(f"invalid size {text!r}; use a positive size such as 5GB, 500MB or 2GiB")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = self.dtype.itemsize
        for dim in self.shape:
            count *= dim
        return count


class ShardedWriter:
    """Write a known layout of tensors, in order, as transformers-style safetensors shards."""

    def __init__(
        self, folder: Path, layout: list[TensorSpec], max_shard_bytes: int, metadata: dict[str, str] | None = None
    ) -> None:
        self.folder = Path(folder)
        self.layout = [TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in layout]
        names = [spec.name for spec in self.layout]
        if len(set(names)) != len(names):
            raise ValueError("layout has duplicate tensor names")
        for spec in self.layout:
            if spec.dtype not in dtype_codes():
                raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        self.metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError("safetensors metadata keys and values must be strings")
        self.shards = self.plan_shards(self.layout, max_shard_bytes)
        count = len(self.shards)
        self.shard_files = [
            self.folder / ("model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors")
            for i in range(1, count + 1)
        ]
        self._next = 0
        self._shard_index = -1
        self._left_in_shard = 0
        self._handle: BinaryIO | None = None

    @staticmethod
    def plan_shards(layout: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
        """Group the layout greedily into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
        if not layout:
            raise ValueError("layout is empty")
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in layout:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        return shards

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout to its shard."""
        self._check_next(name, tensor.dtype, tuple(tensor.shape))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._handle.write(data.numpy())
        self._advance()

    def write_chunks(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], chunks: Iterable[torch.Tensor]
    ) -> None:
        """Append the next tensor of the layout from consecutive row chunks (so it is never whole in memory)."""
        self._check_next(name, dtype, tuple(shape))
        written = 0
        for chunk in chunks:
            data = chunk.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
            if data.numel():
                self._handle.write(data.numpy())
            written += data.numel()
        expected = math.prod(shape) * dtype.itemsize
        if written != expected:
            raise ValueError(f"{name}: chunks held {written} bytes, expected {expected}")
        self._advance()

    def copy_from(self, reader: CheckpointReader, name: str, source_name: str | None = None) -> None:
        """Append tensor `source_name` (default `name`) of `reader` unchanged, copying file to file in the kernel."""
        info = reader.info(source_name or name)
        source = reader.byte_range(info.name)
        if source is None:
            self.write(name, reader.get(info.name))
            return
        self._check_next(name, info.dtype, info.shape)
        self._handle.flush()
        with open(source[0], "rb") as src:
            _copy_range(src.fileno(), self._handle.fileno(), source[1], info.nbytes)
        self._advance()

    def _check_next(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if self._next >= len(self.layout):
            raise ValueError(f"{name}: every tensor of the layout was already written")
        spec = self.layout[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name} next but got {name}")
        if dtype != spec.dtype:
            raise ValueError(f"{name}: expected dtype {spec.dtype} but got {dtype}")
        if shape != spec.shape:
            raise ValueError(f"{name}: expected shape {spec.shape} but got {shape}")
        if self._left_in_shard == 0:
            self._open_next_shard()

    def _advance(self) -> None:
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._handle.close()
            self._handle = None

    def _open_next_shard(self) -> None:
        self._shard_index += 1
        specs = self.shards[self._shard_index]
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for spec in specs:
            header[spec.name] = {
                "dtype": dtype_codes()[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.shard_files[self._shard_index], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._left_in_shard = len(specs)

    def close(self) -> list[Path]:
        """Check that the whole layout was written, write the index if sharded, and return the files."""
        if self._next != len(self.layout):
            self.abort()
            raise ValueError(
                f"only {self._next} of {len(self.layout)} tensors were written; "
                f"next expected {self.layout[self._next].name}"
            )
        if len(self.shard_files) == 1:
            return list(self.shard_files)
        weight_map = {spec.name: file.name for specs, file in zip(self.shards, self.shard_files) for spec in specs}
        index = {"metadata": {"total_size": sum(spec.nbytes for spec in self.layout)}, "weight_map": weight_map}
        index_file = self.folder / "model.safetensors.index.json"
        index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return [*self.shard_files, index_file]

    def abort(self) -> None:
        """Close any open shard without finishing it."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy count bytes from src_fd at offset to dst_fd's current position."""
    end = offset + count
    try:
        while offset < end:
            copied = os.copy_file_range(src_fd, dst_fd, end - offset, offset)
            if copied == 0:
                break
            offset += copied
    except (AttributeError, OSError):
        pass
    while offset < end:
        chunk = os.pread(src_fd, min(end - offset, 1 << 24), offset)
        if not chunk:
            raise UpcycleError(
                f"a source file ended while copying from it (at byte {offset}); re-download the checkpoint"
            )
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view) :]
        offset += len(chunk)


OWNER_FILE = (
    ".upcycle-owner"  # in a temp folder: {"pid", "host"} of the process writing it (removed before the rename)
)
ABANDONED_AFTER_S = 3600  # a temp folder without an owner file (older upcycle) whose files are this old is abandoned
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _owner_state(folder: Path) -> str:
    """ "alive", "dead" (its process is gone: safe to remove) or "unknown" (no readable owner, or another host)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    if host != socket.gethostname():
        return "unknown"
    if pid == os.getpid():
        return "alive"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    except (OSError, OverflowError):
        return "unknown"
    return "alive"


def _last_change(folder: Path) -> float:
    """The newest modification time of the folder and the files in it."""
    times = [folder.lstat().st_mtime]
    for path in folder.rglob("*"):
        try:
            times.append(path.lstat().st_mtime)
        except OSError:
            pass
    return max(times)


def recover_output(out: Path, log=None) -> list[str]:
    """Clean up what killed runs left beside ``out``, and say what was done (one line each, also passed to ``log``;
    default: printed to stderr).

    - ``.OUT.upcycle-tmp-*`` temp folders whose owning process is gone (or, without an owner file, unchanged for an
      hour) are removed; those of a live process are left alone.
    - ``.OUT.upcycle-old-*``, the previous OUT moved aside just before the new one takes its place: when OUT is
      missing (a kill between the two renames) the newest is renamed back to OUT; otherwise it is removed.
    """
    out = Path(out)
    parent = out.parent
    notes: list[str] = []
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return notes
    temp_prefix, old_prefix = f".{out.name}.upcycle-tmp-", f".{out.name}.upcycle-old-"
    writer_alive = False
    with signals_held():
        for entry in sorted(e for e in entries if e.name.startswith(temp_prefix)):
            state = _owner_state(entry)
            if (
                state == "unknown"
                and not (entry / OWNER_FILE).exists()
                and time.time() - _last_change(entry) > ABANDONED_AFTER_S
            ):
                state = "dead"
            if state == "dead":
                _remove(entry)
                notes.append(f"removed {entry}, the temp folder of an earlier run that was stopped before it finished")
            elif state == "alive":
                writer_alive = True
            else:
                notes.append(
                    f"left {entry} alone: it may belong to a run still writing {out} "
                    "(on another host or an older upcycle); "
                    "delete it if none is"
                )
        olds = [e for e in entries if e.name.startswith(old_prefix)]
        if olds and not writer_alive:
            olds.sort(key=lambda e: e.lstat().st_mtime, reverse=True)
            if not (out.exists() or out.is_symlink()):
                os.replace(olds[0], out)
                notes.append(f"recovered {out} from {olds[0].name}: an earlier run was stopped while replacing it")
                olds = olds[1:]
            for old in olds:
                _remove(old)
                notes.append(f"removed {old}, a previous {out.name} that an earlier run had already replaced")
    for note in notes:
        (log or (lambda line: print(f"note: {line}", file=sys.stderr)))(note)
    return notes


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def format_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def space_margin(needed: int) -> int:
    """What the free-space check asks for beyond ``needed`` bytes (file-system overhead, small files)."""
    return needed // 20 + 16 * 2**20


def check_output_location(out: Path, needed_bytes: int | None = None) -> None:
    """One line, before anything is written, when OUT cannot be created: the nearest existing folder above it is a
    file, is read-only or not writable, or (``needed_bytes``) has less free space than the output plus a margin."""
    out = Path(out)
    base = _nearest_existing(out.parent)
    if not base.is_dir():
        raise UpcycleError(
            f"cannot create {out}: {base} is a file, not a folder; pick an OUT whose parent folders are folders"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        reason = "is on a read-only file system" if read_only else "is not writable by you (permission denied)"
        raise UpcycleError(f"cannot create {out}: {base} {reason}; write OUT to a folder you can write to")
    if needed_bytes is not None:
        free = shutil.disk_usage(base).free
        required = needed_bytes + space_margin(needed_bytes)
        if free < required:
            raise UpcycleError(
                f"not enough free space for {out}: it needs about {format_bytes(required)} (with a margin) but "
                f"{base} has {format_bytes(free)} free; free some space or write OUT to another disk"
            )


@contextmanager
def output_parent(out: Path) -> Iterator[Path]:
    """Create OUT's missing parent folders (``mkdir -p``) and remove the ones created here if the block fails."""
    parent = Path(out).absolute().parent
    created = []
    folder = parent
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _remove_empty(created)
        raise UpcycleError(_disk_message(error, Path(out), None)) from None
    try:
        yield parent
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


def _disk_message(error: OSError, out: Path, needed_bytes: int | None) -> str:
    where = error.filename or out
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f" (the output needs about {format_bytes(needed_bytes)})" if needed_bytes else ""
        return (
            f"{error.strerror or 'no space left on device'} while writing {where}; "
            f"nothing was written to {out}{need}: "
            "free some space or write OUT to another disk"
        )
    if error.errno == errno.EROFS:
        return f"{where} is on a read-only file system; nothing was written to {out}: write OUT to a writable folder"
    if error.errno in (errno.ENOTDIR, errno.EEXIST):
        return (
            f"cannot create {out}: a parent of it is a file, not a folder ({where}); "
            "choose an output whose parent folders are folders"
        )
    return (
        f"{error.strerror or error} ({where}); nothing was written to {out}: "
        "check its permissions or write OUT to a folder you can write to"
    )


@contextmanager
def atomic_output(
    out: Path,
    overwrite: bool,
    *,
    needed_bytes: int | None = None,
    refusal: Callable[[Path, Path, bool], str | None] | None = None,
) -> Iterator[Path]:
    """Yield a temp folder beside `out` that replaces `out` only if the block finishes without error.

    The temp folder ``.OUT.upcycle-tmp-*`` holds an owner file (this process's pid) until the rename, so a later run
    can remove it if this process is killed; the previous OUT is moved to ``.OUT.upcycle-old-*`` for the instant
    between the two renames (a later run renames it back if a kill lands there). SIGTERM cleans up like Ctrl-C; a full
    disk, a read-only or unwritable folder become one line (``needed_bytes``: the output's size, for the message).

    ``refusal(path, shown_as, overwrite)``: why the existing OUT may not be replaced (None: it may), asked before the
    block and again on OUT as it is at the rename (moved aside first, so nothing can change it between the check and
    the rename): OUT keeps what a user put into it meanwhile. Without it, any existing OUT is replaced with
    ``overwrite``."""
    out = Path(out)
    refusal = refusal or _replace_with_overwrite
    recover_output(out)
    reason = refusal(out, out, overwrite)
    if reason:
        raise UpcycleError(reason)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UpcycleError(_disk_message(error, out, needed_bytes)) from None
    with sigterm_as_interrupt():
        try:
            with signals_held():
                temp = _fresh_sibling(out, "tmp")
                try:
                    (temp / OWNER_FILE).write_text(
                        json.dumps({"pid": os.getpid(), "host": socket.gethostname()}) + "\n"
                    )
                except BaseException:
                    shutil.rmtree(temp, ignore_errors=True)
                    raise
        except OSError as error:
            raise UpcycleError(_disk_message(error, out, needed_bytes)) from None
        try:
            yield temp
            with signals_held():
                (temp / OWNER_FILE).unlink(missing_ok=True)
                old = None
                if out.exists() or out.is_symlink():
                    old = out.parent / f".{out.name}.upcycle-old-{secrets.token_hex(4)}"
                    os.replace(out, old)
                    reason = refusal(old, out, overwrite)
                    if reason:
                        os.replace(old, out)
                        raise UpcycleError(
                            f"{reason} ({out} changed while this run wrote its output: it was left as "
                            "it is and nothing was written)"
                        )
                try:
                    os.replace(temp, out)
                except OSError as error:
                    if old is not None:
                        os.replace(old, out)
                    if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                        raise UpcycleError(
                            f"{out} appeared while this run wrote its output; it was left as it is and nothing was "
                            "written: run again to replace it (with --overwrite), or choose another output"
                        ) from None
                    raise
                except BaseException:
                    if old is not None:
                        os.replace(old, out)
                    raise
                if old is not None:
                    _remove(old)
        except BaseException as error:
            with signals_held():
                shutil.rmtree(temp, ignore_errors=True)
            if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
                raise UpcycleError(_disk_message(error, out, needed_bytes)) from None
            raise


def _replace_with_overwrite(path: Path, shown_as: Path, overwrite: bool) -> str | None:
    """The default rule of :func:`atomic_output`: an existing output is replaced only with ``overwrite``."""
    if (path.exists() or path.is_symlink()) and not overwrite:
        return f"output {shown_as} already exists; pass --overwrite to replace it"
    return None


def _fresh_sibling(out: Path, tag: str) -> Path:
    while True:
        candidate = out.parent / f".{out.name}.upcycle-{tag}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files and generation_config.json from src to dst; return the names copied. A
    tokenizer_config.json whose auto_map names code of its own (accepted with --trust-remote-code) is copied without
    that auto_map: the code is never copied, and the tokenizer loads with the class its tokenizer_class /
    tokenizer.json give."""
    from .reader import foreign_code

    src, dst = Path(src), Path(dst)
    names = sorted({path.name for pattern in SUPPORT_FILES for path in src.glob(pattern) if path.is_file()})
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    tokenizer_config = dst / "tokenizer_config.json"
    if "tokenizer_config.json" in names:
        try:
            config = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            config = None
        if isinstance(config, dict) and foreign_code(config):
            del config["auto_map"]
            tokenizer_config.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return names
