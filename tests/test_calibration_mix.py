"""Calibration on a mix of texts: each text gets its share of the budget, the blocks interleave, every method and
recipe takes the same spelling, and the report and card say what was used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import VOCAB, build_dense
from test_cli import assert_one_line_error, run

from upcycle.data.calibration import calibration_blocks
from upcycle.errors import UpcycleError


def texts(tmp_path: Path) -> tuple[Path, Path]:
    """Two texts with disjoint vocabularies: w0..w49 and w50..w99 (tokens 3..52 and 53..102)."""
    low = " ".join(f"w{i % 50}" for i in range(3000))
    high = " ".join(f"w{50 + i % 50}" for i in range(3000))
    (tmp_path / "low.txt").write_text(low + "\n")
    (tmp_path / "high.txt").write_text(high + "\n")
    return tmp_path / "low.txt", tmp_path / "high.txt"


def source_of(block) -> str:
    ids = set(block.tolist())
    assert ids <= set(range(3, 53)) or ids <= set(range(53, 103)), "a block mixes the two texts"
    return "low" if max(ids) < 53 else "high"


@pytest.mark.parametrize("weights,expected", [(None, (4, 4)), ([3, 1], (6, 2)), ([0.25, 0.75], (2, 6))])
def test_each_text_gets_its_share_of_the_budget(tmp_path, dense, weights, expected):
    low, high = texts(tmp_path)
    config = json.loads((dense / "config.json").read_text())
    blocks = calibration_blocks(dense, config, [low, high], 1024, 128, encoder=False, weights=weights)  # [8, 128]
    assert tuple(blocks.shape) == (8, 128)
    sources = [source_of(block) for block in blocks]
    assert (sources.count("low"), sources.count("high")) == expected
    assert sources != sorted(sources) or len(set(sources)) == 1  # interleaved, not one text after the other


def test_a_share_below_one_block_shortens_the_blocks(tmp_path, dense):
    low, high = texts(tmp_path)
    config = json.loads((dense / "config.json").read_text())
    blocks = calibration_blocks(dense, config, [low, high], 512, 512, encoder=False)
    assert tuple(blocks.shape) == (2, 256) and sorted(map(source_of, blocks)) == ["high", "low"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--calibration-weights", "1", "--calibration-weights", "2"], "2 --calibration-weights for 1 --calibration"),
        (["--calibration-weights", "-1"], "give finite weights >= 0"),
        (["--calibration-weights", "0"], "give finite weights >= 0 that do not all vanish"),
    ],
)
def test_bad_weights_are_one_line(tmp_path, dense, args, needle):
    low, _ = texts(tmp_path)
    result = run("convert", dense, tmp_path / "out", "--router", "fitted", "--calibration", low, *args)
    assert_one_line_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_weights_without_calibration_and_unknown_assets(tmp_path, dense):
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--calibration-weights", "1"),
        "--calibration-weights applies only with --calibration",
    )
    assert_one_line_error(
        run("convert", dense, tmp_path / "out", "--router", "fitted", "--calibration", "asset:klingon"),
        "--calibration asset:klingon is not a text asset",
    )
    with pytest.raises(UpcycleError, match="does not exist"):
        calibration_blocks(dense, {}, ["missing.txt"], 1024, 128, encoder=False)


def test_a_mix_from_the_command_line_is_recorded_and_carded(tmp_path):
    dense = build_dense(tmp_path / "dense")
    low, high = texts(tmp_path)
    args = ["--router", "fitted", "--calibration", low, "--calibration", high]
    result = run("convert", dense, tmp_path / "out", *args, "--calibration-weights", "3", "--calibration-weights", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "upcycle_report.json").read_text())
    assert report["options"]["calibration"] == [str(low), str(high)]
    assert report["options"]["calibration_weights"] == [3.0, 1.0]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Calibration data: `low.txt` (75%), `high.txt` (25%), 16,384 tokens." in card and str(tmp_path) not in card


def test_a_recipe_takes_a_mix_or_one_text(tmp_path):
    from upcycle.train.recipe import load_recipe

    dense = build_dense(tmp_path / "dense")
    low, high = texts(tmp_path)
    base = {
        "model": str(dense),
        "output": str(tmp_path / "run"),
        "data": {"train": str(low), "seq_len": 32},
        "training": {"steps": 2, "global_batch_tokens": 64, "micro_batch_size": 2},
    }
    mix = base | {"convert": {"method": "moh", "calibration": [str(low), str(high)], "calibration_weights": [1, 1]}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix))
    recipe = load_recipe(str(tmp_path / "mix.yaml"))
    assert recipe.convert.calibration == [str(low), str(high)] and recipe.convert.calibration_weights == [1.0, 1.0]
    one = base | {"convert": {"method": "moh", "calibration": str(low)}}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    assert load_recipe(str(tmp_path / "one.yaml")).convert.calibration == [str(low)]
    missing = base | {"convert": {"method": "moh", "calibration": [str(low), str(tmp_path / "gone.txt")]}}
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(missing))
    with pytest.raises(UpcycleError, match="'convert.calibration': .*gone.txt does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_calibration_inside_out_is_refused_for_every_text_of_a_mix(tmp_path, dense):
    out = tmp_path / "out"
    out.mkdir()
    low, _ = texts(out)
    (tmp_path / "other.txt").write_text(" ".join(VOCAB[3:]) + "\n")
    result = run(
        "convert",
        dense,
        out,
        "--overwrite",
        "--router",
        "fitted",
        "--calibration",
        tmp_path / "other.txt",
        "--calibration",
        low,
    )
    assert_one_line_error(result, "--calibration #2", "is inside OUT")
    assert low.exists()
