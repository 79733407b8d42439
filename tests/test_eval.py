"""Evaluation: sliding-window NLL, head usage, evaluate/compare, table, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, build_dense, tiny_tokenizer
from test_cli import assert_one_line_error, run
from transformers import AutoModelForCausalLM

import upcycle  # noqa: F401  (registers the Auto classes)
from upcycle.convert import convert_checkpoint
from upcycle.errors import UpcycleError
from upcycle.eval import HeadUsage, eval_tokens_from_text, evaluate, format_table, perplexity, sliding_window_nll
from upcycle.eval.cli import corpus_files
from upcycle.eval.evaluate import evaluate_corpora, format_recovery_table, recovery
from upcycle.eval.plots import plot_head_usage, plot_loss_curve
from upcycle.files import json_text
from upcycle.methods.moh import MoHOptions

PNG = b"\x89PNG\r\n\x1a\n"
STREAM = torch.randint(3, len(VOCAB), (41,), generator=torch.Generator().manual_seed(0))
OTHER = torch.randint(3, len(VOCAB), (29,), generator=torch.Generator().manual_seed(5))


def load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dense = build_dense(root / "dense")
    convert_checkpoint(str(dense), root / "moh", "moh", MoHOptions(active_heads=0.75))
    return dense, root / "moh"


def brute_force_nll(model, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """One forward per token: token t (t >= 1) is scored by the first window ids[k*stride : k*stride + window]
    that reaches it (k = max(0, ceil((t - window) / stride))), from the context ids[k*stride : t]."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, ids.numel()):
            k = max(0, math.ceil((t - window) / stride))
            logits = model(input_ids=ids[None, k * stride : t], use_cache=False).logits[0, -1:]
            total += F.cross_entropy(logits, ids[t : t + 1], reduction="sum").item()
    return total, ids.numel() - 1


@pytest.mark.parametrize(
    "window,stride,batch_size", [(8, 1, 1), (8, 3, 2), (8, 8, 3), (5, 2, 4), (64, 64, 1), (64, 16, 2)]
)
def test_sliding_window_matches_brute_force(folders, window, stride, batch_size):
    for folder in folders:  # dense and MoH
        model = load(folder)
        nll, count = sliding_window_nll(model, STREAM, window, stride, batch_size)
        expected, expected_count = brute_force_nll(model, STREAM, window, stride)
        assert count == expected_count == STREAM.numel() - 1
        assert nll == pytest.approx(expected, rel=1e-5)


def test_stride_equal_to_window_is_block_scoring(folders):
    model = load(folders[0])
    window = 8
    ids = STREAM[: 5 * window + 1]  # 41 tokens: five blocks of 9 sharing their boundary tokens
    nll, count = sliding_window_nll(model, ids, window, window, batch_size=2)
    blocks = ids.unfold(0, window + 1, window)  # [5, 9]
    assert count == blocks.numel() - blocks.shape[0] == ids.numel() - 1
    assert math.exp(nll / count) == pytest.approx(perplexity(model, blocks), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"window": 4, "stride": 5},
        {"window": 0, "stride": 1},
        {"window": 4, "stride": 0},
        {"window": 4, "stride": 2, "batch_size": 0},
    ],
)
def test_sliding_window_rejects_bad_arguments(folders, kwargs):
    with pytest.raises(UpcycleError):
        sliding_window_nll(load(folders[0]), STREAM, **kwargs)
    with pytest.raises(UpcycleError):
        sliding_window_nll(load(folders[0]), STREAM[:1], 4, 2)


def test_head_usage_on_moh_at_075(folders):
    model = load(folders[1])
    ids = torch.randint(3, len(VOCAB), (3, 19), generator=torch.Generator().manual_seed(1))
    with HeadUsage(model) as usage, torch.no_grad():
        model(ids)
    fraction = usage.fraction()
    assert fraction.shape == (2, 8) and usage.tokens == [3 * 19] * 2
    assert usage.active_fraction() == 0.75 and fraction.mean().item() == 0.75
    for row, router in zip(fraction, [layer.self_attn.head_router for layer in model.model.layers]):
        assert (row[router.shared_heads] == 1.0).all()
        assert row[router.routed_heads].sum().item() == pytest.approx(2.0)  # top-2 of 4 routed heads per token
    with torch.no_grad():
        model(ids)  # outside the context: no longer counted
    assert usage.tokens == [3 * 19] * 2
    usage.reset()
    assert usage.tokens == [0, 0] and (usage.fraction() == 0).all() and usage.active_fraction() is None


