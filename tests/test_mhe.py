"""MHE conversion: exact fits of MHE-form models, parameter counts, optimality of the calibrated and sequential fits,
runtime, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_bert, build_dense
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, leftovers, run
from test_prune_heads import run_without_upcycle
from transformers import AutoModel, AutoModelForCausalLM

import upcycle  # noqa: F401  (registers the Auto classes)
from upcycle.convert import convert_checkpoint
from upcycle.errors import UpcycleError
from upcycle.methods.mhe import MHEOptions, fit_projection, input_moments, relative_error, stack_heads
from upcycle.modeling.mhe_projection import MHEProjection

IDS = torch.randint(5, 128, (2, 17), generator=torch.Generator().manual_seed(0))
PROJECTIONS = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value"),
}


def mhe(src: Path, out: Path, **options) -> dict:
    return convert_checkpoint(str(src), out, "mhe", MHEOptions(**options))


def build(folder: Path, family: str) -> Path:
    return build_bert(folder) if family == "bert" else build_dense(folder, family)


def auto_for(family: str):
    return AutoModel if family == "bert" else AutoModelForCausalLM


def outputs(folder: Path, family: str, ids: torch.Tensor = IDS) -> torch.Tensor:
    model = auto_for(family).from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def make_mhe_form(folder: Path, family: str, variant: str, seed: int = 0) -> None:
    """Rewrite the dense q/k/v tensors in place so that each is exactly of MHE form."""
    generator = torch.Generator().manual_seed(seed)
    path = folder / "model.safetensors"
    tensors = load_file(path)
    head_dim = 16 if family == "qwen3" else 8
    layer_key = "encoder.layer" if family == "bert" else "model.layers"
    for name in [
        n
        for n in tensors
        if n.endswith(".weight")
        and any(p + ".weight" in n for p in PROJECTIONS["bert" if family == "bert" else "llama"])
    ]:
        weight = tensors[name]  # [H*d_h, d]
        heads = weight.shape[0] // head_dim
        shared = weight[:head_dim]  # [d_h, d]
        sign = torch.where(torch.rand(heads, head_dim, generator=generator) < 0.3, -1.0, 1.0)
        embedding = (0.5 + torch.rand(heads, head_dim, generator=generator)) * sign  # [H, d_h]
        bias_name = name.removesuffix("weight") + "bias"
        if variant == "mul":
            tensors[name] = (embedding[:, :, None] * shared).flatten(0, 1).contiguous()
            if bias_name in tensors:
                tensors[bias_name] = (embedding * tensors[bias_name][:head_dim]).flatten().contiguous()
        else:
            tensors[name] = shared.repeat(heads, 1).contiguous()
            if bias_name in tensors:
                tensors[bias_name] = (tensors[bias_name][:head_dim] + 0.3 * embedding).flatten().contiguous()
        assert layer_key in name
    save_file(tensors, path, metadata={"format": "pt"})


EXACT = [(family, "mul") for family in [*sorted(FAMILIES), "bert"]] + [("qwen2", "add"), ("bert", "add")]


@pytest.mark.parametrize("family,variant", EXACT)
def test_exact_mhe_form_converts_without_error(tmp_path, family, variant):
    dense = build(tmp_path / "dense", family)
    make_mhe_form(dense, family, variant)
    report = mhe(dense, tmp_path / "mhe", variant=variant)
    for layer in report["reconstruction_error"]["layers"]:
        assert max(layer["q_proj"], layer["k_proj"], layer["v_proj"]) < 1e-6, layer
    torch.testing.assert_close(outputs(tmp_path / "mhe", family), outputs(dense, family), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["calibrated", "sequential"])
@pytest.mark.parametrize("family,variant", [("llama", "mul"), ("bert", "mul"), ("bert", "add")])
def test_exact_mhe_form_calibrated_fit_and_attention_output(tmp_path, family, variant, init, calibration_file):
    dense = build(tmp_path / "dense", family)
    make_mhe_form(dense, family, variant)
    report = mhe(
        dense, tmp_path / "mhe", variant=variant, init=init, calibration=calibration_file, calibration_tokens=1024
    )
    assert report["reconstruction_error"]["measured_on"].startswith("calibration activations")
    for layer in report["reconstruction_error"]["layers"]:
        assert max(layer["q_proj"], layer["k_proj"], layer["v_proj"]) < 1e-6 and layer["attention_output"] < 1e-5, (
            layer
        )
    torch.testing.assert_close(outputs(tmp_path / "mhe", family), outputs(dense, family), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mul", "add"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_calibrated_fit_beats_the_weight_fit_on_activations(tmp_path, family, variant, calibration_file):
    """The calibrated fit is the least-squares optimum on the activations, so it can only be better there."""
    dense = build(tmp_path / "dense", family)
    svd = mhe(dense, tmp_path / "svd", variant=variant, calibration=calibration_file, calibration_tokens=1024)
    fitted = mhe(
        dense,
        tmp_path / "cal",
        variant=variant,
        init="calibrated",
        calibration=calibration_file,
        calibration_tokens=1024,
    )
    assert (
        svd["reconstruction_error"]["measured_on"]
        == fitted["reconstruction_error"]["measured_on"]
        == "calibration activations"
    )
    for plain, calibrated in zip(svd["reconstruction_error"]["layers"], fitted["reconstruction_error"]["layers"]):
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert 0 < calibrated[proj] <= plain[proj] + 1e-9, (proj, plain, calibrated)
        assert 0 < calibrated["attention_output"] and 0 < plain["attention_output"]


def test_mul_fit_is_the_best_rank_one_fit():
    """Without data the mul fit is the per-coordinate rank-1 SVD: no perturbation lowers its error."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4 * 8, 32, generator=generator), torch.randn(4 * 8, generator=generator)
    stacked = stack_heads(weight, bias, 8)  # [8, 4, 33]
    mean = torch.zeros(33, dtype=torch.float64)
    mean[-1] = 1.0
    shared, embedding, error = fit_projection(stacked, "mul", None, mean)
    assert shared.shape == (8, 33) and embedding.shape == (4, 8)
    assert error == pytest.approx(relative_error(stacked, shared, embedding, "mul", None, mean), rel=1e-9)
    expected = math.sqrt(
        sum((torch.linalg.svdvals(stacked[c])[1:] ** 2).sum().item() for c in range(8)) / stacked.pow(2).sum().item()
    )
    assert error == pytest.approx(expected, rel=1e-6)
    for _ in range(5):
        noisy = shared + 1e-3 * torch.randn(shared.shape, generator=generator, dtype=torch.float64)
        assert relative_error(stacked, noisy, embedding, "mul", None, mean) > error
    assert embedding.pow(2).mean(dim=0).allclose(torch.ones(8, dtype=torch.float64))  # RMS 1 over the heads


