"""Model stage: make the base model available, check that it is complete, and record it for the later stages.

    python scripts/prepare_model.py --source local --path /models/Llama-3.1-8B-Instruct \
        --output results/run/model/model.json
    HF_TOKEN=... python scripts/prepare_model.py --source hub --model-id meta-llama/Llama-3.1-8B-Instruct \
        --revision main --model-cache-dir /shared/models --output results/run/model/model.json

Sources: `demo` (the tiny model built by build_demo_model.py), `local` (a directory), and `hub`: a git-lfs
clone of {hub-url}/{model-id} at a pinned revision into the shared cache (hpc_finetune.hub), checked and reused
without network when complete. The record (model.json) holds the absolute path, the commit of a hub model,
the parameter count read from the safetensors headers, and a fingerprint of the files. Every weight file is checked
whole (header, and data that end exactly at the end of the file) before any job loads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.hub.cache import fetch
from hpc_finetune.hub.request import Request, read_token
from hpc_finetune.io.cli import StageError, cli, log, table
from hpc_finetune.io.files import write_json
from hpc_finetune.io.schema import option
from hpc_finetune.model.record import check_model_dir, fingerprint


@dataclass
class Config:
    output: str = field(metadata={"help": "model record to write (model.json)"})
    source: str = option("model.source")
    path: str | None = option("model.path")
    model_id: str | None = option("model.model_id")
    revision: str = option("model.revision")
    trust_remote_code: bool = option("model.trust_remote_code")
    hub_url: str = option("model.hub_url")
    model_cache_dir: str = option("model.model_cache_dir")
    token_file: str | None = option("model.token_file")
    update: bool = option("model.update")
    min_free_gb: float = option("model.min_free_gb")


def fetch_hub_model(cfg: Config) -> tuple[Path, str]:
    """The hub model's directory in the shared cache, and its commit."""
    request = Request(
        model_id=cfg.model_id or "",
        revision=cfg.revision,
        hub_url=cfg.hub_url,
        cache_dir=Path(os.path.expandvars(cfg.model_cache_dir)).expanduser().resolve(),
        token=read_token(cfg.token_file, f"model {cfg.model_id or ''}"),
        update=cfg.update,
        min_free_bytes=int(cfg.min_free_gb * 1e9),
    )
    directory, commit, _ = fetch(request)
    return directory, commit


def model_directory(cfg: Config) -> tuple[Path, str | None]:
    if cfg.source == "hub":
        return fetch_hub_model(cfg)
    if cfg.source not in ("demo", "local"):
        raise StageError(f"model.source {cfg.source!r} is not one of demo, local, hub")
    if not cfg.path:
        raise StageError("model.path is required for model.source local")
    return Path(cfg.path).expanduser().resolve(), None


# The cache verified every LFS file against the sha256 the hub publishes: a damaged weight file is damaged there.
HUB_FIX = ("git lfs fsck found it identical to the hub's file (sha256), so it is damaged as published at this commit: "
           "pin another model.revision, or tell the model's publisher")


def main(cfg: Config) -> dict:
    directory, commit = model_directory(cfg)
    try:
        info = check_model_dir(directory, HUB_FIX) if cfg.source == "hub" else check_model_dir(directory)
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
