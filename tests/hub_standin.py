"""A small local HTTP server standing in for the Hugging Face Hub API (``HF_ENDPOINT``) in the tests.

It implements just what ``huggingface_hub``'s ``whoami``, ``create_repo``, ``repo_info``,
``create_branch`` and ``upload_folder`` (the streamed multi-commit pipeline: ``validate-yaml``,
``preupload``, NDJSON ``commit``, and the revision info it reads when nothing changed) call, keeps
the repositories in memory, and records every request (method, path, query, headers without the
token, JSON or NDJSON body) so that tests can check what arrived. Every file is answered
``uploadMode: regular`` (inlined in the commit): Xet and LFS transfers of large files are not
implemented. ``fail(...)`` injects error answers, ``drop(...)`` connections closed before any answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "standin-user"
REPO_PATH = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>preupload|commit|branch|revision)/(?P<rev>.+))?$"
)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DROP = 0  # the status of a failure that closes the connection without an answer (a connection dropped mid-request)


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub returns as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names, without authorization
    authorized: bool
    body: object = None  # parsed JSON, the list of NDJSON items of a commit, or None


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)  # {"branch", "summary", "description", "files", "oid"}


@dataclass
class Failure:
    method: str
    path_part: str
    status: int  # DROP: close the connection without answering
    times: int
    headers: dict[str, str]
    body: dict


class HubStandIn:
    """Start with ``with HubStandIn(token) as hub:``; ``hub.url`` is the endpoint."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.failures: list[Failure] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(
        self,
        method: str,
        path_part: str,
        status: int,
        times: int = 1,
        headers: dict | None = None,
        body: dict | None = None,
    ) -> None:
        """Answer the next ``times`` requests whose path contains ``path_part`` with ``status``."""
        self.failures.append(
            Failure(method, path_part, status, times, headers or {}, body or {"error": f"stand-in error {status}"})
        )

    def drop(self, method: str, path_part: str, times: int = 1) -> None:
        """Close the connection of the next ``times`` requests whose path contains ``path_part`` without answering."""
        self.failures.append(Failure(method, path_part, DROP, times, {}, {}))

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    # ---- request handling (server threads) ----------------------------------------------

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], dict]:
        url = urlsplit(raw_path)
        path, query = unquote(url.path), parse_qs(url.query)
        authorized = headers.get("authorization") == f"Bearer {self.token}"
        parsed: object = None
        if body and "ndjson" in headers.get("content-type", ""):
            parsed = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        elif body:
            parsed = json.loads(body)
        with self._lock:
            self.requests.append(
                Request(
                    method, path, query, {k: v for k, v in headers.items() if k != "authorization"}, authorized, parsed
                )
            )
            for failure in self.failures:
                if failure.times > 0 and failure.method == method and failure.path_part in path:
                    failure.times -= 1
                    return failure.status, failure.headers, failure.body
            if not authorized:
                return (
                    401,
                    {"X-Error-Message": "Invalid credentials in Authorization header"},
                    {"error": "Invalid credentials in Authorization header"},
                )
            return self._route(method, path, parsed)

    def _route(self, method: str, path: str, body) -> tuple[int, dict[str, str], dict]:
        if method == "GET" and path == "/api/whoami-v2":
            return (
                200,
                {},
                {"type": "user", "name": USER, "auth": {"type": "access_token", "accessToken": {"role": "write"}}},
            )
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(body["content"])
        if method == "POST" and path == "/api/repos/create":
            repo_id = f"{body.get('organization') or USER}/{body['name']}"
            if body.get("type", "model") != "model":
                return 400, {}, {"error": "the stand-in only holds model repositories"}
            if repo_id in self.repos:
                return 409, {}, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
            self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
            return 200, {}, {"url": f"{self.url}/{repo_id}", "name": repo_id}
        match = REPO_PATH.match(path)
        if not match:
            return 404, {}, {"error": f"the stand-in does not implement {method} {path}"}
        repo_id, op, rev = match["repo"], match["op"], match["rev"]
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"}
        if op is None and method == "GET":
            return (
                200,
                {},
                {"id": repo_id, "private": repo.private, "sha": repo.commits[-1]["oid"] if repo.commits else "0" * 40},
            )
        if op == "branch" and method == "POST":
            if rev in repo.branches:
                return 409, {}, {"error": "Reference already exists"}
            start = body.get("startingPoint") or "main"
            repo.branches[rev] = dict(repo.branches[start])
            return 200, {}, {}
        if rev not in repo.branches:
            return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {rev}"}
        if op == "revision" and method == "GET":  # what upload_folder asks when there was nothing new to commit
            head = next((c["oid"] for c in reversed(repo.commits) if c["branch"] == rev), "0" * 40)
            return (
                200,
                {},
                {
                    "id": repo_id,
                    "private": repo.private,
                    "sha": head,
                    "siblings": [{"rfilename": name} for name in sorted(repo.branches[rev])],
                },
            )
        if op == "preupload" and method == "POST":
            existing = repo.branches[rev]
            return (
                200,
                {},
                {
                    "files": [
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_oid(existing[f["path"]]) if f["path"] in existing else None,
                        }
                        for f in body["files"]
                    ]
                },
            )
        if op == "commit" and method == "POST":
            return self._commit(repo_id, repo, rev, body)
        return 404, {}, {"error": f"the stand-in does not implement {method} {path}"}

    def _validate_yaml(self, content: str) -> tuple[int, dict[str, str], dict]:
        """The Hub refuses malformed front matter and a ``base_model`` that is not a model id (a local path)."""
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if not match:
            return 200, {}, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata in repo card"}]}
        try:
            metadata = yaml.safe_load(match.group(1))
        except yaml.YAMLError as error:
            return 400, {}, {"errors": [{"message": f"invalid YAML: {error}"}]}
        if not isinstance(metadata, dict):
            return 400, {}, {"errors": [{"message": "metadata must be a mapping"}]}
        bases = metadata.get("base_model", [])
        for base in [bases] if isinstance(bases, str) else bases:
            if not REPO_ID.match(str(base)):
                return (
                    400,
                    {},
                    {
                        "errors": [
                            {
                                "message": f'"base_model" with value "{base}" is not valid. Use a model id from https://hf.co/models.'
                            }
                        ]
                    },
                )
        return 200, {}, {"errors": [], "warnings": []}

    def _commit(self, repo_id: str, repo: Repo, branch: str, items: list[dict]) -> tuple[int, dict[str, str], dict]:
        header = items[0]["value"] if items and items[0]["key"] == "header" else None
        if header is None:
            return 400, {}, {"error": "the commit has no header"}
        files, deleted = {}, []
        for item in items[1:]:
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                deleted.append(item["value"]["path"])
            else:
                return 400, {}, {"error": f"the stand-in does not implement commit items of kind {item['key']}"}
        tree = repo.branches[branch]
        tree.update(files)
        for path in deleted:
            tree.pop(path, None)
        oid = hashlib.sha1(
            json.dumps([repo.commits[-1]["oid"] if repo.commits else "", header, sorted(files)]).encode()
        ).hexdigest()
        repo.commits.append(
            {
                "branch": branch,
                "summary": header["summary"],
                "description": header.get("description", ""),
                "files": sorted(files),
                "oid": oid,
            }
        )
        return (
            200,
            {},
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.url}/{repo_id}/commit/{oid}",
                "pullRequestUrl": None,
            },
        )


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, extra, payload = hub.handle(self.command, self.path, headers, body)
            if status == DROP:
                self.close_connection = True
                return
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **extra}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args: object) -> None:  # keep the test output quiet
            pass

    return Handler
