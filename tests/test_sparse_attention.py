"""Head-sparse attention (torch path): equal to the masked reference in outputs and gradients; model-level dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_dense
from transformers import AutoModelForCausalLM

import upcycle  # noqa: F401  (registers the Auto classes)
from upcycle.convert import convert_checkpoint
from upcycle.methods.moh import MoHOptions
from upcycle.modeling.gated_attention import set_attention_backend
from upcycle.modeling.sparse_attention import head_sparse_attention


def masked_reference(query, key, value, gates, keep, causal, scaling=None):
    """Every head computed, then multiplied by its gate: [B, T, h, d]."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    length, keys = query.shape[2], key.shape[2]
    mask = keep
    if causal:
        causal_mask = torch.arange(keys)[None, :] <= (torch.arange(length) + keys - length)[:, None]  # [T, S]
        mask = causal_mask[None, None] if mask is None else mask & causal_mask
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2) * gates[..., None].to(out.dtype)


def make_case(batch, heads, kv_heads, length, cache, dim, active, shared, dtype, padding, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = length + cache
    query = torch.randn(batch, heads, length, dim, generator=generator).to(dtype)
    key = torch.randn(batch, kv_heads, keys, dim, generator=generator).to(dtype)
    value = torch.randn(batch, kv_heads, keys, dim, generator=generator).to(dtype)
    routed = list(range(shared, heads))
    gates = torch.zeros(batch, length, heads)
    gates[:, :, :shared] = 1.0
    chosen = torch.rand(batch, length, len(routed), generator=generator) < active
    gates[:, :, shared:] = chosen * (
        0.5 + torch.rand(batch, length, len(routed), generator=generator)
    )  # soft non-zero gates
    keep = None
    if padding:
        keep = torch.ones(batch, 1, length, keys, dtype=torch.bool)
        keep[-1, :, :, 1:3] = False  # padding keys inside the last sequence (never a row's only key)
    return query, key, value, gates.to(dtype), keep, list(range(shared)), routed


CASES = [
    dict(length=9, cache=0, kv_heads=4, active=0.5, causal=True, padding=False),
    dict(length=300, cache=0, kv_heads=2, active=0.75, causal=True, padding=True),  # longer than a chunk, GQA
    dict(length=37, cache=11, kv_heads=2, active=0.3, causal=True, padding=True),  # queries after cached keys
    dict(length=1, cache=20, kv_heads=4, active=1.0, causal=True, padding=False),  # decode step
    dict(
        length=1, cache=30, kv_heads=2, active=0.5, causal=True, padding=True, shared=2
    ),  # decode step, padding, part of a group shared
    dict(
        length=6, cache=9, kv_heads=4, active=0.5, causal=True, padding=False
    ),  # several new tokens after a cache, no mask
    dict(length=33, cache=0, kv_heads=4, active=0.6, causal=False, padding=True),  # bidirectional
    dict(length=17, cache=0, kv_heads=1, active=0.0, causal=True, padding=False),  # no routed head selected
    dict(
        length=40, cache=3, kv_heads=2, active=0.5, causal=True, padding=True, shared=4
    ),  # shared heads = a whole KV group
    dict(length=40, cache=0, kv_heads=2, active=0.5, causal=True, padding=False, shared=4),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_the_masked_reference_in_outputs_and_gradients(case, dtype):
    query, key, value, gates, keep, shared, routed = make_case(
        2,
        8,
        case["kv_heads"],
        case["length"],
        case["cache"],
        16,
        case["active"],
        case.get("shared", 3),
        dtype,
        case["padding"],
    )
    inputs = [t.clone().requires_grad_(True) for t in (query, key, value, gates)]
    reference = [t.clone().requires_grad_(True) for t in (query, key, value, gates)]
    got = head_sparse_attention(*inputs[:3], inputs[3], keep, shared, routed, causal=case["causal"], chunk=16)
    expected = masked_reference(*reference[:3], reference[3], keep, case["causal"])
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got, expected, **tolerance)
    assert got.shape == (2, case["length"], 8, 16)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    tolerance = (
        tolerance if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    )  # fp16 gradients: different summation order
    (got.float() * upstream.float()).sum().backward()
    (expected.float() * upstream.float()).sum().backward()
    for name, mine, theirs in zip(("query", "key", "value"), inputs, reference):
        torch.testing.assert_close(mine.grad, theirs.grad, **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    selected = (
        gates != 0
    )  # a skipped pair has no output, so its zero gate gets no gradient (the masked path gives it one)
    torch.testing.assert_close(inputs[3].grad[selected], reference[3].grad[selected], **tolerance)
    assert not inputs[3].grad[~selected].any()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_model_paths_agree_and_cached_generation_matches(tmp_path, family):
    convert_checkpoint(
        str(build_dense(tmp_path / "dense", family)),
        tmp_path / "moh",
        "moh",
        MoHOptions(active_heads=0.75, router="learned"),
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moh", dtype=torch.float32).eval()
    with torch.no_grad():
        for router in [m for m in model.modules() if hasattr(m, "routed_heads")]:
            for param in router.parameters():
                param.normal_(0, 0.5)  # routers that really choose
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    assert set_attention_backend(model, "masked") == 2
    with torch.no_grad():
        masked = model(ids).logits
    set_attention_backend(model, "torch")
    with torch.no_grad():
        sparse = model(ids).logits
    torch.testing.assert_close(sparse, masked, atol=1e-5, rtol=1e-4)
    prompt = ids[:1, :6]
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="unknown"):
        set_attention_backend(model, "flash")


def test_eval_paths_give_the_same_perplexity(tmp_path):
    from upcycle.eval.evaluate import evaluate

    convert_checkpoint(str(build_dense(tmp_path / "dense")), tmp_path / "moh", "moh", MoHOptions(active_heads=0.75))
    ids = torch.randint(3, 128, (200,), generator=torch.Generator().manual_seed(0))
    masked = evaluate(tmp_path / "moh", ids, window=64, attention="masked")
    sparse = evaluate(tmp_path / "moh", ids, window=64, attention="torch")
    assert masked["tokens"] == sparse["tokens"] == 199
    assert sparse["perplexity"] == pytest.approx(masked["perplexity"], rel=1e-5)
    assert sparse["active_fraction"] == pytest.approx(masked["active_fraction"]) and masked["active_fraction"] < 1


def test_remote_code_does_not_require_triton(tmp_path):
    """transformers refuses trust_remote_code files whose imports are missing: the kernel must not make triton one."""
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files

    convert_checkpoint(str(build_dense(tmp_path / "dense")), tmp_path / "moh", "moh", MoHOptions(active_heads=0.75))
    files = [
        tmp_path / "moh" / "modeling_upcycle.py",
        *map(Path, get_relative_import_files(tmp_path / "moh" / "modeling_upcycle.py")),
    ]
    assert tmp_path / "moh" / "sparse_kernel_triton.py" in files  # the kernel travels with the checkpoint
    required = {module for file in files for module in get_imports(file)}
    assert "triton" not in required and required <= {
        "__future__",
        "copy",
        "dataclasses",
        "logging",
        "os",
        "time",
        "torch",
        "transformers",
    }, required
