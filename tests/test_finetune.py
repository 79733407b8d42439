"""upcycle finetune: recipes, the accelerate loop, LoRA, resume, several processes, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_dense
from safetensors.torch import load_file
from typer.testing import CliRunner

from upcycle.cli import app
from upcycle.convert import convert_checkpoint
from upcycle.errors import UpcycleError
from upcycle.methods.moh import MoHOptions
from upcycle.train.finetune import run_finetune
from upcycle.train.loop import BatchPlan
from upcycle.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense")
    convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(router="learned", active_heads=0.75))
    return tmp_path, dense, calibration_file


def write_recipe(folder: Path, model: Path, data: Path, **changes) -> Path:
    recipe = {
        "model": str(model),
        "output": str(folder / "run"),
        "data": {"train": str(data), "seq_len": 16, "validation_fraction": 0.1, "validation_tokens": 128},
        "training": {
            "steps": 4,
            "global_batch_tokens": 64,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 1,
            "seed": 3,
            "eval_every": 2,
        },
    }
    for key, value in changes.items():
        node = recipe
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for file in sorted((run / "final").glob("*.safetensors")):
        weights |= load_file(file)
    return weights


# ---- recipe validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"training__lrr": 1.0}, "'training.lrr' is unknown"),
        ({"training__steps": "ten"}, "'training.steps'"),
        ({"trainable": "some"}, "'trainable'"),
        ({"data__train": "/no/such/file.txt"}, "'data.train': /no/such/file.txt does not exist"),
    ],
)
def test_recipe_errors_name_the_key(workspace, change, needle):
    tmp_path, _, data = workspace
    path = write_recipe(tmp_path, tmp_path / "moh", data, **change)
    with pytest.raises(UpcycleError, match=None) as error:
        load_recipe(str(path))
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_recipe_overrides_and_missing_key(workspace):
    tmp_path, _, data = workspace
    path = write_recipe(tmp_path, tmp_path / "moh", data)
    recipe = load_recipe(str(path), ["training.lr=3e-4", "trainable=lora", "lora.r=4"])
    assert recipe.training.lr == 3e-4 and recipe.trainable == "lora" and recipe.lora.r == 4
    with pytest.raises(UpcycleError, match="'model' is required"):
        tree = yaml.safe_load(path.read_text())
        del tree["model"]
        path.write_text(yaml.safe_dump(tree))
        load_recipe(str(path))
    with pytest.raises(UpcycleError, match="not key=value"):
        load_recipe(str(write_recipe(tmp_path, tmp_path / "moh", data)), ["training.lr"])


def test_bundled_recipes_validate_and_are_listed():
    names = [p.stem for p in (ROOT / "upcycle" / "recipes").glob("*.yaml") if not p.stem.startswith("fsdp")]
    assert {"moh-llama3-8b", "smollm2-moh-cpu", "smollm2-dense-cpu"} <= set(names)
    paper = load_recipe("moh-llama3-8b")
    assert paper.training.global_batch_tokens == 16 * 2**20 and paper.data.seq_len == 8192
    assert (
        paper.training.lr,
        paper.training.min_lr,
        paper.training.warmup_steps,
        paper.training.weight_decay,
        paper.training.grad_clip,
    ) == (2e-5, 1e-6, 50, 0.1, 1.0)
    assert paper.losses.load_balance == 0.01 and paper.convert.active_heads == 0.75
    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0 and "smollm2-moh-cpu" in result.stdout


def test_cli_bad_recipe_is_one_line(workspace):
    tmp_path, _, data = workspace
    path = write_recipe(tmp_path, tmp_path / "moh", data, training__steps=-1)
    result = CliRunner().invoke(app, ["finetune", str(path)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "training.steps" in result.stderr


def test_batch_plan_splits_global_batch():
    plan = BatchPlan(sequences_per_step=8, micro_batch_size=2, accumulation=2, world_size=2)
    both = [plan.step_indices(3, 50, seed=0, rank=r) for r in (0, 1)]
    single = BatchPlan(8, 2, 4, 1).step_indices(3, 50, seed=0, rank=0)
    assert sorted(torch.cat([torch.cat(b) for b in both]).tolist()) == sorted(torch.cat(single).tolist())
    assert len(set(torch.cat([torch.cat(b) for b in both]).tolist())) == 8


# ---- training --------------------------------------------------------------------------


def test_finetune_outputs_load_and_report(workspace):
    tmp_path, _, data = workspace
    final = run_finetune(load_recipe(str(write_recipe(tmp_path, tmp_path / "moh", data))))
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2, 3, 4]  # step 0: the evaluation before tuning
    assert "val_loss" in lines[0] and "loss" not in lines[0]
    lines = lines[1:]
    assert all({"loss", "lm_loss", "aux_loss", "lr", "tokens_per_second", "tokens"} <= m.keys() for m in lines)
    assert all(m["loss"] == m["lm_loss"] for m in lines)  # the LM loss alone is the objective by default
    assert lines[-1]["tokens"] == 4 * 64 and "val_loss" in lines[1] and lines[0]["aux_loss"] > 0
    usage = torch.tensor(lines[1]["head_usage"])  # [layers, heads] on the validation blocks
    assert usage.shape == (2, 8) and abs(usage.mean().item() - 0.75) < 1e-3
    for png in ["loss.png", "head_usage.png"]:
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((run / "eval.json").read_text())
    assert [r["name"] for r in results["results"]] == ["before tuning", "after tuning"] and results["recovery"] is None
    card = (final / "README.md").read_text()
    assert "## Fine-tuning" in card and "## Evaluation" in card
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "UpcycleLlamaForCausalLM"
    config = json.loads((final / "config.json").read_text())  # self-describing: loads with trust_remote_code too
    assert (
        config["auto_map"]["AutoModelForCausalLM"] == "modeling_upcycle.UpcycleLlamaForCausalLM"
        and config["upcycle"]["method"] == "moh"
    )
    assert all(
        (final / f).exists() for f in ["modeling_upcycle.py", "routers.py", "tokenizer.json", "upcycle_report.json"]
    )
    with pytest.raises(UpcycleError, match="already exists"):
        run_finetune(load_recipe(str(tmp_path / "recipe.yaml")))
    before = load_file(tmp_path / "moh" / "model.safetensors")
    after = final_weights(run)
    assert set(after) == set(before)
    assert not torch.equal(
        after["model.layers.0.self_attn.head_router.routed_proj.weight"],
        before["model.layers.0.self_attn.head_router.routed_proj.weight"],
    )


def step_gradients(recipe_path: Path) -> dict[str, torch.Tensor]:
    """Gradients of one trainer step (captured just before the optimizer applies them)."""
    from transformers import AutoTokenizer

    from upcycle.train.finetune import build_data
    from upcycle.train.loop import Trainer, process_state

    recipe = load_recipe(str(recipe_path))
    tokenizer = AutoTokenizer.from_pretrained(recipe.model)
    trainer = Trainer(recipe, Path(recipe.model), build_data(recipe, tokenizer, process_state()))
    grads = {}
    trainer.optimizer.step = lambda *a, **k: grads.update(
        {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    )
    trainer.train_step()
    return grads


@pytest.mark.parametrize("router", ["learned", "query-norm"])
def test_balance_loss_reaches_router_and_query_gradients(tmp_path, calibration_file, router):
    dense = build_dense(tmp_path / "dense")
    convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(router=router, active_heads=0.75))
    grads = []
    for weight in [0.0, 1.0]:
        folder = tmp_path / f"w{weight}"
        folder.mkdir()
        grads.append(
            step_gradients(write_recipe(folder, tmp_path / "moh", calibration_file, losses={"load_balance": weight}))
        )
    if router == "learned":
        name = "model.layers.1.self_attn.head_router.routed_proj.weight"
        assert not torch.allclose(grads[0][name], grads[1][name])
    else:  # the straight-through estimator carries the balance term into W_q of the routed heads
        name = "model.layers.1.self_attn.q_proj.weight"
        head_rows = lambda g: g.view(8, 8, -1)  # noqa: E731  [heads, head_dim, hidden]
        changed = (head_rows(grads[0][name]) - head_rows(grads[1][name])).abs().sum(dim=(1, 2)) > 1e-9
        plan = json.loads((tmp_path / "moh" / "config.json").read_text())["upcycle"]["layers"][1]["head_gate"]
        assert changed[plan["routed_heads"]].all()


def test_routers_only_and_lora(workspace):
    tmp_path, _, data = workspace
    before = load_file(tmp_path / "moh" / "model.safetensors")
    for trainable in ["routers", "lora"]:
        folder = tmp_path / trainable
        folder.mkdir()
        checkpointing = trainable == "lora"  # gradient checkpointing is an option of any run
        run_finetune(
            load_recipe(
                str(
                    write_recipe(
                        folder,
                        tmp_path / "moh",
                        data,
                        trainable=trainable,
                        training__steps=2,
                        training__gradient_checkpointing=checkpointing,
                    )
                )
            )
        )
        after = final_weights(folder / "run")
        assert set(after) == set(before)  # LoRA merged on save: no adapter tensors
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert any(".head_router." in name for name in changed)
        if trainable == "routers":
            assert all(".head_router." in name for name in changed)
        else:
            assert any(name.endswith("q_proj.weight") for name in changed)
            assert not any("embed_tokens" in name or "norm" in name for name in changed)


def test_query_norm_routers_only_is_refused(tmp_path, calibration_file):
    dense = build_dense(tmp_path / "dense")
    convert_checkpoint(str(dense), tmp_path / "moh", "moh", MoHOptions(active_heads=0.75))
    recipe = load_recipe(str(write_recipe(tmp_path, tmp_path / "moh", calibration_file, trainable="routers")))
    with pytest.raises(UpcycleError, match="no router parameters"):
        run_finetune(recipe)


def test_resume_equals_uninterrupted(workspace):
    tmp_path, _, data = workspace
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir(), split.mkdir()
    run_finetune(
        load_recipe(str(write_recipe(straight, tmp_path / "moh", data, training__steps=10, training__eval_every=0)))
    )
    recipe = load_recipe(str(write_recipe(split, tmp_path / "moh", data, training__steps=10, training__eval_every=0)))
    assert run_finetune(recipe, stop_after=5) is None
    assert (split / "run" / "checkpoints" / "step-0000005").is_dir()
    with pytest.raises(UpcycleError, match="--resume"):
        run_finetune(recipe)
    run_finetune(recipe, resume=True)
    a, b = final_weights(straight / "run"), final_weights(split / "run")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    lines = [json.loads(line) for line in (split / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 11))


DRIVER = """
import sys, torch
from accelerate import PartialState
from upcycle.train.finetune import run_finetune
from upcycle.train.recipe import load_recipe
import upcycle.train.loop as loop

