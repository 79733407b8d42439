"""Every method checks every tensor against the shape config.json implies; foreign model code never travels;
unsafe .bin is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUICK_FLAGS, build_bert, build_clip, build_dense, decoder_methods, expert_methods
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, leftovers, run

from upcycle.checkpoint.load import check_pickled_weights
from upcycle.checkpoint.reader import RUNTIME_DIR, foreign_code, is_upcycle_runtime
from upcycle.errors import UpcycleError
from upcycle.train.loop import copy_runtime

Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"

# every decoder method with its quick flags, and pruning's non-uniform output (per-layer head counts) besides
METHOD_FLAGS = {method: QUICK_FLAGS.get(method, []) for method in decoder_methods()} | {
    "prune-heads-nonuniform": ["--ratio", "0.25", "--importance", "random"]
}


def method_args(key: str) -> list[str]:
    return ["--method", key.removesuffix("-nonuniform"), *METHOD_FLAGS[key]]


def rewrite(folder: Path, name: str, change) -> None:
    """Rewrite the folder's model.safetensors with ``name`` replaced by ``change(tensor)``."""
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def convert(tmp_path: Path, src: Path, *args: str):
    result = run("convert", src, tmp_path / "out", *args)
    return result


def assert_refused(tmp_path: Path, result, *needles: str) -> None:
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


# ---- 4. tensors against the config ------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(METHOD_FLAGS))
def test_corrupted_tensor_is_one_line_naming_both_shapes(tmp_path, key):
    dense = build_dense(
        tmp_path / "dense", num_attention_heads=4, num_key_value_heads=4
    )  # 4 heads x 16: q_proj [64, 64]
    rewrite(dense, Q0, lambda t: t[:48])
    assert_refused(
        tmp_path, convert(tmp_path, dense, *method_args(key)), Q0, "[48, 64]", "[64, 64]", "num_attention_heads 4"
    )


def test_corrupted_tensor_bam_seed_and_expert(tmp_path):
    seed = build_dense(tmp_path / "seed", num_attention_heads=4, num_key_value_heads=4)
    expert = tmp_path / "expert"
    shutil.copytree(seed, expert)
    rewrite(expert, "model.layers.1.mlp.down_proj.weight", lambda t: t[:, :100])
    assert_refused(
        tmp_path,
        convert(tmp_path, seed, "--method", "bam", "--expert", expert),
        "expert",
        "model.layers.1.mlp.down_proj.weight",
        "[64, 100]",
        "[64, 128]",
        "intermediate_size 128",
    )
    rewrite(seed, Q0, lambda t: t[:48])
    assert_refused(
        tmp_path, convert(tmp_path, seed, "--method", "bam", "--expert", expert), str(seed), Q0, "[48, 64]", "[64, 64]"
    )


def test_corrupted_tensor_clip_moe(tmp_path):
    clip = build_clip(tmp_path / "clip")
    name = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
    rewrite(clip, name, lambda t: t[:24])
    assert_refused(
        tmp_path,
        convert(tmp_path, clip, "--method", "clip-moe", "--upcycle-copies", "2"),
        name,
        "[24, 32]",
        "[32, 32]",
    )


def test_corrupted_tensor_bert(tmp_path):
    bert = build_bert(tmp_path / "bert")
    name = "encoder.layer.1.attention.output.dense.weight"
    rewrite(bert, name, lambda t: t[:, :56])
    assert_refused(
        tmp_path, convert(tmp_path, bert, *method_args("prune-heads-nonuniform")), name, "[64, 56]", "[64, 64]"
    )


@pytest.mark.parametrize("key", sorted(METHOD_FLAGS))
def test_edited_head_count(tmp_path, key):
    dense = build_dense(tmp_path / "dense")  # 8 heads x 8 (config.json says head_dim 8), 2 KV heads: q_proj [64, 64]
    edit_config(dense, num_attention_heads=4)  # q_proj [32, 64]
    assert_refused(
        tmp_path,
        convert(tmp_path, dense, *method_args(key)),
        Q0,
        "[64, 64]",
        "[32, 64]",
        "num_attention_heads 4 x head_dim 8",
    )
    edit_config(dense, head_dim=None)  # head_dim derived: 64 / 4 = 16, so k_proj [32, 64] against the [16, 64] found
    assert_refused(
        tmp_path,
        convert(tmp_path, dense, *method_args(key)),
        K0,
        "[16, 64]",
        "[32, 64]",
        "num_key_value_heads 2 x head_dim 16",
    )