def test_head_usage_honours_padding_masks(folders):
    model = load(folders[1])
    ids = torch.randint(3, len(VOCAB), (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with HeadUsage(model) as usage, torch.no_grad():
        gates = []
        hooks = [
            layer.self_attn.head_router.register_forward_hook(lambda m, a, out: gates.append(out))
            for layer in model.model.layers
        ]
        model(input_ids=ids, attention_mask=mask)  # the forward's attention_mask is used
        assert usage.tokens == [16, 16]
        expected = torch.stack([(g != 0)[mask.bool()].double().mean(0) for g in gates])
        torch.testing.assert_close(usage.fraction(), expected)
        usage.reset()
        usage.set_mask(mask[:, :3])  # an explicit mask wins
        model(input_ids=ids[:, :3])
        assert usage.tokens == [6, 6]
        usage.set_mask(torch.ones(1, 3))
        with pytest.raises(UpcycleError, match="mask"):
            model(input_ids=ids)
        for hook in hooks:
            hook.remove()


def test_head_usage_of_a_dense_model_is_empty(folders):
    model = load(folders[0])
    with HeadUsage(model) as usage, torch.no_grad():
        model(STREAM[None])
    assert usage.fraction().shape == (0, 0) and usage.active_fraction() is None


def test_evaluate_moh_and_dense_and_table(folders):
    dense, moh = folders
    results = [evaluate(path, STREAM, window=8, stride=4, batch_size=2, device="cpu") for path in (dense, moh)]
    for result in results:
        assert {
            "model",
            "perplexity",
            "nll",
            "tokens",
            "seconds",
            "tokens_per_second",
            "head_usage",
            "active_fraction",
            "method",
        } <= set(result)
        assert result["tokens"] == STREAM.numel() - 1 and result["perplexity"] == pytest.approx(
            math.exp(result["nll"] / result["tokens"])
        )
        assert result["seconds"] > 0 and result["tokens_per_second"] > 0
        json.dumps(result)
    dense_result, moh_result = results
    assert (
        dense_result["method"] == "dense"
        and dense_result["head_usage"] is None
        and dense_result["active_fraction"] == 1.0
    )
    assert moh_result["method"] == "moh" and moh_result["active_fraction"] == 0.75
    assert len(moh_result["head_usage"]) == 2 and len(moh_result["head_usage"][0]) == 8
    assert dense_result["nll"] == pytest.approx(sliding_window_nll(load(dense), STREAM, 8, 4)[0], rel=1e-6)
    table = format_table(results)
    assert "dense" in table and "moh" in table and "perplexity ratio moh / dense" in table
    ratio = moh_result["perplexity"] / dense_result["perplexity"]
    assert f"{ratio:.3f}x" in table and "head usage of moh" in table and " 100 " in table
    assert "ratio" not in format_table(results[:1])
    assert "before tuning" in format_table([results[0] | {"name": "before tuning"}])


def test_evaluate_rejects_a_missing_folder(tmp_path):
    with pytest.raises(UpcycleError, match="does not exist"):
        evaluate(tmp_path / "nope", STREAM)


def test_eval_tokens_from_text(tmp_path, folders):
    path = tmp_path / "eval.txt"
    path.write_text("w1 w2 w3\n\nw4 w5\n\n\nw6 w7 w8 w9\n")
    ids = [VOCAB.index(w) for w in "w1 w2 w3 </s> w4 w5 </s> w6 w7 w8 w9".split()]
    assert eval_tokens_from_text(path, tiny_tokenizer()).tolist() == ids
    assert eval_tokens_from_text(path, tiny_tokenizer(), max_tokens=5).tolist() == ids[:5]
    assert eval_tokens_from_text(path, str(folders[0]), max_tokens=100).tolist() == ids
    with pytest.raises(UpcycleError):
        eval_tokens_from_text(path, tiny_tokenizer(), max_tokens=1)


def test_plots_write_png_files(tmp_path, folders):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    lines = [{"step": s, "loss": 5 / s, "aux_loss": 1 + 0.01 * s, "lr": 1e-4} for s in range(1, 21)]
    lines += [{"step": s, "val_loss": 4 / s} for s in (10, 20)]
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = plot_loss_curve(metrics, tmp_path / "plots" / "loss.png")
    assert out == tmp_path / "plots" / "loss.png" and out.read_bytes().startswith(PNG) and out.stat().st_size > 1000
    plain = tmp_path / "plain.jsonl"
    plain.write_text(
        json.dumps({"step": 1, "loss": 2.0, "lr": 1e-4}) + "\n" + json.dumps({"step": 2, "loss": 1.5}) + "\n"
    )
    assert plot_loss_curve(plain, tmp_path / "plain.png").read_bytes().startswith(PNG)
    usage = [[1.0, 1.0, 0.5, 0.5], [1.0, 0.25, 0.75, 0.5]]
    for table in (usage, torch.tensor(usage)):
        png = plot_head_usage(table, tmp_path / "usage.png", title="tiny MoH")
        assert png.read_bytes().startswith(PNG) and png.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left
    with pytest.raises(UpcycleError):
        plot_head_usage(torch.empty(0, 0), tmp_path / "empty.png")
    (tmp_path / "bad.jsonl").write_text('{"lr": 1}\n')
    with pytest.raises(UpcycleError):
        plot_loss_curve(tmp_path / "bad.jsonl", tmp_path / "bad.png")


def test_recovery_scores_each_model_once_on_every_corpus(folders):
    dense, moh = folders
    result = recovery(moh, dense, {"a": STREAM, "b": OTHER}, window=8, device="cpu")
    rows, block = result["results"], result["recovery"]
    assert [(r["method"], r["data"], r["tokens"]) for r in rows] == [
        ("moh", "a", 40),
        ("moh", "b", 28),
        ("dense", "a", 40),
        ("dense", "b", 28),
    ]
    assert (block["model"], block["reference"]) == (str(moh), str(dense))
    for name, ids in (("a", STREAM), ("b", OTHER)):
        alone = (
            evaluate(moh, ids, window=8, device="cpu")["perplexity"]
            / evaluate(dense, ids, window=8, device="cpu")["perplexity"]
        )
        entry = block["corpora"][name]
        assert (
            entry["ratio"] == pytest.approx(alone, rel=1e-9)
            and entry["ratio"] == entry["perplexity"] / entry["reference_perplexity"]
        )
        assert entry["tokens"] == ids.numel() - 1
    ratios = [c["ratio"] for c in block["corpora"].values()]
    assert block["mean_ratio"] == pytest.approx(math.sqrt(ratios[0] * ratios[1]))
    assert rows[0]["head_usage"] != rows[1]["head_usage"] and rows[2]["head_usage"] is None  # counted per corpus
    table = format_recovery_table(result)
    assert "ratio = perplexity / compare's perplexity: 1.00 is full recovery, above 1 is worse" in table
    assert (
        f"{ratios[1]:.3f}" in table
        and "geometric mean" in table
        and "head usage of moh (% of tokens per head, all corpora)" in table
    )
    plain = format_recovery_table(
        {"results": evaluate_corpora(dense, {"a": STREAM}, window=8, device="cpu"), "recovery": None}
    )
    assert plain.splitlines()[0].split() == ["corpus", "tokens", "perplexity"] and "ratio" not in plain


def test_json_text_writes_null_for_non_finite_numbers():
    text = json_text(
        {"results": [{"perplexity": math.inf, "usage": [[math.nan, 0.5]]}], "recovery": {"mean_ratio": -math.inf}}
    )
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "results": [{"perplexity": None, "usage": [[None, 0.5]]}],
        "recovery": {"mean_ratio": None},
    }


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    for name, seed in (("bible.txt", 3), ("code.txt", 4)):
        words = torch.randint(3, len(VOCAB), (300,), generator=torch.Generator().manual_seed(seed)).tolist()
        (root / name).write_text(
            "\n\n".join(" ".join(VOCAB[w] for w in words[i : i + 50]) for i in range(0, 300, 50)) + "\n"
        )
    return root / "bible.txt", root / "code.txt"


def eval_json(*args) -> dict:
    out = args[0].parent / "out.json"
    result = run("eval", *args, "--window", "16", "--json", out)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text) | {"stdout": result.stdout}


