"""`upcycle push` and --push-to-hub, through the real huggingface_hub client, against a local stand-in for the Hub.

The stand-in (tests/hub_standin.py) answers on 127.0.0.1 (``HF_ENDPOINT``): whoami, create repo, repo info,
create branch, validate-yaml, preupload and regular-mode NDJSON commits. It records every request, so the
tests can check what arrived, and that nothing was sent at all when a folder is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
from conftest import build_dense
from hub_standin import USER, HubStandIn
from test_card import benchmark_eval, eval_results, front_matter, snapshot
from test_cli import assert_one_line_error, run

from upcycle import hub as hub_module
from upcycle.hub import format_listing, upload_files

TOKEN = "hf_standinTOKEN_b7c1e5a9d3f2"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in Hub as HF_ENDPOINT, the token in HF_TOKEN, no stored login, short retry waits."""
    with HubStandIn(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
        home = tmp_path / "hf-home"
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.setenv("HF_XET_CACHE", str(home / "xet"))
        # huggingface_hub reads the token file's path at import: point it at an empty home, not this machine's login
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(hub_module, "RETRY_BACKOFF_S", 0.01)
        yield server


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A MoH conversion of a 'downloaded' model (its card's base_model is a Hub id), made once."""
    root = tmp_path_factory.mktemp("converted")
    dense = build_dense(snapshot(root, "org/tiny-llama"))
    result = run("convert", dense, root / "tiny-moh", "--shard-size", "150KB")  # several shards and an index
    assert result.exit_code == 0, result.output
    return root / "tiny-moh"


@pytest.fixture
def model(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "tiny-moh"))


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def push(*args: str):
    return run("push", *args)


def test_push_uploads_every_file_the_card_and_the_options(hub, model):
    result = push(
        model, "org/tiny-moh", "--private", "--revision", "dev", "--commit-message", "First upload of the MoH model"
    )
    assert result.exit_code == 0, result.output
    files = local_files(model)
    assert len(files) > 10 and "README.md" in files and "model.safetensors.index.json" in files
    assert len([name for name in files if name.endswith(".safetensors")]) >= 2
    assert hub.files("org/tiny-moh", "dev") == files  # every file, byte for byte, the card included
    assert hub.files("org/tiny-moh", "main") == {}  # the branch only
    repo = hub.repos["org/tiny-moh"]
    assert repo.private
    assert [(c["branch"], c["summary"]) for c in repo.commits] == [("dev", "First upload of the MoH model")]
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert (
        create.body["visibility"] == "private"
        and create.body["organization"] == "org"
        and create.body["name"] == "tiny-moh"
    )
    assert "/api/models/org/tiny-moh/branch/dev" in hub.paths("POST")
    assert all(r.authorized for r in hub.requests)  # the token went into the Authorization header
    assert any("upcycle/" in r.headers.get("user-agent", "") for r in hub.requests)
    assert f"pushed {model} to {hub.url}/org/tiny-moh/tree/dev" in result.stdout

    again = push(model, "org/tiny-moh", "--private", "--revision", "dev")  # an existing private repo and branch: fine
    assert again.exit_code == 0, again.output
    assert len(repo.commits) == 1  # nothing changed: no new commit


def test_push_defaults_public_main_and_own_namespace(hub, model):
    result = push(model, "tiny-moh")
    assert result.exit_code == 0, result.output
    repo_id = f"{USER}/tiny-moh"
    assert (
        not hub.repos[repo_id].private
        and "visibility" not in next(r for r in hub.requests if r.path == "/api/repos/create").body
    )
    assert hub.files(repo_id) == local_files(model)
    assert hub.repos[repo_id].commits[0]["summary"] == "Upload tiny-moh with upcycle"
    assert not any("/branch/" in path for path in hub.paths())


def test_private_refuses_an_existing_public_repository(hub, model):
    assert push(model, "org/tiny-moh").exit_code == 0
    commits = len(hub.repos["org/tiny-moh"].commits)
    assert_one_line_error(push(model, "org/tiny-moh", "--private"), "already exists and is public", "--private")
    assert len(hub.repos["org/tiny-moh"].commits) == commits


def test_dry_run_lists_files_with_sizes_and_sends_nothing(hub, model, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # no token needed
    result = push(model, "org/tiny-moh", "--dry-run", "--private", "--revision", "dev")
    assert result.exit_code == 0, result.output
    listing = upload_files(model)
    assert sorted(name for name, _ in listing) == sorted(local_files(model))
    assert format_listing(listing) in result.stdout
    total = sum(size for _, size in listing)
    assert f"{len(listing)} files" in result.stdout and f"({total:,} bytes)" in result.stdout
    for name, size in listing:
        line = next(line for line in result.stdout.splitlines() if line.startswith(name + " "))
        assert line.split()[-2:] == format_listing([(name, size)]).splitlines()[0].split()[-2:]
    assert "would upload to org/tiny-moh (branch dev)" in result.stdout and "nothing was uploaded" in result.stdout
    assert hub.requests == [] and hub.repos == {}


def test_rejected_token_is_one_clear_line(hub, model, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_thisTokenIsNotValid")
    result = push(model, "org/tiny-moh")
    assert_one_line_error(result, "token was rejected", "HTTP 401", "hf auth login", "HF_TOKEN")
    assert "hf_thisTokenIsNotValid" not in result.output
    assert hub.paths() == ["/api/whoami-v2"] and hub.repos == {}


def test_missing_token_is_one_clear_line(hub, model, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    assert_one_line_error(push(model, "org/tiny-moh"), "no Hugging Face token", "hf auth login", "HF_TOKEN")
    assert hub.requests == []


def test_stored_login_is_used_when_hf_token_is_unset(hub, model, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    token_file = Path(huggingface_hub.constants.HF_TOKEN_PATH)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text(TOKEN)
    assert push(model, "org/tiny-moh").exit_code == 0
    assert hub.files("org/tiny-moh") == local_files(model)


def test_token_without_write_access_names_the_namespace(hub, model):
    hub.fail(
        "POST",
        "/api/repos/create",
        403,
        body={"error": "You don't have the rights to create a model under this namespace"},
    )
    assert_one_line_error(
        push(model, "someone-else/tiny-moh"), "may not write to someone-else/tiny-moh", "HTTP 403", "hf auth login"
    )


def test_metadata_the_hub_refuses_is_one_line(hub, model):
    hub.fail(
        "POST",
        "/api/validate-yaml",
        400,
        body={"errors": [{"message": '"license" must be one of [apache-2.0, mit, ...]'}]},
    )
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1] == (
        'error: the Hub refused README.md\'s metadata ("license" must be one of [apache-2.0, mit, ...]); '
        "fix the card (or refresh it with `upcycle card`) and push again"
    )
    assert not any("/commit/" in path for path in hub.paths())


def test_transient_errors_are_retried(hub, model):
    hub.fail("GET", "/api/whoami-v2", 503)
    hub.fail("POST", "/api/repos/create", 502, times=2)
    hub.fail("POST", "/commit/", 503)  # huggingface_hub retries its own requests (one second)
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 0, result.output
    assert hub.paths().count("/api/whoami-v2") == 2 and hub.paths().count("/api/repos/create") == 3
    assert hub.paths().count("/api/models/org/tiny-moh/commit/main") == 2
    assert hub.files("org/tiny-moh") == local_files(model)
    assert "creating the repository: transient error (HTTP 502); retrying" in result.stderr


def test_a_lasting_server_error_ends_in_one_line(hub, model):
    hub.fail("POST", "/api/repos/create", 503, times=100)
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith(
        "error: the Hub answered HTTP 503 (after retries) while creating the repository"
    )
    assert "run the same command again" in result.stderr
    assert hub.paths().count("/api/repos/create") == hub_module.RETRY_ATTEMPTS and hub.repos == {}


def test_ctrl_c_during_the_upload_says_how_to_resume(hub, model, monkeypatch):
    import huggingface_hub

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", interrupted)
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith("interrupted: the upload stopped before it finished")
    assert "run the same command again" in result.stderr and not hub.files("org/tiny-moh")


def test_a_refused_connection_fails_at_once(hub, model, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    result = push(model, "org/tiny-moh")
    assert_one_line_error(
        result,
        "the Hub endpoint http://127.0.0.1:9 cannot be reached",
        "nothing was uploaded",
        "check the network connection and HF_ENDPOINT",
    )
    assert result.exit_code == 1 and "retrying" not in result.output


def test_an_unknown_host_fails_at_once(hub, model, monkeypatch):
    import socket

    real_getaddrinfo, lookups = socket.getaddrinfo, []

    def no_such_host(host, *args, **kwargs):
        if host == "hub.example.invalid":
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")
    result = push(model, "org/tiny-moh")
    assert_one_line_error(
        result, "the Hub endpoint http://hub.example.invalid cannot be reached", "nothing was uploaded", "HF_ENDPOINT"
    )
    assert lookups == ["hub.example.invalid"]  # one try: a name that does not resolve is not transient


@pytest.mark.parametrize("switch", ["environment", "at import", "a refused request"])
def test_offline_mode_fails_at_once(hub, model, monkeypatch, switch):
    if switch == "environment":  # HF_HUB_OFFLINE=1 set now
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # set when huggingface_hub was imported: its requests raise OfflineModeIsEnabled
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if switch == "a refused request":  # past the check before the first request: whoami itself is refused
        monkeypatch.setattr(hub_module, "offline_mode", lambda: False)
    result = push(model, "org/tiny-moh")
    assert_one_line_error(
        result,
        f"the Hub endpoint {hub.url} cannot be reached",
        "HF_HUB_OFFLINE=1 is set",
        "nothing was uploaded",
        "unset HF_HUB_OFFLINE",
    )
    assert result.exit_code == 1 and "retrying" not in result.output
    assert hub.requests == []
    assert push(model, "org/tiny-moh", "--dry-run").exit_code == 0  # a dry run sends nothing: offline is fine


def test_a_dropped_connection_is_retried(hub, model):
    hub.drop("POST", "/api/repos/create")  # retried by upcycle (huggingface_hub sends it once)
    hub.drop("POST", "/commit/")  # retried by huggingface_hub inside upload_folder
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 0, result.output
    assert "creating the repository: transient error (RemoteProtocolError); retrying" in result.stderr
    assert hub.paths().count("/api/repos/create") == 2
    assert hub.paths().count("/api/models/org/tiny-moh/commit/main") == 2
    assert hub.files("org/tiny-moh") == local_files(model)


def test_an_upload_is_not_retried_on_top_of_huggingface_hub(hub, model, monkeypatch):
    """huggingface_hub retries each commit request (5 times, then again in smaller batches): upcycle adds no round
    of its own, which would multiply those waits."""
    import huggingface_hub

    upload_folder, calls = huggingface_hub.HfApi.upload_folder, []

    def counted(self, **kwargs):
        calls.append(kwargs["repo_id"])
        return upload_folder(self, **kwargs)

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", counted)
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # huggingface_hub's waits (1 s, 2 s, ... 8 s)
    hub.fail("POST", "/commit/", 503, times=10_000)
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith(
        "error: the Hub answered HTTP 503 (after retries) while uploading"
    )
    assert calls == ["org/tiny-moh"] and "uploading: transient error" not in result.stderr
    assert hub.paths().count("/api/models/org/tiny-moh/commit/main") > 6  # huggingface_hub's own retries


def test_a_request_huggingface_hub_sends_once_is_retried(hub, model):
    hub.fail("POST", "/api/validate-yaml", 503)  # the first request of upload_folder, not retried inside it
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 0, result.output
    assert hub.paths().count("/api/validate-yaml") == 2 and "uploading: transient error (HTTP 503)" in result.stderr
    assert hub.files("org/tiny-moh") == local_files(model)


def _drop_a_shard(folder: Path) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).unlink()
    return f"shard {shard} named in model.safetensors.index.json is missing"


def _index_names_a_tensor_the_shard_lacks(folder: Path) -> str:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    path.write_text(json.dumps(index))
    return f"{shard} lacks 1 tensor(s) the index assigns to it (such as model.layers.9.mlp.up_proj.weight)"


def _truncate_a_shard(folder: Path) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    return f"{shard.name}: "


def _drop_the_modeling_file(folder: Path) -> str:
    (folder / "modeling_upcycle.py").unlink()
    return "modeling_upcycle.py is missing (config.json's auto_map needs it to load with trust_remote_code)"


def _drop_a_module_it_imports(folder: Path) -> str:
    (folder / "surgery.py").unlink()
    return "surgery.py is missing"


def _drop_the_card(folder: Path) -> str:
    (folder / "README.md").unlink()
    return "README.md (the model card) is missing; run `upcycle card` to write it"


def _with_model_index(folder: Path, model_index: str) -> None:
    card = folder / "README.md"
    text = card.read_text()
    end = text.index("\n---\n", 4)
    card.write_text(f"{text[:end]}\nmodel-index: {model_index}{text[end:]}")


def _model_index_without_task_type(folder: Path) -> str:
    _with_model_index(folder, '[{"name": "x", "results": [{"task": {}}]}]')
    return "README.md: its model-index is not valid (an entry lacks the required key 'type')"


def _model_index_without_metrics(folder: Path) -> str:
    _with_model_index(
        folder,
        '[{"name": "x", "results": [{"task": {"type": "text-generation"}, "dataset": {"type": "d", "name": "d"}}]}]',
    )
    return "README.md: its model-index is not valid (an entry lacks the required key 'metrics')"


def _model_index_not_a_list(folder: Path) -> str:
    _with_model_index(folder, '"tiny-moh"')
    return "README.md: its model-index is not valid (it is not a list of entries with a name and results"


def _drop_the_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return "config.json is missing"


def _local_base_model(folder: Path) -> str:
    card = folder / "README.md"
    card.write_text(card.read_text().replace('base_model: "org/tiny-llama"', 'base_model: "tiny-llama"'))
    return "base_model 'tiny-llama' is not a Hub model id"


@pytest.mark.parametrize(
    "damage",
    [
        _drop_a_shard,
        _index_names_a_tensor_the_shard_lacks,
        _truncate_a_shard,
        _drop_the_modeling_file,
        _drop_a_module_it_imports,
        _drop_the_card,
        _drop_the_config,
        _local_base_model,
        _model_index_without_task_type,
        _model_index_without_metrics,
        _model_index_not_a_list,
    ],
)
def test_an_invalid_folder_is_refused_before_any_request(hub, model, damage):
    problem = damage(model)
    for args in ([], ["--dry-run"]):
        result = push(model, "org/tiny-moh", *args)
        assert result.exit_code == 1 and "Traceback" not in result.output
        lines = result.stderr.splitlines()
        assert lines[0] == f"error: {model} cannot be published (1 problem); nothing was uploaded:", result.stderr
        assert len(lines) == 2 and lines[1].startswith("  - ") and problem in lines[1], result.stderr
    assert hub.requests == []


def assert_refused(hub, model: Path, *problems: str) -> None:
    """``push`` and ``push --dry-run`` both refuse ``model``, one line per problem (each containing its text), and
    nothing is sent."""
    for args in (["--dry-run"], []):
        result = push(model, "org/tiny-moh", *args)
        assert result.exit_code == 1 and "Traceback" not in result.output
        lines = result.stderr.splitlines()
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        assert lines[0] == f"error: {model} cannot be published ({count}); nothing was uploaded:", result.stderr
        assert len(lines) == 1 + len(problems) and all(line.startswith("  - ") for line in lines[1:]), result.stderr
        for problem in problems:
            assert sum(problem in line for line in lines[1:]) == 1, (problem, result.stderr)
        assert "would upload" not in result.stdout
    assert hub.requests == []


def test_a_link_out_of_the_folder_is_refused(hub, model, tmp_path):
    (tmp_path / "elsewhere" / "keys").mkdir(parents=True)
    outside = (tmp_path / "elsewhere").resolve()
    (outside / "notes.txt").write_text("not part of the model")
    (outside / "keys" / "a.txt").write_text("not part of the model either")
    (model / "notes.txt").symlink_to(outside / "notes.txt")  # an absolute link to a file
    (model / "docs").mkdir()
    (model / "docs" / "more.txt").symlink_to(Path("..", "..", "elsewhere", "notes.txt"))  # a relative one
    (model / "keys").symlink_to(outside / "keys", target_is_directory=True)  # a linked folder
    (model / "passwd.txt").symlink_to("/etc/passwd")
    fix = "copy the file in, or remove the link"
    assert_refused(
        hub,
        model,
        f"notes.txt is a link to {outside / 'notes.txt'}, outside the folder; {fix}",
        f"docs/more.txt is a link to {outside / 'notes.txt'}, outside the folder; {fix}",
        f"keys is a link to the folder {outside / 'keys'}, outside the folder; copy the folder in, or remove the link",
        f"passwd.txt is a link to {Path('/etc/passwd').resolve()}, outside the folder; {fix}",
    )


def test_a_broken_link_is_refused(hub, model, tmp_path):
    (model / "tokenizer.model").symlink_to(tmp_path / "gone")
    assert_refused(hub, model, f"tokenizer.model is a link to {tmp_path.resolve() / 'gone'}, which does not exist")


def test_a_link_to_a_file_of_the_folder_uploads_that_file(hub, model):
    """The Hub stores no links: huggingface_hub uploads the target's content under the link's name."""
    (model / "extra").mkdir()
    (model / "extra" / "notes.md").write_text("notes about the model\n")
    (model / "NOTES.md").symlink_to(Path("extra", "notes.md"))
    dry = push(model, "org/tiny-moh", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "NOTES.md " in dry.stdout and "extra/notes.md " in dry.stdout
    assert push(model, "org/tiny-moh").exit_code == 0
    uploaded = hub.files("org/tiny-moh")
    assert uploaded["NOTES.md"] == uploaded["extra/notes.md"] == b"notes about the model\n"
    assert uploaded == local_files(model)


def test_a_link_to_what_is_not_uploaded_is_refused(hub, model):
    (model / ".git").mkdir()
    (model / ".git" / "config").write_text('[remote "origin"]\n\turl = https://me:hf_secret@huggingface.co/me/x\n')
    (model / "git-config.txt").symlink_to(Path(".git", "config"))  # .git/ itself is never uploaded
    (model / "sub").mkdir()
    (model / "sub" / "a.txt").write_text("a")
    (model / "sub-link").symlink_to("sub", target_is_directory=True)  # huggingface_hub skips a linked folder's files
    assert_refused(
        hub,
        model,
        f"git-config.txt is a link to {(model / '.git' / 'config').resolve()}, which is not uploaded "
        "(huggingface_hub leaves out .git/ and .cache/huggingface/); copy the file in, or remove the link",
        "sub-link is a link to the folder sub, whose files huggingface_hub does not upload; "
        "replace the link with a copy of the folder, or remove it",
    )


SECRETS = [
    ".env",
    ".env.production",
    "deploy/server.pem",
    "tls.key",
    "id_rsa",
    "id_ed25519",
    ".netrc",
    ".git-credentials",
    "credentials.json",
    "hub.token",
    ".ENV",
    "sub/dir/.pypirc",
]


def test_files_that_look_like_secrets_are_refused(hub, model):
    for name in SECRETS:
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text("HF_TOKEN=hf_notARealToken\n")
    assert_refused(hub, model, *(f"{name} looks like a secret (" for name in SECRETS))
    line = push(model, "org/tiny-moh", "--dry-run").stderr.splitlines()[1]
    assert line.endswith("; move it out of the folder before publishing"), line


def test_the_git_folder_and_the_hub_cache_are_never_uploaded(hub, model):
    (model / ".git").mkdir()
    (model / ".git" / "config").write_text("[credential]\n\thelper = store\n")
    (model / "sub" / ".git").mkdir(parents=True)
    (model / "sub" / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / ".cache" / "huggingface").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "token").write_text("hf_notARealToken")
    dry = push(model, "org/tiny-moh", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert ".git" not in dry.stdout and ".cache" not in dry.stdout
    assert push(model, "org/tiny-moh").exit_code == 0
    uploaded = hub.files("org/tiny-moh")
    assert not any(".git/" in name or name.startswith(".cache/") for name in uploaded), sorted(uploaded)


@pytest.mark.parametrize(
    "repo_id", ["bad repo id!!", "org/tiny/moh", "org/tiny--moh", "org/tiny-moh.git", "tiny-moh-"]
)
def test_the_repository_id_is_checked_on_a_dry_run_too(hub, model, repo_id):
    for args in (["--dry-run"], []):
        result = push(model, repo_id, *args)
        assert_one_line_error(result, f"{repo_id!r} is not a Hub repository id", "use owner/name")
        assert result.exit_code == 1
    assert hub.requests == []


def test_every_problem_is_listed(hub, model):
    problems = [_drop_the_card(model), _drop_a_shard(model), _drop_the_modeling_file(model)]
    result = push(model, "org/tiny-moh")
    assert result.stderr.startswith(f"error: {model} cannot be published (3 problems)")
    for problem in problems:
        assert problem in result.stderr
    assert hub.requests == []


def test_the_token_appears_nowhere(hub, model, tmp_path, capfd):
    outputs = [
        push(model, "org/tiny-moh", "--private", "--commit-message", "upload"),
        push(model, "org/tiny-moh", "--dry-run"),
    ]
    hub.fail(
        "POST", "/api/repos/create", 500, times=100, body={"error": f"echoing the header: Bearer {TOKEN}"}
    )  # a server that leaks it
    outputs.append(push(model, "org/other"))
    assert [o.exit_code for o in outputs] == [0, 0, 1]
    assert hub.files("org/tiny-moh") == local_files(model)
    captured = capfd.readouterr()
    for text in [*(o.output for o in outputs), *(o.stderr for o in outputs), captured.out, captured.err]:
        assert TOKEN not in text
    assert "<token>" in outputs[2].stderr  # the leaked token was scrubbed from the message
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file
    assert all(TOKEN not in json.dumps(r.headers) for r in hub.requests)


def test_convert_push_to_hub(hub, tmp_path):
    dense = build_dense(snapshot(tmp_path, "org/tiny-llama"))
    result = run(
        "convert",
        dense,
        tmp_path / "out",
        "--method",
        "gqa",
        "--kv-heads",
        "1",
        "--push-to-hub",
        "org/tiny-mqa",
        "--private",
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert hub.files("org/tiny-mqa") == local_files(out) and hub.repos["org/tiny-mqa"].private
    card = (out / "README.md").read_text()
    assert "\n# org/tiny-mqa\n" in card and 'from_pretrained("org/tiny-mqa")' in card
    assert front_matter(card)["base_model"] == "org/tiny-llama"


def test_convert_push_to_hub_checks_before_converting(hub, tmp_path, monkeypatch):
    local = build_dense(tmp_path / "dense")
    result = run("convert", local, tmp_path / "out", "--push-to-hub", "org/x")
    assert_one_line_error(result, "--push-to-hub needs the Hub id", "--base-model")
    assert not (tmp_path / "out").exists() and hub.requests == []

    dense = build_dense(snapshot(tmp_path, "org/tiny-llama"))
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert_one_line_error(run("convert", dense, tmp_path / "out", "--push-to-hub", "org/x"), "token was rejected")
    assert not (tmp_path / "out").exists() and hub.repos == {}
    assert_one_line_error(run("convert", dense, tmp_path / "out", "--private"), "--private applies to --push-to-hub")
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--push-to-hub", "not a repo"), "not a Hub repository id"
    )
    assert not (tmp_path / "out").exists()


def test_local_folder_pushes_after_naming_its_base_model(hub, tmp_path):
    local = build_dense(tmp_path / "dense")
    assert run("convert", local, tmp_path / "out").exit_code == 0
    refused = push(tmp_path / "out", "org/x")
    assert refused.exit_code == 1 and "--base-model OWNER/NAME" in refused.stderr and hub.requests == []
    assert run("card", tmp_path / "out", "--base-model", "org/tiny-llama", "--name", "org/x").exit_code == 0
    assert push(tmp_path / "out", "org/x").exit_code == 0
    assert front_matter(hub.files("org/x")["README.md"].decode())["base_model"] == "org/tiny-llama"


def test_finetune_push_to_hub(hub, tmp_path, calibration_file):
    from test_finetune import write_recipe

    dense = build_dense(snapshot(tmp_path, "org/tiny-llama"))
    assert run("convert", dense, tmp_path / "moh", "--router", "learned").exit_code == 0
    recipe = write_recipe(tmp_path, tmp_path / "moh", calibration_file)
    result = run("finetune", recipe, "--push-to-hub", "org/tiny-moh-tuned")
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "final"
    assert hub.files("org/tiny-moh-tuned") == local_files(final)
    card = hub.files("org/tiny-moh-tuned")["README.md"].decode()
    assert "\n# org/tiny-moh-tuned\n" in card and "## Fine-tuning" in card
    assert front_matter(card)["base_model"] == "org/tiny-llama"


def test_the_installed_command_honours_hf_endpoint(hub, model, tmp_path):
    """A fresh process (huggingface_hub reads HF_ENDPOINT at import) pushes to the endpoint in its environment."""
    env = os.environ | {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(
        [sys.executable, "-m", "upcycle", "push", str(model), "org/tiny-moh"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert hub.files("org/tiny-moh") == local_files(model)
    assert TOKEN not in result.stdout + result.stderr


def test_an_invalid_model_index_names_the_fix(hub, model):
    _model_index_without_metrics(model)
    line = push(model, "org/tiny-moh", "--dry-run").stderr.splitlines()[1]
    assert f"rewrite the card with `upcycle card {model}` or fix it by hand" in line
    assert "ignore_metadata_errors" not in line


def test_a_card_with_benchmark_scores_pushes_with_its_model_index(hub, model):
    (model / "eval.json").write_text(json.dumps(benchmark_eval(str(model))))
    assert run("card", model).exit_code == 0
    card = (model / "README.md").read_text()
    assert "model-index" in front_matter(card)
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 0, result.output
    uploaded = hub.files("org/tiny-moh")
    assert uploaded["README.md"].decode() == card and "eval.json" in uploaded
    name, results = eval_results(card)
    assert name == "tiny-moh" and {(r[7], r[9]) for r in results} == {
        ("acc", 0.61),
        ("acc_norm", 0.59),
        ("exact_match,strict-match", 0.125),
    }
