import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from upcycle.checkpoint.reader import CheckpointReader
from upcycle.checkpoint.source import resolve_source
from upcycle.checkpoint.writer import ShardedWriter, TensorSpec, atomic_output, copy_support_files, parse_size
from upcycle.errors import UpcycleError


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=generator),
        "model.layers.0.position_ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "model.layers.0.input_layernorm.weight": torch.ones(8, dtype=torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=generator),
        "lm_head.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
    }


def write_all(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[Path]:
    layout = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = ShardedWriter(folder, layout, max_shard_bytes, metadata={"upcycle": "test"})
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    return writer.close()


def make_model_folder(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 10**9) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_all(folder, tensors, max_shard_bytes)
    return folder


def test_round_trip_multi_shard(tmp_path: Path) -> None:
    tensors = sample_tensors()
    files = write_all(tmp_path, tensors, max_shard_bytes=300)
    index_file = tmp_path / "model.safetensors.index.json"
    shard_files = sorted(tmp_path.glob("model-*.safetensors"))
    assert files == [*shard_files, index_file]
    assert len(shard_files) > 2
    assert shard_files[0].name == f"model-00001-of-{len(shard_files):05d}.safetensors"
    index = json.loads(index_file.read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert list(index["weight_map"]) == list(tensors)
    loaded: dict[str, torch.Tensor] = {}
    for shard in shard_files:
        part = load_file(shard)
        assert all(index["weight_map"][name] == shard.name for name in part)
        loaded.update(part)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    header_len = struct.unpack("<Q", shard_files[0].read_bytes()[:8])[0]
    assert header_len % 8 == 0
    metadata = json.loads(shard_files[0].read_bytes()[8 : 8 + header_len])["__metadata__"]
    assert metadata == {"format": "pt", "upcycle": "test"}


def test_reader_over_writer_output(tmp_path: Path) -> None:
    tensors = sample_tensors()
    make_model_folder(tmp_path, tensors, max_shard_bytes=300)
    reader = CheckpointReader(tmp_path)
    assert reader.format == "safetensors"
    assert reader.config == {"model_type": "llama"}
    assert reader.names() == list(tensors)
    assert len(reader.shards) > 2
    assert reader.total_bytes() == sum(t.nbytes for t in tensors.values())
    assert "lm_head.weight" in reader and "missing.weight" not in reader
    for name, tensor in tensors.items():
        info = reader.info(name)
        assert (info.name, info.dtype, info.shape, info.nbytes) == (
            name,
            tensor.dtype,
            tuple(tensor.shape),
            tensor.nbytes,
        )
        assert info.file in reader.shards
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor)


def test_reader_dtypes_and_scalars(tmp_path: Path) -> None:
    tensors = {
        "f16": torch.randn(3, 2).half(),
        "f64": torch.randn(2).double(),
        "i32": torch.arange(5, dtype=torch.int32),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file(tensors, folder / "model.safetensors")
    reader = CheckpointReader(folder)
    for name, tensor in tensors.items():
        got = reader.get(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_from_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copy: bool) -> None:
    if not kernel_copy:

        def unsupported(*args: object) -> int:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr("os.copy_file_range", unsupported)
    tensors = sample_tensors()
    reader = CheckpointReader(make_model_folder(tmp_path / "src", tensors, max_shard_bytes=300))
    extra = torch.arange(4, dtype=torch.int32)
    layout = [
        *(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()),
        TensorSpec("extra", torch.int32, (4,)),
    ]
    writer = ShardedWriter(tmp_path / "dst", layout, max_shard_bytes=500)
    with pytest.raises(ValueError, match="expected tensor model.embed_tokens.weight"):
        writer.copy_from(reader, "lm_head.weight")
    for name in tensors:
        writer.copy_from(reader, name)
    writer.write("extra", extra)
    writer.close()
    (tmp_path / "dst" / "config.json").write_text("{}")
    copied = CheckpointReader(tmp_path / "dst")
    assert copied.names() == [*tensors, "extra"]
    for name, tensor in [*tensors.items(), ("extra", extra)]:
        assert torch.equal(copied.get(name), tensor)


def test_single_shard_naming(tmp_path: Path) -> None:
    files = write_all(tmp_path, sample_tensors(), max_shard_bytes=10**6)
    assert files == [tmp_path / "model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert load_file(files[0]).keys() == sample_tensors().keys()


def test_plan_shards_gives_big_tensor_its_own_shard() -> None:
    small, big = TensorSpec("a", torch.float32, (10,)), TensorSpec("b", torch.float32, (100,))
    plan = ShardedWriter.plan_shards(
        [small, small.__class__("c", torch.float32, (10,)), big, TensorSpec("d", torch.float32, (5,))], 100
    )
    assert [[s.name for s in shard] for shard in plan] == [["a", "c"], ["b"], ["d"]]


def test_writer_rejects_wrong_order_dtype_shape_and_missing(tmp_path: Path) -> None:
    layout = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.bfloat16, (2,))]
    writer = ShardedWriter(tmp_path, layout, 1000)
    with pytest.raises(ValueError, match="expected tensor a"):
        writer.write("b", torch.zeros(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="shape"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="1 of 2"):
        writer.close()


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    make_model_folder(tmp_path, sample_tensors())
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UpcycleError, match="model.safetensors is truncated or corrupted") as caught:
        CheckpointReader(tmp_path)
    assert "\n" not in str(caught.value) and "re-download" in str(caught.value)


def test_garbage_header_is_reported(tmp_path: Path) -> None:
    make_model_folder(tmp_path, sample_tensors())
    shard = tmp_path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!\xff{"
    shard.write_bytes(bytes(data))
    with pytest.raises(UpcycleError, match=r"model\.safetensors is truncated or corrupted \(header is not valid JSON"):
        CheckpointReader(tmp_path)
    shard.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(UpcycleError, match="model.safetensors is truncated or corrupted"):
        CheckpointReader(tmp_path)


def test_folder_checks(tmp_path: Path) -> None:
    with pytest.raises(UpcycleError, match="is not a model folder: no config.json"):
        CheckpointReader(tmp_path)
    with pytest.raises(UpcycleError, match="is not a directory"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UpcycleError, match="config.json is not valid JSON"):
        CheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UpcycleError, match="has no weights"):
        CheckpointReader(tmp_path)


def test_index_naming_missing_shard(tmp_path: Path) -> None:
    make_model_folder(tmp_path, sample_tensors(), max_shard_bytes=300)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(UpcycleError, match="names shard model-00002-of-.* but it is missing"):
        CheckpointReader(tmp_path)


def test_bin_checkpoint(tmp_path: Path) -> None:
    tensors = sample_tensors()
    (tmp_path / "config.json").write_text("{}")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    reader = CheckpointReader(tmp_path)
    assert reader.format == "bin" and reader.shards == [tmp_path / "pytorch_model.bin"]
    assert sorted(reader.names()) == sorted(tensors)
    assert reader.total_bytes() == sum(t.nbytes for t in tensors.values())
    for name, tensor in tensors.items():
        assert reader.info(name).shape == tuple(tensor.shape)
        assert torch.equal(reader.get(name), tensor)


def test_bin_unpickling_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(UpcycleError, match="pytorch_model.bin could not be unpickled") as caught:
        CheckpointReader(tmp_path)
    assert "\n" not in str(caught.value)


def test_atomic_output_exception_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out, overwrite=False) as temp:
            assert temp.parent == out.parent and temp.name.startswith(".out.upcycle-tmp-")
            (temp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_atomic_output_keyboard_interrupt_keeps_existing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, overwrite=True) as temp:
            (temp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "old.txt").read_text() == "old"


