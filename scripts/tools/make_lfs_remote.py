"""Publish a model directory as a commit of a git-lfs repository: a local hub for the demo, the tests, and sites
without internet (mirror a model once, then point model.hub_url at the mirror).

    python scripts/tools/make_lfs_remote.py --model-dir results/demo/model/demo \
        --remote /tmp/hub/demo/tiny-llama --tag v1
    snakemake --config model__source=hub model__model_id=demo/tiny-llama model__hub_url=file:///tmp/hub

The remote is a bare repository, created when missing; each call commits the directory's files (replacing the
previous ones) on --branch and pushes the LFS objects with them. Files matching --lfs are stored as LFS objects.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hpc_finetune.git import GitError
from hpc_finetune.git import git as run_git
from hpc_finetune.io.cli import StageError, cli, log

IDENTITY = ("-c", "user.name=hpc-finetune", "-c", "user.email=hpc-finetune@localhost")


@dataclass
class Config:
    model_dir: str = field(metadata={"help": "directory whose files become the commit"})
    remote: str = field(metadata={"help": "bare repository to push to (created when missing), e.g. /hub/org/name"})
    branch: str = field(default="main", metadata={"help": "branch to commit on"})
    tag: str | None = field(default=None, metadata={"help": "tag to set on the new commit"})
    lfs: list[str] = field(
        default_factory=lambda: ["*.safetensors", "*.bin", "*.pth", "*.gguf", "tokenizer.json"],
        metadata={"help": "patterns stored as LFS objects"},
    )
    message: str = field(default="Upload model", metadata={"help": "commit message"})


def git(*args: str, cwd: Path | None = None) -> str:
    try:
        return run_git(*args, cwd=cwd, env=os.environ | {"GIT_LFS_SKIP_SMUDGE": "1"}).strip()
    except GitError as err:
        raise StageError(f"git {' '.join(args[:2])} failed: {err}") from None


def main(cfg: Config) -> dict:
    source, remote = Path(cfg.model_dir).resolve(), Path(cfg.remote).resolve()
    if not source.is_dir():
        raise StageError(f"model directory {source} does not exist")
    if not (remote / "HEAD").is_file():
        remote.mkdir(parents=True, exist_ok=True)
        git("init", "--quiet", "--bare", f"--initial-branch={cfg.branch}", str(remote))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        git("clone", "--quiet", "--no-checkout", remote.as_uri(), str(work))
        if git("ls-remote", "--heads", "origin", cfg.branch, cwd=work):
            git("checkout", "--quiet", "-B", cfg.branch, f"origin/{cfg.branch}", cwd=work)
        else:
            git("symbolic-ref", "HEAD", f"refs/heads/{cfg.branch}", cwd=work)
        git("lfs", "install", "--local", cwd=work)
        for path in work.iterdir():
            if path.name != ".git":
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        shutil.copytree(source, work, dirs_exist_ok=True)
        git("lfs", "track", *cfg.lfs, cwd=work)
        git("add", "--all", cwd=work)
        git(*IDENTITY, "commit", "--quiet", "--allow-empty", "-m", cfg.message, cwd=work)
        refs = [cfg.branch] + ([f"refs/tags/{cfg.tag}"] if cfg.tag else [])
        if cfg.tag:
            git("tag", "--force", cfg.tag, cwd=work)
        git("lfs", "push", "origin", cfg.branch, cwd=work)
        git("push", "--quiet", "--force", "origin", *refs, cwd=work)
        commit = git("rev-parse", "HEAD", cwd=work)
    log.info("%s: %s is commit %s on %s%s", remote, source, commit, cfg.branch, f" (tag {cfg.tag})" if cfg.tag else "")
    return {"commit": commit, "remote": str(remote)}


if __name__ == "__main__":
    cli(main, Config, __doc__)
