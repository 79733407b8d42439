"""Benchmarks through lm-evaluation-harness: the bundled offline task, `upcycle eval --tasks`, head usage, recovery,
clear errors, and every output kind through the harness's API and its own `lm_eval` command without upcycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import build_dense
from test_cli import assert_one_line_error, run
from test_prune_heads import NO_UPCYCLE

from upcycle.assets import KJV_HELDOUT_EVERY, kjv_verses
from upcycle.data.bundled_tasks import KJV_NEXT_VERSE, bundled_task_folder, kjv_next_verse_items
from upcycle.eval import harness as harness_module
from upcycle.eval.harness import HarnessSettings, run_benchmarks

TASK = KJV_NEXT_VERSE


@pytest.fixture(autouse=True)
def offline_cache(tmp_path_factory, monkeypatch):
    """The bundled task's items in a cache shared by this module's tests; no Hub requests."""
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path_factory.getbasetemp() / "upcycle-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def quiet_datasets():
    """No progress bars of `datasets` preparing a task's data on stderr, where a refusal must be one line."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    yield
    if enabled:
        datasets.enable_progress_bars()


def settings(**options) -> HarnessSettings:
    return HarnessSettings(tasks=[TASK], limit=options.pop("limit", 12), **options)


def convert_ok(*args) -> Path:
    result = run("convert", *args)
    assert result.exit_code == 0, result.output
    return Path(args[1])


# ---- the bundled task ------------------------------------------------------------------------------


def test_bundled_task_items_are_held_out_next_verses_and_deterministic():
    items = kjv_next_verse_items()
    assert len(items) == 500 and items == kjv_next_verse_items()
    following = {}
    verses = [v for v in kjv_verses() if v[0] % KJV_HELDOUT_EVERY == 0]
    for before, after in zip(verses, verses[1:]):
        following.setdefault((before[0], before[3]), set()).add(after[3])
    for item in items:
        book, chapter, verse = map(int, item["reference"].split(":"))
        assert book % KJV_HELDOUT_EVERY == 0  # only books no recipe trains or calibrates on
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        truth = item["choices"][item["label"]]
        assert (book, chapter, verse, truth) in set(verses)
        last_context_verse = item["context"].split(". ")[-1]
        assert last_context_verse and truth in set().union(*following.values())
    assert {item["label"] for item in items} == {0, 1, 2, 3}


