"""Installed as users install it: a built wheel in a fresh virtual environment, run from outside the source tree.

The wheel is built offline from a copy of the source tree (nothing is written into the checkout), installed with
``--no-deps --no-index`` into a venv that also sees the site-packages of the interpreter running the tests (torch,
transformers, ... come from there; the system's Python or a virtualenv's),
and its ``upcycle`` command must find everything it reads at run time (the bundled recipes, the model runtime it
copies into checkpoints) in the installed package, not in the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import build_dense

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "runs", "out")


def sh(*args, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A venv with the wheel built from this source tree installed in it, and an environment that is offline."""
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PIP_NO_INDEX": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "UPCYCLE_CACHE": str(root / "cache"),
        "HF_HOME": str(root / "hf-home"),
        "HF_DATASETS_CACHE": str(root / "hf-datasets"),
    }
    source = Path(shutil.copytree(ROOT, root / "source", ignore=SKIP))
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        root / "dist",
        ".",
        cwd=source,
        env=env,
    )
    [wheel] = (root / "dist").glob("upcycle-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "upcycle/recipes/smollm2-moh-cpu.yaml" in names and "upcycle/modeling/modeling_upcycle.py" in names
    assert "upcycle/data/lm_eval_tasks/kjv_next_verse.yaml" in names
    assert not any(name.startswith(("tests/", "recipes/")) for name in names)
    shutil.rmtree(source)  # whatever runs below cannot fall back on the copy
    sh(sys.executable, "-m", "venv", "--without-pip", root / "venv", cwd=root, env=env)
    python = root / "venv" / "bin" / "python"
    see_running_packages(python, cwd=root, env=env)
    # the running interpreter's pip (seen through the .pth file) installs into the venv; --ignore-installed leaves
    # that interpreter's (editable) upcycle alone
    sh(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=root, env=env)
    return root / "venv", env


def see_running_packages(python: Path, *, cwd: Path, env: dict[str, str]) -> None:
    """Let the venv of ``python`` see, after its own, the site-packages folders of the interpreter running the tests
    (torch, transformers, ...), whether that interpreter is the system's or itself a virtualenv's:
    ``--system-site-packages`` would show a venv's base interpreter's packages instead of the running venv's."""
    own = sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=cwd, env=env).stdout
    folders = [entry for entry in sys.path if Path(entry).name in ("site-packages", "dist-packages")]
    folders = [entry for entry in dict.fromkeys(folders) if Path(entry).is_dir()]
    assert folders, sys.path
    # a line that starts with `import` is run by site.py; addsitedir also runs those folders' own .pth files (as
    # --system-site-packages would), after the venv's folder
    lines = [f"import site; site.addsitedir({folder!r})" for folder in folders]
    (Path(own.strip()) / "_running_interpreter.pth").write_text("\n".join(lines) + "\n")


def test_the_installed_package_runs_outside_the_source_tree(venv, tmp_path):
    prefix, env = venv
    work = tmp_path / "work"  # the cwd: outside the source tree
    work.mkdir()
    python, upcycle = prefix / "bin" / "python", prefix / "bin" / "upcycle"
    probe = (
        "import upcycle; from upcycle.train.recipe import RECIPES_DIR, load_recipe; "
        "print(upcycle.__file__); print(RECIPES_DIR); print(load_recipe('smollm2-moh-cpu').data.seq_len)"
    )
    package, recipes_dir, seq_len = sh(python, "-c", probe, cwd=work, env=env).stdout.split()
    assert Path(package).resolve().is_relative_to(prefix.resolve()), package
    assert not Path(package).resolve().is_relative_to(ROOT) and Path(recipes_dir).resolve().is_relative_to(
        prefix.resolve()
    )
    assert seq_len == "256"  # a bundled recipe, by name

    listing = sh(upcycle, "recipes", cwd=work, env=env).stdout
    for name in ("smollm2-moh-cpu", "smollm2-dense-cpu", "moh-llama3-8b", "clip-mcl"):
        assert name in listing
    assert f"(in {recipes_dir})" in listing

    tasks = sh(upcycle, "tasks", cwd=work, env=env).stdout  # the bundled harness task, from the wheel's YAML
    folder = Path(env["UPCYCLE_CACHE"]) / "lm-eval-tasks"
    assert "kjv_next_verse" in tasks and f"--include_path {folder}" in tasks
    assert len((folder / "kjv_next_verse.jsonl").read_text().splitlines()) == 500

    dense = build_dense(tmp_path / "dense")
    sh(upcycle, "convert", dense, work / "moh", "--router", "learned", cwd=work, env=env)
    shipped = {
        p.name: p.read_bytes() for p in (Path(package).parent / "modeling").glob("*.py") if p.name != "__init__.py"
    }
    assert (
        shipped and {name: (work / "moh" / name).read_bytes() for name in shipped} == shipped
    )  # the runtime came from the wheel

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{(7 * i + j) % 120}" for j in range(60)) for i in range(20)) + "\n")
    recipe = {
        "model": str(work / "moh"),
        "output": str(work / "run"),
        "data": {"train": str(text), "seq_len": 16, "validation_fraction": 0.1, "validation_tokens": 64},
        "training": {
            "steps": 2,
            "global_batch_tokens": 32,
            "micro_batch_size": 2,
            "lr": 1e-3,
            "min_lr": 1e-4,
            "warmup_steps": 1,
            "seed": 0,
            "eval_every": 2,
        },
    }
    (work / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    sh(upcycle, "finetune", "tiny.yaml", cwd=work, env=env, timeout=400)
    final = work / "run" / "final"
    assert (
        (final / "config.json").is_file()
        and any(final.glob("*.safetensors"))
        and (final / "modeling_upcycle.py").is_file()
    )
