"""One snapshot of the hub cache: the files of a commit (plain git blobs and git-lfs pointers), checked and
repaired: the plain files restored from git, the LFS objects the loader needs fetched, verified with `git lfs
fsck` and hard-linked into the working tree, with progress in the log while the download runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpc_finetune.git import GitError
from hpc_finetune.io.cli import StageError, log
from hpc_finetune.model.weights import pick_weights

if TYPE_CHECKING:
    from hpc_finetune.hub.remote import Git

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
# Weight formats a repository may hold besides the one a loader reads; only the loader's files are fetched.
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".ggml", ".h5", ".msgpack", ".onnx", ".onnx_data",
    ".ot", ".tflite", ".mlmodel", ".nemo", ".npz",
)
PROGRESS_EVERY_S = 30


def is_lfs_pointer(path: Path) -> bool:
    """A file that git checked out without git-lfs: the pointer text instead of the content."""
    return path.is_file() and path.stat().st_size < 1024 and path.read_bytes().startswith(LFS_POINTER)


@dataclass(frozen=True)
class Entry:
    """A file of the commit: a plain git blob, or an LFS file (oid and size from its pointer)."""

    path: str
    blob: str
    oid: str | None = None
    size: int = 0


def parse_pointer(data: bytes) -> tuple[str, int] | None:
    if not data.startswith(LFS_POINTER):
        return None
    fields = dict(line.split(" ", 1) for line in data.decode(errors="replace").splitlines() if " " in line)
    oid, size = fields.get("oid", "").removeprefix("sha256:"), fields.get("size", "")
    return (oid, int(size)) if re.fullmatch(r"[0-9a-f]{64}", oid) and size.isdigit() else None


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


class Snapshot:
    def __init__(self, git: Git, root: Path, commit: str):
        self.git, self.root, self.commit = git, root, commit
        self.path = root / "snapshots" / commit
        self.store = root / "lfs"
        self.label = git.req.label

    def run(self, *args: str, **kwargs):
        return self.git(*args, cwd=self.path, **kwargs)

    def entries(self) -> list[Entry]:
        rows = []
        for record in self.run("ls-tree", "-r", "-l", "-z", "HEAD").split("\0"):
            if record:
                meta, path = record.split("\t", 1)
                _mode, kind, blob, size = meta.split()
                if kind == "blob":
                    rows.append((path, blob, int(size)))
        small = [blob for _, blob, size in rows if size < 1024]
        pointers = self.pointers(small) if small else {}
        return [Entry(path, blob, *(pointers.get(blob) or (None, 0))) for path, blob, _ in rows]

    def pointers(self, blobs: list[str]) -> dict[str, tuple[str, int]]:
        out = self.run("cat-file", "--batch", stdin="".join(b + "\n" for b in blobs).encode(), binary=True)
        found, pos = {}, 0
        for blob in blobs:
            header_end = out.index(b"\n", pos)
            size = int(out[pos:header_end].split()[2])
            data = out[header_end + 1 : header_end + 1 + size]
            pos = header_end + 2 + size
            if pointer := parse_pointer(data):
                found[blob] = pointer
        return found

    def restore_plain_files(self, plain: list[Entry]) -> None:
        """Put back the small git files (config, tokenizer, index) that are missing or differ from the commit."""
        present = [e for e in plain if (self.path / e.path).is_file()]
        hashes = self.run("hash-object", "--stdin-paths", stdin="".join(e.path + "\n" for e in present)) if present else ""
        same = {e.path for e, sha in zip(present, hashes.split(), strict=True) if sha == e.blob}
        changed = [e.path for e in plain if e.path not in same]
        if changed:
            log.warning("%s: restoring %d file(s) that differ from the commit: %s", self.label, len(changed),
                        ", ".join(changed[:5]))
            self.run("checkout", "HEAD", "--", *changed)

    def plan(self, entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        """(LFS files to fetch, weight duplicates to leave on the hub): every LFS file except the weights that
        the loader does not read (.bin next to safetensors, .pth, gguf, ...)."""

        def read_index(name: str) -> dict:
            try:
                return json.loads((self.path / name).read_text())
            except (OSError, ValueError) as err:
                raise StageError(f"model {self.label}: {name} in {self.path} is not a weight index ({err})") from None

        _, weights = pick_weights({e.path for e in entries}, read_index)
        lfs = [e for e in entries if e.oid]
        needed = [e for e in lfs if e.path in weights or not e.path.lower().endswith(WEIGHT_SUFFIXES)]
        return needed, [e for e in lfs if e not in needed]

    def object_path(self, entry: Entry) -> Path:
        return self.store / "objects" / entry.oid[:2] / entry.oid[2:4] / entry.oid

    def missing(self, needed: list[Entry]) -> list[Entry]:
        return [e for e in needed if not self.object_path(e).is_file() or self.object_path(e).stat().st_size != e.size]

    def fsck(self) -> list[str]:
        """`git lfs fsck --objects`: hashes every needed object; corrupt ones are moved aside (to lfs/bad)."""
        try:
            self.run("lfs", "fsck", "--objects")
            return []
        except GitError as err:
            lines = [line for line in str(err).splitlines() if re.search("corruptobject|openerror", line, re.I)]
            return lines or [str(err)]

    def ensure_space(self, missing: list[Entry], needed: list[Entry]) -> None:
        need = sum(e.size for e in missing)
        if not hardlinks_work(self.root):
            need += sum(e.size for e in needed)  # the working tree gets copies instead of links
        free = shutil.disk_usage(self.root).free
        reserve = self.git.req.min_free_bytes
        if need + reserve > free:
            raise StageError(
                f"model {self.label}: not enough disk space in {self.git.req.cache_dir}: the download needs "
                f"{human(need)} (read from the LFS pointers) and model.min_free_gb keeps {human(reserve)} free, but "
                f"only {human(free)} is free. Free space there, or set model.model_cache_dir to a larger file system"
            )

    def download(self, missing: list[Entry], needed: list[Entry]) -> None:
        for leftover in ("incomplete", "tmp", "bad"):  # partial downloads of killed runs, corrupt copies
            shutil.rmtree(self.store / leftover, ignore_errors=True)
        self.ensure_space(missing, needed)
        total = sum(e.size for e in missing)
        log.info("%s: downloading %d LFS object(s), %s, from %s", self.label, len(missing), human(total), self.git.req.url)
        with progress(self, missing, total):
            try:
                self.run("lfs", "fetch", "origin", "HEAD")
            except GitError as err:
                raise self.git.remote_error(err, "downloading the LFS files of") from None

    def link(self, needed: list[Entry], skipped: list[Entry]) -> None:
        """Working tree = the verified objects: each LFS file becomes a read-only hard link to its object (a copy
        where links are not possible); weight duplicates that were not fetched leave no pointer file behind."""
        for entry in needed:
            obj, dest = self.object_path(entry), self.path / entry.path
            try:
                os.chmod(obj, obj.stat().st_mode & ~0o222)
            except OSError:
                pass
            if dest.is_file() and os.path.samefile(obj, dest):
                continue
            tmp = dest.with_name(f".{dest.name}.link")
            tmp.unlink(missing_ok=True)
            try:
                os.link(obj, tmp)
            except OSError:
                shutil.copyfile(obj, tmp)
            os.replace(tmp, dest)
        for entry in skipped:
            (self.path / entry.path).unlink(missing_ok=True)

    def complete(self) -> dict:
        """Check the snapshot and repair what is missing or corrupt; only the LFS download uses the network."""
        self.run("config", "lfs.storage", "../../../lfs")
        self.run("remote", "set-url", "origin", self.git.req.url)
        entries = self.entries()
        self.restore_plain_files([e for e in entries if e.oid is None])
        needed, skipped = self.plan(entries)
        self.run("config", "lfs.fetchinclude", "")  # a user's global include list must not hide files
        self.run("config", "lfs.fetchexclude", ",".join(e.path for e in skipped))
        corrupt = [line for line in self.fsck() if "corruptobject" in line.lower()]
        if corrupt:
            log.warning("%s: corrupt LFS objects moved aside, fetching them again: %s", self.label, "; ".join(corrupt))
        missing = self.missing(needed)
        if missing:
            try:
                self.download(missing, needed)
            except StageError as err:
                damaged = [e.path for e in missing if any(e.oid in line or e.path in line for line in corrupt)]
                if not damaged:
                    raise
                raise StageError(
                    f"model {self.label}: {', '.join(damaged)} in {self.path} failed its sha256 check (git lfs fsck) "
                    f"and was set aside; fetching it again failed: {str(err).removeprefix(f'model {self.label}: ')}. "
                    "Run the model stage again where the hub is reachable: it fetches only the damaged file"
                ) from None
            problems = self.fsck() + [f"{e.path} was not downloaded" for e in self.missing(needed)]
            if problems:
                raise StageError(
                    f"model {self.label}: the LFS files in {self.path} fail verification after the download "
                    f"({'; '.join(problems[:5])}); run the model stage again, and if this persists remove {self.path}"
                )
        self.link(needed, skipped)
        what = f"downloaded {len(missing)} LFS file(s)" if missing else "complete in the cache, nothing downloaded"
        log.info("%s: %s; %d LFS file(s) verified by git lfs fsck in %s", self.label, what, len(needed), self.path)
        if skipped:
            log.info("%s: not fetched (weights the loader does not read): %s", self.label,
                     ", ".join(e.path for e in skipped))
        return {
            "downloaded": len(missing),
            "lfs_files": len(needed),
            "skipped": [e.path for e in skipped],
            "bytes": sum(e.size for e in needed),
        }


def hardlinks_work(directory: Path) -> bool:
    with tempfile.TemporaryDirectory(dir=directory, prefix=".link-test-") as tmp:
        source = Path(tmp) / "a"
        source.touch()
        try:
            os.link(source, Path(tmp) / "b")
            return True
        except OSError:
            return False


@contextmanager
def progress(snap: Snapshot, missing: list[Entry], total: int) -> Iterator[None]:
    """Log the bytes downloaded every PROGRESS_EVERY_S seconds while git-lfs fetches (its own progress bar
    needs a terminal)."""
    done = threading.Event()

    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:  # not there yet, or renamed while we look
            return 0

    def report() -> None:
        while not done.wait(PROGRESS_EVERY_S):
            have = sum(size(snap.object_path(e)) for e in missing)
            have += sum(size(p) for p in (snap.store / "incomplete").glob("*"))
            log.info("%s: %s of %s downloaded", snap.label, human(have), human(total))

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