def test_bundled_task_folder_loads_in_the_harness(tmp_path):
    from lm_eval.tasks import TaskManager

    folder = bundled_task_folder(tmp_path / "cache")
    config = yaml.safe_load((folder / f"{TASK}.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"] == {"test": str(folder / f"{TASK}.jsonl")}
    lines = (folder / f"{TASK}.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == kjv_next_verse_items()
    task = TaskManager(include_defaults=False, include_path=str(folder)).load([TASK])["tasks"][TASK]
    assert len(task.test_docs()) == 500 and task.OUTPUT_TYPE == "multiple_choice"
    moved = bundled_task_folder(tmp_path / "elsewhere")  # the YAML always points into its own cache
    assert yaml.safe_load((moved / f"{TASK}.yaml").read_text())["dataset_kwargs"]["data_files"]["test"].startswith(
        str(tmp_path / "elsewhere")
    )


def test_tasks_command_lists_the_bundled_task_and_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    result = run("tasks")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "cache" / "lm-eval-tasks"
    assert TASK in result.stdout and f"lm_eval --include_path {folder}" in result.stdout
    assert (folder / f"{TASK}.yaml").is_file() and (folder / f"{TASK}.jsonl").is_file()


# ---- running models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny dense model that reads any text (byte-level), its MoH with every head active and its MoH-0.75."""
    root = tmp_path_factory.mktemp("harness-models")
    dense = build_dense(root / "dense", text=True)
    return {
        "dense": dense,
        "all-heads": convert_ok(dense, root / "moh-all", "--active-heads", "1.0"),
        "moh": convert_ok(dense, root / "moh"),
    }


def test_moh_with_every_head_active_scores_exactly_the_dense_accuracy(models):
    block = run_benchmarks(models["all-heads"], models["dense"], settings(limit=40))
    moh, dense = block["models"]
    assert moh["method"] == "moh" and dense["method"] == "dense"
    assert moh["scores"][TASK] == dense["scores"][TASK]
    assert set(moh["scores"][TASK]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert block["recovery"]["tasks"][TASK] == {
        "metric": "acc_norm",
        "value": dense["scores"][TASK]["acc_norm"],
        "reference_value": dense["scores"][TASK]["acc_norm"],
        "ratio": 1.0,
    }
    assert moh["active_fraction"] == 1.0 and all(f == 1.0 for layer in moh["head_usage"] for f in layer)
    task = block["tasks"][TASK]
    assert task["samples"] == 40 and task["num_fewshot"] == 0 and task["top_level"]
    assert task["dataset"]["type"] == TASK and task["dataset"]["split"] == "test"


def test_head_usage_counts_real_tokens_only(models):
    """The harness pads loglikelihood batches on the right: padding must not enter the head-usage counts."""
    runs = [run_benchmarks(models["moh"], None, settings(batch_size=size))["models"][0] for size in ("1", "4", "auto")]
    flat = [[f for layer in entry["head_usage"] for f in layer] for entry in runs]
    for entry, usage in zip(runs[1:], flat[1:]):  # auto: the batch-size search's forwards count no token either
        assert entry["scores"] == runs[0]["scores"]
        assert usage == pytest.approx(flat[0], abs=1e-12)
    assert all(entry["active_fraction"] == pytest.approx(0.75) for entry in runs)


def test_num_fewshot_and_a_fractional_limit(models):
    block = run_benchmarks(models["dense"], None, settings(limit=0.01, num_fewshot=2))
    assert block["tasks"][TASK]["num_fewshot"] == 2 and block["tasks"][TASK]["samples"] == 5


def test_dtype_and_device_reach_the_model_the_harness_runs(models, tmp_path):
    out = tmp_path / "eval.json"
    args = ["--tasks", TASK, "--limit", "4", "--device", "cpu", "--dtype", "bfloat16", "--json", out]
    result = run("eval", models["dense"], *args)
    assert result.exit_code == 0, result.output
    (model,) = json.loads(out.read_text())["benchmarks"]["models"]
    assert model["dtype"] == "bfloat16" and model["device"] == "cpu"


def test_eval_command_with_tasks_compare_and_json(models, tmp_path):
    out = tmp_path / "eval.json"
    args = ["eval", models["moh"], "--tasks", TASK, "--limit", "8", "--compare", "source", "--json", out]
    result = run(*args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("task "))
    assert "compare: dense" in header and header.rstrip().endswith("ratio")
    assert any(line.startswith(f"{TASK}  acc ↑") for line in lines) and "mean ratio" in result.stdout
    assert "head usage of moh" in result.stdout
    evaluation = json.loads(out.read_text())
    assert evaluation["results"] == [] and evaluation["recovery"] is None
    block = evaluation["benchmarks"]
    assert [m["model"] for m in block["models"]] == [str(models["moh"]), str(models["dense"])]
    assert block["harness"]["limit"] == 8 and block["harness"]["lm_eval_version"]
    assert block["recovery"]["tasks"][TASK]["metric"] == "acc_norm"


def test_perplexity_and_tasks_in_one_run(models, tmp_path):
    out = tmp_path / "eval.json"
    result = run("eval", models["moh"], "--data", "asset:kjv-heldout", "--tokens", "256", "--tasks", TASK)
    assert result.exit_code == 0, result.output
    result = run(
        "eval", models["moh"], "--data", "asset:kjv-heldout", "--tokens", "256", "--tasks", TASK, "--limit", "4",
        "--json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "benchmarks (lm-evaluation-harness" in result.stdout
    evaluation = json.loads(out.read_text())
    assert evaluation["results"][0]["data"] == "kjv-heldout" and evaluation["benchmarks"]["models"][0]["scores"]


def test_include_path_runs_a_local_task(models, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = tmp_path / "yes-no.jsonl"
    docs = [{"question": f"Is {i} even?", "answer": i % 2} for i in range(6)]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "even.yaml").write_text(
        textwrap.dedent(f"""
        task: even_or_odd
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: ["yes", "no"]
        doc_to_target: answer
        metric_list:
          - metric: acc
        """)
    )
    block = run_benchmarks(
        models["dense"], None, HarnessSettings(tasks=["even_or_odd", TASK], limit=6, include_paths=[folder])
    )
    assert set(block["tasks"]) == {"even_or_odd", TASK} and block["tasks"]["even_or_odd"]["samples"] == 6
    assert block["models"][0]["scores"]["even_or_odd"]["acc"] in {i / 6 for i in range(7)}


# ---- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,needle",
    [
        ([], "give --data"),
        (["--tasks", TASK, "--limit", "0"], "--limit 0"),
        (["--tasks", TASK, "--limit", "2.5"], "--limit 2.5"),
        (["--tasks", TASK, "--batch-size", "many"], "--batch-size many"),
        (["--tasks", TASK, "--num-fewshot", "-1"], "--num-fewshot -1"),
        (["--tasks", f"{TASK},"], "empty task name"),
        (["--tasks", TASK, "--include-path", "no-such-folder"], "--include-path no-such-folder"),
        (["--tasks", TASK, "--device", "cuda"], "no CUDA device"),
        (["--tasks", "no_such_task_xyz"], "unknown task 'no_such_task_xyz'"),
    ],
)
def test_bad_options_are_one_line_and_write_nothing(models, tmp_path, args, needle):
    out = tmp_path / "eval.json"
    assert_one_line_error(run("eval", models["dense"], *args, "--json", out), needle)
    assert not out.exists()


def test_a_task_that_runs_model_written_code_is_refused(models, tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = tmp_path / "items.jsonl"
    data.write_text(json.dumps({"prompt": "def f():", "answer": "pass"}) + "\n")
    (folder / "runs_code.yaml").write_text(
        f"task: runs_code\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        "unsafe_code: true\nmetric_list:\n  - metric: exact_match\n"
    )
    out = tmp_path / "eval.json"
    result = run("eval", models["dense"], "--tasks", "runs_code", "--include-path", folder, "--json", out)
    assert_one_line_error(result, "task runs_code runs the code the model writes", "--confirm_run_unsafe_code")
    assert not out.exists()


def test_missing_harness_names_the_install_command(models, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert_one_line_error(run("eval", models["dense"], "--tasks", TASK), "pip install 'upcycle[lmeval]'")


def test_a_hub_task_offline_is_one_line(models, tmp_path):
    """The harness's own task names work as in the harness; offline, their data cannot be fetched: one line."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    out = tmp_path / "eval.json"
    result = subprocess.run(
        [sys.executable, "-m", "upcycle", "eval", str(models["dense"]), "--tasks", "hellaswag", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: task hellaswag: its data (Rowan/hellaswag"), lines
    assert "cannot be fetched" in lines[0] and "--include-path" in lines[0] and not out.exists()


@pytest.fixture
def no_model_loaded(monkeypatch):
    """Fail the test if the harness runs a model: the refusals below come before any model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the tasks were checked")

    monkeypatch.setattr(harness_module, "run_model", refuse)


@pytest.fixture(scope="module")
def short_context(tmp_path_factory) -> Path:
    """A byte-level model with 256 positions: some kjv_next_verse answers (258 bytes) do not fit."""
    return build_dense(tmp_path_factory.mktemp("short") / "short", text=True, max_position_embeddings=256)


def one_line_error(result, *needles: str) -> None:
    assert_one_line_error(result, *needles)
    assert result.exit_code == 1, result.output


def test_answers_longer_than_the_models_context_are_one_line_before_loading(
    models, short_context, tmp_path, no_model_loaded
):
    out = tmp_path / "eval.json"
    for args in ([short_context], [models["dense"], "--compare", short_context]):
        result = run("eval", *args, "--tasks", TASK, "--limit", "8", "--json", out)
        one_line_error(result, f"task {TASK}", "256 positions", str(short_context))
        assert not out.exists()


def test_a_context_too_short_for_some_items_runs_the_items_that_fit(models, short_context):
    block = run_benchmarks(short_context, None, settings(limit=1))  # item 0's answers fit in 256 positions
    assert block["tasks"][TASK]["samples"] == 1 and block["models"][0]["scores"][TASK]["acc"] in (0.0, 1.0)


def long_answer_task(tmp_path) -> Path:
    """A task folder with one item whose first answer is 257 bytes: one more than the short model's positions."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": "Which?", "choices": ["a" * 256, "b"], "answer": 0}) + "\n")
    (folder / "long.yaml").write_text(
        f"task: long_answer\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    return folder


def test_an_answer_one_token_past_the_context_is_one_line(short_context, tmp_path, no_model_loaded):
    result = run("eval", short_context, "--tasks", "long_answer", "--include-path", long_answer_task(tmp_path))
    one_line_error(result, "item 0 of task long_answer", "257 tokens", "256 positions", str(short_context))


def test_the_harness_model_refuses_an_answer_past_the_context_too(short_context, tmp_path, monkeypatch):
    """Should an answer pass the check before loading, the harness's own tokenisation is checked: an error line,
    not the harness's assertion."""
    monkeypatch.setattr(harness_module, "_check_choices", lambda *args: None)
    result = run("eval", short_context, "--tasks", "long_answer", "--include-path", long_answer_task(tmp_path))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: item 0 of task long_answer has an answer of 257")


@pytest.mark.parametrize(
    "shots,needles",
    [("100000", ["--num-fewshot 100000", "500 few-shot examples"]), ("300", ["--num-fewshot 300", "256"])],
    ids=["more-than-the-data", "more-than-the-context"],
)
def test_a_few_shot_count_that_cannot_be_met_is_one_line_before_loading(
    short_context, tmp_path, shots, needles, no_model_loaded
):
    out = tmp_path / "eval.json"
    result = run("eval", short_context, "--tasks", TASK, "--limit", "1", "--num-fewshot", shots, "--json", out)
    one_line_error(result, *needles)
    assert not out.exists()


def test_eval_json_over_a_task_file_or_its_data_is_refused(models, tmp_path, yes_no_data, no_model_loaded):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "even.yaml").write_text(
        f"task: even_or_odd\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {yes_no_data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: ['yes', 'no']\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "notes.json").write_text('{"about": "these tasks"}\n')
    bundled = bundled_task_folder() / f"{TASK}.jsonl"
    for target, needle in [
        (folder / "even.yaml", f"the --include-path folder {folder}"),
        (folder / "notes.json", f"the --include-path folder {folder}"),
        (yes_no_data, f"the task data file {yes_no_data}"),
        (bundled, "the folder of upcycle's bundled tasks"),
    ]:
        before = target.read_bytes()
        result = run(
            "eval", models["dense"], "--tasks", f"even_or_odd,{TASK}", "--include-path", folder, "--json", target
        )
        one_line_error(result, f"--json {target}", needle)
        assert target.read_bytes() == before


def function_task(folder: Path, marker: Path, data: Path) -> Path:
    """A task folder whose YAML names ``!function utils.process_docs``; importing utils.py writes ``marker``."""
    folder.mkdir(parents=True)
    (folder / "utils.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n\n\n"
        "def process_docs(dataset):\n    return dataset\n"
    )
    (folder / "base.yaml").write_text(
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: ['yes', 'no']\n"
        "doc_to_target: answer\nprocess_docs: !function utils.process_docs\nmetric_list:\n  - metric: acc\n"
    )
    return folder


@pytest.fixture
def yes_no_data(tmp_path) -> Path:
    data = tmp_path / "yes-no.jsonl"
    data.write_text("".join(json.dumps({"question": f"Is {i} even?", "answer": i % 2}) + "\n" for i in range(4)))
    return data


def test_a_task_yaml_that_imports_python_needs_trust_remote_code(models, tmp_path, yes_no_data):
    marker = tmp_path / "imported.txt"
    folder = function_task(tmp_path / "tasks", marker, yes_no_data)
    (folder / "even.yaml").write_text("task: even_with_code\ninclude: base.yaml\n")
    out = tmp_path / "eval.json"
    result = run("eval", models["dense"], "--tasks", "even_with_code", "--include-path", folder, "--json", out)
    one_line_error(result, str(folder / "base.yaml"), "!function utils.process_docs", "--trust-remote-code")
    assert not marker.exists() and not out.exists()

    args = ["--tasks", "even_with_code", "--include-path", folder, "--limit", "4", "--json", out]
    trusted = run("eval", models["dense"], *args, "--trust-remote-code")
    assert trusted.exit_code == 0, trusted.output
    assert marker.read_text() == "imported" and json.loads(out.read_text())["benchmarks"]["tasks"]["even_with_code"]


def test_a_function_tag_in_an_included_yaml_outside_the_folder_is_found(
    models, tmp_path, yes_no_data, no_model_loaded
):
    marker = tmp_path / "imported.txt"
    elsewhere = function_task(tmp_path / "shared", marker, yes_no_data)
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "even.yaml").write_text(f"task: even_with_code\ninclude: {elsewhere / 'base.yaml'}\n")
    result = run("eval", models["dense"], "--tasks", "even_with_code", "--include-path", folder)
    one_line_error(result, str(elsewhere / "base.yaml"), "!function", "--trust-remote-code")
    assert not marker.exists()


def test_a_malformed_task_yaml_is_named_instead_of_an_unknown_task(models, tmp_path, no_model_loaded):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "mine.yaml").write_text("task: my_task\ndataset_path: json\ndoc_to_choice: [yes, no\n")
    result = run("eval", models["dense"], "--tasks", "my_task", "--include-path", folder)
    one_line_error(result, str(folder / "mine.yaml"), "not valid YAML", "line")
    assert "unknown task" not in result.stderr


# ---- every output kind, through the harness's API and its own command ------------------------------------------

NO_UPCYCLE_LM_EVAL = textwrap.dedent(NO_UPCYCLE) + textwrap.dedent("""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *sys.argv[1:]]
    cli_evaluate()
    assert "upcycle" not in sys.modules
""")


def output_kind(kind: str, root: Path) -> Path:
    """A tiny model of one upcycle output kind (byte-level tokenizer, so it reads the task's text)."""
    if kind == "btx" or kind == "bam":
        seed = build_dense(root / "seed", text=True)
        experts = [build_dense(root / f"expert{i}", text=True, seed=i) for i in (1, 2)]
        attention = ["--attention", "average"] if kind == "btx" else []
        expert_args = [arg for e in experts for arg in ("--expert", e)]
        return convert_ok(seed, root / kind, "--method", "bam", *attention, *expert_args)
    dense = build_dense(root / "dense", text=True, num_key_value_heads=8 if kind in ("pruned-uniform", "gqa") else 2)
    flags = {
        "gqa": ["--method", "gqa", "--kv-heads", "2"],
        "moh": [],
        "pruned": ["--method", "prune-heads", "--ratio", "0.25", "--importance", "random"],
        "pruned-uniform": ["--method", "prune-heads", "--ratio", "0.5", "--uniform", "--importance", "random"],
        "mhe": ["--method", "mhe"],
    }[kind]
    return convert_ok(dense, root / kind, *flags)


@pytest.mark.parametrize("kind,custom_code", [
    ("moh", True), ("pruned", True), ("mhe", True), ("bam", True),
    ("btx", False), ("pruned-uniform", False), ("gqa", False),
])  # fmt: skip
def test_every_output_kind_runs_through_the_harness_both_ways(tmp_path, kind, custom_code):
    folder = output_kind(kind, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert ("auto_map" in config) == custom_code
    api = run_benchmarks(folder, None, settings(limit=8))["models"][0]["scores"][TASK]
    results = tmp_path / "lm-eval-results"
    command = [
        sys.executable, "-c", NO_UPCYCLE_LM_EVAL,
        "--model", "hf", "--model_args", f"pretrained={folder},trust_remote_code=True,dtype=float32",
        "--tasks", TASK, "--include_path", str(bundled_task_folder()), "--limit", "8", "--batch_size", "4",
        "--device", "cpu", "--output_path", str(results),
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    shell = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert shell.returncode == 0, shell.stderr[-3000:]
    (written,) = results.rglob("results_*.json")
    scores = json.loads(written.read_text())["results"][TASK]
    assert scores["acc,none"] == api["acc"] and scores["acc_norm,none"] == api["acc_norm"]


def test_eval_help_shows_the_benchmark_options():
    result = run("eval", "--help")
    assert result.exit_code == 0
    flags = ("--tasks", "--num-fewshot", "--limit", "--batch-size", "--include-path", "--device", "--dtype")
    for flag in (*flags, "--trust-remote-code"):
        assert flag in result.stdout, flag
    assert "Benchmarks (--tasks, lm-evaluation-harness)" in result.stdout and "lmeval extra" in result.stdout
