"""Model cards: Hub front matter, every section, `upcycle card PATH` refreshing after an evaluation, clear errors."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import build_clip, build_dense
from test_cli import assert_one_line_error, run

from upcycle.card import render_card


def snapshot(root: Path, repo_id: str) -> Path:
    """Where huggingface_hub keeps a downloaded model: the card names it by its Hub id."""
    owner, name = repo_id.split("/")
    return root / "hub" / f"models--{owner}--{name}" / "snapshots" / "0123abcd"


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    metadata = yaml.safe_load(match.group(1))
    assert isinstance(metadata, dict)
    return metadata


def section(card: str, title: str) -> str:
    """The text of ``## title`` up to the next section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.DOTALL | re.MULTILINE)
    assert match, f"no section {title!r} in the card"
    return match.group(1)


def convert_ok(*args) -> None:
    result = run("convert", *args)
    assert result.exit_code == 0, result.output


@pytest.fixture
def moh(tmp_path: Path, calibration_file: Path) -> Path:
    """A MoH conversion of a 'downloaded' dense model whose card states a license, with calibration data."""
    dense = build_dense(snapshot(tmp_path, "org/tiny-llama"))
    (dense / "README.md").write_text("---\nlicense: apache-2.0\nlanguage:\n- en\n---\n# tiny-llama\n\nA tiny model.\n")
    out = tmp_path / "tiny-moh"
    convert_ok(dense, out, "--calibration", calibration_file, "--router", "learned")
    return out


def test_moh_card_front_matter_and_every_section(moh, tmp_path):
    card = (moh / "README.md").read_text()
    report = json.loads((moh / "upcycle_report.json").read_text())
    meta = front_matter(card)
    assert meta["base_model"] == "org/tiny-llama"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"  # copied from the source's card
    assert meta["tags"][:2] == ["upcycle", "moh"] and len(set(meta["tags"])) == len(meta["tags"])
    assert "\n# tiny-moh\n" in card and "`org/tiny-llama` converted by [upcycle]" in card

    why = section(card, "What was changed and why")
    assert "shared heads" in why and "arXiv" not in why and "not been fine-tuned" in why
    plan = section(card, "Plan")
    assert "| layers | shared heads (always on) | routed heads | active heads per token | router |" in plan
    assert re.search(r"^\| 0 \| [\d ]+ \| [\d ]+ \| 4 \+ top-2 of 4 \| learned \|$", plan, re.MULTILINE), plan
    assert (
        "<details><summary>The plan as <code>upcycle convert</code> printed it</summary>" in plan
        and "MoH plan:" in plan
    )
    parameters = section(card, "Parameters")
    before, after = report["parameters"]["before"], report["parameters"]["after"]
    assert f"| before | {before:,} |" in parameters and f"| after | {after:,} (+{after - before:,}" in parameters
    recipe = section(card, "Recipe and data")
    assert "Calibration data: `calibration.txt`" in recipe and "| `active_heads` | `0.75` |" in recipe
    assert "No evaluation recorded yet" in section(card, "Evaluation")
    load = section(card, "How to load")
    assert (
        'AutoModelForCausalLM.from_pretrained("tiny-moh", trust_remote_code=True)' in load and "import upcycle" in load
    )
    citation = section(card, "Citation")
    assert "@article{jin2024moh" in citation and "arXiv:2410.11842" in citation
    assert str(tmp_path) not in card and "upcycle-tmp" not in card  # no local paths published


