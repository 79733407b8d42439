"""``upcycle eval``: score one or two models on the same held-out tokens."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UpcycleError


def run_eval(path: str, data: Path, *, compare: str | None, tokens: int, window: int, stride: int | None, output: Path | None,
             attention: str = "auto") -> list[dict]:
    from transformers import AutoTokenizer

    from ..checkpoint.reader import resolve_source
    from .evaluate import eval_tokens_from_text, evaluate, format_table

    folders = [resolve_source(p) for p in [path, compare] if p]
    for folder in folders:
        if not (folder / "config.json").exists():
            raise UpcycleError(f"{folder} is not a model folder: no config.json; pass the folder that holds the model")
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    ids = eval_tokens_from_text(data, tokenizer, tokens)
    results = [evaluate(folder, ids, window=window, stride=stride, attention=attention) for folder in folders]
    print(format_table(results))
    if output:  # with the data's name, for the model card (upcycle card)
        output.write_text(json.dumps([r | {"data": str(data)} for r in results], indent=2) + "\n")
    return results
