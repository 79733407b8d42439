"""Benchmark `upcycle convert` on synthetic LLaMA checkpoints: against a file copy, and against mergekit-moe.

Cases (--case, default all):
  startup  the light commands (--help, convert --help, recipes, inspect OUT) and `import upcycle`, each beside
       python and its imports alone.
  moh  `upcycle convert --method moh` (or --method) against a plain file copy of the checkpoint, at each --size-gb,
       with where the conversion spent its time (from the report).
  btx  the same four-expert Mixtral (BTX: averaged attention, top-2 FFN experts, random routers)
       built by `upcycle convert --method bam` and by `mergekit-moe`, from one synthetic checkpoint.

Usage: python bench/convert.py [--case startup|moh|btx|all] [--size-gb 4 [16]] [--shard-gb N]
           [--btx-size-gb 2.07] [--btx-shard-mb 512] [--btx-repeat 1] [--mergekit PATH] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from upcycle.checkpoint.writer import ShardedWriter, TensorSpec  # noqa: E402

MEMORY_TARGET = 0.25
STARTUP_TARGET = 0.5  # seconds, wall, for each light command
IMPORT_MARGIN = 0.3  # seconds `import upcycle` may add to `import torch, transformers`
BTX_TIME_TARGET = 0.5  # upcycle / mergekit-moe wall time
BTX_MEMORY_TARGET = 0.3  # upcycle / mergekit-moe peak RSS
BTX_EXPERTS = 4
BF16 = torch.bfloat16
MERGEKIT_ENV = "UPCYCLE_BENCH_MERGEKIT"
DEFAULT_MERGEKIT = "/work/mergekit-venv/bin/mergekit-moe"
MERGEKIT_INSTALL = (
    'python3 -m venv /work/mergekit-venv && /work/mergekit-venv/bin/pip install "mergekit==0.1.5" "torch==2.13.0"'
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: unk, bos_token_id, eos_token_id of llama_config


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
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
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
    write_tokenizer(folder, config["vocab_size"])


def write_tokenizer(folder: Path, vocab_size: int, words: int = 1000) -> None:
    """A tiny word-level tokenizer (built offline) whose ids fit the vocabulary; mergekit-moe needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": len(SPECIAL_TOKENS) + i for i in range(min(words, vocab_size - len(SPECIAL_TOKENS)))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    unk, bos, eos = SPECIAL_TOKENS
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "unk_token": unk,
                "bos_token": bos,
                "eos_token": eos,
                "model_max_length": 4096,
            },
            indent=2,
        )
    )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def copy_folder(src: Path, dst: Path) -> float:
    """Copy every file of src into dst; return the seconds taken."""
    dst.mkdir(parents=True)
    start = time.perf_counter()
    for path in sorted(src.iterdir()):
        shutil.copyfile(path, dst / path.name)
    return time.perf_counter() - start


def convert_command(src: Path, out: Path, method: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "upcycle", "convert", str(src), str(out), "--method", method, *options]


