"""MoH on the real SmolLM2-135M (GQA: 9 query heads, 3 KV heads), offline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import upcycle  # noqa: F401
from upcycle.assets import kjv_splits, smollm2_135m
from upcycle.convert import convert_checkpoint
from upcycle.data.text import pack_tokens
from upcycle.eval.perplexity import perplexity
from upcycle.methods.moh import MoHOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_135m()


@pytest.fixture(scope="module")
def heldout(smollm2):
    return pack_tokens(kjv_splits()[1], AutoTokenizer.from_pretrained(smollm2), seq_len=256, max_tokens=1024)


def test_smollm2_all_heads_equals_dense_and_075_is_worse(tmp_path, smollm2, heldout):
    dense = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    with torch.no_grad():
        dense_logits = dense(heldout[:1]).logits
    dense_ppl = perplexity(dense, heldout)
    del dense

    report = convert_checkpoint(str(smollm2), tmp_path / "moh-1.0", "moh", MoHOptions(active_heads=1.0))
    assert report["heads"]["total"] == 9 and report["parameters"]["after"] == report["parameters"]["before"]
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "moh-1.0", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(full(heldout[:1]).logits, dense_logits, atol=1e-4, rtol=1e-4)
    del full

    report = convert_checkpoint(str(smollm2), tmp_path / "moh-0.75", "moh", MoHOptions(active_heads=0.75))
    assert report["heads"] | {} == {"total": 9, "shared": 5, "routed": 4, "top_k": 2, "active_fraction": 7 / 9}
    moh = AutoModelForCausalLM.from_pretrained(tmp_path / "moh-0.75", dtype=torch.float32)
    moh_ppl = perplexity(moh, heldout)
    assert dense_ppl < moh_ppl < float("inf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "moh-0.75")
    prompt = tokenizer("In the beginning God created", return_tensors="pt")
    cached = moh.generate(**prompt, max_new_tokens=10, do_sample=False)
    uncached = moh.generate(**prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == prompt["input_ids"].shape[1] + 10
