"""The main job: SmolLM2-135M (offline) -> MoH -> the heal recipe -> recovery against the dense model.

    python examples/moh_smollm2.py [--workdir runs/moh-smollm2] [--heal-steps 8] [--task-items 100]
                                   [--shared-selection-table]

1. Converts the dense model to MoH with every head active (the real `upcycle convert`) and checks that its logits
   equal the dense model's on held-out KJV text.
2. Heals MoH-0.75 with the `smollm2-moh-heal-cpu` recipe (`upcycle finetune`: its own conversion with the fitted
   router, then a KJV + Python mix with the dense model as teacher), which ends by scoring the untuned, the healed
   and the dense model on three held-out corpora: KJV books, Python files and the Python reference manual's prose,
   a kind of text no recipe trains on. The recovery table (perplexity / dense) is printed.
3. Scores the dense, the converted and the healed model on the bundled lm-evaluation-harness task (`upcycle eval
   --tasks kjv_next_verse`: the true next verse of a held-out KJV book among four), and refreshes the healed model's
   card with them (as its Hub model-index too when every item was scored: --task-items 0).

``--heal-steps`` defaults to 8 of the recipe's 32 steps (2,048 tokens each) and ``--task-items`` to 100 of the
task's 500 items (0: all) to keep the job short on two CPU cores; ``--heal-steps 0`` runs the recipe as written.
``--shared-selection-table`` adds the older table: MoH-0.75 with each way of choosing the shared heads, scored on
held-out KJV before any tuning.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import upcycle  # noqa: F401  (registers the upcycled classes)
from upcycle.assets import smollm2_135m, write_kjv_files
from upcycle.data.bundled_tasks import KJV_NEXT_VERSE as TASK
from upcycle.data.text import pack_tokens, read_documents
from upcycle.eval.perplexity import perplexity


def upcycle_cli(*args: str) -> None:
    print(f"\n$ upcycle {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "upcycle", *args], check=True)


def shared_selection_table(
    dense: Path, tokenizer, train_txt: Path, heldout_txt: Path, args: argparse.Namespace
) -> None:
    """MoH-0.75 with each way of choosing the shared heads (query-norm router).

    Scored on held-out KJV before tuning."""
    variants = {
        "MoH-0.75, shared = first": ["--shared-selection", "first"],
        "MoH-0.75, shared = weight-norm": ["--shared-selection", "weight-norm"],
        "MoH-0.75, shared = contribution": [
            "--shared-selection",
            "contribution",
            "--calibration",
            str(train_txt),
            "--calibration-tokens",
            str(args.calibration_tokens),
        ],
    }
    folders = {"dense": dense}
    for index, (name, flags) in enumerate(variants.items()):
        out = args.workdir / f"moh-{index}"
        upcycle_cli("convert", str(dense), str(out), "--method", "moh", *flags, "--overwrite")
        folders[name] = out
    upcycle_cli("inspect", str(folders["MoH-0.75, shared = contribution"]))
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
    (args.workdir / "perplexity.json").write_text(
        json.dumps({"eval_tokens": blocks.numel(), "perplexity": results}, indent=2)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/moh-smollm2"))
    parser.add_argument(
        "--eval-tokens", type=int, default=16384, help="held-out KJV tokens to score in the shared-selection table"
    )
    parser.add_argument(
        "--heal-steps", type=int, default=8, help="steps of the heal recipe, 2,048 tokens each (0: the recipe's 32)"
    )
    parser.add_argument(
        "--shared-selection-table", action="store_true", help="also score MoH-0.75 with each shared-head choice"
    )
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument(
        "--task-items",
        type=int,
        default=100,
        help="items of the bundled benchmark task scored per model (0: all 500; -1: skip the benchmark table)",
    )
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()

    dense = smollm2_135m()
    train_txt, heldout_txt = write_kjv_files(args.workdir / "data")
    print(f"dense model: {dense}\ncalibration text: {train_txt}\nheld-out text: {heldout_txt}")

    # 1. every head active: the converted model must compute exactly what the dense one does
    tokenizer = AutoTokenizer.from_pretrained(dense)
    everything = args.workdir / "moh-all-heads"
    upcycle_cli("convert", str(dense), str(everything), "--method", "moh", "--active-heads", "1.0", "--overwrite")
    block = pack_tokens(read_documents(heldout_txt), tokenizer, seq_len=512, max_tokens=1024)  # [2, 512]
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=block).logits
            for folder in (dense, everything)
        ]
    difference = (logits[0] - logits[1]).abs().max().item()
    print(f"MoH-1.0 against dense on {block.numel():,} held-out KJV tokens: largest logit difference {difference:.2e}")
    if difference > 1e-4:
        sys.exit(
            f"MoH with every head active differs from the dense model (largest logit difference {difference:.2e})"
        )
    del logits
    if args.shared_selection_table:
        shared_selection_table(dense, tokenizer, train_txt, heldout_txt, args)

    # 2. the heal recipe: its own conversion (MoH-0.75, fitted router), the KJV + Python mix with the dense teacher
    healed = args.workdir / "healed"
    steps = (
        [f"training.steps={args.heal_steps}", f"training.warmup_steps={max(1, args.heal_steps // 8)}"]
        if args.heal_steps
        else []
    )
    upcycle_cli("finetune", "smollm2-moh-heal-cpu", f"output={healed}", *steps, "training.eval_every=0", "--overwrite")
    evaluation = json.loads((healed / "eval.json").read_text())
    after, before = evaluation["recovery"]
    print(
        "\n| held-out corpus | dense | MoH-0.75, before healing | healed | before / dense | healed / dense |"
        "\n|---|---|---|---|---|---|"
    )
    for corpus, entry in after["corpora"].items():
        start = before["corpora"][corpus]
        print(
            f"| {corpus} | {entry['reference_perplexity']:.2f} | {start['perplexity']:.2f} | "
            f"{entry['perplexity']:.2f} | "
            f"{start['ratio']:.3f} | {entry['ratio']:.3f} |"
        )
    print(
        f"\nrecovery (geometric mean of perplexity / dense): {before['mean_ratio']:.3f} before healing, "
        f"{after['mean_ratio']:.3f} healed; "
        "python-docs is prose of a kind no recipe trains on"
    )
    if args.task_items >= 0:
        benchmark_table(healed, args.task_items)
    print(f"main job: {(time.time() - started) / 60:.1f} min")


def benchmark_table(healed: Path, items: int) -> None:
    """The bundled lm-evaluation-harness task (pick the true next verse of a held-out KJV book among four) on the
    dense model, the converted model before healing and the healed model (``items`` of each, 0: all); the healed
    model's card gets the scores (in its model-index when every item was scored)."""
    limit = ["--limit", str(items)] if items else []
    final, converted = healed / "final", healed / "converted"
    upcycle_cli("eval", str(converted), "--tasks", TASK, *limit, "--json", str(converted / "eval.json"))
    upcycle_cli("eval", str(final), "--tasks", TASK, *limit, "--compare", "source", "--json", str(final / "eval.json"))
    upcycle_cli("card", str(final))
    print_benchmark_table(healed, items)


def print_benchmark_table(healed: Path, items: int) -> None:
    """The accuracy table from the eval.json files that ``benchmark_table`` wrote."""
    final, converted = healed / "final", healed / "converted"
    before = json.loads((converted / "eval.json").read_text())["benchmarks"]["models"][0]["scores"][TASK]
    after, dense = (m["scores"][TASK] for m in json.loads((final / "eval.json").read_text())["benchmarks"]["models"])
    print(f"\n{TASK} ({items or 'all 500'} items, 4 choices: chance 0.25)")
    print("\n| model | acc_norm | acc | acc_norm / dense |\n|---|---|---|---|")
    for name, scores in [("dense", dense), ("MoH-0.75, before healing", before), ("healed", after)]:
        print(
            f"| {name} | {scores['acc_norm']:.3f} ± {scores['acc_norm_stderr']:.3f} | "
            f"{scores['acc']:.3f} ± {scores['acc_stderr']:.3f} | {scores['acc_norm'] / dense['acc_norm']:.3f} |"
        )


if __name__ == "__main__":
    main()
