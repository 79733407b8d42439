"""Options say what they are: choices are checked in one place for every way a conversion starts, and the inputs
(experts, calibration texts) are found by their role, never by a field's name."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import build_dense
from test_cli import assert_one_line_error, run

from upcycle.convert import convert_checkpoint, input_paths
from upcycle.errors import UpcycleError
from upcycle.methods import all_specs, method_spec, option
from upcycle.methods.spec import check_choices, literal_choices, option_roles, role_values

CHOICES = [
    (spec.name, f.name, literal_choices(typing.get_type_hints(spec.options)[f.name]))
    for spec in all_specs()
    for f in dataclasses.fields(spec.options)
    if literal_choices(typing.get_type_hints(spec.options)[f.name])
]


def test_the_registry_has_choice_options():
    assert {"moh", "mhe", "bam", "prune-heads"} <= {method for method, _, _ in CHOICES}


@pytest.mark.parametrize(("method", "name", "choices"), CHOICES, ids=[f"{m}.{n}" for m, n, _ in CHOICES])
def test_an_unknown_choice_is_one_line_before_anything_is_read(tmp_path: Path, method, name, choices):
    spec = method_spec(method)
    options = spec.options(**{name: "bogus"})
    flag = spec.flags()[name].metadata.get("flag") or f"--{name.replace('_', '-')}"
    with pytest.raises(UpcycleError) as caught:
        convert_checkpoint(str(tmp_path / "no-such-model"), tmp_path / "out", method, options)
    assert str(caught.value) == f"{flag} 'bogus' is unknown; choose one of: {', '.join(map(str, choices))}"
    assert not (tmp_path / "out").exists()
    check_choices(spec.options(**{name: choices[-1]}))  # every listed choice passes


def test_a_recipe_refuses_an_unknown_choice_in_one_line(tmp_path: Path):
    result = run("finetune", "smollm2-moh-heal-cpu", f"output={tmp_path / 'run'}", "convert.router=bogus")
    assert_one_line_error(result, "convert.router")
    assert not (tmp_path / "run").exists()


def test_inputs_are_found_by_role():
    roles = {spec.name: option_roles(spec.options) for spec in all_specs()}
    assert roles["bam"] == {"experts": "experts"} and roles["clip-moe"] == {"experts": "experts"}
    assert all(found["calibration"] == "calibration" for name, found in roles.items() if "calibration" in found)
    assert [spec.name for spec in all_specs() if spec.merges_experts] == ["bam", "clip-moe"]


@dataclass
class WithInputs:
    reference_text: str = option("", help="a text file.", role="input")
    extra_models: list[str] = option(default_factory=list, help="more models.", flag="--extra", role="experts")
    notes: str = option("", help="a plain string, no input.")


def test_a_new_input_option_is_checked_by_its_role_alone(tmp_path: Path):
    options = WithInputs(reference_text="ref.txt", extra_models=["a", "b"], notes="not a path")
    assert role_values(options) == {"reference_text": ["ref.txt"], "extra_models": ["a", "b"]}
    assert input_paths(tmp_path, options) == {
        "SRC": tmp_path,
        "--reference-text": Path("ref.txt"),
        "--extra #1": Path("a"),
        "--extra #2": Path("b"),
    }
    with pytest.raises(ValueError, match="option role 'path' is unknown"):
        option("", help="x", role="path")


def test_an_expert_inside_out_is_refused_by_its_role(tmp_path: Path):
    dense = build_dense(tmp_path / "dense")
    out = tmp_path / "out"
    (out / "expert").mkdir(parents=True)
    build_dense(out / "expert")
    assert_one_line_error(run("convert", dense, out, "--method", "bam", "--expert", out / "expert"), "--expert")
    assert (out / "expert" / "config.json").exists()


@pytest.mark.parametrize("method", [spec.name for spec in all_specs() if not spec.merges_experts])
def test_a_spec_says_which_families_it_converts(tmp_path: Path, method: str):
    from conftest import build_bert, quick_args

    bert = build_bert(tmp_path / "bert", mlm=True)
    result = run("convert", bert, tmp_path / "out", *quick_args(method))
    if "encoder" in method_spec(method).sources:
        assert result.exit_code == 0, result.output
    else:
        assert_one_line_error(result)
        assert not (tmp_path / "out").exists()
