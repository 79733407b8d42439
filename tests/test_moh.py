"""MoH conversion: null setting, active fraction, cache, bundled runtime, head selection, calibration fits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_dense
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import upcycle  # noqa: F401  (registers the Auto classes)
from upcycle.convert import convert_checkpoint
from upcycle.errors import UpcycleError
from upcycle.methods.moh import MoHOptions, head_counts
from upcycle.modeling.routers import FittedRouter, LearnedRouter, QueryNormRouter


def convert(src: Path, out: Path, **options) -> dict:
    return convert_checkpoint(str(src), out, "moh", MoHOptions(**options))


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def routers(model) -> list:
    return [m for m in model.modules() if isinstance(m, (QueryNormRouter, LearnedRouter, FittedRouter))]


IDS = torch.randint(3, 128, (2, 17), generator=torch.Generator().manual_seed(0))
FIT = {"calibration_tokens": 2048, "calibration_seq_len": 64}  # small calibration fits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("router", ["query-norm", "learned"])
def test_all_heads_active_equals_dense(tmp_path, family, router):
    dense = build_dense(tmp_path / "dense", family)
    convert(dense, tmp_path / "moh", router=router, active_heads=1.0)
    moh = load(tmp_path / "moh")
    assert type(moh).__name__.startswith("Upcycle") and len(routers(moh)) == 2
    with torch.no_grad():
        torch.testing.assert_close(moh(IDS).logits, load(dense)(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("router", ["query-norm", "learned"])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_active_fraction_is_exact_and_shared_heads_always_on(tmp_path, router, kv_heads):
    dense = build_dense(tmp_path / "dense", num_key_value_heads=kv_heads)
    report = convert(dense, tmp_path / "moh", router=router, active_heads=0.75, shared_heads="0.5")
    assert report["heads"] | {} == {"total": 8, "shared": 4, "routed": 4, "top_k": 2, "active_fraction": 0.75}
    moh = load(tmp_path / "moh")
    gates = []
    for r in routers(moh):
        r.register_forward_hook(lambda module, args, out: gates.append((module, out.detach())))
    with torch.no_grad():
        dense_logits = load(dense)(IDS).logits
        logits = moh(IDS).logits
    assert not torch.allclose(logits, dense_logits)  # 2 of 8 heads dropped per token
    for module, gate in gates:
        assert gate.shape == (2, 17, 8)
        assert (gate != 0).float().mean().item() == 0.75
        assert (gate[..., module.shared_heads] != 0).all()
        assert ((gate[..., module.routed_heads] != 0).sum(-1) == 2).all()
        if router == "query-norm":
            assert set(gate.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_greedy_generation_equals_uncached(tmp_path, family):
    convert(build_dense(tmp_path / "dense", family), tmp_path / "moh", active_heads=0.75)
    moh = load(tmp_path / "moh")
    prompt = IDS[:1, :5]
    cached = moh.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = moh.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 17)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("router", ["learned", "fitted"])
def test_bundled_runtime_loads_without_upcycle(tmp_path, calibration_file, router):
    dense = build_dense(tmp_path / "dense")
    fit = {"calibration": calibration_file, **FIT} if router == "fitted" else {}
    convert(dense, tmp_path / "moh", router=router, active_heads=0.75, **fit)
    with torch.no_grad():
        expected = load(tmp_path / "moh")(IDS).logits
    torch.save({"ids": IDS, "logits": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class NoUpcycle(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "upcycle":
                    raise ImportError("upcycle is made unimportable for this test")
        sys.meta_path.insert(0, NoUpcycle())
        import torch
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "moh")!r})
            sys.exit("loaded without trust_remote_code")
        except Exception:
            pass
        model = AutoModelForCausalLM.from_pretrained(
            {str(tmp_path / "moh")!r}, trust_remote_code=True, dtype=torch.float32
        ).eval()
        module = type(model).__module__
        assert "upcycle" not in sys.modules and module.startswith("transformers_modules"), module
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(data["ids"]).logits, data["logits"], atol=0, rtol=0)
        print("bundled runtime ok")
    """)
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bundled runtime ok" in result.stdout


