"""Image-text pairs for CLIP fine-tuning: loading through :mod:`datasets`, batching with a CLIP processor, and a
small synthetic set of coloured shapes with captions.

A *pairs source* is a ``.jsonl`` file with one object per line, holding an image path (``"image"`` or
``"file_name"``, relative to the file's folder or absolute) and a caption (``"text"`` or ``"caption"``), or a
folder holding such a ``metadata.jsonl`` (the Hugging Face imagefolder convention: ``file_name`` + ``text``).
"""

from __future__ import annotations

import io
import json
import os
import random
import string
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageDraw

from upcycle.errors import UpcycleError

IMAGE_KEYS = ("image", "file_name")
TEXT_KEYS = ("text", "caption")
METADATA = "metadata.jsonl"
SUMMARY_IMAGES = 1000  # pairs_summary reads the sizes of at most this many images

BACKGROUND = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = {"small": 0.45, "large": 0.85}  # shape extent as a fraction of its quadrant's side


# --- loading ---------------------------------------------------------------------------------------------------


def _first(record: dict, keys: Sequence[str]):
    return next((record[k] for k in keys if k in record), None)


def _read_records(path: Path) -> tuple[list[str], list[str]]:
    """(absolute image paths, captions) of a pairs ``.jsonl`` file, every image checked to exist."""
    from .text import json_lines

    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UpcycleError(f"cannot read {path} ({e}): give a readable UTF-8 .jsonl file") from e
    images, texts, missing = [], [], []
    for number, record in json_lines(path, raw):
        if not isinstance(record, dict):
            raise UpcycleError(
                f'{path}:{number} is not a JSON object: write one {{"file_name": ..., "text": ...}} object per line'
            )
        image, text = _first(record, IMAGE_KEYS), _first(record, TEXT_KEYS)
        if not isinstance(image, str) or not image.strip():
            raise UpcycleError(
                f'{path}:{number} has no string "image" or "file_name" field: give each line the path of its image'
            )
        if not isinstance(text, str) or not text.strip():
            raise UpcycleError(
                f'{path}:{number} has no non-empty string "text" or "caption" field: give each line its caption'
            )
        file = Path(image).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            missing.append((number, file))
        images.append(str(file.resolve()))
        texts.append(text)
    if missing:
        number, file = missing[0]
        raise UpcycleError(
            f"{len(missing)} of {len(images)} images listed in {path} do not exist, the first is "
            f"{file} (line {number}): fix the paths (relative to {path.parent}) or add the images"
        )
    if not images:
        raise UpcycleError(
            f'no image-text pairs in {path}: write one {{"file_name": ..., "text": ...}} object per line'
        )
    return images, texts


