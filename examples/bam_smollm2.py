"""Branch, train, mix: SmolLM2-135M into a text expert and a code expert, mixed with BAM and BTX.

    python examples/bam_smollm2.py [--workdir runs/bam] [--branch-steps 16] [--mix-steps 16] [--eval-tokens 4096]

1. Branch: the seed (SmolLM2-135M, offline) is continue-tuned on KJV text and, separately, on
   Python standard-library source code (``upcycle finetune smollm2-branch-kjv-cpu`` and
   ``smollm2-branch-python-cpu``).
2. Mix: seed (expert 0) + the two branches with ``upcycle convert --method bam``, as BAM with
   per-expert KV (``expert-kv``), BAM with shared KV (``shared-kv``) and BTX (``average``,
   written as a plain Mixtral checkpoint).
3. Tune each mix with the same budget on both domains (``upcycle finetune`` with a recipe written
   into the workdir).
4. Perplexity on held-out text of both domains (KJV books and standard-library files never used
   for training) for the seed, each branch and each tuned mix, and each mix's router usage per
   domain: the share of tokens the FFN routers send to each expert (and the mean soft weight of
   each attention expert), averaged over layers. Writes ``results.json`` into the workdir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import upcycle  # noqa: F401  (registers upcycled classes)
from upcycle.assets import smollm2_135m, text_asset, text_asset_file
from upcycle.data.text import pack_tokens
from upcycle.eval.experts import ExpertUsage
from upcycle.eval.perplexity import perplexity

DOMAINS = ("kjv", "python")
EXPERTS = ("seed", "kjv", "python")
MIXES = {"BTX": "average", "BAM expert-kv": "expert-kv", "BAM shared-kv": "shared-kv"}
MIX_RECIPE = """description: tune a BAM/BTX mix of SmolLM2-135M experts on KJV text and Python code \
(written by examples/bam_smollm2.py)
model: {model}
output: {output}
data:
  train: {train}
  validation: {heldout}
  seq_len: 256
  validation_tokens: 8192
trainable: all
losses:
  load_balance: 0.01
  z_loss: 0.001
training:
  steps: {steps}
  global_batch_tokens: 2048
  micro_batch_size: 4
  lr: 1.0e-4
  min_lr: 1.0e-5
  warmup_steps: 2
  weight_decay: 0.1
  seed: 0
  eval_every: {steps}
"""


def upcycle_cli(*args: str) -> None:
    print(f"\n$ upcycle {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "upcycle", *args], check=True)


def write_data(folder: Path) -> tuple[Path, Path]:
    """train/ and heldout/ folders, each with one .jsonl per domain (a data source that mixes both)."""
    for split in ("train", "heldout"):
        for domain in DOMAINS:
            text_asset_file(f"{domain}-{split}", folder / split)
    return folder / "train", folder / "heldout"


def evaluate(folder: Path, blocks: dict[str, torch.Tensor]) -> dict:
    """Held-out perplexity per domain and, for mixes, the experts' usage per domain (mean over layers)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    result: dict = {}
    for domain, tokens in blocks.items():
        with ExpertUsage(model) as usage:
            result[f"ppl_{domain}"] = perplexity(model, tokens)
        ffn = [row for name, row in usage.fraction().items() if "head_router" not in name]
        soft = [row for name, row in usage.fraction().items() if "head_router" in name]
        if ffn:
            result[f"ffn_usage_{domain}"] = [sum(column) / len(ffn) for column in zip(*ffn)]
        if soft:
            result[f"attention_usage_{domain}"] = [sum(column) / len(soft) for column in zip(*soft)]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bam"))
    parser.add_argument("--branch-steps", type=int, default=16, help="steps of 2,048 tokens per branch")
    parser.add_argument("--mix-steps", type=int, default=16, help="steps of 2,048 tokens per mix")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain (blocks of 512)")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    work = args.workdir.resolve()
    seed = smollm2_135m()
    train, heldout = write_data(work / "data")

    folders = {"seed": seed}
    for domain in DOMAINS:
        output = work / f"branch-{domain}"
        if not (output / "final" / "config.json").exists():
            upcycle_cli(
                "finetune",
                f"smollm2-branch-{domain}-cpu",
                f"output={output}",
                f"training.steps={args.branch_steps}",
                "--overwrite",
            )
        folders[domain] = output / "final"

    for name, attention in MIXES.items():
        mixed = work / f"mix-{attention}"
        tuned = work / f"mix-{attention}-tuned"
        if not (tuned / "final" / "config.json").exists():
            upcycle_cli(
                "convert",
                str(seed),
                str(mixed),
                "--method",
                "bam",
                "--expert",
                str(folders["kjv"]),
                "--expert",
                str(folders["python"]),
                "--attention",
                attention,
                "--overwrite",
            )
            recipe = work / f"mix-{attention}.yaml"
            recipe.write_text(
                MIX_RECIPE.format(model=mixed, output=tuned, train=train, heldout=heldout, steps=args.mix_steps)
            )
            upcycle_cli("finetune", str(recipe), "--overwrite")
        folders[name] = tuned / "final"

    tokenizer = AutoTokenizer.from_pretrained(seed)
    blocks = {
        domain: pack_tokens(text_asset(f"{domain}-heldout"), tokenizer, seq_len=512, max_tokens=args.eval_tokens)
        for domain in DOMAINS
    }
    results = {
        "branch_steps": args.branch_steps,
        "mix_steps": args.mix_steps,
        "eval_tokens": {d: b.numel() for d, b in blocks.items()},
        "models": {},
    }
    for name, folder in folders.items():
        results["models"][name] = evaluate(folder, blocks)
        print(f"{name}: {results['models'][name]}", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results: dict) -> None:
    models = results["models"]
    print(
        f"\nHeld-out perplexity (KJV {results['eval_tokens']['kjv']} tokens, "
        f"Python {results['eval_tokens']['python']} tokens); "
        f"branches {results['branch_steps']} steps, mixes {results['mix_steps']} steps of 2,048 tokens"
    )
    print(
        "| model | KJV | Python | FFN tokens to seed / kjv / python expert, on KJV | on Python |"
        "\n|---|---|---|---|---|"
    )
    for name, row in models.items():
        usage = [
            " / ".join(f"{v:.2f}" for v in row[f"ffn_usage_{d}"]) if f"ffn_usage_{d}" in row else "" for d in DOMAINS
        ]
        print(f"| {name} | {row['ppl_kjv']:.2f} | {row['ppl_python']:.2f} | {usage[0]} | {usage[1]} |")
    soft = [(name, row) for name, row in models.items() if "attention_usage_kjv" in row]
    if soft:
        print("\n| mix | attention weight of seed / kjv / python expert, on KJV | on Python |\n|---|---|---|")
        for name, row in soft:
            print(
                f"| {name} | {' / '.join(f'{v:.3f}' for v in row['attention_usage_kjv'])} | "
                f"{' / '.join(f'{v:.3f}' for v in row['attention_usage_python'])} |"
            )


if __name__ == "__main__":
    main()
