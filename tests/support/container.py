"""What the container tests share: Debian's siftool, a real SIF made with it, the container stage run in-process,
a git-lfs repository on file:// that holds an image as parts, the stand-in runtime first on PATH, Charliecloud and
the builders of the CPU image, and the workflow run in a project directory with the container on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import container
import pytest

from support.common import REPO
from support.workflow import run_workflow

SIFTOOL = shutil.which("siftool")
SECRET = "hf_containerTestTokenNeverInArgv0123456"
DEF = REPO / "singularity" / "finetune.def"


def require_siftool() -> None:
    """Skip the calling test where Debian's siftool is missing (it makes every SIF the tests use); with
    REQUIRE_SIFTOOL=1 (CI, which installs it) a missing siftool fails the test instead. Only the tests that make
    or read a SIF ask for it (the `siftool` fixture, and through it `sif` and `standin`): the def file's tests
    run everywhere."""
    if SIFTOOL is None:
        message = "needs Debian's siftool (apt-get install siftool)"
        if os.environ.get("REQUIRE_SIFTOOL") == "1":
            pytest.fail(f"REQUIRE_SIFTOOL=1 but siftool is not on PATH: {message}")
        pytest.skip(message)


def require_charliecloud() -> None:
    """Skip where Charliecloud's ch-run or a builder of the CPU image is missing; with REQUIRE_CHARLIECLOUD=1 (CI,
    which installs them) fail instead."""
    from hpc_finetune.container.cpu_image import TOOLS

    missing = [f"{tool} ({package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        message = "needs " + ", ".join(missing) + ": apt-get install them"
        if os.environ.get("REQUIRE_CHARLIECLOUD") == "1":
            pytest.fail(f"REQUIRE_CHARLIECLOUD=1 but {message}")
        pytest.skip(message)


CONTAINER_DEMO = [  # a short demo, the same inside (charliecloud) and through the stand-in (on the host)
    "training__max_steps=3", "training__eval_steps=3", "training__save_steps=3", "training__logging_steps=1",
    "dataset__max_samples=24", "evaluate__num_samples=2", "evaluate__max_new_tokens=8", "merge__check_samples=1",
]


def project(tmp_path: Path) -> Path:
    """A project directory as a user has it (config.yaml, data/)."""
    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "config.yaml").write_text((REPO / "config.yaml").read_text())
    (workdir / "data").symlink_to(REPO / "data")
    return workdir


def snakemake(workdir: Path, *args: str, path: str | None = None, check: bool = True,
              env: dict | None = None, profile: str = "local") -> subprocess.CompletedProcess:
    """The workflow in workdir with the hub token in its environment (it must reach the image only that way)."""
    return run_workflow(workdir, *args, profile=profile, env={"HF_TOKEN": SECRET} | (env or {}), path=path,
                        check=check)


def sections(text: str) -> dict[str, str]:
    """The def file's %sections by name; the header (Bootstrap/From) under ''."""
    parts = re.split(r"^%(\w+)[^\n]*\n", text, flags=re.M)
    return {"": parts[0], **{parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}}


def stage(tmp_path: Path, **options) -> dict:
    cfg = container.Config(output=str(tmp_path / "img" / "finetune.sif"),
                           record_out=str(tmp_path / "img" / "finetune.sif.json"), **options)
    return container.main(cfg)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


class PartsRepo:
    """A git-lfs repository on file:// that holds the image as parts (published with the project's script),
    next to an unrelated LFS file that the container stage must not fetch."""

    def __init__(self, root: Path):
        self.remote = root / "images.git"
        self.url = f"file://{self.remote}"
        self.work = root / "work"
        root.mkdir(parents=True)
        git(root, "init", "-q", "--bare", str(self.remote))
        git(root, "clone", "-q", self.url, str(self.work))
        (self.work / "other").mkdir()
        (self.work / "other" / "unrelated.bin").write_bytes(os.urandom(40000))
        git(self.work, "lfs", "install", "--local")
        git(self.work, "lfs", "track", "other/*.bin")
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "-m", "unrelated")

    def publish(self, image: Path, tag: str | None = None) -> str:
        args = [sys.executable, str(REPO / "scripts" / "tools" / "publish_image_lfs.py"), "--image", str(image),
                "--repo", str(self.work), "--part-size-mb", "0.02", "--push", "true"]
        subprocess.run(args + (["--tag", tag] if tag else []), check=True, capture_output=True, text=True)
        return git(self.work, "rev-parse", "HEAD")
