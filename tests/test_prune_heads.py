"""Head pruning: null setting, slicing = zero gates (every family), native and upcycle outputs, importance,
o_proj refit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_bert, build_dense
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, leftovers, run
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

import upcycle  # noqa: F401  (registers the Auto classes)
from upcycle.convert import convert_checkpoint
from upcycle.methods.prune_heads import PruneHeadsOptions, attach_unit_gates

IDS = torch.randint(5, 128, (2, 17), generator=torch.Generator().manual_seed(0))


def prune(src: Path, out: Path, **options) -> dict:
    return convert_checkpoint(str(src), out, "prune-heads", PruneHeadsOptions(**options))


def load(folder: Path, auto=AutoModelForCausalLM):
    return auto.from_pretrained(folder, dtype=torch.float32).eval()


def outputs(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def removed_units(report: dict, units: int) -> list[set[int]]:
    """Units (heads for MHA, KV groups for GQA) the conversion removed, per layer."""
    return [set(range(units)) - set(layer["kept_kv_heads"]) for layer in report["kept"]]


def zero_gated(dense: Path, report: dict, auto=AutoModelForCausalLM):
    """The unpruned model with the removed units' gates set to zero through the runtime."""
    model = load(dense, auto)
    units = report["units"]["per_layer"]
    attach_unit_gates(model, removed_units(report, units), units, report["units"]["heads_per_unit"])
    return model


CASES = [(family, 2) for family in sorted(FAMILIES)] + [("llama", 8)]


@pytest.mark.parametrize("family,kv_heads", CASES)
@pytest.mark.parametrize("uniform", [True, False])
def test_pruned_equals_zero_gates(tmp_path, family, kv_heads, uniform):
    dense = build_dense(tmp_path / "dense", family, num_key_value_heads=kv_heads)
    ratio = 0.5 if uniform else (0.25 if kv_heads == 2 else 0.1875)  # an odd number of units: never uniform
    report = prune(dense, tmp_path / "pruned", ratio=ratio, importance="random", seed=3, uniform=uniform)
    kept = report["heads_kept_per_layer"]
    assert (len(set(kept)) == 1) == uniform and sum(kept) == 16 - round(16 * ratio)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    if uniform:  # a plain checkpoint of the family with fewer heads
        assert config["model_type"] == family and "upcycle" not in config and "auto_map" not in config
        assert config["num_attention_heads"] == kept[0] and config["head_dim"] == 8 * (2 if family == "qwen3" else 1)
        assert not (tmp_path / "pruned" / "modeling_upcycle.py").exists()
    else:
        assert config["model_type"] == f"upcycle_{family}" and config["upcycle"]["method"] == "prune-heads"
    pruned = load(tmp_path / "pruned")
    assert (
        sum(p.numel() for p in pruned.parameters()) == report["parameters"]["after"] < report["parameters"]["before"]
    )
    torch.testing.assert_close(outputs(pruned), outputs(zero_gated(dense, report)), atol=1e-5, rtol=0)
    assert (tmp_path / "pruned" / "model.safetensors").stat().st_size < (dense / "model.safetensors").stat().st_size


