"""Head pruning on real models: gradient importance against random, as in the README.

    python examples/prune_heads_figures.py [--workdir runs/prune-heads] [--eval-tokens 8192]

SmolLM2-135M (30 layers x 3 KV groups; the units are KV groups): held-out KJV perplexity at
ratios 0.1, 0.2, 0.3, 0.5 with gradient importance and with random importance (mean of 3
seeds). all-MiniLM-L6-v2 (6 layers x 12 heads): mean cosine similarity of the pruned model's
sentence embeddings to the original's over 200 held-out KJV sentences. Writes
results.json and prune_heads.png into the workdir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import upcycle  # noqa: F401  (registers upcycled classes)
from upcycle.assets import kjv_heldout_sentences, kjv_splits, minilm_l6_v2, smollm2_135m, write_kjv_files
from upcycle.convert import convert_checkpoint
from upcycle.data.text import pack_tokens
from upcycle.eval.embeddings import mean_cosine, sentence_embeddings
from upcycle.eval.perplexity import perplexity
from upcycle.methods.prune_heads import PruneHeadsOptions

RATIOS = (0.1, 0.2, 0.3, 0.5)
SEEDS = (0, 1, 2)


def prune(src: Path, out: Path, ratio: float, importance: str, seed: int, calibration: Path) -> Path:
    options = PruneHeadsOptions(
        ratio=ratio,
        importance=importance,
        seed=seed,
        calibration=calibration if importance == "gradient" else None,
        calibration_tokens=8192,
    )
    convert_checkpoint(str(src), out, "prune-heads", options, overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/prune-heads"))
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    train_txt, _ = write_kjv_files(args.workdir / "data")
    results: dict = {"smollm2": {}, "minilm": {}}

    smollm2 = smollm2_135m()
    blocks = pack_tokens(
        kjv_splits()[1], AutoTokenizer.from_pretrained(smollm2), seq_len=512, max_tokens=args.eval_tokens
    )
    results["smollm2"]["dense"] = perplexity(
        AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32), blocks
    )
    sentences = kjv_heldout_sentences(200)
    reference = sentence_embeddings(minilm_l6_v2(), sentences)
    for ratio in args.ratios:
        for model, src in [("smollm2", smollm2), ("minilm", minilm_l6_v2())]:
            if model not in args.models:
                continue
            row = {}
            for importance, seeds in [("gradient", (0,)), ("random", SEEDS)]:
                scores = []
                for seed in seeds:
                    out = prune(
                        src, args.workdir / f"{model}-{ratio}-{importance}-{seed}", ratio, importance, seed, train_txt
                    )
                    if model == "smollm2":
                        scores.append(
                            perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), blocks)
                        )
                    else:
                        scores.append(mean_cosine(sentence_embeddings(out, sentences), reference))
                row[importance] = sum(scores) / len(scores)
                row[f"{importance}_runs"] = scores
            results[model][str(ratio)] = row
            print(f"{model} ratio {ratio}: {row}", flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    if set(args.models) == {"smollm2", "minilm"} and args.ratios == list(RATIOS):
        plot(results, args.workdir / "prune_heads.png")
        print_tables(results)


def print_tables(results: dict) -> None:
    print(f"\nSmolLM2-135M held-out KJV perplexity (dense {results['smollm2']['dense']:.2f})")
    print("| ratio | gradient | random (mean of 3) | gradient better |\n|---|---|---|---|")
    for ratio in RATIOS:
        row = results["smollm2"][str(ratio)]
        print(f"| {ratio} | {row['gradient']:.2f} | {row['random']:.2f} | {row['gradient'] < row['random']} |")
    print("\nall-MiniLM-L6-v2 mean cosine to the original embeddings (200 held-out KJV sentences)")
    print("| ratio | gradient | random (mean of 3) | gradient better |\n|---|---|---|---|")
    for ratio in RATIOS:
        row = results["minilm"][str(ratio)]
        print(f"| {ratio} | {row['gradient']:.4f} | {row['random']:.4f} | {row['gradient'] > row['random']} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, model, label in [
        (left, "smollm2", "held-out perplexity (log)"),
        (right, "minilm", "mean cosine to original"),
    ]:
        for importance, style in [("gradient", "o-"), ("random", "s--")]:
            axis.plot(RATIOS, [results[model][str(r)][importance] for r in RATIOS], style, label=importance)
        axis.set_xlabel("fraction of units pruned")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    left.set_yscale("log")
    left.axhline(results["smollm2"]["dense"], color="grey", lw=0.8)
    left.set_title("SmolLM2-135M (KV groups)")
    right.set_title("all-MiniLM-L6-v2 (heads)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
