"""Plain text to fixed-length token blocks for calibration, training and evaluation."""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from upcycle.errors import UpcycleError

TEXT_SUFFIXES = (".txt", ".jsonl")


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
        raise UpcycleError(f"{path} is not UTF-8 text (it holds NUL bytes: a binary file, or UTF-16 text): convert it to "
                           "UTF-8 (e.g. iconv -f UTF-16 -t UTF-8) or leave it out of the data")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=complete)
    except UnicodeDecodeError as e:
        raise UpcycleError(f"{path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start} is invalid): convert "
                           "it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or leave it out of the data") from None


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


def _read_file(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UpcycleError(f"cannot read {path} ({e.strerror or e}): give a readable UTF-8 .txt or .jsonl file") from None
    check_text_bytes(path, data)
    raw = data.decode("utf-8")
    if path.suffix.lower() == ".txt":
        return [doc.strip() for doc in re.split(r"\n[ \t\r\f\v]*\n", raw) if doc.strip()]
    documents = []
    for number, record in json_lines(path, raw):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UpcycleError(f'{path}:{number} has no string "text" field: write one {{"text": ...}} object per line')
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
    else:
        raise UpcycleError(f"text path {path} does not exist: give an existing .txt/.jsonl file or folder")
    documents = [doc for file in files for doc in _read_file(file)]
    if not documents:
        raise UpcycleError(f"no text found in {path}: give files with non-empty documents")
    return documents


def _token_stream(documents: list[str], tokenizer, eos: int, chunk: int = 256) -> Iterator[list[int]]:
    first = True
    for start in range(0, len(documents), chunk):
        batch = [doc for doc in documents[start : start + chunk] if doc.strip()]
        if not batch:
            continue
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            if ids:
                yield ids if first else [eos, *ids]
                first = False


def pack_tokens(documents: list[str], tokenizer, seq_len: int, max_tokens: int | None = None) -> torch.LongTensor:
    """Tokenise ``documents`` without special tokens, join them with ``tokenizer.eos_token_id`` between documents,
    and cut the stream into full ``[N, seq_len]`` blocks (the tail is dropped), using at most ``max_tokens`` tokens."""
    if seq_len < 2:
        raise UpcycleError(f"seq_len must be at least 2, got {seq_len}: raise the sequence length")
    if max_tokens is not None and max_tokens < seq_len:
        raise UpcycleError(
            f"max_tokens={max_tokens} is less than one block of seq_len={seq_len}: raise max_tokens or lower seq_len"
        )
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UpcycleError("the tokenizer has no EOS token to separate documents: set tokenizer.eos_token")
    limit = None if max_tokens is None else max_tokens // seq_len * seq_len
    tokens: list[int] = []
    for ids in _token_stream(documents, tokenizer, eos):
        tokens.extend(ids)
        if limit is not None and len(tokens) >= limit:
            break
    n_blocks = len(tokens) // seq_len if limit is None else min(len(tokens), limit) // seq_len
    if n_blocks == 0:
        raise UpcycleError(
            f"the text has {len(tokens)} tokens, fewer than one block of seq_len={seq_len}: "
            "give more text or lower seq_len"
        )
    return torch.tensor(tokens[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def as_sources(value: str | list[str] | None) -> list[str]:
    """A data key that names one source or a list of them (``data.train``, ``data.validation``) as a list."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)
