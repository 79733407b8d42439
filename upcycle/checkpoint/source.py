"""Where a checkpoint comes from: a local folder or a Hub id, and the Hub id and license it is known by.

Above the reader (which only reads a folder): here a reference (a folder, a Hub id, ``asset:smollm2-135m``)
becomes a folder, downloaded when needed; the model card names base models and licenses with it, and the Hub client
validates ids with it. :func:`open_source` is how a conversion opens each
input (SRC, every ``--expert``): resolved, read, refused when it is already an upcycle model, and its Hub id
resolved once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from upcycle.checkpoint.reader import CheckpointReader, one_line
from upcycle.errors import UpcycleError

CARD_FILE = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")
LICENSE_KEYS = ("license", "license_name", "license_link")
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "README.md",
]  # README: the license for the card


def names_hub_repo(reference: str) -> bool:
    """Whether ``reference`` is a Hub id (owner/name) rather than a local path: no such file or folder exists and it
    does not start with ``.`` or ``~``."""
    return (
        bool(HUB_ID.match(reference))
        and not reference.startswith((".", "~"))
        and not Path(reference).expanduser().exists()
    )


def snapshot_hub_id(path: str | Path) -> str | None:
    """The Hub id of a Hugging Face cache snapshot folder (``models--owner--name/snapshots/REV``), else None."""
    match = HF_CACHE_SNAPSHOT.search(Path(path).resolve().as_posix())
    return f"{match['owner']}/{match['name']}" if match else None


def local_name(path: str) -> str:
    """How a card names a local folder: its Hub id for a Hugging Face cache snapshot, else its name."""
    return snapshot_hub_id(Path(path).expanduser()) or Path(path).name


def card_metadata(folder: Path) -> dict:
    """The front matter of ``folder/README.md`` (a source checkpoint's card), or {} when absent or unreadable."""
    path = Path(folder) / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    import yaml  # here: reading a card is rare, and the command line starts faster without it

    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return metadata if isinstance(metadata, dict) else {}


def source_license(folder: Path) -> dict[str, str]:
    """The license a source checkpoint's card states: ``license``, and ``license_name``/``license_link`` for
    "other"."""
    metadata = card_metadata(folder)
    return {key: str(metadata[key]) for key in LICENSE_KEYS if isinstance(metadata.get(key), (str, int, float))}


def hub_model_id(reference: str, folder: Path, config: dict | None = None) -> str | None:
    """The Hub id a source came from, when one is known: the reference itself, a Hugging Face cache
    snapshot folder (``models--owner--name/snapshots/...``), the config's ``_name_or_path``, or the one
    ``base_model`` the folder's own card names; else None (a local folder: the Hub refuses ``base_model``
    values that are not model ids)."""
    if names_hub_repo(reference):
        return reference
    from_cache = snapshot_hub_id(folder)
    if from_cache:
        return from_cache
    candidate = str((config or {}).get("_name_or_path") or "")
    if HUB_ID.match(candidate) and not Path(candidate).exists() and not candidate.startswith((".", "/", "~")):
        return candidate
    # a local derivative (e.g. a dequantised GGUF) names its Hub model in its own card
    ancestor = card_metadata(folder).get("base_model")
    if isinstance(ancestor, str) and HUB_ID.match(ancestor):
        return ancestor
    return None


def source_hub_id(src: str) -> str | None:
    """The Hub id of SRC when it is known without downloading anything (an id, a Hugging Face cache snapshot,
    or a config whose ``_name_or_path`` is one): what a pushed card can name as its ``base_model``."""
    path = Path(src).expanduser()
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = {}
    return hub_model_id(src, path, config if isinstance(config, dict) else {})


def refuse_converted(config: dict, source: str) -> None:
    """An upcycled model is not a dense input: say what it is, in one line."""
    block = config.get("upcycle")
    if block or str(config.get("model_type", "")).startswith("upcycle_"):
        method = (block or {}).get("method", "unknown")
        base = (block or {}).get("base_model_type", config.get("model_type"))
        raise UpcycleError(
            f"{source} is already an upcycle {method} model (converted from a {base} checkpoint); "
            "convert the original dense checkpoint instead"
        )


@dataclass(frozen=True)
class Source:
    """One opened input of a conversion: the reference as given (a folder or a Hub id), the local folder it resolved
    to, its reader, and which input it is (``role``: SRC, --expert)."""

    reference: str
    folder: Path
    reader: CheckpointReader
    role: str = "SRC"

    @cached_property
    def hub_id(self) -> str | None:
        """The Hub id the source came from (:func:`hub_model_id`), resolved once, when first asked for."""
        return hub_model_id(self.reference, self.folder, self.reader.config)

    @property
    def base_model(self) -> str:
        """What a model card calls this source: its Hub id when one is known, else the name of the reference."""
        return self.hub_id or Path(self.reference).name


def open_source(reference: str, *, role: str = "SRC") -> Source:
    """Open one input of a conversion: a local model folder, or a Hub id (downloaded into the Hugging Face cache).

    Every problem is one line: a missing folder, a failed download, a folder that is not a checkpoint, and a model
    that upcycle already converted (convert the original dense checkpoint instead)."""
    folder = resolve_source(reference)
    reader = CheckpointReader(folder)
    refuse_converted(reader.config, reference)
    return Source(reference, folder, reader, role)


def resolve_model(reference: str) -> Path:
    """A model folder from a path, a Hub id, or ``asset:smollm2-135m``."""
    if reference == "asset:smollm2-135m":
        from upcycle.assets import smollm2_135m

        return smollm2_135m()
    if reference.startswith("asset:"):
        raise UpcycleError(f"model {reference} is not a known asset; the only model asset is asset:smollm2-135m")
    return resolve_source(reference)


def resolve_source(src: str) -> Path:
    """Turn a local folder or a Hub id `owner/name` into a local model folder."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UpcycleError(f"{src} is a file, not a model folder; pass the folder that holds config.json")
        return path
    if names_hub_repo(src):
        return _download(src)
    raise UpcycleError(f"{src} does not exist; pass an existing model folder or a Hub id like owner/name")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # an older repo with pickled weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=[*HUB_PATTERNS, "pytorch_model*.bin"]))
        return folder
    except Exception as error:
        raise UpcycleError(
            f"could not download {repo_id} from the Hugging Face Hub (offline or missing: {one_line(error)}); "
            "pass a local model folder instead"
        ) from None
