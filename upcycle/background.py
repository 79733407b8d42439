"""Work in a thread beside the caller's, through ``concurrent.futures``."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def in_background(work: Callable[[], T], name: str) -> Future[T]:
    """``work()`` running in a thread of its own from now on; ``.result()`` waits for it and raises what it raised.

    The thread is not a daemon (a daemon thread still inside torch or transformers when the interpreter finalises
    aborts the process: "terminate called without an active exception") and ends once the work is done."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return executor.submit(work)
    finally:
        executor.shutdown(wait=False)
