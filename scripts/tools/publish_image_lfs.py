"""Publish a SIF image as parts in a git-lfs repository, for `container.source: lfs`.

    python scripts/tools/publish_image_lfs.py --image finetune.sif --repo ~/finetune-images --push true

--repo is a local clone of the LFS repository (created with `git init` when it does not exist). The image is
checked (SIF header), split into parts of --part-size-mb (hosts limit one LFS object: GitHub 2 GB), written as
<lfs-dir>/<name>.part-000, -001, ... with <name>.sha256 next to them, tracked with git-lfs, committed, tagged
with --tag when given, and pushed (objects too) with --push. Pin the commit or tag in container.lfs.revision and
the digest in container.sha256.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hpc_finetune.container.sif import sif_header
from hpc_finetune.git import GitError
from hpc_finetune.git import git as run_git
from hpc_finetune.io.cli import StageError, cli, log
from hpc_finetune.io.files import sha256_file


@dataclass
class Config:
    image: str
    repo: str
    lfs_dir: str = "containers"
    name: str = "finetune.sif"
    part_size_mb: float = 1900
    message: str = "Publish finetune.sif"
    tag: str | None = None
    push: bool = False


def git(repo: Path, *args: str) -> str:
    try:
        return run_git(*args, cwd=repo).strip()
    except GitError as err:
        raise StageError(f"git {' '.join(args)} in {repo} failed: {str(err)[-800:]}") from None


def main(cfg: Config) -> dict:
    image, repo = Path(cfg.image), Path(cfg.repo)
    sif_header(image)
    if shutil.which("git-lfs") is None:
        raise StageError("git-lfs is not installed")
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q")
    git(repo, "lfs", "install", "--local")
    pattern = f"{cfg.lfs_dir}/{cfg.name}.part-*"
    git(repo, "lfs", "track", pattern)
    target = repo / cfg.lfs_dir
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob(f"{cfg.name}.part-*"):
        old.unlink()
    size = max(1, int(cfg.part_size_mb * 2**20))
    parts = []
    with open(image, "rb") as src:
        while block := src.read(size):
            part = target / f"{cfg.name}.part-{len(parts):03d}"
            part.write_bytes(block)
            parts.append(part.name)
    digest = sha256_file(image)
    (target / f"{cfg.name}.sha256").write_text(f"{digest}  {cfg.name}\n")
    git(repo, "add", "-A", ".gitattributes", cfg.lfs_dir)
    git(repo, "-c", "user.name=publish_image_lfs", "-c", "user.email=publish@localhost", "commit", "-q",
        "--allow-empty", "-m", cfg.message)
    commit = git(repo, "rev-parse", "HEAD")
    if cfg.tag:
        git(repo, "tag", "-f", cfg.tag)
    if cfg.push:
        git(repo, "lfs", "push", "--all", "origin")
        git(repo, "push", "-q", "origin", "HEAD", *([f"refs/tags/{cfg.tag}"] if cfg.tag else []))
    log.info("published %s (%d parts, sha256 %s) at commit %s", image, len(parts), digest, commit)
    return {"commit": commit, "sha256": digest, "parts": parts}


if __name__ == "__main__":
    cli(main, Config, __doc__)
