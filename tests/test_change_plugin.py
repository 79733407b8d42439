"""A layer change registered from outside the package (this file) is parsed, applied at load, described by
``upcycle inspect`` and tabled like upcycle's own; once unregistered, a checkpoint that names it is refused in the
runtime's one "upgrade" line."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import build_dense
from test_cli import assert_one_line_error, run

from upcycle.arch import decoder_spec
from upcycle.checkpoint.reader import CheckpointReader
from upcycle.methods.base import runtime_config
from upcycle.modeling.plan import CHANGES, Change, LayerPlan, PlanError, parse_layers, plan_rows, register_change


@dataclass(frozen=True)
class ScaledMLP(Change):
    """The MLP's output times ``factor`` (a forward hook: no new weights)."""

    KEY = "test_scaled_mlp"
    COLUMNS = ("MLP output scale",)
    factor: float

    def apply(self, layer, config) -> None:
        layer.mlp.register_forward_hook(lambda module, args, output: output * self.factor)

    def describe(self) -> str:
        return f"MLP output x {self.factor}"

    def cells(self) -> tuple:
        return (self.factor,)


@pytest.fixture
def scaled_mlp():
    register_change(ScaledMLP)
    yield ScaledMLP
    del CHANGES[ScaledMLP.KEY]


def converted(tmp_path, factor: float):
    """(dense folder, a copy whose layer 0 has ScaledMLP(factor): weights as they are, config with the plan)."""
    dense = build_dense(tmp_path / "dense")
    reader = CheckpointReader(dense)
    spec = decoder_spec(reader.config, str(dense))
    plans = [LayerPlan.of(ScaledMLP(factor))] + [LayerPlan({})] * (spec.num_layers - 1)
    config, _, _ = runtime_config(reader.config, spec, "test-scale", plans)
    out = tmp_path / "scaled"
    out.mkdir()
    for file in dense.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    (out / "config.json").write_text(json.dumps(config))
    return dense, out


def test_a_change_registered_outside_the_package_is_applied_at_load_and_shown(tmp_path, scaled_mlp):
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401  (registers the runtime classes)

    dense, out = converted(tmp_path, 0.0)
    ids = torch.randint(0, 100, (2, 12))
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        reference.model.layers[0].mlp.down_proj.weight.zero_()  # what a factor of 0 computes
        expected = reference(input_ids=ids).logits
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert type(model).__name__ == "UpcycleLlamaForCausalLM"
        torch.testing.assert_close(model(input_ids=ids).logits, expected)
    layers = parse_layers(json.loads((out / "config.json").read_text())["upcycle"]["layers"])
    assert layers[0].describe() == "MLP output x 0.0" and list(CHANGES)[-1] == ScaledMLP.KEY
    assert plan_rows(layers[:2]) == (ScaledMLP.COLUMNS, [(0, 0.0), (1, "-")])
    result = run("inspect", out)
    assert result.exit_code == 0, result.output
    assert "MLP output x 0.0" in result.output


def test_a_registered_change_with_factor_one_is_the_dense_model(tmp_path, scaled_mlp):
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401

    dense, out = converted(tmp_path, 1.0)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)(input_ids=ids).logits
        actual = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(actual, expected)


def test_registering_refuses_a_non_change_and_a_second_class_under_a_taken_key(scaled_mlp):
    with pytest.raises(TypeError, match="not a Change subclass"):
        register_change(dict)

    @dataclass(frozen=True)
    class Impostor(Change):
        KEY = "head_gate"

    with pytest.raises(ValueError, match="'head_gate' is registered already"):
        register_change(Impostor)
    assert register_change(ScaledMLP) is ScaledMLP  # the same class again: no change

    @dataclass(frozen=True)
    class Unfinished(Change):
        KEY = "test_unfinished"

        def describe(self) -> str:
            return "unfinished"

    with pytest.raises(TypeError, match="Unfinished does not define apply, cells"):
        register_change(Unfinished)
    assert "test_unfinished" not in CHANGES


def test_a_checkpoint_naming_an_unregistered_change_is_one_upgrade_line(tmp_path):
    register_change(ScaledMLP)
    try:
        _, out = converted(tmp_path, 0.5)
    finally:
        del CHANGES[ScaledMLP.KEY]
    with pytest.raises(PlanError, match="unknown change 'test_scaled_mlp'.*pip install -U upcycle"):
        parse_layers(json.loads((out / "config.json").read_text())["upcycle"]["layers"])
    assert_one_line_error(run("inspect", out), "unknown change 'test_scaled_mlp'", "newer upcycle")
