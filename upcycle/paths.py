"""Where outputs may go: an output folder never contains, or sits inside, a file or folder the user gave as input."""

from __future__ import annotations

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
