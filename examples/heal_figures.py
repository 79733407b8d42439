"""Recovery figures: one conversion healed several ways at the same token budget, measured on held-out text.

    python examples/heal_figures.py smollm2-moh-heal-cpu [--arm NAME=key=value,key=value ...] [--workdir runs/heal]

Converts once with the recipe's ``convert:`` section (into WORKDIR/RECIPE/converted; ``--convert key=value`` changes
it), then runs ``upcycle finetune`` once per arm on that conversion: each arm is the recipe with the arm's overrides
(``losses.distill=0``, ``data.train=asset:kjv-train``, ...), so every arm sees the same token budget. Prints one
markdown table: perplexity / the dense source's on each held-out corpus of the recipe \
(its ``data.validation``), for the
conversion before healing (the step-0 evaluation) and for each arm after it, plus the ratio against tokens of each arm
(the evaluations every ``training.eval_every`` steps). Writes WORKDIR/RECIPE/results.json, keeping the arms an earlier
run of the same conversion measured there.

The default arms: ``lm-kjv`` (the LM loss on KJV alone, as the older ``smollm2-moh-cpu`` recipe tuned), ``lm`` (the LM
loss on the recipe's mix), ``distill`` (KL to the dense model only) and ``lm+distill`` (both, the recipe's own losses).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ARMS = {
    "lm-kjv": "teacher=null,losses.distill=0,losses.distill_hidden=0,"
    "data.train=asset:kjv-train,data.train_weights=null",
    "lm": "teacher=null,losses.distill=0,losses.distill_hidden=0",
    "distill": "losses.lm=0,losses.distill=1",
    "lm+distill": "losses.lm=1,losses.distill=1",
}


def upcycle(*args: str) -> None:
    print(f"\n$ upcycle {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "upcycle", *args], check=True)


def curve(metrics: Path) -> list[dict]:
    """The evaluations of a run: step, tokens and the perplexity ratio to the reference per corpus."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [{"step": r["step"], "tokens": r["tokens"], "ratio": r["recovery"]} for r in rows if "recovery" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a bundled heal recipe (smollm2-moh-heal-cpu, ...) or a recipe file")
    parser.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="an arm: a name and comma-separated key=value overrides of the recipe "
        "(repeat; default: the four arms above)",
    )
    parser.add_argument(
        "--convert", action="append", default=[], metavar="KEY=VALUE", help="override a key of the convert: section"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key in every arm"
    )
    parser.add_argument("--workdir", type=Path, default=Path("runs/heal"))
    args = parser.parse_args()

    arms = dict(arm.split("=", 1) for arm in args.arm) if args.arm else DEFAULT_ARMS
    name = Path(args.recipe).stem
    work = args.workdir / name
    converted = work / "converted"
    common = [
        f"training.eval_every={next((s.split('=')[1] for s in args.set if s.startswith('training.eval_every=')), 8)}",
        "training.save_every=0",
        "compare=source",
        *args.set,
    ]
    if not (converted / "config.json").exists():  # convert once, with the recipe's own conversion code
        from upcycle.train.finetune import prepare_model
        from upcycle.train.loop import process_state
        from upcycle.train.recipe import load_recipe

        recipe = load_recipe(args.recipe, [f"output={work}", *[f"convert.{item}" for item in args.convert]])
        prepare_model(recipe, process_state())
    results = {"recipe": name, "convert": args.convert, "arms": {}}
    previous = work / "results.json"
    if previous.is_file():  # arms measured earlier on the same conversion are kept beside the new ones
        earlier = json.loads(previous.read_text())
        if earlier.get("convert") == args.convert:
            results["arms"] = {arm: result for arm, result in earlier.get("arms", {}).items() if arm not in arms}
    for arm, overrides in arms.items():
        output = work / arm
        started = time.time()
        upcycle(
            "finetune",
            args.recipe,
            f"model={converted}",
            "convert=null",
            f"output={output}",
            *common,
            *[item for item in overrides.split(",") if item],
            "--overwrite",
        )
        results["arms"][arm] = {
            "overrides": overrides,
            "seconds": round(time.time() - started),
            "curve": curve(output / "metrics.jsonl"),
        }
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    first = next(iter(results["arms"].values()))["curve"]
    corpora = list(first[0]["ratio"])
    print(f"\n| {name} | {' | '.join(corpora)} |\n|---|{'---|' * len(corpora)}")
    print("| dense source | " + " | ".join("1.00" for _ in corpora) + " |")
    print("| converted, before healing | " + " | ".join(f"{first[0]['ratio'][c]:.3f}" for c in corpora) + " |")
    for arm, result in results["arms"].items():
        end = result["curve"][-1]
        print(
            f"| healed: {arm} ({end['tokens']:,} tokens, {result['seconds'] // 60} min) | "
            + " | ".join(f"{end['ratio'][c]:.3f}" for c in corpora)
            + " |"
        )
    print("\nratio against tokens (perplexity / dense, per corpus):")
    for arm, result in results["arms"].items():
        points = "; ".join(
            f"{p['tokens']:,}: " + "/".join(f"{p['ratio'][c]:.3f}" for c in corpora) for p in result["curve"]
        )
        print(f"  {arm}: {points}")


if __name__ == "__main__":
    main()