saved = loop.Trainer.save_final
def save_final(self):
    model = self.accelerator.unwrap_model(self.model)
    path = sys.argv[2] + f"/rank{self.accelerator.process_index}.pt"
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    return saved(self)
loop.Trainer.save_final = save_final
run_finetune(load_recipe(sys.argv[1]))
"""


@pytest.mark.slow
def test_two_processes_match_one(workspace):
    tmp_path, _, data = workspace
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = {}
    for processes in [1, 2]:
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        recipe = write_recipe(folder, tmp_path / "moh", data, training__steps=3, training__eval_every=0)
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_machines",
            "1",
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(29500 + processes),
        ]
        if processes > 1:
            launch.append("--multi_gpu")
        result = subprocess.run(
            [*launch, str(driver), str(recipe), str(folder)], env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = [torch.load(folder / f"rank{r}.pt") for r in range(processes)]
    rank0, rank1 = runs[2]
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], runs[1][0][name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_the_bundled_fsdp_config_on_two_cpu_processes_saves_resumes_and_equals_one_process(workspace):
    """recipes/fsdp-8gpu.yaml with 2 processes on the CPU: accelerate runs FSDP configs as DDP there (it enables FSDP
    only for GPU-like devices), which upcycle says; the run stops, resumes and ends where one process does."""
    from upcycle.train.recipe import RECIPES_DIR

    tmp_path, _, data = workspace
    config = yaml.safe_load((RECIPES_DIR / "fsdp-8gpu.yaml").read_text())
    assert config["distributed_type"] == "FSDP"
    config |= {"num_processes": 2, "mixed_precision": "no", "use_cpu": True}
    (tmp_path / "fsdp-cpu.yaml").write_text(yaml.safe_dump(config))
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    folders = {name: tmp_path / name for name in ("one", "two")}
    recipes = {}
    for name, folder in folders.items():
        folder.mkdir()
        recipes[name] = write_recipe(folder, tmp_path / "moh", data, training__steps=4, training__eval_every=0)
    run_finetune(load_recipe(str(recipes["one"])))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp-cpu.yaml")]
    for port, extra in ((29531, ["--stop-after", "2"]), (29532, ["--resume"])):
        result = subprocess.run(
            [*launch, "--main_process_port", str(port), "-m", "upcycle", "finetune", str(recipes["two"]), *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "asks for FSDP, but accelerate runs it as MULTI_CPU" in result.stderr
    assert (folders["two"] / "run" / "checkpoints" / "step-0000002").is_dir()
    one, two = final_weights(folders["one"] / "run"), final_weights(folders["two"] / "run")
    assert set(one) == set(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_fsdp2_full_sharding_on_two_cpu_processes_saves_shards_resumes_and_equals_one_process(workspace):
    """The bundled FSDP config (FSDP2, full sharding, sharded state dict) with accelerate's device gate lifted by a
    test-only sitecustomize (tests/fsdp_on_cpu): training is sharded, each checkpoint holds accelerate's per-rank
    model and optimizer shards, the run resumes from them, and final/ (the weights gathered from every process)
    equals a one-process run. LoRA under FSDP is refused before training."""
    from upcycle.train.recipe import RECIPES_DIR

    tmp_path, _, data = workspace
    config = yaml.safe_load((RECIPES_DIR / "fsdp-8gpu.yaml").read_text())
    config |= {"num_processes": 2, "mixed_precision": "no", "use_cpu": True}
    (tmp_path / "fsdp-cpu.yaml").write_text(yaml.safe_dump(config))
    env = os.environ | {
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT / 'tests' / 'fsdp_on_cpu'}{os.pathsep}{ROOT}",
        "UPCYCLE_TEST_FSDP_ON_CPU": "1",
    }
    folders = {name: tmp_path / name for name in ("one", "two", "lora")}
    recipes = {}
    for name, folder in folders.items():
        folder.mkdir()
        extra = {"trainable": "lora"} if name == "lora" else {}
        recipes[name] = write_recipe(
            folder, tmp_path / "moh", data, training__steps=4, training__eval_every=0, **extra
        )
    run_finetune(load_recipe(str(recipes["one"])))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp-cpu.yaml")]

    def finetune(port: int, recipe: Path, *extra: str) -> subprocess.CompletedProcess:
        command = [*launch, "--main_process_port", str(port), "-m", "upcycle", "finetune", str(recipe), *extra]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)

    for port, extra in ((29535, ["--stop-after", "2"]), (29536, ["--resume"])):
        result = finetune(port, recipes["two"], *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "accelerate runs it as" not in result.stderr  # FSDP itself, not the DDP fallback
    checkpoint = folders["two"] / "run" / "checkpoints" / "step-0000002"
    assert sorted(p.name for p in (checkpoint / "fsdp_model").iterdir()) == [
        "pytorch_model_fsdp_0_rank0.bin",
        "pytorch_model_fsdp_0_rank1.bin",
    ]
    assert sorted(p.name for p in (checkpoint / "fsdp_optimizer").iterdir()) == [
        "optimizer_0_rank0.bin",
        "optimizer_0_rank1.bin",
    ]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["sharded"] is True
    one, two = final_weights(folders["one"] / "run"), final_weights(folders["two"] / "run")
    assert set(one) == set(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=1e-4)

    refused = finetune(29537, recipes["lora"])
    assert refused.returncode != 0 and "error: trainable: lora under FSDP is not supported" in refused.stderr
    assert not (folders["lora"] / "run" / "final").exists()


def test_attention_backend_from_the_recipe(workspace, monkeypatch):
    """``attention: torch`` trains through the head-sparse path; ``masked`` never does while training."""
    from upcycle.modeling import gated_attention

    tmp_path, _, data = workspace
    training_calls = []
    original = gated_attention.head_sparse_attention

    def counting(*args, **kwargs):
        training_calls.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(gated_attention, "head_sparse_attention", counting)
    for backend, trained_sparse in (("masked", False), ("torch", True)):
        training_calls.clear()
        folder = tmp_path / backend
        folder.mkdir()
        recipe = write_recipe(
            folder, tmp_path / "moh", data, attention=backend, training__steps=1, training__eval_every=0
        )
        run_finetune(load_recipe(str(recipe)))
        assert any(training_calls) == trained_sparse, (backend, training_calls[:3])
        assert json.loads((folder / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"] > 0
