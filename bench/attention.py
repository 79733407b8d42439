"""Head-sparse attention against dense SDPA: time ratios measured in one run.

    python bench/attention.py                      # this machine's default: CPU shapes, forward
    python bench/attention.py --device cuda --dtype bfloat16 --lengths 1024 4096 8192 --tokens 16384 \
--backward --check --end-to-end

Shapes follow the MoH setting: 32 query heads, 8 KV heads, head width 128, half the heads shared,
B*T = --tokens. For each length and active fraction (shared + routed top-k per token, random
routing) it times dense causal SDPA (the baseline), the masked reference (all heads, times the
gates), the torch head-sparse path and, where Triton runs compiled (CUDA), the Triton kernel,
forward, and with --backward forward+backward, and prints each as a ratio to dense. --configs
adds a kernel column per tile configuration (rows,keys,warps,stages,backward warps).
--check first compares the kernel with the masked reference in outputs and gradients at
the bench dtype. --end-to-end times training steps (forward, backward, AdamW) of a
SmolLM2-135M-shaped model (random weights): dense with SDPA against its MoH-0.75 conversion
with each attention backend, in tokens/s. --decode times one decode step (a new token per
sequence against a KV cache of each length).

Targets (issue 8): on this CPU, torch path / dense <= 0.75 at T=2048, 0.75 active, fp32,
forward; on an H100/H200 in bf16, kernel / dense <= 0.80 forward and <= 0.85 forward+backward
at T=4096, 0.75 active.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from upcycle.modeling.sparse_attention import head_sparse_attention
from upcycle.modeling.sparse_kernel import (
    KernelConfig,
    default_config,
    head_sparse_attention_kernel,
    kernel_unavailable_reason,
)

HEADS, KV_HEADS, DIM = 32, 8, 128
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def routing(
    batch: int, length: int, active: float, generator: torch.Generator
) -> tuple[torch.Tensor, list[int], list[int]]:
    """Gates [B, T, h]: the first half of the heads shared, top-k of the others per token at random."""
    shared = list(range(HEADS // 2))
    routed = list(range(HEADS // 2, HEADS))
    top_k = round(active * HEADS) - len(shared)
    gates = torch.zeros(batch, length, HEADS)
    gates[:, :, : len(shared)] = 1
    if top_k > 0:
        scores = torch.rand(batch, length, len(routed), generator=generator)
        chosen = scores.topk(top_k, dim=-1).indices + len(shared)
        gates.scatter_(-1, chosen, 1.0)
    return gates, shared, routed


DENSE_BACKENDS: list = []  # the SDPA backends dense may use (set in main: flash alone where it runs)


def dense(query, key, value):
    causal = query.shape[2] > 1  # a decode step (one query after the cache) sees every key
    if DENSE_BACKENDS:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(DENSE_BACKENDS):
            return F.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=True).transpose(1, 2)
    return F.scaled_dot_product_attention(query, key, value, is_causal=causal, enable_gqa=True).transpose(1, 2)


def dense_backend(device: str, dtype: torch.dtype) -> str:
    """Pin dense SDPA to its flash backend where it runs (CUDA, fp16/bf16) and say which backend the baseline uses."""
    if device != "cuda":
        return "SDPA's CPU kernel"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    probe = torch.randn(1, 2, 64, DIM, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(probe, probe, probe, is_causal=True)
    except RuntimeError as error:
        return f"SDPA's own choice (flash refused: {' '.join(str(error).split())[:120]})"
    DENSE_BACKENDS[:] = [SDPBackend.FLASH_ATTENTION]
    return "SDPA flash"


def masked(query, key, value, gates):
    return dense(query, key, value) * gates[..., None].to(query.dtype)


def prototype(query, key, value, gates, shared, routed, chunk: int = 256):
    """The issue's CPU prototype, re-implemented as described: shared heads through causal SDPA; each
    routed head's selected queries, in position order, through SDPA in chunks of ``chunk``, each chunk
    reading the keys up to its last position with an exact causal mask. [B, T, h, d]."""
    batch, heads, length, dim = query.shape
    group = heads // key.shape[1]
    output = query.new_zeros(batch, length, heads, dim)
    shared_kv = sorted({h // group for h in shared})
    output[:, :, shared] = (
        F.scaled_dot_product_attention(
            query[:, shared], key[:, shared_kv], value[:, shared_kv], is_causal=True, enable_gqa=True
        ).transpose(1, 2)
        * gates[:, :, shared, None]
    )
    positions = torch.arange(length, device=query.device)
    for item in range(batch):
        for head in routed:
            chosen = gates[item, :, head].nonzero().squeeze(1)
            for start in range(0, chosen.numel(), chunk):
                tokens = chosen[start : start + chunk]
                last = int(tokens[-1]) + 1
                mask = torch.zeros(tokens.numel(), last, dtype=query.dtype, device=query.device)
                mask.masked_fill_(positions[:last] > tokens[:, None], float("-inf"))
                attended = F.scaled_dot_product_attention(
                    query[item, head, tokens][None],
                    key[item, head // group, :last][None],
                    value[item, head // group, :last][None],
                    attn_mask=mask[None],
                )[0]
                output[item, tokens, head] = attended * gates[item, tokens, head, None]
    return output


def decode(args, dtype: torch.dtype, configs: list[KernelConfig], generator: torch.Generator) -> None:
    """One decode step (a new token per sequence against a KV cache of S positions), forward only."""
    print(f"\ndecode step: batch {args.decode_batch}, one new token per sequence against a cache of S keys")
    columns = ["masked"] + ([] if args.no_torch else ["torch path"]) + [f"kernel {c.rows}x{c.keys}" for c in configs]
    print("\n| S | active | dense ms | " + " | ".join(f"{c} / dense" for c in columns) + " |")
    print("|---" * (3 + len(columns)) + "|")
    for cache in args.lengths:
        query = torch.randn(args.decode_batch, HEADS, 1, DIM, generator=generator).to(args.device, dtype)
        key, value = (
            torch.randn(args.decode_batch, KV_HEADS, cache, DIM, generator=generator).to(args.device, dtype)
            for _ in range(2)
        )
        for active in args.active:
            gates, shared, routed = routing(args.decode_batch, 1, active, generator)
            gates = gates.to(args.device, dtype)
            repeats = max(args.repeats, 20)
            base = timed(lambda: dense(query, key, value), False, [], repeats, args.device)
            ratios = [timed(lambda: masked(query, key, value, gates), False, [], repeats, args.device) / base]
            if not args.no_torch:
                ratios.append(
                    timed(
                        lambda: head_sparse_attention(query, key, value, gates, None, shared, routed, causal=True),
                        False,
                        [],
                        repeats,
                        args.device,
                    )
                    / base
                )
            for config in configs:
                ratios.append(
                    timed(
                        lambda: head_sparse_attention_kernel(
                            query, key, value, gates, None, shared, routed, causal=True, config=config
                        ),
                        False,
                        [],
                        repeats,
                        args.device,
                    )
                    / base
                )
            print(
                f"| {cache} | {active} | {base * 1000:.3f} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |",
                flush=True,
            )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(function, backward: bool, inputs: list[torch.Tensor], repeats: int, device: str) -> float:
    """Median seconds of ``function`` (forward, or forward+backward) over ``repeats`` runs after one warm-up."""
    times = []
    for run in range(repeats + 1):
        for tensor in inputs:
            tensor.grad = None
        synchronize(device)
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = function()
            if backward:
                out.backward(torch.ones_like(out))
        synchronize(device)
        if run:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_config(text: str) -> KernelConfig:
    rows, keys, warps, stages, backward_warps = (int(part) for part in text.split(","))
    return KernelConfig(rows, keys, warps, stages, backward_warps)


def check(device: str, dtype: torch.dtype, config: KernelConfig) -> None:
    """Kernel against the masked reference (fp32 math) in outputs and q/k/v/gate gradients, relative max errors."""
    generator = torch.Generator().manual_seed(1)
    for length, active, padded in [(1000, 0.75, False), (1024, 0.5, True), (333, 0.9, False)]:
        batch = 2
        tensors = [
            torch.randn(batch, heads, length, DIM, generator=generator) for heads in (HEADS, KV_HEADS, KV_HEADS)
        ]
        gates, shared, routed = routing(batch, length, active, generator)
        gates = gates * (0.5 + torch.rand(gates.shape, generator=generator))  # soft gates
        keep = torch.ones(batch, length, dtype=torch.bool)
        if padded:
            keep[1, 10:110] = False  # padding keys inside the second sequence (no query is left without keys)
        mine = [t.to(device, dtype).requires_grad_(True) for t in (*tensors, gates)]
        reference = [t.to(device, torch.float32).requires_grad_(True) for t in (*tensors, gates)]
        out = head_sparse_attention_kernel(
            *mine, keep.to(device) if padded else None, shared, routed, causal=True, config=config
        )
        mask = keep.to(device)[:, None, None, :] & torch.ones(length, length, dtype=torch.bool, device=device).tril()
        group = HEADS // KV_HEADS
        expected = (
            F.scaled_dot_product_attention(
                reference[0],
                reference[1].repeat_interleave(group, 1),
                reference[2].repeat_interleave(group, 1),
                attn_mask=mask,
            ).transpose(1, 2)
            * reference[3][..., None]
        )
        upstream = torch.randn(expected.shape, generator=generator).to(device)
        (out.float() * upstream).sum().backward()
        (expected * upstream).sum().backward()
        errors = [(out.float() - expected).abs().max() / expected.abs().max()]
        selected = gates.to(device) != 0
        for index, (a, b) in enumerate(zip(mine, reference)):
            a, b = a.grad.float(), b.grad
            if index == 3:
                a, b = a * selected, b * selected  # skipped pairs: no gradient on a sparse path
            errors.append((a - b).abs().max() / b.abs().max())
        print(
            f"check T={length} active={active} padding={padded}: relative max error out/dq/dk/dv/dgate = "
            + " / ".join(f"{float(e):.1e}" for e in errors),
            flush=True,
        )


def end_to_end(device: str, dtype: torch.dtype, length: int, batch: int, steps: int, backends: list[str]) -> None:
    """Training steps of a SmolLM2-135M-shaped model, dense (SDPA) against MoH-0.75 with each backend: tokens/s."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import upcycle  # noqa: F401
    from upcycle.convert import convert_checkpoint
    from upcycle.methods.moh import MoHOptions
    from upcycle.modeling.gated_attention import set_attention_backend

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(Path(folder) / "dense")
        convert_checkpoint(
            str(Path(folder) / "dense"),
            Path(folder) / "moh",
            "moh",
            MoHOptions(active_heads=0.75, shared_selection="weight-norm"),
        )
        ids = torch.randint(
            3, SMOLLM2_135M["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0)
        ).to(device)
        runs = [("dense", "sdpa")] + [("moh", backend) for backend in backends]
        results = {}
        for name, backend in runs:
            model = AutoModelForCausalLM.from_pretrained(
                Path(folder) / name, dtype=dtype, attn_implementation="sdpa" if name == "dense" else None
            ).to(device)
            if name == "moh":
                set_attention_backend(model, backend)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            times = []
            for step in range(steps + 2):
                synchronize(device)
                start = time.perf_counter()
                loss = model(ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize(device)
                if step >= 2:
                    times.append(time.perf_counter() - start)
            results[(name, backend)] = batch * length / statistics.median(times)
            del model, optimizer
            if device == "cuda":
                torch.cuda.empty_cache()
        base = results[("dense", "sdpa")]
        print(
            f"\nend to end: SmolLM2-135M shape (random weights), {dtype}, batch {batch} x {length} tokens, AdamW, "
            f"median of {steps} steps"
        )
        print("| model | attention | tokens/s | / dense |\n|---|---|---|---|")
        for (name, backend), speed in results.items():
            print(f"| {name} | {backend} | {speed:,.0f} | {speed / base:.2f} |", flush=True)


def self_check_cost(device: torch.device, dtype: torch.dtype) -> None:
    """The kernel's first-use self-check, timed: once with compilation (the first call of a process, which compiles
    the variants the run uses anyway) and once more with the kernels compiled (the check's own cost)."""
    from upcycle.modeling import sparse_kernel

    for backward in (False, True):
        times = []
        for _ in range(2):
            sparse_kernel._VERDICTS.clear()
            start = time.perf_counter()
            verdict = sparse_kernel.self_check(device, dtype, DIM, True, False, backward)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        print(
            f"kernel self-check ({'forward+backward' if backward else 'forward'}): {verdict or 'passed'}; "
            f"{times[0]:.3f} s with compilation, {times[1]:.3f} s compiled (target < 1 s on a GPU)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--tokens", type=int, default=4096, help="B*T per call (16384 in the issue's GPU setting)")
    parser.add_argument("--active", type=float, nargs="+", default=[0.5, 0.75, 0.9, 1.0])
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--configs",
        nargs="*",
        default=[],
        help="extra kernel tile configurations: rows,keys,warps,stages,backward_warps",
    )
    parser.add_argument("--no-torch", action="store_true", help="leave out the torch path column")
    parser.add_argument(
        "--prototype", action="store_true", help="add a column for the issue's CPU prototype (per-head chunks of 256)"
    )
    parser.add_argument("--check", action="store_true", help="first compare the kernel with the masked reference")
    parser.add_argument(
        "--end-to-end", action="store_true", help="also time training steps of a SmolLM2-135M-shaped model"
    )
    parser.add_argument("--e2e-length", type=int, default=2048)
    parser.add_argument("--e2e-batch", type=int, default=8)
    parser.add_argument("--e2e-steps", type=int, default=5)
    parser.add_argument(
        "--decode", action="store_true", help="also time one decode step against a KV cache of each length"
    )
    parser.add_argument("--decode-batch", type=int, default=8)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    probe = torch.empty(1, 1, 1, DIM, device=args.device)
    # CUDA with Triton (or TRITON_INTERPRET=1: a slow dry run of this script)
    kernel = kernel_unavailable_reason(probe) is None
    configs = ([default_config(probe.device)] + [parse_config(text) for text in args.configs]) if kernel else []
    print(
        f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, {args.dtype}, "
        f"{HEADS} query heads, {KV_HEADS} KV heads, head width {DIM}, half the heads shared; "
        f"B*T = {args.tokens}; median of {args.repeats}; "
        f"torch {torch.__version__}; dense baseline: {dense_backend(args.device, dtype)}"
        + (f"; kernel configs {configs}" if kernel else "; no kernel column (needs CUDA and Triton)")
    )
    if kernel:
        self_check_cost(probe.device, dtype)
    if args.check and kernel:
        check(args.device, dtype, configs[0])
    modes = [("forward", False)] + ([("forward+backward", True)] if args.backward else [])
    columns = (
        ["masked"]
        + ([] if args.no_torch else ["torch path"])
        + (["prototype"] if args.prototype else [])
        + [f"kernel {c.rows}x{c.keys}/{c.warps}w/{c.stages}s" for c in configs]
    )
    print("\n| T | active | pass | dense s | " + " | ".join(f"{c} / dense" for c in columns) + " |")
    print("|---" * (4 + len(columns)) + "|")
    for length in args.lengths:
        batch = max(1, args.tokens // length)
        shape = (batch, HEADS, length, DIM), (batch, KV_HEADS, length, DIM)
        query = torch.randn(*shape[0], generator=generator).to(args.device, dtype).requires_grad_(True)
        key = torch.randn(*shape[1], generator=generator).to(args.device, dtype).requires_grad_(True)
        value = torch.randn(*shape[1], generator=generator).to(args.device, dtype).requires_grad_(True)
        for active in args.active:
            gates, shared, routed = routing(batch, length, active, generator)
            gates = gates.to(args.device, dtype)
            for label, backward in modes:
                inputs = [query, key, value]
                base = timed(lambda: dense(query, key, value), backward, inputs, args.repeats, args.device)
                ratios = [
                    timed(lambda: masked(query, key, value, gates), backward, inputs, args.repeats, args.device) / base
                ]
                if not args.no_torch:
                    ratios.append(
                        timed(
                            lambda: head_sparse_attention(query, key, value, gates, None, shared, routed, causal=True),
                            backward,
                            inputs,
                            args.repeats,
                            args.device,
                        )
                        / base
                    )
                if args.prototype:
                    ratios.append(
                        timed(
                            lambda: prototype(query, key, value, gates, shared, routed),
                            backward,
                            inputs,
                            args.repeats,
                            args.device,
                        )
                        / base
                    )
                for config in configs:
                    ratios.append(
                        timed(
                            lambda: head_sparse_attention_kernel(
                                query, key, value, gates, None, shared, routed, causal=True, config=config
                            ),
                            backward,
                            inputs,
                            args.repeats,
                            args.device,
                        )
                        / base
                    )
                print(
                    f"| {length} | {active} | {label} | {base:.4f} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |",
                    flush=True,
                )
    if args.decode:
        decode(args, dtype, configs, generator)
    if args.end_to_end:
        backends = ["masked"] + (["kernel"] if kernel else ["torch"])
        end_to_end(args.device, dtype, args.e2e_length, args.e2e_batch, args.e2e_steps, backends)


if __name__ == "__main__":
    main()
