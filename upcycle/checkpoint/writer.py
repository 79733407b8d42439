"""Stream tensors into sharded safetensors files, one tensor in memory at a time."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import torch

from upcycle.checkpoint.reader import SAFETENSORS_DTYPES, CheckpointReader
from upcycle.errors import UpcycleError

DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
SUPPORT_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.*",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "*.tiktoken",
    "generation_config.json", "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
)


def parse_size(text: str | int) -> int:
    """Parse a byte size such as 5GB (10**9), 1GiB (2**30), 500MB or 1024."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?\s*", str(text), re.IGNORECASE)
    if match:
        size = int(float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()])
        if size > 0:
            return size
    raise UpcycleError(f"invalid size {text!r}; use a positive size such as 5GB, 500MB or 2GiB")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = self.dtype.itemsize
        for dim in self.shape:
            count *= dim
        return count


class ShardedWriter:
    """Write a known layout of tensors, in order, as transformers-style safetensors shards."""

    def __init__(self, folder: Path, layout: list[TensorSpec], max_shard_bytes: int, metadata: dict[str, str] | None = None) -> None:
        self.folder = Path(folder)
        self.layout = [TensorSpec(s.name, s.dtype, tuple(s.shape)) for s in layout]
        names = [spec.name for spec in self.layout]
        if len(set(names)) != len(names):
            raise ValueError("layout has duplicate tensor names")
        for spec in self.layout:
            if spec.dtype not in DTYPE_CODES:
                raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        self.metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ValueError("safetensors metadata keys and values must be strings")
        self.shards = self.plan_shards(self.layout, max_shard_bytes)
        count = len(self.shards)
        self.shard_files = [
            self.folder / ("model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors")
            for i in range(1, count + 1)
        ]
        self._next = 0
        self._shard_index = -1
        self._left_in_shard = 0
        self._handle: BinaryIO | None = None

    @staticmethod
    def plan_shards(layout: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
        """Group the layout greedily into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
        if not layout:
            raise ValueError("layout is empty")
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in layout:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        return shards

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout to its shard."""
        self._check_next(name, tensor.dtype, tuple(tensor.shape))
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._handle.write(data.numpy())
        self._advance()

    def write_chunks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], chunks: Iterable[torch.Tensor]) -> None:
        """Append the next tensor of the layout from consecutive row chunks (so it is never whole in memory)."""
        self._check_next(name, dtype, tuple(shape))
        written = 0
        for chunk in chunks:
            data = chunk.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
            if data.numel():
                self._handle.write(data.numpy())
            written += data.numel()
        expected = math.prod(shape) * dtype.itemsize
        if written != expected:
            raise ValueError(f"{name}: chunks held {written} bytes, expected {expected}")
        self._advance()

    def copy_from(self, reader: CheckpointReader, name: str, source_name: str | None = None) -> None:
        """Append tensor `source_name` (default `name`) of `reader` unchanged, copying file to file in the kernel."""
        info = reader.info(source_name or name)
        source = reader.byte_range(info.name)
        if source is None:
            self.write(name, reader.get(info.name))
            return
        self._check_next(name, info.dtype, info.shape)
        self._handle.flush()
        with open(source[0], "rb") as src:
            _copy_range(src.fileno(), self._handle.fileno(), source[1], info.nbytes)
        self._advance()

    def _check_next(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if self._next >= len(self.layout):
            raise ValueError(f"{name}: every tensor of the layout was already written")
        spec = self.layout[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name} next but got {name}")
        if dtype != spec.dtype:
            raise ValueError(f"{name}: expected dtype {spec.dtype} but got {dtype}")
        if shape != spec.shape:
            raise ValueError(f"{name}: expected shape {spec.shape} but got {shape}")
        if self._left_in_shard == 0:
            self._open_next_shard()

    def _advance(self) -> None:
        self._next += 1
        self._left_in_shard -= 1
        if self._left_in_shard == 0:
            self._handle.close()
            self._handle = None

    def _open_next_shard(self) -> None:
        self._shard_index += 1
        specs = self.shards[self._shard_index]
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for spec in specs:
            header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.shard_files[self._shard_index], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._left_in_shard = len(specs)

    def close(self) -> list[Path]:
        """Check that the whole layout was written, write the index if sharded, and return the files."""
        if self._next != len(self.layout):
            self.abort()
            raise ValueError(f"only {self._next} of {len(self.layout)} tensors were written; next expected {self.layout[self._next].name}")
        if len(self.shard_files) == 1:
            return list(self.shard_files)
        weight_map = {spec.name: file.name for specs, file in zip(self.shards, self.shard_files) for spec in specs}
        index = {"metadata": {"total_size": sum(spec.nbytes for spec in self.layout)}, "weight_map": weight_map}
        index_file = self.folder / "model.safetensors.index.json"
        index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return [*self.shard_files, index_file]

    def abort(self) -> None:
        """Close any open shard without finishing it."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy count bytes from src_fd at offset to dst_fd's current position."""
    end = offset + count
    try:
        while offset < end:
            copied = os.copy_file_range(src_fd, dst_fd, end - offset, offset)
            if copied == 0:
                break
            offset += copied
    except (AttributeError, OSError):
        pass
    while offset < end:
        chunk = os.pread(src_fd, min(end - offset, 1 << 24), offset)
        if not chunk:
            raise UpcycleError(f"a source file ended while copying from it (at byte {offset}); re-download the checkpoint")
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view):]
        offset += len(chunk)


@contextmanager
def atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temp folder beside `out` that replaces `out` only if the block finishes without error."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UpcycleError(f"output {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = _fresh_sibling(out, "tmp")
    try:
        yield temp
        old = None
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.upcycle-old-{secrets.token_hex(4)}"
            os.replace(out, old)
        try:
            os.replace(temp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _fresh_sibling(out: Path, tag: str) -> Path:
    while True:
        candidate = out.parent / f".{out.name}.upcycle-{tag}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files and generation_config.json from src to dst; return the names copied."""
    src, dst = Path(src), Path(dst)
    names = sorted({path.name for pattern in SUPPORT_FILES for path in src.glob(pattern) if path.is_file()})
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(src / name, dst / name)
    return names