def test_card_command_refreshes_after_an_evaluation(moh, calibration_file, tmp_path):
    original = (moh / "README.md").read_text()
    result = run("card", moh)
    assert result.exit_code == 0 and f"wrote {moh / 'README.md'}" in result.stdout
    assert (moh / "README.md").read_text() == original  # the same records give the same card

    other = tmp_path / "other.txt"
    other.write_text(calibration_file.read_text().replace("w1", "w2"))
    result = run(
        "eval",
        moh,
        "--data",
        calibration_file,
        "--data",
        other,
        "--compare",
        "source",
        "--tokens",
        "600",
        "--window",
        "64",
        "--json",
        moh / "eval.json",
    )
    assert result.exit_code == 0, result.output
    evaluation = json.loads((moh / "eval.json").read_text())
    perplexity = evaluation["results"][0]["perplexity"]
    ratios = {name: c["ratio"] for name, c in evaluation["recovery"]["corpora"].items()}
    assert run("card", moh).exit_code == 0
    card = (moh / "README.md").read_text()
    evaluation = section(card, "Evaluation")
    assert (
        "Recovery of `tiny-moh` against `org/tiny-llama` on held-out text" in evaluation
    )  # the source, by its Hub id
    assert "| corpus | perplexity | reference perplexity | ratio |" in evaluation
    assert f"| `calibration.txt` | {perplexity:.3f} |" in evaluation and f"| {ratios['other.txt']:.3f} |" in evaluation
    assert "| geometric mean |" in evaluation
    assert "| model | perplexity | tokens | window | active heads | data |" in evaluation
    assert (
        f"| tiny-moh | {perplexity:.3f} | 599 | 64 | 0.750 | `calibration.txt` |" in evaluation
        and "| org/tiny-llama |" in evaluation
    )
    assert "No evaluation recorded" not in card and str(tmp_path) not in card
    assert card.replace(section(card, "Evaluation"), "") == original.replace(section(original, "Evaluation"), "")


def test_card_reads_old_list_eval_json_and_null_figures(tmp_path, dense):
    convert_ok(dense, tmp_path / "out")
    rows = [
        {
            "model": str(tmp_path / "out"),
            "perplexity": 12.3456,
            "tokens": 599,
            "window": 64,
            "active_fraction": 0.75,
            "data": "/x/heldout.txt",
        }
    ]
    (tmp_path / "out" / "eval.json").write_text(json.dumps(rows))
    assert "| out | 12.346 | 599 | 64 | 0.750 | `heldout.txt` |" in section(
        render_card(tmp_path / "out"), "Evaluation"
    )
    block = {
        "model": str(tmp_path / "out"),
        "reference": str(dense),
        "mean_ratio": None,
        "corpora": {"kjv-heldout": {"perplexity": None, "reference_perplexity": 9.0, "ratio": None, "tokens": 599}},
    }
    (tmp_path / "out" / "eval.json").write_text(
        json.dumps({"results": [rows[0] | {"perplexity": None}], "recovery": block})
    )
    evaluation = section(render_card(tmp_path / "out"), "Evaluation")
    assert (
        "against `dense`" in evaluation
        and "| `kjv-heldout` | - | 9.000 | - |" in evaluation
        and "| out | - | 599 |" in evaluation
    )


def test_card_name_and_base_model_options_are_remembered(tmp_path):
    dense = build_dense(tmp_path / "dense")  # a local folder: its Hub id is not known
    convert_ok(dense, tmp_path / "out")
    assert (
        front_matter((tmp_path / "out" / "README.md").read_text())["base_model"] == "dense"
    )  # says what it came from
    assert run("card", tmp_path / "out", "--name", "me/tiny-moh", "--base-model", "org/tiny-llama").exit_code == 0
    assert run("card", tmp_path / "out").exit_code == 0  # a later refresh keeps both
    card = (tmp_path / "out" / "README.md").read_text()
    assert front_matter(card)["base_model"] == "org/tiny-llama"
    assert "\n# me/tiny-moh\n" in card and 'from_pretrained("me/tiny-moh", trust_remote_code=True)' in card
    assert_one_line_error(run("card", tmp_path / "out", "--base-model", "./dense"), "--base-model", "owner/name")


