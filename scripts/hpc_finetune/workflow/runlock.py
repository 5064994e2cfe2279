"""One controller per run. Snakemake's own lock is per working directory and coarse: any other run that finishes
there, and any `snakemake --unlock`, removes it, so a second controller for the same run could start, run the same
jobs again and overwrite their outputs and logs. This lock is the project's own: an flock on
results/{run_name}/logs/controller.lock, taken by the main Snakemake process of a run that executes jobs (the
Snakefile's onstart) and held until that process ends. The kernel drops it when its holder dies; the holder's line
left in the file by a killed controller is what the next one reports taking over. README, "Re-running only what
changed".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import socket
import sys
import time
import typing
from pathlib import Path

LOCK = Path("logs") / "controller.lock"


class RunInUse(Exception):
    """Another live controller holds the run's lock (or the file system cannot lock)."""


def lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / LOCK


def holder_line() -> str:
    """Who holds the lock: host, pid, since when, and the command (so the user knows what to wait for or stop)."""
    job = os.environ.get("SLURM_JOB_ID")
    command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]
    return (f"host {socket.gethostname()} pid {os.getpid()}{f' (Slurm job {job})' * bool(job)} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}")


def _refusal(path: Path, holder: str) -> str:
    here = socket.gethostname()
    return (
        f"{path.parent.parent} is being run by another Snakemake controller ({holder or 'unknown holder'}).\n"
        f"A second controller for the same run would start its jobs again and overwrite their outputs and logs, "
        f"so this one stops before running anything. Wait for that run to end, or stop it "
        f"(`kill <pid>`{'' if here in holder else ' on its host'}), then run again. `snakemake --unlock` does not "
        f"release this lock: the kernel does when its holder ends. A dry run (-n) is never refused.\n"
        f"(The lock: {path}; another run_name has a lock of its own.)"
    )


def take(run_dir: str | os.PathLike) -> tuple[typing.IO, str | None]:
    """Take the run's lock without waiting; return its open file (keep it open: closing it releases the lock) and
    a note when it took over from a holder that ended without releasing it (a killed controller). RunInUse when
    a live controller holds it."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fh = open(path, "a+")  # noqa: SIM115  (held for the life of the process)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise RunInUse(_refusal(path, holder)) from None
        except OSError as err:
            fh.close()
            raise RunInUse(f"cannot lock {path} ({err.strerror}): put output_dir on a file system with flock "
                           f"(local disk, NFSv4, Lustre or GPFS mounted with flock)") from None
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fh.fileno()).st_ino == path.stat().st_ino:
                break
        fh.close()  # removed or replaced between open and lock: lock the file that is there now
    fh.seek(0)
    previous = fh.read().strip()
    fh.truncate(0)
    fh.write(holder_line() + "\n")
    fh.flush()
    note = (f"took over the run lock {path} from a controller that ended without releasing it (killed?): "
            f"{previous}") if previous else None
    return fh, note


def release(fh: typing.IO) -> None:
    """At a controller's clean end: clear the holder's line (so the next controller has nothing to take over)
    and drop the lock."""
    with contextlib.suppress(OSError, ValueError):
        fh.truncate(0)
        fh.close()


def holder(run_dir: str | os.PathLike) -> str | None:
    """The live controller holding the run's lock, or None (free, or no lock file). Takes nothing."""
    path = lock_path(run_dir)
    try:
        fh = open(path)  # noqa: SIM115
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return fh.read().strip() or "another process"
        except OSError:
            return None
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None
