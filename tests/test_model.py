"""The model stage's record and its checks of a local model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import prepare_model
import pytest
from hpc_finetune.io.cli import StageError


def record(path, tmp_path, source="local") -> dict:
    return prepare_model.main(prepare_model.Config(output=str(tmp_path / "model.json"), source=source, path=str(path)))


def test_record_of_the_demo_model(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    rec = record(tiny_model, tmp_path, source="demo")
    assert rec["path"] == str(Path(tiny_model).resolve())
    assert rec["num_parameters"] == AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    assert rec["model_type"] == "llama" and rec["weights"] == ["model.safetensors"]
    assert json.loads((tmp_path / "model.json").read_text()) == rec
    assert record(tiny_model, tmp_path)["fingerprint"] == rec["fingerprint"]


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "copy"))


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda d: shutil.rmtree(d), "does not exist; set model.path"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights found"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"), "not a valid safetensors"),
        (
            lambda d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})
            ),
            "lists shards that are missing: model-00002-of-00002.safetensors",
        ),
    ],
)
def test_incomplete_model_directory_is_named(model_copy, tmp_path, breakage, expected):
    breakage(model_copy)
    with pytest.raises(StageError) as err:
        record(model_copy, tmp_path)
    assert expected in str(err.value) and str(model_copy) in str(err.value)
    assert not (tmp_path / "model.json").exists()


def test_lfs_pointers_instead_of_weights_are_named(model_copy, tmp_path):
    """A directory cloned without git-lfs holds pointer files: say so, not "corrupt safetensors"."""
    (model_copy / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n"
    )
    with pytest.raises(StageError, match="model.safetensors are git-lfs pointer files.*git lfs pull"):
        record(model_copy, tmp_path)
