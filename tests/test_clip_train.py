"""CLIP recipes: MCL pseudo-labels, cluster-pure batches, FFN-only stages, router-only training, drop-in results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_clip
from safetensors.torch import load_file
from test_image_text import tiny_clip_processor

from upcycle.convert import convert_checkpoint
from upcycle.data.image_text import write_synthetic_shapes
from upcycle.errors import UpcycleError
from upcycle.methods.clip_moe import ClipMoEOptions
from upcycle.train import clip as clip_training
from upcycle.train.clip import cluster_batches, joint_labels, run_clip_recipe
from upcycle.train.recipe import load_recipe


def test_joint_and_accumulated_labels_follow_the_formula():
    image, text = torch.tensor([0, 1, 2, 2]), torch.tensor([2, 0, 1, 2])
    first = joint_labels(image, text, 3, None)
    assert first.tolist() == [3 * t + i for i, t in zip(image.tolist(), text.tolist())] == [6, 1, 5, 8]
    second = joint_labels(torch.tensor([1, 1, 0, 0]), torch.tensor([0, 2, 2, 1]), 3, first)
    assert second.tolist() == [9 * p + 3 * t + i for p, i, t in zip(first.tolist(), [1, 1, 0, 0], [0, 2, 2, 1])]


def test_cluster_batches_are_pure_and_cover_the_usable_pairs():
    labels = [0] * 7 + [1] * 5 + [2] * 1 + [3] * 4
    batches, unused = cluster_batches(labels, batch_size=3, seed=0)
    assert all(len({labels[i] for i in batch}) == 1 and 2 <= len(batch) <= 3 for batch in batches)
    used = sorted(i for batch in batches for i in batch)
    assert (
        unused == 3 and len(used) == len(labels) - 3 and len(set(used)) == len(used)
    )  # label 2 (alone), one leftover each of labels 0 and 3
    assert (
        batches == cluster_batches(labels, batch_size=3, seed=0)[0] != cluster_batches(labels, batch_size=3, seed=1)[0]
    )


@pytest.fixture
def clip_workspace(tmp_path):
    base = build_clip(tmp_path / "base")
    tiny_clip_processor().save_pretrained(base)
    train, heldout = write_synthetic_shapes(tmp_path / "shapes", count=60, seed=0)
    return tmp_path, base, train, heldout


def write_recipe(path: Path, **fields) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def test_mcl_stages_train_only_ffns_on_cluster_pure_batches(clip_workspace, monkeypatch):
    tmp_path, base, train, heldout = clip_workspace
    seen: list[tuple[list[list[int]], list[int]]] = []
    original = clip_training.cluster_batches

    def spy(labels, batch_size, seed):
        batches, unused = original(labels, batch_size, seed)
        seen.append((batches, list(labels)))
        return batches, unused

    monkeypatch.setattr(clip_training, "cluster_batches", spy)
    recipe = write_recipe(
        tmp_path / "mcl.yaml",
        type="clip-mcl",
        model=str(base),
        output=str(tmp_path / "mcl"),
        trainable="ffn",
        data={"train": str(train), "validation": str(heldout), "max_length": 32},
        mcl={"stages": 2, "clusters": 2},
        training={"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0, "log_every": 1},
    )
    last = run_clip_recipe(load_recipe(str(recipe)))
    assert last == tmp_path / "mcl" / "stage-2"
    before = load_file(base / "model.safetensors")
    for stage in (1, 2):
        after = load_file(tmp_path / "mcl" / f"stage-{stage}" / "model.safetensors")
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert changed and all(".mlp." in name or name == "logit_scale" for name in changed), sorted(changed)[:5]
        assert (tmp_path / "mcl" / f"stage-{stage}" / "processor_config.json").exists()
    assert len(seen) == 2
    for batches, labels in seen:
        assert batches and all(len({labels[i] for i in batch}) == 1 for batch in batches)
    first = json.loads((tmp_path / "mcl" / "stage-1" / "mcl_labels.json").read_text())["labels"]
    second = json.loads((tmp_path / "mcl" / "stage-2" / "mcl_labels.json").read_text())["labels"]
    assert first == seen[0][1] and second == seen[1][1]
    assert all(0 <= value < 4 for value in first) and all(
        s // 4 == f for f, s in zip(first, second)
    )  # l_2 = 4 l_1 + c_2
    report = json.loads((tmp_path / "mcl" / "eval.json").read_text())
    assert [s["stage"] for s in report["stages"]] == [0, 1, 2]
    assert all(0 <= s["validation"]["image_to_text_r1"] <= 1 for s in report["stages"])
    records = [json.loads(line) for line in (tmp_path / "mcl" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"stage 1", "stage 2"}


def test_router_training_changes_only_the_routers(clip_workspace):
    tmp_path, base, train, heldout = clip_workspace
    stages = [build_clip(tmp_path / f"stage{i}", seed=i, ffn_noise=0.05, base=base) for i in (1, 2, 3)]
    convert_checkpoint(str(base), tmp_path / "moe", "clip-moe", ClipMoEOptions(experts=[str(s) for s in stages]))
    recipe = write_recipe(
        tmp_path / "router.yaml",
        type="clip",
        model=str(tmp_path / "moe"),
        output=str(tmp_path / "router"),
        trainable="routers",
        data={"train": str(train), "validation": str(heldout), "max_length": 32},
        losses={"load_balance": 0.01, "label_smoothing": 0.0},
        training={"epochs": 1, "batch_size": 16, "lr": 1e-2, "warmup_steps": 0, "logit_scale_init": None},
    )
    final = run_clip_recipe(load_recipe(str(recipe)))
    before, after = load_file(tmp_path / "moe" / "model.safetensors"), load_file(final / "model.safetensors")
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.endswith(".mlp.router.weight")}
    records = [json.loads(line) for line in (tmp_path / "router" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["aux_loss"] > 0 for r in records)
    from transformers import AutoModel

    import upcycle  # noqa: F401

    model = AutoModel.from_pretrained(final)
    assert type(model).__name__ == "UpcycleCLIPModel" and (final / "modeling_upcycle.py").exists()


def test_clip_recipe_errors(clip_workspace):
    tmp_path, base, train, heldout = clip_workspace
    recipe = write_recipe(
        tmp_path / "bad.yaml",
        type="clip-mcl",
        model=str(base),
        output=str(tmp_path / "o"),
        trainable="all",
        data={"train": str(train)},
    )
    with pytest.raises(UpcycleError, match="trains the FFNs only"):
        load_recipe(str(recipe))
    recipe = write_recipe(
        tmp_path / "bad.yaml",
        type="clip",
        model=str(base),
        output=str(tmp_path / "o"),
        trainable="routers",
        data={"train": str(train), "max_length": 32},
    )
    with pytest.raises(UpcycleError, match="selects no parameter"):
        run_clip_recipe(load_recipe(str(recipe)))

    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"auto_map": {"AutoModel": "modeling_evil.EvilModel"}}))
    recipe = write_recipe(
        tmp_path / "bad.yaml", type="clip", model=str(base), output=str(tmp_path / "o2"), data={"train": str(train)}
    )
    with pytest.raises(UpcycleError, match=r"^model .*modeling_evil\.py.*trust_remote_code: true"):
        run_clip_recipe(load_recipe(str(recipe)))
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_two_process_mcl_matches_one_process(clip_workspace):
    """Under two processes every global batch is one cluster split in two, and the stage equals the one-process
    stage."""
    import os
    import subprocess
    import sys

    tmp_path, base, train, heldout = clip_workspace
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    stages = {}
    for processes in (1, 2):
        recipe = write_recipe(
            tmp_path / f"mcl{processes}.yaml",
            type="clip-mcl",
            model=str(base),
            output=str(tmp_path / f"mcl{processes}"),
            trainable="ffn",
            data={"train": str(train), "max_length": 32},
            mcl={"stages": 1, "clusters": 2},
            training={"epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_steps": 0},
        )
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_machines",
            "1",
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(29600 + processes),
        ] + (["--multi_gpu"] if processes > 1 else [])
        result = subprocess.run(
            [*launch, "-m", "upcycle", "finetune", str(recipe)], env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        stages[processes] = load_file(tmp_path / f"mcl{processes}" / "stage-1" / "model.safetensors")
        report = json.loads((tmp_path / f"mcl{processes}" / "eval.json").read_text())
        assert report["processes"] == processes
    before = load_file(base / "model.safetensors")
    changed = [name for name in before if not torch.equal(before[name], stages[2][name])]
    assert changed and all(".mlp." in name or name == "logit_scale" for name in changed)
    for name in stages[1]:
        torch.testing.assert_close(
            stages[2][name], stages[1][name], atol=1e-4, rtol=1e-3
        )  # all-reduce order; a wrong plan is off by ~5e-3
