import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from upcycle.data.image_text import (
    BACKGROUND,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ImageTextCollator,
    load_pairs,
    pairs_summary,
    synthetic_clip_processor,
    synthetic_vocabulary,
    write_synthetic_shapes,
)
from upcycle.errors import UpcycleError


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    datasets.disable_progress_bars()


def tiny_clip_processor(image_size: int = 32):
    """The offline CLIP processor of the synthetic shapes set (see ``synthetic_clip_processor``)."""
    return synthetic_clip_processor(image_size)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def save_image(path: Path, colour=(255, 0, 0), size=(20, 12), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path


# --- synthetic shapes ------------------------------------------------------------------------------------------


def test_synthetic_shapes_is_deterministic_and_split_by_sample(tmp_path):
    train, heldout = write_synthetic_shapes(tmp_path / "a", 60, seed=3)
    again = write_synthetic_shapes(tmp_path / "b", 60, seed=3)
    other = write_synthetic_shapes(tmp_path / "c", 60, seed=4)
    assert (train.name, heldout.name) == ("train.jsonl", "heldout.jsonl") and train.parent == tmp_path / "a"
    assert train.read_text() == again[0].read_text() and heldout.read_text() == again[1].read_text()
    for record in read_jsonl(train) + read_jsonl(heldout):
        assert (tmp_path / "a" / record["image"]).read_bytes() == (tmp_path / "b" / record["image"]).read_bytes()
    assert train.read_text() + heldout.read_text() != other[0].read_text() + other[1].read_text()

    train_rows, held_rows = read_jsonl(train), read_jsonl(heldout)
    assert (len(train_rows), len(held_rows)) == (48, 12)
    assert not {r["image"] for r in train_rows} & {r["image"] for r in held_rows}
    assert sorted(r["image"] for r in train_rows + held_rows) == sorted(
        f"images/{p.name}" for p in (tmp_path / "a" / "images").glob("*.png")
    )
    # a seeded random choice of samples: spread out, and another seed picks others
    held = sorted(int(Path(r["image"]).stem) for r in held_rows)
    assert held[-1] - held[0] > 12 and held != sorted(int(Path(r["image"]).stem) for r in read_jsonl(other[1]))
    # enough variety: every shape, colour, position and size occurs
    for key, values in (("shape", SHAPES), ("colour", COLOURS), ("position", POSITIONS), ("size", SIZES)):
        assert {r[key] for r in train_rows + held_rows} == set(values)
    assert not list(tmp_path.glob("*/.*.tmp")), "temporary jsonl files must be renamed away"


def test_repeated_combinations_are_different_samples(tmp_path):
    train, heldout = write_synthetic_shapes(tmp_path, 400, seed=0)
    rows = read_jsonl(train) + read_jsonl(heldout)
    by_caption: dict[str, list[bytes]] = {}
    for r in rows:
        by_caption.setdefault(r["text"], []).append(np.asarray(Image.open(tmp_path / r["image"])).tobytes())
    repeated = [images for images in by_caption.values() if len(images) > 1]
    assert repeated, "400 samples of 192 combinations must repeat some"
    assert sum(len(set(images)) > 1 for images in repeated) >= len(repeated) // 2  # jittered, not copies
    held_captions, train_captions = {r["text"] for r in read_jsonl(heldout)}, {r["text"] for r in read_jsonl(train)}
    assert held_captions & train_captions, "split by sample: some held-out combinations also occur in train"


@pytest.mark.parametrize("image_size", [32, 48])
def test_captions_match_what_is_drawn(tmp_path, image_size):
    train, heldout = write_synthetic_shapes(tmp_path, 80, seed=1, image_size=image_size)
    rows = read_jsonl(train) + read_jsonl(heldout)
    areas = {"small": [], "large": []}
    for r in rows:
        assert r["text"] == f"a {r['size']} {r['colour']} {r['shape']} at the {r['position']}"
        pixels = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB")).astype(int)
        assert pixels.shape == (image_size, image_size, 3)
        mask = (pixels != BACKGROUND).any(-1)
        colours, counts = np.unique(pixels[mask], axis=0, return_counts=True)
        dominant = tuple(colours[counts.argmax()])
        nearest = min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], dominant)))
        assert nearest == r["colour"], r
        ys, xs = np.nonzero(mask)
        half = image_size // 2
        vertical = "top" if ys.max() < half else "bottom" if ys.min() >= half else "both"
        horizontal = "left" if xs.max() < half else "right" if xs.min() >= half else "both"
        assert f"{vertical} {horizontal}" == r["position"], r
        areas[r["size"]].append(mask.sum())
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        if r["shape"] == "square":
            assert fill == 1, r
        elif r["shape"] == "circle":
            assert 0.6 < fill < 0.95, r
        elif r["shape"] == "triangle":
            assert 0.35 < fill < 0.75, r
            rows_filled = mask[ys.min() : ys.max() + 1].sum(1)
            assert rows_filled[0] < rows_filled[-1], r  # apex up
        else:
            assert 0.3 < fill < 0.75, r
            middle = mask[(ys.min() + ys.max()) // 2, xs.min() : xs.max() + 1]
            corner = mask[ys.min(), xs.min()]
            assert middle.all() and not corner, r
    assert max(areas["small"]) < min(areas["large"])


def test_synthetic_shapes_rejects_bad_arguments(tmp_path):
    with pytest.raises(UpcycleError, match="count must be at least 2"):
        write_synthetic_shapes(tmp_path, 1)
    with pytest.raises(UpcycleError, match=r"heldout_fraction must be in \(0, 1\)"):
        write_synthetic_shapes(tmp_path, 10, heldout_fraction=1.0)
    with pytest.raises(UpcycleError, match="image_size must be at least 16"):
        write_synthetic_shapes(tmp_path, 10, image_size=8)


def test_rewriting_a_folder_replaces_the_listing(tmp_path):
    write_synthetic_shapes(tmp_path, 20, seed=0)
    train, heldout = write_synthetic_shapes(tmp_path, 10, seed=5)
    assert len(read_jsonl(train)) + len(read_jsonl(heldout)) == 10
    assert len(read_jsonl(heldout)) == 2


# --- load_pairs --------------------------------------------------------------------------------------------------


def test_load_pairs_reads_synthetic_jsonl(tmp_path):
    train, _ = write_synthetic_shapes(tmp_path / "shapes", 20, seed=2)
    data = load_pairs(str(train))
    rows = read_jsonl(train)
    assert isinstance(data, datasets.Dataset) and len(data) == len(rows) == 16
    assert isinstance(data.features["image"], datasets.Image) and data.column_names == ["image", "text"]
    assert data["text"][:] == [r["text"] for r in rows]
    first = data[0]
    assert isinstance(first["image"], Image.Image) and first["image"].mode == "RGB" and first["image"].size == (32, 32)
    assert np.array_equal(np.asarray(first["image"]), np.asarray(Image.open(tmp_path / "shapes" / rows[0]["image"])))


def test_load_pairs_reads_imagefolder_metadata_and_alternative_keys(tmp_path):
    folder = tmp_path / "folder"
    save_image(folder / "a.png", (255, 0, 0))
    save_image(folder / "sub" / "b.png", mode="L")  # grey: converted to RGB on access
    absolute = save_image(tmp_path / "elsewhere" / "c.png", (0, 0, 255), size=(8, 8))
    write_jsonl(
        folder / "metadata.jsonl",
        [
            {"file_name": "a.png", "text": "a red thing", "extra": 1},
            "",
            {"image": "sub/b.png", "caption": "a grey thing"},
            {"file_name": str(absolute), "text": "a blue thing"},
        ],
    )
    data = load_pairs(folder)
    assert data["text"][:] == ["a red thing", "a grey thing", "a blue thing"]
    images = [row["image"] for row in data]
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    assert images[0].getpixel((0, 0)) == (255, 0, 0) and images[1].getpixel((0, 0)) == (128, 128, 128)
    assert images[2].size == (8, 8) and images[2].getpixel((3, 3)) == (0, 0, 255)
    # the metadata file given directly is the same set
    assert load_pairs(folder / "metadata.jsonl")["text"][:] == data["text"][:]


def test_load_pairs_errors(tmp_path):
    save_image(tmp_path / "ok.png")
    with pytest.raises(UpcycleError, match="image-text data path .*nowhere.jsonl does not exist"):
        load_pairs(tmp_path / "nowhere.jsonl")
    with pytest.raises(UpcycleError, match=r"no metadata.jsonl in .*: write one"):
        load_pairs(tmp_path)
    with pytest.raises(UpcycleError, match=r"unsupported image-text file .*ok.png"):
        load_pairs(tmp_path / "ok.png")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"image": "ok.png", "text": "fine"}, "{not json"])
    with pytest.raises(UpcycleError, match=r"bad.jsonl:2 is not valid JSON"):
        load_pairs(bad)
    no_image = write_jsonl(tmp_path / "no_image.jsonl", [{"path": "ok.png", "text": "fine"}])
    with pytest.raises(UpcycleError, match=r'no_image.jsonl:1 has no string "image" or "file_name" field'):
        load_pairs(no_image)
    no_text = write_jsonl(tmp_path / "no_text.jsonl", ["", {"image": "ok.png", "label": 3}])
    with pytest.raises(UpcycleError, match=r'no_text.jsonl:2 has no non-empty string "text" or "caption" field'):
        load_pairs(no_text)
    not_object = write_jsonl(tmp_path / "list.jsonl", [["ok.png", "fine"]])
    with pytest.raises(UpcycleError, match=r"list.jsonl:1 is not a JSON object"):
        load_pairs(not_object)
    missing = write_jsonl(
        tmp_path / "missing.jsonl",
        [
            {"image": "ok.png", "text": "fine"},
            {"image": "gone1.png", "text": "x"},
            {"image": "gone2.png", "text": "y"},
        ],
    )
    with pytest.raises(
        UpcycleError,
        match=r"2 of 3 images listed in .*missing.jsonl do not exist, the first is "
        r".*gone1.png \(line 2\)",
    ):
        load_pairs(missing)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UpcycleError, match=r"no image-text pairs in .*empty.jsonl"):
        load_pairs(empty)