@pytest.mark.parametrize("key", decoder_methods() + expert_methods())
def test_edited_layer_count(tmp_path, key):
    dense = build_dense(tmp_path / "dense")
    args = ["--method", key, "--expert", dense] if key in expert_methods() else method_args(key)
    edit_config(dense, num_hidden_layers=3)
    assert_refused(tmp_path, convert(tmp_path, dense, *args), "lacks tensor model.layers.2.", "num_hidden_layers 3")
    edit_config(dense, num_hidden_layers=1)
    assert_refused(
        tmp_path,
        convert(tmp_path, dense, *args),
        "has tensors of 2 layers",
        "model.layers.1.",
        "num_hidden_layers is 1",
    )


def test_edited_layer_count_bert_and_clip(tmp_path):
    bert = build_bert(tmp_path / "bert", mlm=True)
    edit_config(bert, num_hidden_layers=3)
    assert_refused(
        tmp_path,
        convert(tmp_path, bert, "--method", "mhe"),
        "lacks tensor bert.encoder.layer.2.",
        "num_hidden_layers 3",
    )
    clip = build_clip(tmp_path / "clip")
    config = json.loads((clip / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 2
    (clip / "config.json").write_text(json.dumps(config))
    assert_refused(
        tmp_path,
        convert(tmp_path, clip, "--method", "clip-moe", "--upcycle-copies", "2"),
        "has tensors of 3 layers",
        "vision_model.encoder.layers.2.",
        "vision_config.num_hidden_layers is 2",
    )


@pytest.mark.parametrize(
    "changes,needles",
    [
        ({"num_attention_heads": 5}, ["num_attention_heads 5 is not a multiple of num_key_value_heads 2"]),
        ({"num_attention_heads": None}, ["config.json has no num_attention_heads"]),
        ({"num_hidden_layers": "two"}, ["num_hidden_layers is 'two', not a positive whole number"]),
        ({"hidden_size": 0}, ["hidden_size is 0"]),
    ],
    ids=["not-a-multiple", "missing", "string", "zero"],
)
@pytest.mark.parametrize("method", ["moh", "gqa"])
def test_broken_config_values(tmp_path, changes, needles, method):
    dense = build_dense(tmp_path / "dense")
    edit_config(dense, **changes)
    args = ["--method", method] + (["--kv-heads", "1"] if method == "gqa" else [])
    assert_refused(tmp_path, convert(tmp_path, dense, *args), *needles)


def test_missing_layer_tensor(tmp_path):
    dense = build_dense(tmp_path / "dense")
    tensors = load_file(dense / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
    assert_refused(
        tmp_path,
        convert(tmp_path, dense, "--method", "gqa", "--kv-heads", "1"),
        "lacks tensor model.layers.1.self_attn.v_proj.weight",
    )


# ---- 5. foreign model code ----------------------------------------------------------------------

EVIL = "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n"


def with_remote_code(folder: Path) -> Path:
    """A dense model whose config.json's auto_map names code of its own (which would leave RAN behind if it ever
    ran)."""
    for module in ("modeling_evil", "configuration_evil"):
        (folder / f"{module}.py").write_text(EVIL)
    edit_config(
        folder,
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )
    return folder


@pytest.mark.parametrize("key", decoder_methods())
def test_convert_refuses_foreign_code(tmp_path, key):
    dense = with_remote_code(build_dense(tmp_path / "dense"))
    assert_refused(
        tmp_path, convert(tmp_path, dense, *method_args(key)), "auto_map", "modeling_evil.py", "--trust-remote-code"
    )
    assert not (dense / "RAN").exists()


def with_tokenizer_code(folder: Path) -> Path:
    """A model whose tokenizer_config.json's auto_map names a tokenizer class of its own."""
    (folder / "tokenization_evil.py").write_text(EVIL)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizerFast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_convert_refuses_foreign_tokenizer_code(tmp_path):
    dense = with_tokenizer_code(build_dense(tmp_path / "dense"))
    assert_refused(
        tmp_path,
        convert(tmp_path, dense, "--method", "moh"),
        "tokenizer_config.json's auto_map",
        "tokenization_evil.py",
        "--trust-remote-code",
    )


def test_convert_refuses_foreign_code_of_an_expert(tmp_path):
    seed = build_dense(tmp_path / "seed")
    expert = tmp_path / "expert"
    shutil.copytree(seed, expert)
    with_remote_code(expert)
    assert_refused(
        tmp_path, convert(tmp_path, seed, "--method", "bam", "--expert", expert), str(expert), "modeling_evil.py"
    )


def runtime_py(folder: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in folder.glob("*.py")}


INSTALLED = {file.name: file.read_bytes() for file in RUNTIME_DIR.glob("*.py") if file.name != "__init__.py"}


@pytest.mark.parametrize("key", sorted(METHOD_FLAGS))
def test_trusted_foreign_code_is_not_copied(tmp_path, key):
    dense = with_remote_code(build_dense(tmp_path / "dense"))
    result = convert(tmp_path, dense, *method_args(key), "--trust-remote-code")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    if not config["model_type"].startswith("upcycle_"):  # a plain checkpoint of the family: no auto_map, no code
        assert "auto_map" not in config and runtime_py(out) == {} and config["architectures"] == ["LlamaForCausalLM"]
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out)  # loads without any code
    else:  # upcycle checkpoints: upcycle's runtime, byte for byte, and nothing else
        assert is_upcycle_runtime(config["auto_map"]) and foreign_code(config) is None
        assert runtime_py(out) == INSTALLED
    assert not (dense / "RAN").exists() and not (out / "RAN").exists()


def test_trusted_foreign_tokenizer_code_is_not_pointed_at(tmp_path):
    dense = with_tokenizer_code(build_dense(tmp_path / "dense"))
    result = convert(tmp_path, dense, "--method", "moh", "--trust-remote-code")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tokenizer_config and not (out / "tokenization_evil.py").exists()
    assert tokenizer_config["eos_token"] == json.loads((dense / "tokenizer_config.json").read_text())["eos_token"]
    from transformers import AutoTokenizer

    plain = build_dense(tmp_path / "plain")  # the same tokenizer, without the auto_map
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(plain).get_vocab()
    assert not (dense / "RAN").exists() and not (out / "RAN").exists()


def test_trusted_foreign_code_never_runs_for_gradient_importance(tmp_path, calibration_file):
    dense = with_remote_code(build_dense(tmp_path / "dense"))
    result = convert(
        tmp_path,
        dense,
        "--method",
        "prune-heads",
        "--ratio",
        "0.5",
        "--uniform",
        "--calibration",
        calibration_file,
        "--calibration-tokens",
        "256",
        "--trust-remote-code",
    )
    assert result.exit_code == 0, result.output
    assert not (dense / "RAN").exists() and runtime_py(tmp_path / "out") == {}


def test_upcycle_runtime_is_recognised():
    ours = {
        "AutoConfig": "configuration_upcycle.UpcycleLlamaConfig",
        "AutoModelForCausalLM": "modeling_upcycle.UpcycleLlamaForCausalLM",
    }
    assert is_upcycle_runtime(ours) and foreign_code({"auto_map": ours}) is None
    for foreign in (
        {"AutoModel": "modeling_upcycle.EvilModel"},
        {"AutoModel": "other/repo--modeling_upcycle.UpcycleBertModel"},
        {"AutoModel": "modeling_evil.UpcycleBertModel"},
        {"AutoModel": "sub.modeling_upcycle.UpcycleBertModel"},
        {},
        "x",
    ):
        assert not is_upcycle_runtime(foreign)
    assert foreign_code({"auto_map": {"AutoModel": "modeling_upcycle.EvilModel"}}) == "modeling_upcycle.py"


def final_folder(tmp_path: Path, source: Path) -> Path:
    """What save_final has written to final/ before the runtime step: the source's config (save_pretrained keeps
    auto_map)."""
    target = tmp_path / "run" / ".final.upcycle-tmp"
    target.mkdir(parents=True)
    shutil.copyfile(source / "config.json", target / "config.json")
    return target


def test_finetune_copy_refuses_foreign_code(tmp_path):
    dense = with_remote_code(build_dense(tmp_path / "dense"))
    target = final_folder(tmp_path, dense)
    with pytest.raises(UpcycleError, match=r"modeling_evil\.py.*final was not written") as caught:
        copy_runtime(dense, target)
    assert "\n" not in str(caught.value) and runtime_py(target) == {}


def test_finetune_copy_trusted_drops_foreign_code(tmp_path):
    dense = with_tokenizer_code(with_remote_code(build_dense(tmp_path / "dense")))
    target = final_folder(tmp_path, dense)
    shutil.copyfile(dense / "tokenizer_config.json", target / "tokenizer_config.json")  # copy_support_files copied it
    copy_runtime(dense, target, trust_remote_code=True)
    assert runtime_py(target) == {}
    assert all(
        "auto_map" not in json.loads((target / name).read_text()) for name in ("config.json", "tokenizer_config.json")
    )
    tokenizer = json.loads((target / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "</s>"  # the rest is kept


def test_finetune_copy_refuses_foreign_tokenizer_code(tmp_path):
    dense = with_tokenizer_code(build_dense(tmp_path / "dense"))
    with pytest.raises(UpcycleError, match=r"tokenizer_config\.json's auto_map.*tokenization_evil\.py"):
        copy_runtime(dense, final_folder(tmp_path, dense))


def finetune_recipe(tmp_path: Path, model: Path, data: Path, **changes) -> Path:
    from test_finetune import write_recipe

    return write_recipe(tmp_path, model, data, training__steps=2, training__eval_every=0, **changes)


@pytest.mark.parametrize("role", ["model", "teacher", "compare"])
def test_finetune_refuses_foreign_code_before_anything_is_written(tmp_path, calibration_file, role):
    dense = build_dense(tmp_path / "dense")
    evil = dense if role == "model" else with_remote_code(build_dense(tmp_path / "other"))
    if role == "model":
        with_remote_code(dense)
    extra = (
        {"teacher": str(evil), "losses__distill": 1.0}
        if role == "teacher"
        else {"compare": str(evil)}
        if role == "compare"
        else {}
    )
    recipe = finetune_recipe(tmp_path, dense, calibration_file, **extra)
    result = run("finetune", recipe)
    assert_one_line_error(
        result, f"error: {role} ", "modeling_evil.py", "trust_remote_code: true", "nothing was written"
    )
    assert not (tmp_path / "run").exists() and not (evil / "RAN").exists()


def test_finetune_trusted_foreign_code_tunes_without_it(tmp_path, calibration_file):
    dense = with_tokenizer_code(with_remote_code(build_dense(tmp_path / "dense")))
    recipe = finetune_recipe(tmp_path, dense, calibration_file, trust_remote_code=True)
    result = run("finetune", recipe)
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "final"
    assert runtime_py(final) == {} and not (dense / "RAN").exists() and not (final / "RAN").exists()
    assert all(
        "auto_map" not in json.loads((final / name).read_text()) for name in ("config.json", "tokenizer_config.json")
    )
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(final)).__name__ == "LlamaForCausalLM"


def test_finetune_trusted_converting_recipe_passes_the_flag_to_convert(tmp_path, calibration_file):
    dense = with_remote_code(build_dense(tmp_path / "dense"))
    recipe = finetune_recipe(tmp_path, dense, calibration_file, trust_remote_code=True, convert={"method": "moh"})
    result = run("finetune", recipe)
    assert result.exit_code == 0, result.output
    final = tmp_path / "run" / "final"
    assert runtime_py(final) == INSTALLED and is_upcycle_runtime(
        json.loads((final / "config.json").read_text())["auto_map"]
    )
    assert not (dense / "RAN").exists()


def test_finetune_copy_carries_only_installed_runtime(tmp_path):
    moh = tmp_path / "moh"
    assert run("convert", build_dense(tmp_path / "dense"), moh).exit_code == 0
    (moh / "modeling_upcycle.py").write_text(EVIL)  # an edited runtime in the source folder
    (moh / "helper_evil.py").write_text(EVIL)  # and a stray file
    target = final_folder(tmp_path, moh)
    copy_runtime(moh, target)
    assert runtime_py(target) == INSTALLED


def test_finetune_copy_dense_source_gets_no_code(tmp_path):
    dense = build_dense(tmp_path / "dense")
    (dense / "stray.py").write_text(EVIL)
    target = final_folder(tmp_path, dense)
    copy_runtime(dense, target)
    assert runtime_py(target) == {}


# ---- 11. pickled .bin weights -------------------------------------------------------------------


class NotATensor:
    """A pickled object that torch.load(weights_only=True) refuses."""


def bin_folder(tmp_path: Path, legacy: bool = False, extra: object = None) -> Path:
    dense = build_dense(tmp_path / "dense")
    weights = load_file(dense / "model.safetensors")
    (dense / "model.safetensors").unlink()
    if extra is not None:
        weights["extra"] = extra
    torch.save(weights, dense / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return dense


def test_bin_refused_by_weights_only(tmp_path):
    dense = bin_folder(tmp_path, extra=NotATensor())
    assert_refused(
        tmp_path,
        convert(tmp_path, dense, "--method", "moh"),
        "pytorch_model.bin",
        "holds more than tensors",
        "NotATensor",
        "weights_only=True",
        "safetensors.torch.save_file",
        "model.safetensors",
    )
    with pytest.raises(UpcycleError, match="holds more than tensors") as caught:
        check_pickled_weights(dense)  # what eval runs before transformers loads the folder
    assert "\n" not in str(caught.value)


def test_legacy_bin(tmp_path):
    dense = bin_folder(tmp_path, legacy=True)
    assert_refused(
        tmp_path,
        convert(tmp_path, dense, "--method", "gqa", "--kv-heads", "1"),
        "pytorch_model.bin",
        "legacy serialization format",
        "torch before 1.6",
        "safetensors.torch.save_file",
    )
    with pytest.raises(UpcycleError, match="legacy serialization format"):
        check_pickled_weights(dense)


def test_plain_bin_still_loads(tmp_path):
    dense = bin_folder(tmp_path)
    check_pickled_weights(dense)
    assert convert(tmp_path, dense, "--method", "gqa", "--kv-heads", "1").exit_code == 0
