"""Triton head-sparse forward kernel (under TRITON_INTERPRET=1 on the CPU) against the masked reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 on machines without a GPU

from test_sparse_attention import make_case, masked_reference  # noqa: E402

from upcycle.modeling.sparse_kernel import head_sparse_attention_kernel  # noqa: E402

CASES = [
    dict(length=21, cache=0, kv_heads=4, active=0.5, causal=True, padding=False),
    dict(length=37, cache=5, kv_heads=2, active=0.7, causal=True, padding=True),  # GQA, cached keys, padding, ragged blocks
    dict(length=1, cache=19, kv_heads=4, active=1.0, causal=True, padding=False),  # decode step
    dict(length=26, cache=0, kv_heads=2, active=0.4, causal=False, padding=True),  # bidirectional
    dict(length=9, cache=0, kv_heads=1, active=0.0, causal=True, padding=False),  # nothing routed
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_forward_matches_the_masked_reference(case, dtype):
    query, key, value, gates, keep, shared, routed = make_case(2, 8, case["kv_heads"], case["length"], case["cache"], 16,
                                                               case["active"], 3, dtype, case["padding"])
    key_padding = None if keep is None else keep[:, 0, 0, :]  # [B, S]: these cases pad keys only
    got = head_sparse_attention_kernel(query, key, value, gates, key_padding, shared, routed, causal=case["causal"])
    expected = masked_reference(query, key, value, gates, keep, case["causal"])
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    assert got.shape == expected.shape == (2, case["length"], 8, 16)
    torch.testing.assert_close(got.float(), expected.float(), **tolerance)