def test_output_files_config_report_and_card(tmp_path, dense):
    convert(dense, tmp_path / "moh", router="learned")
    out = tmp_path / "moh"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "upcycle_llama" and config["upcycle"]["method"] == "moh"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_upcycle.UpcycleLlamaForCausalLM"
    for file in [
        "modeling_upcycle.py",
        "configuration_upcycle.py",
        "routers.py",
        "gated_attention.py",
        "surgery.py",
        "tokenizer.json",
        "generation_config.json",
        "README.md",
        "upcycle_report.json",
    ]:
        assert (out / file).exists(), file
    before, after = load_file(dense / "model.safetensors"), load_file(out / "model.safetensors")
    for name, tensor in before.items():  # untouched tensors pass through with the same names and bytes
        assert torch.equal(after[name], tensor)
    new = sorted(set(after) - set(before))
    assert new == sorted(
        f"model.layers.{i}.self_attn.head_router.{p}.weight"
        for i in range(2)
        for p in ["mix_proj", "routed_proj", "shared_proj"]
    )
    assert all((after[name] == 0).all() for name in new)
    report = json.loads((out / "upcycle_report.json").read_text())
    assert report["parameters"]["after"] - report["parameters"]["before"] == 2 * (4 + 4 + 2) * 64
    assert report["checks"] and all(check["passed"] for check in report["checks"])
    card = (out / "README.md").read_text()
    assert (
        card.startswith("---\n")
        and 'library_name: "transformers"' in card
        and '- "upcycle"' in card
        and "base_model:" in card
    )


def test_sharded_output_and_bin_input(tmp_path, dense):
    weights = load_file(dense / "model.safetensors")
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    for file in dense.iterdir():
        if file.suffix != ".safetensors":
            (bin_folder / file.name).write_bytes(file.read_bytes())
    torch.save(weights, bin_folder / "pytorch_model.bin")
    convert_checkpoint(str(bin_folder), tmp_path / "moh", "moh", MoHOptions(active_heads=1.0), shard_size="100KB")
    shards = sorted((tmp_path / "moh").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "moh" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "moh")(IDS).logits, load(dense)(IDS).logits, atol=1e-5, rtol=0)


def test_head_counts_rounding_and_limits():
    assert head_counts(8, "0.5", 0.75) == (4, 2)
    assert head_counts(9, "0.5", 0.75) == (5, 2)  # 4.5 -> 5 shared, 6.75 -> 7 active
    assert head_counts(9, "4", 0.75) == (4, 3)
    assert head_counts(32, "16", 0.75) == (16, 8)  # MoH-LLaMA3-8B
    assert head_counts(8, "8", 1.0) == (8, 0)


def _scale_head(folder: Path, layer: int, head: int, factor: float) -> None:
    weights = load_file(folder / "model.safetensors")
    name = f"model.layers.{layer}.self_attn.o_proj.weight"
    weights[name][:, head * 8 : (head + 1) * 8] *= factor
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("selection", ["weight-norm", "contribution"])
def test_shared_selection_prefers_the_strong_heads(tmp_path, dense, calibration_file, selection):
    for layer, heads in [(0, [5, 6, 7]), (1, [1, 6, 7])]:
        for head in heads:
            _scale_head(dense, layer, head, 50.0)
    options = {"shared_selection": selection, "shared_heads": "3"}
    if selection == "contribution":
        options["calibration"] = calibration_file
    report = convert(dense, tmp_path / "moh", **options)
    layers = report["plan"]["layers"]
    assert layers[0]["head_gate"]["shared_heads"] == [5, 6, 7]
    assert layers[1]["head_gate"]["shared_heads"] == [1, 6, 7]
    assert report["options"]["shared_selection"] == selection


def test_first_selection_and_default_with_calibration(tmp_path, dense, calibration_file):
    report = convert(dense, tmp_path / "first", shared_selection="first")
    assert all(layer["head_gate"]["shared_heads"] == [0, 1, 2, 3] for layer in report["plan"]["layers"])
    report = convert(dense, tmp_path / "default", calibration=calibration_file)
    assert report["options"]["shared_selection"] == "contribution"


@pytest.mark.parametrize("router", ["query-norm", "learned"])
def test_load_balance_loss_and_straight_through_gradients(tmp_path, dense, router):
    convert(dense, tmp_path / "moh", router=router, active_heads=0.75)
    moh = load(tmp_path / "moh").train()
    out = moh(IDS, labels=IDS)
    aux = moh.router_aux_losses()
    assert len(aux) == 2 and all(loss.ndim == 0 and loss.item() > 0 for loss in aux)
    aux[0].backward()  # layer 0's balance term: depends on layer 0's routed queries only
    attention = moh.model.layers[0].self_attn
    if router == "query-norm":  # the balance loss reaches W_q of the routed heads only
        q_grad = attention.q_proj.weight.grad.view(8, 8, 64).abs().sum(dim=(1, 2))
        routed, shared = attention.head_router.routed_heads, attention.head_router.shared_heads
        assert (q_grad[routed] > 0).all() and (q_grad[shared] == 0).all()
    else:
        assert attention.head_router.routed_proj.weight.grad.abs().sum() > 0
    moh.zero_grad()
    out = moh(IDS, labels=IDS)
    out.loss.backward()  # the task loss reaches the router too (STE for query-norm)
    if router == "query-norm":
        assert attention.q_proj.weight.grad.abs().sum() > 0
    else:
        assert attention.head_router.routed_proj.weight.grad.abs().sum() > 0


