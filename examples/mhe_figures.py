"""MHE on real models, as in the README: conversion quality before healing.

    python examples/mhe_figures.py [--workdir runs/mhe] [--eval-tokens 16384] [--calibration-tokens 16384]

SmolLM2-135M (30 layers, 9 query heads, 3 KV heads of 64): held-out KJV perplexity of the dense
model and of MHE-mul and MHE-add with the svd (weights only) and calibrated (least squares on
KJV-train activations) inits, with the attention parameter saving and the mean relative
reconstruction errors from the conversion report. all-MiniLM-L6-v2 (6 layers x 12 heads): mean
cosine similarity of the converted model's sentence embeddings to the original's on 200
held-out KJV sentences. Writes results.json into the workdir. Healing: the
``smollm2-mhe-cpu`` recipe (see the README).
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
from upcycle.methods.mhe import MHEOptions

SETTINGS = [("mul", "svd"), ("mul", "calibrated"), ("add", "svd"), ("add", "calibrated")]


def summary(report: dict) -> dict:
    """Attention parameters and mean reconstruction errors of a conversion report."""
    layers = report["reconstruction_error"]["layers"]
    mean = {
        key: sum(layer[key] for layer in layers) / len(layers)
        for key in ("q_proj", "k_proj", "v_proj", "attention_output")
    }
    return {"attention_parameters": report["attention_parameters"], "mean_error": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/mhe"))
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    train_txt, _ = write_kjv_files(args.workdir / "data")
    results: dict = {}

    if "smollm2" in args.models:
        smollm2 = smollm2_135m()
        blocks = pack_tokens(
            kjv_splits()[1], AutoTokenizer.from_pretrained(smollm2), seq_len=512, max_tokens=args.eval_tokens
        )
        results["smollm2"] = {
            "eval_tokens": blocks.numel(),
            "dense": perplexity(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32), blocks),
        }
        for variant, init in SETTINGS:
            out = args.workdir / f"smollm2-{variant}-{init}"
            report = convert_checkpoint(
                str(smollm2), out, "mhe", MHEOptions(variant, init, train_txt, args.calibration_tokens), overwrite=True
            )
            ppl = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), blocks)
            results["smollm2"][f"{variant}-{init}"] = {"perplexity": ppl, **summary(report)}
            print(f"SmolLM2 MHE-{variant} {init}: perplexity {ppl:.2f}", flush=True)

    if "minilm" in args.models:
        sentences = kjv_heldout_sentences(200)
        reference = sentence_embeddings(minilm_l6_v2(), sentences)
        results["minilm"] = {"sentences": len(sentences)}
        for variant, init in SETTINGS:
            out = args.workdir / f"minilm-{variant}-{init}"
            report = convert_checkpoint(
                str(minilm_l6_v2()),
                out,
                "mhe",
                MHEOptions(variant, init, train_txt, args.calibration_tokens),
                overwrite=True,
            )
            cosine = mean_cosine(sentence_embeddings(out, sentences), reference)
            results["minilm"][f"{variant}-{init}"] = {"cosine": cosine, **summary(report)}
            print(f"MiniLM MHE-{variant} {init}: mean cosine {cosine:.4f}", flush=True)

    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print_tables(results)


def print_tables(results: dict) -> None:
    errors = "| q / k / v error | attn-out error |"
    if "smollm2" in results:
        smollm2 = results["smollm2"]
        print(
            f"\nSmolLM2-135M, held-out KJV perplexity ({smollm2['eval_tokens']} tokens; dense {smollm2['dense']:.2f})"
        )
        print(f"| MHE | init | attention params | perplexity {errors}\n|---|---|---|---|---|---|")
        for variant, init in SETTINGS:
            row = smollm2[f"{variant}-{init}"]
            print(_row(variant, init, row, f"{row['perplexity']:.2f}"))
    if "minilm" in results:
        print(
            f"\nall-MiniLM-L6-v2, mean cosine to the original embeddings "
            f"({results['minilm']['sentences']} held-out KJV sentences)"
        )
        print(f"| MHE | init | attention params | cosine {errors}\n|---|---|---|---|---|---|")
        for variant, init in SETTINGS:
            row = results["minilm"][f"{variant}-{init}"]
            print(_row(variant, init, row, f"{row['cosine']:.4f}"))


def _row(variant: str, init: str, row: dict, score: str) -> str:
    params, error = row["attention_parameters"], row["mean_error"]
    return (
        f"| {variant} | {init} | {params['before']:,} -> {params['after']:,} (-{params['saved_percent']}%) | {score} "
        f"| {error['q_proj']:.3f} / {error['k_proj']:.3f} / {error['v_proj']:.3f} | {error['attention_output']:.3f} |"
    )


if __name__ == "__main__":
    main()
