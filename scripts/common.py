"""Shared by the stage scripts: a dataclass config parsed from `--name value` arguments, logging, errors a person
can act on, and small file helpers. No heavy imports here: every stage pays for what it imports.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import resource
import socket
import sys
import tempfile
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("finetune")
T = TypeVar("T")


class StageError(Exception):
    """A failure the user can fix (bad input, missing file, wrong setting). Printed without a traceback."""


# --- arguments ------------------------------------------------------------------------------------------------


def _convert(text: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if optional and text.lower() in ("null", "none", ""):
        return None
    if origin in (typing.Union, types.UnionType):
        if text.startswith(("[", "{")):
            return json.loads(text)
        return _convert(text, args[0]) if len(args) == 1 else text
    if hint is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    if origin in (list, dict) or hint in (list, dict):
        if text.startswith(("[", "{")):
            return json.loads(text)
        return [part for part in text.split(",") if part]
    if hint in (int, float, str):
        return hint(text)
    return text


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `--field-name value` into the dataclass `cls`; fields without a default are required."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(cls):
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        default = field.default if field.default is not dataclasses.MISSING else None
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        hint = hints[field.name]
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=lambda text, hint=hint: _convert(text, hint),
            default=default,
            required=not has_default,
            help=field.metadata.get("help", "") + (f" (default: {default})" if has_default else ""),
        )
    return cls(**vars(parser.parse_args(argv)))


def cli(main: Callable[[T], Any], cls: type[T], doc: str | None = None) -> None:
    """Entry point of a stage: parse arguments, set up logging, run, and turn a StageError into a clear
    message and exit status 2 instead of a traceback."""
    setup_logging()
    cfg = parse_args(cls, description=doc)
    try:
        main(cfg)
    except StageError as err:
        log.error("%s", err)
        sys.exit(2)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # On AVX512-BF16 CPUs bitsandbytes advises installing `kernels` for its packed 4-bit inference kernel, which
    # training never uses (scripts/quantized.py keeps the trainable layout): advice that misleads in a stage log.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


# --- files ----------------------------------------------------------------------------------------------------


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
    rows = []
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
            rows.append(row)
    return rows


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_dir(model_json: str | os.PathLike) -> str:
    """The base model directory recorded by the model stage."""
    return read_json(model_json, "model record")["path"]


# --- measurements ---------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set since exec (VmHWM). ru_maxrss would also count the parent's resident set
    at fork, which inflates the figure of every stage started from a big process."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory() -> dict:
    """Peak memory of this process: GPU bytes allocated by torch when CUDA is in use, and host RSS."""
    info = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        info["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return info


def table(rows: list[tuple[str, Any]], title: str = "") -> str:
    """A two-column text table for the end of a log."""
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title, "-" * max(len(title), width + 20)] if title else []
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
