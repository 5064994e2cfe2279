"""The model stage's record and its checks of a local model directory."""

from __future__ import annotations

import json
import re
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
        (lambda d: truncate(d / "model.safetensors", 20), "header is unreadable"),
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


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def half(path: Path) -> None:
    truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (half, r"cut off: the file has [\d,]+ bytes but its header places tensor data up to byte [\d,]+ \([\d,]+ bytes "
               r"missing\)"),
        (lambda p: truncate(p, p.stat().st_size - 1), r"\(1 byte missing\)"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 16), "16 bytes follow the end of the last tensor"),
    ],
)
def test_a_cut_off_or_padded_weight_file_is_named_with_the_fix(model_copy, tmp_path, breakage, expected):
    """What the loader would refuse in the train job (safetensors: "incomplete metadata, file not fully covered")
    is refused by the model stage, naming the file and the fix."""
    from safetensors import SafetensorError, safe_open

    weights = model_copy / "model.safetensors"
    breakage(weights)
    with pytest.raises(SafetensorError):  # the loader agrees that the file is unusable
        with safe_open(str(weights), "pt") as fh:
            [fh.get_tensor(k) for k in fh.keys()]
    with pytest.raises(StageError) as err:
        record(model_copy, tmp_path)
    assert re.search(expected, str(err.value)), str(err.value)
    assert f"model weights {weights}:" in str(err.value) and "copy or download that file again" in str(err.value)


def test_the_damaged_shard_of_a_sharded_model_is_the_one_named(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(sharded, max_shard_size="200KB")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, sharded / name)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert record(sharded, tmp_path)["weights"] == [p.name for p in shards]  # whole: accepted
    half(shards[1])
    with pytest.raises(StageError, match=rf"model weights {re.escape(str(shards[1]))}: cut off"):
        record(sharded, tmp_path)


def test_pytorch_bin_weights_are_checked_too(model_copy, tmp_path):
    import torch
    from safetensors.torch import load_file

    weights = model_copy / "pytorch_model.bin"
    torch.save(load_file(model_copy / "model.safetensors"), weights)
    (model_copy / "model.safetensors").unlink()
    assert record(model_copy, tmp_path)["num_parameters"] is None  # whole: accepted (no header to count from)
    half(weights)
    with pytest.raises(StageError, match="pytorch_model.bin: not a complete PyTorch weight file .*cut off.*copy or "
                                         "download that file again"):
        record(model_copy, tmp_path)
