"""A method defined in this file and registered at run time: it converts, inspects and gets a card with no edit to
upcycle. It gates every attention head with the parameter-free query-norm router (``--toy-active`` heads per token,
all by default), so its null setting is the dense model and it reuses the runtime's ``head_gate`` change."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import build_dense
from test_cli import assert_one_line_error, run

from upcycle.arch import decoder_spec
from upcycle.checkpoint.writer import TensorSpec
from upcycle.errors import UpcycleError
from upcycle.methods import Conversion, MethodCard, MethodSpec, SourceTensor, method_names, option, register
from upcycle.methods.base import check_source, recorded_options, runtime_config
from upcycle.modeling.plan import HeadGate, LayerPlan

TOY_CITATION = "@misc{toy2026, title = {A Toy Method}, year = {2026}}"


@dataclass
class ToyOptions:
    toy_active: int | None = option(None, help="heads each token uses (default: all of them).")
    trust_remote_code: bool = False


def convert(reader, options: ToyOptions) -> Conversion:
    spec = decoder_spec(reader.config, str(reader.folder))
    check_source(reader, spec, options)
    active = spec.num_heads if options.toy_active is None else options.toy_active
    if not 1 <= active <= spec.num_heads:
        raise UpcycleError(f"--toy-active {active} must be in [1, {spec.num_heads}]; pick a head count")
    gate = HeadGate(router="query-norm", shared_heads=[], routed_heads=list(range(spec.num_heads)), top_k=active)
    config, _, _ = runtime_config(reader.config, spec, "toy", [LayerPlan.of(gate)] * spec.num_layers)
    layout = [TensorSpec(name, reader.info(name).dtype, reader.info(name).shape) for name in reader.names()]
    return Conversion(
        method="toy",
        config=config,
        layout=layout,
        tensors=lambda: ((item.name, SourceTensor(item.name)) for item in layout),
        plan_lines=[f"toy plan: {active} of {spec.num_heads} heads per token"],
        report={"options": recorded_options(options)},
        tags=["toy"],
        description=f"Every head routed by query norm, {active} of {spec.num_heads} per token.",
    )


TOY = MethodSpec(
    name="toy",
    summary="Route every head by its query norm.",
    panel="Toy",
    options=ToyOptions,
    convert=convert,
    example="upcycle convert SRC OUT --method toy --toy-active 2",
    card=MethodCard("the toy method", "It shows that a method is one file.", (TOY_CITATION,)),
)


@pytest.fixture
def toy():
    register(TOY)
    yield TOY
    from upcycle.methods import _REGISTERED

    _REGISTERED.pop("toy", None)


def test_a_registered_method_converts_inspects_and_cards(toy, tmp_path):
    dense = build_dense(tmp_path / "dense")
    assert "toy" in method_names()
    help_text = run("convert", "--help").output
    assert "--toy-active" in help_text and "Toy" in help_text and "toy: heads each token uses" in help_text

    out = tmp_path / "toy"
    result = run("convert", dense, out, "--method", "toy")
    assert result.exit_code == 0, result.output
    heads = json.loads((dense / "config.json").read_text())["num_attention_heads"]
    assert f"toy plan: {heads} of {heads} heads per token" in result.output

    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401  (registers the runtime classes)

    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(dense).eval()(ids).logits
        converted = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(converted, expected)  # all heads active: the dense model

    inspected = run("inspect", out)
    assert inspected.exit_code == 0 and "method:      toy" in inspected.output
    assert (
        f"query-norm router, shared [], top-{heads} of {list(range(heads))} ({heads}/{heads} active)"
        in inspected.output
    )

    card = (out / "README.md").read_text()
    assert "converted by [upcycle](https://pypi.org/project/upcycle/) with the toy method" in card
    assert "It shows that a method is one file." in card and TOY_CITATION in card
    assert "| layers | shared heads (always on) | routed heads | active heads per token | router |" in card
    layers = json.loads((dense / "config.json").read_text())["num_hidden_layers"]
    all_heads = " ".join(map(str, range(heads)))
    assert f"| 0-{layers - 1} |  | {all_heads} | 0 + top-{heads} of {heads} | query-norm |" in card
    assert json.loads((out / "upcycle_report.json").read_text())["options"] == {"toy_active": None}


def test_a_registered_method_owns_its_flags(toy, tmp_path):
    dense = build_dense(tmp_path / "dense")
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--toy-active", "2"), "--toy-active applies to --method toy, not moh"
    )
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--method", "toy", "--ratio", "0.5"),
        "--ratio applies to --method prune-heads, not toy",
    )
    heads = json.loads((dense / "config.json").read_text())["num_attention_heads"]
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--method", "toy", "--toy-active", str(heads + 1)),
        f"--toy-active {heads + 1} must be in [1, {heads}]",
    )
    assert not (tmp_path / "out").exists()
