"""CLIP-MoE assembly: identical experts = base, experts from stages, sparse-upcycling copies, drop-in API, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_clip, build_dense
from safetensors.torch import load_file
from test_cli import assert_one_line_error, leftovers, run
from test_prune_heads import run_without_upcycle
from transformers import AutoModel, AutoModelForZeroShotImageClassification, CLIPModel

import upcycle  # noqa: F401  (registers the Auto classes)
from upcycle.convert import convert_checkpoint
from upcycle.methods.clip_moe import ClipMoEOptions
from upcycle.modeling.experts import MoEFeedForward

IDS = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assemble(base: Path, out: Path, experts: list[Path] = (), **options) -> dict:
    return convert_checkpoint(str(base), out, "clip-moe", ClipMoEOptions(experts=[str(e) for e in experts], **options))


def features(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=IDS, pixel_values=PIXELS)
        return {
            "logits_per_image": out.logits_per_image,
            "image": model.get_image_features(pixel_values=PIXELS).pooler_output,
            "text": model.get_text_features(input_ids=IDS).pooler_output,
        }


@pytest.mark.parametrize("layers", [None, 1])
def test_identical_experts_give_the_base_features(tmp_path, layers):
    base = build_clip(tmp_path / "base")
    report = assemble(base, tmp_path / "moe", [base, base, base], layers=layers)
    model = AutoModel.from_pretrained(tmp_path / "moe").eval()
    moe_layers = {
        tower: [isinstance(layer.mlp, MoEFeedForward) for layer in getattr(model, f"{tower}_model").encoder.layers]
        for tower in ("text", "vision")
    }
    expected = (
        {"text": [True, True], "vision": [True, True, True]}
        if layers is None
        else {"text": [False, True], "vision": [False, False, True]}
    )
    assert moe_layers == expected and report["moe_layers"] == (
        {"text": 2, "vision": 3} if layers is None else {"text": 1, "vision": 1}
    )
    shown = run("inspect", tmp_path / "moe").stdout
    assert (
        "method:      clip-moe" in shown
        and f"vision tower: FFN 4 experts, top-2, in layers {[0, 1, 2] if layers is None else [2]} of 3" in shown
    )
    reference = features(CLIPModel.from_pretrained(base).eval())
    for key, value in features(model).items():
        torch.testing.assert_close(value, reference[key], atol=1e-5, rtol=1e-5)


def test_experts_come_from_the_stages_and_everything_else_from_the_base(tmp_path):
    base = build_clip(tmp_path / "base")
    stages = [build_clip(tmp_path / f"stage{i}", seed=i, ffn_noise=0.05, base=base) for i in (1, 2, 3)]
    assemble(base, tmp_path / "moe", stages)
    written = load_file(tmp_path / "moe" / "model.safetensors")
    base_tensors = load_file(base / "model.safetensors")
    for expert, source in enumerate([base, *stages]):
        tensors = load_file(source / "model.safetensors")
        for tower in ("text", "vision"):
            name = f"{tower}_model.encoder.layers.1.mlp.fc1.weight"
            assert torch.equal(
                written[f"{tower}_model.encoder.layers.1.mlp.experts.{expert}.fc1.weight"], tensors[name]
            )
    passthrough = [n for n in base_tensors if ".mlp." not in n]
    assert passthrough and all(torch.equal(written[n], base_tensors[n]) for n in passthrough)
    assert written["vision_model.encoder.layers.0.mlp.router.weight"].shape == (4, 32)
    model = AutoModel.from_pretrained(tmp_path / "moe").eval()
    assert not torch.allclose(features(model)["image"], features(CLIPModel.from_pretrained(base).eval())["image"])


def test_sparse_upcycling_copies(tmp_path):
    base = build_clip(tmp_path / "base")
    report = assemble(base, tmp_path / "copies", upcycle_copies=4, top_k=2)
    written = load_file(tmp_path / "copies" / "model.safetensors")
    fc2 = load_file(base / "model.safetensors")["text_model.encoder.layers.0.mlp.fc2.bias"]
    assert all(torch.equal(written[f"text_model.encoder.layers.0.mlp.experts.{e}.fc2.bias"], fc2) for e in range(4))
    assert report["options"]["upcycle_copies"] == 4
    model = AutoModel.from_pretrained(tmp_path / "copies").eval()
    reference = features(CLIPModel.from_pretrained(base).eval())
    torch.testing.assert_close(
        features(model)["logits_per_image"], reference["logits_per_image"], atol=1e-5, rtol=1e-5
    )


def test_drop_in_clip_loads_both_ways(tmp_path):
    base = build_clip(tmp_path / "base")
    (base / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32}})
    )
    stages = [build_clip(tmp_path / f"stage{i}", seed=i, ffn_noise=0.05, base=base) for i in (1, 2)]
    assemble(base, tmp_path / "moe", stages)
    assert (tmp_path / "moe" / "preprocessor_config.json").exists()
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert (
        config["model_type"] == "upcycle_clip"
        and config["auto_map"]["AutoModel"] == "modeling_upcycle.UpcycleCLIPModel"
    )
    model = AutoModelForZeroShotImageClassification.from_pretrained(tmp_path / "moe").eval()
    assert isinstance(model, CLIPModel)
    expected = features(model)["logits_per_image"]
    torch.save({"ids": IDS, "pixels": PIXELS, "out": expected}, tmp_path / "expected.pt")
    run_without_upcycle(
        tmp_path,
        f"""
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "moe")!r}, trust_remote_code=True).eval()
        module = type(model).__module__
        assert "upcycle" not in sys.modules and module.startswith("transformers_modules"), module
        data = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            out = model(input_ids=data["ids"], pixel_values=data["pixels"])
        torch.testing.assert_close(out.logits_per_image, data["out"], atol=0, rtol=0)
        print("ok")
    """,
    )


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path):
    base = build_clip(tmp_path / "base")
    wide = build_clip(tmp_path / "wide", vision={"intermediate_size": 128})
    llama = build_dense(tmp_path / "llama")
    cases = [
        (
            ["--expert", wide],
            ["the experts do not match the base", "vision_config.intermediate_size 128", "tensor(s) of another shape"],
        ),
        (["--expert", base, "--top-k", "3"], ["--top-k 3 is outside [1, 2]"]),
        ([], ["needs --expert STAGE", "--upcycle-copies E"]),
        (["--upcycle-copies", "3", "--expert", base], ["drop --expert or --upcycle-copies"]),
        (["--expert", base, "--layers", "4"], ["--layers 4 is outside [1, 2]"]),
    ]
    for args, needles in cases:
        assert_one_line_error(run("convert", base, tmp_path / "out", "--method", "clip-moe", *args), *needles)
    assert_one_line_error(
        run("convert", llama, tmp_path / "out", "--method", "clip-moe", "--expert", llama), "not 'clip'"
    )
    assert_one_line_error(
        run("convert", base, tmp_path / "out", "--method", "bam", "--top-k", "2", "--expert", base),
        "--top-k applies to --method clip-moe",
    )
    assert leftovers(tmp_path) == []
