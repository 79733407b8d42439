"""The main job: SmolLM2-135M (offline) -> MoH -> the heal recipe -> recovery against the dense model.

    python examples/moh_smollm2.py [--workdir runs/moh-smollm2] [--eval-tokens 16384] [--heal-steps 24]

1. Converts the dense model with every head active (must equal dense) and at 0.75 active
   heads with each way of choosing the shared heads (the real `upcycle convert`), and
   scores all of them on held-out KJV text (books never used for calibration or tuning).
2. Heals MoH-0.75 with the `smollm2-moh-heal-cpu` recipe (`upcycle finetune`: its own conversion,
   then a KJV + Python mix with the dense model as teacher), which ends by scoring the
   untuned, the healed and the dense model on three held-out corpora: KJV books, Python files
   and the Python reference manual's prose, a kind of text no recipe trains on. The recovery
   table (perplexity / dense) is printed last.
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
    parser.add_argument("--heal-steps", type=int, default=None, help="steps of the heal recipe (default: the recipe's, 2,048 tokens each)")
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

    healed = args.workdir / "healed"
    steps = [f"training.steps={args.heal_steps}"] if args.heal_steps else []
    upcycle_cli("finetune", "smollm2-moh-heal-cpu", f"output={healed}", *steps, "--overwrite")
    evaluation = json.loads((healed / "eval.json").read_text())
    after, before = evaluation["recovery"]
    print("\n| held-out corpus | dense | MoH-0.75, before healing | healed | before / dense | healed / dense |\n|---|---|---|---|---|---|")
    for corpus, entry in after["corpora"].items():
        start = before["corpora"][corpus]
        print(f"| {corpus} | {entry['reference_perplexity']:.2f} | {start['perplexity']:.2f} | {entry['perplexity']:.2f} | "
              f"{start['ratio']:.3f} | {entry['ratio']:.3f} |")
    print(f"\nrecovery (geometric mean of perplexity / dense): {before['mean_ratio']:.3f} before healing, {after['mean_ratio']:.3f} healed; "
          "python-docs is prose of a kind no recipe trains on")


if __name__ == "__main__":
    main()
