"""CLIP-MoE end to end on synthetic image-text data (no CLIP weights can be installed offline).

    python examples/clip_moe_synthetic.py [--workdir runs/clip-moe] [--pairs 3000] [--base-epochs 30]

1. Data: rendered shapes (4 shapes x 6 colours x 4 positions x 2 sizes) with captions such as
   "a small red circle at the top left", split by sample into train and held-out.
2. Base: a small CLIP (2 text + 4 vision layers, width 64) trained from scratch on the train
   split (``upcycle finetune`` with a ``type: clip`` recipe, every parameter).
3. MCL: 3 stages of Multistage Contrastive Learning from the base (``type: clip-mcl``): FFN-only,
   cluster-pure batches, each stage an expert.
4. Assemble: CLIP-MoE = base + the 3 stage FFNs (4 experts, top-2, all layers of both towers),
   and the sparse-upcycling baseline = 4 copies of the base FFN (``--upcycle-copies 4``).
5. Tune: CLIP-MoE trains its routers only (the published recipe, load balance over both
   towers); the baseline, whose identical experts routing alone cannot change, trains its FFN
   experts and routers. Same number of steps for both.
6. Zero-shot recall@1 on the held-out split, image->text and text->image (a retrieval counts when
   its caption equals the query's), for the base, the baseline and CLIP-MoE. Writes results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import CLIPConfig, CLIPModel

from upcycle.data.image_text import synthetic_clip_processor, write_synthetic_shapes


def upcycle_cli(*args: str) -> None:
    print(f"\n$ upcycle {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", "upcycle", *args], check=True)


def write_recipe(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def build_base(folder: Path, seed: int) -> Path:
    """A randomly initialised small CLIP with the synthetic set's offline processor."""
    processor = synthetic_clip_processor(32)
    vocab = len(processor.tokenizer)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=64,
    )
    CLIPModel(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("runs/clip-moe"))
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--base-epochs", type=float, default=30)
    parser.add_argument("--mcl-epochs", type=float, default=3)
    parser.add_argument("--tune-epochs", type=float, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = write_synthetic_shapes(work / "data", args.pairs, seed=args.seed)
    data = {"train": str(train), "validation": str(heldout), "max_length": 32}

    base = work / "base"
    if not (base / "final" / "config.json").exists():
        init = build_base(work / "base-init", args.seed)
        recipe = write_recipe(
            work / "base.yaml",
            type="clip",
            description="train the small base CLIP from scratch",
            model=str(init),
            output=str(base),
            data=data,
            trainable="all",
            losses={"label_smoothing": 0.0, "load_balance": 0.0},
            training={
                "epochs": args.base_epochs,
                "batch_size": 64,
                "lr": 1e-3,
                "warmup_steps": 20,
                "weight_decay": 0.1,
                "logit_scale_init": None,
                "seed": args.seed,
                "log_every": 10,
            },
        )
        upcycle_cli("finetune", str(recipe), "--overwrite")
    base = base / "final"

    mcl = work / "mcl"
    if not (mcl / "stage-3" / "config.json").exists():
        upcycle_cli(
            "finetune",
            "clip-mcl",
            f"model={base}",
            f"output={mcl}",
            f"data.train={train}",
            f"data.validation={heldout}",
            "data.max_length=32",
            f"training.epochs={args.mcl_epochs}",
            "training.batch_size=32",
            "training.lr=1e-4",
            "training.warmup_steps=10",
            f"training.seed={args.seed}",
            "--overwrite",
        )
    stages = [mcl / f"stage-{stage}" for stage in (1, 2, 3)]

    upcycle_cli(
        "convert",
        str(base),
        str(work / "clip-moe"),
        "--method",
        "clip-moe",
        *[a for s in stages for a in ("--expert", str(s))],
        "--top-k",
        "2",
        "--overwrite",
    )
    upcycle_cli(
        "convert",
        str(base),
        str(work / "upcycled"),
        "--method",
        "clip-moe",
        "--upcycle-copies",
        "4",
        "--top-k",
        "2",
        "--overwrite",
    )
    tune = {
        "epochs": args.tune_epochs,
        "batch_size": 64,
        "warmup_steps": 10,
        "weight_decay": 0.01,
        "logit_scale_init": None,
        "seed": args.seed,
    }
    for name, trainable, lr in (("clip-moe", "routers", 1e-3), ("upcycled", "all", 1e-4)):
        recipe = write_recipe(
            work / f"{name}-tune.yaml",
            type="clip",
            model=str(work / name),
            output=str(work / f"{name}-tuned"),
            data=data,
            trainable=trainable,
            losses={"label_smoothing": 0.0, "load_balance": 0.01},
            training=tune | {"lr": lr},
        )
        upcycle_cli("finetune", str(recipe), "--overwrite")

    results = {
        "pairs": args.pairs,
        "base": json.loads((work / "base" / "eval.json").read_text())["after"],
        "mcl_stages": [s["validation"] for s in json.loads((mcl / "eval.json").read_text())["stages"]],
        "sparse upcycling (4 copies, FFNs + routers tuned)": json.loads(
            (work / "upcycled-tuned" / "eval.json").read_text()
        )["after"],
        "CLIP-MoE (base + 3 MCL stages, routers tuned)": json.loads(
            (work / "clip-moe-tuned" / "eval.json").read_text()
        )["after"],
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| model | image->text R@1 | text->image R@1 |\n|---|---|---|")
    for name in (
        "base",
        "sparse upcycling (4 copies, FFNs + routers tuned)",
        "CLIP-MoE (base + 3 MCL stages, routers tuned)",
    ):
        print(f"| {name} | {results[name]['image_to_text_r1']:.3f} | {results[name]['text_to_image_r1']:.3f} |")


if __name__ == "__main__":
    main()
