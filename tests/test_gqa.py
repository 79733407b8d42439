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
    common = dict(calibration=calibration_file, calibration_tokens=1024, merge="mean")
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
    report = gqa(dense, tmp_path / "gqa", 2, refit="lstsq", calibration=calibration_file, merge="mean")
    assert report["refit"]["per_layer"] == []
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "gqa" / "model.safetensors")
    assert all(torch.equal(before[n], after[n]) for n in before)


# ---- --merge aligned: fitted on calibration text, transforms folded into q_proj and o_proj -------------------------


def _transformed_kv_heads(folder: Path, kv_heads: int, target: int, head_dim: int, seed: int = 0) -> None:
    """Make every KV head of a group an exact transform of the group's first: its keys a complex scale of the first
    head's per rotary frequency pair (a rotation and a gain, which commutes with RoPE), its values an invertible linear
    map of the first head's (biases transformed alike). Mean-pooling such heads changes the model; an aligned merge
    need not."""
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(folder / "model.safetensors")
    half, per = head_dim // 2, kv_heads // target
    for name in list(weights):
        if "self_attn.k_proj." in name or "self_attn.v_proj." in name:
            heads = weights[name].unflatten(0, (target, per, head_dim)).clone()  # [G, r, d, ...]
            for group in range(target):
                first = heads[group, 0]
                for member in range(1, per):
                    if "k_proj" in name:
                        angle = torch.rand(half, generator=generator) * 6.28
                        gain = 0.5 + torch.rand(half, generator=generator)
                        cos, sin = (gain * angle.cos()), (gain * angle.sin())
                        shape = (half,) + (1,) * (first.dim() - 1)
                        a, b = first[:half], first[half:]
                        heads[group, member] = torch.cat(
                            [cos.view(shape) * a - sin.view(shape) * b, sin.view(shape) * a + cos.view(shape) * b]
                        )
                    else:
                        seed_map = torch.Generator().manual_seed(seed + 100 * group + member)
                        mix = torch.eye(head_dim) + 0.3 * torch.randn(head_dim, head_dim, generator=seed_map)
                        heads[group, member] = torch.tensordot(mix, first, dims=1)
            weights[name] = heads.flatten(0, 2).contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kv_heads,target", [(8, 1), (8, 2), (2, 1)])
def test_aligned_merge_of_transformed_heads_keeps_the_logits(tmp_path, calibration_file, family, kv_heads, target):
    # qwen2 (k/v biases): transformers 5 gives a qwen2 folder the Qwen2 tokenizer, which needs byte-level vocabulary
    dense = build_dense(tmp_path / "dense", family, text=family == "qwen2", num_key_value_heads=kv_heads)
    _transformed_kv_heads(dense, kv_heads, target, head_dim=8)
    report = gqa(dense, tmp_path / "aligned", target, merge="aligned", calibration=calibration_file)
    assert all(check["passed"] for check in report["checks"])
    config = json.loads((tmp_path / "aligned" / "config.json").read_text())
    assert config["model_type"] == family and config["num_key_value_heads"] == target
    assert "auto_map" not in config and not (tmp_path / "aligned" / "modeling_upcycle.py").exists()
    assert report["merge"]["mean_key_error"] < 1e-6 and report["merge"]["mean_value_error"] < 1e-5
    torch.testing.assert_close(logits(tmp_path / "aligned"), logits(dense), atol=1e-4, rtol=1e-4)
    gqa(dense, tmp_path / "mean", target)  # the control: averaging such heads changes the model
    assert (logits(tmp_path / "mean") - logits(dense)).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_auto_merge_is_aligned_with_calibration_where_the_family_allows(tmp_path, calibration_file, family):
    dense = build_dense(tmp_path / "dense", family)
    plain = gqa(dense, tmp_path / "plain", 1)
    assert plain["options"]["merge"] == "mean" and "merge" not in plain
    calibrated = gqa(dense, tmp_path / "calibrated", 1, calibration=calibration_file)
    if family == "qwen3":  # keys normalised per head: no aligned merge, the mean as without calibration
        assert calibrated["options"]["merge"] == "mean" and "merge" not in calibrated
        assert torch.equal(logits(tmp_path / "calibrated"), logits(tmp_path / "plain"))
    else:
        assert calibrated["options"]["merge"] == "aligned" and calibrated["merge"]["per_layer"]
        assert "aligned merge on calibration text" in calibrated["plan_lines"][-1]


