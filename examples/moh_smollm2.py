"""The main job: SmolLM2-135M (offline) -> MoH -> short finetune -> eval, with the tables.

    python examples/moh_smollm2.py [--workdir runs/moh-smollm2] [--eval-tokens 16384] [--finetune-steps 8]

1. Converts the dense model with every head active (must equal dense) and at 0.75 active
   heads with each way of choosing the shared heads (the real `upcycle convert`), and
   scores all of them on held-out KJV text (books never used for calibration or tuning).
2. Tunes the best one (contribution-chosen shared heads) for a few steps with the
   `smollm2-moh-cpu` recipe (`upcycle finetune`), then `upcycle eval` puts it beside the
   dense model on the same held-out tokens.
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

import upcycle  # noqa: F401  (registers the upcycled classes)
from upcycle.assets import smollm2_135m, write_kjv_files
from upcycle.data.text import pack_tokens, read_documents
from upcycle.eval.perplexity import perplexity


def upcycle_cli(*args: str) -> None:
    print(f"\n$ upcycle {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "upcycle", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/moh-smollm2"))
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out KJV tokens to score (seq len 512)")
    parser.add_argument("--finetune-steps", type=int, default=8, help="steps of the short finetune (2,048 tokens each)")
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    args = parser.parse_args()
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()

    dense = smollm2_135m()
    train_txt, heldout_txt = write_kjv_files(args.workdir / "data")
    print(f"dense model: {dense}\ncalibration text: {train_txt}\nheld-out text: {heldout_txt}")

    variants = {
        "MoH-1.0 (all heads)": ["--active-heads", "1.0"],
        "MoH-0.75, shared = first": ["--shared-selection", "first"],
        "MoH-0.75, shared = weight-norm": ["--shared-selection", "weight-norm"],
        "MoH-0.75, shared = contribution": ["--shared-selection", "contribution", "--calibration", str(train_txt),
                                            "--calibration-tokens", str(args.calibration_tokens)],
    }
    folders = {"dense": dense}
    for index, (name, flags) in enumerate(variants.items()):
        out = args.workdir / f"moh-{index}"
        upcycle_cli("convert", str(dense), str(out), "--method", "moh", *flags, "--overwrite")
        folders[name] = out
    upcycle_cli("inspect", str(folders["MoH-0.75, shared = contribution"]))

    tokenizer = AutoTokenizer.from_pretrained(dense)
    blocks = pack_tokens(read_documents(heldout_txt), tokenizer, seq_len=512, max_tokens=args.eval_tokens)
    print(f"\nscoring {blocks.numel():,} held-out tokens ({len(blocks)} x 512)", flush=True)
    results = {}
    for name, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        results[name] = perplexity(model, blocks, batch_size=4)
        print(f"  {name}: {results[name]:.3f}", flush=True)
        del model

    base = results["dense"]
    print("\n| model | held-out KJV perplexity | vs dense |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} | {value / base:.2f}x |")
    (args.workdir / "perplexity.json").write_text(json.dumps({"eval_tokens": blocks.numel(), "perplexity": results}, indent=2))

    tuned = args.workdir / "tuned"
    upcycle_cli("finetune", "smollm2-moh-cpu", f"model={folders['MoH-0.75, shared = contribution']}", "convert=null",
                f"output={tuned}", f"training.steps={args.finetune_steps}", "training.save_every=0",
                f"training.eval_every={args.finetune_steps}", "--overwrite")
    upcycle_cli("eval", str(tuned / "final"), "--data", str(heldout_txt), "--compare", str(dense),
                "--tokens", str(args.eval_tokens), "--json", str(args.workdir / "eval-tuned.json"))


if __name__ == "__main__":
    main()
