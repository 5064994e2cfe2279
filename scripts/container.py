"""Container stage: make `finetune.sif` available at one path, verified, whatever its source.

Sources (config `container.source`):
  lfs    sparse-checkout only the image's parts from a git-lfs repository, join them, check the sha256 recorded
         next to them, record the repository's commit;
  path   an existing SIF: check its header (and its sha256 when one is given), link it;
  pull   oras:// docker:// library:// through `<runtime> pull`; https:// http:// s3:// file:// by download
         (S3 with SigV4 against any S3-protocol endpoint); check the sha256;
  build  `<runtime> build` from singularity/finetune.def: --fakeroot, then the other modes allowed, with a
         message that says what the site must allow when none works.

Every image is checked the same way before it is published at --output: the SIF global header (magic, and that
the file holds every byte the header promises: a truncated download is refused) and the sha256. The record
(--record-out) says where the image came from and its digest.
"""

from __future__ import annotations

import os
import shlex
import shutil
import struct
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import s3
from common import StageError, cli, log, sha256_file, table, write_json

SIF_MAGIC = b"SIF_MAGIC\0"
HEADER_SIZE = 128
PART_GLOB = "*.part-*"
REGISTRY_SCHEMES = ("oras", "docker", "library", "shub")
DOWNLOAD_SCHEMES = ("https", "http", "s3", "file")
BUILD_MODES = {
    "fakeroot": "fakeroot (`apptainer config fakeroot --add $USER` by an admin, or /etc/subuid and /etc/subgid "
    "entries for your user)",
    "unprivileged": "unprivileged user namespaces (Apptainer >= 1.1 builds without root when "
    "/proc/sys/user/max_user_namespaces > 0)",
    "sudo": "passwordless sudo for `<runtime> build`",
}


@dataclass
class Config:
    source: str
    output: str
    record_out: str
    runtime: str = "apptainer"
    path: str | None = None
    sha256: str | None = None
    url: str | None = None
    s3_endpoint: str | None = None
    s3_region: str = "us-east-1"
    lfs_url: str | None = None
    lfs_revision: str = "main"
    lfs_dir: str = "containers"
    lfs_name: str = "finetune.sif"
    definition: str | None = None
    build_modes: list[str] | None = None
    build_dir: str | None = None
    project_commit: str = "unknown"
    pin: str | None = None


# --- verification ---------------------------------------------------------------------------------------------