def load_pairs(source: str | Path) -> datasets.Dataset:
    """Image-text pairs of ``source`` (see the module docstring) as a dataset with columns ``image``
    (a :class:`datasets.Image` feature, decoded to an RGB PIL image on access) and ``text`` (str), in file order."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UpcycleError(
            f"image-text data path {path} does not exist: give a .jsonl file or a folder with {METADATA}"
        )
    if path.is_dir():
        if not (path / METADATA).is_file():
            raise UpcycleError(
                f"no {METADATA} in {path}: write one "
                '{"file_name": ..., "text": ...} object per image there, or give a .jsonl file'
            )
        path = path / METADATA
    elif path.suffix.lower() != ".jsonl":
        raise UpcycleError(f"unsupported image-text file {path}: give a .jsonl file or a folder with {METADATA}")
    images, texts = _read_records(path)
    data = datasets.Dataset.from_dict({"image": images, "text": texts})
    return data.cast_column("image", datasets.Image(mode="RGB"))


# --- batching --------------------------------------------------------------------------------------------------


class ImageTextCollator:
    """Batches rows ``{"image": PIL image, "text": str}`` with a CLIP processor into ``pixel_values`` [B, 3, H, W],
    ``input_ids`` [B, T] and ``attention_mask`` [B, T] (padded to the longest caption, truncated at ``max_length``
    tokens with the end-of-text token kept)."""

    def __init__(self, processor, max_length: int = 77) -> None:
        if max_length < 2:
            raise UpcycleError(f"max_length must be at least 2 (start and end tokens), got {max_length}: raise it")
        self.processor = processor
        self.max_length = max_length

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise UpcycleError("cannot collate an empty batch: give at least one image-text row")
        images, texts = [], []
        for row in rows:
            image, text = row.get("image"), row.get("text")
            if not isinstance(image, Image.Image) or not isinstance(text, str):
                raise UpcycleError(
                    f"a row holds {type(image).__name__} image and {type(text).__name__} text, "
                    "not a PIL image and a str: load the pairs with load_pairs"
                )
            images.append(image if image.mode == "RGB" else image.convert("RGB"))
            texts.append(text)
        batch = self.processor(
            images=images,
            text=texts,
            return_tensors="pt",
            padding="longest",
            truncation=True,
            max_length=self.max_length,
        )
        keys = ("pixel_values", "input_ids", "attention_mask")
        absent = [k for k in keys if k not in batch]
        if absent:
            raise UpcycleError(
                f"the processor returned no {', '.join(absent)}: pass a CLIP processor (image processor and tokenizer)"
            )
        return {k: batch[k] for k in keys}


# --- synthetic shapes ------------------------------------------------------------------------------------------


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box  # inclusive corners
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
    else:  # cross
        t = max(1, (x1 - x0 + 1) // 3)
        mx, my = (x0 + x1 - t + 1) // 2, (y0 + y1 - t + 1) // 2
        draw.rectangle((mx, y0, mx + t - 1, y1), fill=colour)
        draw.rectangle((x0, my, x1, my + t - 1), fill=colour)


def _render(rng: random.Random, image_size: int) -> tuple[Image.Image, dict[str, str]]:
    """One image with one shape fully inside one quadrant, jittered in place, and its attributes."""
    attributes = {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(list(COLOURS)),
        "position": rng.choice(POSITIONS),
        "size": rng.choice(list(SIZES)),
    }
    half = image_size // 2
    side = max(3, round(half * SIZES[attributes["size"]]))
    left = attributes["position"].endswith("right") * (image_size - half)
    top = attributes["position"].startswith("bottom") * (image_size - half)
    x0 = left + rng.randint(0, half - side)
    y0 = top + rng.randint(0, half - side)
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    _draw_shape(
        ImageDraw.Draw(image),
        attributes["shape"],
        (x0, y0, x0 + side - 1, y0 + side - 1),
        COLOURS[attributes["colour"]],
    )
    return image, attributes


def caption(attributes: dict[str, str]) -> str:
    """The caption of a synthetic image, e.g. ``"a small red circle at the top left"``."""
    return f"a {attributes['size']} {attributes['colour']} {attributes['shape']} at the {attributes['position']}"


def synthetic_vocabulary() -> list[str]:
    """Every word of the synthetic captions, sorted (for tiny tokenizers and zero-shot prompts)."""
    words = {"a", "at", "the", *SHAPES, *COLOURS, *SIZES, *(w for p in POSITIONS for w in p.split())}
    return sorted(words)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_synthetic_shapes(
    folder: Path, count: int, seed: int = 0, image_size: int = 32, heldout_fraction: float = 0.2
) -> tuple[Path, Path]:
    """Render ``count`` images of one shape (``SHAPES``) in one colour (``COLOURS``), small or large, in one quadrant
    (``POSITIONS``) on white, into ``folder/images/``; write ``folder/train.jsonl`` and ``folder/heldout.jsonl``
    (a seeded ``heldout_fraction`` of the samples; a combination may occur in both, as different samples) and return
    their paths. Records hold ``image``, ``text`` and the attributes; the same arguments give the same files."""
    if count < 2:
        raise UpcycleError(f"count must be at least 2 (one train and one held-out sample), got {count}: raise it")
    if not 0 < heldout_fraction < 1:
        raise UpcycleError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}: fix it")
    if image_size < 16:
        raise UpcycleError(f"image_size must be at least 16 pixels, got {image_size}: raise it")
    folder = Path(folder).expanduser()
    paths = folder / "train.jsonl", folder / "heldout.jsonl"
    for path in paths:  # a crash below must not leave an old listing pointing at new images
        path.unlink(missing_ok=True)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng, width, records = random.Random(seed), len(str(count - 1)), []
    for i in range(count):
        image, attributes = _render(rng, image_size)
        name = f"images/{i:0{width}d}.png"
        image.save(folder / name)
        records.append({"image": name, "text": caption(attributes), **attributes})
    held = set(
        np.random.default_rng(seed)
        .permutation(count)[: min(count - 1, max(1, round(count * heldout_fraction)))]
        .tolist()
    )
    _write_jsonl(paths[1], [r for i, r in enumerate(records) if i in held])
    _write_jsonl(paths[0], [r for i, r in enumerate(records) if i not in held])
    return paths


# --- logging ---------------------------------------------------------------------------------------------------


def _image_size(value) -> tuple[int, int]:
    if isinstance(value, Image.Image):
        return value.size
    with Image.open(value["path"] if value.get("bytes") is None else io.BytesIO(value["bytes"])) as image:
        return image.size  # header only


def pairs_summary(dataset: datasets.Dataset) -> str:
    """One line for logs: number of pairs, image size(s) (of the first ``SUMMARY_IMAGES``), mean caption words."""
    n = len(dataset)
    if n == 0:
        return "0 image-text pairs"
    head = dataset.select(range(min(n, SUMMARY_IMAGES)))
    if isinstance(head.features.get("image"), datasets.Image):
        head = head.cast_column("image", datasets.Image(decode=False))
    counts: dict[tuple[int, int], int] = {}
    for value in head["image"]:
        size = _image_size(value)
        counts[size] = counts.get(size, 0) + 1
    sizes = [f"{w}x{h}" for w, h in sorted(counts, key=lambda s: (s[0] * s[1], s))]
    shown = (
        sizes[0]
        if len(sizes) == 1
        else f"{len(sizes)} sizes (" + (", ".join(sizes) if len(sizes) <= 3 else f"{sizes[0]} to {sizes[-1]}") + ")"
    )
    if n > len(head):
        shown += f" (first {len(head)})"
    words = sum(len(text.split()) for text in dataset["text"]) / n
    return f"{n} image-text pairs, images {shown}, mean caption {words:.1f} words"


def synthetic_clip_processor(image_size: int = 32):
    """A CLIP processor for the synthetic shapes set, built offline: the real CLIP image processor and a real
    CLIPTokenizer (byte-level BPE, lower-cased) whose vocabulary and merges are trained here on the synthetic caption
    words, so each of those words is one token and any other lower-case word falls back to letters. 117 tokens; the
    last three are ``<unk>``, ``<|startoftext|>`` and ``<|endoftext|>`` (also the pad token), so the end token has
    the highest id, as in CLIP."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(
        synthetic_vocabulary() + list(string.ascii_lowercase),
        trainers.BpeTrainer(
            vocab_size=1000,
            show_progress=False,
            end_of_word_suffix="</w>",
            initial_alphabet=list(string.ascii_lowercase),
        ),
    )
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for special in ("<unk>", "<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]], unk_token="<unk>")
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)
