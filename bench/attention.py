"""Head-sparse attention against dense SDPA: time ratios measured in one run.

    python bench/attention.py                      # this machine's default: CPU shapes, forward
    python bench/attention.py --device cuda --dtype bfloat16 --lengths 1024 4096 8192 --tokens 16384 --backward

Shapes follow the MoH setting: 32 query heads, 8 KV heads, head width 128, half the heads shared,
B*T = --tokens. For each length and active fraction (shared + routed top-k per token, random
routing) it times dense causal SDPA (the baseline), the masked reference (all heads, times the
gates) and the torch head-sparse path (only the selected pairs), forward, and with --backward
forward+backward, and prints each as a ratio to dense. The Triton kernel is not there yet: its
column is absent. Targets (issue 8): on this CPU, torch path / dense <= 0.75 at T=2048, 0.75
active, fp32, forward; on an H100/H200 in bf16, kernel / dense <= 0.80 forward and <= 0.85
forward+backward at T=4096, 0.75 active.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from upcycle.modeling.sparse_attention import head_sparse_attention

HEADS, KV_HEADS, DIM = 32, 8, 128


def routing(batch: int, length: int, active: float, generator: torch.Generator) -> tuple[torch.Tensor, list[int], list[int]]:
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


def dense(query, key, value):
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)


def masked(query, key, value, gates):
    return dense(query, key, value) * gates[..., None].to(query.dtype)


def timed(function, backward: bool, inputs: list[torch.Tensor], repeats: int, device: str) -> float:
    """Median seconds of ``function`` (forward, or forward+backward) over ``repeats`` runs after one warm-up."""
    times = []
    for run in range(repeats + 1):
        for tensor in inputs:
            tensor.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = function()
            if backward:
                out.float().sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--tokens", type=int, default=4096, help="B*T per call (16384 in the issue's GPU setting)")
    parser.add_argument("--active", type=float, nargs="+", default=[0.5, 0.75, 0.9, 1.0])
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    print(f"device {args.device}, {args.dtype}, {HEADS} query heads, {KV_HEADS} KV heads, head width {DIM}, half the heads shared; "
          f"B*T = {args.tokens}; median of {args.repeats}")
    modes = [("forward", False)] + ([("forward+backward", True)] if args.backward else [])
    print("| T | active | pass | dense s | masked / dense | torch path / dense |\n|---|---|---|---|---|---|")
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
                reference = timed(lambda: masked(query, key, value, gates), backward, inputs, args.repeats, args.device)
                sparse = timed(lambda: head_sparse_attention(query, key, value, gates, None, shared, routed, causal=True),
                               backward, inputs, args.repeats, args.device)
                print(f"| {length} | {active} | {label} | {base:.3f} | {reference / base:.2f} | {sparse / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
