"""Publishing a folder to the Hugging Face Hub: validate it, list what would go, push it.

Everything goes through ``huggingface_hub``: ``HfApi.whoami`` checks the token, ``create_repo``
creates the repository when it is missing, ``create_branch`` the target branch, and
``upload_folder`` uploads (with ``hf_xet`` installed this is its streamed multi-commit pipeline:
large folders are committed in batches and an interrupted upload resumes when run again, already
committed files being skipped). Transient failures (HTTP 408/429/5xx, timeouts, a connection dropped
mid-request) are retried with exponential backoff, each request by one side only (see :func:`push_folder`). A
connection that cannot be made at all (refused, an unknown host, ``HF_HUB_OFFLINE``) is not transient: it fails at
once. The token comes from ``HF_TOKEN`` or the stored login, goes only into request headers, and is scrubbed from
any message shown.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from upcycle.card import REPORT_FILE, repo_id_problem
from upcycle.checkpoint.reader import RUNTIME_DIR
from upcycle.checkpoint.source import CARD_FILE, HUB_ID, card_metadata
from upcycle.errors import UpcycleError

T = TypeVar("T")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RETRY_ATTEMPTS = 4  # tries of each Hub call on a transient failure (whoami, create_repo, repo_info, create_branch)
UPLOAD_ATTEMPTS = 2  # tries of the upload when it failed on a request that huggingface_hub sends only once
RETRY_BACKOFF_S = 1.0  # first wait; doubles after each failure
# the requests of upload_folder that huggingface_hub retries itself (http_backoff: 5 retries, waits of 1 s up to 8 s;
# a failing commit is then tried again in smaller batches); a failure there is final for upcycle
RETRIED_BY_HUGGINGFACE_HUB = ("/preupload/", "/commit/")
LOGIN_HINT = "run `hf auth login` (or set HF_TOKEN) with a token that has write access"
NETWORK_HINT = "check the network connection and HF_ENDPOINT (unset it for huggingface.co)"
# names of files that hold credentials or keys (matched case-insensitively against the file name, in any subfolder)
SECRET_PATTERNS = (
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    ".netrc",
    "_netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".htpasswd",
    ".pgpass",
    "credentials",
    "credentials.json",
    "*.token",
    "token",
    "stored_tokens",
)


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


def _uploaded(names: list[str]) -> list[str]:
    """The paths (relative, with ``/``) that ``upload_folder`` keeps: all but ``.git/`` and ``.cache/huggingface/``
    (huggingface_hub's ``DEFAULT_IGNORE_PATTERNS``)."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    return list(filter_repo_objects(names, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def upload_files(folder: Path) -> list[tuple[str, int]]:
    """(path in the repository, size in bytes) of every file ``upload_folder`` would send, sorted. It lists the
    folder as huggingface_hub does: files behind a link are read, linked folders are not entered."""
    folder = Path(folder)
    relative = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    return [(name, (folder / name).stat().st_size) for name in _uploaded(relative)]


def _link_problem(folder: Path, link: Path, uploaded: set[str]) -> str | None:
    """What is wrong with the link ``link`` in ``folder`` (resolved): it leads out of the folder, to nothing, to a file
    huggingface_hub does not upload, or to a folder (whose files huggingface_hub does not upload). A link to a file
    that is uploaded anyway is fine: the Hub stores no links, so that content is uploaded under both names."""
    name = link.relative_to(folder).as_posix()
    target = Path(os.path.realpath(link))
    if not target.exists():
        return f"{name} is a link to {target}, which does not exist; remove the link, or copy the file in"
    kind = "folder" if target.is_dir() else "file"
    try:
        inside = target.relative_to(folder).as_posix()
    except ValueError:
        return (
            f"{name} is a link to {'the folder ' if kind == 'folder' else ''}{target}, outside the folder; "
            f"copy the {kind} in, or remove the link"
        )
    if kind == "folder":
        return (
            f"{name} is a link to the folder {inside}, whose files huggingface_hub does not upload; "
            "replace the link with a copy of the folder, or remove it"
        )
    if inside not in uploaded:
        return (
            f"{name} is a link to {target}, which is not uploaded (huggingface_hub leaves out .git/ and "
            ".cache/huggingface/); copy the file in, or remove the link"
        )
    return None


def _secret_pattern(name: str) -> str | None:
    """The pattern of :data:`SECRET_PATTERNS` that the file name ``name`` matches, if any."""
    base = name.rsplit("/", 1)[-1].lower()
    return next((pattern for pattern in SECRET_PATTERNS if fnmatch.fnmatchcase(base, pattern)), None)


def _content_problems(folder: Path) -> list[str]:
    """Files the upload would send that the user cannot mean to publish: links out of the folder (or to what is
    not uploaded, or to a folder), and files that look like secrets (``.env``, keys, credentials, tokens)."""
    root = Path(os.path.realpath(folder))
    uploaded = set(_uploaded([p.relative_to(root).as_posix() for p in root.glob("**/*") if p.is_file()]))
    problems = []
    for directory, folders, files in os.walk(root):  # does not enter linked folders
        here = Path(directory)
        for entry in sorted(folders + files):
            path = here / entry
            name = path.relative_to(root).as_posix()
            if not _uploaded([name]):
                continue  # .git/ and .cache/huggingface/: never uploaded, links there included
            if path.is_symlink():
                problem = _link_problem(root, path, uploaded)
                if problem:
                    problems.append(problem)
                    continue
            if path.is_file():
                pattern = _secret_pattern(name) or (path.is_symlink() and _secret_pattern(os.path.realpath(path)))
                if pattern:
                    problems.append(
                        f"{name} looks like a secret (a file named {pattern}), and everything in the folder is "
                        "published; move it out of the folder before publishing"
                    )
        folders[:] = [f for f in folders if _uploaded([(here / f).relative_to(root).as_posix()])]
    return problems


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
    problems: list[str] = _content_problems(folder)
    config = _load_json(folder / "config.json", problems)
    problems += _weights_problems(folder)
    if config is not None:
        problems += _runtime_problems(folder, config)
    problems += _card_problems(folder)
    return problems


def runtime_files() -> dict[str, bytes]:
    """File name -> content of upcycle's model runtime, the ``.py`` files a conversion copies into a checkpoint
    (``upcycle/modeling/*.py`` of the installed package, ``__init__.py`` aside)."""
    return {file.name: file.read_bytes() for file in sorted(RUNTIME_DIR.glob("*.py")) if file.name != "__init__.py"}


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


def _is_unreachable(error: BaseException) -> bool:
    """A connection that could not be made at all: refused, a host name that does not resolve, no route, a TLS
    handshake that fails, or ``HF_HUB_OFFLINE`` (huggingface_hub's ``OfflineModeIsEnabled``). Trying again at once
    does not help."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(error, (OfflineModeIsEnabled, ConnectionRefusedError, socket.gaierror)):
        return True
    return any(c.__name__ == "ConnectError" for c in type(error).__mro__)  # httpx's, huggingface_hub's client


def _is_transient(error: BaseException) -> bool:
    """A failure that trying again may cure: HTTP 408/429/5xx, a timeout, a connection dropped mid-request."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        return _status(error) in TRANSIENT_STATUS
    if _is_unreachable(error):
        return False
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        c.__name__ == "TransportError" for c in type(error).__mro__
    )