def test_a_local_derivative_names_the_hub_model_its_own_card_names(tmp_path):
    dense = build_dense(
        tmp_path / "dequantised"
    )  # a local folder, e.g. built from a GGUF, with a card naming its origin
    (dense / "README.md").write_text(
        "---\nbase_model: org/original\nbase_model_relation: quantized\nlicense: mit\n---\n"
    )
    convert_ok(dense, tmp_path / "out")
    meta = front_matter((tmp_path / "out" / "README.md").read_text())
    assert (meta["base_model"], meta["license"]) == ("org/original", "mit")


def test_bam_card_lists_every_base_model_and_the_other_license(tmp_path):
    seed = build_dense(snapshot(tmp_path, "org/seed"), seed=0)
    (seed / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n")
    code = build_dense(snapshot(tmp_path, "org/seed-code"), seed=1)
    local = build_dense(tmp_path / "math-expert", seed=2)  # local: named in the body, not in base_model
    convert_ok(seed, tmp_path / "bam", "--method", "bam", "--expert", code, "--expert", local)
    card = (tmp_path / "bam" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == ["org/seed", "org/seed-code"]
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert "upcycle" in meta["tags"] and "bam" in meta["tags"] and meta["pipeline_tag"] == "text-generation"
    plan = section(card, "Plan")
    assert "| layers | attention experts (soft) | keys and values | FFN experts | FFN routing | router init |" in plan
    assert "| 0-1 | 3 | expert K/V | 3 | top-1 | random |" in plan
    recipe = section(card, "Recipe and data")
    assert "0. `org/seed`" in recipe and "1. `org/seed-code`" in recipe and "2. `math-expert`" in recipe
    assert "trust_remote_code=True" in section(card, "How to load")
    citation = section(card, "Citation")
    assert "arXiv:2408.08274" in citation and "arXiv:2403.07816" in citation  # BAM, and BTX it builds on
    assert str(tmp_path) not in card


def test_btx_and_local_bam_cards(tmp_path):
    experts = [build_dense(tmp_path / f"e{i}", "mistral", seed=i) for i in range(2)]
    convert_ok(experts[0], tmp_path / "btx", "--method", "bam", "--attention", "average", "--expert", experts[1])
    card = (tmp_path / "btx" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == ["e0", "e1"] and "btx" in meta["tags"]
    assert "| 0-1 | averaged | 2 | top-2 | random |" in section(card, "Plan")
    assert "trust_remote_code" not in card and "arXiv:2403.07816" in section(card, "Citation")


def test_clip_moe_card(tmp_path):
    base = build_clip(snapshot(tmp_path, "openai/tiny-clip"))
    stages = [
        build_clip(snapshot(tmp_path, f"me/tiny-clip-stage{i}"), base=base, ffn_noise=0.01, seed=i) for i in (1, 2)
    ]
    convert_ok(
        base,
        tmp_path / "clip-moe",
        "--method",
        "clip-moe",
        *[a for s in stages for a in ("--expert", s)],
        "--layers",
        "1",
    )
    card = (tmp_path / "clip-moe" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == ["openai/tiny-clip", "me/tiny-clip-stage1", "me/tiny-clip-stage2"]
    assert meta["pipeline_tag"] == "zero-shot-image-classification" and {"upcycle", "clip-moe"} <= set(meta["tags"])
    assert "| text | 1 | 3 | top-2 |" in section(card, "Plan") and "| vision | 2 | 3 | top-2 |" in section(
        card, "Plan"
    )
    assert 'AutoModel.from_pretrained("clip-moe", trust_remote_code=True)' in card and "import upcycle" in card
    assert "arXiv:2409.19291" in section(card, "Citation")


@pytest.mark.parametrize(
    "args, tag, arxiv, custom",
    [
        (
            ["--method", "prune-heads", "--ratio", "0.25", "--importance", "random", "--uniform"],
            "prune-heads",
            "1905.10650",
            False,
        ),
        (["--method", "gqa", "--kv-heads", "1"], "gqa", "2305.13245", False),
        (["--method", "mhe"], "mhe", "2310.07911", True),
    ],
)
def test_every_method_has_a_plan_table_and_its_citation(tmp_path, args, tag, arxiv, custom):
    dense = build_dense(tmp_path / "dense")
    convert_ok(dense, tmp_path / "out", *args)
    card = (tmp_path / "out" / "README.md").read_text()
    assert tag in front_matter(card)["tags"]
    assert section(card, "Plan").lstrip().startswith("| layers |")
    assert arxiv in section(card, "Citation")
    assert ("trust_remote_code=True" in card) == custom


def test_finetuned_card_has_the_recipe_and_data(tmp_path, calibration_file):
    from test_finetune import write_recipe

    dense = build_dense(snapshot(tmp_path, "org/tiny-llama"))  # converted by the recipe, with calibration text
    recipe = write_recipe(
        tmp_path,
        dense,
        calibration_file,
        convert__method="moh",
        convert__router="learned",
        convert__calibration=str(calibration_file),
    )
    result = run("finetune", recipe)
    assert result.exit_code == 0, result.output
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "org/tiny-llama" and "finetuned" in meta["tags"]
    tuning = section(card, "Fine-tuning")
    assert "for 4 steps" in tuning and "Training data: `calibration.txt`, sequences of 16 tokens" in tuning
    assert (
        "```yaml" in tuning and "global_batch_tokens: 64" in tuning and "calibration:\n  - calibration.txt" in tuning
    )
    assert "Calibration data: `calibration.txt`" in section(card, "Recipe and data")
    evaluation = section(card, "Evaluation")
    assert "| before tuning |" in evaluation and "| after tuning |" in evaluation
    assert str(tmp_path) not in card and "not been fine-tuned" not in card


def test_card_errors_are_one_line(tmp_path, dense):
    assert_one_line_error(run("card", tmp_path / "nope"), "is not a folder")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("card", tmp_path / "empty"), "config.json", "not a model folder")
    assert_one_line_error(run("card", dense), "upcycle_report.json", "not an upcycle output")
    assert not (dense / "README.md").exists()
    convert_ok(dense, tmp_path / "out")
    (tmp_path / "out" / "eval.json").write_text('{"not": "a list"}')
    assert_one_line_error(run("card", tmp_path / "out"), "eval.json", "upcycle eval --json")
    (tmp_path / "out" / "eval.json").write_text("[{")
    assert_one_line_error(run("card", tmp_path / "out"), "eval.json", "not valid JSON")
    (tmp_path / "out" / "eval.json").unlink()
    (tmp_path / "out" / "upcycle_report.json").write_text("[]")
    assert_one_line_error(run("card", tmp_path / "out"), "upcycle_report.json", "JSON object")


def test_render_card_reads_only_the_folder(moh, tmp_path):
    """A copy of the folder anywhere renders the same card (nothing outside it is consulted)."""
    copy = shutil.copytree(moh, tmp_path / "elsewhere" / "tiny-moh")
    shutil.rmtree(tmp_path / "hub")
    assert render_card(copy) == (moh / "README.md").read_text()


HARNESS = {
    "lm_eval_version": "0.4.13",
    "num_fewshot": None,
    "limit": None,
    "batch_size": "4",
    "device": "cpu",
    "dtype": "float32",
    "attention": "auto",
}
KJV = {
    "alias": "kjv_next_verse",
    "output_type": "multiple_choice",
    "num_fewshot": 0,
    "samples": 500,
    "dataset": {
        "type": "kjv_next_verse",
        "name": "KJV next verse (held-out books, bundled with upcycle)",
        "config": None,
        "split": "test",
    },
    "metrics": ["acc", "acc_norm"],
    "primary_metric": "acc",
    "higher_is_better": {"acc": True, "acc_norm": True},
    "top_level": True,
}
GSM8K = {
    "alias": "gsm8k",
    "output_type": "generate_until",
    "num_fewshot": 5,
    "samples": 1319,
    "dataset": {"type": "gsm8k", "name": "gsm8k", "config": "main", "split": "test"},
    "metrics": ["exact_match,strict-match", "exact_match,flexible-extract"],
    "primary_metric": "exact_match,strict-match",
    "higher_is_better": {"exact_match,strict-match": True, "exact_match,flexible-extract": True},
    "top_level": True,
}
MMLU_ANATOMY = {
    "alias": " - anatomy",
    "output_type": "multiple_choice",
    "num_fewshot": 0,
    "samples": 135,
    "dataset": {"type": "cais/mmlu", "name": "cais/mmlu", "config": "anatomy", "split": "test"},
    "metrics": ["acc"],
    "primary_metric": "acc",
    "higher_is_better": {"acc": True},
    "top_level": False,
}


def benchmark_eval(model: str, reference: str | None = None) -> dict:
    """An eval.json of `upcycle eval --tasks` (no perplexity rows), with the reference and recovery when given."""
    models = [
        {
            "model": model,
            "method": "moh",
            "seconds": 41.2,
            "active_fraction": 0.75,
            "head_usage": [[1.0, 0.5]],
            "scores": {
                "kjv_next_verse": {"acc": 0.61, "acc_stderr": 0.0218, "acc_norm": 0.59, "acc_norm_stderr": 0.022},
                "gsm8k": {
                    "exact_match,strict-match": 0.125,
                    "exact_match_stderr,strict-match": 0.0091,
                    "exact_match,flexible-extract": None,  # non-finite: left out of model-index
                    "exact_match_stderr,flexible-extract": None,
                },
                "mmlu_anatomy": {"acc": 0.3, "acc_stderr": 0.04},
            },
        }
    ]
    recovery = None
    if reference:
        models.append(
            {
                "model": reference,
                "method": "dense",
                "seconds": 30.0,
                "active_fraction": 1.0,
                "head_usage": None,
                "scores": {
                    "kjv_next_verse": {"acc": 0.63, "acc_stderr": 0.0216, "acc_norm": 0.60, "acc_norm_stderr": 0.0219},
                    "gsm8k": {
                        "exact_match,strict-match": 0.25,
                        "exact_match_stderr,strict-match": 0.012,
                        "exact_match,flexible-extract": 0.26,
                        "exact_match_stderr,flexible-extract": 0.012,
                    },
                    "mmlu_anatomy": {"acc": 0.35, "acc_stderr": 0.041},
                },
            }
        )
        recovery = {
            "model": model,
            "reference": reference,
            "tasks": {
                "kjv_next_verse": {"metric": "acc", "value": 0.61, "reference_value": 0.63, "ratio": 0.968},
                "gsm8k": {"metric": "exact_match,strict-match", "value": 0.125, "reference_value": 0.25, "ratio": 0.5},
            },
            "mean_ratio": 0.734,
        }
    return {
        "results": [],
        "recovery": None,
        "benchmarks": {
            "harness": dict(HARNESS),
            "tasks": copy.deepcopy({"kjv_next_verse": KJV, "gsm8k": GSM8K, "mmlu_anatomy": MMLU_ANATOMY}),
            "models": models,
            "recovery": recovery,
        },
    }


def refresh(folder: Path, evaluation: dict) -> str:
    (folder / "eval.json").write_text(json.dumps(evaluation))
    result = run("card", folder)
    assert result.exit_code == 0, result.output
    return (folder / "README.md").read_text()


def eval_results(card: str) -> tuple[str, set[tuple]]:
    """(model name, results) of the card's model-index as huggingface_hub parses it."""
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    return data.model_name, {
        (
            r.task_type,
            r.task_name,
            r.dataset_type,
            r.dataset_name,
            r.dataset_config,
            r.dataset_split,
            json.dumps(r.dataset_args),
            r.metric_type,
            r.metric_name,
            r.metric_value,
            r.source_name,
            r.source_url,
        )
        for r in data.eval_results or []
    }


SOURCE = ("lm-evaluation-harness 0.4.13 via upcycle eval", "https://github.com/EleutherAI/lm-evaluation-harness")
KJV_DATA = ("kjv_next_verse", "KJV next verse (held-out books, bundled with upcycle)", None, "test")


def test_benchmarks_become_a_model_index_the_hub_parses(moh):
    original = (moh / "README.md").read_text()
    card = refresh(moh, benchmark_eval(str(moh)))  # results == []: benchmark scores alone are an evaluation
    name, results = eval_results(card)
    task = ("text-generation", "Text Generation")
    assert name == "tiny-moh"
    assert results == {
        (*task, *KJV_DATA, '{"num_few_shot": 0}', "acc", "accuracy", 0.61, *SOURCE),
        (*task, *KJV_DATA, '{"num_few_shot": 0}', "acc_norm", "normalized accuracy", 0.59, *SOURCE),
        (
            *task,
            "gsm8k",
            "gsm8k",
            "main",
            "test",
            '{"num_few_shot": 5}',
            "exact_match,strict-match",
            "exact match (strict-match)",
            0.125,
            *SOURCE,
        ),
    }  # no stderr, no null score, no subtask
    meta = front_matter(card)
    assert {k: v for k, v in meta.items() if k != "model-index"} == front_matter(original)

    evaluation = section(card, "Evaluation")
    assert "lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) 0.4.13" in evaluation
    assert "| task | shots | samples | metric | tiny-moh |" in evaluation and "ratio" not in evaluation
    assert "| kjv_next_verse | 0 | 500 | accuracy | 0.610 ± 0.022 |" in evaluation
    assert "| gsm8k | 5 | 1,319 | exact match (strict-match) | 0.125 ± 0.009 |" in evaluation
    assert "| gsm8k | 5 | 1,319 | exact match (flexible-extract) | - |" in evaluation
    assert "anatomy" not in evaluation and "The scores of their 1 subtask are in `eval.json`." in evaluation
    assert "`tiny-moh` 0.750" in evaluation and "No evaluation recorded" not in card and "| corpus |" not in card
    assert (
        card.replace(section(card, "Evaluation"), "").split("---\n", 2)[2]
        == original.replace(section(original, "Evaluation"), "").split("---\n", 2)[2]
    )


def test_scores_of_a_limited_run_stay_out_of_the_model_index(moh):
    evaluation = benchmark_eval(str(moh))
    evaluation["benchmarks"]["harness"]["limit"] = 100
    card = refresh(moh, evaluation)
    assert "model-index" not in front_matter(card)
    assert "cut to at most 100 samples (`--limit`): the scores are indicative, and stay out of the model-index" in card
    assert "| kjv_next_verse | 0 | 500 | accuracy | 0.610 ± 0.022 |" in section(card, "Evaluation")


def test_benchmark_recovery_shows_the_reference_and_the_ratio(moh, tmp_path):
    reference = str(tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "0123abcd")
    card = refresh(moh, benchmark_eval(str(moh), reference))
    evaluation = section(card, "Evaluation")
    assert "Recovery of `tiny-moh` against `org/tiny-llama`" in evaluation
    assert "1.00 is full recovery, below 1 is worse" in evaluation
    assert "| task | shots | samples | metric | tiny-moh | org/tiny-llama (reference) | ratio |" in evaluation
    assert "| kjv_next_verse | 0 | 500 | accuracy | 0.610 ± 0.022 | 0.630 ± 0.022 | 0.968 |" in evaluation
    assert "| kjv_next_verse | 0 | 500 | normalized accuracy | 0.590 ± 0.022 | 0.600 ± 0.022 |  |" in evaluation
    assert "| exact match (strict-match) | 0.125 ± 0.009 | 0.250 ± 0.012 | 0.500 |" in evaluation
    assert "| geometric mean |" in evaluation and "| 0.734 |" in evaluation
    assert "`tiny-moh` 0.750, `org/tiny-llama` 1.000" in evaluation
    _, results = eval_results(card)
    assert {r[9] for r in results} == {0.61, 0.59, 0.125}  # the card's own model only, never the reference
    assert str(tmp_path) not in card


def test_benchmarks_beside_perplexity_rows(moh):
    rows = [{"model": str(moh), "perplexity": 12.3456, "tokens": 599, "window": 64, "active_fraction": 0.75}]
    card = refresh(moh, benchmark_eval(str(moh)) | {"results": rows})
    evaluation = section(card, "Evaluation")
    assert "| tiny-moh | 12.346 | 599 | 64 | 0.750 |" in evaluation and "| accuracy | 0.610 ± 0.022 |" in evaluation
    assert len(eval_results(card)[1]) == 3


def test_model_index_holds_only_the_cards_own_model(moh, tmp_path, monkeypatch):
    other = tmp_path / "hub" / "models--org--tiny-llama" / "snapshots" / "0123abcd"  # an existing folder
    card = refresh(moh, benchmark_eval(str(other)))
    assert "model-index" not in front_matter(card)
    assert "| kjv_next_verse | 0 | 500 | accuracy | 0.610 ± 0.022 |" in section(card, "Evaluation")

    monkeypatch.chdir(tmp_path)  # the same folder spelled another way, and a path that is not here: the card's
    for spelling in ("tiny-moh", f"{moh}/../tiny-moh/", "runs/x/final"):
        card = refresh(moh, benchmark_eval(spelling))
        assert len(eval_results(card)[1]) == 3, spelling


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda e: e | {"benchmarks": None}, "results with perplexity and tokens, or benchmarks"),
        (lambda e: e["benchmarks"].update(tasks=[]), "benchmarks.tasks is not an object"),
        (lambda e: e["benchmarks"]["tasks"]["gsm8k"].update(metrics="acc"), "benchmarks.tasks.gsm8k.metrics"),
        (lambda e: e["benchmarks"]["tasks"]["gsm8k"].update(dataset="gsm8k"), "benchmarks.tasks.gsm8k.dataset"),
        (lambda e: e["benchmarks"].update(models=[]), "benchmarks.models"),
        (lambda e: e["benchmarks"]["models"][0].update(scores=[0.5]), "benchmarks.models[0].scores"),
        (
            lambda e: e["benchmarks"]["models"][0]["scores"]["kjv_next_verse"].update(acc="0.61"),
            "benchmarks.models[0].scores.kjv_next_verse",
        ),
        (lambda e: e["benchmarks"].update(recovery={"tasks": {"gsm8k": 0.5}}), "benchmarks.recovery"),
    ],
)
def test_a_malformed_benchmark_block_is_one_line(moh, damage, needle):
    evaluation = benchmark_eval(str(moh), "/abs/dense")
    evaluation = damage(evaluation) or evaluation
    (moh / "eval.json").write_text(json.dumps(evaluation))
    assert_one_line_error(run("card", moh), str(moh / "eval.json"), needle, "upcycle eval")


