"""Recovery before any tuning: SmolLM2-135M converted with each conversion-time option, on three held-out corpora.

    python examples/conversion_figures.py [--workdir runs/conversion-figures] [--tokens 8192] [--only NAME ...]

Runs the real ``upcycle convert`` once per row below (calibration: 16,384 tokens of the KJV training books), scores
every conversion and the dense model on held-out KJV, held-out Python and the Python reference manual's prose (the
tokens and windows of ``upcycle eval --data ... --compare source``; the dense model is scored once) and prints one
markdown table of perplexity / dense per corpus. Writes WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from upcycle.assets import resolve_text  # noqa: E402

CALIBRATION = ["--calibration", str(resolve_text("asset:kjv-train")), "--calibration-tokens", "16384"]
# the heal mix: half the tokens from the KJV training books, half from the Python training files
MIX = ["--calibration", "asset:kjv-train", "--calibration", "asset:python-train", "--calibration-tokens", "16384"]
MOH = ["--method", "moh", "--active-heads", "0.75", "--shared-selection", "contribution", *CALIBRATION]
ROWS = {
    "moh-query-norm": [*MOH, "--router", "query-norm"],
    "moh-fitted": [*MOH, "--router", "fitted"],
    "moh-fitted-rescale-layer": [*MOH, "--router", "fitted", "--rescale", "layer"],
    "moh-fitted-rescale-channel": [*MOH, "--router", "fitted", "--rescale", "channel"],
    "gqa-1-refit-none": ["--method", "gqa", "--kv-heads", "1", "--refit", "none"],
    "gqa-1-refit-rescale": [
        "--method",
        "gqa",
        "--kv-heads",
        "1",
        "--merge",
        "mean",
        "--refit",
        "rescale",
        *CALIBRATION,
    ],
    "gqa-1-refit-lstsq": ["--method", "gqa", "--kv-heads", "1", "--merge", "mean", "--refit", "lstsq", *CALIBRATION],
    "gqa-1-aligned": ["--method", "gqa", "--kv-heads", "1", "--merge", "aligned", *CALIBRATION],
    "gqa-1-aligned-lstsq": [
        "--method",
        "gqa",
        "--kv-heads",
        "1",
        "--merge",
        "aligned",
        "--refit",
        "lstsq",
        *CALIBRATION,
    ],
    "prune-20-refit-none": ["--method", "prune-heads", "--ratio", "0.2", *CALIBRATION, "--refit", "none"],
    "prune-20-refit-rescale": ["--method", "prune-heads", "--ratio", "0.2", *CALIBRATION, "--refit", "rescale"],
    "prune-20-refit-lstsq": ["--method", "prune-heads", "--ratio", "0.2", *CALIBRATION, "--refit", "lstsq"],
    "mhe-calibrated": ["--method", "mhe", "--variant", "mul", "--init", "calibrated", *CALIBRATION],
    # calibrated on the heal mix
    "mix-moh-fitted": [*MOH[: MOH.index("--calibration")], *MIX, "--router", "fitted"],
    "mix-gqa-1-aligned": ["--method", "gqa", "--kv-heads", "1", "--merge", "aligned", *MIX],
    "mix-gqa-1-aligned-lstsq": ["--method", "gqa", "--kv-heads", "1", "--merge", "aligned", "--refit", "lstsq", *MIX],
    "mix-gqa-1-refit-lstsq": ["--method", "gqa", "--kv-heads", "1", "--merge", "mean", "--refit", "lstsq", *MIX],
    "mix-prune-20-refit-none": ["--method", "prune-heads", "--ratio", "0.2", *MIX, "--refit", "none"],
    "mix-prune-20-refit-lstsq": ["--method", "prune-heads", "--ratio", "0.2", *MIX, "--refit", "lstsq"],
    "mix-mhe-calibrated": ["--method", "mhe", "--variant", "mul", "--init", "calibrated", *MIX],
    # the least-squares refit without the held-out choice of its ridge (the former fixed 1e-3)
    "mix-gqa-1-aligned-lstsq-ridge-0.001": [
        *["--method", "gqa", "--kv-heads", "1", "--merge", "aligned", "--refit", "lstsq", "--refit-ridge", "0.001"],
        *MIX,
    ],
    "mix-prune-20-refit-lstsq-ridge-0.001": [
        *["--method", "prune-heads", "--ratio", "0.2", "--refit", "lstsq", "--refit-ridge", "0.001"],
        *MIX,
    ],
}
CORPORA = ["asset:kjv-heldout", "asset:python-heldout", "asset:python-docs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/conversion-figures"))
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per held-out corpus (windows of 512)")
    parser.add_argument("--only", nargs="*", choices=list(ROWS), help="convert only these rows")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from upcycle.assets import smollm2_135m
    from upcycle.eval.cli import corpus_files
    from upcycle.eval.evaluate import eval_tokens_from_text, evaluate_corpora

    dense = smollm2_135m()
    tokenizer = AutoTokenizer.from_pretrained(dense)
    corpora = {
        name: eval_tokens_from_text(file, tokenizer, args.tokens) for name, file in corpus_files(CORPORA).items()
    }
    reference = {row["data"]: row["perplexity"] for row in evaluate_corpora(dense, corpora, window=512)}
    results = {"tokens": args.tokens, "dense": reference, "rows": {}}
    for name in args.only or ROWS:
        out = args.workdir / name
        started = time.time()
        print(f"\n$ upcycle convert {dense} {out} {' '.join(ROWS[name])}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "upcycle", "convert", str(dense), str(out), *ROWS[name], "--overwrite"], check=True
        )
        seconds = round(time.time() - started)
        scores = {row["data"]: row["perplexity"] for row in evaluate_corpora(out, corpora, window=512)}
        results["rows"][name] = {
            "flags": ROWS[name],
            "convert_seconds": seconds,
            "perplexity": scores,
            "ratio": {corpus: scores[corpus] / reference[corpus] for corpus in corpora},
        }
        print(f"{name}: " + " / ".join(f"{results['rows'][name]['ratio'][c]:.3f}" for c in corpora), flush=True)
        (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n| conversion (perplexity / dense) | {' | '.join(corpora)} |\n|---|{'---|' * len(corpora)}")
    print("| dense (perplexity) | " + " | ".join(f"{reference[c]:.2f}" for c in corpora) + " |")
    for name, row in results["rows"].items():
        print(
            f"| {name} ({row['convert_seconds']} s to convert) | "
            + " | ".join(f"{row['ratio'][c]:.3f}" for c in corpora)
            + " |"
        )


if __name__ == "__main__":
    main()
