"""What the hub-cache tests share: a hub directory that holds the demo model as a git-lfs repository (published
with scripts/tools/make_lfs_remote.py), the model stage run in-process or as the workflow runs it, and the cache's
paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import prepare_model
from hpc_finetune.hub import snapshot as hub_cache
from tools import make_lfs_remote

from support.common import SCRIPTS

MODEL_ID = "demo/tiny-llama"
SECRET = "hf_hubTestTokenThatMustNeverBeWritten42"



class Hub:
    """A hub directory with the demo model at {root}/demo/tiny-llama (main, tag v1)."""

    def __init__(self, root: Path, upload: Path):
        self.root, self.upload = root, upload
        self.remote = root / MODEL_ID
        self.url = root.as_uri()
        self.commits = [self.publish(upload, tag="v1")]

    def publish(self, directory: Path, tag: str | None = None) -> str:
        cfg = make_lfs_remote.Config(model_dir=str(directory), remote=str(self.remote), tag=tag)
        return make_lfs_remote.main(cfg)["commit"]

    def advance(self, tmp_path: Path) -> str:
        """A new commit on main: generation_config.json changes, the weights stay."""
        changed = Path(shutil.copytree(self.upload, tmp_path / f"upload-{len(self.commits)}"))
        config = json.loads((changed / "generation_config.json").read_text())
        (changed / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.1 * len(self.commits)}))
        self.commits.append(self.publish(changed))
        return self.commits[-1]


def config(hub_url: str, tmp_path: Path, **options) -> prepare_model.Config:
    options = {"model_id": MODEL_ID, "model_cache_dir": str(tmp_path / "cache"), "min_free_gb": 0.0} | options
    return prepare_model.Config(output=str(tmp_path / "model.json"), source="hub", hub_url=hub_url, **options)


def fetch(hub: Hub, tmp_path: Path, **options) -> dict:
    return prepare_model.main(config(hub.url, tmp_path, **options))


def model_root(tmp_path: Path) -> Path:
    return tmp_path / "cache" / MODEL_ID


def lfs_object(tmp_path: Path, path: Path) -> Path:
    oid = hub_cache.parse_pointer(subprocess.run(
        ["git", "show", f"HEAD:{path.name}"], cwd=path.parent, capture_output=True, check=True
    ).stdout)[0]
    return model_root(tmp_path) / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def git_lfs_fsck(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "lfs", "fsck", "--objects"], cwd=directory, capture_output=True, text=True)


def script_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return env | {"PYTHONPATH": str(SCRIPTS)} | extra


def stage_command(cfg: prepare_model.Config) -> list[str]:
    """The stage as the workflow runs it: a process of its own with `--name value` arguments."""
    args = [str(SCRIPTS / "prepare_model.py")]
    for name, value in vars(cfg).items():
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        args += [f"--{name.replace('_', '-')}", text]
    return [sys.executable, *args]
