"""Text files written whole: atomic replaces, and JSON that never holds NaN."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path


def write_texts_atomic(files: dict[Path, str]) -> None:
    """Write each text to its path through a temporary file beside it, and rename them into place (in the order
    given) only once every one is written: a reader never sees half a file, and a failure leaves no temporary file.
    An ``OSError`` names the path that could not be written (``filename``)."""
    temporary: list[str] = []
    path = None
    try:
        for path, text in files.items():
            handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temporary.append(temp)
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                file.write(text)
        for (path, _), temp in zip(files.items(), temporary):
            os.replace(temp, path)
    except BaseException as error:
        for temp in temporary:
            Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno is not None and path is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, so a reader never sees half of it."""
    write_texts_atomic({Path(path): text})


def json_safe(value):
    """``value`` with every non-finite float (inf, nan) as None: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_text(value: dict | list) -> str:
    """``value`` as indented JSON, every non-finite float (inf, nan) written as null."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"