def sif_header(path: str | os.PathLike) -> dict:
    """Parse and check a SIF global header. Raises StageError for a file that is not a SIF or that is shorter
    than its header says (a truncated download or copy)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"image {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE or head[32:42] != SIF_MAGIC:
        start = head[:64]
        hint = ""
        if start.startswith(b"version https://git-lfs"):
            hint = " (it is a git-lfs pointer: the LFS object was not fetched)"
        elif start.startswith((b"<", b"{")):
            hint = " (it looks like an HTML/JSON error page from a server)"
        elif head[:4] == b"hsqs":
            hint = " (it is a bare squashfs, not a SIF: build or convert it with apptainer build)"
        raise StageError(f"image {path} is not a SIF file: no SIF_MAGIC at byte 32{hint}")
    version = head[42:45].rstrip(b"\0").decode(errors="replace")
    desc_free, desc_total, desc_off, desc_len, data_off, data_len = struct.unpack_from("<qqqqqq", head, 80)
    needed = max(desc_off + desc_len, data_off + data_len)
    if min(desc_off, desc_len, data_off, data_len) < 0 or desc_total < 1:
        raise StageError(f"image {path} has a corrupt SIF header (negative or empty extents)")
    if size < needed:
        raise StageError(
            f"image {path} is truncated: {size} bytes, but its SIF header describes {needed} bytes; "
            "fetch or copy it again"
        )
    return {
        "sif_version": version,
        "size": size,
        "descriptors": desc_total - desc_free,
        "data_offset": data_off,
        "data_size": data_len,
    }


def normalise_digest(digest: str | None, what: str) -> str | None:
    if digest is None:
        return None
    digest = digest.strip().lower().removeprefix("sha256:")
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise StageError(f"{what}: {digest!r} is not a sha256 digest (64 hex digits, optionally 'sha256:...')")
    return digest


def verify(path: str | os.PathLike, sha256: str | None, what: str) -> dict:
    """Header first (cheap, and a clearer message for a truncated file), then the digest."""
    info = sif_header(path)
    actual = sha256_file(path)
    if sha256 is not None and actual != sha256:
        raise StageError(
            f"image {path} ({what}) has sha256 {actual}, expected {sha256}: the file is corrupt or is not the "
            "image that was pinned; fetch it again, or update container.sha256 if the image was meant to change"
        )
    return {**info, "sha256": actual, "sha256_checked": sha256 is not None}


def publish(tmp: Path, output: Path, sha256: str | None, what: str) -> dict:
    """Verify the image fetched into `tmp` and only then put it at `output`; a bad image is deleted and the
    earlier one stays."""
    try:
        info = verify(tmp, sha256, what)
    except StageError:
        tmp.unlink(missing_ok=True)
        raise
    output.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(tmp, 0o755)
    os.replace(tmp, output)
    return info


# --- sources --------------------------------------------------------------------------------------------------


def run(cmd: list[str], what: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    log.info("$ %s", shlex.join(cmd))
    try:
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise StageError(f"{what}: {cmd[0]} is not installed or not on PATH") from None
    if result.returncode != 0:
        raise StageError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout).strip()[-1500:]}")
    return result


def from_path(cfg: Config, output: Path) -> dict:
    if not cfg.path:
        raise StageError("container.path: required when container.source is path (a .sif file)")
    src = Path(cfg.path).expanduser().resolve()
    info = verify(src, normalise_digest(cfg.sha256, "container.sha256"), f"container.path {cfg.path}")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    output.symlink_to(src)  # a multi-GB image is not copied; the record pins its digest
    return {**info, "path": str(src)}


def git(args: list[str], cwd: Path, what: str) -> str:
    env = os.environ | {"GIT_LFS_SKIP_SMUDGE": "1", "GIT_TERMINAL_PROMPT": "0"}
    return run(["git", "-c", "credential.helper=", *args], what, cwd=str(cwd), env=env).stdout.strip()


def from_lfs(cfg: Config, output: Path, work: Path) -> dict:
    if not cfg.lfs_url:
        raise StageError("container.lfs.url: required when container.source is lfs (the git-lfs repository)")
    if shutil.which("git-lfs") is None:
        raise StageError("container.source lfs needs git-lfs: install it (apt-get install git-lfs, module load git-lfs)")
    repo = work / "repo"
    repo.mkdir()
    what = f"LFS repository {cfg.lfs_url}"
    git(["init", "-q"], repo, what)
    git(["remote", "add", "origin", cfg.lfs_url], repo, what)
    try:
        git(["fetch", "-q", "--depth", "1", "origin", cfg.lfs_revision], repo, f"{what} revision {cfg.lfs_revision}")
    except StageError as err:
        raise StageError(f"{err}\nCheck container.lfs.url and container.lfs.revision (a branch, tag or commit).") from None
    commit = git(["rev-parse", "FETCH_HEAD"], repo, what)
    git(["sparse-checkout", "set", "--no-cone", f"/{cfg.lfs_dir}/"], repo, what)
    git(["checkout", "-q", commit], repo, what)
    parts_dir = repo / cfg.lfs_dir
    parts = sorted(parts_dir.glob(f"{cfg.lfs_name}.part-*"))
    digest_file = parts_dir / f"{cfg.lfs_name}.sha256"
    if not parts or not digest_file.is_file():
        raise StageError(
            f"{what} at {commit[:12]}: no {cfg.lfs_dir}/{cfg.lfs_name}.part-* and {cfg.lfs_name}.sha256 "
            "(publish the image with scripts/publish_image_lfs.py; README, Container)"
        )
    include = ",".join(f"{cfg.lfs_dir}/{p.name}" for p in parts)
    git(["lfs", "pull", "--include", include], repo, f"{what}: git lfs pull")
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


def download(url: str, dst: Path, cfg: Config) -> None:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
        src = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
        if not src.is_file():
            raise StageError(f"{url}: no such file")
        shutil.copyfile(src, dst)
        return
    if scheme == "s3":
        request = s3.Store(cfg.s3_endpoint, cfg.s3_region).request("GET", *s3.split_url(url, "container.url"))
    else:
        request = urllib.request.Request(url)
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(dst, "wb") as fh:
            shutil.copyfileobj(response, fh, 1 << 22)
    except urllib.error.HTTPError as err:
        raise s3.http_error(f"download {url}", err) from None
    except (urllib.error.URLError, OSError) as err:
        raise StageError(f"download {url} failed: {getattr(err, 'reason', err)} (no network on this node? "
                         "run the container stage where the network is: README, Container)") from None


def from_pull(cfg: Config, output: Path, work: Path) -> dict:
    if not cfg.url:
        raise StageError("container.url: required when container.source is pull (oras://, docker://, library://, "
                         "https://, s3:// or file://)")
    scheme = urllib.parse.urlsplit(cfg.url).scheme
    expected = normalise_digest(cfg.sha256, "container.sha256")
    tmp = output.parent / f".{output.name}.pulling"
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp.unlink(missing_ok=True)
    if scheme in REGISTRY_SCHEMES:
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


def from_build(cfg: Config, output: Path) -> dict:
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


def main(cfg: Config) -> dict:
    output = Path(cfg.output)
    sources = {"path": from_path, "lfs": from_lfs, "pull": from_pull, "build": from_build}
    if cfg.source not in sources:
        raise StageError(f"container.source {cfg.source!r}: use one of {', '.join(sources)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".container-", dir=output.parent) as w:
        if cfg.source == "path":
            info = from_path(cfg, output)
        elif cfg.source == "build":
            info = from_build(cfg, output)
        else:
            info = sources[cfg.source](cfg, output, Path(w))
    record = {"source": cfg.source, "image": str(output), **info}
    if cfg.source == "lfs":
        record["pin"] = cfg.pin or cfg.lfs_revision
    write_json(cfg.record_out, record)
    log.info("%s", table([(k, v) for k, v in record.items()], "container image"))
    return record


if __name__ == "__main__":
    cli(main, Config, __doc__)