@pytest.mark.parametrize("variant", ["mul", "add"])
def test_sequential_fit_is_the_least_squares_optimum_against_the_dense_target(variant):
    """With drift moments, the fit minimises sum_i ||X~ approx_i - X~_d w~_i||^2 on the sample: its reported error
    is the sample's, and no perturbation of the shared rows or the embeddings lowers it."""
    generator = torch.Generator().manual_seed(0)
    n, d, d_h, heads = 400, 12, 4, 3
    dense = (
        torch.randn(n, d, generator=generator, dtype=torch.float64)
        @ torch.randn(d, d, generator=generator, dtype=torch.float64)
        + 0.5
    )
    compressed = dense + 0.3 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    ones = torch.ones(n, 1, dtype=torch.float64)
    x, x_dense = torch.cat([compressed, ones], 1), torch.cat([dense, ones], 1)  # [n, d+1]: x~, x~_d
    z = torch.cat([x, x - x_dense], 1)  # [n, 2d+2]: [x~, v]
    stacked = stack_heads(
        torch.randn(heads * d_h, d, generator=generator), torch.randn(heads * d_h, generator=generator), d_h
    )  # [d_h, H, d+1]
    shared, embedding, error = fit_projection(stacked, variant, *input_moments(z.T @ z / n, d + 1, True, drift=True))
    target = torch.einsum("nk,chk->nch", x_dense, stacked)  # [n, d_h, H]

    def sample_error(shared: torch.Tensor, embedding: torch.Tensor) -> float:
        base = (x @ shared.T)[:, :, None]  # [n, d_h, 1]
        approx = base * embedding.T if variant == "mul" else base + embedding.T  # [n, d_h, H]
        return ((approx - target).pow(2).sum() / target.pow(2).sum()).sqrt().item()

    assert 0 < error == pytest.approx(sample_error(shared, embedding), rel=1e-6)
    for _ in range(5):
        assert (
            sample_error(
                shared + 1e-3 * torch.randn(shared.shape, generator=generator, dtype=torch.float64), embedding
            )
            > error
        )
        assert (
            sample_error(
                shared, embedding + 1e-3 * torch.randn(embedding.shape, generator=generator, dtype=torch.float64)
            )
            > error
        )