@pytest.mark.parametrize("mlm", [False, True])
@pytest.mark.parametrize("uniform", [True, False])
def test_bert_pruned_equals_zero_gates(tmp_path, mlm, uniform):
    dense = build_bert(tmp_path / "dense", mlm=mlm)
    auto = AutoModelForMaskedLM if mlm else AutoModel
    report = prune(
        dense, tmp_path / "pruned", ratio=0.5 if uniform else 0.3125, importance="random", seed=1, uniform=uniform
    )
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["model_type"] == "upcycle_bert"  # BertConfig cannot express fewer heads of the same size
    assert config["architectures"] == ["UpcycleBertForMaskedLM" if mlm else "UpcycleBertModel"]
    pruned = load(tmp_path / "pruned", auto)
    attention = pruned.base_model.encoder.layer[0].attention
    assert (
        attention.self.query.out_features
        == 8 * report["heads_kept_per_layer"][0]
        == attention.output.dense.in_features
    )
    torch.testing.assert_close(outputs(pruned), outputs(zero_gated(dense, report, auto)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family,kv_heads", [("llama", 2), ("llama", 8), ("qwen2", 2), ("bert", 8)])
def test_ratio_zero_is_identical(tmp_path, family, kv_heads):
    if family == "bert":
        dense, auto = build_bert(tmp_path / "dense"), AutoModel
    else:
        dense, auto = build_dense(tmp_path / "dense", family, num_key_value_heads=kv_heads), AutoModelForCausalLM
    report = prune(dense, tmp_path / "pruned", ratio=0.0)  # no calibration needed: nothing is scored
    assert report["parameters"]["after"] == report["parameters"]["before"]
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "pruned" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    torch.testing.assert_close(outputs(load(tmp_path / "pruned", auto)), outputs(load(dense, auto)), atol=1e-5, rtol=0)


NO_UPCYCLE = """
    import importlib.abc, sys
    class NoUpcycle(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "upcycle":
                raise ImportError("upcycle is made unimportable for this test")
    sys.meta_path.insert(0, NoUpcycle())
    import torch
"""


def run_without_upcycle(tmp_path: Path, body: str) -> None:
    """Run ``body`` in a fresh interpreter where ``upcycle`` cannot be imported.

    The child uses this process's intra-op thread count: CPU matmuls split their reductions by thread,
    so a reference computed here with N threads and a reload computed with 1 differ in the last bits
    (~1e-7) even with bit-identical weights, and the callers compare logits with atol=0."""
    threads = torch.get_num_threads()
    script = textwrap.dedent(NO_UPCYCLE) + f"torch.set_num_threads({threads})\n" + textwrap.dedent(body)
    env = os.environ | {
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": str(threads),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


@pytest.mark.parametrize("family,heads", [("llama", 4), ("qwen2", 6)])
def test_uniform_output_loads_in_plain_transformers(tmp_path, family, heads):
    dense = build_dense(tmp_path / "dense", family, num_key_value_heads=8)
    prune(dense, tmp_path / "pruned", ratio=1 - heads / 8, uniform=True, importance="random")
    torch.save({"ids": IDS, "logits": outputs(load(tmp_path / "pruned"))}, tmp_path / "expected.pt")
    run_without_upcycle(
        tmp_path,
        f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "pruned")!r}, dtype=torch.float32).eval()
        module = type(model).__module__
        assert "upcycle" not in sys.modules and module.startswith("transformers.models"), module
        q_proj = model.model.layers[0].self_attn.q_proj
        assert model.config.num_attention_heads == {heads} and q_proj.out_features == {8 * heads}
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(data["ids"]).logits, data["logits"], atol=0, rtol=0)
        print("ok")
    """,
    )


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_non_uniform_output_loads_both_ways(tmp_path, family):
    dense = build_bert(tmp_path / "dense") if family == "bert" else build_dense(tmp_path / "dense", family)
    auto = "AutoModel" if family == "bert" else "AutoModelForCausalLM"
    report = prune(dense, tmp_path / "pruned", ratio=0.25 if family == "llama" else 0.3125, importance="random")
    assert len(set(report["heads_kept_per_layer"])) == 2
    for file in ["modeling_upcycle.py", "configuration_upcycle.py", "surgery.py", "gated_attention.py"]:
        assert (tmp_path / "pruned" / file).exists(), file
    expected = outputs(
        load(tmp_path / "pruned", AutoModel if family == "bert" else AutoModelForCausalLM)
    )  # after import upcycle
    torch.save({"ids": IDS, "out": expected}, tmp_path / "expected.pt")
    run_without_upcycle(
        tmp_path,
        f"""
        from transformers import {auto}
        try:
            {auto}.from_pretrained({str(tmp_path / "pruned")!r})
            sys.exit("loaded without trust_remote_code")
        except Exception:
            pass
        model = {auto}.from_pretrained(
            {str(tmp_path / "pruned")!r}, trust_remote_code=True, dtype=torch.float32
        ).eval()
        module = type(model).__module__
        assert "upcycle" not in sys.modules and module.startswith("transformers_modules"), module
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(data["ids"])
        result = getattr(out, "logits", None) if hasattr(out, "logits") else out.last_hidden_state
        torch.testing.assert_close(result, data["out"], atol=0, rtol=0)
        print("ok")
    """,
    )


def test_uniform_llama_that_transformers_refuses_is_an_upcycle_checkpoint(tmp_path):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)  # 64 % 6 != 0: LlamaConfig refuses 6 heads
    report = prune(dense, tmp_path / "pruned", ratio=0.25, uniform=True, importance="random")
    assert report["heads_kept_per_layer"] == [6, 6] and report["output_format"].startswith(
        "upcycle (transformers refuses"
    )
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["model_type"] == "upcycle_llama"
    torch.testing.assert_close(
        outputs(load(tmp_path / "pruned")), outputs(zero_gated(dense, report)), atol=1e-5, rtol=0
    )


def _scale_head(folder: Path, name: str, head: int, factor: float, head_dim: int = 8) -> None:
    weights = load_file(folder / "model.safetensors")
    weights[name][:, head * head_dim : (head + 1) * head_dim] *= factor
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("iterative", [1, 2])
def test_gradient_importance_keeps_the_strong_units(tmp_path, calibration_file, iterative):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)
    strong = {0: [1, 4], 1: [6, 7]}
    for layer, heads in strong.items():
        for head in heads:
            _scale_head(dense, f"model.layers.{layer}.self_attn.o_proj.weight", head, 30.0)
    report = prune(
        dense,
        tmp_path / "pruned",
        ratio=0.75,
        uniform=True,
        iterative=iterative,
        calibration=calibration_file,
        calibration_tokens=1024,
    )
    assert [layer["kept_heads"] for layer in report["kept"]] == [strong[0], strong[1]]
    scores = torch.tensor(report["head_scores"])
    torch.testing.assert_close(scores.norm(dim=1), torch.ones(2, dtype=scores.dtype))  # normalised per layer


@pytest.mark.parametrize("mlm", [False, True])
def test_bert_gradient_importance_keeps_the_strong_heads(tmp_path, calibration_file, mlm):
    dense = build_bert(tmp_path / "dense", mlm=mlm)
    prefix = "bert." if mlm else ""
    for head in (2, 5):
        _scale_head(dense, f"{prefix}encoder.layer.1.attention.output.dense.weight", head, 30.0)
    report = prune(
        dense, tmp_path / "pruned", ratio=0.75, uniform=True, calibration=calibration_file, calibration_tokens=2048
    )
    assert report["kept"][1]["kept_heads"] == [2, 5]


def test_gqa_units_are_kv_groups_and_min_heads(tmp_path):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=4)  # 4 groups of 2 query heads
    report = prune(dense, tmp_path / "pruned", ratio=0.5, importance="random", min_heads_per_layer=3)
    assert report["units"] | {} == {"kind": "KV groups", "per_layer": 4, "heads_per_unit": 2, "removed": 4}
    for layer in report["kept"]:
        assert len(layer["kept_heads"]) == 2 * len(layer["kept_kv_heads"]) >= 4  # at least 3 heads = 2 whole groups
        assert layer["kept_heads"] == [2 * g + i for g in layer["kept_kv_heads"] for i in range(2)]


def test_report_and_card(tmp_path):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)
    prune(dense, tmp_path / "pruned", ratio=0.5, uniform=True, importance="random")
    report = json.loads((tmp_path / "pruned" / "upcycle_report.json").read_text())
    assert report["method"] == "prune-heads" and report["heads_kept_per_layer"] == [4, 4]
    assert (
        report["parameters"]["before"] - report["parameters"]["after"] == 2 * 4 * 8 * 64 * 4
    )  # q, k, v rows and o columns
    assert all(check["passed"] for check in report["checks"]) and len(report["checks"]) == 3
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert "trust_remote_code" not in card and "prune-heads" in card


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--ratio", "1.0"], ["--ratio 1.0 is outside [0, 1)"]),
        (["--ratio", "-0.1"], ["--ratio -0.1 is outside [0, 1)"]),
        ([], ["--ratio R"]),
        (
            ["--ratio", "0.95", "--importance", "random"],
            ["--ratio 0.95 removes 15 of 16 heads", "--min-heads-per-layer 1"],
        ),
        (
            ["--ratio", "0.5", "--importance", "random", "--min-heads-per-layer", "5", "--uniform"],
            ["4 of 8 heads in every layer", "--min-heads-per-layer 5"],
        ),
        (
            ["--ratio", "0.5", "--importance", "random", "--min-heads-per-layer", "9"],
            ["--min-heads-per-layer 9 is outside [1, 8]"],
        ),
        (["--ratio", "0.25"], ["--importance gradient needs calibration text", "--calibration FILE"]),
        (["--ratio", "0.25", "--calibration", "missing.txt"], ["--calibration missing.txt does not exist"]),
        (["--ratio", "0.25", "--importance", "random", "--iterative", "0"], ["--iterative 0"]),
        (
            ["--ratio", "0.25", "--importance", "random", "--refit", "lstsq"],
            ["--refit lstsq", "needs calibration text", "--calibration FILE"],
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needles):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)
    assert_one_line_error(run("convert", dense, tmp_path / "out", "--method", "prune-heads", *args), *needles)
    assert leftovers(tmp_path) == []


def test_gqa_ratio_that_empties_a_layer(tmp_path):
    dense = build_dense(tmp_path / "dense")  # 2 KV groups of 4 heads per layer
    result = run(
        "convert",
        dense,
        tmp_path / "out",
        "--method",
        "prune-heads",
        "--ratio",
        "0.5",
        "--importance",
        "random",
        "--min-heads-per-layer",
        "5",
    )
    assert_one_line_error(result, "removes 2 of 4 KV groups", "--min-heads-per-layer 5")
    assert leftovers(tmp_path) == []


def test_cli_prunes_and_inspect_shows_the_plan(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense")
    result = run(
        "convert",
        dense,
        tmp_path / "out",
        "--method",
        "prune-heads",
        "--ratio",
        "0.25",
        "--calibration",
        calibration_file,
        "--calibration-tokens",
        "512",
        "--refit",
        "lstsq",
    )
    assert result.exit_code == 0, result.output
    assert "upcycle checkpoint with per-layer head counts" in result.stdout and "fewer" in result.stdout
    assert "refit lstsq of o_proj on 512 calibration tokens, 1 layer: mean attention-output error" in result.stdout
    info = json.loads(run("inspect", tmp_path / "out", "--json").stdout)
    assert info["method"] == "prune-heads" and sorted(
        len(layer["attention_heads"]["kept_heads"]) for layer in info["plan"]
    ) == [4, 8]
    assert "query heads kept" in run("inspect", tmp_path / "out").stdout


def test_normalize_modes():
    from upcycle.errors import UpcycleError
    from upcycle.methods.prune_heads import normalize_per_layer

    assert normalize_per_layer("auto", 3) is False and normalize_per_layer("auto", 12) is True
    assert normalize_per_layer("layer", 3) is True and normalize_per_layer("none", 12) is False
    with pytest.raises(UpcycleError, match="--normalize"):
        normalize_per_layer("global", 3)


def calibration_tokens(folder: Path, text: Path, tokens: int = 1024) -> torch.Tensor:
    """The blocks [N, T] the refit saw."""
    from upcycle.data.calibration import calibration_blocks

    return calibration_blocks(
        folder, json.loads((folder / "config.json").read_text()), text, tokens, 512, encoder=False
    )


def kl_to_dense(dense: Path, converted: Path, blocks: torch.Tensor) -> float:
    """KL(dense || converted) of the next-token distributions on ``blocks``: the excess calibration-text
    loss of ``converted`` on text drawn from the dense model (a random model's own LM loss on random
    words is ln(vocab) whatever its attention does, so it cannot tell conversions apart)."""
    dense_logp, converted_logp = (outputs(load(folder), blocks).log_softmax(-1) for folder in (dense, converted))
    return (dense_logp.exp() * (dense_logp - converted_logp)).sum(-1).mean().item()


def attention_errors(dense: Path, converted: Path, blocks: torch.Tensor) -> list[float]:
    """Per layer ||Y - Y_dense|| / ||Y_dense|| of the o_proj outputs of two written models on ``blocks``."""
    outputs = []
    for folder in (dense, converted):
        model, seen = load(folder), []
        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(lambda _m, _a, out: seen.append(out))
        with torch.no_grad():
            model(blocks)
        outputs.append(seen)
    return [((y - ref).norm() / ref.norm()).item() for ref, y in zip(*outputs)]


def test_refit_lstsq_lowers_the_attention_error_and_the_loss(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)
    common = dict(
        ratio=0.5, uniform=True, importance="random", seed=2, calibration=calibration_file, calibration_tokens=1024
    )
    prune(dense, tmp_path / "none", **common)
    report = prune(dense, tmp_path / "lstsq", refit="lstsq", **common)["refit"]
    assert (
        report["mode"] == "lstsq"
        and report["calibration_tokens"] == 1024
        and [e["layer"] for e in report["per_layer"]] == [0, 1]
    )
    assert all(e["error_after"] < e["error_before"] for e in report["per_layer"])
    blocks = calibration_tokens(dense, calibration_file)
    assert kl_to_dense(dense, tmp_path / "lstsq", blocks) < kl_to_dense(dense, tmp_path / "none", blocks) / 2
    # the reported errors are those of the written models (before: the conversion without refit)
    measured_before, measured_after = (attention_errors(dense, tmp_path / name, blocks) for name in ("none", "lstsq"))
    torch.testing.assert_close(
        torch.tensor(measured_before),
        torch.tensor([e["error_before"] for e in report["per_layer"]]),
        atol=1e-4,
        rtol=0,
    )
    torch.testing.assert_close(
        torch.tensor(measured_after), torch.tensor([e["error_after"] for e in report["per_layer"]]), atol=1e-4, rtol=0
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lstsq")  # still a plain llama
    assert type(model).__module__.startswith("transformers.models.llama") and model.config.num_attention_heads == 4


def test_refit_rescale_scales_o_proj_rows(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense")  # GQA: units are KV groups
    common = dict(ratio=0.25, importance="random", calibration=calibration_file, calibration_tokens=1024)
    prune(dense, tmp_path / "none", **common)
    report = prune(dense, tmp_path / "rescale", refit="rescale", **common)
    changed = [i for i, kept in enumerate(report["heads_kept_per_layer"]) if kept < 8]
    assert [e["layer"] for e in report["refit"]["per_layer"]] == changed and "refit rescale" in report["plan_lines"][
        -1
    ]
    sliced, scaled = (load_file(tmp_path / name / "model.safetensors") for name in ("none", "rescale"))
    for layer in range(2):
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        scale = scaled[name].norm(dim=1) / sliced[name].norm(dim=1)  # [D]
        torch.testing.assert_close(scaled[name], scale[:, None] * sliced[name])
        assert (layer in changed) != torch.equal(scaled[name], sliced[name])


def test_refit_at_ratio_zero_keeps_every_byte(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)
    report = prune(dense, tmp_path / "pruned", ratio=0.0, refit="lstsq", calibration=calibration_file)
    assert report["refit"]["per_layer"] == []
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "pruned" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_bert_refit_lstsq(tmp_path, calibration_file):
    dense = build_bert(tmp_path / "dense")
    report = prune(
        dense,
        tmp_path / "pruned",
        ratio=0.3125,
        importance="random",
        refit="lstsq",
        calibration=calibration_file,
        calibration_tokens=1024,
    )
    assert (
        all(e["error_after"] < e["error_before"] for e in report["refit"]["per_layer"])
        and len(report["refit"]["per_layer"]) == 2
    )
    pruned = load(tmp_path / "pruned", AutoModel)
    written = load_file(tmp_path / "pruned" / "model.safetensors")["encoder.layer.0.attention.output.dense.weight"]
    assert torch.equal(pruned.encoder.layer[0].attention.output.dense.weight, written)
    assert outputs(pruned).isfinite().all()