def test_eval_two_corpora_with_compare(folders, corpora):
    dense, moh = folders
    evaluation = eval_json(moh, "--data", corpora[0], "--data", corpora[1], "--compare", dense)
    rows, block = evaluation["results"], evaluation["recovery"]
    assert [(r["method"], r["data"]) for r in rows] == [
        ("moh", "bible.txt"),
        ("moh", "code.txt"),
        ("dense", "bible.txt"),
        ("dense", "code.txt"),
    ]
    assert list(block["corpora"]) == ["bible.txt", "code.txt"] and block["reference"] == str(dense)
    for i, name in enumerate(block["corpora"]):
        assert block["corpora"][name]["ratio"] == rows[i]["perplexity"] / rows[i + 2]["perplexity"]
    lines = evaluation["stdout"].splitlines()
    assert lines[1].split() == ["corpus", "tokens", "perplexity", "compare", "ratio"]
    assert (
        lines[3].split()[:2] == ["bible.txt", str(rows[0]["tokens"])]
        and "ratio = perplexity / compare's perplexity" in evaluation["stdout"]
    )

    itself = eval_json(moh, "--data", corpora[0], "--data", corpora[1], "--compare", moh)
    assert [c["ratio"] for c in itself["recovery"]["corpora"].values()] == [1.0, 1.0] and itself["recovery"][
        "mean_ratio"
    ] == 1.0
    tokens = sum(r["tokens"] for r in itself["results"][:2])
    assert [line.split()[:3] for line in itself["stdout"].splitlines() if line.startswith("moh ")] == [
        ["moh", "moh", str(tokens)]
    ] * 2


