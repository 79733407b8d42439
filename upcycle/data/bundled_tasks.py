"""lm-evaluation-harness tasks bundled with upcycle, so a real harness task runs without the network.

Each task is a YAML file shipped in ``upcycle/data/lm_eval_tasks/`` whose items are generated from an offline asset on
first use. :func:`bundled_task_folder` writes the items and a copy of the YAML (its ``data_files`` pointing at them)
into ``CACHE/lm-eval-tasks/``: the folder to give the harness as ``--include_path``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import yaml

from upcycle.errors import UpcycleError

TEMPLATES = Path(__file__).resolve().parent / "lm_eval_tasks"
FOLDER_NAME = "lm-eval-tasks"
KJV_NEXT_VERSE = "kjv_next_verse"
KJV_NEXT_VERSE_ITEMS = 500
KJV_NEXT_VERSE_SEED = 20261207
LENGTH_BAND = (2 / 3, 3 / 2)  # distractors' word count relative to the true verse's


def kjv_next_verse_items(count: int = KJV_NEXT_VERSE_ITEMS, seed: int = KJV_NEXT_VERSE_SEED) -> list[dict]:
    """``count`` items of the next-verse task from the held-out KJV books (every 10th book).

    Each item: ``context`` (up to two consecutive verses of one chapter), ``choices`` (the verse that follows and
    three distractors: verses of the same book at least five verses away whose word count is within 2/3..3/2 of
    the true verse's, where the book has three such), ``label`` (the true verse's index) and ``reference``
    (``book:chapter:verse`` of the true verse), in a seeded random order. Deterministic for a given ``seed``."""
    from upcycle.assets import KJV_HELDOUT_EVERY, kjv_verses

    books: dict[int, list[tuple[int, int, str]]] = {}
    for book, chapter, verse, text in kjv_verses():
        if book % KJV_HELDOUT_EVERY == 0:
            books.setdefault(book, []).append((chapter, verse, text))
    candidates = [
        (book, index)
        for book, verses in books.items()
        for index in range(1, len(verses))
        if verses[index - 1][0] == verses[index][0]  # the context verse is in the same chapter
    ]
    rng = random.Random(seed)
    items = []
    for book, index in rng.sample(
        candidates, min(count, len(candidates))
    ):  # shuffled: any prefix (--limit) mixes books
        verses = books[book]
        chapter, verse, truth = verses[index]
        context = [text for c, _, text in verses[max(0, index - 2) : index] if c == chapter]
        words = len(truth.split())
        far = [text for i, (_, _, text) in enumerate(verses) if abs(i - index) >= 5 and text != truth]
        similar = [t for t in far if LENGTH_BAND[0] * words <= len(t.split()) <= LENGTH_BAND[1] * words]
        distractors = rng.sample(similar if len(set(similar)) >= 3 else far, 3)
        choices = [truth, *distractors]
        rng.shuffle(choices)
        items.append(
            {
                "context": " ".join(context),
                "choices": choices,
                "label": choices.index(truth),
                "reference": f"{book}:{chapter}:{verse}",
            }
        )
    return items


# task name -> the generator of its items (a list of JSON objects, one per line of TASK.jsonl)
GENERATORS: dict[str, Callable[[], list[dict]]] = {KJV_NEXT_VERSE: kjv_next_verse_items}


def bundled_tasks() -> dict[str, str]:
    """Task name -> one-line description, for every bundled task."""
    return {name: str(template(name).get("metadata", {}).get("title", name)) for name in GENERATORS}


def template(name: str) -> dict:
    """The shipped task YAML of ``name``, parsed."""
    path = TEMPLATES / f"{name}.yaml"
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise UpcycleError(f"the bundled task file {path} cannot be read ({error}); reinstall upcycle") from None


def bundled_task_folder(cache_dir: Path | str | None = None) -> Path:
    """``CACHE/lm-eval-tasks``, holding every bundled task's items (``TASK.jsonl``, written on first use) and its
    YAML with ``data_files`` pointing at them: the folder for the harness's ``--include_path``. Files are written
    atomically, and again when the shipped YAML changes or the cache moved."""
    from upcycle.assets import cache_root
    from upcycle.files import write_text_atomic

    folder = cache_root(cache_dir) / FOLDER_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, generate in GENERATORS.items():
            config = template(name)
            data = folder / f"{name}.jsonl"
            config["dataset_kwargs"]["data_files"] = {config["test_split"]: str(data)}
            text = "# written by upcycle from its bundled task; do not edit (it is rewritten)\n"
            text += yaml.safe_dump(config, sort_keys=False)
            task_file = folder / f"{name}.yaml"
            current = task_file.read_text(encoding="utf-8") if task_file.is_file() else None
            if current != text or not data.is_file():
                write_text_atomic(data, "".join(json.dumps(item) + "\n" for item in generate()))
                write_text_atomic(task_file, text)
    except OSError as error:
        raise UpcycleError(
            f"cannot write the bundled lm-eval tasks into {folder} ({error.strerror or error}); "
            "set UPCYCLE_CACHE to a folder you may write to"
        ) from None
    return folder
