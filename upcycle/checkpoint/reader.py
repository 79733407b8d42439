"""Read dense checkpoints one tensor at a time, without mmap, so resident memory stays small."""

from __future__ import annotations

import functools
import json
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from upcycle.errors import UpcycleError

if TYPE_CHECKING:
    import torch
else:
    from ..lazy import torch

# safetensors dtype code -> (torch dtype name, bytes per element): headers are read without importing torch
SAFETENSORS_CODES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


@functools.cache
def safetensors_dtypes() -> dict[str, torch.dtype]:
    """Safetensors dtype code -> torch dtype, for the codes this torch has."""
    return {code: getattr(torch, name) for code, (name, _) in SAFETENSORS_CODES.items() if hasattr(torch, name)}


@functools.cache
def dtype_codes() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype code."""
    return {dtype: code for code, dtype in safetensors_dtypes().items()}


MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    code: str  # the safetensors dtype code, e.g. BF16
    shape: tuple[int, ...]
    nbytes: int
    file: Path

    @property
    def dtype(self) -> torch.dtype:
        return safetensors_dtypes()[self.code]

    @property
    def dtype_name(self) -> str:
        """The dtype as torch names it (bfloat16), without importing torch."""
        return SAFETENSORS_CODES[self.code][0]


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > 160:
        text = text[:160] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _corrupted(file: Path, reason: str) -> UpcycleError:
    return UpcycleError(f"{file} is truncated or corrupted ({reason}); re-download it")


def read_safetensors_header(file: Path) -> tuple[int, dict[str, TensorInfo], dict[str, int]]:
    """Validate a .safetensors file's header; return (data start, infos, name -> data offset)."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _corrupted(file, f"only {size} bytes")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise _corrupted(file, f"header length {header_len} does not fit a {size}-byte file")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupted(file, f"header is not valid JSON: {one_line(error)}") from None
    if not isinstance(header, dict):
        raise _corrupted(file, "header is not a JSON object")
    data_start = 8 + header_len
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, int] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)) and begin <= end
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise _corrupted(file, f"bad header entry for {name}")
        if code not in SAFETENSORS_CODES:
            raise UpcycleError(
                f"{file}: tensor {name} has unsupported dtype {code}; convert the checkpoint to bf16/fp16/fp32 first"
            )
        nbytes = SAFETENSORS_CODES[code][1] * _numel(shape)
        if end - begin != nbytes:
            raise _corrupted(file, f"{name} has {end - begin} bytes but its shape needs {nbytes}")
        if data_start + end > size:
            raise _corrupted(file, f"{name} ends past the end of the file")
        infos[name] = TensorInfo(name, code, shape, nbytes, file)
        offsets[name] = data_start + begin
        data_end = max(data_end, end)
    # safetensors' own rule: the tensors' byte ranges follow one another, without gaps or overlaps (two tensors over
    # the same bytes would be copied as two tensors that alias in the source)
    position = data_start
    for name in sorted(infos, key=lambda n: (offsets[n], infos[n].nbytes)):
        if offsets[name] != position:
            what = "overlaps the tensor before it" if offsets[name] < position else "leaves a gap before it"
            raise _corrupted(file, f"the data of {name} {what} (byte {offsets[name] - data_start})")
        position += infos[name].nbytes
    if data_start + data_end != size:
        raise _corrupted(file, f"file is {size} bytes but its header describes {data_start + data_end}")
    return data_start, infos, offsets


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UpcycleError(f"{file} is not valid JSON ({one_line(error)}); fix or re-download {what}") from None


# pickle protocol 2 of torch's legacy magic number 0x1950a86a20f9469cfc6c
LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
TO_SAFETENSORS = (
    "load it yourself where you trust it (state_dict = torch.load(path, weights_only=False): a pickle can run code), "
    "save it with safetensors.torch.save_file({{k: v.contiguous() for k, v in state_dict.items()}}, "
    "'{folder}/model.safetensors'), then remove the pytorch_model*.bin files (and their index)"
)


