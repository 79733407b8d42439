"""Ctrl-C and SIGTERM: SIGTERM raised like Ctrl-C so that every clean-up runs, and blocks no signal may cut in half."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (and every ``except KeyboardInterrupt`` sees it)."""


_RECEIVED: list[int] = []  # the signals turned into exceptions here, in order


IMPORT_CODE = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")
RESEND_AFTER_S = 0.05


def _importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` (the one a signal interrupted) runs inside an import."""
    while frame is not None:
        if frame.f_code.co_filename in IMPORT_CODE:
            return True
        frame = frame.f_back
    return False


def _deferred(signum: int, frame: FrameType | None) -> bool:
    """Whether the signal lands inside an import: then it is sent again shortly, until it lands outside one. An
    exception raised inside an import leaves that module half initialised, and the libraries that import it later
    fail with errors of their own (or swallow the interrupt as a missing optional package)."""
    if not _importing(frame):
        return False
    resend = threading.Timer(RESEND_AFTER_S, os.kill, (os.getpid(), signum))
    resend.daemon = True
    resend.start()
    return True


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    if not _deferred(signum, frame):
        _RECEIVED.append(signum)
        raise Terminated(signum)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    if not _deferred(signum, frame):
        _RECEIVED.append(signum)
        raise KeyboardInterrupt


def signals_so_far() -> int:
    """How many SIGINT and SIGTERM have arrived while :func:`sigterm_as_interrupt` was active (for
    :func:`signal_received`)."""
    return len(_RECEIVED)


def signal_received(since: int) -> int | None:
    """The last SIGINT or SIGTERM that arrived after the first ``since`` (:func:`signals_so_far`), if any: a library
    can turn the interrupt into an error of its own, and this says what that error really was."""
    return _RECEIVED[-1] if len(_RECEIVED) > since else None


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``Terminated`` (a KeyboardInterrupt) instead of killing the process at
    once, so temp folders are removed; SIGINT raises KeyboardInterrupt as usual. Both are recorded
    (:func:`signal_received`). Only in the main thread, and only for a signal that still has its default action."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}
    for signum, default, handler in (
        (signal.SIGTERM, signal.SIG_DFL, _raise_terminated),
        (signal.SIGINT, signal.default_int_handler, _raise_interrupted),
    ):
        if signal.getsignal(signum) == default:
            signal.signal(signum, handler)
            installed[signum] = default
    try:
        yield
    finally:
        for signum, default in installed.items():
            signal.signal(signum, default)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (then act on them as usual), so that a rename pair or a
    clean-up is never cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in saved:
        signal.signal(signum, lambda number, frame: pending.append(number))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        if pending:
            handler = saved[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])
