"""Plain text to fixed-length token blocks for calibration, training and evaluation: the one pipeline.

Documents (:func:`split_paragraphs` for plain text) -> token ids with EOS *between* documents
(:func:`encode_documents`, :func:`token_stream`) -> ``[seq_len]`` blocks, the tail dropped (:func:`iter_blocks`).
:func:`pack_tokens` runs it on a list of documents, :mod:`upcycle.data.corpus` on ``datasets`` corpora and
:mod:`upcycle.data.calibration` on calibration text. :class:`DataSettings` is the one schema of the recipe's ``data:``
section and of :class:`upcycle.data.corpus.DataConfig`.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from upcycle.errors import UpcycleError

if TYPE_CHECKING:
    import torch
else:
    from ..lazy import torch

TEXT_SUFFIXES = (".txt", ".jsonl")
PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")  # a blank line between documents (whitespace on it allowed)


def json_lines(path: Path, raw: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; a bad line is one clear error."""
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as e:
            raise UpcycleError(f"{path}:{number} is not valid JSON ({e.msg}): write one JSON object per line") from e


SAMPLE_BYTES = 1 << 20  # how much of a large data file check_text_file reads


def check_text_bytes(path: Path | str, data: bytes, complete: bool = True) -> None:
    """Refuse a data file that is empty (or only whitespace) or is not UTF-8 text, from its bytes ``data`` (the whole
    file when ``complete``, else its first bytes): one clear line naming the file and the fix."""
    if not data.strip() and complete:
        raise UpcycleError(f"{path} is empty (no text in it): put text in it, or leave it out of the data")
    if b"\0" in data:
        raise UpcycleError(
            f"{path} is not UTF-8 text (it holds NUL bytes: a binary file, or UTF-16 text): convert it to "
            "UTF-8 (e.g. iconv -f UTF-16 -t UTF-8) or leave it out of the data"
        )
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
    except UnicodeDecodeError as e:
        raise UpcycleError(
            f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} is invalid): convert "
            "it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or leave it out of the data"
        ) from None


def check_text_file(path: Path | str) -> None:
    """:func:`check_text_bytes` on a file's first ``SAMPLE_BYTES`` bytes; an unreadable file too is one line."""
    sample = SAMPLE_BYTES
    try:
        with open(path, "rb") as handle:
            data = handle.read(sample + 1)
    except OSError as e:
        raise UpcycleError(f"cannot read {path} ({e.strerror or e}): give a readable UTF-8 text file") from None
    complete = len(data) <= sample
    check_text_bytes(path, data if complete else data[:sample], complete)


# --- documents -------------------------------------------------------------------------------------------------


def split_paragraphs(text: str) -> list[str]:
    """The documents of plain text: its paragraphs (separated by blank lines, which may hold whitespace), stripped,
    empty ones left out. ``.txt`` files become documents this way here and in :mod:`upcycle.data.corpus`."""
    return [doc.strip() for doc in PARAGRAPH.split(text) if doc.strip()]


