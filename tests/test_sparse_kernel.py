"""Triton head-sparse kernel (under TRITON_INTERPRET=1 on the CPU, compiled on a GPU) against the masked reference:
outputs and gradients of q, k, v and the gates; tile packing; model-level dispatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 on machines without a GPU

from conftest import build_dense  # noqa: E402
from test_sparse_attention import make_case, masked_reference  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from upcycle.convert import convert_checkpoint  # noqa: E402
from upcycle.methods.moh import MoHOptions  # noqa: E402
from upcycle.modeling.gated_attention import key_padding_of, set_attention_backend  # noqa: E402
from upcycle.modeling.sparse_kernel import first_tiles, head_sparse_attention_kernel, pack_tiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    dict(length=21, cache=0, kv_heads=4, active=0.5, causal=True, padding=False),
    dict(
        length=37, cache=5, kv_heads=2, active=0.7, causal=True, padding=True
    ),  # GQA, cached keys, padding, ragged blocks
    dict(length=50, cache=0, kv_heads=2, active=0.25, causal=True, padding=False),  # several tiles per head
    dict(length=1, cache=19, kv_heads=4, active=1.0, causal=True, padding=False),  # decode step
    dict(length=26, cache=0, kv_heads=2, active=0.4, causal=False, padding=True),  # bidirectional
    dict(
        length=33, cache=0, kv_heads=1, active=0.9, causal=True, padding=True, shared=0
    ),  # all heads routed, one KV head
    dict(length=9, cache=0, kv_heads=1, active=0.0, causal=True, padding=False),  # nothing routed
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_the_masked_reference_in_outputs_and_gradients(case, dtype):
    tensors = make_case(
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
    query, key, value, gates, keep, shared, routed = tensors
    inputs = [t.to(DEVICE).clone().requires_grad_(True) for t in (query, key, value, gates)]
    reference = [t.to(DEVICE).float().clone().requires_grad_(True) for t in (query, key, value, gates)]
    keep = None if keep is None else keep.to(DEVICE)
    key_padding = None if keep is None else keep[:, 0, 0, :]  # [B, S]: these cases pad keys only
    got = head_sparse_attention_kernel(*inputs, key_padding, shared, routed, causal=case["causal"])
    expected = masked_reference(*reference, keep, case["causal"])
    assert got.shape == expected.shape == (2, case["length"], 8, 16) and got.dtype == dtype
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(got.float(), expected, **tolerance)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    (got.float() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    tolerance = (
        tolerance if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    )  # fp16 inputs against an fp32 reference
    for name, mine, theirs in zip(("query", "key", "value"), inputs, reference):
        torch.testing.assert_close(
            mine.grad.float(), theirs.grad, **tolerance, msg=lambda m, name=name: f"{name}: {m}"
        )
    selected = gates.to(DEVICE) != 0  # skipped pairs have no output, so their zero gates get no gradient
    torch.testing.assert_close(inputs[3].grad.float()[selected], reference[3].grad[selected], **tolerance)
    assert not inputs[3].grad[~selected].any()


def test_tiles_pack_each_selected_row_once_in_position_order_and_find_the_blocks_they_read():
    generator = torch.Generator().manual_seed(3)
    gates = (torch.rand(2, 45, 6, generator=generator) < 0.4).float()
    routed, block = [2, 3, 5], 8
    tiles = pack_tiles(gates, routed, causal=True, offset=4, keys=49, block=block)
    rows = tiles.rows.view(tiles.count, block).long()
    for item in range(2):
        for head in range(6):
            mine = [t for t in range(tiles.start[item, head], tiles.end[item, head])]
            assert all(tiles.batch[t] == item and tiles.head[t] == head for t in mine)
            packed = rows[mine].flatten()
            expected = (
                gates[item, :, head].nonzero().squeeze(-1) if head in routed else torch.empty(0, dtype=torch.long)
            )
            assert torch.equal(packed[packed >= 0], expected)  # every selected token once, in position order
            for t in mine:  # causal: a tile reads the keys up to its last position (offset 4)
                assert tiles.keys[t] == rows[t][rows[t] >= 0].max() + 4 + 1
    first = first_tiles(tiles, keys=49, block=block)  # [B, h, blocks]
    for item in range(2):
        for head in routed:
            for index, start in enumerate(range(0, 49, block)):
                readers = [t for t in range(tiles.start[item, head], tiles.end[item, head]) if tiles.keys[t] > start]
                assert readers == list(range(first[item, head, index], tiles.end[item, head]))
    assert pack_tiles(torch.zeros(2, 5, 6), routed, causal=True, offset=0, keys=5, block=block) is None


def test_key_padding_is_read_from_masks_that_only_pad_and_other_masks_are_refused():
    keep = torch.ones(2, 1, 5, 8, dtype=torch.bool)
    keep[1, ..., :2] = False  # left padding of the second sequence
    causal = keep & (torch.arange(8)[None, :] <= torch.arange(3, 8)[:, None])  # 5 queries after 3 cached keys
    padding, representable = key_padding_of(causal, True, 5, 8)
    assert representable and torch.equal(padding, keep[:, 0, 0])
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert key_padding_of(additive, True, 5, 8)[1]
    window = causal & (torch.arange(8)[None, :] > torch.arange(3, 8)[:, None] - 3)  # sliding window: not representable
    assert not key_padding_of(window, True, 5, 8)[1]
    assert key_padding_of(None, True, 5, 8) == (None, True)


def test_model_with_the_kernel_backend_matches_the_masked_model_with_padding_and_cache(tmp_path):
    dense = build_dense(tmp_path / "dense", hidden_size=128)  # head width 16: the kernel's smallest
    convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(active_heads=0.75, router="learned"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moh", dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        for router in [m for m in model.modules() if hasattr(m, "routed_heads")]:
            for param in router.parameters():
                param.normal_(0, 0.5)  # routers that really choose
    ids = torch.randint(3, 128, (2, 23), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    results = {}
    for backend in ("masked", "kernel"):
        assert set_attention_backend(model, backend) == 2
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        results[backend] = (
            out.logits.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if "q_proj" in n},
        )
    logits, grads = results["kernel"]
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], results["masked"][0][keep], atol=1e-4, rtol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, results["masked"][1][name], atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}"
        )
    prompt = ids[:1, :6]
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    set_attention_backend(model, "masked")
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_kernel_backend_needs_triton_on_a_gpu_or_the_interpreter(tmp_path, monkeypatch, capsys):
    convert_checkpoint(str(build_dense(tmp_path / "dense")), tmp_path / "moh", "moh", MoHOptions(active_heads=0.75))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moh", dtype=torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        set_attention_backend(model, "kernel")
    from upcycle.cli import main

    ids = tmp_path / "text.txt"
    ids.write_text(" ".join(f"w{i % 100}" for i in range(300)))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "moh"), "--data", str(ids), "--attention", "kernel"]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: attention backend kernel: the Triton kernel needs a CUDA device"
    )


@pytest.fixture
def kernel_model(tmp_path):
    """A tiny MoH model (head width 16) whose routers really choose, with fresh self-check verdicts."""
    from upcycle.modeling import gated_attention, sparse_kernel

    sparse_kernel._VERDICTS.clear()
    gated_attention._WARNED.clear()
    dense = build_dense(tmp_path / "dense", hidden_size=128)
    convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(active_heads=0.75, router="learned"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moh", dtype=torch.float32).to(DEVICE)
    with torch.no_grad():
        for router in [m for m in model.modules() if hasattr(m, "routed_heads")]:
            for param in router.parameters():
                param.normal_(0, 0.5)
    yield model
    sparse_kernel._VERDICTS.clear()
    gated_attention._WARNED.clear()


def logits_with(model, backend: str, ids: torch.Tensor) -> torch.Tensor:
    set_attention_backend(model, backend)
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()  # training: the check covers the backward too
    return out.logits.detach()


IDS = torch.randint(3, 128, (2, 19), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backward", [False, True])
def test_self_check_passes_for_the_kernel_as_it_is(dtype, backward):
    from upcycle.modeling.sparse_kernel import self_check

    for causal, padding in [(True, False), (True, True), (False, True)]:
        assert self_check(torch.device(DEVICE), dtype, 16, causal, padding, backward) is None


def test_auto_uses_the_kernel_once_its_self_check_passed(kernel_model, monkeypatch, caplog):
    from upcycle.modeling import gated_attention, sparse_kernel

    calls = []
    real = sparse_kernel.head_sparse_attention_kernel
    monkeypatch.setattr(
        sparse_kernel, "head_sparse_attention_kernel", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    monkeypatch.setattr(gated_attention, "auto_prefers_kernel", lambda query: True)  # as on a GPU
    with caplog.at_level("DEBUG", logger="upcycle.modeling.sparse_kernel"):
        auto = logits_with(kernel_model, "auto", IDS.to(DEVICE))
    assert len(sparse_kernel._VERDICTS) == 1 and list(sparse_kernel._VERDICTS.values()) == [None]
    assert any("self-check" in r.message and "passed in" in r.message for r in caplog.records)  # its cost, in debug
    assert len(calls) > 2  # the check's own calls, then every layer's
    torch.testing.assert_close(auto, logits_with(kernel_model, "masked", IDS.to(DEVICE)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("failure", ["compile error", "wrong output"])
def test_a_failing_kernel_makes_auto_fall_back_with_one_warning_and_kernel_refuse(
    kernel_model, monkeypatch, caplog, failure
):
    from upcycle.modeling import gated_attention, sparse_kernel

    real = sparse_kernel.RoutedAttention.apply

    def broken(*args):
        if failure == "compile error":
            raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4: unsupported")
        return real(*args) * 1.5

    monkeypatch.setattr(sparse_kernel.RoutedAttention, "apply", broken)
    monkeypatch.setattr(gated_attention, "auto_prefers_kernel", lambda query: True)
    expected = logits_with(kernel_model, "torch", IDS.to(DEVICE))  # the fallback: the head-sparse torch path
    with caplog.at_level("WARNING"):
        got = logits_with(kernel_model, "auto", IDS.to(DEVICE))
        logits_with(kernel_model, "auto", IDS.to(DEVICE))
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # once per kind of call, not per layer or step
    reason = "CompilationError" if failure == "compile error" else "output differs from the masked reference"
    assert "failed its self-check" in warnings[0] and reason in warnings[0] and "report it" in warnings[0]
    torch.testing.assert_close(got, expected)
    with pytest.raises(
        RuntimeError, match=f"attention backend kernel: the head-sparse Triton kernel failed.*{reason}"
    ):
        logits_with(kernel_model, "kernel", IDS.to(DEVICE))


def test_self_check_can_be_turned_off(kernel_model, monkeypatch):
    from upcycle.modeling import sparse_kernel

    monkeypatch.setenv("UPCYCLE_KERNEL_SELF_CHECK", "0")
    monkeypatch.setattr(sparse_kernel, "_compare_with_reference", lambda *a: pytest.fail("the check ran"))
    logits_with(kernel_model, "kernel", IDS.to(DEVICE))
    assert sparse_kernel._VERDICTS == {}


@pytest.mark.parametrize(
    "case",
    ["head width 8", "float64", "sliding-window mask"],
)
def test_calls_the_kernel_does_not_take_run_the_torch_path_without_an_error(case, monkeypatch, caplog):
    from upcycle.modeling import gated_attention, sparse_attention

    width = 8 if case == "head width 8" else 16
    dtype = torch.float64 if case == "float64" else torch.float32
    query, key, value, gates, keep, shared, routed = make_case(1, 4, 2, 12, 0, width, 0.5, 1, dtype, False)
    mask = None
    if case == "sliding-window mask":
        positions = torch.arange(12)
        mask = ((positions[None, :] <= positions[:, None]) & (positions[None, :] > positions[:, None] - 4))[None, None]

    class Router:
        shared_heads, routed_heads = shared, routed

        def __call__(self, hidden, q):
            return gates

    module = torch.nn.Module()
    module.head_router, module.attention_backend, module.is_causal = Router(), "kernel", True
    torch_path = []
    real = sparse_attention.head_sparse_attention
    monkeypatch.setattr(
        gated_attention, "head_sparse_attention", lambda *a, **k: torch_path.append(1) or real(*a, **k)
    )
    with caplog.at_level("DEBUG", logger="upcycle.modeling.gated_attention"):
        output, _ = gated_attention.head_gated_attention(module, query, key, value, mask, router_input=None)
    assert torch_path == [1] and output.shape == (1, 12, 4, width)
    assert any("torch path" in r.message for r in caplog.records if r.levelname == "DEBUG")


def test_offsets_past_two_to_the_31_elements_address_the_right_rows():
    """The second sequence's queries start 2**31 elements into their storage (fp16: 4 GB of address space, of which
    only the touched pages are resident): the kernel must read them there, not at a wrapped int32 offset. Compiled
    for a GPU, int32 offsets would wrap here; Triton's CPU interpreter computes offsets in int64 whatever the kernel
    says, so on the CPU this checks the addressing of strided inputs, and the GPU run (bench/gpu.sh) the int64 math."""
    from upcycle.modeling.sparse_kernel import masked_reference

    batch, heads, length, width = 2, 2, 16, 16
    generator = torch.Generator().manual_seed(0)
    compact = torch.randn(batch, heads, length, width, generator=generator).half()
    storage = torch.empty(2**31 + heads * length * width, dtype=torch.float16, device=DEVICE)
    query = storage.as_strided(compact.shape, (2**31, length * width, width, 1))
    query.copy_(compact.to(DEVICE))
    key, value = (torch.randn(batch, 1, length, width, generator=generator).half().to(DEVICE) for _ in range(2))
    gates = torch.ones(batch, length, heads, dtype=torch.float16, device=DEVICE)
    gates[:, ::2, 1] = 0
    got = head_sparse_attention_kernel(query, key, value, gates, None, [], [0, 1], causal=True)
    expected = masked_reference(
        compact.float().to(DEVICE), key.float(), value.float(), gates.float(), None, True, width**-0.5
    )
    torch.testing.assert_close(got.float(), expected, atol=3e-3, rtol=3e-3)