def end_to_end(dense: Path, converted: Path, family: str, calibration: Path) -> tuple[float, float | None]:
    """The last layer's attention-output relative error of ``converted`` against ``dense`` on the calibration
    text (each model on its own inputs) and, for decoders, ``converted``'s LM loss there."""
    from upcycle.data.calibration import calibration_blocks
    from upcycle.modeling.layer_parts import attention_of, layers_of

    blocks = calibration_blocks(
        dense, json.loads((dense / "config.json").read_text()), calibration, 1024, 512, encoder=family == "bert"
    )  # [N, T]
    seen = []
    for folder in (dense, converted):
        model = auto_for(family).from_pretrained(folder, dtype=torch.float32).eval()
        attention_of(layers_of(model)[-1]).register_forward_hook(lambda _module, _args, output: seen.append(output[0]))
        with torch.no_grad():
            out = model(blocks, **({} if family == "bert" else {"labels": blocks}))
    reference, approx = seen
    return ((approx - reference).norm() / reference.norm()).item(), None if family == "bert" else out.loss.item()


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_sequential_fit_tracks_the_dense_model(tmp_path, family, calibration_file, capsys):
    """Layer 0 sees the dense inputs (the calibrated fit); above it, the fit corrects the drift from below."""
    dense = build(tmp_path / "dense", family)
    calibrated = mhe(
        dense, tmp_path / "calibrated", init="calibrated", calibration=calibration_file, calibration_tokens=1024
    )
    capsys.readouterr()
    sequential = mhe(
        dense, tmp_path / "sequential", init="sequential", calibration=calibration_file, calibration_tokens=1024
    )
    captured = capsys.readouterr()
    assert (
        "init sequential (fitted each layer on the outputs of the converted layers below it, "
        "against the dense model's)" in captured.out
    )
    assert "MHE sequential fit: 100%" in captured.err and "| 2/2 [" in captured.err
    assert (
        sequential["reconstruction_error"]["fit"].startswith("sequential")
        and sequential["options"]["init"] == "sequential"
    )
    assert sequential["reconstruction_error"]["layers"][0] == pytest.approx(
        calibrated["reconstruction_error"]["layers"][0], rel=1e-6
    )
    calibrated_error, calibrated_loss = end_to_end(dense, tmp_path / "calibrated", family, calibration_file)
    sequential_error, sequential_loss = end_to_end(dense, tmp_path / "sequential", family, calibration_file)
    assert sequential["reconstruction_error"]["layers"][-1]["attention_output"] == pytest.approx(
        sequential_error, rel=1e-3
    )
    assert sequential_error <= calibrated_error + 0.01, (sequential_error, calibrated_error)
    if family == "llama":
        assert sequential_loss <= calibrated_loss, (sequential_loss, calibrated_loss)


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert"])
def test_parameter_counts_match_the_formula(tmp_path, family):
    dense = build(tmp_path / "dense", family)
    report = mhe(dense, tmp_path / "mhe")
    d, d_h, layers = 64, 8, 2
    heads, kv_heads = (8, 8) if family == "bert" else (8, 2)
    bias = family in ("qwen2", "bert")
    qkv = (
        3 * (d_h * d + (d_h if bias else 0)) + (heads + 2 * kv_heads) * d_h
    )  # single-head QKV + 3 embeddings (GQA split)
    o_proj = d * heads * d_h + (d if family == "bert" else 0)
    dense_qkv = (heads + 2 * kv_heads) * d_h * (d + (1 if bias else 0))
    assert report["attention_parameters"]["after"] == layers * (qkv + o_proj)
    assert report["attention_parameters"]["before"] == layers * (dense_qkv + o_proj)
    saved = 100 * (1 - report["attention_parameters"]["after"] / report["attention_parameters"]["before"])
    assert report["attention_parameters"]["saved_percent"] == pytest.approx(saved, abs=0.01)
    model = auto_for(family).from_pretrained(tmp_path / "mhe")
    counted = sum(p.numel() for p in model.parameters())
    assert counted == report["parameters"]["after"] == report["parameters"]["before"] - layers * (dense_qkv - qkv)
    assert sum(isinstance(m, MHEProjection) for m in model.modules()) == 3 * layers


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("variant", ["mul", "add"])
def test_generate_with_and_without_cache(tmp_path, family, variant):
    mhe(build_dense(tmp_path / "dense", family), tmp_path / "mhe", variant=variant)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mhe", dtype=torch.float32).eval()
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 17) and torch.equal(cached, uncached)
    with torch.no_grad():
        full = model(IDS).logits
    assert full.shape == (2, 17, 128) and torch.isfinite(full).all()


