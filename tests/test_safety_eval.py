"""Bad input to `eval` and `push`, and bad data files, end in one clear line (and nothing half-written or wasted work);
`push` warns about Python files that are not upcycle's runtime."""

from __future__ import annotations

import importlib
import json
import os

import datasets
import pytest
from conftest import VOCAB, build_dense, tiny_tokenizer
from test_cli import assert_one_line_error, run
from test_push import TOKEN, converted, hub, local_files, model, push  # noqa: F401  (fixtures)

from upcycle.data import text as text_module
from upcycle.data.corpus import DataConfig, build_corpus
from upcycle.errors import UpcycleError

evaluate_module = importlib.import_module(
    "upcycle.eval.evaluate"
)  # the module (upcycle.eval.evaluate is also a function)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return build_dense(tmp_path_factory.mktemp("eval") / "dense")  # max_position_embeddings 256


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "heldout.txt"
    path.write_text("\n\n".join(" ".join(VOCAB[3 + (7 * i + j) % 120] for j in range(100)) for i in range(6)) + "\n")
    return path  # 600 tokens: longer than the model's 256 positions


@pytest.fixture
def no_scoring(monkeypatch):
    """Fail the test if a model is scored: the refusals below come before any evaluation."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was evaluated before the input was checked")

    monkeypatch.setattr(evaluate_module, "_evaluate_streams", refuse)


# ---- eval --json PATH ------------------------------------------------------------------------------------------


def test_eval_json_into_a_missing_folder_or_below_a_file_is_refused_before_evaluating(
    dense, corpus, tmp_path, monkeypatch, no_scoring
):
    missing = tmp_path / "missing" / "eval.json"
    assert_one_line_error(
        run("eval", dense, "--data", corpus, "--json", missing), "--json", str(tmp_path / "missing"), "does not exist"
    )
    assert not missing.parent.exists()
    below_a_file = corpus / "eval.json"  # its parent is a regular file
    assert_one_line_error(
        run("eval", dense, "--data", corpus, "--json", below_a_file), "--json", "is a file, not a folder"
    )
    deeper = corpus / "sub" / "eval.json"
    assert_one_line_error(run("eval", dense, "--data", corpus, "--json", deeper), "is a file, not a folder")
    assert_one_line_error(
        run("eval", dense, "--data", corpus, "--json", tmp_path), "--json", "is a folder", "eval.json"
    )

    monkeypatch.undo()  # scoring allowed again
    out = tmp_path / "eval.json"  # a writable path: written whole, through a temporary file that is gone afterwards
    result = run("eval", dense, "--data", corpus, "--window", "16", "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["results"][0]["window"] == 16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_eval_json_into_a_read_only_folder_is_refused_before_evaluating(dense, corpus, tmp_path, no_scoring):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_line_error(
            run("eval", dense, "--data", corpus, "--json", locked / "eval.json"), "--json", "cannot write in"
        )
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def one_line_error(result, *needles: str) -> None:
    """The project's rule for a user mistake: exit code 1 and exactly one ``error:`` line."""
    assert_one_line_error(result, *needles)
    assert result.exit_code == 1, result.output


@pytest.fixture
def model_folder(tmp_path):
    return build_dense(tmp_path / "model")  # its own copy: a failing check must not spoil a shared model


def unchanged(path):
    """Snapshot of a file's bytes; call the result to assert they are the same."""
    before = path.read_bytes()
    return lambda: path.read_bytes() == before


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_eval_json_over_a_file_of_the_model_folder_is_refused(model_folder, corpus, name, no_scoring):
    target = model_folder / name
    same = unchanged(target)
    result = run("eval", model_folder, "--data", corpus, "--window", "16", "--json", target)
    one_line_error(result, f"--json {target}", f"the model folder {model_folder}")
    assert same()


def test_eval_json_over_a_file_of_the_compared_model_is_refused(dense, model_folder, corpus, no_scoring):
    target = model_folder / "config.json"
    same = unchanged(target)
    result = run("eval", dense, "--data", corpus, "--compare", model_folder, "--window", "16", "--json", target)
    one_line_error(result, f"--json {target}", f"the --compare model {model_folder}")
    assert same()


