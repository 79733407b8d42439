"""Model cards (README.md with Hub front matter) for upcycle outputs.

One generator, :func:`render_card`, reads only the folder's own records: ``config.json``,
``upcycle_report.json`` (the conversion, and the fine-tuning when there was one) and
``eval.json`` (what ``upcycle eval --json`` wrote: perplexity rows, a recovery block, and with ``--tasks`` the
lm-evaluation-harness scores, which also become the front matter's ``model-index``). ``convert`` and ``finetune`` call
:func:`write_card` once their report is written, and ``upcycle card PATH`` calls it again, so a
refreshed card says exactly what a fresh one would, plus any evaluation added since.
"""

from __future__ import annotations

import json
from pathlib import Path

from upcycle.card.model_index import repo_id_problem
from upcycle.card.records import EVAL_FILE, REPORT_FILE, read_json
from upcycle.card.render import merges_experts, method_card, render_card
from upcycle.checkpoint.source import CARD_FILE, HUB_ID
from upcycle.errors import UpcycleError
from upcycle.files import write_texts_atomic

__all__ = [
    "EVAL_FILE",
    "REPORT_FILE",
    "CardNotWritten",
    "render_card",
    "repo_id_problem",
    "source_models",
    "write_card",
]


class CardNotWritten(UpcycleError, OSError):
    """The card or the report could not be written: one line for the user, and still an ``OSError`` with the
    failure's ``errno`` for a caller that handles disk errors itself (``convert`` writes the card into its temporary
    output folder)."""

    def __init__(self, message: str, error: OSError) -> None:
        OSError.__init__(self, error.errno, error.strerror, error.filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def source_models(report: dict) -> int:
    """How many distinct models the report's model was made from: the distinct experts of a mix (BAM, BTX,
    CLIP-MoE; copies of one model count once), else one."""
    experts = report.get("experts") or []
    if merges_experts(method_card(report)[0]) and experts:
        return len(dict.fromkeys(map(str, experts)))
    return 1


def _check_card_options(folder: Path, report: dict, name: str | None, base_models: list[str]) -> None:
    """Refuse, in one line, a ``--name`` that is not a repository id and more ``--base-model`` ids than the model
    has source models."""
    if name is not None:
        problem = repo_id_problem(name)
        if problem:
            raise UpcycleError(
                f"--name {name!r} is not a Hub repository id ({problem}); use owner/name or name, as in me/smollm2-moh"
            )
    sources = source_models(report)
    if len(base_models) > sources:
        given = f"{len(base_models)} base models were given"
        if sources == 1:
            raise UpcycleError(
                f"{given}, but {folder} was made from one model; pass --base-model once, with that model's Hub id"
            )
        raise UpcycleError(
            f"{given}, but {folder} mixes {sources} models (the seed and its experts); pass --base-model at most "
            f"{sources} times, one Hub id per model, seed first"
        )


def write_card(folder: Path, *, name: str | None = None, base_models: list[str] | None = None) -> Path:
    """(Re)write ``folder/README.md`` from the folder's records. ``name``: the model's name in the card (a Hub
    repo id when publishing); ``base_models``: the Hub ids of the base model(s), for a source that was a local
    folder; both are remembered in the report for later refreshes. Either the card and the report are both
    written, or neither is (:class:`CardNotWritten`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UpcycleError(f"{folder} is not a folder; pass the folder of an upcycle output")
    for base in base_models or []:
        if not HUB_ID.match(base) or repo_id_problem(base):
            raise UpcycleError(
                f"--base-model {base!r} is not a Hub model id; use owner/name, as in HuggingFaceTB/SmolLM2-135M"
            )
    files: dict[Path, str] = {}
    report = None
    if name is not None or base_models:
        report = read_json(folder / REPORT_FILE, "it is not an upcycle output (convert or finetune write one)")
        if not isinstance(report, dict):
            raise UpcycleError(f"{folder / REPORT_FILE} must hold a JSON object; fix or re-create it")
        bases = list(dict.fromkeys(base_models or []))
        _check_card_options(folder, report, name, bases)
        changes = ({"name": name} if name is not None else {}) | ({"base_models": bases} if bases else {})
        if any(report.get(key) != value for key, value in changes.items()):
            report = report | changes
            files[folder / REPORT_FILE] = json.dumps(report, indent=2) + "\n"
    path = folder / CARD_FILE
    files = {path: render_card(folder, report=report)} | files  # the card first: its rename is the one that may fail
    try:
        write_texts_atomic(files)
    except OSError as error:
        raise CardNotWritten(
            f"cannot write {error.filename or path} ({error.strerror or error}); nothing was changed: make {folder} "
            "writable (or copy the folder where you may write) and run `upcycle card` again",
            error,
        ) from None
    return path
