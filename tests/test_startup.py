"""Start-up: the light commands never import torch or transformers, and ``import upcycle`` alone still makes every
family's converted folder load through the Auto classes (registration deferred to the first lookup)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FAMILIES, build_bert, build_clip, build_dense

from upcycle.cli import main

HEAVY = ("torch", "transformers", "safetensors", "numpy")


def fresh_python(code: str, cwd: Path) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet); its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def heavy_modules_after(args: list[str], cwd: Path) -> list[str]:
    """Run ``upcycle ARGS`` in a fresh interpreter; the heavy modules it imported."""
    out = fresh_python(
        f"""
        import json, sys
        from upcycle.cli import main
        code = main({args!r})
        assert code == 0, code
        print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
        """,
        cwd,
    )
    return json.loads(out.splitlines()[-1])


@pytest.fixture(scope="module")
def converted_moh(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("startup")
    dense = build_dense(work / "dense")
    assert main(["convert", str(dense), str(work / "moh"), "--method", "moh", "--active-heads", "0.75"]) == 0
    return work / "moh"


@pytest.mark.parametrize(
    "args",
    [["--help"], ["convert", "--help"], ["finetune", "--help"], ["eval", "--help"], ["recipes"], ["--version"]],
    ids=lambda args: " ".join(args),
)
def test_light_commands_import_no_torch(args, tmp_path):
    assert heavy_modules_after(args, tmp_path) == []


def test_inspect_of_a_converted_folder_imports_no_torch(converted_moh, tmp_path):
    assert heavy_modules_after(["inspect", str(converted_moh)], tmp_path) == []
    assert heavy_modules_after(["inspect", str(converted_moh), "--json"], tmp_path) == []


def test_import_upcycle_imports_neither_torch_nor_transformers(tmp_path):
    out = fresh_python(
        f"import json, sys, upcycle; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))", tmp_path
    )
    assert json.loads(out) == []


@pytest.fixture(scope="module")
def converted_families(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """A converted folder of every family: (Auto class that loads it, folder)."""
    work = tmp_path_factory.mktemp("families")
    folders = {}
    for family in FAMILIES:
        dense = build_dense(work / family, family)
        out = work / f"{family}-moh"
        assert main(["convert", str(dense), str(out), "--method", "moh", "--active-heads", "0.75"]) == 0
        folders[family] = ("AutoModelForCausalLM", out)
    bert = build_bert(work / "bert", mlm=True)
    assert main(["convert", str(bert), str(work / "bert-mhe"), "--method", "mhe"]) == 0
    folders["bert"] = ("AutoModelForMaskedLM", work / "bert-mhe")
    clip = build_clip(work / "clip")
    assert main(["convert", str(clip), str(work / "clip-moe"), "--method", "clip-moe", "--expert", str(clip)]) == 0
    folders["clip"] = ("AutoModel", work / "clip-moe")
    return folders


@pytest.mark.parametrize("transformers_first", [False, True], ids=["upcycle-first", "transformers-first"])
def test_every_family_loads_through_the_auto_classes_after_import_upcycle(
    converted_families, transformers_first, tmp_path
):
    loads = "\n".join(
        f"model = transformers.{auto}.from_pretrained({str(folder)!r})\n"
        f"print({family!r}, type(model).__module__, type(model).__name__)"
        for family, (auto, folder) in converted_families.items()
    )
    first, second = (
        ("import transformers.models.auto.modeling_auto", "import upcycle")
        if transformers_first
        else (
            "import upcycle",
            "",
        )
    )
    out = fresh_python(f"{first}\n{second}\nimport transformers\n{loads}\n", tmp_path)
    rows = [line.split() for line in out.splitlines()]
    assert [row[0] for row in rows] == list(converted_families)
    for family, module, name in rows:
        assert module == "upcycle.modeling.modeling_upcycle", (family, module)  # the installed runtime, no remote code
        assert name.startswith("Upcycle"), (family, name)


def test_an_upcycled_config_class_builds_its_model_through_from_config(tmp_path):
    out = fresh_python(
        """
        import upcycle
        from transformers import AutoModelForCausalLM
        from upcycle.modeling.configuration_upcycle import UpcycleLlamaConfig
        sizes = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        config = UpcycleLlamaConfig(num_hidden_layers=1, upcycle={"layers": [{}]}, **sizes)
        print(type(AutoModelForCausalLM.from_config(config)).__name__)
        """,
        tmp_path,
    )
    assert out.strip() == "UpcycleLlamaForCausalLM"


def test_pending_model_types_and_class_names_match_the_runtime():
    from upcycle.auto_registration import MODEL_TYPES, RUNTIME_CLASSES
    from upcycle.modeling.configuration_upcycle import CONFIG_CLASSES
    from upcycle.modeling.modeling_upcycle import CAUSAL_LM_CLASSES, CLIP_CLASSES, ENCODER_CLASSES

    assert sorted(MODEL_TYPES) == sorted(cls.model_type for cls in CONFIG_CLASSES.values())
    runtime = {family: {"AutoModelForCausalLM": cls} for family, cls in CAUSAL_LM_CLASSES.items()}
    runtime |= ENCODER_CLASSES | CLIP_CLASSES
    assert set(RUNTIME_CLASSES) == set(runtime) == set(CONFIG_CLASSES)
    for family, (config_name, models) in RUNTIME_CLASSES.items():
        assert config_name == CONFIG_CLASSES[family].__name__
        assert models == {auto: cls.__name__ for auto, cls in runtime[family].items()}


def test_router_and_variant_names_match_the_runtime():
    from upcycle.modeling.mhe_projection import VARIANTS as runtime_variants
    from upcycle.modeling.plan import MHE_VARIANTS, ROUTER_KINDS
    from upcycle.modeling.routers import ROUTERS

    assert tuple(ROUTERS) == ROUTER_KINDS
    assert runtime_variants == MHE_VARIANTS


def test_the_program_exits_at_once_after_a_conversion_with_everything_written(tmp_path):
    dense = build_dense(tmp_path / "dense")
    out = tmp_path / "moh"
    done = subprocess.run(
        [sys.executable, "-m", "upcycle", "convert", str(dense), str(out), "--method", "moh"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith(f"wrote {out}")  # stdout flushed before the immediate exit
    report = json.loads((out / "upcycle_report.json").read_text())
    assert all(check["passed"] for check in report["checks"])
    failed = subprocess.run(
        [sys.executable, "-m", "upcycle", "convert", str(dense), str(out), "--method", "moh"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert failed.returncode == 1 and failed.stderr.startswith("error: ") and "--overwrite" in failed.stderr