def test_atomic_output_refuses_then_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UpcycleError, match=r"already exists; pass --overwrite to replace it"):
        with atomic_output(out, overwrite=False):
            pass
    with atomic_output(out, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("1GiB", 2**30),
        ("1024", 1024),
        (2048, 2048),
        ("2.5gb", 2_500_000_000),
        ("64KiB", 65536),
        ("3 MB", 3 * 10**6),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0", 0, "five"])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(UpcycleError, match="invalid size"):
        parse_size(text)


def test_copy_support_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "config.json",
        "model.safetensors",
    ]:
        (src / name).write_text(name)
    copied = copy_support_files(src, dst)
    assert copied == ["generation_config.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in dst.iterdir()) == copied
    assert (dst / "vocab.json").read_text() == "vocab.json"


def test_resolve_source(tmp_path: Path) -> None:
    assert resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(UpcycleError, match="does not exist"):
        resolve_source(str(tmp_path / "missing" / "model"))
    with pytest.raises(UpcycleError, match="does not exist"):
        resolve_source("./no-such-model")


def test_resolve_source_offline_hub_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        UpcycleError, match="could not download someone/no-such-model .*pass a local model folder instead"
    ) as caught:
        resolve_source("someone/no-such-model")
    assert "\n" not in str(caught.value)


def test_transformers_loads_rewritten_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    original.save_pretrained(tmp_path / "src")
    reader = CheckpointReader(tmp_path / "src")
    layout = [TensorSpec(name, reader.info(name).dtype, reader.info(name).shape) for name in reader.names()]
    with atomic_output(tmp_path / "dst", overwrite=False) as temp:
        writer = ShardedWriter(temp, layout, max_shard_bytes=4096)
        for spec in layout:
            writer.write(spec.name, reader.get(spec.name))
        writer.close()
        (temp / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    assert (tmp_path / "dst" / "model.safetensors.index.json").is_file()
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.bfloat16)
    expected = original.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