@pytest.mark.parametrize("family", ["qwen3", "bert"])
def test_bundled_runtime_loads_without_upcycle(tmp_path, family):
    dense = build(tmp_path / "dense", family)
    mhe(dense, tmp_path / "mhe", variant="add")
    auto = auto_for(family).__name__
    expected = outputs(tmp_path / "mhe", family)
    torch.save({"ids": IDS, "out": expected}, tmp_path / "expected.pt")
    assert (tmp_path / "mhe" / "mhe_projection.py").exists()
    run_without_upcycle(
        tmp_path,
        f"""
        from transformers import {auto}
        try:
            {auto}.from_pretrained({str(tmp_path / "mhe")!r})
            sys.exit("loaded without trust_remote_code")
        except Exception:
            pass
        model = {auto}.from_pretrained(
            {str(tmp_path / "mhe")!r}, trust_remote_code=True, dtype=torch.float32
        ).eval()
        module = type(model).__module__
        assert "upcycle" not in sys.modules and module.startswith("transformers_modules"), module
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(data["ids"])
        result = out.logits if hasattr(out, "logits") else out.last_hidden_state
        torch.testing.assert_close(result, data["out"], atol=0, rtol=0)
        print("ok")
    """,
    )


def test_report_card_and_inspect(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense")
    result = run(
        "convert",
        dense,
        tmp_path / "out",
        "--method",
        "mhe",
        "--variant",
        "add",
        "--init",
        "calibrated",
        "--calibration",
        calibration_file,
        "--calibration-tokens",
        "512",
    )
    assert result.exit_code == 0, result.output
    assert "attention parameters: 20,480 -> 11,456 (44.06% fewer)" in result.stdout
    report = json.loads((tmp_path / "out" / "upcycle_report.json").read_text())
    assert (
        report["method"] == "mhe"
        and report["options"]["variant"] == "add"
        and report["options"]["init"] == "calibrated"
    )
    assert len(report["reconstruction_error"]["layers"]) == 2 and all(c["passed"] for c in report["checks"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "upcycle_llama"
    assert config["upcycle"]["layers"][0] == {
        "mhe": {"variant": "add", "heads": {"q_proj": 8, "k_proj": 2, "v_proj": 2}}
    }
    card = (tmp_path / "out" / "README.md").read_text()
    assert "MHE-ADD" in card and "44.06% fewer" in card
    assert (
        "\n# out\n" in card and 'from_pretrained("out", trust_remote_code=True)' in card and "upcycle-tmp" not in card
    )
    assert card.count('- "mhe"') == 1  # tags once each
    shown = run("inspect", tmp_path / "out").stdout
    assert "MHE-add, one shared projection each: Q over 8 heads, K over 2 heads, V over 2 heads" in shown


@pytest.mark.parametrize(
    "args,needles",
    [
        (
            ["--variant", "sub"],
            ["Invalid value for '--variant'", "'sub' is not one of 'mul', 'add'", "see `upcycle convert --help`"],
        ),
        (["--init", "calibrated"], ["--init calibrated", "--calibration FILE"]),
        (["--init", "sequential"], ["--init sequential", "--calibration FILE"]),
        (["--init", "calibrated", "--calibration", "missing.txt"], ["--calibration missing.txt does not exist"]),
        (["--init", "lsq"], ["Invalid value for '--init'"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needles, capsys):
    from upcycle.cli import main

    dense = build_dense(tmp_path / "dense")
    capsys.readouterr()
    code = main(["convert", str(dense), str(tmp_path / "out"), "--method", "mhe", *args])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert leftovers(tmp_path) == []


def test_mhe_flags_with_another_method(tmp_path):
    assert_one_line_error(
        run("convert", build_dense(tmp_path / "dense"), tmp_path / "out", "--variant", "add"),
        "--variant applies to --method mhe",
    )
    assert leftovers(tmp_path) == []


def test_library_validates_options(tmp_path):
    dense = build_dense(tmp_path / "dense")
    with pytest.raises(UpcycleError, match="--variant 'sub' is unknown"):
        mhe(dense, tmp_path / "out", variant="sub")
    with pytest.raises(UpcycleError, match="--init 'lsq' is unknown"):
        mhe(dense, tmp_path / "out", init="lsq")
    assert not (tmp_path / "out").exists()


def test_finetune_recipe_converts_and_tunes(tmp_path, calibration_file):
    """A recipe with an MHE convert section converts, trains (LoRA elsewhere, MHE projections fully) and loads."""
    from upcycle.train.finetune import run_finetune
    from upcycle.train.recipe import load_recipe

    dense = build_dense(tmp_path / "dense")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {dense}
output: {tmp_path / "run"}
convert: {{method: mhe, variant: mul, init: calibrated, calibration: {calibration_file}, calibration_tokens: 512}}
data: {{train: {calibration_file}, seq_len: 32, validation_tokens: 64}}
trainable: lora
lora: {{r: 4, target_modules: [q_proj, k_proj, v_proj, o_proj]}}
training: {{steps: 2, global_batch_tokens: 64, micro_batch_size: 2, warmup_steps: 0, lr: 1.0e-3}}
""")
    final = run_finetune(load_recipe(str(recipe)))
    converted = load_file(tmp_path / "run" / "converted" / "model.safetensors")
    tuned = load_file(final / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.head_embedding"
    assert tuned[name].shape == converted[name].shape == (8, 8)
    assert not torch.equal(tuned[name], converted[name])  # MHE projections train fully under LoRA
    assert not torch.equal(
        tuned["model.layers.0.self_attn.o_proj.weight"], converted["model.layers.0.self_attn.o_proj.weight"]
    )  # LoRA merged
    assert torch.equal(
        tuned["model.layers.0.mlp.up_proj.weight"], converted["model.layers.0.mlp.up_proj.weight"]
    )  # not a target
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert sum(isinstance(m, MHEProjection) for m in model.modules()) == 6


def test_recipe_convert_method_errors(tmp_path, calibration_file):
    from upcycle.train.recipe import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tmp_path}\noutput: {tmp_path / 'run'}\nconvert: {{method: mhe, variant: sub}}\n"
        f"data: {{train: {calibration_file}}}\ntraining: {{steps: 1, global_batch_tokens: 64}}\n"
    )
    with pytest.raises(UpcycleError, match="recipe key 'convert.variant'"):
        load_recipe(str(recipe))
    recipe.write_text(recipe.read_text().replace("method: mhe", "method: bam"))
    with pytest.raises(UpcycleError, match=r"'convert.method' must be one of .*mhe \(got 'bam'\)"):
        load_recipe(str(recipe))