def test_eval_json_over_a_data_file_is_refused(dense, corpus, tmp_path, no_scoring):
    same = unchanged(corpus)
    one_line_error(
        run("eval", dense, "--data", corpus, "--window", "16", "--json", corpus), f"--json {corpus}", "--data"
    )
    assert same()
    link = tmp_path / "results.json"  # a symlink to the data: resolved, so refused as the data itself
    link.symlink_to(corpus)
    one_line_error(run("eval", dense, "--data", corpus, "--window", "16", "--json", link), f"--json {link}", "--data")
    assert same() and link.is_symlink()


def test_eval_json_over_a_file_inside_a_data_folder_is_refused(dense, tmp_path, corpus, no_scoring):
    folder = tmp_path / "corpora"
    folder.mkdir()
    inside = folder / "part.jsonl"
    inside.write_text(json.dumps({"text": "w1 w2 w3 w4 w5 w6"}) + "\n")
    (folder / "a.txt").write_bytes(corpus.read_bytes())
    same = unchanged(inside)
    one_line_error(
        run("eval", dense, "--data", folder, "--window", "16", "--json", inside),
        f"--json {inside}",
        f"--data folder {folder}",
    )
    assert same()


def test_eval_json_through_a_symlink_to_a_model_file_is_refused(model_folder, corpus, tmp_path, no_scoring):
    link = tmp_path / "eval.json"
    link.symlink_to(model_folder / "config.json")
    same = unchanged(model_folder / "config.json")
    one_line_error(
        run("eval", model_folder, "--data", corpus, "--window", "16", "--json", link),
        f"--json {link}",
        "the model folder",
    )
    assert same() and link.is_symlink()


@pytest.mark.parametrize("content", ['{"step": 3, "loss": 1.5}\n', "notes, not results\n"], ids=["json", "text"])
def test_eval_json_over_a_file_that_is_not_an_eval_result_is_refused(dense, corpus, tmp_path, content, no_scoring):
    target = tmp_path / "notes.json"
    target.write_text(content)
    same = unchanged(target)
    one_line_error(
        run("eval", dense, "--data", corpus, "--window", "16", "--json", target),
        f"--json {target}",
        "not an upcycle eval result",
    )
    assert same()


def test_eval_json_replaces_an_earlier_result_in_the_model_folder(model_folder, corpus):
    target = model_folder / "eval.json"  # where the README puts it, for upcycle card
    first = run("eval", model_folder, "--data", corpus, "--window", "16", "--json", target)
    assert first.exit_code == 0, first.output
    assert json.loads(target.read_text())["results"][0]["window"] == 16
    again = run("eval", model_folder, "--data", corpus, "--window", "32", "--json", target)
    assert again.exit_code == 0, again.output
    assert json.loads(target.read_text())["results"][0]["window"] == 32


# ---- --stride and --tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--stride", "0"], ["--stride 0", "at least 1"]),
        (["--stride", "-4"], ["--stride -4", "at least 1"]),
        (["--stride", "300"], ["--stride 300", "window (256)"]),
        (["--window", "16", "--stride", "17"], ["--stride 17", "window (16)", "--stride 16 or less"]),
    ],
    ids=["zero", "negative", "above-default-window", "above-window"],
)
def test_a_stride_outside_1_to_the_window_is_refused(dense, corpus, args, needles, no_scoring):
    one_line_error(run("eval", dense, "--data", corpus, *args), *needles)


@pytest.mark.parametrize("tokens", ["1", "0", "-5"])
def test_a_token_budget_too_small_names_the_flag(dense, corpus, tokens, no_scoring):
    result = run("eval", dense, "--data", corpus, "--tokens", tokens)
    one_line_error(result, f"--tokens {tokens}", "--tokens 2")
    assert "max_tokens" not in result.stderr


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["_read_file", "encode_documents"], ids=["reading", "tokenising"])
def test_ctrl_c_while_reading_or_tokenising_the_data_is_an_interruption(dense, corpus, monkeypatch, stage, no_scoring):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_module, stage, interrupted)
    result = run("eval", dense, "--data", corpus, "--window", "16")
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines() == ["interrupted: nothing was written"], result.stderr
    assert "error" not in result.stderr and "cannot read" not in result.stderr


