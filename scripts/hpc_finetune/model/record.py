"""The model stage's checks of a model directory and what its record (model.json) holds: complete (config with a
model_type, a tokenizer, every weight file; no git-lfs pointer left in place of a file), its parameter count read
from the safetensors headers, and a fingerprint of its files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hpc_finetune.hub.snapshot import is_lfs_pointer
from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import read_json
from hpc_finetune.model.weights import check_pickle, check_safetensors, weight_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
LOCAL_FIX = "copy or download that file again from where the model came from"


def check_weights(weights: list[Path], fix: str = LOCAL_FIX) -> int | None:
    """Every weight file whole (check_safetensors, check_pickle): a cut-off or corrupt one is named with the fix
    here, not by the loader in the train job. Returns the parameter count (None for .bin weights)."""
    params = 0
    for path in weights:
        try:
            if path.suffix == ".safetensors":
                params += check_safetensors(path)
            else:
                check_pickle(path)
        except StageError as err:
            raise StageError(f"{err}; {fix}") from None
    return params if weights[0].suffix == ".safetensors" else None


def check_model_dir(directory: Path, fix: str = LOCAL_FIX) -> dict:
    """Validate a model directory; return what the record needs. Errors name the directory (or the file) and the
    fix; `fix` says how to replace a damaged weight file."""
    if not directory.is_dir():
        raise StageError(f"model directory {directory} does not exist; set model.path to a downloaded model")
    pointers = sorted(p.name for p in directory.iterdir() if is_lfs_pointer(p))
    if pointers:
        raise StageError(
            f"model {directory}: {', '.join(pointers[:5])} are git-lfs pointer files, not their contents: the "
            "directory was cloned without git-lfs. Run `git lfs pull` in it, or use model.source: hub"
        )
    model_config = read_json(directory / "config.json", "model config") if (directory / "config.json").is_file() else None
    if not model_config or "model_type" not in model_config:
        raise StageError(f"model {directory}: config.json is missing or has no model_type; is this a model directory?")
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise StageError(
            f"model {directory}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files next to "
            "config.json"
        )
    weights = weight_files(directory)
    params = check_weights(weights, fix)
    return {"config": model_config, "weights": weights, "num_parameters": params}


def fingerprint(directory: Path, weights: list[Path]) -> str:
    """sha256 over the small files' contents and the weights' names and sizes (hashing 16 GB of weights on
    every run would cost minutes; a changed download changes the sizes or the index)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file() and p.stat().st_size < 50_000_000):
        digest.update(path.name.encode() + path.read_bytes())
    for path in weights:
        digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()