def _failed_url(error: BaseException) -> str:
    """The URL of the request that failed (an HTTP answer's, or a transport error's), or ""."""
    request = getattr(getattr(error, "response", None), "request", None)
    if request is None:
        try:
            request = getattr(error, "request", None)  # httpx raises RuntimeError when it was never set
        except RuntimeError:
            request = None
    return str(getattr(request, "url", "") or "")


def _retried_by_huggingface_hub(error: BaseException) -> bool:
    """Whether the failed request is one that huggingface_hub already retried itself (see
    :data:`RETRIED_BY_HUGGINGFACE_HUB`)."""
    url = _failed_url(error)
    return any(part in url for part in RETRIED_BY_HUGGINGFACE_HUB)


def offline_error(endpoint: str) -> UpcycleError:
    """The one line for a push while huggingface_hub's offline mode is on."""
    value = os.environ.get("HF_HUB_OFFLINE") or "1"
    return UpcycleError(
        f"the Hub endpoint {endpoint} cannot be reached: HF_HUB_OFFLINE={value} is set, so huggingface_hub sends no "
        "request and nothing was uploaded; unset HF_HUB_OFFLINE (or set it to 0) and push again"
    )


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now, or was when huggingface_hub was imported (it then refuses requests)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in constants.ENV_VARS_TRUE_VALUES or bool(constants.HF_HUB_OFFLINE)


