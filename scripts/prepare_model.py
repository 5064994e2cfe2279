"""Model stage: make the base model available, check that it is complete, and record it for the later stages.

    python scripts/prepare_model.py --source local --path /models/Llama-3.1-8B-Instruct \
        --output results/run/model/model.json
    HF_TOKEN=... python scripts/prepare_model.py --source hub --model-id meta-llama/Llama-3.1-8B-Instruct \
        --revision main --model-cache-dir /shared/models --output results/run/model/model.json

Sources: `demo` (the tiny model built by build_demo_model.py), `local` (a directory), and `hub`: a git-lfs
clone of {hub-url}/{model-id} at a pinned revision into the shared cache (hub_cache.py), checked and reused
without network when complete. The record (model.json) holds the absolute path, the commit of a hub model,
the parameter count read from the safetensors headers, and a fingerprint of the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import hub_cache
from common import StageError, cli, log, read_json, table, write_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class Config:
    output: str = field(metadata={"help": "model record to write (model.json)"})
    source: str = field(default="local", metadata={"help": "demo | local | hub"})
    path: str | None = field(default=None, metadata={"help": "model directory (demo, local)"})
    model_id: str | None = field(default=None, metadata={"help": "hub id org/name"})
    revision: str = field(default="main", metadata={"help": "hub revision: branch, tag or commit"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the repository"})
    hub_url: str = field(default="https://huggingface.co", metadata={"help": "hub or mirror base URL (file:// too)"})
    model_cache_dir: str = field(default="~/.cache/hpc-finetune/models", metadata={"help": "shared model cache"})
    token_file: str | None = field(default=None, metadata={"help": "file holding the hub token (else HF_TOKEN)"})
    update: bool = field(default=False, metadata={"help": "resolve a branch or tag against the hub again"})
    min_free_gb: float = field(default=1.0, metadata={"help": "disk space to leave free after the download (GB)"})


def weight_files(directory: Path) -> list[Path]:
    """The weight files a loader would read: the safetensors (index) first, else the .bin (index)."""
    names = {p.name for p in directory.iterdir() if p.is_file()}
    index, files = hub_cache.pick_weights(names, lambda name: read_json(directory / name, "weight index"))
    if not files:
        raise StageError(
            f"model {directory}: no weights found (model.safetensors, a safetensors index, or pytorch_model.bin); "
            "point model.path at the directory that holds config.json and the weights"
        )
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise StageError(
            f"model {directory}: {index} lists shards that are missing: {', '.join(missing[:5])}; "
            "the download is incomplete: fetch the model again"
        )
    return [directory / f for f in files]


def safetensors_params(path: Path) -> int:
    """Parameter count from a safetensors header, without loading any tensor."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StageError(f"model weights {path}: not a valid safetensors file (corrupt or truncated)") from None
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


def check_model_dir(directory: Path) -> dict:
    """Validate a model directory; return what the record needs. Errors name the directory and the fix."""
    if not directory.is_dir():
        raise StageError(f"model directory {directory} does not exist; set model.path to a downloaded model")
    pointers = sorted(p.name for p in directory.iterdir() if hub_cache.is_lfs_pointer(p))
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
    params = sum(safetensors_params(w) for w in weights) if weights[0].suffix == ".safetensors" else None
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


def fetch_hub_model(cfg: Config) -> tuple[Path, str]:
    """The hub model's directory in the shared cache, and its commit."""
    request = hub_cache.Request(
        model_id=cfg.model_id or "",
        revision=cfg.revision,
        hub_url=cfg.hub_url,
        cache_dir=Path(os.path.expandvars(cfg.model_cache_dir)).expanduser().resolve(),
        token=hub_cache.read_token(cfg.token_file, cfg.model_id or ""),
        update=cfg.update,
        min_free_bytes=int(cfg.min_free_gb * 1e9),
    )
    directory, commit, _ = hub_cache.fetch(request)
    return directory, commit


def model_directory(cfg: Config) -> tuple[Path, str | None]:
    if cfg.source == "hub":
        return fetch_hub_model(cfg)
    if cfg.source not in ("demo", "local"):
        raise StageError(f"model.source {cfg.source!r} is not one of demo, local, hub")
    if not cfg.path:
        raise StageError("model.path is required for model.source local")
    return Path(cfg.path).expanduser().resolve(), None


def main(cfg: Config) -> dict:
    directory, commit = model_directory(cfg)
    try:
        info = check_model_dir(directory)
    except StageError as err:
        if cfg.source != "hub":
            raise
        raise StageError(f"hub model {cfg.model_id}@{cfg.revision} (commit {commit}): {err}") from None
    model_config = info["config"]
    # Only what the model is goes in the record: later stages re-run when it changes (not the hub URL).
    record = {
        "source": cfg.source,
        "path": str(directory),
        "model_id": cfg.model_id or directory.name,
        "revision": cfg.revision if cfg.source == "hub" else None,
        "commit": commit,
        "model_type": model_config["model_type"],
        "architectures": model_config.get("architectures", []),
        "dtype": model_config.get("dtype", model_config.get("torch_dtype")),
        "num_parameters": info["num_parameters"],
        "weights": [w.name for w in info["weights"]],
        "trust_remote_code": cfg.trust_remote_code,
        "fingerprint": fingerprint(directory, info["weights"]),
    }
    write_json(cfg.output, record)
    params = record["num_parameters"]
    log.info(
        "\n%s",
        table(
            [
                ("source", cfg.source if cfg.source != "hub" else f"hub {cfg.model_id}@{cfg.revision}"),
                *([("commit", commit)] if commit else []),
                ("path", directory),
                ("model type", record["model_type"]),
                ("parameters", f"{params:,}" if params else "unknown (.bin weights)"),
                ("weight files", len(info["weights"])),
            ],
            "Base model",
        ),
    )
    return record


if __name__ == "__main__":
    cli(main, Config, __doc__)
