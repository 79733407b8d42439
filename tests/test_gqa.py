"""MHA to GQA/MQA: identity at G = current, exact on duplicated KV heads, plain native output, bad inputs,
o_proj refit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_dense
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, leftovers, run
from test_prune_heads import attention_errors, calibration_tokens, kl_to_dense
from transformers import AutoModelForCausalLM

from upcycle.convert import convert_checkpoint
from upcycle.methods.gqa import GQAOptions

IDS = torch.randint(3, 128, (2, 17), generator=torch.Generator().manual_seed(0))


def gqa(src: Path, out: Path, kv_heads: int, **options) -> dict:
    return convert_checkpoint(str(src), out, "gqa", GQAOptions(kv_heads=kv_heads, **options))


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_same_kv_count_is_the_identity(tmp_path, kv_heads):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=kv_heads)
    report = gqa(dense, tmp_path / "gqa", kv_heads)
    assert report["parameters"]["after"] == report["parameters"]["before"]
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "gqa" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    torch.testing.assert_close(logits(tmp_path / "gqa"), logits(dense), atol=1e-5, rtol=0)


def _duplicate_kv_heads(folder: Path, kv_heads: int, target: int, head_dim: int) -> None:
    """Make the KV heads that will be merged equal, so that their mean is each of them."""
    weights = load_file(folder / "model.safetensors")
    for name in weights:
        if any(f"self_attn.{p}." in name for p in ("k_proj", "v_proj")):
            grouped = weights[name].unflatten(0, (target, kv_heads // target, head_dim))
            weights[name] = grouped[:, :1].expand_as(grouped).flatten(0, 2).contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kv_heads,target", [(8, 1), (8, 2), (2, 1)])
def test_merging_equal_kv_heads_keeps_the_logits(tmp_path, family, kv_heads, target):
    dense = build_dense(tmp_path / "dense", family, num_key_value_heads=kv_heads)
    head_dim = 16 if family == "qwen3" else 8
    _duplicate_kv_heads(dense, kv_heads, target, head_dim)
    report = gqa(dense, tmp_path / "gqa", target)
    config = json.loads((tmp_path / "gqa" / "config.json").read_text())
    assert (
        config["model_type"] == family and config["num_key_value_heads"] == target and config["head_dim"] == head_dim
    )
    assert "upcycle" not in config and not (tmp_path / "gqa" / "modeling_upcycle.py").exists()
    assert report["parameters"]["before"] - report["parameters"]["after"] == 2 * 2 * (kv_heads - target) * head_dim * (
        64 + (family == "qwen2")
    )
    assert all(check["passed"] for check in report["checks"])
    torch.testing.assert_close(logits(tmp_path / "gqa"), logits(dense), atol=1e-5, rtol=0)


def test_new_kv_heads_are_means(tmp_path):
    dense = build_dense(tmp_path / "dense", "qwen2", num_key_value_heads=4)  # qwen2: k/v biases too
    gqa(dense, tmp_path / "gqa", 2)
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "gqa" / "model.safetensors")
    for name in ["model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.bias"]:
        heads = before[name].unflatten(0, (4, 8))  # [g, d, ...]
        torch.testing.assert_close(after[name], torch.cat([(heads[0] + heads[1]) / 2, (heads[2] + heads[3]) / 2]))
    assert torch.equal(
        after["model.layers.1.self_attn.q_proj.weight"], before["model.layers.1.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--kv-heads", "3"], ["--kv-heads 3 does not divide the 2 KV heads", "1, 2"]),
        (["--kv-heads", "0"], ["--kv-heads 0"]),
        ([], ["--kv-heads G"]),
        (
            ["--kv-heads", "1", "--refit", "rescale"],
            ["--refit rescale", "needs calibration text", "--calibration FILE"],
        ),
        (
            ["--kv-heads", "1", "--refit", "lstsq", "--calibration", "missing.txt"],
            ["--calibration missing.txt does not exist"],
        ),
    ],
)
def test_bad_kv_heads(tmp_path, dense, args, needles):
    assert_one_line_error(run("convert", dense, tmp_path / "out", "--method", "gqa", *args), *needles)
    assert leftovers(tmp_path) == []


def test_kv_heads_with_another_method(tmp_path, dense):
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--kv-heads", "1"), "--kv-heads applies to --method gqa"
    )
    assert leftovers(tmp_path) == []


def test_refit_with_another_method(tmp_path, dense):
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--refit", "lstsq"),
        "--refit applies to --method prune-heads or --method gqa",
    )
    assert leftovers(tmp_path) == []


def test_refit_lstsq_lowers_the_attention_error_and_the_loss(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)
    common = dict(calibration=calibration_file, calibration_tokens=1024)
    gqa(dense, tmp_path / "none", 1)
    report = gqa(dense, tmp_path / "lstsq", 1, refit="lstsq", **common)["refit"]
    assert [e["layer"] for e in report["per_layer"]] == [0, 1] and all(
        e["error_after"] < e["error_before"] for e in report["per_layer"]
    )
    blocks = calibration_tokens(dense, calibration_file)
    assert kl_to_dense(dense, tmp_path / "lstsq", blocks) < kl_to_dense(dense, tmp_path / "none", blocks)
    measured = attention_errors(dense, tmp_path / "lstsq", blocks)
    torch.testing.assert_close(
        torch.tensor(measured), torch.tensor([e["error_after"] for e in report["per_layer"]]), atol=1e-4, rtol=0
    )
    config = json.loads((tmp_path / "lstsq" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 1 and "upcycle" not in config
    rescaled = gqa(dense, tmp_path / "rescale", 1, refit="rescale", **common)
    assert rescaled["refit"]["mode"] == "rescale" and len(rescaled["refit"]["per_layer"]) == 2
    assert "refit rescale of o_proj on 1024 calibration tokens" in rescaled["plan_lines"][-1]


def test_refit_with_the_same_kv_count_keeps_every_byte(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense")
    report = gqa(dense, tmp_path / "gqa", 2, refit="lstsq", calibration=calibration_file)
    assert report["refit"]["per_layer"] == []
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "gqa" / "model.safetensors")
    assert all(torch.equal(before[n], after[n]) for n in before)
