"""Publishing a folder to the Hugging Face Hub: validate it, list what would go, push it.

Everything goes through ``huggingface_hub``: ``HfApi.whoami`` checks the token, ``create_repo``
creates the repository when it is missing, ``create_branch`` the target branch, and
``upload_folder`` uploads (with ``hf_xet`` installed this is its streamed multi-commit pipeline:
large folders are committed in batches and an interrupted upload resumes when run again, already
committed files being skipped). Transient failures (HTTP 408/429/5xx, dropped connections) are
retried with exponential backoff: by huggingface_hub for each request of an upload, and by
:func:`push_folder` around each step (the upload as a whole once more, which resumes it). The token
comes from ``HF_TOKEN`` or the stored login, goes only into request headers, and is scrubbed from any
message shown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from upcycle.checkpoint.card import REPORT_FILE
from upcycle.checkpoint.source import CARD_FILE, HUB_ID, card_metadata
from upcycle.errors import UpcycleError

T = TypeVar("T")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_ATTEMPTS = 4  # tries of each Hub call on a transient failure (whoami, create_repo, repo_info, create_branch)
UPLOAD_ATTEMPTS = 2  # tries of the whole upload: huggingface_hub already retries each of its requests 5 times
RETRY_BACKOFF_S = 1.0  # first wait; doubles after each failure
LOGIN_HINT = "run `hf auth login` (or set HF_TOKEN) with a token that has write access"


class FolderNotPublishable(UpcycleError):
    """A folder that fails validation: a one-line summary, then one line per problem."""

    def __init__(self, folder: Path, problems: list[str]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(
            "\n".join(
                [f"{folder} cannot be published ({count}); nothing was uploaded:", *(f"  - {p}" for p in problems)]
            )
        )


@dataclass(frozen=True)
class PushTarget:
    """Where a push goes, resolved and authenticated before anything is uploaded."""

    repo_id: str  # namespace/name
    endpoint: str
    token: str


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    url: str
    commit_url: str
    files: int
    bytes: int


# ---- validation (local; runs before any request) -------------------------------------------


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """(path in the repository, size in bytes) of every file ``upload_folder`` would send, sorted."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    folder = Path(folder)
    relative = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    kept = list(filter_repo_objects(relative, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    return [(name, (folder / name).stat().st_size) for name in kept]


def _load_json(path: Path, problems: list[str]) -> dict | None:
    if not path.exists():
        problems.append(f"{path.name} is missing")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{path.name} is not valid JSON ({' '.join(str(error).split())})")
        return None
    if not isinstance(value, dict):
        problems.append(f"{path.name} is not a JSON object")
        return None
    return value


def _safetensors_problems(file: Path, expected: set[str] | None) -> list[str]:
    """Problems of one safetensors file: a header that does not parse or does not fit the file, and (``expected``:
    the tensors the index assigns to it) tensors missing from it or not listed in the index."""
    from upcycle.checkpoint.reader import read_safetensors_header

    try:
        _, infos, _ = read_safetensors_header(file)
    except UpcycleError as error:
        return [f"{file.name}: {str(error).removeprefix(str(file)).lstrip(': ')}"]
    except OSError as error:
        return [f"{file.name} cannot be read ({error.strerror or error})"]
    if expected is None:
        return []
    problems = []
    missing, extra = sorted(expected - set(infos)), sorted(set(infos) - expected)
    if missing:
        problems.append(f"{file.name} lacks {len(missing)} tensor(s) the index assigns to it (such as {missing[0]})")
    if extra:
        problems.append(f"{file.name} holds {len(extra)} tensor(s) the index does not list (such as {extra[0]})")
    return problems


def _weights_problems(folder: Path) -> list[str]:
    index_file = next((folder / name for name in INDEX_FILES if (folder / name).exists()), None)
    if index_file is not None:
        problems: list[str] = []
        index = _load_json(index_file, problems)
        weight_map = (index or {}).get("weight_map")
        if index is not None and not (isinstance(weight_map, dict) and weight_map):
            return [f"{index_file.name} has no weight_map"]
        if not weight_map:
            return problems
        shards: dict[str, set[str]] = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(str(shard), set()).add(tensor)
        for shard, tensors in sorted(shards.items()):
            path = folder / shard
            if not path.is_file():
                problems.append(f"shard {shard} named in {index_file.name} is missing")
            elif shard.endswith(".safetensors"):
                problems += _safetensors_problems(path, tensors)
        return problems
    single = folder / "model.safetensors"
    if single.exists():
        return _safetensors_problems(single, None)
    if (folder / "pytorch_model.bin").exists():
        return []
    return ["no weights: neither model.safetensors nor model.safetensors.index.json"]


def _runtime_modules(auto_map: dict) -> list[str]:
    """The local Python modules ``auto_map`` names ("module.Class"; entries with "repo--" live in another
    repository)."""
    modules = []
    for value in auto_map.values():
        for reference in value if isinstance(value, list) else [value]:
            if isinstance(reference, str) and "--" not in reference and "." in reference:
                modules.append(reference.rsplit(".", 1)[0])
    return list(dict.fromkeys(modules))


def _sibling_imports(file: Path) -> list[str]:
    """Modules a runtime file imports from its own folder (``from .x import``)."""
    import ast

    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return []
    return [
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    ]


def _runtime_problems(folder: Path, config: dict) -> list[str]:
    """A custom architecture (``auto_map``) needs the files it names, and the sibling modules they import."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return []
    if not isinstance(auto_map, dict):
        return ["config.json: auto_map is not a mapping"]
    problems, seen, pending = [], set(), _runtime_modules(auto_map)
    while pending:
        module = pending.pop(0)
        if module in seen:
            continue
        seen.add(module)
        file = folder / f"{module.replace('.', '/')}.py"
        if not file.is_file():
            problems.append(f"{file.name} is missing (config.json's auto_map needs it to load with trust_remote_code)")
            continue
        pending += _sibling_imports(file)
    return problems


def _metadata_error(error: Exception) -> str:
    """The reason huggingface_hub gives for refusing a card's metadata, on one line and without its advice to pass
    ``ignore_metadata_errors``."""
    cause = error.__cause__ or error.__context__
    if isinstance(cause, KeyError):
        return f"an entry lacks the required key {cause.args[0]!r}" if cause.args else "a required key is missing"
    if isinstance(cause, TypeError):
        return f"it is not a list of entries with a name and results ({' '.join(str(cause).split())})"
    text = " ".join(str(cause or error).split())
    return text.split(" Pass `ignore_metadata_errors", 1)[0].rstrip(".") or type(error).__name__


def _card_problems(folder: Path) -> list[str]:
    card = folder / CARD_FILE
    if not card.is_file():
        hint = " run `upcycle card` to write it" if (folder / REPORT_FILE).exists() else " write a model card"
        return [f"{CARD_FILE} (the model card) is missing;{hint}"]
    metadata = card_metadata(folder)
    text = card.read_text(encoding="utf-8", errors="replace")
    if not metadata and text.startswith("---"):
        return [f"{CARD_FILE}: its front matter is not valid YAML"]
    problems = []
    bases = metadata.get("base_model") or []
    bad = [
        str(b)
        for b in ([bases] if isinstance(bases, str) else bases if isinstance(bases, list) else [bases])
        if not HUB_ID.match(str(b))
    ]
    if bad:
        problems.append(
            f"{CARD_FILE}: base_model {', '.join(map(repr, bad))} "
            f"{'is not a Hub model id' if len(bad) == 1 else 'are not Hub model ids'} "
            f"(owner/name; a local folder's name), which the Hub refuses; name the base model(s) with "
            f"`upcycle card {folder} --base-model OWNER/NAME` (repeat it for each), or fix the card by hand"
        )
    if metadata:
        from huggingface_hub import ModelCard

        try:
            ModelCard(text)
        except (ValueError, TypeError) as error:
            what = "its model-index" if "model-index" in metadata else "its front matter"
            problems.append(
                f"{CARD_FILE}: {what} is not valid ({_metadata_error(error)}), so the Hub would refuse it; "
                f"rewrite the card with `upcycle card {folder}` or fix it by hand"
            )
    return problems


def validate_folder(folder: Path) -> list[str]:
    """Everything that would make ``folder`` a broken Hub model, one line per problem ([] when it is fine)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UpcycleError(f"{folder} is not a folder; pass the folder to publish")
    problems: list[str] = []
    config = _load_json(folder / "config.json", problems)
    problems += _weights_problems(folder)
    if config is not None:
        problems += _runtime_problems(folder, config)
    problems += _card_problems(folder)
    return problems


def runtime_files() -> dict[str, bytes]:
    """File name -> content of upcycle's model runtime, the ``.py`` files a conversion copies into a checkpoint
    (``upcycle/modeling/*.py`` of the installed package, ``__init__.py`` aside)."""
    runtime_dir = (
        Path(__file__).resolve().parents[1] / "modeling"
    )  # upcycle.convert.RUNTIME_DIR, without importing torch
    return {file.name: file.read_bytes() for file in sorted(runtime_dir.glob("*.py")) if file.name != "__init__.py"}


def foreign_python(folder: Path, files: list[tuple[str, int]]) -> list[str]:
    """One warning per ``.py`` file among ``files`` (paths in ``folder``) that is not upcycle's runtime, by name and
    content: code that anyone loading the model with ``trust_remote_code`` runs."""
    from upcycle import __version__

    runtime, warnings = runtime_files(), []
    for name, _ in files:
        if not name.endswith(".py"):
            continue
        if name not in runtime:
            warnings.append(
                f"warning: {name} is Python code that is not upcycle's runtime; anyone who loads the model with "
                "trust_remote_code runs it: check it, or remove it before publishing"
            )
        elif (Path(folder) / name).read_bytes() != runtime[name]:
            warnings.append(
                f"warning: {name} differs from the runtime file of the installed upcycle {__version__} (edited, or "
                "written by another version); anyone who loads the model with trust_remote_code runs it: check it, "
                "or convert again to get the current runtime"
            )
    return warnings


def check_folder(folder: Path) -> list[tuple[str, int]]:
    """Refuse an invalid folder with the list of its problems; return the files to upload."""
    problems = validate_folder(folder)
    if problems:
        raise FolderNotPublishable(Path(folder), problems)
    return upload_files(folder)


# ---- the token and errors ------------------------------------------------------------------


def resolve_token(token: str | None = None) -> str:
    """``token``, else ``HF_TOKEN``, else the stored ``hf auth login`` token; a clear error when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise UpcycleError(f"no Hugging Face token; {LOGIN_HINT}")
    return token


def _scrub(text: str, token: str | None) -> str:
    text = " ".join(str(text).split())
    return text.replace(token, "<token>") if token else text


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(error: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return _status(error) in TRANSIENT_STATUS
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        c.__name__ == "TransportError" for c in type(error).__mro__
    )


def hub_error(error: BaseException, action: str, target: PushTarget) -> UpcycleError:
    """One clear line for a failed Hub call (``action``: what was being done), without the token."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = target.token
    if isinstance(error, LocalTokenNotFoundError):
        return UpcycleError(f"no Hugging Face token; {LOGIN_HINT}")
    status = _status(error)
    detail = _scrub(getattr(error, "server_message", None) or str(error).split("\n")[0], token)
    if isinstance(error, RevisionNotFoundError):
        return UpcycleError(
            f"the Hub found no such branch of {target.repo_id} while {action} (HTTP {status}: {detail}); "
            "check --revision, or push without it to main"
        )
    if isinstance(error, RepositoryNotFoundError) or (isinstance(error, HfHubHTTPError) and status == 404):
        if action == "checking the token":
            return UpcycleError(
                f"{target.endpoint} answered HTTP 404 while {action} ({detail}), so it is not a Hugging Face Hub "
                "API; check HF_ENDPOINT (unset it for huggingface.co)"
            )
        return UpcycleError(
            f"the Hub refused {target.repo_id} while {action}: repository not found, or the token's account may "
            f"not see it (HTTP {status}: {detail}); check the owner/name spelling and that the namespace is yours "
            f"or an organisation you may write to, or {LOGIN_HINT} for it"
        )
    if status == 401:
        return UpcycleError(f"the Hugging Face token was rejected (HTTP 401) by {target.endpoint}; {LOGIN_HINT}")
    if status == 403:
        return UpcycleError(
            f"the token may not write to {target.repo_id} (HTTP 403: {detail}); {LOGIN_HINT} for that namespace"
        )
    if isinstance(error, ValueError) and "Invalid metadata in README.md" in str(error):
        reasons = "; ".join(line.lstrip("- ").strip() for line in str(error).splitlines()[1:] if line.strip())
        return UpcycleError(
            f"the Hub refused README.md's metadata ({_scrub(reasons, token)}); "
            "fix the card (or refresh it with `upcycle card`) and push again"
        )
    if isinstance(error, HfHubHTTPError) and status == 400 and action == "creating the repository":
        return UpcycleError(
            f"the Hub refused to create {target.repo_id} (HTTP 400: {detail}): the repository id is invalid; "
            "use owner/name with letters, digits, '-', '_' and '.' (at most 96 characters, no '--' or '..')"
        )
    if (
        isinstance(error, HfHubHTTPError)
        and status is not None
        and 400 <= status < 500
        and status not in TRANSIENT_STATUS
    ):
        return UpcycleError(
            f"the Hub refused the request while {action} (HTTP {status}: {detail}); running again will not help: "
            "fix what the Hub names, then push again"
        )
    if isinstance(error, HfHubHTTPError):
        again = " (after retries)" if status in TRANSIENT_STATUS else ""
        return UpcycleError(
            f"the Hub answered HTTP {status}{again} while {action} ({detail}); run the same command again to resume"
        )
    if _is_transient(error):
        return UpcycleError(
            f"could not reach {target.endpoint} while {action} ({_scrub(error, token)}); check the connection "
            "and run the same command again to resume"
        )
    return UpcycleError(
        f"pushing to {target.repo_id} failed while {action} ({type(error).__name__}: {_scrub(error, token)})"
    )


def _with_retries(call: Callable[[], T], *, attempts: int, backoff: float, what: str) -> T:
    """Run ``call``; on a transient failure wait ``backoff``, 2x, 4x, ... seconds and try again (``attempts`` tries in
    all)."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == attempts or not _is_transient(error):
                raise
            wait = backoff * 2 ** (attempt - 1)
            print(
                f"{what}: transient error (HTTP {_status(error) or type(error).__name__}); retrying in {wait:g} s "
                f"[{attempt}/{attempts - 1}]",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


# ---- pushing -------------------------------------------------------------------------------


def _api(endpoint: str, token: str):
    from huggingface_hub import HfApi

    from upcycle import __version__

    return HfApi(endpoint=endpoint, token=token, library_name="upcycle", library_version=__version__)


def default_endpoint() -> str:
    """``HF_ENDPOINT`` as set now (huggingface_hub reads it once, at import), else the library's endpoint."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def prepare_push(
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    attempts: int | None = None,
    backoff: float | None = None,
) -> PushTarget:
    """Check the repo id and the token (``whoami``) before any work, and give the full ``namespace/name``."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UpcycleError(
            f"{repo_id!r} is not a Hub repository id; use owner/name (or name, for your own namespace)"
        ) from None
    target = PushTarget(repo_id, (endpoint or default_endpoint()).rstrip("/"), resolve_token(token))
    api = _api(target.endpoint, target.token)
    attempts, backoff = attempts or RETRY_ATTEMPTS, RETRY_BACKOFF_S if backoff is None else backoff
    try:
        user = _with_retries(lambda: api.whoami(), attempts=attempts, backoff=backoff, what="checking the token")
    except Exception as error:
        raise hub_error(error, "checking the token", target) from None
    full_id = repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"
    return PushTarget(full_id, target.endpoint, target.token)


def format_listing(files: list[tuple[str, int]]) -> str:
    """The files with their sizes and the total, one per line."""
    width = max((len(name) for name, _ in files), default=0)
    lines = [f"{name:<{width}}  {_size(size):>10}" for name, size in files]
    total = sum(size for _, size in files)
    return "\n".join(lines + [f"{len(files)} files, {_size(total)} ({total:,} bytes)"])


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count}"


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    target: PushTarget | None = None,
    attempts: int | None = None,
    backoff: float | None = None,
) -> PushResult | None:
    """Validate ``folder`` and upload it to ``repo_id`` (created when missing; ``revision``: a branch, created
    from main when missing). ``dry_run``: print what would be uploaded, with sizes, and send nothing.
    ``target``: from :func:`prepare_push`, when the token was checked earlier. Returns None on a dry run."""
    folder = Path(folder)
    files = check_folder(folder)
    for warning in foreign_python(folder, files):
        print(warning, file=sys.stderr, flush=True)
    if dry_run:
        where = f"{repo_id}" + (f" (branch {revision})" if revision else "")
        print(f"dry run: would upload to {where}:")
        print(format_listing(files))
        print("dry run: nothing was uploaded")
        return None
    attempts, backoff = attempts or RETRY_ATTEMPTS, RETRY_BACKOFF_S if backoff is None else backoff
    target = target or prepare_push(repo_id, token=token, endpoint=endpoint, attempts=attempts, backoff=backoff)
    api = _api(target.endpoint, target.token)
    branch = revision or "main"
    message = commit_message or f"Upload {folder.name} with upcycle"

    def step(action: str, call: Callable[[], T], tries: int | None = None) -> T:
        try:
            return _with_retries(call, attempts=tries or attempts, backoff=backoff, what=action)
        except UpcycleError:
            raise
        except Exception as error:
            raise hub_error(error, action, target) from None

    step(
        "creating the repository",
        lambda: api.create_repo(target.repo_id, private=True if private else None, exist_ok=True),
    )
    if private:
        info = step("reading the repository", lambda: api.repo_info(target.repo_id))
        if not info.private:
            raise UpcycleError(
                f"{target.repo_id} already exists and is public; --private only makes new repositories private: "
                "make it private on the Hub first, or drop --private"
            )
    if branch != "main":
        step(f"creating branch {branch}", lambda: api.create_branch(target.repo_id, branch=branch, exist_ok=True))
    total = sum(size for _, size in files)
    print(
        f"uploading {len(files)} files ({_size(total)}) to {target.repo_id}"
        + (f" (branch {branch})" if branch != "main" else ""),
        flush=True,
    )
    commit = step(
        "uploading",
        lambda: api.upload_folder(
            repo_id=target.repo_id, folder_path=folder, revision=revision, commit_message=message
        ),
        tries=min(attempts, UPLOAD_ATTEMPTS),
    )
    url = f"{target.endpoint}/{target.repo_id}" + (f"/tree/{branch}" if branch != "main" else "")
    print(f"pushed {folder} to {url}")
    return PushResult(target.repo_id, branch, url, str(getattr(commit, "commit_url", "") or ""), len(files), total)