def test_aligned_merge_with_the_same_kv_count_keeps_every_byte(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense")
    report = gqa(dense, tmp_path / "gqa", 2, merge="aligned", calibration=calibration_file, refit="lstsq")
    assert "merge" not in report and report["refit"]["per_layer"] == []
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "gqa" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_aligned_merge_keeps_more_of_the_dense_model_than_the_mean(tmp_path, calibration_file):
    """On unrelated random heads there is no exact merge: the fitted one stays closer to the dense model."""
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)
    blocks = calibration_tokens(dense, calibration_file)
    gqa(dense, tmp_path / "mean", 1)
    report = gqa(dense, tmp_path / "aligned", 1, merge="aligned", calibration=calibration_file)
    assert 0 < report["merge"]["mean_key_error"] < 1 and 0 < report["merge"]["mean_value_error"] < 1
    assert "aligned merge on calibration text, 2 layers" in report["plan_lines"][-1]
    assert kl_to_dense(dense, tmp_path / "aligned", blocks) < kl_to_dense(dense, tmp_path / "mean", blocks)
    refitted = gqa(dense, tmp_path / "both", 1, merge="aligned", refit="lstsq", calibration=calibration_file)
    assert all(e["error_after"] <= e["error_before"] for e in refitted["refit"]["per_layer"])


@pytest.mark.parametrize(
    "family,args,needles",
    [
        ("llama", ["--merge", "aligned"], ["--merge aligned is fitted on calibration text", "--merge mean"]),
        ("qwen3", ["--merge", "aligned", "--calibration", "{cal}"], ["normalises each key head", "--merge mean"]),
    ],
)
def test_aligned_merge_bad_inputs(tmp_path, calibration_file, family, args, needles):
    dense = build_dense(tmp_path / "dense", family)
    args = [a.format(cal=calibration_file) for a in args]
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--method", "gqa", "--kv-heads", "1", *args), *needles
    )
    assert not (tmp_path / "out").exists()


def test_lstsq_ridge_is_chosen_on_held_out_batches(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=8)
    common = dict(calibration=calibration_file, calibration_tokens=4096, refit="lstsq", merge="mean")  # 16 blocks
    report = gqa(dense, tmp_path / "auto", 1, **common)["refit"]
    assert report["ridge"] == "auto"
    for entry in report["per_layer"]:
        assert entry["ridge"] in (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
        assert entry["heldout_error"] <= entry["heldout_error_weakest"]
    fixed = gqa(dense, tmp_path / "fixed", 1, refit_ridge="0.5", **common)
    assert fixed["refit"]["ridge"] == 0.5 and all(e["ridge"] == 0.5 for e in fixed["refit"]["per_layer"])
    assert "ridge 0.5" in fixed["plan_lines"][-1]
    weights = [
        load_file(tmp_path / name / "model.safetensors")["model.layers.0.self_attn.o_proj.weight"]
        for name in ("auto", "fixed")
    ]
    assert not torch.equal(*weights)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--refit", "lstsq", "--refit-ridge", "lots"], "--refit-ridge 'lots' is not auto or a finite number >= 0"),
        (["--refit", "lstsq", "--refit-ridge", "-1"], "--refit-ridge '-1'"),
        (
            ["--refit", "rescale", "--refit-ridge", "0.1"],
            "--refit-ridge applies to --refit lstsq, not --refit rescale",
        ),
    ],
)
def test_bad_ridge_is_one_line(tmp_path, dense, calibration_file, args, needle):
    result = run(
        "convert",
        dense,
        tmp_path / "out",
        "--method",
        "gqa",
        "--kv-heads",
        "1",
        "--calibration",
        calibration_file,
        *args,
    )
    assert_one_line_error(result, needle)
    assert leftovers(tmp_path) == []
