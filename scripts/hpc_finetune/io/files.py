"""Files as the stages write and read them: atomic writes with shared permissions, JSON and JSON Lines with errors
that name the file and line, sha256, the model record, and an exclusive lock that a killed holder never leaves
behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpc_finetune.io.cli import StageError, log


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically: readers never see half a file, and a crash leaves the old file in place."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; outputs are shared like any other file
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(path: str | os.PathLike, waiting: str, cannot: str) -> Iterator[typing.IO]:
    """Hold an exclusive flock on `path` (created) while the block runs; yield its open file (a child started with
    it in pass_fds holds the lock too). When another process holds it, log `waiting` (formatted with {holder}:
    host, pid, Slurm job and since when) and wait. The kernel drops the lock when its last holder dies, so a
    killed run leaves no stale lock. `cannot`: the fix, for file systems without locks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                log.warning(waiting.format(holder=fh.read().strip() or "another process"))
                started = time.monotonic()
                fcntl.flock(fh, fcntl.LOCK_EX)
                log.info("lock %s taken after %.0f s of waiting", path, time.monotonic() - started)
        except OSError as err:
            raise StageError(f"cannot lock {path} ({err.strerror}); {cannot}") from None
        job = os.environ.get("SLURM_JOB_ID")
        fh.truncate(0)
        fh.write(f"{socket.gethostname()} pid {os.getpid()}{f' (Slurm job {job})' * bool(job)} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        try:
            yield fh
        finally:
            fh.truncate(0)
            fcntl.flock(fh, fcntl.LOCK_UN)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{what} {path} is missing; run the stage that produces it first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(f"{what} {path} is not valid JSON (line {err.lineno}): {err.msg}") from None


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read JSON Lines; a malformed line is a StageError naming the file and the line."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """The rows of a JSON Lines file one by one (never all in memory); a malformed line is a StageError naming the
    file and the line."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise StageError(
                    f"{path} line {lineno}: not valid UTF-8 (byte {err.start + 1} of the line); save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise StageError(f"{path} line {lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise StageError(f"{path} line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield row


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[typing.BinaryIO]:
    """A binary file to write `path` through, piece by piece: it replaces `path` (shared permissions) only when the
    block ends without an error; an error leaves the old file in place and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_dir(model_json: str | os.PathLike) -> str:
    """The base model directory recorded by the model stage."""
    return read_json(model_json, "model record")["path"]
