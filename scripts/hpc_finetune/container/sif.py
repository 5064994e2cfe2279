"""SIF images checked before they are used: the SIF global header (the magic, and that the file holds every byte
the header promises: a truncated download is refused) and the sha256; a checked image is published at its path
only then, so a bad one never replaces a good one.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from hpc_finetune.io.cli import StageError
from hpc_finetune.io.files import sha256_file

SIF_MAGIC = b"SIF_MAGIC\0"
HEADER_SIZE = 128


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


# A SIF descriptor as the format packs it (little-endian, no padding): datatype int32, used bool, id, group id,
# linked id uint32, offset, size, size with padding, ctime, mtime, uid, gid int64, name 128 B, extra 384 B.
DESCRIPTOR = struct.Struct("<i?IIIqqqqqqq128s384s")
DATA_PARTITION = 0x4004


def partition(path: str | os.PathLike) -> tuple[int, int]:
    """(offset, size) of the image's first filesystem partition (the SquashFS root file system)."""
    sif_header(path)
    with open(path, "rb") as fh:
        _free, _total, desc_off, desc_len = struct.unpack_from("<qqqq", fh.read(HEADER_SIZE), 80)
        fh.seek(desc_off)
        table_ = fh.read(desc_len)
    for start in range(0, len(table_) - DESCRIPTOR.size + 1, DESCRIPTOR.size):
        dtype, used, _id, _group, _link, offset, size, *_ = DESCRIPTOR.unpack_from(table_, start)
        if used and dtype == DATA_PARTITION:
            return offset, size
    raise StageError(f"image {path} holds no file system partition")


# Top-level names of the host that are never bind roots (the runtime mounts its own, or they are not directories
# a project lives under).
NOT_MOUNT_ROOTS = {"proc", "sys", "dev", "run", "lost+found", "boot", "snap"}


def host_roots() -> list[str]:
    """The host's top-level directories: every absolute path a job binds lies under one of them."""
    return sorted(f"/{p.name}" for p in Path("/").iterdir()
                  if p.is_dir() and not p.is_symlink() and not p.name.startswith(".") and p.name not in NOT_MOUNT_ROOTS)


def squashfs_roots(image: Path) -> list[str]:
    """The top-level entries of a SquashFS file (unsquashfs -l, one level: fast on any size)."""
    listed = subprocess.run(["unsquashfs", "-d", "", "-max-depth", "1", "-l", str(image)],
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise StageError(f"unsquashfs cannot list {image}: {listed.stderr.strip()[-500:]}")
    return sorted(line for line in listed.stdout.splitlines() if line.startswith("/") and line.count("/") == 1)


def add_mount_points(image: Path, roots: list[str]) -> list[str]:
    """Append an empty directory for each root the SquashFS lacks (mksquashfs appends without recompressing what
    is there): Charliecloud's ch-run cannot create a bind's destination in a read-only image, and a project under
    a root the image does not have (/check, /fs1, ...) would fail in every job. Returns the roots added."""
    missing = sorted(set(roots) - set(squashfs_roots(image)))
    if not missing:
        return []
    if shutil.which("mksquashfs") is None:
        raise StageError(f"the image lacks the mount points {', '.join(missing)} for the bound paths, and adding "
                         "them needs mksquashfs: install squashfs-tools (apt-get install squashfs-tools)")
    with tempfile.TemporaryDirectory(prefix=".mount-points-", dir=image.parent) as tmp:
        dirs = []
        for root in missing:
            (Path(tmp) / root.lstrip("/")).mkdir()
            dirs.append(str(Path(tmp) / root.lstrip("/")))
        added = subprocess.run(["mksquashfs", *dirs, str(image), "-no-recovery", "-quiet", "-no-progress"],
                               capture_output=True, text=True)
    if added.returncode != 0:
        raise StageError(f"mksquashfs could not add the mount points {', '.join(missing)} to {image}: "
                         f"{(added.stderr or added.stdout).strip()[-500:]}")
    return missing


def extract_squashfs(sif: str | os.PathLike, out: Path, roots: list[str] | None = None) -> dict:
    """Write the SIF's root file system (SquashFS) to `out`, for runtimes that mount a SquashFS file rather than
    a SIF (Charliecloud's ch-run), with a mount point for each of `roots` (default: the host's top-level
    directories); published at `out` only when it is complete and is a SquashFS."""
    offset, size = partition(sif)
    tmp = out.parent / f".{out.name}.extracting"
    with open(sif, "rb") as src, open(tmp, "wb") as dst:
        src.seek(offset)
        left = size
        while left:
            chunk = src.read(min(left, 1 << 22))
            if not chunk:
                raise StageError(f"image {sif} is truncated inside its file system partition")
            dst.write(chunk)
            left -= len(chunk)
    with open(tmp, "rb") as fh:
        if fh.read(4) != b"hsqs":
            tmp.unlink()
            raise StageError(f"image {sif}: its file system partition is not SquashFS (Charliecloud needs SquashFS)")
    try:
        added = add_mount_points(tmp, host_roots() if roots is None else roots)
        mount_points = squashfs_roots(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return {"squashfs": str(out), "squashfs_size": out.stat().st_size, "mount_points_added": added,
            "mount_points": mount_points}
