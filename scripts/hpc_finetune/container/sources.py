"""Where the container image comes from (container.source): an existing SIF (path), the parts of a git-lfs
repository (lfs), a registry pull or a download from https/http/s3/file (pull), or a build from the definition
file in the modes the site allows (build). Each one ends with hpc_finetune.container.sif.publish.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from hpc_finetune.container.sif import normalise_digest, publish, verify
from hpc_finetune.git import GitError
from hpc_finetune.git import git as run_git
from hpc_finetune.io.cli import StageError, log
from hpc_finetune.io.files import sha256_file
from hpc_finetune.storage import s3

REGISTRY_SCHEMES = ("oras", "docker", "library", "shub")
DOWNLOAD_SCHEMES = ("https", "http", "s3", "file")
BUILD_MODES = {
    "fakeroot": "fakeroot (`apptainer config fakeroot --add $USER` by an admin, or /etc/subuid and /etc/subgid "
    "entries for your user)",
    "unprivileged": "unprivileged user namespaces (Apptainer >= 1.1 builds without root when "
    "/proc/sys/user/max_user_namespaces > 0)",
    "sudo": "passwordless sudo for `<runtime> build`",
}


def run(cmd: list[str], what: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    log.info("$ %s", shlex.join(cmd))
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise StageError(f"{what}: {cmd[0]} is not installed or not on PATH") from None
    if result.returncode != 0:
        raise StageError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()[-1500:]}")
    return result


def from_path(cfg: Any, output: Path) -> dict:
    if not cfg.path:
        raise StageError("container.path: required when container.source is path (a .sif file)")
    src = Path(cfg.path).expanduser().resolve()
    info = verify(src, normalise_digest(cfg.sha256, "container.sha256"), f"container.path {cfg.path}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    output.symlink_to(src)  # a multi-GB image is not copied; the record pins its digest
    return {**info, "path": str(src)}


def lfs_git(args: list[str], cwd: Path, what: str) -> str:
    """git in the LFS repository's checkout: no LFS download at checkout, no credential helper."""
    try:
        return run_git("-c", "credential.helper=", *args, cwd=cwd,
                       env=os.environ | {"GIT_LFS_SKIP_SMUDGE": "1"}).strip()
    except GitError as err:
        raise StageError(f"{what} failed: {str(err)[-1500:]}") from None


def from_lfs(cfg: Any, output: Path, work: Path) -> dict:
    if not cfg.lfs_url:
        raise StageError("container.lfs.url: required when container.source is lfs (the git-lfs repository)")
    if shutil.which("git-lfs") is None:
        raise StageError("container.source lfs needs git-lfs: install it (apt-get install git-lfs, module load git-lfs)")
    repo = work / "repo"
    repo.mkdir()
    what = f"LFS repository {cfg.lfs_url}"
    lfs_git(["init", "-q"], repo, what)
    lfs_git(["remote", "add", "origin", cfg.lfs_url], repo, what)
    try:
        lfs_git(["fetch", "-q", "--depth", "1", "origin", cfg.lfs_revision], repo, f"{what} revision {cfg.lfs_revision}")
    except StageError as err:
        raise StageError(f"{err}\nCheck container.lfs.url and container.lfs.revision (a branch, tag or commit).") from None
    commit = lfs_git(["rev-parse", "FETCH_HEAD"], repo, what)
    lfs_git(["sparse-checkout", "set", "--no-cone", f"/{cfg.lfs_dir}/"], repo, what)
    lfs_git(["checkout", "-q", commit], repo, what)
    parts_dir = repo / cfg.lfs_dir
    parts = sorted(parts_dir.glob(f"{cfg.lfs_name}.part-*"))
    digest_file = parts_dir / f"{cfg.lfs_name}.sha256"
    if not parts or not digest_file.is_file():
        raise StageError(
            f"{what} at {commit[:12]}: no {cfg.lfs_dir}/{cfg.lfs_name}.part-* and {cfg.lfs_name}.sha256 "
            "(publish the image with scripts/publish_image_lfs.py; README, Container)"
        )
    include = ",".join(f"{cfg.lfs_dir}/{p.name}" for p in parts)
    lfs_git(["lfs", "pull", "--include", include], repo, f"{what}: git lfs pull")
    expected = normalise_digest(digest_file.read_text().split()[0], f"{cfg.lfs_dir}/{digest_file.name}")
    if cfg.sha256 and normalise_digest(cfg.sha256, "container.sha256") != expected:
        raise StageError(
            f"{what} at {commit[:12]} publishes sha256 {expected}, but container.sha256 pins {cfg.sha256}: "
            "pin the revision that holds your image, or update container.sha256"
        )
    tmp = output.parent / f".{output.name}.joining"
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                if src.read(24).startswith(b"version https://git-lfs"):
                    raise StageError(f"{what}: {part.name} is still an LFS pointer after git lfs pull")
                src.seek(0)
                shutil.copyfileobj(src, dst, 1 << 22)
    info = publish(tmp, output, expected, f"joined from {len(parts)} parts of {cfg.lfs_url}@{commit[:12]}")
    return {**info, "lfs_url": cfg.lfs_url, "revision": cfg.lfs_revision, "commit": commit, "parts": len(parts)}