# ---- the model: tokenizer and window ---------------------------------------------------------------------------


def test_eval_of_a_folder_without_tokenizer_files_is_one_line(tmp_path, corpus, no_scoring):
    folder = build_dense(tmp_path / "bare")
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            file.unlink()
    assert_one_line_error(
        run("eval", folder, "--data", corpus), str(folder), "no tokenizer files", "copy the tokenizer files"
    )


def test_window_above_max_position_embeddings_is_refused(dense, corpus, no_scoring):
    assert_one_line_error(
        run("eval", dense, "--data", corpus, "--window", "1000"),
        "--window 1000",
        "max_position_embeddings (256)",
        "--window 256 or less",
    )
    assert_one_line_error(run("eval", dense, "--data", corpus, "--window", "0"), "--window 0")


def test_window_above_the_compared_models_limit_is_refused(dense, corpus, tmp_path, no_scoring):
    short = build_dense(tmp_path / "short", max_position_embeddings=64)
    assert_one_line_error(
        run("eval", dense, "--data", corpus, "--compare", short, "--window", "128"),
        "max_position_embeddings (64)",
        str(short),
    )


def test_the_default_window_is_at_most_max_position_embeddings(dense, corpus, tmp_path):
    out = tmp_path / "eval.json"
    result = run("eval", dense, "--data", corpus, "--tokens", "600", "--json", out)
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["results"][0]
    assert row["window"] == 256 and row["tokens"] == 599


# ---- data files ------------------------------------------------------------------------------------------------

BINARY = bytes(range(256)) * 8
LATIN1 = "caf\xe9 cr\xe8me w1 w2\n".encode("latin-1")
UTF16 = "w1 w2 w3\n".encode("utf-16")


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "is empty"),
        (b"\n \n\t\n", "is empty"),
        (BINARY, "is not UTF-8 text"),
        (LATIN1, "is not UTF-8 text"),
        (UTF16, "is not UTF-8 text"),
    ],
    ids=["empty", "whitespace", "binary", "latin-1", "utf-16"],
)
def test_eval_data_that_is_empty_or_not_text_is_one_line(dense, tmp_path, content, needle, no_scoring):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    assert_one_line_error(run("eval", dense, "--data", path), f"{path} {needle}", "leave it out of the data")


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    datasets.disable_progress_bars()