def hub_error(error: BaseException, action: str, target: PushTarget) -> UpcycleError:
    """One clear line for a failed Hub call (``action``: what was being done), without the token."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    token = target.token
    if isinstance(error, LocalTokenNotFoundError):
        return UpcycleError(f"no Hugging Face token; {LOGIN_HINT}")
    if isinstance(error, OfflineModeIsEnabled):
        return offline_error(target.endpoint)
    if _is_unreachable(error):
        problem = f"the Hub endpoint {target.endpoint} cannot be reached while {action} ({_scrub(error, token)})"
        if action == "uploading":  # after huggingface_hub's retries; earlier batches may have been committed
            return UpcycleError(
                f"{problem}, and what was already committed stays; {NETWORK_HINT}, then run the same command again "
                "to resume"
            )
        return UpcycleError(f"{problem}, so nothing was uploaded; {NETWORK_HINT}")
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
            f"the connection to {target.endpoint} failed while {action}, after retries ({type(error).__name__}: "
            f"{_scrub(error, token)}); check the connection and run the same command again to resume"
        )
    return UpcycleError(
        f"pushing to {target.repo_id} failed while {action} ({type(error).__name__}: {_scrub(error, token)})"
    )


def _with_retries(
    call: Callable[[], T],
    *,
    attempts: int,
    backoff: float,
    what: str,
    retry: Callable[[BaseException], bool] = _is_transient,
) -> T:
    """Run ``call``; on a failure that ``retry`` accepts (a transient one) wait ``backoff``, 2x, 4x, ... seconds and
    try again (``attempts`` tries in all)."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == attempts or not retry(error):
                raise
            wait = backoff * 2 ** (attempt - 1)
            status = _status(error)
            print(
                f"{what}: transient error ({f'HTTP {status}' if status else type(error).__name__}); retrying in "
                f"{wait:g} s [{attempt}/{attempts - 1}]",
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
    """Check the repo id, that the Hub may be contacted (``HF_HUB_OFFLINE``) and the token (``whoami``) before any
    work, and give the full ``namespace/name``."""
    check_repo_id(repo_id)
    endpoint = (endpoint or default_endpoint()).rstrip("/")
    if offline_mode():
        raise offline_error(endpoint)
    target = PushTarget(repo_id, endpoint, resolve_token(token))
    api = _api(target.endpoint, target.token)
    attempts, backoff = attempts or RETRY_ATTEMPTS, RETRY_BACKOFF_S if backoff is None else backoff
    try:
        user = _with_retries(lambda: api.whoami(), attempts=attempts, backoff=backoff, what="checking the token")
    except Exception as error:
        raise hub_error(error, "checking the token", target) from None
    full_id = repo_id if "/" in repo_id else f"{user['name']}/{repo_id}"
    return PushTarget(full_id, target.endpoint, target.token)


def check_repo_id(repo_id: str) -> None:
    """Refuse, in one line, a repository id that huggingface_hub's ``validate_repo_id`` refuses (as the real push
    would, before any request)."""
    problem = repo_id_problem(repo_id)
    if problem:
        raise UpcycleError(
            f"{repo_id!r} is not a Hub repository id ({problem}); use owner/name (or name, for your own namespace)"
        )


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
    check_repo_id(repo_id)
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

    # What is retried where. huggingface_hub sends whoami, create_repo, repo_info and create_branch once: upcycle
    # retries them on a transient failure (RETRY_ATTEMPTS tries). Inside upload_folder, huggingface_hub retries the
    # preupload and commit requests itself (RETRIED_BY_HUGGINGFACE_HUB), and hf_xet its transfers: upcycle runs the
    # upload again (which resumes it) only when it failed on a request huggingface_hub sends once (validate-yaml,
    # the final revision info), so that no wait is multiplied. upcycle never retries a connection that cannot be
    # made at all (_is_unreachable); huggingface_hub still does for preupload and commit.
    def step(
        action: str,
        call: Callable[[], T],
        tries: int | None = None,
        retry: Callable[[BaseException], bool] = _is_transient,
    ) -> T:
        try:
            return _with_retries(call, attempts=tries or attempts, backoff=backoff, what=action, retry=retry)
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
        retry=lambda error: _is_transient(error) and not _retried_by_huggingface_hub(error),
    )
    url = f"{target.endpoint}/{target.repo_id}" + (f"/tree/{branch}" if branch != "main" else "")
    print(f"pushed {folder} to {url}")
    return PushResult(target.repo_id, branch, url, str(getattr(commit, "commit_url", "") or ""), len(files), total)