def test_error_messages_are_one_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"image": "a.png",'])
    with pytest.raises(UpcycleError) as info:
        load_pairs(bad)
    assert "\n" not in str(info.value) and ": write one JSON object per line" in str(info.value)


# --- collator and summary ----------------------------------------------------------------------------------------


def test_tiny_clip_processor_tokenizes_caption_words_whole():
    tokenizer = tiny_clip_processor().tokenizer
    words = synthetic_vocabulary()
    assert len(words) == 19 and {"circle", "purple", "bottom", "large", "the"} <= set(words)
    assert [tokenizer.tokenize(w) for w in words] == [[w + "</w>"] for w in words]
    assert len(tokenizer) == 117 and (tokenizer.bos_token_id, tokenizer.eos_token_id) == (115, 116)
    assert tokenizer.pad_token_id == 116 and tokenizer.tokenize("Zebra,") == ["z", "e", "b", "r", "a</w>", "<unk>"]


def test_collator_shapes_padding_and_truncation(tmp_path):
    train, _ = write_synthetic_shapes(tmp_path, 10, seed=0)
    data = load_pairs(train)
    processor = tiny_clip_processor()
    tokenizer = processor.tokenizer
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rows = [data[0], data[1], {"image": Image.new("L", (50, 40), 200), "text": "Red square"}]
    batch = ImageTextCollator(processor)(rows)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == (3, 10) and batch["input_ids"].dtype == torch.long  # 8 words + start + end
    assert batch["attention_mask"].sum(1).tolist() == [10, 10, 4]
    words = tokenizer.convert_tokens_to_ids(["red</w>", "square</w>"])
    assert batch["input_ids"][2].tolist() == [bos, *words] + [eos] * 7
    words = tokenizer.convert_tokens_to_ids([w + "</w>" for w in rows[0]["text"].split()])
    assert batch["input_ids"][0].tolist() == [bos, *words, eos]
    # the image is the processor's own output for it
    expected = processor.image_processor(images=[rows[0]["image"]], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(batch["pixel_values"][0], expected)

    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=ImageTextCollator(processor))
    assert [b["pixel_values"].shape[0] for b in loader] == [4, 4]
    assert torch.equal(next(iter(loader))["input_ids"][:2], batch["input_ids"][:2])

    short = ImageTextCollator(processor, max_length=6)(rows)
    assert short["input_ids"].shape == (3, 6) and short["attention_mask"].sum(1).tolist() == [6, 6, 4]
    assert short["input_ids"][:2, -1].tolist() == [eos, eos]  # truncated captions keep their end token
    assert short["input_ids"][:, :5].tolist() == batch["input_ids"][:, :5].tolist()


