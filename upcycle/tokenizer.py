"""The one way upcycle loads a model folder's tokenizer: a folder without one, or one that does not load, is a
single line naming the fix (calibration, training, distillation and evaluation all come here)."""

from __future__ import annotations

from pathlib import Path

from .errors import UpcycleError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
FIX = (
    "copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) of the model it was made from into it, "
    "e.g. AutoTokenizer.from_pretrained(SOURCE).save_pretrained(FOLDER)"
)


def load_tokenizer(folder: str | Path, role: str = ""):
    """The tokenizer saved in ``folder`` (``role``, e.g. "teacher", names the folder in the message). Never runs a
    tokenizer's own code: transformers refuses one without ``trust_remote_code``, which is not passed."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    name = f"{role} {folder}" if role else str(folder)
    if folder.is_dir() and not any((folder / file).is_file() for file in TOKENIZER_FILES):
        raise UpcycleError(f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); {FIX}")
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise UpcycleError(f"cannot load the tokenizer of {name} ({reason}); {FIX}") from None