def _read_file(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UpcycleError(
            f"cannot read {path} ({e.strerror or e}): give a readable UTF-8 .txt or .jsonl file"
        ) from None
    check_text_bytes(path, data)
    raw = data.decode("utf-8")
    if path.suffix.lower() == ".txt":
        return split_paragraphs(raw)
    documents = []
    for number, record in json_lines(path, raw):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UpcycleError(
                f'{path}:{number} has no string "text" field: write one {{"text": ...}} object per line'
            )
        if record["text"].strip():
            documents.append(record["text"])
    return documents


def read_documents(path: Path | str) -> list[str]:
    """Documents from a .txt file (paragraphs separated by blank lines are documents), a .jsonl file
    (one document per line, in its "text" field) or a folder of such files (recursively, sorted by path)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UpcycleError(f"no .txt or .jsonl files in {path}: put text files there or give a file")
    elif path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise UpcycleError(f"unsupported text file {path}: give a .txt or .jsonl file, or a folder of them")
        files = [path]
    elif path.exists():
        raise UpcycleError(f"text path {path} is not a regular file or folder: give a .txt/.jsonl file or a folder")
    else:
        raise UpcycleError(f"text path {path} does not exist: give an existing .txt/.jsonl file or folder")
    documents = [doc for file in files for doc in _read_file(file)]
    if not documents:
        raise UpcycleError(f"no text found in {path}: give files with non-empty documents")
    return documents


# --- tokens and blocks -----------------------------------------------------------------------------------------


def document_eos(tokenizer) -> int:
    """The token put between documents: the tokenizer's EOS, or one line saying it has none."""
    if tokenizer.eos_token_id is None:
        raise UpcycleError("the tokenizer has no EOS token to separate documents: set tokenizer.eos_token")
    return tokenizer.eos_token_id


def encode_documents(tokenizer, texts: list[str], eos: int) -> list[list[int]]:
    """The EOS rule: ``[eos, *ids]`` per document (ids without special tokens; ``[]`` for a document without
    tokens). Joined, less the very first token, they are the stream with EOS only between documents."""
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [[eos, *ids] if ids else [] for ids in encoded]


def token_stream(documents: Iterable[str], tokenizer, eos: int, batch_size: int = 256) -> Iterator[list[int]]:
    """The token stream of ``documents`` in pieces: the first document's ids, then ``[eos, *ids]`` per later one
    (:func:`encode_documents`, ``batch_size`` documents per tokenizer call); blank documents and documents without
    tokens are left out, so there is no EOS before the first document, after the last, or twice in a row."""
    documents, first = iter(documents), True
    while chunk := list(islice(documents, batch_size)):
        batch = [doc for doc in chunk if doc.strip()]
        for ids in encode_documents(tokenizer, batch, eos) if batch else ():
            if ids:
                yield ids[1:] if first else ids
                first = False


_token_stream = token_stream  # the name upcycle.eval.evaluate imports


def iter_blocks(pieces: Iterable[list[int]], seq_len: int) -> Iterator[torch.Tensor]:
    """Cut a token stream given in pieces (:func:`token_stream`) into LongTensor ``[seq_len]`` blocks, lazily;
    the tail that does not fill a block is dropped."""
    buffer: list[int] = []
    for ids in pieces:
        buffer.extend(ids)
        n = len(buffer) // seq_len
        if n:
            yield from torch.tensor(buffer[: n * seq_len], dtype=torch.long).view(n, seq_len)
            del buffer[: n * seq_len]


def check_token_budget(name: str, value: int | None, seq_len: int) -> None:
    """Refuse a token budget ``value`` (None: no limit) that is less than one block of ``seq_len``; ``name`` is the
    recipe key (``validation_tokens``) or the flag (``--calibration-tokens``) it came from."""
    if value is not None and value < seq_len:
        given = f"{name} {value}" if name.startswith("--") else f"{name}={value}"
        raise UpcycleError(
            f"{given} is less than one block of {seq_len} tokens (the sequence length): raise {name} to at least "
            f"{seq_len} or lower the sequence length"
        )


def pack_tokens(
    documents: list[str], tokenizer, seq_len: int, max_tokens: int | None = None, *, budget_name: str = "max_tokens"
) -> torch.LongTensor:
    """Tokenise ``documents`` without special tokens, join them with ``tokenizer.eos_token_id`` between documents,
    and cut the stream into full ``[N, seq_len]`` blocks (the tail is dropped), using at most ``max_tokens`` tokens
    (``budget_name``: how the user gave that budget, for the message, e.g. ``--calibration-tokens``)."""
    if seq_len < 2:
        raise UpcycleError(f"seq_len must be at least 2, got {seq_len}: raise the sequence length")
    check_token_budget(budget_name, max_tokens, seq_len)
    eos = document_eos(tokenizer)
    limit = None if max_tokens is None else max_tokens // seq_len
    blocks = list(islice(iter_blocks(token_stream(documents, tokenizer, eos), seq_len), limit))
    if not blocks:  # then the whole text is shorter than one block: cheap to count again
        count = sum(len(ids) for ids in token_stream(documents, tokenizer, eos))
        raise UpcycleError(
            f"the text has {count} tokens, fewer than one block of seq_len={seq_len}: give more text or lower seq_len"
        )
    return torch.stack(blocks)


# --- the data: settings ----------------------------------------------------------------------------------------


def as_sources(value: str | list[str] | None) -> list[str]:
    """A data key that names one source or a list of them (``data.train``, ``data.validation``) as a list."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


class DataSettings(BaseModel):
    """Where the text comes from and how it becomes blocks: the recipe's ``data:`` section, and the settings of
    :class:`upcycle.data.corpus.DataConfig` (sources: see :mod:`upcycle.data.corpus`). The checks across keys
    raise :class:`UpcycleError` (one line naming the fix), in a recipe too."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf / nan anywhere: one line naming the key

    train: str | list[str]  # several sources: their documents interleaved (``train_weights``)
    train_weights: list[float] | None = None  # probability of drawing the next document from each train source
    validation: str | list[str] | None = None  # None: hold out ``validation_fraction`` of the train documents
    validation_fraction: float = Field(0.02, ge=0, lt=1)  # 0: no held-out split (without a validation source)
    text_field: str = "text"
    seq_len: int = Field(512, ge=2)
    max_train_tokens: int | None = Field(None, gt=0)
    validation_tokens: int | None = Field(65536, ge=0)  # None: all validation documents; 0: no validation
    streaming: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> DataSettings:
        sources = self.train_sources()
        if not sources:
            raise UpcycleError("data.train names no source: give a file, a folder, an asset or a Hub dataset")
        weights = self.train_weights
        if weights is not None and (len(weights) != len(sources) or min(weights) <= 0):
            raise UpcycleError(
                f"train_weights {weights} must give one positive weight per train source "
                f"({len(sources)}): fix them or drop them for an even mix"
            )
        names = self.validation_sources()
        if len(set(names)) != len(names):
            raise UpcycleError(f"validation lists a source twice ({', '.join(names)}): list each held-out corpus once")
        check_token_budget("max_train_tokens", self.max_train_tokens, self.seq_len)
        if self.validation_tokens != 0:
            check_token_budget("validation_tokens", self.validation_tokens, self.seq_len)
        return self

    def train_sources(self) -> list[str]:
        """``train`` as a list of sources."""
        return as_sources(self.train)

    def validation_sources(self) -> list[str]:
        """``validation`` as a list of sources (empty: none)."""
        return as_sources(self.validation)