def test_fitted_router_picks_the_oracle_heads_more_often_and_round_trips(tmp_path, dense, calibration_file):
    report = convert(dense, tmp_path / "moh", router="fitted", calibration=calibration_file, **FIT)
    fit = report["calibration_fit"]
    assert len(fit["layers"]) == 2
    for layer in fit["layers"]:
        assert layer["oracle_match"]["fitted"] > layer["oracle_match"]["query-norm"]
        assert layer["attention_error"]["fitted"] < layer["attention_error"]["query-norm"]
    weights = load_file(tmp_path / "moh" / "model.safetensors")
    new = sorted(name for name in weights if ".head_router." in name)
    assert new == sorted(
        f"model.layers.{i}.self_attn.head_router.score_proj.{p}" for i in range(2) for p in ["bias", "weight"]
    )
    assert all(weights[name].abs().sum() > 0 for name in new)
    moh = load(tmp_path / "moh")
    gates = []
    moh.model.layers[0].self_attn.head_router.register_forward_hook(lambda module, args, out: gates.append(out))
    with torch.no_grad():
        logits = moh(IDS).logits
    assert set(gates[0].unique().tolist()) == {0.0, 1.0} and ((gates[0] != 0).sum(-1) == 6).all()
    moh.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "again")(IDS).logits, logits, atol=0, rtol=0)


@pytest.mark.parametrize("rescale", ["layer", "channel"])
def test_rescale_lowers_the_attention_error_and_rewrites_only_o_proj(tmp_path, dense, calibration_file, rescale):
    report = convert(dense, tmp_path / "moh", rescale=rescale, calibration=calibration_file, **FIT)
    for layer in report["calibration_fit"]["layers"]:
        assert layer["attention_error"]["rescaled"] < layer["attention_error"]["query-norm"]
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "moh" / "model.safetensors")
    assert set(after) == set(before)
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed == [f"model.layers.{i}.self_attn.o_proj.weight" for i in range(2)]


def test_fits_with_every_head_active_equal_dense(tmp_path, dense, calibration_file):
    report = convert(
        dense,
        tmp_path / "moh",
        router="fitted",
        rescale="channel",
        active_heads=1.0,
        calibration=calibration_file,
        **FIT,
    )
    assert "calibration_fit" not in report  # no routed head is ever off: nothing to fit
    before, after = load_file(dense / "model.safetensors"), load_file(tmp_path / "moh" / "model.safetensors")
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "moh")(IDS).logits, load(dense)(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", [{"router": "fitted"}, {"rescale": "layer"}])
def test_fits_need_calibration_and_dry_run_skips_them(tmp_path, dense, calibration_file, options):
    with pytest.raises(UpcycleError, match="calibration") as error:
        convert(dense, tmp_path / "moh", **options)
    assert "\n" not in str(error.value)
    assert (
        convert_checkpoint(
            str(dense), tmp_path / "moh", "moh", MoHOptions(calibration=calibration_file, **options), dry_run=True
        )
        is None
    )
    assert not (tmp_path / "moh").exists()


@pytest.mark.parametrize("router", ["query-norm", "learned"])
def test_weight_norm_scores_computed_beside_the_copies_give_the_plan_of_scoring_first(tmp_path, router):
    from upcycle.checkpoint.reader import CheckpointReader
    from upcycle.methods import moh

    dense = build_dense(tmp_path / "dense", seed=5)
    report = convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(active_heads=0.75, router=router))
    reader = CheckpointReader(dense)
    spec = moh.decoder_spec(reader.config, str(dense))
    scores = moh.weight_norm_scores(reader, spec)
    options = MoHOptions(active_heads=0.75, router=router)
    shared, top_k = moh.head_counts(spec.num_heads, options.shared_heads, options.active_heads)
    expected = moh.layer_plans(spec, router, shared, top_k, scores)
    config = json.loads((tmp_path / "moh" / "config.json").read_text())
    assert [layer["head_gate"] for layer in config["upcycle"]["layers"]] == [gate.to_json() for gate in expected]
    assert report["head_scores"] == scores and report["plan"]["layers"] == config["upcycle"]["layers"]
    assert any(line.startswith("layer") for line in report["plan_lines"])


def test_an_error_while_scoring_beside_the_copies_leaves_nothing(tmp_path, monkeypatch):
    from upcycle.methods import moh

    def broken(reader, spec):
        raise UpcycleError("model.layers.1.self_attn.o_proj.weight could not be read; re-download the checkpoint")

    monkeypatch.setattr(moh, "weight_norm_scores", broken)
    dense = build_dense(tmp_path / "dense")
    with pytest.raises(UpcycleError, match="could not be read"):
        convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(active_heads=0.75))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
