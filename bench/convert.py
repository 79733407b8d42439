"""Benchmark `upcycle convert` against a plain file copy on a synthetic LLaMA checkpoint.

Usage: python bench/convert.py [--size-gb 4] [--shard-gb 1] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from upcycle.checkpoint.writer import ShardedWriter, TensorSpec  # noqa: E402

TIME_TARGET = 1.5
MEMORY_TARGET = 0.25
BF16 = torch.bfloat16


def llama_config(size_bytes: int) -> dict:
    """A LLaMA config whose bf16 weights take about size_bytes."""
    gb = size_bytes / 1e9
    hidden = 4096 if gb >= 16 else 2048 if gb >= 1 else 1024 if gb >= 0.2 else 256
    intermediate = max(256, round(hidden * 8 / 3 / 256) * 256)
    vocab = 32000 if hidden >= 1024 else 4096
    heads = max(4, hidden // 128)
    layer_bytes = 2 * (4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden)
    embed_bytes = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size_bytes - embed_bytes) / layer_bytes))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "head_dim": hidden // heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }


def llama_layout(config: dict) -> list[TensorSpec]:
    """Tensor names and shapes of a LlamaForCausalLM with this config, in save_pretrained order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    layout = [TensorSpec("model.embed_tokens.weight", BF16, (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        layout += [
            TensorSpec(f"{p}.self_attn.q_proj.weight", BF16, (h, h)),
            TensorSpec(f"{p}.self_attn.k_proj.weight", BF16, (kv, h)),
            TensorSpec(f"{p}.self_attn.v_proj.weight", BF16, (kv, h)),
            TensorSpec(f"{p}.self_attn.o_proj.weight", BF16, (h, h)),
            TensorSpec(f"{p}.mlp.gate_proj.weight", BF16, (i, h)),
            TensorSpec(f"{p}.mlp.up_proj.weight", BF16, (i, h)),
            TensorSpec(f"{p}.mlp.down_proj.weight", BF16, (h, i)),
            TensorSpec(f"{p}.input_layernorm.weight", BF16, (h,)),
            TensorSpec(f"{p}.post_attention_layernorm.weight", BF16, (h,)),
        ]
    return layout + [TensorSpec("model.norm.weight", BF16, (h,)), TensorSpec("lm_head.weight", BF16, (v, h))]


def write_synthetic_checkpoint(folder: Path, size_bytes: int, shard_bytes: int) -> None:
    """Write the checkpoint one tensor at a time, filled from a small random pool."""
    config = llama_config(size_bytes)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    pool = (torch.randn(1 << 22, generator=torch.Generator().manual_seed(0)) * 0.02).to(BF16)
    layout = llama_layout(config)
    writer = ShardedWriter(folder, layout, shard_bytes)
    for index, spec in enumerate(layout):
        if spec.name.endswith("norm.weight"):
            tensor = torch.ones(spec.shape, dtype=BF16)
        else:
            tensor = torch.empty(spec.shape, dtype=BF16)
            flat = tensor.view(-1)
            start = (index * 7919) % pool.numel()
            for begin in range(0, flat.numel(), pool.numel() - start):
                chunk = flat[begin : begin + pool.numel() - start]
                chunk.copy_(pool[start : start + chunk.numel()])
        writer.write(spec.name, tensor)
        del tensor
    writer.close()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copy_folder(src: Path, dst: Path) -> float:
    """Copy every file of src into dst; return the seconds taken."""
    dst.mkdir(parents=True)
    start = time.perf_counter()
    for path in sorted(src.iterdir()):
        shutil.copyfile(path, dst / path.name)
    return time.perf_counter() - start


def convert_command(src: Path, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "upcycle.cli", "convert", str(src), str(out), "--method", method]


# A small launcher runs the command: on Linux a child's ru_maxrss starts at its parent's RSS at exec,
# so spawning straight from this process (which holds torch) would inflate the figure.
LAUNCHER = (
    "import os, sys\n"
    "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss * 1024))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(command: list[str], log: Path) -> tuple[int, float, int]:
    """Run command as a child; return (exit code, seconds, peak RSS in bytes of that child)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    rss_file = log.with_suffix(".rss")
    with open(log, "wb") as sink:
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-S", "-c", LAUNCHER, str(rss_file), *command], stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        seconds = time.perf_counter() - start
    return code, seconds, int(rss_file.read_text()) if rss_file.exists() else 0


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=4.0, help="checkpoint size to synthesise (default 4)")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="shard size of the synthetic checkpoint (default 1)")
    parser.add_argument("--method", default="moh", help="conversion method (default moh)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the files (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = parser.parse_args(argv)

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="upcycle-bench-", dir=args.workdir))
    src, copy_dst, out, log = workdir / "src", workdir / "copy", workdir / "out", workdir / "convert.log"
    try:
        start = time.perf_counter()
        write_synthetic_checkpoint(src, int(args.size_gb * 1e9), int(args.shard_gb * 1e9))
        config = json.loads((src / "config.json").read_text())
        checkpoint_bytes = folder_bytes(src)
        print(f"synthetic llama: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
              f"{gb(checkpoint_bytes)} in {len(list(src.glob('*.safetensors')))} shards "
              f"(written in {time.perf_counter() - start:.1f}s) at {src}")

        copy_folder(src, copy_dst)
        shutil.rmtree(copy_dst)
        os.sync()
        print("page cache: the OS cache cannot be dropped, so one warm-up copy ran first; copy and convert both read warm files")
        copy_seconds = copy_folder(src, copy_dst)
        shutil.rmtree(copy_dst)
        os.sync()

        command = convert_command(src, out, args.method)
        print("running:", " ".join(command))
        code, convert_seconds, peak_rss = run_measured(command, log)
        if code != 0:
            print(f"conversion FAILED with exit code {code}; last lines of its output:")
            print("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
            return 2
        _, import_seconds, import_rss = run_measured([sys.executable, "-c", "import upcycle.cli"], workdir / "import.log")

        time_ratio = convert_seconds / copy_seconds
        memory_ratio = peak_rss / checkpoint_bytes
        print(f"checkpoint size      {gb(checkpoint_bytes)}  (output {gb(folder_bytes(out))})")
        print(f"copy time            {copy_seconds:.2f} s")
        print(f"convert time         {convert_seconds:.2f} s")
        print(f"  of which start-up  {import_seconds:.2f} s  (python + torch + transformers import, measured alone; "
              f"convert minus start-up / copy = {(convert_seconds - import_seconds) / copy_seconds:.2f})")
        print(f"convert peak RSS     {peak_rss / 2**20:.0f} MiB  (importing upcycle.cli alone: {import_rss / 2**20:.0f} MiB)")
        print(f"convert / copy time  {time_ratio:.2f}  target <= {TIME_TARGET}   {verdict(time_ratio, TIME_TARGET)}")
        print(f"peak RSS / size      {memory_ratio:.3f}  target <= {MEMORY_TARGET}  {verdict(memory_ratio, MEMORY_TARGET)}")
        return 0 if time_ratio <= TIME_TARGET and memory_ratio <= MEMORY_TARGET else 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
