"""Opening a conversion's inputs: a folder or a Hub id, refused when already converted, its Hub id resolved once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_clip, build_dense
from test_card import snapshot
from test_cli import assert_one_line_error, leftovers, run

from upcycle.checkpoint import source as source_module
from upcycle.checkpoint.source import Source, hub_model_id, local_name, open_source, source_hub_id, source_license
from upcycle.errors import UpcycleError


def converted(tmp_path: Path, src: Path, name: str, *args: str) -> Path:
    """``upcycle convert SRC tmp_path/name ARGS``: an upcycle model."""
    out = tmp_path / name
    result = run("convert", src, out, *args)
    assert result.exit_code == 0, result.output
    return out


def test_open_source_on_a_dense_folder(dense):
    source = open_source(str(dense))
    assert isinstance(source, Source) and source.reference == str(dense) and source.role == "SRC"
    assert source.folder == dense and source.reader.folder == dense and source.reader.config["model_type"] == "llama"
    assert source.hub_id is None and source.base_model == "dense"  # a local folder: the card names it by its name
    assert open_source(str(dense), role="--expert").role == "--expert"


def test_open_source_refuses_a_converted_folder_in_one_line(tmp_path, dense):
    moh = converted(tmp_path, dense, "moh")
    with pytest.raises(UpcycleError) as caught:
        open_source(str(moh), role="--expert")
    assert str(caught.value) == (
        f"{moh} is already an upcycle moh model (converted from a llama checkpoint); "
        "convert the original dense checkpoint instead"
    )


def test_open_source_of_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(UpcycleError, match="does not exist; pass an existing model folder or a Hub id"):
        open_source(str(tmp_path / "nope"))


def test_hub_id_from_a_hub_id(tmp_path, monkeypatch):
    downloaded = build_dense(snapshot(tmp_path, "org/tiny"))
    monkeypatch.chdir(tmp_path)  # no local folder org/tiny
    monkeypatch.setattr(source_module, "_download", lambda repo_id: downloaded if repo_id == "org/tiny" else None)
    source = open_source("org/tiny")
    assert source.folder == downloaded and source.hub_id == "org/tiny" and source.base_model == "org/tiny"
    assert source_hub_id("org/tiny") == "org/tiny"  # known without downloading: what --push-to-hub checks


def test_hub_id_from_a_cache_snapshot_path(tmp_path):
    folder = build_dense(snapshot(tmp_path, "org/cached"))
    assert open_source(str(folder)).hub_id == "org/cached" and source_hub_id(str(folder)) == "org/cached"
    assert local_name(str(folder)) == "org/cached" and local_name(str(tmp_path / "plain")) == "plain"


def test_hub_id_from_name_or_path(tmp_path, dense):
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps(config | {"_name_or_path": "org/named"}))
    assert open_source(str(dense)).hub_id == "org/named" and source_hub_id(str(dense)) == "org/named"
    (dense / "config.json").write_text(json.dumps(config | {"_name_or_path": str(tmp_path)}))  # a local path is no id
    assert open_source(str(dense)).hub_id is None and source_hub_id(str(dense)) is None


def test_hub_id_from_the_cards_base_model(dense):
    card = "---\nbase_model: org/ancestor\nlicense: apache-2.0\n---\n\n# a local derivative\n"
    (dense / "README.md").write_text(card)
    source = open_source(str(dense))
    assert source.hub_id == "org/ancestor" and source.base_model == "org/ancestor"
    assert hub_model_id(str(dense), dense) == "org/ancestor" and source_hub_id(str(dense)) == "org/ancestor"
    assert source_license(dense) == {"license": "apache-2.0"}


def test_clip_moe_refuses_an_upcycle_model_as_expert(tmp_path):
    base = build_clip(tmp_path / "base")
    moe = converted(tmp_path, base, "moe", "--method", "clip-moe", "--upcycle-copies", "2")
    result = run("convert", base, tmp_path / "out", "--method", "clip-moe", "--expert", moe)
    assert_one_line_error(
        result,
        f"{moe} is already an upcycle clip-moe model (converted from a clip checkpoint)",
        "convert the original dense checkpoint instead",
    )
    assert leftovers(tmp_path) == []


def test_bam_refuses_an_upcycle_model_as_expert(tmp_path, dense):
    moh = converted(tmp_path, dense, "moh")
    result = run("convert", dense, tmp_path / "out", "--method", "bam", "--expert", moh)
    assert_one_line_error(
        result, f"{moh} is already an upcycle moh model", "convert the original dense checkpoint instead"
    )
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hub_id_calls(monkeypatch) -> list[str]:
    """The references ``hub_model_id`` is asked about, in order."""
    calls, real = [], source_module.hub_model_id

    def counted(reference: str, *args, **kwargs):
        calls.append(reference)
        return real(reference, *args, **kwargs)

    monkeypatch.setattr(source_module, "hub_model_id", counted)
    return calls


def test_the_source_hub_id_is_resolved_once(tmp_path, hub_id_calls):
    dense = build_dense(snapshot(tmp_path, "org/tiny-llama"))
    out = converted(tmp_path, dense, "moh")
    assert hub_id_calls == [str(dense)]
    report = json.loads((out / "upcycle_report.json").read_text())
    assert report["base_model"] == "org/tiny-llama" and report["base_models"] == ["org/tiny-llama"]


def test_each_expert_hub_id_is_resolved_once(tmp_path, hub_id_calls):
    seed = build_dense(snapshot(tmp_path, "org/seed"))
    expert = build_dense(snapshot(tmp_path, "org/expert"), seed=1)
    out = converted(tmp_path, seed, "mix", "--method", "bam", "--expert", expert)
    assert sorted(hub_id_calls) == sorted([str(seed), str(expert)])
    report = json.loads((out / "upcycle_report.json").read_text())
    assert report["base_model"] == "org/seed" and report["base_models"] == ["org/seed", "org/expert"]
    assert report["experts"] == [str(seed), str(expert)]