def test_collator_errors():
    processor = tiny_clip_processor()
    with pytest.raises(UpcycleError, match="max_length must be at least 2"):
        ImageTextCollator(processor, max_length=1)
    with pytest.raises(UpcycleError, match="cannot collate an empty batch"):
        ImageTextCollator(processor)([])
    with pytest.raises(UpcycleError, match="holds str image and str text.*load the pairs with load_pairs"):
        ImageTextCollator(processor)([{"image": "a.png", "text": "a"}])
    with pytest.raises(UpcycleError, match="processor returned no pixel_values"):
        ImageTextCollator(lambda **kwargs: {"input_ids": torch.zeros(1, 2), "attention_mask": torch.ones(1, 2)})(
            [{"image": Image.new("RGB", (4, 4)), "text": "a"}]
        )


def test_pairs_summary(tmp_path):
    train, _ = write_synthetic_shapes(tmp_path / "shapes", 10, seed=0)
    data = load_pairs(train)
    words = np.mean([len(t.split()) for t in data["text"]])
    assert pairs_summary(data) == f"8 image-text pairs, images 32x32, mean caption {words:.1f} words"
    save_image(tmp_path / "mixed" / "a.png", size=(20, 12))
    save_image(tmp_path / "mixed" / "b.png", size=(8, 8))
    write_jsonl(
        tmp_path / "mixed" / "metadata.jsonl",
        [{"file_name": "a.png", "text": "one two three"}, {"file_name": "b.png", "text": "one"}],
    )
    assert (
        pairs_summary(load_pairs(tmp_path / "mixed"))
        == "2 image-text pairs, images 2 sizes (8x8, 20x12), mean caption 2.0 words"
    )
    assert "\n" not in pairs_summary(data)
