import json
import os

import datasets
import huggingface_hub.constants
import pytest
import torch
from conftest import VOCAB, tiny_tokenizer

from upcycle.data import corpus
from upcycle.data.corpus import DataConfig, build_corpus, load_documents
from upcycle.data.text import pack_tokens
from upcycle.errors import UpcycleError

EOS = VOCAB.index("</s>")


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    datasets.disable_progress_bars()


def make_docs(n: int = 40, seed: int = 0) -> list[str]:
    """Distinct documents (document i starts with word w<i>), 3 to 17 words, some with a line break inside."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for i in range(n):
        words = [f"w{i}"] + [
            f"w{w}"
            for w in torch.randint(0, 125, (int(torch.randint(2, 17, (1,), generator=g)),), generator=g).tolist()
        ]
        docs.append((" ".join(words[:3]) + ("\n" if i % 3 == 0 else " ") + " ".join(words[3:])).strip())
    return docs


def write_txt(path, docs):
    path.write_text("\n\n \n".join(docs[:2]) + "\n\n\n" + "\n\n".join(docs[2:]) + "\n")  # odd blank lines too
    return path


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def blocks(data) -> torch.Tensor:
    return torch.stack([item["input_ids"] for item in data])


def config(path, **kw) -> DataConfig:
    return DataConfig(str(path), **({"validation_fraction": 0.0, "seq_len": 8} | kw))


def test_txt_jsonl_json_parquet_and_folder_give_the_same_blocks(tmp_path):
    docs, tk = make_docs(), tiny_tokenizer()
    expected = pack_tokens(docs, tk, 8)
    (tmp_path / "parts").mkdir()
    write_txt(tmp_path / "parts" / "a.txt", docs[:15]), write_txt(tmp_path / "parts" / "b.txt", docs[15:])
    (tmp_path / "d.json").write_text(json.dumps([{"text": d} for d in docs]))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    sources = [
        write_txt(tmp_path / "d.txt", docs),
        write_jsonl(tmp_path / "d.jsonl", docs),
        tmp_path / "d.json",
        tmp_path / "d.parquet",
        tmp_path / "parts",
    ]
    for source in sources:
        data = build_corpus(config(source), tk)
        assert torch.equal(blocks(data.train), expected), source
        assert data.train_tokens == expected.numel() and data.validation.shape == (0, 8)
        assert data.train[0]["input_ids"].dtype == torch.long
    assert list(load_documents(str(tmp_path / "d.txt"))["text"]) == docs


def test_eos_only_between_documents_and_packing_across_batches(tmp_path, monkeypatch):
    docs, tk = make_docs(25), tiny_tokenizer()
    stream = [t for i, d in enumerate(docs) for t in ([EOS] if i else []) + tk(d, add_special_tokens=False).input_ids]
    monkeypatch.setattr(corpus, "BATCH_SIZE", 3)  # blocks span map batches
    path = write_txt(tmp_path / "d.txt", docs)
    for seq_len in (7, 50):
        got = blocks(build_corpus(config(path, seq_len=seq_len), tk).train).flatten().tolist()
        assert got == stream[: len(stream) // seq_len * seq_len]
        assert got.count(EOS) == sum(1 for t in stream[: len(got)] if t == EOS) and got[0] != EOS
        streamed = blocks(build_corpus(config(path, seq_len=seq_len, streaming=True), tk).train).flatten().tolist()
        assert streamed == got


def split_documents(flat: list[int]) -> set[tuple[int, ...]]:
    """The whole documents in a packed stream (the last piece may be cut, so it is left out)."""
    pieces, current = [], []
    for t in flat:
        if t == EOS:
            pieces.append(tuple(current))
            current = []
        else:
            current.append(t)
    return set(pieces)


def test_validation_split_is_disjoint_by_documents_and_deterministic(tmp_path):
    docs, tk = make_docs(60), tiny_tokenizer()
    path = write_txt(tmp_path / "d.txt", docs)
    all_docs = {tuple(tk(d, add_special_tokens=False).input_ids) for d in docs}
    cfg = config(path, validation_fraction=0.25, validation_tokens=None)
    first = build_corpus(cfg, tk)
    again = build_corpus(DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "other")}), tk)
    assert torch.equal(first.validation, again.validation) and torch.equal(blocks(first.train), blocks(again.train))
    held = split_documents(first.validation.flatten().tolist())
    train = split_documents(blocks(first.train).flatten().tolist())
    assert len(held) >= 10 and held <= all_docs and train <= all_docs and not held & train
    other_seed = build_corpus(DataConfig(**{**vars(cfg), "seed": 1}), tk)
    assert other_seed.fingerprint != first.fingerprint and not torch.equal(other_seed.validation, first.validation)
    small = build_corpus(DataConfig(**{**vars(cfg), "validation_tokens": 16}), tk)
    assert torch.equal(small.validation, first.validation[:2])


def test_explicit_validation_source_and_max_train_tokens(tmp_path, monkeypatch):
    docs, held, tk = make_docs(40), make_docs(12, seed=1), tiny_tokenizer()
    path, held_path = write_txt(tmp_path / "d.txt", docs), write_jsonl(tmp_path / "v.jsonl", held)
    data = build_corpus(config(path, validation=str(held_path), validation_tokens=24), tk)
    assert torch.equal(data.validation, pack_tokens(held, tk, 8)[:3])
    assert torch.equal(blocks(data.train), pack_tokens(docs, tk, 8))
    encoded = []
    monkeypatch.setattr(corpus, "BATCH_SIZE", 2)
    monkeypatch.setattr(
        corpus,
        "encode_documents",
        lambda tok, texts, eos, real=corpus.encode_documents: encoded.extend(texts) or real(tok, texts, eos),
    )
    limited = build_corpus(config(path, max_train_tokens=20), tk)
    assert limited.train_tokens == 16 and torch.equal(blocks(limited.train), pack_tokens(docs, tk, 8, max_tokens=20))
    assert len(encoded) < len(docs)  # only the documents the budget needs were tokenised


def test_second_call_loads_the_cache_without_tokenising(tmp_path, monkeypatch):
    tk, path = tiny_tokenizer(), write_txt(tmp_path / "d.txt", make_docs(50))
    calls = []
    monkeypatch.setattr(
        corpus,
        "encode_documents",
        lambda tok, texts, eos, real=corpus.encode_documents: calls.append(1) or real(tok, texts, eos),
    )
    cfg = config(path, validation_fraction=0.1)
    first = build_corpus(cfg, tk)
    assert calls and (tmp_path / "cache" / "tokenized" / first.fingerprint / "meta.json").is_file()
    assert [p.name for p in (tmp_path / "cache" / "tokenized").iterdir()] == [first.fingerprint]  # no temp left
    calls.clear()
    second = build_corpus(cfg, tk)
    assert not calls and second.fingerprint == first.fingerprint
    assert torch.equal(blocks(second.train), blocks(first.train)) and torch.equal(second.validation, first.validation)
    assert torch.equal(second.train[3]["input_ids"], second.train[3]["input_ids"])
    batch = next(iter(torch.utils.data.DataLoader(second.train, batch_size=4)))
    assert batch["input_ids"].shape == (4, 8) and batch["input_ids"].dtype == torch.long
    assert build_corpus(config(path, validation_fraction=0.1, seq_len=16), tk).fingerprint != first.fingerprint
    path.write_text(path.read_text() + "\n\nw1 w2 w3\n")
    os.utime(path, ns=(1, 1))
    assert corpus.corpus_fingerprint(cfg, tk) != first.fingerprint


def test_streaming_matches_map_style_and_skips(tmp_path):
    docs, held, tk = make_docs(40), make_docs(10, seed=1), tiny_tokenizer()
    path, held_path = write_jsonl(tmp_path / "d.jsonl", docs), write_txt(tmp_path / "v.txt", held)
    cfg = config(path, validation=str(held_path), validation_tokens=16)
    mapped, streamed = build_corpus(cfg, tk), build_corpus(DataConfig(**{**vars(cfg), "streaming": True}), tk)
    assert isinstance(streamed.train, torch.utils.data.IterableDataset) and streamed.train_tokens is None
    assert torch.equal(blocks(streamed.train), blocks(mapped.train))
    assert torch.equal(streamed.validation, mapped.validation)
    assert torch.equal(blocks(streamed.train), blocks(streamed.train))  # deterministic
    assert torch.equal(blocks(streamed.train.skip_blocks(3)), blocks(mapped.train)[3:])
    capped = build_corpus(DataConfig(**{**vars(cfg), "streaming": True, "max_train_tokens": 40}), tk)
    assert torch.equal(blocks(capped.train), blocks(mapped.train)[:5])
    assert torch.equal(blocks(capped.train.skip_blocks(2)), blocks(mapped.train)[2:5])
    batch = next(iter(torch.utils.data.DataLoader(streamed.train, batch_size=4)))
    assert batch["input_ids"].shape == (4, 8)


def test_streaming_holds_out_the_first_documents(tmp_path):
    docs, tk = make_docs(40), tiny_tokenizer()
    data = build_corpus(
        config(write_txt(tmp_path / "d.txt", docs), validation_fraction=0.1, validation_tokens=24, streaming=True), tk
    )
    assert torch.equal(data.validation, pack_tokens(docs, tk, 8)[:3])
    lengths, k = [len(tk(d, add_special_tokens=False).input_ids) + 1 for d in docs], 0
    while sum(lengths[:k]) < 24 + 1:
        k += 1
    assert torch.equal(blocks(data.train), pack_tokens(docs[k:], tk, 8))


def test_kjv_heldout_asset_loads():
    assert len(load_documents("asset:kjv-heldout")) == 101
    data = build_corpus(DataConfig("asset:kjv-heldout", seq_len=64, validation_tokens=640), tiny_tokenizer())
    assert data.validation.shape == (10, 64) and len(data.train) > 100 and data.train_tokens == len(data.train) * 64


def test_errors_name_the_problem(tmp_path, monkeypatch):
    tk = tiny_tokenizer()
    (tmp_path / "d.csv").write_text("text\nw1 w2\n")
    write_jsonl(tmp_path / "c.jsonl", make_docs(5), field="content")
    cases = {
        str(tmp_path / "missing.txt"): "missing.txt",
        str(tmp_path / "d.csv"): "d.csv",
        str(tmp_path / "c.jsonl"): "'text'",
        "asset:nope": "asset:nope",
    }
    for source, name in cases.items():
        with pytest.raises(UpcycleError, match=name) as error:
            build_corpus(config(source), tk)
        assert "\n" not in str(error.value)
    assert len(load_documents(str(tmp_path / "c.jsonl"), text_field="content")) == 5
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UpcycleError, match="could not load dataset 'someone/corpus' from the Hub"):
        build_corpus(DataConfig("someone/corpus"), tk)
    with pytest.raises(UpcycleError, match="seq_len"):
        DataConfig("x.txt", seq_len=1)


def test_training_mix_interleaves_sources_by_weight(tmp_path):
    kjv, code, tk = make_docs(60), make_docs(60, seed=2), tiny_tokenizer()
    first, second = write_txt(tmp_path / "a.txt", kjv), write_jsonl(tmp_path / "b.jsonl", code)
    mixed = corpus.load_mix([str(first), str(second)], [0.8, 0.2], "text", False, seed=0)
    texts = mixed["text"]
    assert sorted(texts) == sorted(kjv + code)  # every document once, nothing dropped or repeated
    assert (
        texts[:60].count(next(d for d in code)) <= 1 and sum(t in set(kjv) for t in texts[:40]) > 25
    )  # mostly the heavier source first
    both = [str(first), str(second)]
    even = build_corpus(DataConfig(both, validation_fraction=0.0, seq_len=8), tk)
    weighted = build_corpus(DataConfig(both, validation_fraction=0.0, seq_len=8, train_weights=[0.8, 0.2]), tk)
    assert even.fingerprint != weighted.fingerprint and len(even.train) == len(weighted.train)
    with pytest.raises(UpcycleError, match="one positive weight per train source"):
        DataConfig(both, train_weights=[1.0])


def test_several_validation_corpora_are_kept_apart(tmp_path):
    docs, tk = make_docs(40), tiny_tokenizer()
    train, a, b = (
        write_txt(tmp_path / "t.txt", docs),
        write_txt(tmp_path / "a.txt", make_docs(12, 3)),
        write_jsonl(tmp_path / "b.jsonl", make_docs(12, 4)),
    )
    data = build_corpus(config(train, validation=[str(a), str(b)], validation_tokens=24), tk)
    assert list(data.validation_sets) == ["a.txt", "b.jsonl"]
    assert torch.equal(data.validation_sets["a.txt"], pack_tokens(make_docs(12, 3), tk, 8)[:3])
    assert torch.equal(data.validation, torch.cat([data.validation_sets["a.txt"], data.validation_sets["b.jsonl"]]))
    again = build_corpus(config(train, validation=[str(a), str(b)], validation_tokens=24), tk)  # from the cache
    assert list(again.validation_sets) == ["a.txt", "b.jsonl"]
    with pytest.raises(UpcycleError, match="lists a source twice"):
        config(train, validation=[str(a), str(a)])


def test_python_docs_asset_is_prose_held_out_of_the_python_splits():
    from upcycle.assets import python_docs, python_stdlib_files

    docs = python_docs()
    assert len(docs) > 50 and all(isinstance(d, str) and d for d in docs)
    assert not any("pydoc_data" in path.parts for path in python_stdlib_files())
    assert load_documents("asset:python-docs")["text"][0] == docs[0]


@pytest.mark.parametrize("source", ["local", "hub"])
def test_an_interrupt_inside_datasets_is_raised_as_an_interrupt(tmp_path, monkeypatch, source):
    """datasets wraps what its builders raise in a DatasetGenerationError: a SIGTERM (or Ctrl-C) there is still an
    interruption, not a data error."""
    import importlib

    from datasets.exceptions import DatasetGenerationError

    from upcycle.checkpoint.writer import Terminated

    if source == "local":
        text_builder = importlib.import_module("datasets.packaged_modules.text.text").Text

        def terminated(self, *args, **kwargs):
            raise Terminated(15)
            yield

        monkeypatch.setattr(text_builder, "_generate_tables", terminated)
        path = str(write_txt(tmp_path / "d.txt", make_docs(10)))
    else:

        def load_dataset(*args, **kwargs):
            try:
                raise Terminated(15)
            except Terminated as interrupt:
                raise DatasetGenerationError("An error occurred while generating the dataset") from interrupt

        monkeypatch.setattr(datasets, "load_dataset", load_dataset)
        path = "someone/corpus"
    with pytest.raises(Terminated):
        build_corpus(config(path), tiny_tokenizer())
