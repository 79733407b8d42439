"""BAM / BTX: null setting, soft attention mixture = sum of experts, MoE FFN, cache, formulas, Mixtral output,
errors, tuning."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import build_dense
from test_cli import assert_one_line_error, leftovers, run
from test_prune_heads import run_without_upcycle
from transformers import AutoModelForCausalLM, MixtralForCausalLM

import upcycle  # noqa: F401  (registers the Auto classes)
from upcycle.convert import convert_checkpoint
from upcycle.methods.bam import BAMOptions
from upcycle.modeling.experts import MoEFeedForward, SoftExpertRouter, make_parallel_block

IDS = torch.randint(3, 128, (2, 17), generator=torch.Generator().manual_seed(0))


def mix(seed_model: Path, out: Path, experts: list[Path], **options) -> dict:
    return convert_checkpoint(str(seed_model), out, "bam", BAMOptions(experts=[str(e) for e in experts], **options))


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


CASES = [
    ("llama", "expert-kv"),
    ("llama", "shared-kv"),
    ("llama", "average"),
    ("qwen3", "expert-kv"),
    ("qwen3", "shared-kv"),
    ("qwen3", "average"),
    ("qwen2", "expert-kv"),
    ("mistral", "shared-kv"),
]


@pytest.mark.parametrize("family,attention", CASES)
def test_identical_experts_with_zero_routers_equal_the_dense_model(tmp_path, family, attention):
    dense = build_dense(tmp_path / "dense", family)
    report = mix(dense, tmp_path / "mix", [dense, dense], attention=attention, router_init="zero")
    model = load(tmp_path / "mix")
    native = attention == "average" and family in ("llama", "mistral")
    assert isinstance(model, MixtralForCausalLM) == native
    assert report["output_format"] == "mixtral" if native else report["output_format"].startswith("upcycle")
    assert sum(isinstance(m, MoEFeedForward) for m in model.modules()) == (0 if native else 2)
    torch.testing.assert_close(logits(model), logits(load(dense)), atol=1e-5, rtol=1e-5)


def test_parallel_block_with_identical_experts_equals_the_dense_parallel_block(tmp_path):
    dense = build_dense(tmp_path / "dense")
    mix(dense, tmp_path / "mix", [dense], router_init="zero", parallel_block=True)
    reference = load(dense)
    for layer in reference.model.layers:
        make_parallel_block(layer)
    mixed = load(tmp_path / "mix")
    assert not torch.allclose(logits(reference), logits(load(dense)))  # the parallel block is another function
    torch.testing.assert_close(logits(mixed), logits(reference), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv"])
def test_soft_attention_mixture_is_the_weighted_sum_of_the_experts(tmp_path, attention):
    experts = [build_dense(tmp_path / f"e{i}", seed=i) for i in range(3)]
    mix(experts[0], tmp_path / "mix", experts[1:], attention=attention, router_init="random", seed=3)
    mixed, dense = load(tmp_path / "mix"), [load(e) for e in experts]
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))  # [B, T, D]
    positions = torch.arange(9).unsqueeze(0).expand(2, -1)
    embeddings = mixed.model.rotary_emb(hidden, positions)
    attentions = [copy.deepcopy(d.model.layers[1].self_attn) for d in dense]
    if attention == "shared-kv":
        for proj in ("k_proj", "v_proj"):
            mean = torch.stack([getattr(a, proj).weight for a in attentions]).mean(0)
            for a in attentions:
                getattr(a, proj).weight.data.copy_(mean)
    router = mixed.model.layers[1].self_attn.head_router
    assert isinstance(router, SoftExpertRouter) and router.weight.abs().sum() > 0
    gates = torch.softmax(hidden @ router.weight.T, dim=-1)  # [B, T, N]
    with torch.no_grad():
        got, _ = mixed.model.layers[1].self_attn(
            hidden_states=hidden, position_embeddings=embeddings, attention_mask=None
        )
        expected = sum(
            gates[..., j, None] * a(hidden_states=hidden, position_embeddings=embeddings, attention_mask=None)[0]
            for j, a in enumerate(attentions)
        )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_ffn_routes_each_token_to_its_top_experts(tmp_path, top_k):
    experts = [build_dense(tmp_path / f"e{i}", seed=i) for i in range(3)]
    mix(experts[0], tmp_path / "mix", experts[1:], attention="average", ffn_top_k=top_k, router_init="random", seed=5)
    mixed_config = json.loads((tmp_path / "mix" / "config.json").read_text())
    assert mixed_config["model_type"] == "mixtral" and mixed_config["num_experts_per_tok"] == top_k
    # the same mix in the upcycle format (qwen3 is not Mixtral): compare its MoE FFN with a manual top-k
    experts = [build_dense(tmp_path / f"q{i}", "qwen3", seed=i) for i in range(3)]
    mix(experts[0], tmp_path / "qmix", experts[1:], attention="average", ffn_top_k=top_k, router_init="random", seed=5)
    moe = load(tmp_path / "qmix").model.layers[0].mlp
    mlps = [load(e).model.layers[0].mlp for e in experts]
    x = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(x @ moe.router.weight.T, dim=-1)[0]  # [T, N]
    with torch.no_grad():
        got = moe(x)[0]
        expected = []
        for t in range(7):
            top = probs[t].topk(top_k)
            weights = torch.ones(1) if top_k == 1 else top.values / top.values.sum()
            expected.append(sum(w * mlps[j](x[0, t]) for w, j in zip(weights, top.indices.tolist())))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv", "average"])
def test_cached_greedy_generation_equals_uncached(tmp_path, attention):
    experts = [build_dense(tmp_path / f"e{i}", seed=i) for i in range(2)]
    mix(experts[0], tmp_path / "mix", experts[1:], attention=attention)
    model = load(tmp_path / "mix")
    prompt = IDS[:1, :5]
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 17) and torch.equal(cached, uncached)


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv", "average"])
def test_attention_parameters_and_kv_cache_match_the_formulas(tmp_path, attention):
    dense = build_dense(tmp_path / "dense")  # D 64, h 8, g 2, d 8, fp32
    report = mix(dense, tmp_path / "mix", [dense, dense], attention=attention)
    n, h, g, d, hidden = 3, 8, 2, 8, 64
    expected = {
        "expert-kv": n * (2 * h * d * hidden + 2 * g * d * hidden) + n * hidden,
        "shared-kv": n * 2 * h * d * hidden + 2 * g * d * hidden + n * hidden,
        "average": 2 * h * d * hidden + 2 * g * d * hidden,
    }[attention]
    assert report["attention_parameters_per_layer"] == {
        "before": 2 * h * d * hidden + 2 * g * d * hidden,
        "after": expected,
    }
    kv_heads = n * g if attention == "expert-kv" else g
    assert report["kv_cache_bytes_per_token_per_layer"] == {"before": 2 * g * d * 4, "after": 2 * kv_heads * d * 4}
    if attention != "average":
        assert (
            f"attention 3 soft experts ({'shared' if attention == 'shared-kv' else 'expert'} KV)"
            in run("inspect", tmp_path / "mix").stdout
        )
    model = load(tmp_path / "mix")
    cache = model(IDS[:1, :5], use_cache=True).past_key_values
    keys = cache.layers[0].keys  # [B, KV heads, T, d]
    assert keys.shape == (1, kv_heads, 5, d)
    attention_params = sum(
        p.numel() for name, p in model.named_parameters() if name.startswith("model.layers.0.self_attn.")
    )
    assert attention_params == expected


def test_btx_is_a_plain_mixtral_checkpoint(tmp_path):
    experts = [build_dense(tmp_path / f"e{i}", "mistral", seed=i) for i in range(2)]
    report = mix(experts[0], tmp_path / "btx", experts[1:], attention="average")
    config = json.loads((tmp_path / "btx" / "config.json").read_text())
    assert (
        config["model_type"] == "mixtral" and config["num_local_experts"] == 2 and config["num_experts_per_tok"] == 2
    )
    assert "auto_map" not in config and "upcycle" not in config and not list((tmp_path / "btx").glob("*.py"))
    card = (tmp_path / "btx" / "README.md").read_text()
    assert "trust_remote_code" not in card and 'AutoModelForCausalLM.from_pretrained("btx")' in card
    assert all(check["passed"] for check in report["checks"]), report["checks"]
    torch.save({"ids": IDS, "out": logits(load(tmp_path / "btx"))}, tmp_path / "expected.pt")
    run_without_upcycle(
        tmp_path,
        f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "btx")!r}, dtype=torch.float32).eval()
        assert type(model).__name__ == "MixtralForCausalLM"
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(data["ids"]).logits, data["out"], atol=0, rtol=0)
        print("ok")
    """,
    )


