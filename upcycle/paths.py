"""Where outputs may go: an output folder never contains, or sits inside, a file or folder the user gave as input;
one process at a time writes an output."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UpcycleError


def refuse_inputs_inside(out: Path, inputs: dict[str, Path | str | None], *, what: str = "OUT") -> None:
    """Raise one line if an input (SRC, an expert, calibration text, recipe data, a teacher, ...) is OUT or lies
    inside it (``--overwrite`` would delete it), or if OUT lies inside an input folder.

    ``inputs`` maps a label for the message ("SRC", "--calibration", "data.train") to a local path; entries that
    are ``None``, Hub ids or ``asset:`` names (no local path) are skipped. Symlinks are resolved.
    """
    target = Path(out).resolve()
    for label, path in inputs.items():
        if path is None or str(path).startswith("asset:") or not Path(path).exists():
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents:
            raise UpcycleError(
                f"{label} {path} is inside {what} {out}, which --overwrite would delete; "
                f"write the output to a folder that holds none of the inputs"
            )
        if source.is_dir() and source in target.parents:
            raise UpcycleError(f"{what} {out} is inside {label} {path}; write the output to a new folder outside it")


def probe_writable(folder: Path) -> None:
    """Create and remove a file in ``folder``: the OSError of a folder one cannot write in (read-only, no permission,
    no space), even for root, whom ``os.access`` always allows. A signal waits until the probe is gone."""
    import tempfile

    from .interrupts import signals_held

    with signals_held():
        handle, probe = tempfile.mkstemp(prefix=".upcycle-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)


LOCK_SUFFIX = ".upcycle-lock"


def lock_file(out: Path) -> Path:
    """The lock of an output, beside it: ``.OUT.upcycle-lock`` (a file that never holds data)."""
    out = Path(out).absolute()
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


@contextmanager
def output_lock(out: Path, *, what: str = "OUT") -> Iterator[None]:
    """Hold the one lock of the output ``out`` while the block runs: a second upcycle process that writes the same
    output fails at once with one line. The lock is an ``flock`` on ``.OUT.upcycle-lock``, which the kernel
    releases when the holder dies, so a crashed or killed run never leaves it stuck (its file is reused and removed
    by the next run). ``out``'s parent folder must exist. On a file system without ``flock`` (some network mounts),
    or where the lock file cannot be created (the command's own checks then say why in one line), the block runs
    unlocked."""
    path = lock_file(out)
    descriptor = _acquire(path, out, what)
    if descriptor is None:
        yield
        return
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # before the unlock: a process that opened this file sees it is gone
        except OSError:
            pass
        os.close(descriptor)


def _acquire(path: Path, out: Path, what: str) -> int | None:
    """The locked descriptor of ``path`` (None where locking is not possible), or one line when another process
    holds it."""
    import fcntl

    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(descriptor)
            os.close(descriptor)
            raise UpcycleError(
                f"another upcycle process{holder} is writing {what} {out}; wait for it to finish, or write to "
                "another output"
            ) from None
        except OSError:
            os.close(descriptor)
            return None
        try:
            same = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the previous holder removed it between our open and our lock
            same = False
        if same:
            return descriptor
        os.close(descriptor)


def _lock_holder(descriptor: int) -> str:
    try:
        pid = int(os.pread(descriptor, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})"