def download(url: str, dst: Path, cfg: Any) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
        src = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        if not src.is_file():
            raise StageError(f"{url}: no such file")
        shutil.copyfile(src, dst)
        return
    if scheme == "s3":  # credentials from boto3's chain; anonymous (a public bucket) when it finds none
        s3.Store(cfg.s3_endpoint, cfg.s3_region, anonymous=True).download(*s3.split_url(url, "container.url"), dst)
        return
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dst, "wb") as fh:
            shutil.copyfileobj(response, fh, 1 << 22)
    except urllib.error.HTTPError as err:
        raise StageError(f"download {url} failed: HTTP {err.code} {err.reason}: "
                         f"{err.read(300).decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as err:
        raise StageError(f"download {url} failed: {getattr(err, 'reason', err)} (no network on this node? "
                         "run the container stage where the network is: README, Container)") from None


def from_pull(cfg: Any, output: Path, work: Path) -> dict:
    if not cfg.url:
        raise StageError("container.url: required when container.source is pull (oras://, docker://, library://, "
                         "https://, s3:// or file://)")
    scheme = urllib.parse.urlsplit(cfg.url).scheme
    expected = normalise_digest(cfg.sha256, "container.sha256")
    tmp = output.parent / f".{output.name}.pulling"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    if scheme in REGISTRY_SCHEMES:
        if cfg.runtime == "charliecloud":
            raise StageError(f"container.url {cfg.url}: registry pulls go through Apptainer; with runtime charliecloud "
                             "download the SIF (https://, s3://, file://) or use source path or build")
        run([cfg.runtime, "pull", "--force", str(tmp), cfg.url], f"{cfg.runtime} pull {cfg.url}")
    elif scheme in DOWNLOAD_SCHEMES:
        if expected is None:  # a digest published next to the image
            sidecar = work / "sidecar.sha256"
            try:
                download(cfg.url + ".sha256", sidecar, cfg)
            except StageError as err:
                raise StageError(
                    f"container.sha256 is not set and {cfg.url}.sha256 could not be read ({err}); a downloaded "
                    "image is only used when its sha256 is known: set container.sha256"
                ) from None
            expected = normalise_digest(sidecar.read_text().split()[0], f"{cfg.url}.sha256")
        download(cfg.url, tmp, cfg)
    else:
        raise StageError(f"container.url {cfg.url!r}: unsupported scheme {scheme!r}; use one of "
                         + ", ".join(f"{s}://" for s in REGISTRY_SCHEMES + DOWNLOAD_SCHEMES))
    info = publish(tmp, output, expected, f"pulled from {cfg.url}")
    return {**info, "url": cfg.url}


def from_build(cfg: Any, output: Path) -> dict:
    definition = Path(cfg.definition or "").resolve()
    if not definition.is_file():
        raise StageError(f"container.definition {cfg.definition}: no such file")
    build_dir = cfg.build_dir or str(definition.parent.parent)  # %files paths are relative to the repository
    tmp = output.parent.resolve() / f".{output.name}.building"
    output.parent.mkdir(parents=True, exist_ok=True)
    modes = cfg.build_modes or ["fakeroot", "unprivileged", "sudo"]
    failures = []
    for mode in modes:
        if mode not in BUILD_MODES:
            raise StageError(f"container.build_modes: unknown mode {mode!r}; allowed: {', '.join(BUILD_MODES)}")
        cmd = [cfg.runtime, "build", "--force", "--build-arg", f"PROJECT_COMMIT={cfg.project_commit}"]
        if mode == "fakeroot":
            cmd.insert(2, "--fakeroot")
        elif mode == "sudo":
            cmd = ["sudo", "-n", *cmd]
        cmd += [str(tmp), str(definition)]
        tmp.unlink(missing_ok=True)
        try:
            run(cmd, f"build ({mode})", cwd=build_dir)
        except StageError as err:
            log.warning("build mode %s did not work: %s", mode, str(err)[-400:])
            failures.append(f"- {mode}: {str(err)[-300:]}")
            continue
        info = publish(tmp, output, None, f"built from {definition} ({mode})")
        return {**info, "definition": str(definition), "definition_sha256": sha256_file(definition),
                "build_mode": mode, "project_commit": cfg.project_commit}
    needs = "\n".join(f"  {m}: {BUILD_MODES[m]}" for m in modes)
    raise StageError(
        f"could not build {definition.name} with {cfg.runtime} in any of the modes {', '.join(modes)}:\n"
        + "\n".join(failures)
        + f"\nThe site must allow one of:\n{needs}\n"
        "or build the image elsewhere and use container.source path or pull (README, Container)."
    )


def from_cpu_build(cfg: Any, output: Path) -> dict:
    """Runtime charliecloud: the CPU image of the recipe (hpc_finetune.container.cpu_image), built or cached."""
    from hpc_finetune.container import cpu_image

    built = cpu_image.build()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    output.symlink_to(built["sif"])
    info = verify(output, built["sha256"], f"CPU image {built['key']}")
    return {**info, "path": built["sif"], "recipe": built["key"], "build_mode": "debootstrap+ch-run",
            "project_commit": cfg.project_commit}