def corpus_error(path) -> str:
    with pytest.raises(UpcycleError) as error:
        build_corpus(DataConfig(str(path), seq_len=4, validation_fraction=0, validation_tokens=0), tiny_tokenizer())
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_an_empty_data_file_is_named(tmp_path, caches, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(b"")
    assert corpus_error(path).startswith(f"{path} is empty (no ")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
@pytest.mark.parametrize("content", [BINARY, LATIN1, UTF16], ids=["binary", "latin-1", "utf-16"])
def test_a_data_file_that_is_not_utf8_text_is_named(tmp_path, caches, suffix, content):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(content)
    message = corpus_error(path)
    assert message.startswith(f"{path} is not UTF-8 text") and "convert it to UTF-8" in message


def test_an_empty_file_in_a_folder_is_named(tmp_path, caches):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9\n")
    (folder / "b.txt").write_bytes(b"")
    assert corpus_error(folder).startswith(f"{folder / 'b.txt'} is empty")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_bad_bytes_past_the_checked_start_are_still_one_line(tmp_path, caches, monkeypatch, suffix):
    monkeypatch.setattr(text_module, "SAMPLE_BYTES", 64)  # the first bytes are fine; the bad ones come later
    line = "w1 w2 w3 w4\n\n" if suffix == ".txt" else '{"text": "w1 w2 w3 w4"}\n'
    path = tmp_path / f"train{suffix}"
    path.write_bytes((line * 40).encode() + b"\xff\xfe w5\n")
    assert corpus_error(path).startswith(f"{path} is not UTF-8 text")


# ---- push: what the Hub refused ---------------------------------------------------------------------------------


def test_push_a_repo_id_the_hub_refuses_says_so(hub, model):  # noqa: F811  (fixtures)
    hub.fail("POST", "/api/repos/create", 400, body={"error": "Invalid repo name"})
    result = push(model, "org/tiny-moh")
    assert_one_line_error(
        result, "refused to create org/tiny-moh", "HTTP 400", "Invalid repo name", "repository id is invalid"
    )
    assert "run the same command again" not in result.stderr and TOKEN not in result.output
    assert hub.paths().count("/api/repos/create") == 1 and hub.repos == {}  # not retried: it is not transient


def test_push_to_a_repository_the_hub_does_not_find_says_so(hub, model):  # noqa: F811  (fixtures)
    hub.fail(
        "POST",
        "/api/repos/create",
        404,
        headers={"X-Error-Code": "RepoNotFound"},
        body={"error": "Repository not found"},
    )
    result = push(model, "someone/tiny-moh")
    assert_one_line_error(result, "refused someone/tiny-moh", "repository not found", "HTTP 404", "owner/name")
    assert "run the same command again" not in result.stderr and TOKEN not in result.output


def test_a_404_while_uploading_is_not_called_transient(hub, model):  # noqa: F811  (fixtures)
    hub.fail("POST", "/api/models/org/tiny-moh/preupload", 404, headers={"X-Error-Code": "RepoNotFound"}, times=10)
    result = push(model, "org/tiny-moh")
    assert_one_line_error(result, "org/tiny-moh", "repository not found", "while uploading")
    assert "run the same command again" not in result.stderr and TOKEN not in result.output


def test_another_client_error_names_what_the_hub_said(hub, model):  # noqa: F811  (fixtures)
    hub.fail("POST", "/api/repos/create", 422, body={"error": "Repository storage quota exceeded"})
    result = push(model, "org/tiny-moh")
    assert_one_line_error(result, "HTTP 422", "Repository storage quota exceeded", "running again will not help")
    assert hub.paths().count("/api/repos/create") == 1


def test_an_endpoint_that_is_not_a_hub_is_named(hub, model):  # noqa: F811  (fixtures)
    hub.fail("GET", "/api/whoami-v2", 404, body={"error": "Not Found"})
    assert_one_line_error(push(model, "org/tiny-moh"), "answered HTTP 404 while checking the token", "HF_ENDPOINT")


# ---- push: Python files that are not upcycle's runtime ----------------------------------------------------------


def python_warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def test_push_warns_about_python_files_that_are_not_upcycles_runtime(hub, model):  # noqa: F811  (fixtures)
    clean = push(model, "org/tiny-moh", "--dry-run")  # a conversion holds upcycle's runtime only: no warning
    assert clean.exit_code == 0 and python_warnings(clean) == [], clean.output
    (model / "helper.py").write_text("import os\nos.system('echo hi')\n")
    (model / "extra").mkdir()
    (model / "extra" / "routers.py").write_text("# a runtime name in another folder\n")
    with (model / "routers.py").open("a") as handle:  # upcycle's runtime file, edited
        handle.write("\nprint('edited')\n")
    result = push(model, "org/tiny-moh")
    assert result.exit_code == 0, result.output
    warnings = python_warnings(result)
    assert len(warnings) == 3, result.stderr
    assert any(w.startswith("warning: helper.py is Python code that is not upcycle's runtime") for w in warnings)
    assert any(
        w.startswith("warning: extra/routers.py is Python code that is not upcycle's runtime") for w in warnings
    )
    assert any(
        w.startswith("warning: routers.py differs from the runtime file of the installed upcycle") for w in warnings
    )
    assert all("trust_remote_code" in w for w in warnings)
    assert hub.files("org/tiny-moh") == local_files(model)  # a warning, not a refusal

    dry = push(model, "org/tiny-moh", "--dry-run")
    assert len(python_warnings(dry)) == 3 and "nothing was uploaded" in dry.stdout