def test_bam_loads_through_the_bundled_runtime(tmp_path):
    experts = [build_dense(tmp_path / f"e{i}", seed=i) for i in range(2)]
    mix(experts[0], tmp_path / "bam", experts[1:], attention="shared-kv")
    assert (tmp_path / "bam" / "experts.py").exists()
    torch.save({"ids": IDS, "out": logits(load(tmp_path / "bam"))}, tmp_path / "expected.pt")
    run_without_upcycle(
        tmp_path,
        f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(
            {str(tmp_path / "bam")!r}, trust_remote_code=True, dtype=torch.float32
        ).eval()
        module = type(model).__module__
        assert "upcycle" not in sys.modules and module.startswith("transformers_modules"), module
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(model(data["ids"]).logits, data["out"], atol=0, rtol=0)
        print("ok")
    """,
    )


def test_mismatched_experts_are_listed_in_one_line(tmp_path):
    seed = build_dense(tmp_path / "seed")
    wide = build_dense(tmp_path / "wide", hidden_size=128)
    deep = build_dense(tmp_path / "deep", num_hidden_layers=3)
    result = run("convert", seed, tmp_path / "out", "--method", "bam", "--expert", wide, "--expert", deep)
    assert_one_line_error(
        result,
        "the experts do not match the seed",
        "expert 1",
        "hidden_size 128 (seed: 64)",
        "tensor(s) of another shape",
        "expert 2",
        "num_hidden_layers 3 (seed: 2)",
        "has 9 extra tensor(s)",
        "branched from the same seed",
    )
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args,needles",
    [
        ([], ["--method bam needs at least one --expert PATH"]),
        (["--expert", "SEED", "--attention", "mixed"], ["Invalid value for '--attention'"]),
        (["--expert", "SEED", "--ffn-top-k", "3"], ["--ffn-top-k 3 is outside [1, 2]"]),
        (["--expert", "missing-folder"], ["missing-folder does not exist"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needles, capsys):
    from upcycle.cli import main

    seed = build_dense(tmp_path / "seed")
    capsys.readouterr()
    args = [str(seed) if a == "SEED" else a for a in args]
    code = main(["convert", str(seed), str(tmp_path / "out"), "--method", "bam", *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert leftovers(tmp_path) == []


def test_bam_flags_with_another_method(tmp_path):
    dense = build_dense(tmp_path / "dense")
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--expert", dense),
        "--expert applies to --method bam or --method clip-moe",
    )


@pytest.mark.parametrize("attention", ["expert-kv", "average"])
def test_finetune_applies_and_logs_balance_z_loss_and_expert_usage(tmp_path, calibration_file, attention):
    from upcycle.train.finetune import run_finetune
    from upcycle.train.recipe import load_recipe

    experts = [build_dense(tmp_path / f"e{i}", seed=i) for i in range(2)]
    mix(experts[0], tmp_path / "mix", experts[1:], attention=attention)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {tmp_path / "mix"}
output: {tmp_path / "run"}
data: {{train: {calibration_file}, seq_len: 32, validation_tokens: 64}}
losses: {{load_balance: 0.01, z_loss: 0.001}}
training: {{steps: 2, global_batch_tokens: 64, micro_batch_size: 2, warmup_steps: 0, eval_every: 2}}
""")
    run_finetune(load_recipe(str(recipe)))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["aux_loss"] > 0.5 and r["z_loss"] > 0 for r in steps), steps  # N * sum f P is about 1 near balance
    usage = [r["expert_usage"] for r in records if "expert_usage" in r][-1]
    ffn = [row for name, row in usage.items() if "mlp" in name]
    assert len(ffn) == 2 and all(
        len(row) == 2 and abs(sum(row) - (2 if attention == "average" else 1)) < 1e-3 for row in ffn
    )
    soft = [row for name, row in usage.items() if "head_router" in name]
    assert len(soft) == (2 if attention == "expert-kv" else 0) and all(abs(sum(row) - 1) < 1e-3 for row in soft)