def test_eval_compare_source_resolves_the_conversion_source(tmp_path, corpora):
    dense = build_dense(tmp_path / "dense")
    convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(active_heads=1.0))
    block = eval_json(tmp_path / "moh", "--data", corpora[0], "--data", corpora[1], "--compare", "source")["recovery"]
    assert block["reference"] == str(dense)
    assert all(c["ratio"] == pytest.approx(1.0, abs=1e-5) for c in block["corpora"].values())

    assert_one_line_error(
        run("eval", dense, "--data", corpora[0], "--compare", "source"), "no upcycle_report.json", "--compare FOLDER"
    )
    report = tmp_path / "moh" / "upcycle_report.json"
    report.write_text(json.dumps(json.loads(report.read_text()) | {"source": str(tmp_path / "gone")}))
    assert_one_line_error(
        run("eval", tmp_path / "moh", "--data", corpora[0], "--compare", "source"),
        "gone",
        "no longer exists",
        "--compare FOLDER",
    )
    report.write_text("{}")
    assert_one_line_error(
        run("eval", tmp_path / "moh", "--data", corpora[0], "--compare", "source"),
        "records no source",
        "--compare FOLDER",
    )


def test_eval_data_errors_and_asset_names(folders, corpora, tmp_path, monkeypatch):
    dense, _ = folders
    assert_one_line_error(
        run("eval", dense, "--data", corpora[0], "--data", tmp_path / "missing.txt"),
        "--data",
        "missing.txt",
        "does not exist",
    )
    assert_one_line_error(run("eval", dense, "--data", corpora[0], "--data", corpora[0]), "given twice")
    (tmp_path / "bible.txt").write_text("w1 w2\n")
    assert_one_line_error(
        run("eval", dense, "--data", corpora[0], "--data", tmp_path / "bible.txt"), "named bible.txt", "rename one"
    )
    assert run("eval", dense).exit_code != 0  # --data is required
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    files = corpus_files(["asset:kjv-heldout", str(corpora[1])])
    assert list(files) == ["kjv-heldout", "code.txt"] and files["kjv-heldout"].exists()