def card_files(folder: Path) -> dict[str, bytes]:
    """The folder's top-level files, by name, with their content."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    "name",
    [
        "me/tiny\nmoh",
        "tiny-moh\r",
        "me/tiny\x1b[31m-moh",
        "tiny\tmoh",
        "my tiny model",
        "me/tiny/moh",
        "me/tiny--moh",
        "",
    ],
)
def test_card_name_must_be_a_repository_id(tmp_path, dense, name):
    convert_ok(dense, tmp_path / "out")
    before = card_files(tmp_path / "out")
    result = run("card", tmp_path / "out", "--name", name)
    assert_one_line_error(result, f"--name {name!r} is not a Hub repository id", "owner/name")
    assert result.exit_code == 1
    assert card_files(tmp_path / "out") == before  # neither the card nor the report changed


def test_card_base_model_must_be_a_repository_id(tmp_path, dense):
    convert_ok(dense, tmp_path / "out")
    before = card_files(tmp_path / "out")
    for base in ("org/tiny-llama\n", "org/tiny\x00llama", "org/tiny--llama"):
        result = run("card", tmp_path / "out", "--base-model", base)
        assert_one_line_error(result, f"--base-model {base!r} is not a Hub model id", "owner/name")
    assert card_files(tmp_path / "out") == before


def test_card_takes_one_base_model_per_source_model(tmp_path):
    dense = build_dense(tmp_path / "dense")
    convert_ok(dense, tmp_path / "out")
    before = card_files(tmp_path / "out")
    result = run(
        "card", tmp_path / "out", *("--base-model", "org/a", "--base-model", "org/b", "--base-model", "org/c")
    )
    assert_one_line_error(result, "3 base models were given", "was made from one model", "--base-model once")
    assert result.exit_code == 1 and card_files(tmp_path / "out") == before
    repeated = run("card", tmp_path / "out", "--base-model", "org/a", "--base-model", "org/a")  # the same id twice
    assert repeated.exit_code == 0, repeated.output
    assert front_matter((tmp_path / "out" / "README.md").read_text())["base_model"] == "org/a"


def test_a_mix_takes_at_most_one_base_model_per_expert(tmp_path):
    seed, other = build_dense(tmp_path / "seed", seed=0), build_dense(tmp_path / "branch", seed=1)
    convert_ok(seed, tmp_path / "bam", "--method", "bam", "--expert", other)
    before = card_files(tmp_path / "bam")
    ids = ["org/seed", "org/branch", "org/third"]
    result = run("card", tmp_path / "bam", *(arg for base in ids for arg in ("--base-model", base)))
    assert_one_line_error(result, "3 base models were given", "mixes 2 models", "at most 2 times")
    assert card_files(tmp_path / "bam") == before
    assert run("card", tmp_path / "bam", "--base-model", ids[0], "--base-model", ids[1]).exit_code == 0
    assert front_matter((tmp_path / "bam" / "README.md").read_text())["base_model"] == ids[:2]


def _temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_card_where_the_card_cannot_be_written_is_one_line(tmp_path, dense):
    convert_ok(dense, tmp_path / "out")
    out = tmp_path / "out"
    (out / "README.md").unlink()
    (out / "README.md").mkdir()  # the rename onto it fails after the new card was written
    (out / "README.md" / "x").write_text("x")
    report = (out / "upcycle_report.json").read_bytes()
    result = run("card", out, "--name", "me/tiny-moh", "--base-model", "org/tiny-llama")
    assert_one_line_error(result, f"cannot write {out / 'README.md'}", "run `upcycle card` again")
    assert result.exit_code == 1
    assert (out / "upcycle_report.json").read_bytes() == report  # not changed without its card
    assert _temporary_files(out) == []


def test_card_in_a_read_only_folder_is_one_line(tmp_path, dense, monkeypatch):
    import errno
    import tempfile

    convert_ok(dense, tmp_path / "out")
    out = tmp_path / "out"
    before = card_files(out)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(out / ".README.md.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = run("card", out, "--name", "me/tiny-moh")
    assert_one_line_error(result, f"cannot write {out / 'README.md'} (Read-only file system)", str(out))
    assert card_files(out) == before and _temporary_files(out) == []


def test_card_leaves_no_temporary_file_when_a_write_fails(tmp_path, dense, monkeypatch):
    """The card's temporary file is written, the report's fails (disk full): both are removed, nothing replaced."""
    import errno
    import os

    convert_ok(dense, tmp_path / "out")
    out = tmp_path / "out"
    before = card_files(out)
    real_fdopen, opened = os.fdopen, []

    def disk_full_on_the_second(handle, *args, **kwargs):
        opened.append(handle)
        if len(opened) == 2:
            os.close(handle)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fdopen(handle, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", disk_full_on_the_second)
    result = run("card", out, "--name", "me/tiny-moh")
    assert_one_line_error(result, "cannot write", "No space left on device")
    assert card_files(out) == before and _temporary_files(out) == []
