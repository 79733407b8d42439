"""Training tokens/s of a heal recipe on this machine, per precision and compilation, as ratios to fp32 in one run.

    python bench/heal_speed.py [--recipe smollm2-moh-heal-cpu] [--steps 6] [--skip 2] [--workdir runs/heal-speed]
                               [--arms fp32 bf16 compile compile-bf16]

Converts the recipe's model once (its own ``convert:`` section, into WORKDIR/converted), then runs the recipe's
training loop on it for ``--steps`` steps per arm, each arm a fresh ``upcycle finetune`` process with the same data,
teacher and batch: ``fp32``, ``bf16`` (autocast, ``training.precision=bf16``), ``compile`` (``training.compile=true``:
torch.compile of the student through accelerate) and ``compile-bf16``. Each arm's figure is the median tokens/s of
its steps after the first ``--skip`` (warm-up, and compilation for the compiled arms), read from its metrics.jsonl;
the table gives each as a ratio to fp32's. The end-of-run evaluation is cut to one block per corpus: only the steps
are timed. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS = {
    "fp32": ["training.precision=fp32"],
    "bf16": ["training.precision=bf16"],
    "compile": ["training.precision=fp32", "training.compile=true"],
    "compile-bf16": ["training.precision=bf16", "training.compile=true"],
}


def finetune(recipe: str, overrides: list[str]) -> float:
    """Run ``upcycle finetune RECIPE OVERRIDES`` as a new process; its wall time."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "upcycle", "finetune", recipe, *overrides], check=True)
    return time.time() - started


def step_speeds(metrics: Path, skip: int) -> list[float]:
    """tokens/s of every logged step after the first ``skip``."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["tokens_per_second"] for r in records if "tokens_per_second" in r and r["step"] > skip]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="smollm2-moh-heal-cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2, help="steps left out of the median (warm-up, compilation)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/heal-speed"))
    parser.add_argument("--arms", nargs="*", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args()
    if args.steps <= args.skip:
        parser.error("--steps must be above --skip")

    work = args.workdir.resolve()
    converted = work / "prepare" / "converted"
    if not (converted / "config.json").exists():  # the recipe's own conversion, once (no training step)
        finetune(args.recipe, [f"output={work / 'prepare'}", "--stop-after", "1", "--overwrite"])
    common = [
        f"model={converted}",
        "convert=null",
        f"training.steps={args.steps}",
        "training.eval_every=0",
        "training.save_every=0",
        f"training.warmup_steps={min(1, args.steps - 1)}",
        "data.validation_tokens=512",
    ]
    results = {}
    for arm in args.arms:
        output = work / arm
        seconds = finetune(args.recipe, [*common, *ARMS[arm], f"output={output}", "--overwrite"])
        speeds = step_speeds(output / "metrics.jsonl", args.skip)
        results[arm] = {"tokens_per_second": statistics.median(speeds), "steps": speeds, "process_seconds": seconds}
        print(f"{arm}: {results[arm]['tokens_per_second']:.0f} tokens/s (median of {len(speeds)} steps)", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    baseline = results.get("fp32", {}).get("tokens_per_second")
    print(f"\n{args.recipe}: training tokens/s per arm, median of steps {args.skip + 1}-{args.steps}")
    print("| arm | tokens/s | / fp32 | process wall s |\n|---|---|---|---|")
    for arm, row in results.items():
        ratio = f"{row['tokens_per_second'] / baseline:.2f}" if baseline else "-"
        print(f"| {arm} | {row['tokens_per_second']:.0f} | {ratio} | {row['process_seconds']:.0f} |")


if __name__ == "__main__":
    main()