# A small launcher runs the command: on Linux a child's ru_maxrss starts at its parent's RSS at exec,
# so spawning straight from this process (which holds torch) would inflate the figure.
LAUNCHER = (
    "import os, sys\n"
    "pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(f'{usage.ru_maxrss * 1024} {usage.ru_utime} {usage.ru_stime}')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


class Measurement(NamedTuple):
    code: int  # exit code
    seconds: float  # wall time
    peak_rss: int  # bytes, the child's ru_maxrss
    user: float  # CPU seconds in user mode
    system: float  # CPU seconds in the kernel


def run_measured(command: list[str], log: Path, extra_env: dict[str, str] | None = None) -> Measurement:
    """Run command as a child (output to log) and measure it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.update(extra_env or {})
    rss_file = log.with_suffix(".rss")
    with open(log, "wb") as sink:
        start = time.perf_counter()
        code = subprocess.call(
            [sys.executable, "-S", "-c", LAUNCHER, str(rss_file), *command],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO_ROOT,
        )
        seconds = time.perf_counter() - start
    peak_rss, user, system = rss_file.read_text().split() if rss_file.exists() else (0, 0, 0)
    return Measurement(code, seconds, int(peak_rss), float(user), float(system))


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def log_tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def synthetic_checkpoint(
    workdir: Path, size_gb: float, shard_gb: float, made: dict[tuple[float, float], Path]
) -> Path:
    """Write (once per size and shard size, remembered in made) a synthetic checkpoint and describe it."""
    key = (size_gb, shard_gb)
    if key in made:
        return made[key]
    src = workdir / f"src-{size_gb:g}gb-{shard_gb:g}gb"
    start = time.perf_counter()
    write_synthetic_checkpoint(src, int(size_gb * 1e9), int(shard_gb * 1e9))
    config = json.loads((src / "config.json").read_text())
    params = sum(math.prod(shape) for _, shape in safetensors_layout(src).values())
    print(
        f"synthetic llama: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"{params / 1e9:.2f}B parameters, {gb(folder_bytes(src))} in {len(list(src.glob('*.safetensors')))} shards "
        f"(written in {time.perf_counter() - start:.1f}s) at {src}"
    )
    made[key] = src
    return src


def time_target(size_gb: float) -> float:
    """convert / copy target: 1.5 up to a few GB, 1.3 at LLaMA-3-8B size (16 GB), where start-up weighs less."""
    return 1.3 if size_gb >= 16 else 1.5


def shard_gb_for(args: argparse.Namespace, size_gb: float) -> float:
    """--shard-gb, or 1 GB shards below 16 GB and 5 GB ones (LLaMA-3-8B's) from there."""
    return args.shard_gb if args.shard_gb is not None else (5.0 if size_gb >= 16 else 1.0)


def print_timings(report: dict, convert_seconds: float, startup_seconds: float) -> None:
    """Where the conversion spent its time: start-up, then the report's phases and checks, then the rest."""
    phases = report.get("timings", {})
    print(f"  where the time went ({convert_seconds:.2f} s):")
    print(f"    {startup_seconds:6.2f} s  start-up (python + imports of `upcycle convert`, measured alone)")
    for name, seconds in phases.items():
        print(f"    {seconds:6.2f} s  {name}")
        if name.startswith("checks"):
            for check in report.get("checks", []):
                print(f"    {'':8}  {check.get('seconds', 0):6.2f} s  {check['name']}")
    rest = convert_seconds - startup_seconds - sum(phases.values())
    print(f"    {rest:6.2f} s  the rest (source opened and checked, card, rename into place, exit)")


def moh_size(args: argparse.Namespace, workdir: Path, made: dict, size_gb: float) -> int:
    """One row of the moh case: 0 if both targets are met, 1 if not, 2 on failure."""
    shard_gb = shard_gb_for(args, size_gb)
    print(f"-- {size_gb:g} GB in {shard_gb:g} GB shards --")
    src = synthetic_checkpoint(workdir, size_gb, shard_gb, made)
    copy_dst, out, log = workdir / "copy", workdir / "out", workdir / "convert.log"
    checkpoint_bytes = folder_bytes(src)

    copy_folder(src, copy_dst)
    shutil.rmtree(copy_dst)
    os.sync()
    print(
        "page cache: the OS cache cannot be dropped, so one warm-up copy ran first; "
        "copy and convert both read the files as the cache left them"
    )
    copy_seconds = copy_folder(src, copy_dst)
    shutil.rmtree(copy_dst)
    os.sync()

    command = convert_command(src, out, args.method)
    print("running:", " ".join(command))
    code, convert_seconds, peak_rss, *_ = run_measured(command, log)
    if code != 0:
        print(f"conversion FAILED with exit code {code}; last lines of its output:")
        print(log_tail(log))
        return 2
    _, import_seconds, import_rss, *_ = run_measured(
        [sys.executable, "-c", "import upcycle.convert"], workdir / "import.log"
    )
    report = json.loads((out / "upcycle_report.json").read_text())
    shutil.rmtree(out)

    target = time_target(size_gb)
    time_ratio = convert_seconds / copy_seconds
    memory_ratio = peak_rss / checkpoint_bytes
    print(f"checkpoint size      {gb(checkpoint_bytes)}")
    print(f"copy time            {copy_seconds:.2f} s")
    print(f"convert time         {convert_seconds:.2f} s")
    print_timings(report, convert_seconds, import_seconds)
    print(
        f"convert peak RSS     {peak_rss / 2**20:.0f} MiB  "
        f"(importing upcycle.convert alone: {import_rss / 2**20:.0f} MiB)"
    )
    print(f"convert / copy time  {time_ratio:.2f}  target <= {target}   {verdict(time_ratio, target)}")
    print(
        f"peak RSS / size      {memory_ratio:.3f}  target <= {MEMORY_TARGET}  {verdict(memory_ratio, MEMORY_TARGET)}"
    )
    return 0 if time_ratio <= target and memory_ratio <= MEMORY_TARGET else 1


def moh_case(args: argparse.Namespace, workdir: Path, made: dict[tuple[float, float], Path]) -> int:
    """`upcycle convert --method METHOD` against a plain copy at each --size-gb (each source is deleted after its
    row, so the disk holds one at a time)."""
    print(f"== {args.method}: upcycle convert against a file copy ==")
    worst = 0
    for size_gb in args.size_gb:
        worst = max(worst, moh_size(args, workdir, made, size_gb))
        shutil.rmtree(made.pop((size_gb, shard_gb_for(args, size_gb))), ignore_errors=True)
    return worst


def best_wall(command: list[str], repeat: int, env: dict[str, str]) -> float:
    """The fastest of ``repeat`` runs of ``command`` (wall seconds; output discarded)."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=REPO_ROOT)
        best = min(best, time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.decode(errors='replace')[-2000:]}")
    return best


def startup_case(args: argparse.Namespace, workdir: Path, made: dict[tuple[float, float], Path]) -> int:
    """Wall time of the light commands and of `import upcycle`, each beside python and its imports alone; 0 if every
    target is met, 1 if not."""
    print("== start-up: the light commands, fastest of", args.startup_repeat, "runs each ==")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed wheel has its bytecode compiled (pip does it)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO_ROOT / "upcycle")], check=True, env=env)
    src = synthetic_checkpoint(workdir, 0.05, 1.0, made)
    converted = workdir / "startup-moh"
    subprocess.run(convert_command(src, converted, "moh"), check=True, env=env, capture_output=True)
    python = [sys.executable]
    cli = [*python, "-m", "upcycle"]
    alone = {
        "python": [*python, "-c", "pass"],
        "python + import upcycle.cli": [*python, "-c", "import upcycle.cli"],
    }
    commands = {
        "upcycle --help": [*cli, "--help"],
        "upcycle convert --help": [*cli, "convert", "--help"],
        "upcycle recipes": [*cli, "recipes"],
        "upcycle inspect OUT": [*cli, "inspect", str(converted)],
    }
    imports = {
        "import torch, transformers": [*python, "-c", "import torch, transformers"],
        "import upcycle": [*python, "-c", "import upcycle"],
        "import upcycle; load OUT with AutoModelForCausalLM": [
            *python,
            "-c",
            f"import upcycle, transformers; transformers.AutoModelForCausalLM.from_pretrained({str(converted)!r})",
        ],
    }
    walls = {name: best_wall(command, args.startup_repeat, env) for name, command in {**alone, **commands}.items()}
    walls.update({name: best_wall(command, args.startup_repeat, env) for name, command in imports.items()})
    worst = 0
    print(f"{'':54}{'wall':>7}")
    for name in alone:
        print(f"{name:54}{walls[name]:6.2f}s")
    for name in commands:
        ok = walls[name] <= STARTUP_TARGET
        worst = max(worst, 0 if ok else 1)
        print(f"{name:54}{walls[name]:6.2f}s  target <= {STARTUP_TARGET} s  {verdict(walls[name], STARTUP_TARGET)}")
    limit = walls["import torch, transformers"] + IMPORT_MARGIN
    for name in imports:
        print(f"{name:54}{walls[name]:6.2f}s")
    ok = walls["import upcycle"] <= limit
    worst = max(worst, 0 if ok else 1)
    print(
        f"import upcycle <= import torch, transformers + {IMPORT_MARGIN} s = {limit:.2f} s  "
        f"{verdict(walls['import upcycle'], limit)} (the Auto classes register on the first lookup: the last row)"
    )
    return worst


def safetensors_layout(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from the headers of every safetensors file in folder."""
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                layout[name] = (entry["dtype"], tuple(entry["shape"]))
    return layout


FUSED_EXPERTS = re.compile(r"(?P<prefix>.+)\.mlp\.experts\.(?P<leaf>gate_up_proj|down_proj)")
FUSED_ROUTER = re.compile(r"(?P<prefix>.+)\.mlp\.gate\.weight")


def mixtral_file_names(layout: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Map transformers 5's fused Mixtral tensors (mlp.experts.gate_up_proj [E, 2I, D], mlp.experts.down_proj
    [E, D, I], mlp.gate) to the per-expert names Mixtral checkpoints are saved under (block_sparse_moe.*)."""
    mapped: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, (dtype, shape) in layout.items():
        if match := FUSED_EXPERTS.fullmatch(name):
            moe = f"{match['prefix']}.block_sparse_moe.experts"
            for expert in range(shape[0]):
                if match["leaf"] == "gate_up_proj":
                    for proj in ("w1", "w3"):
                        mapped[f"{moe}.{expert}.{proj}.weight"] = (dtype, (shape[1] // 2, shape[2]))
                else:
                    mapped[f"{moe}.{expert}.w2.weight"] = (dtype, (shape[1], shape[2]))
        elif match := FUSED_ROUTER.fullmatch(name):
            mapped[f"{match['prefix']}.block_sparse_moe.gate.weight"] = (dtype, shape)
        else:
            mapped[name] = (dtype, shape)
    return mapped


def compare_layouts(ours: Path, theirs: Path) -> tuple[bool, str]:
    """Whether two checkpoints hold the same tensor names, dtypes and shapes, and a one-line account."""
    a, b = safetensors_layout(ours), safetensors_layout(theirs)
    if a == b:
        return True, f"identical: {len(a)} tensors, same names, dtypes and shapes"
    prefix = (
        "names differ ("
        + ", ".join(
            f"{label}: {', '.join(sorted(set(x) - set(y))[:2]) or '-'}"
            for label, x, y in (("upcycle only", a, b), ("mergekit only", b, a))
        )
        + ")"
    )
    a, b = mixtral_file_names(a), mixtral_file_names(b)
    if a == b:
        return (
            True,
            f"{prefix}; same after mapping fused Mixtral experts to per-expert names: "
            f"{len(a)} tensors, same dtypes and shapes",
        )
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = sorted(name for name in set(a) & set(b) if a[name] != b[name])
    details = [
        f"{len(only_a)} only in upcycle's (e.g. {only_a[:3]})" if only_a else "",
        f"{len(only_b)} only in mergekit's (e.g. {only_b[:3]})" if only_b else "",
        f"{len(differ)} with another dtype or shape (e.g. {[(n, a[n], b[n]) for n in differ[:2]]})" if differ else "",
    ]
    return False, f"{prefix}; after mapping still different: " + "; ".join(filter(None, details))


CONFIG_KEYS = (
    "architectures",
    "model_type",
    "num_local_experts",
    "num_experts_per_tok",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "vocab_size",
    "dtype",
    "sliding_window",
    "router_aux_loss_coef",
)


def config_differences(ours: Path, theirs: Path) -> list[str]:
    """The key config.json fields whose values differ between the two outputs (torch_dtype read as dtype)."""
    a, b = (json.loads((folder / "config.json").read_text()) for folder in (ours, theirs))
    for config in (a, b):
        config.setdefault("dtype", config.get("torch_dtype"))
    return [
        f"{key}: upcycle {a.get(key)!r}, mergekit {b.get(key)!r}" for key in CONFIG_KEYS if a.get(key) != b.get(key)
    ]


def read_through(folder: Path) -> None:
    """Read every file of folder once, so the next command finds it in the page cache."""
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as file:
            while file.read(64 * 2**20):
                pass


def mergekit_config(src: Path, experts: int) -> dict:
    """mergekit-moe's YAML config for a random-gated BTX of `experts` copies of src (JSON is valid YAML)."""
    expert = {"source_model": str(src), "positive_prompts": ["w1 w2 w3"]}  # prompts are unused in random mode
    return {
        "base_model": str(src),
        "gate_mode": "random",
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [dict(expert) for _ in range(experts)],
    }


def btx_case(args: argparse.Namespace, workdir: Path, made: dict[tuple[float, float], Path]) -> int:
    """upcycle's BTX against mergekit-moe's.

    0 if both ratio targets are met or mergekit is absent, 1 if not, 2 on failure."""
    print(f"== btx: {BTX_EXPERTS}-expert Mixtral, upcycle convert --method bam against mergekit-moe ==")
    mergekit = shutil.which(args.mergekit) or (args.mergekit if os.access(args.mergekit, os.X_OK) else None)
    if mergekit is None:
        print(
            f"mergekit-moe not found at {args.mergekit}: skipping the comparison. Install it in its own virtualenv "
            f"(it must not change this Python's packages):\n  {MERGEKIT_INSTALL}\n"
            f"then pass --mergekit PATH or set {MERGEKIT_ENV} if it lives elsewhere."
        )
        return 0
    src = synthetic_checkpoint(workdir, args.btx_size_gb, args.btx_shard_mb / 1000, made)
    shard = f"{args.btx_shard_mb}MB"
    ours, theirs = workdir / "btx-upcycle", workdir / "btx-mergekit"
    config_path = workdir / "mergekit-moe.yml"
    config_path.write_text(json.dumps(mergekit_config(src, BTX_EXPERTS), indent=2))
    experts = [option for _ in range(BTX_EXPERTS - 1) for option in ("--expert", str(src))]
    runs = {
        "upcycle": convert_command(
            src,
            ours,
            "bam",
            "--attention",
            "average",
            "--ffn-top-k",
            "2",
            "--router-init",
            "random",
            *experts,
            "--shard-size",
            shard,
            "--overwrite",
        ),
        # --out-shard-size is documented as parameters, but mergekit's TensorWriter counts bytes; M = 10**6
        "mergekit": [
            mergekit,
            str(config_path),
            str(theirs),
            "--out-shard-size",
            f"{args.btx_shard_mb}M",
            "--random-seed",
            "0",
            "--quiet",
        ],
    }
    startup = {
        "upcycle": [sys.executable, "-c", "import upcycle.convert"],
        "mergekit": [str(Path(mergekit).parent / "python"), "-c", "import mergekit.scripts.moe"],
    }
    outputs = {"upcycle": ours, "mergekit": theirs}
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    print("page cache: the source is read through before each run; both read warm files and neither output is synced")
    best: dict[str, Measurement] = {}
    for _ in range(args.btx_repeat):
        for label, command in runs.items():
            shutil.rmtree(outputs[label], ignore_errors=True)
            os.sync()
            read_through(src)
            print("running:", " ".join(command))
            log = workdir / f"btx-{label}.log"
            measured = run_measured(command, log, offline)
            if measured.code != 0:
                print(f"{label} FAILED with exit code {measured.code}; last lines of its output:")
                print(log_tail(log))
                return 2
            if label not in best or measured.seconds < best[label].seconds:
                best[label] = measured
    imports = {label: run_measured(command, workdir / f"btx-{label}-import.log") for label, command in startup.items()}

    runs_note = f", fastest of {args.btx_repeat} runs" if args.btx_repeat > 1 else ""
    print(f"{'':10}{'wall':>8}  {'user':>7}  {'sys':>7}  {'peak RSS':>10}  {'start-up':>8}  output{runs_note}")
    for label, measured in best.items():
        folder, started = outputs[label], imports[label]
        startup_text = f"{started.seconds:7.2f}s" if started.code == 0 else "       ?"
        print(
            f"{label:10}{measured.seconds:7.2f}s  {measured.user:6.2f}s  {measured.system:6.2f}s  "
            f"{measured.peak_rss / 2**30:6.2f} GiB  {startup_text}  "
            f"{gb(folder_bytes(folder))} in {len(list(folder.glob('*.safetensors')))} shards"
        )
    print("(start-up: python plus the tool's imports, measured alone)")
    time_ratio = best["upcycle"].seconds / best["mergekit"].seconds
    memory_ratio = best["upcycle"].peak_rss / best["mergekit"].peak_rss
    print(
        f"upcycle / mergekit time      {time_ratio:.2f}  target <= {BTX_TIME_TARGET}  "
        f"{verdict(time_ratio, BTX_TIME_TARGET)}"
    )
    print(
        f"upcycle / mergekit peak RSS  {memory_ratio:.2f}  target <= {BTX_MEMORY_TARGET}  "
        f"{verdict(memory_ratio, BTX_MEMORY_TARGET)}"
    )
    same, account = compare_layouts(ours, theirs)
    print(f"tensors: {account}")
    for difference in config_differences(ours, theirs):
        print(f"config.json differs, {difference}")
    return 0 if same and time_ratio <= BTX_TIME_TARGET and memory_ratio <= BTX_MEMORY_TARGET else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--case", choices=("startup", "moh", "btx", "all"), default="all", help="what to run (default all)"
    )
    parser.add_argument(
        "--size-gb",
        type=float,
        nargs="+",
        default=[4.0],
        help="moh: checkpoint sizes to synthesise, one row each (default 4; 16 is LLaMA-3-8B's size)",
    )
    parser.add_argument(
        "--shard-gb",
        type=float,
        default=None,
        help="moh: shard size of the synthetic checkpoints (default 1, and 5 from 16 GB up)",
    )
    parser.add_argument(
        "--startup-repeat", type=int, default=5, help="startup: runs per command, the fastest kept (default 5)"
    )
    parser.add_argument("--method", default="moh", help="moh: conversion method (default moh)")
    parser.add_argument(
        "--btx-size-gb", type=float, default=2.07, help="btx: checkpoint size to synthesise (default 2.07)"
    )
    parser.add_argument(
        "--btx-shard-mb", type=int, default=512, help="btx: input and output shard size in MB (default 512)"
    )
    parser.add_argument(
        "--btx-repeat",
        type=int,
        default=1,
        help="btx: run each tool N times, alternating; keep the fastest (default 1)",
    )
    parser.add_argument(
        "--mergekit",
        default=os.environ.get(MERGEKIT_ENV, DEFAULT_MERGEKIT),
        help=f"btx: the mergekit-moe executable (default ${MERGEKIT_ENV} or {DEFAULT_MERGEKIT})",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the files (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = parser.parse_args(argv)

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="upcycle-bench-", dir=args.workdir))
    made: dict[tuple[float, float], Path] = {}
    every = {"startup": startup_case, "moh": moh_case, "btx": btx_case}
    cases = list(every.values()) if args.case == "all" else [every[args.case]]
    try:
        return max(case(args, workdir, made) for case in cases)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
