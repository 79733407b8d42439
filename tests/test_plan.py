"""The typed per-layer plan: every change round-trips through JSON, and a plan this runtime does not know (a
checkpoint from a newer upcycle) is one line at load, in inspect and in eval."""

from __future__ import annotations

import json

import pytest
from conftest import build_dense
from test_cli import assert_one_line_error, run

from upcycle.modeling.plan import CHANGES, MHE, HeadGate, LayerPlan, PlanError, parse_layer, parse_layers, plan_rows

EXAMPLES = {
    "head_gate": {"router": "learned", "shared_heads": [0, 2], "routed_heads": [1, 3], "top_k": 1},
    "attention_heads": {"kept_heads": [0, 1, 3], "kept_kv_heads": [0, 1]},
    "mhe": {"variant": "mul", "heads": {"q_proj": 4, "k_proj": 2, "v_proj": 2}},
    "moe_ffn": {"experts": 3, "top_k": 1},
    "attention_experts": {"experts": 3, "kv": "expert"},
    "parallel_block": True,
}


def test_every_change_round_trips_and_is_described():
    assert set(EXAMPLES) == set(CHANGES)
    layer = parse_layer(EXAMPLES, "layer 0")
    assert layer.to_json() == EXAMPLES
    assert isinstance(layer.get(HeadGate), HeadGate) and layer.get(HeadGate).top_k == 1
    assert layer.describe() == (
        "FFN 3 experts, top-1; attention 3 soft experts (expert KV); parallel block; "
        "MHE-mul, one shared projection each: Q over 4 heads, K over 2 heads, V over 2 heads; "
        "3 query heads kept [0, 1, 3], 2 KV heads [0, 1]; "
        "learned router, shared [0, 2], top-1 of [1, 3] (3/4 active)"
    )
    assert parse_layer({"parallel_block": False}, "layer 1") == LayerPlan({})


def test_plan_rows_fill_missing_changes():
    layers = parse_layers([{"mhe": EXAMPLES["mhe"]}, {}])
    header, rows = plan_rows(layers)
    assert header == MHE.COLUMNS
    assert rows == [(0, "mul", 4, 2, 2), (1, "-", "-", "-", "-")]


@pytest.mark.parametrize(
    "layer, needle",
    [
        ({"future_change": {}}, "layer 0: unknown change 'future_change'"),
        ({"moe_ffn": {"experts": 2, "top_k": 1, "capacity": 1.5}}, "moe_ffn has unknown field(s) ['capacity']"),
        ({"moe_ffn": {"experts": 2}}, "moe_ffn has missing field(s) ['top_k']"),
        ({"parallel_block": "yes"}, "parallel_block must be true or false"),
        ([1, 2], "layer 0 must be a JSON object"),
    ],
)
def test_an_unknown_plan_is_one_line(layer, needle):
    with pytest.raises(PlanError) as caught:
        parse_layers([layer])
    message = str(caught.value)
    assert needle in message and "newer upcycle" in message and "pip install -U upcycle" in message
    assert "\n" not in message


def test_a_checkpoint_from_a_newer_upcycle_is_refused_in_one_line(tmp_path, calibration_file):
    out = tmp_path / "moh"
    assert run("convert", build_dense(tmp_path / "dense"), out).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    config["upcycle"]["layers"][1]["future_change"] = {"size": 2}
    (out / "config.json").write_text(json.dumps(config))

    assert_one_line_error(run("inspect", out), "layer 1: unknown change 'future_change'", "newer upcycle")
    assert_one_line_error(
        run("eval", out, "--data", calibration_file, "--tokens", "64"), "unknown change 'future_change'"
    )
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401  (registers the runtime classes)

    with pytest.raises(PlanError, match="unknown change 'future_change'"):
        AutoModelForCausalLM.from_pretrained(out)