def load_pickled_weights(file: Path) -> Any:
    """``torch.load`` of a pytorch_model*.bin with ``weights_only=True`` (memory-mapped): never unpickles code. A file
    in torch's legacy format, one that holds more than tensors, or one that is not a torch file is one line saying
    so."""
    file = Path(file)
    fix = TO_SAFETENSORS.format(folder=file.parent)
    with open(file, "rb") as handle:
        head = handle.read(len(LEGACY_TORCH_MAGIC))
    if head.startswith(LEGACY_TORCH_MAGIC):
        raise UpcycleError(
            f"{file} is in torch's legacy serialization format (torch before 1.6, not a zip archive), "
            f"which upcycle does not read; {fix}"
        )
    if not head.startswith(b"PK\x03\x04"):
        raise UpcycleError(
            f"{file} could not be unpickled "
            "(it is not a torch zip archive: truncated, corrupted or not a torch file); "
            "re-download it or use a safetensors checkpoint"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        needs = re.search(r"Unsupported (?:global|operand)[^.]*?(GLOBAL [\w.]+|\w+)", str(error))
        what = f"it needs {needs.group(1).removeprefix('GLOBAL ')}" if needs else one_line(error)[:120]
        raise UpcycleError(
            f"{file} is a pickle that holds more than tensors ({what}), and upcycle loads only what "
            f"torch.load(weights_only=True) accepts, never pickled code; convert it to safetensors: {fix}"
        ) from None
    except Exception as error:
        raise UpcycleError(
            f"{file} could not be unpickled ({one_line(error)}); re-download it or use a safetensors checkpoint"
        ) from None


RUNTIME_DIR = (
    Path(__file__).resolve().parents[1] / "modeling"
)  # upcycle's model runtime: what methods/base.py's auto_map names
RUNTIME_MODULES = ("configuration_upcycle", "modeling_upcycle")


def _runtime_classes() -> dict[str, set[str]]:
    """Module -> the classes upcycle's runtime defines (read from the installed files, without importing them)."""
    import ast

    classes = {}
    for module in RUNTIME_MODULES:
        tree = ast.parse((RUNTIME_DIR / f"{module}.py").read_text(encoding="utf-8"))
        classes[module] = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    return classes


def auto_map_references(auto_map: Any) -> list[Any]:
    """Every "module.Class" reference of an ``auto_map`` (a value may be one reference or a list, e.g. tokenizers')."""
    if not isinstance(auto_map, dict):
        return [auto_map]
    references = []
    for value in auto_map.values():
        references += [r for r in value if r is not None] if isinstance(value, (list, tuple)) else [value]
    return references


def is_upcycle_runtime(auto_map: Any) -> bool:
    """Whether an ``auto_map`` names only classes of upcycle's own runtime (configuration_upcycle.X, modeling_upcycle.Y
    of the installed package; no other repository's code, no other module)."""
    references = auto_map_references(auto_map)
    if not references:
        return False
    classes = _runtime_classes()
    for reference in references:
        if not isinstance(reference, str) or "--" in reference or reference.count(".") != 1:
            return False
        module, name = reference.split(".")
        if name not in classes.get(module, ()):
            return False
    return True


def foreign_code(config: dict) -> str | None:
    """What names code that is not upcycle's runtime in a config (its ``auto_map``), or None."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map or is_upcycle_runtime(auto_map):
        return None
    files = []
    for reference in auto_map_references(auto_map):
        text = str(reference)
        files.append(text if "--" in text else f"{text.rsplit('.', 1)[0]}.py")
    return ", ".join(dict.fromkeys(files))


CODE_CONFIGS = (
    "config.json",
    "tokenizer_config.json",
)  # the files whose auto_map makes transformers import a folder's code


def folder_foreign_code(folder: Path | str, config: dict | None = None) -> tuple[str, str] | None:
    """(file, what it names) for the first of config.json (``config`` when given) and tokenizer_config.json whose
    ``auto_map`` names code that is not upcycle's runtime; None when neither does."""
    for name in CODE_CONFIGS:
        found = config if name == "config.json" and config is not None else None
        if found is None:
            try:
                found = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
        code = foreign_code(found) if isinstance(found, dict) else None
        if code:
            return name, code
    return None


def refuse_remote_code(
    folder: Path | str, config: dict | None = None, trust_remote_code: bool = False, *, fix: str | None = None
) -> None:
    """A model folder whose config.json or tokenizer_config.json has an ``auto_map`` naming code other than upcycle's
    runtime is refused, in one line, unless ``trust_remote_code``. Even then upcycle never runs that code, nor copies
    it into an output."""
    found = folder_foreign_code(folder, config)
    if found and not trust_remote_code:
        name, code = found
        fix = fix or (
            "pass --trust-remote-code to convert its weights anyway "
            "(the output loads with the family's standard classes, "
            f"without that code), or remove auto_map from its {name}"
        )
        raise UpcycleError(
            f"{folder}: {name}'s auto_map names code that is not upcycle's runtime ({code}); upcycle never runs "
            f"a model folder's own code nor copies it into an output: {fix}"
        )


class CheckpointReader:
    """Random access to the tensors of a local Hugging Face model folder."""

    def __init__(self, path: str | Path) -> None:
        self.folder = Path(path)
        try:
            self._open()
        except OSError as error:  # permissions, a file that vanished, an I/O error: the files, not upcycle
            where = error.filename or self.folder
            raise UpcycleError(
                f"cannot read {where} ({error.strerror or error}); make the model's files readable by you "
                "(or copy them where they are)"
            ) from None

    def _open(self) -> None:
        if not self.folder.is_dir():
            raise UpcycleError(f"{self.folder} is not a directory; pass a model folder that holds config.json")
        config_file = self.folder / "config.json"
        if not config_file.is_file():
            raise UpcycleError(
                f"{self.folder} is not a model folder: no config.json; pass the folder of a Hugging Face checkpoint"
            )
        self.config: dict = _read_json(config_file, "config.json")
        if not isinstance(self.config, dict):
            raise UpcycleError(f"{config_file} is not a JSON object; fix or re-download config.json")
        self._infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, int] = {}
        self._bin_file: Path | None = None
        self._bin_tensors: dict[str, torch.Tensor] = {}
        self.format, self.shards, weight_map = self._find_weights()
        if self.format == "safetensors":
            self._open_safetensors(weight_map)
        else:
            self._open_bin(weight_map)

    def _find_weights(self) -> tuple[str, list[Path], dict[str, str] | None]:
        folder = self.folder
        for fmt, index_name, single in (
            ("safetensors", "model.safetensors.index.json", "model.safetensors"),
            ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            index_file = folder / index_name
            if index_file.is_file():
                index = _read_json(index_file, index_name)
                weight_map = index.get("weight_map") if isinstance(index, dict) else None
                if not isinstance(weight_map, dict) or not weight_map:
                    raise UpcycleError(f"{index_file} has no weight_map; re-download {index_name}")
                shards = list(dict.fromkeys(folder / shard for shard in weight_map.values()))
                for shard in shards:
                    if not shard.is_file():
                        raise UpcycleError(
                            f"{index_file} names shard {shard.name} but it is missing; re-download the checkpoint"
                        )
                return fmt, shards, weight_map
            if (folder / single).is_file():
                return fmt, [folder / single], None
            pattern = "*.safetensors" if fmt == "safetensors" else "pytorch_model*.bin"
            found = sorted(p for p in folder.glob(pattern) if p.is_file())
            if found:
                return fmt, found, None
        raise UpcycleError(
            f"{folder} has no weights (no *.safetensors or pytorch_model*.bin); download the model weights into it"
        )

    def _open_safetensors(self, weight_map: dict[str, str] | None) -> None:
        per_file: dict[Path, tuple[dict[str, TensorInfo], dict[str, int]]] = {}
        for shard in self.shards:
            _, infos, offsets = read_safetensors_header(shard)
            per_file[shard] = (infos, offsets)
        if weight_map is None:
            for shard, (infos, offsets) in per_file.items():
                for name in infos:
                    if name in self._infos:
                        raise UpcycleError(
                            f"tensor {name} appears in both {self._infos[name].file.name} and {shard.name}; "
                            f"keep only one set of weight files in {self.folder}"
                        )
                self._infos.update(infos)
                self._offsets.update(offsets)
            return
        for name, shard_name in weight_map.items():
            infos, offsets = per_file[self.folder / shard_name]
            if name not in infos:
                raise UpcycleError(
                    f"the index says {name} is in {shard_name} but it is not there; re-download the checkpoint"
                )
            self._infos[name] = infos[name]
            self._offsets[name] = offsets[name]

    def _open_bin(self, weight_map: dict[str, str] | None) -> None:
        if weight_map is None:
            weight_map = {name: shard.name for shard in self.shards for name in self._load_bin(shard)}
        for name, shard_name in weight_map.items():
            tensors = self._load_bin(self.folder / shard_name)
            if name not in tensors:
                raise UpcycleError(
                    f"the index says {name} is in {shard_name} but it is not there; re-download the checkpoint"
                )
            tensor = tensors[name]
            if tensor.dtype not in dtype_codes():
                raise UpcycleError(
                    f"{self.folder / shard_name}: tensor {name} has unsupported dtype {tensor.dtype}; "
                    "convert the checkpoint to bf16/fp16/fp32 first"
                )
            self._infos[name] = TensorInfo(
                name, dtype_codes()[tensor.dtype], tuple(tensor.shape), tensor.nbytes, self.folder / shard_name
            )

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_file != file:
            self._bin_tensors = {}
            self._bin_file = None
            loaded = load_pickled_weights(file)
            if not isinstance(loaded, dict):
                raise UpcycleError(f"{file} does not hold a state dict; pass a checkpoint saved with save_pretrained")
            self._bin_tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
            self._bin_file = file
        return self._bin_tensors

    def names(self) -> list[str]:
        """All tensor names, in index (or file) order."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        """Name, dtype, shape, size and file of one tensor, without reading it."""
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{name} is not in the checkpoint at {self.folder}") from None

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor from disk into a fresh CPU tensor."""
        info = self.info(name)
        if self.format == "bin":
            return self._load_bin(info.file)[name]
        return self._read(info, 0, info.nbytes).view(info.dtype).reshape(info.shape)

    def _read(self, info: TensorInfo, start: int, count: int) -> torch.Tensor:
        """``count`` bytes of a safetensors tensor from byte ``start`` of its data, into a fresh uint8 tensor."""
        buffer = torch.empty(count, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        with open(info.file, "rb", buffering=0) as handle:
            handle.seek(self._offsets[info.name] + start)
            filled = 0
            while filled < count:
                got = handle.readinto(view[filled:])
                if not got:
                    raise _corrupted(info.file, f"{info.name} ends past the end of the file")
                filled += got
        return buffer

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of one tensor, reading only their bytes (safetensors)."""
        info = self.info(name)
        if self.format == "bin" or not info.shape:
            return self.get(name)[start:stop]
        row_bytes = info.nbytes // info.shape[0]
        return (
            self._read(info, start * row_bytes, (stop - start) * row_bytes)
            .view(info.dtype)
            .reshape(stop - start, *info.shape[1:])
        )

    def byte_range(self, name: str) -> tuple[Path, int] | None:
        """(file, offset) of a tensor's raw bytes in a safetensors file; None for .bin checkpoints."""
        info = self.info(name)
        return None if self.format == "bin" else (info.file, self._offsets[name])

    def total_bytes(self) -> int:
        """Sum of the sizes of all tensors."""
        return sum(info.nbytes for info in self._infos.values())

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.folder)!r}, format={self.format!r}, tensors={len(self._infos)})"
